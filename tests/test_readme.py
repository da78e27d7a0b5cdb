"""The README's promises that can drift: the config table and the commands it names."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from ingest.cli import main
from ingest.config import reference_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_config_table_is_current() -> None:
    section = README.split("<!-- config-table:start -->\n", 1)[1].split("<!-- config-table:end -->", 1)[0]
    assert section == reference_table(), "regenerate the table with ingest.config.reference_table()"


def test_every_command_in_the_readme_exists() -> None:
    for name in set(re.findall(r"datasync-ingest (\w+)", README)):
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README and "make test" in CI
