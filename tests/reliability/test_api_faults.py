"""API faults at high rates, each alone and all together: the real program against the
simulator over loopback HTTP, each run ending with the table equal to the simulator's truth.

Each case also asserts that the fault it is about was really injected (from the simulator's
counters) or really handled (from the client's counters in the run's summary line), so a
case whose fault silently stopped happening fails instead of passing vacuously. With
`RELIABILITY_REPORT=<file>` every case appends its counts there as a JSON line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import responses

from ingest.config import Config
from ingest.simulator import SimulatorConfig, start_simulator
from ingest.source.api import ApiClient
from ingest.source.cursors import encode_cursor
from tests.e2e import assert_exact, ingest_env, run_to_end

# Every case runs the model 100x faster: a 60 s window lasts 0.6 s, a cursor 1.2 s, and the
# client (which learns the scale from the lifetimes it is told) backs off in tens of ms.
# Simulator durations below are model seconds (divided by SCALE on the wire).
SCALE = 100.0


def summary_of(log: str) -> dict[str, Any]:
    for line in reversed(log.splitlines()):
        if '"summary"' in line:
            return dict(orjson.loads(line)["summary"])
    raise AssertionError("no summary line in the log")


def record(case: str, sim_stats: dict[str, Any], summary: dict[str, Any], events: int) -> None:
    path = os.environ.get("RELIABILITY_REPORT")
    if not path:
        return
    line = {
        "case": case, "faults": sim_stats["faults"], "responses": sim_stats["responses"],
        "rate_limited": sim_stats["rate_limited"], "tokens_issued": sim_stats["tokens_issued"],
        "client": {k: summary.get(k) for k in ("requests", "retries", "http_429", "http_5xx", "truncated",
                                               "token_refreshes", "cursor_refreshes")},
        "events_checked": events,
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def run_case(
    case: str, pg_dsn: str, data_dir: Path, sim: dict[str, Any], env: dict[str, Any], timeout: float = 300
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run to the end; returns the simulator's stats and the run's summary."""
    options: dict[str, Any] = {
        "events": 10_000, "seed": 3, "latency": "none", "rate_limits": False, "chaos": "none",
        "key_validity": 1e9, "time_scale": SCALE, **sim,
    }
    simulator = start_simulator(SimulatorConfig(**options))
    try:
        # Eight walks, as against the real API (a simulator this fast would get one a core):
        # each fault case needs enough requests in flight to meet its faults.
        environment = ingest_env(
            simulator, pg_dsn, data_dir, **{"INGEST_PAGE_LIMIT": 1000, "INGEST_PARTITIONS": 8, **env}
        )
        code, log = run_to_end(environment, data_dir / "run.log", timeout=timeout)
        assert code == 0, log[-4000:]
        truth = simulator.truth()
        assert_exact(pg_dsn, truth)
        stats, summary = simulator.stats(), summary_of(log)
        record(case, stats, summary, len(truth.storable_ids))
        return stats, summary
    finally:
        simulator.stop()


def faults(stats: dict[str, Any], *kinds: str) -> int:
    return sum(count for kind, count in stats["faults"].items() if kind in kinds)


# ---------------------------------------------------------------------------------------
# One fault at a time (the first few are the fast subset of `make test`)


def test_5xx_bursts(pg_dsn: str, data_dir: Path) -> None:
    # The last 8 of every 24 requests meet an outage (503/502), on top of 30 % random 5xx.
    stats, _ = run_case(
        "5xx", pg_dsn, data_dir, {"p5xx": 0.3, "burst_every": 24, "burst_length": 8},
        {"INGEST_PARTITIONS": 2, "INGEST_PAGE_LIMIT": 250},
    )
    assert faults(stats, "burst") >= 8
    assert faults(stats, "http_500", "http_502", "http_503", "http_504") >= 20


@pytest.mark.parametrize("source", ["events", pytest.param("feed", marks=pytest.mark.slow)])
def test_429_storm_with_retry_after_zero(pg_dsn: str, data_dir: Path, source: str) -> None:
    # Half the page requests are refused with `Retry-After: 0`, whatever the budget.
    stats, summary = run_case(
        f"429-zero-{source}", pg_dsn, data_dir, {"p429": 0.5, "retry_after_form": "zero"},
        {"INGEST_SOURCE": source},
    )
    assert faults(stats, "http_429") >= 10 and summary["http_429"] >= 10


