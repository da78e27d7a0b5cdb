"""`reset`: start a data directory over, without hand-deleting folders.

What it does with each thing a run leaves behind:

| what | `reset` | `reset --drop-table` |
|---|---|---|
| `ingestion.state`, its lock and temp files | removed | removed |
| `segments/` (open, ready, loading, loaded, rejected) | removed | removed |
| `run.lock`, `workers.lock` | kept (reset holds them) | kept |
| `pg/`, the embedded database | kept | kept, with the table dropped inside it |
| the table (`--table`) | kept | dropped |
| ledger rows and rejects of this data directory's generations | kept | deleted |
| the ledger and rejects tables, rows of other generations | kept | kept |

The table is kept by default because it is the product: without the checkpoint the next
run fetches everything again, and the primary key absorbs what is already there (new
segment ids, from a new generation, never meet the ledger's old ones). The ledger and the
rejects are shared by every table in the database, so `--drop-table` deletes only the rows
of the generations this data directory knows: the checkpoint's and those in its segment
names. The embedded database stays: a server's files are not state to wipe, and what it
held is dropped by name.

Nothing is removed while a run (or an orphan of a killed one) works in the directory, and
the database is changed, in one transaction, before any file goes: a database that fails
leaves everything as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from ingest.config import Config, redact_dsn
from ingest.ops.datadir import embedded_initialised, holding
from ingest.sink import db
from ingest.sink.segments import STATES, SegmentStore, id_of
from ingest.source import checkpoint

Confirmation = Literal["go", "ask", "refuse"]


class ResetFailed(RuntimeError):
    """Reset removed nothing; the message is the one line to show."""


def confirmation(yes: bool, terminal: bool) -> Confirmation:
    """`--yes` goes ahead; otherwise a person at a terminal is asked, and without one
    (cron, CI, a pipe) nothing is removed on a guess."""
    if yes:
        return "go"
    return "ask" if terminal else "refuse"


def generation_of(segment_name: str) -> str | None:
    """`p00-00000001-3fa9c2d1.tsv` (any file of the store) -> `3fa9c2d1`."""
    parts = id_of(Path(segment_name)).split("-")
    return parts[2] if len(parts) == 3 and parts[0].startswith("p") else None


def known_generations(state_generations: list[str], segment_names: list[str]) -> list[str]:
    found = {*state_generations} | {generation_of(name) for name in segment_names}
    return sorted(g for g in found if g)


@dataclass(frozen=True)
class Removal:
    path: Path
    what: str


def size_text(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def segments_text(counts: dict[str, int], size: int) -> str:
    listed = ", ".join(f"{counts[state]} {state}" for state in STATES if counts.get(state))
    return f"segments: {listed or 'none'}; {size_text(size)}"


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []


def removals(config: Config) -> tuple[list[Removal], list[str]]:
    """What reset removes, and the segment file names (for their generations)."""
    found: list[Removal] = []
    state = config.state_path
    if state.exists():
        found.append(Removal(state, "the checkpoint"))
    for extra in [state.with_name(state.name + ".lock"), *sorted(state.parent.glob(f".{state.name}.*.tmp"))]:
        if extra.exists():
            found.append(Removal(extra, "the checkpoint's " + ("lock file" if extra.suffix == ".lock" else "temp file")))
    names: list[str] = []
    if config.segments_dir.exists():
        files = files_in(config.segments_dir)
        names = [f.name for f in files]
        store = SegmentStore(config.segments_dir)
        counts: dict[str, int] = {s: len(store.segments(s)) for s in STATES if store.folder(s).is_dir()}
        found.append(Removal(config.segments_dir, segments_text(counts, sum(f.stat().st_size for f in files))))
    return found, names


def state_generations(config: Config) -> list[str]:
    """The checkpoint's generation and those of the epochs before it (top-ups)."""
    try:
        state = checkpoint.read(config.state_path)
    except checkpoint.CheckpointError:
        return []  # unreadable: its generations are lost; the segment names may still tell
    return [*state.earlier_generations, state.generation] if state else []


