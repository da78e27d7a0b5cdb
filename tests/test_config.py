"""Config: precedence, parsing, one-line errors, redaction, variable names, secrets from files."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from ingest.config import (
    GROUPS,
    PARSERS,
    Config,
    ConfigError,
    build_config,
    env_name,
    option_name,
    read_dotenv,
    redact_dsn,
)

BASE = {"DATASYNC_API_URL": "http://h/api/v1", "DATASYNC_API_KEY": "ds_" + "a" * 32}


def test_precedence_cli_over_env_over_dotenv() -> None:
    config = build_config(
        {"workers": "7"},
        {**BASE, "INGEST_WORKERS": "5", "INGEST_TABLE": "from_env"},
        {"INGEST_WORKERS": "3", "INGEST_TABLE": "from_dotenv", "INGEST_SOURCE": "events"},
    )
    assert (config.workers, config.table, config.source) == (7, "from_env", "events")


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"workers": "0"}, "--workers: must be at least 1"),
        ({"workers": "many"}, "--workers: expected a whole number"),
        ({"source": "ftp"}, "--source: must be one of auto, feed, events"),
        ({"api_url": "http://h/api"}, "--api-url: must end in /api/v1"),
        ({"api_url": "ftp://h/api/v1"}, "--api-url: must be an http(s) URL"),
        ({"table": "events; drop table x"}, "--table: must be a plain identifier"),
        ({"page_limit": "0"}, "--page-limit: must be at least 1"),
        ({"pacing": "sometimes"}, "--pacing: must be one of on, off"),
        ({"rate_window": "0"}, "--rate-window: must be at least 0.01"),
        ({"log_format": "xml"}, "--log-format: must be one of json, text"),
        ({"keep_segments": "maybe"}, "--keep-segments: expected true or false"),
        ({"gzip": "sometimes"}, "--gzip: must be one of auto, on, off"),
        ({"query_rate": "-5"}, "--query-rate: must be at least 0.0"),
        ({"feed_rate": "-1"}, "--feed-rate: must be at least 0.1"),
        ({"metrics_port": "70000"}, "--metrics-port: must be at least 0 and at most 65535"),
    ],
)
def test_bad_values_name_the_option(cli: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(cli, BASE, {})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^INGEST_WORKERS: "):
        build_config({}, {**BASE, "INGEST_WORKERS": "x"}, {})
    with pytest.raises(ConfigError, match=r"^INGEST_WORKERS \(in \.env\): "):
        build_config({}, BASE, {"INGEST_WORKERS": "x"})


@pytest.mark.parametrize("missing", ["DATASYNC_API_URL", "DATASYNC_API_KEY"])
def test_required_values(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match="is required"):
        build_config({}, env, {})


@pytest.mark.parametrize(
    ("text", "mode"), [("auto", "auto"), ("ON", "on"), ("off", "off"), ("true", "on"), ("0", "off"), ("yes", "on")]
)
def test_gzip_takes_a_mode_or_the_yes_no_of_the_old_flag(text: str, mode: str) -> None:
    assert build_config({"gzip": text}, BASE, {}).gzip == mode


@pytest.mark.parametrize(
    ("values", "window", "events_rate", "pacing", "page_limit"),
    [
        ({}, None, None, "on", 20_000),  # nothing given: learnt from the API, a ceiling well above its documented cap
        ({"INGEST_RATE_WINDOW": "15"}, 15.0, None, "on", 20_000),
        ({"INGEST_RATE_WINDOW": "auto", "INGEST_EVENTS_RATE": "auto"}, None, None, "on", 20_000),  # undoes a .env value
        ({"INGEST_EVENTS_RATE": "8", "INGEST_PACING": "OFF"}, None, 8.0, "off", 20_000),
        ({"INGEST_PAGE_LIMIT": "50000"}, None, None, "on", 50_000),  # a ceiling: no cap of ours
    ],
)
def test_pacing_and_page_settings(values: dict[str, str], window: float | None, events_rate: float | None,
                                  pacing: str, page_limit: int) -> None:
    config = build_config({}, {**BASE, **values}, {"INGEST_RATE_WINDOW": "30", "INGEST_EVENTS_RATE": "9"}
                          if "auto" in values.values() else {})
    assert (config.rate_window, config.events_rate, config.pacing, config.page_limit) == (
        window, events_rate, pacing, page_limit)


def test_defaults() -> None:
    config = build_config({}, BASE, {})
    assert config.data_dir == Path(".datasync")
    assert config.table == "events" and config.source == "auto" and config.database_url is None
    assert config.api_url == "http://h/api/v1"
    assert config.state_path == Path(".datasync/ingestion.state")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('KEY="ds_0123" # note', "ds_0123"),  # the old reader kept the quotes
        ("KEY='ds_0123'", "ds_0123"),
        ("export KEY=ds_0123", "ds_0123"),
        ("KEY=ds_0123 # note", "ds_0123"),
        ("KEY=a#b", "a#b"),  # a # inside a value is no comment
        ('KEY="two words"', "two words"),
        ("KEY=", ""),
        ('BASE=ds_01\nKEY="${BASE}23"', "ds_0123"),
        ("KEY=${UNSET_FOR_THIS_TEST:-ds_0123}", "ds_0123"),
        ("KEY=pa$word", "pa$word"),  # only ${...} interpolates, so a DSN password keeps its $
    ],
)
def test_dotenv_reads_like_compose(tmp_path: Path, line: str, expected: str) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(line + "\n")
    assert read_dotenv(env_file)["KEY"] == expected


def test_dotenv_skips_a_line_it_cannot_parse_with_a_warning_naming_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nINGEST_WORKERS=3\nBROKEN LINE ds_secret\nEMPTY=\n")
    warnings: list[str] = []
    assert read_dotenv(env_file, warnings.append) == {"INGEST_WORKERS": "3", "EMPTY": ""}
    assert len(warnings) == 1 and "line 3" in warnings[0] and str(env_file) in warnings[0]
    assert "ds_secret" not in warnings[0]
    assert read_dotenv(tmp_path / "absent") == {}


# --- names: one rule, old names still read ------------------------------------------------------

NEW_NAMES = {
    "api_url": "DATASYNC_API_URL", "api_key": "DATASYNC_API_KEY", "api_key_file": "DATASYNC_API_KEY_FILE",
    "database_url": "DATABASE_URL", "database_url_file": "DATABASE_URL_FILE",
    "segment_max_rows": "INGEST_SEGMENT_MAX_ROWS", "segment_max_bytes": "INGEST_SEGMENT_MAX_BYTES",
    "segment_max_age": "INGEST_SEGMENT_MAX_AGE", "ready_max_bytes": "INGEST_READY_MAX_BYTES",
    "log_format": "INGEST_LOG_FORMAT", "log_level": "INGEST_LOG_LEVEL", "workers": "INGEST_WORKERS",
}
OLD_NAMES = [
    ("INGEST_SEGMENT_ROWS", "segment_max_rows", "7", 7),
    ("INGEST_SEGMENT_BYTES", "segment_max_bytes", "2048", 2048),
    ("INGEST_SEGMENT_AGE", "segment_max_age", "0.5", 0.5),
    ("INGEST_READY_BYTES", "ready_max_bytes", str(2 << 20), 2 << 20),
    ("LOG_FORMAT", "log_format", "text", "text"),
    ("LOG_LEVEL", "log_level", "debug", "DEBUG"),
]


@pytest.mark.parametrize(("name", "env"), NEW_NAMES.items())
def test_variable_names(name: str, env: str) -> None:
    assert env_name(name) == env


def test_every_variable_is_spelled_like_its_option() -> None:
    for f in fields(Config):
        option = option_name(f.name)[2:].upper().replace("-", "_")
        assert env_name(f.name) in (f"INGEST_{option}", f"DATASYNC_{option}", option), f.name
        assert env_name(f.name).startswith(("INGEST_", "DATASYNC_", "DATABASE_URL")), f.name


@pytest.mark.parametrize(("old", "name", "text", "value"), OLD_NAMES)
def test_an_old_name_is_read_with_a_warning_naming_the_new(old: str, name: str, text: str, value: object) -> None:
    for env, dotenv, where in (({**BASE, old: text}, {}, ""), (BASE, {old: text}, " (in .env)")):
        warnings: list[str] = []
        assert getattr(build_config({}, env, dotenv, warn=warnings.append), name) == value
        assert warnings == [f"{old}{where} is deprecated: rename it {env_name(name)}"]


def test_the_new_name_wins_over_the_old_one() -> None:
    warnings: list[str] = []
    config = build_config({}, {**BASE, "INGEST_SEGMENT_ROWS": "7", "INGEST_SEGMENT_MAX_ROWS": "9"}, {}, warn=warnings.append)
    assert config.segment_max_rows == 9
    assert len(warnings) == 1 and "INGEST_SEGMENT_MAX_ROWS is set too and wins" in warnings[0]


def test_a_bad_value_under_an_old_name_is_named_as_written() -> None:
    with pytest.raises(ConfigError, match=r"^INGEST_SEGMENT_ROWS: must be at least 1"):
        build_config({}, {**BASE, "INGEST_SEGMENT_ROWS": "0"}, {})


def test_auto_spells_a_computed_default() -> None:
    config = build_config({"workers": "auto"}, {**BASE, "INGEST_LOG_FORMAT": "AUTO"}, {})
    assert (config.workers, config.log_format) == (Config().workers, Config().log_format)


# --- secrets from files -------------------------------------------------------------------------

KEY = "ds_" + "f" * 32
URL_ONLY = {"DATASYNC_API_URL": BASE["DATASYNC_API_URL"]}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api_key"
    path.write_text(KEY + "\n")  # as `echo KEY > file` and Kubernetes secrets write it
    return path


def test_a_key_file_gives_the_key_without_its_newline(key_file: Path) -> None:
    for cli, env, dotenv in (
        ({"api_key_file": str(key_file)}, URL_ONLY, {}),
        ({}, {**URL_ONLY, "DATASYNC_API_KEY_FILE": str(key_file)}, {}),
        ({}, URL_ONLY, {"DATASYNC_API_KEY_FILE": str(key_file)}),
    ):
        config = build_config(cli, env, dotenv)
        assert config.api_key == KEY and KEY in config.secrets()
        assert config.api_key_file == key_file


def test_a_database_url_file(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text("postgresql://u:s3cret@h/db\r\n")
    config = build_config({}, {**BASE, "DATABASE_URL_FILE": str(path)}, {})
    assert config.database_url == "postgresql://u:s3cret@h/db" and "s3cret" in config.secrets()


@pytest.mark.parametrize(
    ("cli", "env", "message"),
    [
        ({"api_key": KEY, "api_key_file": "KEYFILE"}, {}, "--api-key and --api-key-file are both given"),
        ({}, {"DATASYNC_API_KEY": KEY, "DATASYNC_API_KEY_FILE": "KEYFILE"},
         "DATASYNC_API_KEY and DATASYNC_API_KEY_FILE are both given"),
        ({}, {"DATABASE_URL": "postgresql://h/db", "DATABASE_URL_FILE": "KEYFILE"},
         "DATABASE_URL and DATABASE_URL_FILE are both given"),
    ],
)
def test_a_value_and_its_file_in_one_place_is_an_error(
    key_file: Path, cli: dict[str, str], env: dict[str, str], message: str
) -> None:
    cli = {k: str(key_file) if v == "KEYFILE" else v for k, v in cli.items()}
    env = {k: str(key_file) if v == "KEYFILE" else v for k, v in env.items()}
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        build_config(cli, {**URL_ONLY, **env}, {})


def test_the_higher_source_decides_between_a_value_and_a_file(key_file: Path) -> None:
    other = "ds_" + "e" * 32
    # the environment's file over .env's value (a copied .env.example keeps its placeholder key)
    assert build_config({}, {**URL_ONLY, "DATASYNC_API_KEY_FILE": str(key_file)}, {"DATASYNC_API_KEY": other}).api_key == KEY
    # the command line's key over the environment's file
    assert build_config({"api_key": other}, {**URL_ONLY, "DATASYNC_API_KEY_FILE": str(key_file)}, {}).api_key == other
    # an empty value beside a file in the same place is no conflict
    assert build_config({}, {**URL_ONLY, "DATASYNC_API_KEY": "", "DATASYNC_API_KEY_FILE": str(key_file)}, {}).api_key == KEY


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read"), ("", "is empty"), ("\n", "is empty"), (b"\xff\xfe", "is not UTF-8 text"),
     ("ds_two words\n", "must be a non-empty string without spaces")],
)
def test_a_bad_key_file_is_named_never_quoted(tmp_path: Path, content: str | bytes | None, problem: str) -> None:
    path = tmp_path / "api_key"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        build_config({}, {**URL_ONLY, "DATASYNC_API_KEY_FILE": str(path)}, {})
    message = str(info.value)
    assert message.startswith("DATASYNC_API_KEY_FILE") and str(path) in message and problem in message
    assert "two words" not in message and "\n" not in message


def test_a_bad_database_url_file_never_shows_the_password(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text("mysql://u:s3cret@h/db\n")
    with pytest.raises(ConfigError) as info:
        build_config({}, {**BASE, "DATABASE_URL_FILE": str(path)}, {})
    assert str(path) in str(info.value) and "s3cret" not in str(info.value)


def test_a_directory_as_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        build_config({"api_key_file": str(tmp_path)}, URL_ONLY, {})


def test_a_secret_on_the_command_line_warns_elsewhere_not(key_file: Path) -> None:
    warnings: list[str] = []
    build_config({"api_key": KEY, "database_url": "postgresql://u:s3cret@h/db"}, URL_ONLY, {}, warn=warnings.append)
    assert len(warnings) == 2 and all("process list" in w for w in warnings)
    assert warnings[0].startswith("--api-key on the command line") and "--api-key-file" in warnings[0]
    assert warnings[1].startswith("--database-url on the command line")
    assert KEY not in " ".join(warnings) and "s3cret" not in " ".join(warnings)
    quiet: list[str] = []
    build_config({"database_url": "postgresql://h/db"}, {**BASE}, {"DATASYNC_API_KEY": KEY}, warn=quiet.append)
    build_config({"api_key_file": str(key_file)}, URL_ONLY, {}, warn=quiet.append)
    assert quiet == [], "a DSN without a password, or a key from the environment, .env or a file: no warning"


def test_the_required_key_names_every_way_to_give_it() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, URL_ONLY, {})
    assert str(info.value) == (
        "--api-key (DATASYNC_API_KEY) or --api-key-file (DATASYNC_API_KEY_FILE) is required"
    )


@pytest.mark.parametrize(
    "dsn, expected",
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h user=u password=s3cret dbname=db", "host=h user=u password=*** dbname=db"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


def test_redacted_config_hides_secrets() -> None:
    config = build_config({"database_url": "postgresql://u:s3cret@h/db"}, BASE, {})
    shown = repr(config) + str(config.redacted())
    assert BASE["DATASYNC_API_KEY"] not in shown and "s3cret" not in shown
    assert set(config.secrets()) == {BASE["DATASYNC_API_KEY"], "s3cret"}


def test_every_field_has_help_group_and_parser() -> None:
    for f in fields(Config):
        assert f.metadata["help"] and f.metadata["group"] in GROUPS, f.name
        assert f.name in PARSERS, f.name
    groups = [f.metadata["group"] for f in fields(Config)]
    assert groups == sorted(groups, key=list(GROUPS).index), "fields in the order of their groups"
