"""The metrics server over real HTTP on loopback: counters move between scrapes, levels are
gauges in base units and rates stay out, /health answers with the code each state deserves,
and the mapping tables stay complete against a real progress snapshot."""

from __future__ import annotations

import multiprocessing as mp
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ingest.config import build_config
from ingest.counters import COUNTER_NAMES, SharedCounters
from ingest.run.metrics import (
    COUNTERS,
    GAUGES,
    HEALTH_CODES,
    LABELLED,
    NOT_EXPORTED,
    MetricsServer,
    health_code,
    start_metrics_server,
    to_metrics,
)
from ingest.run.progress import Progress
from ingest.sink.segments import SegmentStore
from ingest.source.checkpoint import Checkpoint

TIMEOUT = 10


class Source:
    """A snapshot and a health state the test changes between scrapes."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict.fromkeys(COUNTER_NAMES, 0)
        self.state = "ready"
        self.fail = False

    def snapshot(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("shared memory is gone")
        return dict(self.values)

    def health(self) -> str:
        if self.state == "raise":
            raise RuntimeError("no state")
        return self.state


@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def server(source: Source) -> Iterator[MetricsServer]:
    srv = start_metrics_server("127.0.0.1", 0, source.snapshot, source.health)
    try:
        yield srv
    finally:
        srv.stop()


def scrape(server: MetricsServer) -> dict[str, float]:
    response = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_counters_move_between_scrapes(server: MetricsServer, source: Source) -> None:
    assert server.port > 0
    source.values.update(events_fetched=120, events_loaded=100, requests=7, http_429=1, retries=2)
    first = scrape(server)
    assert first["datasync_events_fetched_total"] == 120
    assert first["datasync_events_loaded_total"] == 100
    assert first["datasync_requests_total"] == 7
    assert first["datasync_http_429_total"] == 1
    assert first["datasync_retries_total"] == 2
    assert first["datasync_http_5xx_total"] == 0

    source.values.update(events_fetched=250, events_loaded=240, requests=9, http_5xx=3)
    second = scrape(server)
    assert second["datasync_events_fetched_total"] == 250
    assert second["datasync_events_loaded_total"] == 240
    assert second["datasync_requests_total"] == 9
    assert second["datasync_http_5xx_total"] == 3


def test_levels_are_gauges_in_base_units_and_rates_are_left_out(server: MetricsServer, source: Source) -> None:
    source.values.update(
        total=5000, lag_seconds=12.5, last_topup_timestamp_seconds=1_767_000_000.0, segments={"ready": 4, "loading": 2},
        events_per_s=1500.5, eta_s=None, elapsed_s=3.2, rss_mb=50.2, checkpoint_lag_rows=7, mode="feed",
    )
    samples = scrape(server)
    assert samples["datasync_source_events"] == 5000
    assert samples["datasync_lag_seconds"] == 12.5
    assert samples["datasync_last_topup_timestamp_seconds"] == 1_767_000_000.0
    assert samples['datasync_segments{state="ready"}'] == 4
    assert samples['datasync_segments{state="loading"}'] == 2
    # This test process and its children: some megabytes, measured at the scrape.
    assert samples["datasync_resident_memory_bytes"] > 1 << 20
    assert abs(samples["datasync_run_start_time_seconds"] - time.time()) < 60
    left_out = ("per_s", "eta", "elapsed", "_mb", "lag_rows", "mode")
    assert not [name for name in samples if any(word in name for word in left_out)]


def test_unknown_lag_is_not_a_zero(server: MetricsServer, source: Source) -> None:
    """Before the first top-up the lag is unknown (None): no sample rather than a false 0."""
    source.values.update(lag_seconds=None, last_topup_timestamp_seconds=None)
    samples = scrape(server)
    assert "datasync_lag_seconds" not in samples
    assert "datasync_last_topup_timestamp_seconds" not in samples


def test_metrics_is_prometheus_clients_own_exposition(server: MetricsServer, source: Source) -> None:
    """Content negotiation comes with the library's handler: OpenMetrics when asked for."""
    source.values["events_loaded"] = 3
    response = requests.get(
        f"http://127.0.0.1:{server.port}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=TIMEOUT
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "datasync_events_loaded_total 3.0" in response.text
    assert response.text.rstrip().endswith("# EOF")


def test_failing_snapshot_gives_500_and_the_server_survives(server: MetricsServer, source: Source) -> None:
    source.fail = True
    response = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=TIMEOUT)
    assert response.status_code == 500
    source.fail = False
    source.values["events_loaded"] = 5
    assert scrape(server)["datasync_events_loaded_total"] == 5