# ---------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class TableDrop:
    """What --drop-table finds: the table's rows (None: no such table), and the ledger rows
    and rejects of this data directory's generations, and of any other."""

    where: str
    rows: int | None
    ledger: int
    rejects: int
    other_ledger: int

    def text(self, table: str, generations: list[str]) -> str:
        rows = "not there" if self.rows is None else f"{self.rows} rows"
        gens = ", ".join(generations) or "none known"
        others = (f"; {self.other_ledger} ledger rows of other generations stay (another data directory's,"
                  " or from before an earlier reset)") if self.other_ledger else ""
        return (f"table {table} in {self.where} ({rows}); {self.ledger} ledger rows and {self.rejects} rejects"
                f" of generation(s) {gens}{others}")


def generation_patterns(generations: list[str]) -> list[str]:
    return [f"%-{g}" for g in generations]


def count_drop(conn: psycopg2.extensions.connection, table: str, generations: list[str], where: str) -> TableDrop:
    patterns = generation_patterns(generations)
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s), to_regclass('ingest_segments'), to_regclass('ingest_rejects')",
                    (sql.Identifier(table).as_string(conn),))
        has_table, has_ledger, has_rejects = cur.fetchone()
        rows = ledger = rejects = others = 0
        if has_table:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            (rows,) = cur.fetchone()
        if has_ledger:
            cur.execute("SELECT count(*) FILTER (WHERE segment_id LIKE ANY(%s)), count(*) FROM ingest_segments",
                        (patterns,))
            ledger, every = cur.fetchone()
            others = every - ledger
        if has_rejects:
            cur.execute("SELECT count(*) FROM ingest_rejects WHERE segment_id LIKE ANY(%s)", (patterns,))
            (rejects,) = cur.fetchone()
    conn.rollback()
    return TableDrop(where, rows if has_table else None, ledger, rejects, others)


def drop(conn: psycopg2.extensions.connection, table: str, generations: list[str]) -> None:
    """In one transaction: the table, and the ledger rows and rejects of `generations`."""
    patterns = generation_patterns(generations)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        for name in ("ingest_segments", "ingest_rejects"):
            cur.execute("SELECT to_regclass(%s)", (name,))
            if cur.fetchone()[0]:
                cur.execute(f"DELETE FROM {name} WHERE segment_id LIKE ANY(%s)", (patterns,))
    conn.commit()


# ---------------------------------------------------------------------------------------
# The command


def run_reset(config: Config, drop_table: bool, confirm: Callable[[list[str]], bool]) -> list[str]:
    """Reset the data directory; the lines to print. `confirm` sees what would go and
    says whether to go ahead. Busy (a run works here) and ResetFailed remove nothing."""
    if not config.data_dir.is_dir():
        return [f"nothing to remove: {config.data_dir} is not a directory"]
    with holding(config.data_dir):
        found, names = removals(config)
        if not drop_table:
            return remove(found, confirm, [f"kept the table {config.table}; --drop-table drops it"])
        generations = known_generations(state_generations(config), names)
        if not config.database_url and not embedded_initialised(config):
            return remove(found, confirm, [f"no table to drop: no embedded database in {config.pg_dir}"])
        where = redact_dsn(config.database_url) if config.database_url else f"the embedded database {config.pg_dir}"
        try:
            with db.database(config) as dsn:
                conn = db.connect(dsn)
                try:
                    plan = count_drop(conn, config.table, generations, where)
                    wanted = [plan.text(config.table, generations), *(f"{r.path} ({r.what})" for r in found)]
                    if not confirm(wanted):
                        raise ResetFailed("not confirmed; nothing removed")
                    drop(conn, config.table, generations)
                finally:
                    conn.close()
        except (psycopg2.Error, db.DatabaseError) as exc:
            raise ResetFailed(f"cannot drop the table: {db.describe_error(exc)}; nothing removed") from None
        return [f"dropped {plan.text(config.table, generations)}", *remove(found, lambda wanted: True, [])]


def remove(found: list[Removal], confirm: Callable[[list[str]], bool], after: list[str]) -> list[str]:
    if not found:
        return ["nothing to remove", *after]
    if not confirm([f"{r.path} ({r.what})" for r in found]):
        raise ResetFailed("not confirmed; nothing removed")
    lines: list[str] = []
    for item in found:
        try:
            if item.path.is_dir():
                shutil.rmtree(item.path)
            else:
                item.path.unlink(missing_ok=True)
        except OSError as exc:
            done = "; ".join(lines) or "nothing removed"
            raise ResetFailed(f"cannot remove {item.path}: {exc.strerror or exc} ({done})") from None
        lines.append(f"removed {item.path} ({item.what})")
    return [*lines, *after]