def test_429_with_a_huge_retry_after_does_not_hang(pg_dsn: str, data_dir: Path) -> None:
    # Retry-After of ~10^4 s (10^6 model seconds at scale 100): far past any rate window.
    # The client caps the wait at its window instead of sleeping for hours: the window it
    # learns (the stream token comes before any page, and the shared limiters hand what the
    # plan's probe learnt to every walker, on every lane), not the real service's 60 s.
    stats, _ = run_case(
        "429-huge", pg_dsn, data_dir, {"events": 5000, "p429": 0.4, "retry_after": 1e6, "rate_limits": True},
        {"INGEST_PAGE_LIMIT": 500}, timeout=240,
    )
    assert faults(stats, "http_429") >= 2


@pytest.mark.slow
def test_429_with_retry_after_as_http_date(pg_dsn: str, data_dir: Path) -> None:
    stats, _ = run_case(
        "429-http-date", pg_dsn, data_dir, {"p429": 0.2, "retry_after_form": "http_date"},
        {"INGEST_PAGE_LIMIT": 2000, "INGEST_SOURCE": "events"},
    )
    assert faults(stats, "http_429") >= 1


def test_truncated_and_empty_bodies(pg_dsn: str, data_dir: Path) -> None:
    stats, summary = run_case(
        "truncated", pg_dsn, data_dir, {"p_truncate": 0.3, "p_empty200": 0.1, "truncate_min_bytes": 1024}, {}
    )
    assert faults(stats, "truncate") >= 3 and faults(stats, "empty200") >= 1
    assert summary["retries"] >= 4


@pytest.mark.slow
def test_connection_resets(pg_dsn: str, data_dir: Path) -> None:
    stats, _ = run_case("reset", pg_dsn, data_dir, {"p_reset": 0.3}, {"INGEST_PAGE_LIMIT": 500})
    assert faults(stats, "reset") >= 3


@pytest.mark.slow
def test_duplicates_across_pages(pg_dsn: str, data_dir: Path) -> None:
    stats, _ = run_case("duplicates", pg_dsn, data_dir, {"p_duplicate": 0.6}, {"INGEST_PAGE_LIMIT": 500})
    assert faults(stats, "duplicate") >= 5


def test_token_expiry(pg_dsn: str, data_dir: Path) -> None:
    # A stream token lives 0.15 s: the feed needs dozens of them for one run.
    stats, summary = run_case(
        "token-expiry", pg_dsn, data_dir, {"token_ttl": 15.0}, {"INGEST_SOURCE": "feed", "INGEST_PAGE_LIMIT": 200}
    )
    assert stats["tokens_issued"] >= 5 and summary["token_refreshes"] >= 5


@pytest.mark.slow
def test_cursor_expiry(pg_dsn: str, data_dir: Path) -> None:
    # A cursor lives 50 ms and a fifth of the pages take 0.1-0.3 s to arrive: most cursors
    # are dead on arrival and must be revived at the same position.
    stats, summary = run_case(
        "cursor-expiry", pg_dsn, data_dir, {"cursor_ttl": 5.0, "p_slow": 0.2, "slow_delay": 20.0},
        {"INGEST_PAGE_LIMIT": 500},
    )
    assert faults(stats, "slow") >= 3 and summary["cursor_refreshes"] >= 3


def test_api_that_stalls_past_the_read_timeout(pg_dsn: str, data_dir: Path) -> None:
    # A fifth of the responses stall 1.5-4.5 s; the client gives up on each after 0.5 s.
    stats, summary = run_case(
        "stall", pg_dsn, data_dir, {"p_slow": 0.2, "slow_delay": 300.0},
        {"INGEST_REQUEST_TIMEOUT": 0.5, "INGEST_PAGE_LIMIT": 1000},
    )
    assert faults(stats, "slow") >= 2 and summary["retries"] >= 2


# ---------------------------------------------------------------------------------------
# Genuine rate limits with hostile Retry-After values, and everything at once (slow)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["zero", "http_date", "seconds"])
def test_real_rate_limits_hammered_with_every_retry_after_form(pg_dsn: str, data_dir: Path, form: str) -> None:
    # The client is told the budget is 300x what the server allows: every window ends in a
    # 429 storm, and the feed's 429s carry a Retry-After in the given form.
    stats, _ = run_case(
        f"rate-limit-{form}", pg_dsn, data_dir,
        {"rate_limits": True, "events_limit": 3, "feed_limit": 6, "feed_retry_after": True,
         "retry_after_form": form, "events": 15_000},
        {"INGEST_FEED_RATE": 1800, "INGEST_EVENTS_RATE": 900},
        timeout=400,
    )
    assert stats["rate_limited"] >= 1


