"""Prometheus `/metrics` and `/health` for a running ingestion, served by the supervisor.

The numbers live in counters shared by every process of the run (`ingest.counters`), so one
collector that reads a snapshot at scrape time is correct across processes without
prometheus-client's multiprocess mode (no per-process files, nothing to clean up after a
crash). What the exporter may publish follows Prometheus' conventions: counters end in
`_total`, quantities are in base units (`_seconds`, `_bytes`), and nothing is a rate, since
`rate()` over a counter is both exact and the scraper's to choose. So every key of the
progress snapshot is either mapped below or deliberately left out (a test keeps the tables
complete against a real snapshot). `/metrics` is prometheus_client's own WSGI app;
`/health` sits beside it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ingest.counters import COUNTER_NAMES
from ingest.run.progress import tree_rss_bytes

Snapshot = Callable[[], Mapping[str, Any]]
StartResponse = Callable[..., Any]

# Every shared counter (`ingest.counters.COUNTER_NAMES`) -> (metric name, help). A test keeps
# this table complete, so a new counter cannot silently turn into a gauge.
COUNTERS: dict[str, tuple[str, str]] = {
    "events_fetched": ("datasync_events_fetched_total", "Events (rejects included) written into sealed segments."),
    "pages": ("datasync_pages_total", "Pages of events received from the API."),
    "requests": ("datasync_requests_total", "HTTP requests sent to the API."),
    "retries": ("datasync_retries_total", "Requests retried after a transient failure."),
    "http_429": ("datasync_http_429_total", "Responses with status 429 (rate limited)."),
    "http_5xx": ("datasync_http_5xx_total", "Responses with a 5xx status."),
    "truncated": ("datasync_truncated_responses_total", "Responses whose body was cut short."),
    "token_refreshes": ("datasync_token_refreshes_total", "Stream tokens obtained again."),
    "cursor_refreshes": ("datasync_cursor_refreshes_total", "Cursors re-positioned after expiry or rejection."),
    "bytes": ("datasync_response_bytes_total", "Bytes of response bodies received from the API."),
    "events_loaded": ("datasync_events_loaded_total", "Events inserted into the table."),
    "rows_loaded": ("datasync_segment_rows_loaded_total", "Segment lines loaded: events, duplicates and rejects."),
    "duplicates": ("datasync_events_duplicate_total", "Events skipped because their id was already stored."),
    "rejected": ("datasync_events_rejected_total", "Events that could not be stored, kept in ingest_rejects."),
    "segments_loaded": ("datasync_segments_loaded_total", "Segments loaded and recorded in the ledger."),
    "restarts": ("datasync_child_restarts_total", "Crashed fetcher or loader processes restarted."),
}

# Snapshot values that are levels, not counts of happenings -> (metric name, help).
GAUGES: dict[str, tuple[str, str]] = {
    "total": ("datasync_source_events", "Events the API reports in total (meta.total)."),
    "lag_seconds": (
        "datasync_lag_seconds",
        "Age of the newest loaded event against the newest one the source reported.",
    ),
    "last_topup_timestamp_seconds": (
        "datasync_last_topup_timestamp_seconds",
        "Unix time of the last top-up that completed (with --follow).",
    ),
}

# Nested snapshot values -> (metric name, label name, help): `datasync_segments{state="ready"} 3`.
LABELLED: dict[str, tuple[str, str, str]] = {
    "segments": ("datasync_segments", "state", "Segment files per state (folder)."),
}

# Snapshot keys /metrics leaves out, and why: the progress line is for people, who want a
# rate, an ETA and megabytes; Prometheus derives the first two and wants bytes.
NOT_EXPORTED: dict[str, str] = {
    "events_per_s": "a rate: rate(datasync_events_loaded_total[1m])",
    "eta_s": "derived from a rate",
    "elapsed_s": "time() - datasync_run_start_time_seconds",
    "rss_mb": "exported in bytes as datasync_resident_memory_bytes, measured at scrape time",
    "checkpoint_lag_rows": "datasync_events_fetched_total - datasync_segment_rows_loaded_total",
}

# /health: the supervisor's state -> HTTP status. Anything not listed (a typo, a state added
# later without thought) counts as unhealthy, so a health check never passes by accident.
# `degraded` is a follower that cannot reach the API: up, but not doing its job until a
# top-up works again.
HEALTH_CODES: dict[str, int] = {
    "ready": 200, "fetching": 200, "following": 200, "draining": 200, "done": 200, "failed": 503, "degraded": 503,
}
UNKNOWN_HEALTH_CODE = 503

_HTTP_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
_NOT_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def health_code(state: str) -> int:
    return HEALTH_CODES.get(state, UNKNOWN_HEALTH_CODE)


def _number(value: Any) -> float | None:
    """Text and None have no place in a metric; bools count as 0/1."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def to_metrics(snapshot: Mapping[str, Any]) -> list[Metric]:
    """The families for one snapshot, by the tables above. A nested mapping becomes one
    gauge with a label, so its keys can never collide with a counter's name
    (`segments_loaded`); a key in no table is not exported."""
    families: list[Metric] = []
    for key in COUNTER_NAMES:
        if (number := _number(snapshot.get(key))) is not None:
            name, help_text = COUNTERS[key]
            families.append(CounterMetricFamily(name, help_text, value=number))
    for key, (name, help_text) in GAUGES.items():
        if (number := _number(snapshot.get(key))) is not None:
            families.append(GaugeMetricFamily(name, help_text, value=number))
    for key, (name, label, help_text) in LABELLED.items():
        nested = snapshot.get(key)
        if not isinstance(nested, Mapping):
            continue
        family = GaugeMetricFamily(name, help_text, labels=[label])
        for leaf, value in sorted(nested.items()):
            if (number := _number(value)) is not None:
                family.add_metric([_NOT_METRIC_CHARS.sub("_", str(leaf))], number)
        families.append(family)
    return families


