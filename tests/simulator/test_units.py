"""Table-driven tests of the simulator's pure decisions (no HTTP)."""

from __future__ import annotations

import base64
import json
import random
from email.message import Message

import pytest

from ingest.simulator.chaos import ChaosLayer, malformed_timestamp, response_fault
from ingest.simulator.cli import build_simulator_config
from ingest.simulator.config import CHAOS_PRESETS, SimulatorConfig, scaled_type_counts
from ingest.simulator.cursor import CursorError, decode_cursor, encode_cursor
from ingest.simulator.dataset import Dataset, iso_ms, session_sizes
from ingest.simulator.limits import (
    FixedWindow,
    LatencyModel,
    ResponseCache,
    SlidingWindow,
    format_duration,
)
from ingest.simulator.server import has_dashboard_signal, parse_limit
from tests.simulator.helpers import parse_ts

NOW = 1_770_000_000_000
ID = "9b1f3c2e-5d4a-4e6b-8c7d-2a1b0c9d8e7f"


def b64(payload: object, urlsafe: bool = False) -> str:
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=") if urlsafe else base64.b64encode(raw).decode()


def test_cursor_encoding_is_compact_standard_base64_in_key_order() -> None:
    text = encode_cursor(ID, 1769541553629, 1771528820000)
    assert base64.b64decode(text) == (
        b'{"id":"9b1f3c2e-5d4a-4e6b-8c7d-2a1b0c9d8e7f","ts":1769541553629,"v":2,"exp":1771528820000}'
    )


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not base64 at all!", "CURSOR_INVALID_FORMAT"),
        (base64.b64encode(b"{not json").decode(), "CURSOR_INVALID_FORMAT"),
        (b64({"id": ID, "ts": 1, "v": 2}), "CURSOR_INVALID_FORMAT"),
        (b64({"ts": 1, "v": 2, "exp": NOW + 1}), "CURSOR_INVALID_FORMAT"),
        (b64({"id": ID, "ts": "x", "v": 2, "exp": NOW + 1}), "CURSOR_INVALID_FORMAT"),
        (b64([1, 2]), "CURSOR_INVALID_FORMAT"),
        (b64({"id": ID, "ts": 1, "v": 2, "exp": NOW - 1}), "CURSOR_EXPIRED"),
        (b64({"id": ID, "ts": 1, "v": 2, "exp": NOW - 150_000}), "CURSOR_EXPIRED"),
    ],
)
def test_cursor_errors(text: str, code: str) -> None:
    with pytest.raises(CursorError) as caught:
        decode_cursor(text, NOW)
    assert caught.value.code == code


def test_expired_message_counts_minutes() -> None:
    with pytest.raises(CursorError, match=r"Cursor expired 3 minutes ago"):
        decode_cursor(b64({"id": ID, "ts": 1, "v": 2, "exp": NOW - 150_000}), NOW)


@pytest.mark.parametrize("urlsafe", [False, True])
def test_both_alphabets_decode(urlsafe: bool) -> None:
    # An id chosen so the standard encoding contains '+' or '/' characters.
    payload = {"id": "x??>>>", "ts": 5, "v": 2, "exp": NOW + 1000}
    text = b64(payload, urlsafe)
    assert any(c in text for c in ("-_" if urlsafe else "+/")) and "=" not in text
    cursor = decode_cursor(text, NOW)
    assert (cursor.id, cursor.ts, cursor.exp) == (payload["id"], 5, NOW + 1000)


@pytest.mark.parametrize(
    ("seconds", "scale", "rounding", "expected"),
    [(57.2, 1, "ceil", "58"), (60.0, 1, "ceil", "60"), (116.9, 1, "floor", "116"), (0.85, 100, "ceil", "0.85"),
     (0.0001, 100, "ceil", "0.001"), (1.2345, 10, "floor", "1.234"), (-3, 1, "ceil", "0")],
)
def test_format_duration(seconds: float, scale: float, rounding: str, expected: str) -> None:
    assert format_duration(seconds, scale, rounding) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [(None, 100), ("50", 50), ("5000", 5000), ("6000", 5000), ("0", 100), ("x", 100)]
)
def test_limit_default_and_silent_cap(text: str | None, expected: int) -> None:
    assert parse_limit(text, 100, 5000) == expected