@pytest.mark.slow
def test_every_fault_at_once(pg_dsn: str, data_dir: Path) -> None:
    stats, summary = run_case(
        "all", pg_dsn, data_dir,
        {
            "events": 30_000, "p5xx": 0.15, "burst_every": 60, "burst_length": 8, "p429": 0.15,
            "retry_after_form": "zero", "p_truncate": 0.1, "p_empty200": 0.05, "truncate_min_bytes": 1024,
            "p_reset": 0.1, "p_duplicate": 0.3, "p_slow": 0.05, "slow_delay": 200.0, "token_ttl": 30.0,
            "cursor_ttl": 10.0, "p_missing_fields": 0.2, "p_malformed_timestamp": 0.01, "p_unstorable": 0.002,
        },
        {"INGEST_REQUEST_TIMEOUT": 0.8, "INGEST_PARTITIONS": 3, "INGEST_PAGE_LIMIT": 500, "INGEST_WORKERS": 3},
        timeout=500,
    )
    for kind in ("burst", "http_429", "truncate", "reset", "duplicate", "slow", "missing_fields"):
        assert faults(stats, kind) >= 1, kind
    assert stats["tokens_issued"] >= 3 and summary["cursor_refreshes"] >= 1


@pytest.mark.slow
def test_heavy_chaos_with_rate_limits_and_latency(pg_dsn: str, data_dir: Path) -> None:
    stats, _ = run_case(
        "heavy-realistic", pg_dsn, data_dir,
        {"events": 30_000, "chaos": "heavy", "chaos_seed": 21, "rate_limits": True, "latency": "realistic",
         "time_scale": 200.0, "feed_retry_after": True, "retry_after_form": "http_date"},
        {"INGEST_PAGE_LIMIT": 1000},
        timeout=500,
    )
    assert sum(stats["faults"].values()) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("feed_limit", [10, 2])
def test_hidden_feed_limit_below_the_clients_pace_with_retry_after_zero(
    pg_dsn: str, data_dir: Path, feed_limit: int
) -> None:
    # The feed allows fewer requests than the client's configured pace (38 per window), and
    # every 429 says `Retry-After: 0`: taken literally, the client would retry at once, into
    # the same full window, until it gives up.
    stats, _ = run_case(
        f"hidden-feed-limit-{feed_limit}", pg_dsn, data_dir,
        {"rate_limits": True, "feed_limit": feed_limit, "feed_retry_after": True, "retry_after_form": "zero"},
        {"INGEST_SOURCE": "feed", "INGEST_PAGE_LIMIT": 250},
        timeout=400,
    )
    assert stats["rate_limited"] >= 5


def test_a_fresh_token_that_expires_in_flight_is_renewed_not_fatal() -> None:
    """Found by `test_every_fault_at_once`: a renewed token (on probation) sent with a request
    that stalled past the token's lifetime came back 403, and the run died with "a fresh
    stream token was refused too". Only a token refused while still valid proves that."""
    now = [1_800_000_000.0]
    config = Config(api_url="http://api.test/api/v1", api_key="ds_" + "d" * 32, request_timeout=5, max_attempts=4)
    client = ApiClient(config, None, clock=lambda: now[0], sleep_until_or_stop=lambda deadline: False)
    feed = "http://api.test/api/v1/events/d4ta/x7k9/feed"
    page = {"data": [{"id": "e1", "timestamp": 1769541612369}],
            "pagination": {"hasMore": True, "cursorExpiresIn": 116,
                           "nextCursor": encode_cursor("e1", 1769541612369, int(now[0] * 1000) + 120_000)}}

    def stalled(_request: object) -> tuple[int, dict[str, str], str]:
        now[0] += 2.0  # the answer comes after the 1 s token has expired
        return 403, {}, json.dumps({"code": "INVALID_STREAM_TOKEN", "message": "expired"})

    with responses.RequestsMock() as mocked:
        for n in range(3):
            mocked.post("http://api.test/internal/dashboard/stream-access",
                        json={"streamAccess": {"token": f"{n}" * 64, "expiresIn": 1}})
        mocked.get(feed, status=403, json={"code": "INVALID_STREAM_TOKEN", "message": "expired"})
        mocked.add_callback("GET", feed, callback=stalled)
        mocked.get(feed, json=page)
        result = client.fetch_page("feed", None)
    assert [e["id"] for e in result.events] == ["e1"]
    assert client.stats["token_refreshes"] == 3


def test_a_body_cut_mid_stream_is_a_transient_fault_of_the_page(sim_factory: Any) -> None:
    """The body is read in one go (`api.read_body`): a connection reset after the headers
    must still surface as the transport fault it is (retried, then an ApiError), never as
    an urllib3 exception out of the client."""
    from ingest.source.api import ApiError

    sim = sim_factory(events=20_000, p_reset=1.0)
    client = ApiClient(Config(api_url=sim.base_url, api_key=sim.api_key, max_attempts=3, request_timeout=10))
    with pytest.raises(ApiError):
        client.fetch_page("events", None, limit=5000)
    assert sim.stats()["faults"].get("reset", 0) >= 3 and client.stats["requests"] >= 3
