"""Prometheus `/metrics` and `/health` for a running ingestion, served by the supervisor.

The numbers live in counters shared by every process of the run (`ingest.counters`), so one
collector that reads a snapshot at scrape time is correct across processes without
prometheus-client's multiprocess mode (no per-process files, nothing to clean up after a
crash). Which name each counter gets, and which HTTP code each health state gets, are
plain tables; the HTTP server is a thin shell around them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.counters import COUNTER_NAMES

Snapshot = Callable[[], Mapping[str, Any]]
PREFIX = "datasync_"

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

# Nested snapshot values -> (label name, help): `datasync_segments{state="ready"} 3`.
LABELLED: dict[str, tuple[str, str]] = {"segments": ("state", "Segment files per state (folder).")}

# Help for the gauges we know of; any other numeric snapshot value is exported as a gauge
# too, with a generic help, so adding a value to the snapshot needs no change here.
GAUGES: dict[str, str] = {
    "segments_open": "Segments being written by a fetcher.",
    "segments_ready": "Sealed segments waiting for a loader.",
    "segments_loading": "Segments claimed by a loader.",
    "segments_rejected": "Files of rejected rows.",
    "rss_bytes": "Resident memory of the supervisor and its children.",
    "rss_mb": "Resident memory of the supervisor and its children, in megabytes.",
    "events_per_second": "Events loaded per second since the run started.",
    "events_per_s": "Events loaded per second since the run started.",
    "total": "Events the API reports in total (meta.total).",
    "eta_s": "Estimated seconds until every event is loaded.",
    "elapsed_s": "Seconds since the run started.",
    "checkpoint_lag_rows": "Events fetched but not yet loaded.",
}

# /health: the supervisor's state -> HTTP status. Anything not listed (a typo, a state added
# later without thought) counts as unhealthy, so a health check never passes by accident.
HEALTH_CODES: dict[str, int] = {"ready": 200, "fetching": 200, "draining": 200, "done": 200, "failed": 503}
UNKNOWN_HEALTH_CODE = 503

_NOT_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def health_code(state: str) -> int:
    return HEALTH_CODES.get(state, UNKNOWN_HEALTH_CODE)


def _number(value: Any) -> float | None:
    """Text and None have no place in a metric; bools count as 0/1."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def to_metrics(snapshot: Mapping[str, Any]) -> list[Metric]:
    """The families for one snapshot: shared counters as counters, other numbers as gauges,
    and a nested mapping (`{"segments": {"ready": 3}}`) as one gauge with a label, so its
    keys can never collide with a counter's name (`segments_loaded`)."""
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    labelled: dict[str, dict[str, float]] = {}
    for key, value in snapshot.items():
        name = _NOT_METRIC_CHARS.sub("_", str(key))
        if isinstance(value, Mapping):
            leaves = {str(k): n for k, v in value.items() if (n := _number(v)) is not None}
            labelled[name] = leaves
            continue
        number = _number(value)
        if number is None:
            continue
        if name in COUNTERS:
            counters[name] = number
        else:
            gauges[name] = number
    families: list[Metric] = []
    for counter in COUNTER_NAMES:
        if counter in counters:
            metric_name, help_text = COUNTERS[counter]
            families.append(CounterMetricFamily(metric_name, help_text, value=counters[counter]))
    for name, number in sorted(gauges.items()):
        help_text = GAUGES.get(name, f"{name} as reported by the supervisor.")
        families.append(GaugeMetricFamily(PREFIX + name, help_text, value=number))
    for name, leaves in sorted(labelled.items()):
        label, help_text = LABELLED.get(name, ("key", f"{name} as reported by the supervisor."))
        family = GaugeMetricFamily(PREFIX + name, help_text, labels=[label])
        for leaf, number in sorted(leaves.items()):
            family.add_metric([leaf], number)
        families.append(family)
    return families


class SnapshotCollector(Collector):
    """Reads the snapshot on every scrape, so the numbers are never older than the scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return to_metrics(self._snapshot())


def _handler(registry: CollectorRegistry, health: Callable[[], str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = generate_latest(registry)
                except Exception as exc:
                    self._send(500, "text/plain; charset=utf-8", f"snapshot failed: {type(exc).__name__}\n".encode())
                    return
                self._send(200, CONTENT_TYPE_LATEST, body)
            elif path == "/health":
                try:
                    state = str(health())
                except Exception:
                    state = "unknown"
                body = json.dumps({"status": state}).encode()
                self._send(health_code(state), "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics or /health\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes every few seconds would drown the run's own log lines."""

    return Handler


@dataclass
class MetricsServer:
    """Handle on the serving thread; `port` is the bound one (useful when asked for 0)."""

    host: str
    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    host: str, port: int, snapshot: Callable[[], Mapping[str, int | float]], health: Callable[[], str]
) -> MetricsServer:
    """Serve /metrics and /health from a daemon thread, so a stuck scrape can never keep
    the supervisor from exiting. A private registry keeps two servers in one process (tests)
    from colliding and leaves out the default per-process collectors, which would describe
    the supervisor alone and mislead."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    server = ThreadingHTTPServer((host, port), _handler(registry, health))
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-server", daemon=True
    )
    thread.start()
    return MetricsServer(host=host, port=int(server.server_address[1]), _server=server, _thread=thread)
