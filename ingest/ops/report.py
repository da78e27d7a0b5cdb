"""`status`, `verify` and `load`: the operator's views of a data directory and database.

`verify` compares what the source holds now (crawled as a run walks it, see `crawl`) with
the table; its exit codes are 0 (a match), 1 (a mismatch) and `ExitCode.UNCHECKED`.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import psycopg2
from loguru import logger
from psycopg2 import sql

from ingest.config import Config
from ingest.ops.crawl import DOUBTFUL, IDS, REJECTS, Crawl, CrawlFailed, crawl_source
from ingest.ops.datadir import database_to_read, holding
from ingest.run.loading import load_ready
from ingest.run.progress import lag_figures
from ingest.sink import db
from ingest.sink.loader import first_refused_line, split_lines
from ingest.sink.segments import SegmentStore
from ingest.source import checkpoint
from ingest.tsv import COLUMNS


def collect_status(config: Config) -> dict[str, Any]:
    store = SegmentStore(config.segments_dir)
    state_info: dict[str, Any] | None = None
    try:
        state = checkpoint.read(config.state_path)
    except checkpoint.CheckpointError as exc:
        state, state_info = None, {"error": str(exc)}
    if state is not None:
        state_info = {
            "mode": state.mode,
            "total_reported": state.source_total,
            "drained": state.drained,
            "rows_fetched": state.rows,
            "updated_at": state.updated_at,
            **lag_figures(state),
            "partitions": [
                {"index": p.index, "lane": p.lane, "done": p.done, "rows": p.rows, "last_sealed": p.last_sealed}
                for p in state.partitions
            ],
        }
    out: dict[str, Any] = {
        "data_dir": str(config.data_dir),
        "checkpoint": state_info,
        "segments": store.counts() if config.segments_dir.exists() else {},
    }
    try:
        with database_to_read(config) as dsn:
            conn = db.connect(dsn)
            try:
                db.ensure_schema(conn, config.table)
                out["database"] = db.totals(conn, config.table)
            finally:
                conn.close()
    except Exception as exc:
        out["database"] = {"error": db.describe_error(exc)}
    return out


def run_load(config: Config) -> dict[str, int]:
    """Load what is in ready/, holding the run lock: reconcile re-queues loading/ and
    discards open/, which would pull the segments from under a run working in the same
    data directory. LoadFailed, db.DatabaseError or Busy carry the one line to show."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with holding(config.data_dir):
        store = SegmentStore(config.segments_dir)
        store.ensure()
        with db.database(config) as dsn:
            db.prepare_database(config, dsn, store)
            return load_ready(config, dsn, config.workers)


MISSING_IDS = sql.SQL(
    "SELECT DISTINCT s.id FROM verify_source s WHERE NOT EXISTS (SELECT 1 FROM {} e WHERE e.id = s.id)"
)
EXTRA_IDS = sql.SQL("SELECT e.id FROM {} e WHERE NOT EXISTS (SELECT 1 FROM verify_source s WHERE s.id = e.id)")


def count_and_sample(cur: Any, ids_query: sql.Composed, sample: int) -> tuple[int, list[str]]:
    """How many ids a query finds, and the first `sample` of them."""
    cur.execute(sql.SQL("SELECT count(*) FROM ({}) q").format(ids_query))
    (count,) = cur.fetchone()
    cur.execute(ids_query + sql.SQL(" ORDER BY 1 LIMIT %s"), (sample,))
    return int(count), [row[0] for row in cur.fetchall()]


class Unchecked(RuntimeError):
    """verify could not compare the source with the table; the message is the one line."""


def require_table(dsn: str, table: str) -> None:
    """Before a crawl that may take as long as a run: the database answers and has the
    table (verify creates nothing)."""
    try:
        conn = db.connect(dsn)
    except psycopg2.Error as exc:
        raise Unchecked(f"cannot connect to the database: {db.describe_error(exc)}") from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (sql.Identifier(table).as_string(conn),))
            (found,) = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    if found is None:
        raise Unchecked(f"the database has no table {table}: nothing was loaded into it")


