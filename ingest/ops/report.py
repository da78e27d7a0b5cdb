"""`status`, `verify` and `load`: the operator's views of a data directory and database."""

from __future__ import annotations

import io
import multiprocessing as mp
from typing import Any

from loguru import logger
from psycopg2 import sql

from ingest.config import Config
from ingest.run.children import load_ready
from ingest.sink import db
from ingest.sink.segments import SegmentStore
from ingest.source import checkpoint
from ingest.source.api import ApiClient, SourceUnavailable, make_limiters
from ingest.source.lanes import Lane
from ingest.source.normalise import normalise_event


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
            "total_reported": state.total,
            "drained": state.drained,
            "rows_fetched": state.rows,
            "updated_at": state.updated_at,
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
        with db.database(config) as dsn:
            conn = db.connect(dsn)
            try:
                db.ensure_schema(conn, config.table)
                out["database"] = db.totals(conn, config.table)
            finally:
                conn.close()
    except Exception as exc:
        out["database"] = {"error": db.describe_error(exc)}
    return out


def run_load(config: Config) -> dict[str, Any]:
    store = SegmentStore(config.segments_dir)
    store.ensure()
    with db.database(config) as dsn:
        db.prepare_database(config, dsn, store)
        return load_ready(config, dsn, config.workers)


def crawl_source_ids(config: Config, sink: io.BufferedIOBase | Any) -> dict[str, int]:
    """Page the whole source once, newest to oldest, writing storable ids (one per line)
    to `sink`; count what no client could store."""
    ctx = mp.get_context("spawn")
    client = ApiClient(config, make_limiters(config, ctx))
    lane: Lane = "events" if config.source == "events" else "feed"
    counts = {"events": 0, "unstorable": 0, "pages": 0}
    cursor: str | None = None
    try:
        while True:
            try:
                page = client.fetch_page(lane, cursor, limit=config.page_limit)
            except SourceUnavailable:
                if config.source == "feed":
                    raise
                lane, cursor = "events", None
                continue
            counts["pages"] += 1
            for event in page.events:
                result = normalise_event(event)
                if result.reason is None and result.event_id is not None:
                    sink.write(result.event_id.encode() + b"\n")
                    counts["events"] += 1
                else:
                    counts["unstorable"] += 1
            if not page.has_more or not page.next_cursor:
                return counts
            cursor = page.next_cursor
    finally:
        client.close()


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


def run_verify(config: Config, sample: int) -> dict[str, Any]:
    """Compare the source with the table: counts, missing and extra ids."""
    ids = io.BytesIO()
    counts = crawl_source_ids(config, ids)
    table = sql.Identifier(config.table)
    with db.database(config) as dsn:
        conn = db.connect(dsn)
        try:
            db.ensure_schema(conn, config.table)
            with conn.cursor() as cur:
                cur.execute("CREATE TEMP TABLE verify_source (id text)")
                ids.seek(0)
                cur.copy_expert("COPY verify_source FROM STDIN", ids, size=1 << 20)
                cur.execute("CREATE INDEX ON verify_source (id)")
                cur.execute("ANALYZE verify_source")
                cur.execute("SELECT count(DISTINCT id) FROM verify_source")
                (source_ids,) = cur.fetchone()
                cur.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
                (table_rows,) = cur.fetchone()
                missing, missing_ids = count_and_sample(cur, MISSING_IDS.format(table), sample)
                extra, extra_ids = count_and_sample(cur, EXTRA_IDS.format(table), sample)
                cur.execute("SELECT count(*) FROM ingest_rejects")
                (rejects,) = cur.fetchone()
            conn.rollback()
        finally:
            conn.close()
    report = {
        "match": missing == 0 and extra == 0,
        "source_events": counts["events"],
        "source_distinct_ids": source_ids,
        "source_unstorable": counts["unstorable"],
        "table_rows": table_rows,
        "missing": missing,
        "extra": extra,
        "rejects_stored": rejects,
        "missing_sample": missing_ids,
        "extra_sample": extra_ids,
        "pages": counts["pages"],
    }
    logger.info("verify: {}", "match" if report["match"] else "MISMATCH")
    return report