class SnapshotCollector(Collector):
    """Reads the snapshot on every scrape, so the numbers are never older than the scrape.

    Memory is measured here rather than taken from the snapshot, whose figure is rounded
    megabytes for the progress line."""

    def __init__(self, snapshot: Snapshot, started: float, memory: Callable[[], int] = tree_rss_bytes) -> None:
        self._snapshot = snapshot
        self._started = started
        self._memory = memory

    def collect(self) -> Iterable[Metric]:
        families = to_metrics(self._snapshot())
        families.append(GaugeMetricFamily(
            "datasync_resident_memory_bytes", "Resident memory of the supervisor and its children.",
            value=self._memory(),
        ))
        families.append(GaugeMetricFamily(
            "datasync_run_start_time_seconds", "Unix time the run started.", value=self._started,
        ))
        return families


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the run's own log lines."""


def make_app(registry: CollectorRegistry, health: Callable[[], str]) -> Callable[[dict[str, Any], StartResponse], list[bytes]]:
    """/metrics by prometheus_client (content negotiation, OpenMetrics, gzip), /health by us."""
    metrics_app = make_wsgi_app(registry)

    def respond(start_response: StartResponse, code: int, content_type: str, body: bytes) -> list[bytes]:
        start_response(f"{code} {_HTTP_REASONS[code]}", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                result: list[bytes] = metrics_app(environ, start_response)
            except Exception as exc:  # a failing snapshot: one short answer, not a traceback per scrape
                return respond(start_response, 500, "text/plain; charset=utf-8", f"snapshot failed: {type(exc).__name__}\n".encode())
            return result
        if path == "/health":
            try:
                state = str(health())
            except Exception:
                state = "unknown"
            return respond(start_response, health_code(state), "application/json", json.dumps({"status": state}).encode())
        return respond(start_response, 404, "text/plain; charset=utf-8", b"not found; try /metrics or /health\n")

    return app


@dataclass
class MetricsServer:
    """Handle on the serving thread; `port` is the bound one (useful when asked for 0)."""

    host: str
    port: int
    _server: ThreadingWSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, port: int, snapshot: Snapshot, health: Callable[[], str]) -> MetricsServer:
    """Serve /metrics and /health from a daemon thread, so a stuck scrape can never keep
    the supervisor from exiting. A private registry keeps two servers in one process (tests)
    from colliding and leaves out the default per-process collectors, which would describe
    the supervisor alone and mislead."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot, started=time.time()))
    server = make_server(host, port, make_app(registry, health), ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-server", daemon=True
    )
    thread.start()
    return MetricsServer(host=host, port=int(server.server_address[1]), _server=server, _thread=thread)