def run_verify(config: Config, sample: int) -> dict[str, Any]:
    """Compare the source with the table: counts, missing and extra ids. Unchecked when
    the source, the database or the scratch folder fails on the way."""
    try:
        with database_to_read(config) as dsn:
            require_table(dsn, config.table)
            # A walker still mid-request after a failure may write on: never mask the failure.
            with tempfile.TemporaryDirectory(prefix="datasync-verify-", ignore_cleanup_errors=True) as folder:
                crawl = crawl_source(config, Path(folder))
                report = compare(dsn, config.table, crawl, sample)
    except (CrawlFailed, db.DatabaseError) as exc:
        raise Unchecked(str(exc)) from None
    except psycopg2.Error as exc:
        raise Unchecked(f"database: {db.describe_error(exc)}") from None
    except OSError as exc:
        raise Unchecked(f"cannot write the crawl's scratch files: {exc}") from None
    logger.info("verify: {}", "match" if report["match"] else "MISMATCH")
    return report


def copy_files(cur: Any, table: str, paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as fh:
            cur.copy_expert(f"COPY {table} FROM STDIN", fh, size=1 << 20)


def judged_by_postgresql(dsn: str, paths: list[Path]) -> tuple[bytes, int]:
    """The event rows the crawl doubted (see `crawl.MAYBE_TOO_BIG`), judged by the COPY
    and the bisection the loader uses, on a connection of their own (each try is rolled
    back): the ids PostgreSQL takes, one a line, and how many distinct ids it refuses."""
    lines = [line for path in paths for line in split_lines(path.read_bytes())]
    taken: list[bytes] = []
    refused: set[bytes] = set()
    conn = db.connect(dsn)
    try:
        while lines and (found := first_refused_line(conn, lines)) is not None:
            position, _ = found
            taken += lines[:position]
            refused.add(lines[position][: lines[position].index(b"\t")])
            lines = lines[position + 1:]
    finally:
        conn.close()
    return b"".join(line[: line.index(b"\t")] + b"\n" for line in taken + lines), len(refused)


def compare(dsn: str, table: str, crawl: Crawl, sample: int) -> dict[str, Any]:
    """The crawl's ids against the table, in temporary tables of one session. Walks overlap
    (windows by a millisecond, a split by what the victim fetched before it noticed), so
    the source's events are its distinct ids (`ids_crawled` counts the repeats too), and
    rejects seen twice count once, as the loader stores them."""
    target = sql.Identifier(table)
    conn = db.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE verify_source (id text)")
            copy_files(cur, "verify_source", crawl.files(IDS))
            taken, refused = judged_by_postgresql(dsn, crawl.files(DOUBTFUL))
            cur.copy_expert("COPY verify_source FROM STDIN", io.BytesIO(taken))
            cur.execute("CREATE TEMP TABLE verify_rejects (" + ", ".join(f"{c} text" for c in COLUMNS) + ")")
            copy_files(cur, "verify_rejects", crawl.files(REJECTS))
            cur.execute("CREATE INDEX ON verify_source (id)")
            cur.execute("ANALYZE verify_source")
            cur.execute("SELECT count(*), count(DISTINCT id) FROM verify_source")
            crawled, source_ids = cur.fetchone()
            cur.execute("SELECT count(DISTINCT " + db.reject_key("raw") + ") FROM verify_rejects")
            (unstorable,) = cur.fetchone()
            unstorable += refused
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(target))
            (table_rows,) = cur.fetchone()
            missing, missing_ids = count_and_sample(cur, MISSING_IDS.format(target), sample)
            extra, extra_ids = count_and_sample(cur, EXTRA_IDS.format(target), sample)
            cur.execute("SELECT to_regclass('ingest_rejects')")
            rejects = 0
            if cur.fetchone()[0] is not None:  # a table made by hand, not by a run, has none
                cur.execute("SELECT count(*) FROM ingest_rejects")
                (rejects,) = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    return {
        "match": missing == 0 and extra == 0,
        "source_events": source_ids,
        "ids_crawled": crawled,
        "source_unstorable": unstorable,
        "table_rows": table_rows,
        "missing": missing,
        "extra": extra,
        "rejects_stored": rejects,
        "missing_sample": missing_ids,
        "extra_sample": extra_ids,
        "pages": crawl.pages,
        "partitions": crawl.walks,
    }
