"""What a data directory's state belongs to: the API, the table, the database, the source.

A checkpoint says which events are already in *one* table. Run against another table,
database or API, the same state would report "drained" and load nothing, so a run records
its target in the checkpoint and refuses (exit 2) to use a state recorded for another.
The database is named by host, port and name: never by the user or password it is reached
with, so a rotated password is no change of target.
"""

from __future__ import annotations

from psycopg2.extensions import parse_dsn

from ingest.config import Config

# The fields in the order a message names them, with how the command line says them.
FIELDS: dict[str, str] = {"api_url": "--api-url", "table": "--table", "database": "--database-url",
                          "source": "--source"}
EMBEDDED = "embedded (<data-dir>/pg)"


def database_identity(database_url: str | None) -> str:
    if not database_url:
        return EMBEDDED
    parts = parse_dsn(database_url)
    host = parts.get("host") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


def target_of(config: Config) -> dict[str, str]:
    return {
        "api_url": config.api_url.rstrip("/"),
        "table": config.table,
        "database": database_identity(config.database_url),
        "source": config.source,
    }


def target_change(recorded: dict[str, str] | None, current: dict[str, str]) -> str | None:
    """What differs, as a phrase naming each field (None: the same target, or a state
    from before targets were recorded, which the run adopts)."""
    if recorded is None:
        return None
    changed = [f"{flag} {recorded.get(name)!s} (this run: {current[name]})"
               for name, flag in FIELDS.items() if recorded.get(name) != current[name]]
    return "; ".join(changed) or None