@pytest.mark.parametrize(
    ("state", "code"),
    [("ready", 200), ("fetching", 200), ("following", 200), ("draining", 200), ("done", 200), ("failed", 503),
     ("degraded", 503), ("bogus", 503)],
)
def test_health_codes(server: MetricsServer, source: Source, state: str, code: int) -> None:
    source.state = state
    response = requests.get(f"http://127.0.0.1:{server.port}/health", timeout=TIMEOUT)
    assert response.status_code == code
    assert response.json() == {"status": state}


def test_health_follows_the_state_and_a_raising_health_is_unhealthy(server: MetricsServer, source: Source) -> None:
    url = f"http://127.0.0.1:{server.port}/health"
    assert requests.get(url, timeout=TIMEOUT).status_code == 200
    source.state = "failed"
    assert requests.get(url, timeout=TIMEOUT).status_code == 503
    source.state = "raise"
    response = requests.get(url, timeout=TIMEOUT)
    assert response.status_code == 503
    assert response.json() == {"status": "unknown"}


def test_unknown_path_is_404(server: MetricsServer) -> None:
    assert requests.get(f"http://127.0.0.1:{server.port}/nope", timeout=TIMEOUT).status_code == 404


def test_stop_ends_the_thread(source: Source) -> None:
    srv = start_metrics_server("127.0.0.1", 0, source.snapshot, source.health)
    assert scrape(srv)["datasync_events_loaded_total"] == 0
    srv.stop()
    assert not srv._thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{srv.port}/health", timeout=TIMEOUT)


# --- the pure tables ------------------------------------------------------------------------


def test_every_shared_counter_has_a_metric_name() -> None:
    assert set(COUNTERS) == set(COUNTER_NAMES)
    names = [name for name, _ in COUNTERS.values()]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"datasync_[a-z0-9_]+_total", name), name


def test_health_table() -> None:
    assert {state for state, code in HEALTH_CODES.items() if code == 200} == {
        "ready", "fetching", "following", "draining", "done",
    }
    assert health_code("failed") == 503
    assert health_code("starting-typo") == 503


def test_counters_are_counters_named_after_the_progress_names() -> None:
    """One vocabulary: what the progress line calls a counter is what the metric is named after."""
    families = to_metrics({"events_loaded": 5, "events_fetched": 9})
    values = {f.name: f.samples[0].value for f in families}
    assert values == {"datasync_events_loaded": 5, "datasync_events_fetched": 9}
    assert {f.type for f in families} == {"counter"}
    assert {f.samples[0].name for f in families} == {"datasync_events_loaded_total", "datasync_events_fetched_total"}


def test_every_key_of_a_real_progress_snapshot_is_decided(tmp_path: Path) -> None:
    """A key added to the progress snapshot must be mapped or left out on purpose, here."""
    store = SegmentStore(tmp_path / "segments")
    store.ensure()
    progress = Progress(
        build_config({}, {}, {}, required=()),
        Checkpoint(generation="g", mode="feed", total=10, newest_ms=None),
        SharedCounters(mp.get_context("spawn")),
        store,
    )
    decided = set(COUNTERS) | set(GAUGES) | set(LABELLED) | set(NOT_EXPORTED)
    assert set(progress.snapshot()) - decided == set()
    assert not (set(NOT_EXPORTED) & (set(COUNTERS) | set(GAUGES) | set(LABELLED)))


def test_gauge_and_label_names_follow_the_conventions() -> None:
    names = [name for name, _ in GAUGES.values()] + [name for name, _, _ in LABELLED.values()]
    for name in names:
        assert re.fullmatch(r"datasync_[a-z0-9_]+", name), name
        assert not name.endswith("_total"), f"{name}: _total is for counters"
        assert not re.search(r"_(s|ms|mb|kb|per_s|per_second)$", name), f"{name}: not a base unit"


def test_progress_snapshot_shape_maps_without_collisions() -> None:
    """The progress line's snapshot (nested segments, None eta) exports cleanly."""
    snapshot = {
        "events_fetched": 10, "events_loaded": 8, "events_per_s": 2.5, "eta_s": None, "requests": 3,
        "segments": {"ready": 1, "loaded": 2}, "segments_loaded": 6, "rss_mb": 50.2, "total": 40,
    }
    families = to_metrics(snapshot)
    names = [f.name for f in families]
    assert len(set(names)) == len(names)
    kinds = {f.name: f.type for f in families}
    assert kinds == {
        "datasync_events_fetched": "counter", "datasync_events_loaded": "counter", "datasync_requests": "counter",
        "datasync_segments_loaded": "counter", "datasync_source_events": "gauge", "datasync_segments": "gauge",
    }