KEY = "ds_" + "a" * 32


@pytest.mark.parametrize(
    ("headers", "signal"),
    [
        ({}, False),
        ({"User-Agent": "python-requests/2.31"}, False),
        ({"User-Agent": "Mozilla/5.0 (iPhone)"}, True),
        ({"Origin": "http://sim.test"}, True),
        ({"Origin": "http://elsewhere.test"}, False),
        ({"Referer": "http://sim.test/"}, True),
        ({"Cookie": f"theme=dark; dashboard_api_key={KEY}"}, True),
        ({"Cookie": "dashboard_api_key=ds_other"}, False),
        ({"Sec-Fetch-Site": "same-origin"}, True),
        ({"X-Requested-With": "XMLHttpRequest"}, True),
        ({"X-Dashboard-Session": "true"}, True),
    ],
)
def test_dashboard_signal_rule(headers: dict[str, str], signal: bool) -> None:
    message = Message()
    for name, value in headers.items():
        message[name] = value
    assert has_dashboard_signal(message, "sim.test", KEY) is signal


def test_fixed_window_opens_at_first_request_and_rejections_do_not_count() -> None:
    window = FixedWindow(3, 60.0)
    assert window.peek("k", 100.0).remaining == 3
    states = [window.hit("k", 100.0 + i) for i in range(4)]
    assert [s.allowed for s in states] == [True, True, True, False]
    assert [s.remaining for s in states] == [2, 1, 0, 0]
    assert [round(s.reset) for s in states] == [60, 59, 58, 57]
    assert window.hit("other", 103.0).remaining == 2  # per key
    assert window.hit("k", 160.0).allowed  # the window closed


def test_sliding_window_frees_slots_as_they_age() -> None:
    window = SlidingWindow(2, 10.0)
    assert window.hit("k", 0.0).allowed and window.hit("k", 4.0).allowed
    rejected = window.hit("k", 9.0)
    assert not rejected.allowed and rejected.reset == pytest.approx(1.0)
    assert window.hit("k", 10.5).allowed  # the first hit aged out; fixed windows would differ
    assert not window.hit("k", 11.0).allowed


def test_cache_expires_after_ttl() -> None:
    cache: ResponseCache[str] = ResponseCache(30.0)
    cache.put("a", "page", 0.0)
    assert cache.get("a", 29.9) == "page"
    assert cache.get("a", 30.0) is None
    assert cache.snapshot() == {"entries": 0, "hits": 1, "misses": 1}


def test_latency_per_page_and_shared_capacity() -> None:
    model = LatencyModel(0.1, 0.0008, 0.0, 5000.0, seed=1)
    assert model.delay(5000, 0.0) == pytest.approx(4.1)
    crowd = [model.delay(5000, 100.0) for _ in range(8)]
    assert crowd[0] == pytest.approx(4.1)
    assert crowd[-1] == pytest.approx(8.0)  # eight pages of 5,000 at 5,000 events/s


@pytest.mark.parametrize(
    ("u", "kind", "status"),
    [(0.0, "5xx", 500), (0.0051, "5xx", 502), (0.0101, "5xx", 503), (0.0199, "5xx", 504), (0.02, "truncate", None),
     (0.0301, "reset", None), (0.0351, "empty200", None), (0.5, "", None)],
)
def test_response_fault_table(u: float, kind: str, status: int | None) -> None:
    params = SimulatorConfig(chaos="mild", api_keys=(KEY,)).chaos_params()
    assert response_fault(u, params) == (kind, status)


def test_chaos_presets_and_overrides() -> None:
    base = {"api_keys": (KEY,)}
    assert all(v == 0 for k, v in CHAOS_PRESETS["none"].items() if k.startswith("p"))
    mild = SimulatorConfig(chaos="mild", **base).chaos_params()
    heavy = SimulatorConfig(chaos="heavy", **base).chaos_params()
    assert mild.p5xx == 0.02 and heavy.p5xx == pytest.approx(5 * mild.p5xx)
    assert heavy.p_unstorable > mild.p_unstorable > 0
    assert SimulatorConfig(chaos="none", p_reset=0.5, **base).chaos_params().p_reset == 0.5


def test_chaos_decisions_depend_only_on_seed_and_sequence() -> None:
    params = SimulatorConfig(chaos="heavy", api_keys=(KEY,)).chaos_params()

    def run(seed: int) -> list[tuple[int | None, str | None, int]]:
        layer = ChaosLayer(params, seed)
        return [(d.status, d.body_fault, d.duplicates) for d in (layer.decide(True, True) for _ in range(300))]

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("seed", range(20))
def test_malformed_timestamps_still_parse(seed: int) -> None:
    ts = 1769541612369
    value = malformed_timestamp(ts, random.Random(seed))
    assert value != ts and parse_ts(value) == ts


def test_type_counts_scale_exactly() -> None:
    assert sum(c for _, c in scaled_type_counts(3_000_000)) == 3_000_000
    assert dict(scaled_type_counts(3_000_000))["page_view"] == 1_050_459
    small = dict(scaled_type_counts(2000))
    assert sum(small.values()) == 2000 and small["page_view"] == 700


def test_session_sizes_sum_and_bounds() -> None:
    sizes = session_sizes(random.Random(1), 50_000, 1000, 35, 70)
    assert sum(sizes) == 50_000 and min(sizes) >= 35 and max(sizes) <= 70


def test_iso_formatting() -> None:
    assert iso_ms(1769541553629) == "2026-01-27T19:19:13.629Z"
    assert iso_ms(1766946793000) == "2025-12-28T18:33:13.000Z"


def test_dataset_is_deterministic_and_shaped() -> None:
    config = SimulatorConfig(events=5000, seed=9, chaos="none", api_keys=(KEY,))
    a, b = Dataset.build(config), Dataset.build(config)
    assert a.ids == b.ids and a.ts == b.ts
    assert a.ts[0] == config.time_end and a.ts[len(a) - 1] == config.time_start
    assert a.stats["sessions"] == 100 and a.stats["users"] == 5
    other = Dataset.build(SimulatorConfig(events=5000, seed=10, chaos="none", api_keys=(KEY,)))
    assert other.ids != a.ids


def test_config_layering() -> None:
    config = build_simulator_config(
        {"events": 10, "cursor_ttl": 30},
        {"DATASYNC_SIM_CURSOR_TTL": "40", "DATASYNC_SIM_FEED_LIMIT": "7", "DATASYNC_SIM_LATENCY": "none"},
        ["feed_limit=9", "rate_limits=off"],
        {"events": 20, "seed": None, "api_keys": (KEY,)},
    )
    assert (config.events, config.cursor_ttl, config.feed_limit, config.rate_limits, config.latency) == (
        20, 40, 9, False, "none")
    assert config.api_keys == (KEY,)
    with pytest.raises(ValueError, match="unknown"):
        build_simulator_config({}, {}, ["nonsense=1"], {})


def test_dataset_distributions_follow_section_6() -> None:
    config = SimulatorConfig(events=200_000, seed=4, chaos="none", api_keys=(KEY,))
    data = Dataset.build(config)
    ties = sum(1 for i in range(len(data) - 1) if data.ts[i] == data.ts[i + 1])
    # uniform ms timestamps: ties ~ events / span (1 in ~1,000 at 3,000,000 events, fewer here)
    expected = len(data) / (config.time_end - config.time_start)
    assert expected / 3 < ties / len(data) < expected * 3
    counts = [0] * len(data.type_names)
    for t in data.types:
        counts[t] += 1
    assert list(zip(data.type_names, counts, strict=True)) == scaled_type_counts(200_000)  # the exact multiset
    spans: dict[int, tuple[int, int]] = {}
    for i in range(len(data)):
        low, high = spans.get(data.sess[i], (data.ts[i], data.ts[i]))
        spans[data.sess[i]] = (min(low, data.ts[i]), max(high, data.ts[i]))
    assert len(spans) == 4000 and max(high - low for low, high in spans.values()) <= 3_600_000
    ids = [data.id_of(i) for i in range(len(data))]
    assert all((data.ts[i], ids[i]) > (data.ts[i + 1], ids[i + 1]) for i in range(len(data) - 1))
