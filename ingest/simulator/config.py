"""Every tunable of the simulator (datasync-api.md section 9) in one frozen dataclass.

Defaults are the realistic model: the real service's sizes, limits, latency and the "mild"
fault rates. Chaos probabilities default to `None`, meaning "take it from the `chaos`
preset"; an explicit value overrides the preset, so a test can switch on exactly one fault.
Durations are in model seconds and are divided by `time_scale` when applied; rates per model
second (`arrival_rate`) are multiplied by it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

LATENCY_MODES = ("realistic", "none")
CHAOS_MODES = ("none", "mild", "heavy")
OUT_OF_RANGE_MODES = ("empty", "teapot")
FEED_TIMESTAMP_MODES = ("mixed", "epochMs")
FEED_WINDOW_KINDS = ("sliding", "fixed")
RETRY_AFTER_FORMS = ("seconds", "zero", "http_date")
PROTOCOL_FAULTS = ("none", "no_cursor", "repeat_cursor", "empty_pages")  # see protocol.py

# The chaos knobs and their values per preset. "mild" is section 9; "heavy" is about 5x that,
# with a larger share of unstorable events and truncation of any body over 1 KB.
CHAOS_PRESETS: dict[str, dict[str, float]] = {
    "none": {
        "p5xx": 0.0, "p_truncate": 0.0, "p_empty200": 0.0, "p_reset": 0.0, "p_slow": 0.0,
        "p_missing_fields": 0.0, "missing_fields_share": 0.01, "p_malformed_timestamp": 0.0,
        "p_duplicate": 0.0, "p_unstorable": 0.0, "truncate_min_bytes": 1_000_000.0, "slow_delay": 5.0,
        "p429": 0.0,
    },
    "mild": {
        "p5xx": 0.02, "p_truncate": 0.01, "p_empty200": 0.005, "p_reset": 0.005, "p_slow": 0.01,
        "p_missing_fields": 0.02, "missing_fields_share": 0.01, "p_malformed_timestamp": 0.001,
        "p_duplicate": 0.01, "p_unstorable": 0.0002, "truncate_min_bytes": 1_000_000.0, "slow_delay": 5.0,
        "p429": 0.0,
    },
    "heavy": {
        "p5xx": 0.1, "p_truncate": 0.05, "p_empty200": 0.025, "p_reset": 0.025, "p_slow": 0.05,
        "p_missing_fields": 0.1, "missing_fields_share": 0.01, "p_malformed_timestamp": 0.005,
        "p_duplicate": 0.05, "p_unstorable": 0.002, "truncate_min_bytes": 1024.0, "slow_delay": 5.0,
        "p429": 0.0,
    },
}
# Probabilities scaled by `chaos_multiplier`; the other knobs are sizes and durations.
_PROBABILITIES = ("p5xx", "p_truncate", "p_empty200", "p_reset", "p_slow", "p_missing_fields",
                  "p_malformed_timestamp", "p_duplicate", "p_unstorable", "p429")

# The section 6 type multiset for 3,000,000 events; scaled down with `events`.
TYPE_COUNTS: tuple[tuple[str, int], ...] = (
    ("page_view", 1_050_459), ("click", 749_415), ("api_call", 300_487), ("form_submit", 299_557),
    ("scroll", 150_594), ("purchase", 150_087), ("error", 149_884), ("video_play", 149_517),
)


def demo_key() -> str:
    """A fresh key in the real format (`ds_` + 32 lowercase hex)."""
    return "ds_" + secrets.token_hex(16)


@dataclass(frozen=True)
class ChaosParams:
    """The resolved fault rates: preset, then explicit overrides, then the multiplier."""

    p5xx: float
    p_truncate: float
    p_empty200: float
    p_reset: float
    p_slow: float
    p_missing_fields: float
    missing_fields_share: float
    p_malformed_timestamp: float
    p_duplicate: float
    p_unstorable: float
    truncate_min_bytes: float
    slow_delay: float
    p429: float


@dataclass(frozen=True)
class SimulatorConfig:
    """All simulator tunables. Model durations in seconds; `time_scale` divides them."""

    # Dataset
    events: int = 3_000_000
    seed: int = 42
    users: int | None = None  # None: events / 1000 (3,000 at full size)
    sessions: int | None = None  # None: events / 50 (60,000 at full size)
    session_events_min: int = 35
    session_events_max: int = 70
    time_start: int = 1766946793000
    time_end: int = 1769541612369
    # New events per model second, appended at the newest end while serving (arrivals.py); 0: static
    arrival_rate: float = 0.0
    # Auth
    api_keys: tuple[str, ...] = field(default_factory=lambda: (demo_key(),))
    key_validity: float = 3 * 3600.0
    token_ttl: float = 300.0
    token_bound_to_key: bool = True
    require_dashboard_signal: bool = True
    # Clock
    time_scale: float = 1.0
    # Paging
    default_limit: int = 100
    max_limit: int = 5000
    cursor_ttl: float = 120.0
    accept_base64url: bool = True
    events_honour_since_until: bool = False
    out_of_range_mode: str = "empty"
    feed_timestamp_mode: str = "mixed"
    # Limits
    rate_limits: bool = True
    events_limit: int = 10
    query_auth: bool = True  # ?api_key= is accepted (off: such a request gets the missing-key 401)
    query_auth_limit: int = 5
    query_auth_separate_bucket: bool = True
    rate_window: float = 60.0
    feed_limit: int = 40
    feed_window: float = 60.0
    feed_window_kind: str = "sliding"
    feed_shares_events_budget: bool = False
    feed_retry_after: bool = False
    feed_count_rejected: bool = False
    stream_access_limit: int = 10
    stream_access_window: float = 60.0
    # Cache
    cache_ttl: float = 30.0
    cache_shared_across_keys: bool = True
    cache_feed: bool = False
    # Latency
    latency: str = "realistic"
    base_latency: float = 0.100
    per_event_latency: float = 0.0008
    latency_jitter: float = 0.2
    server_capacity: float = 5000.0
    gzip: bool = True
    # Chaos: None takes the value from the `chaos` preset
    chaos: str = "mild"
    chaos_seed: int = 7
    chaos_multiplier: float = 1.0
    p5xx: float | None = None
    p_truncate: float | None = None
    p_empty200: float | None = None
    p_reset: float | None = None
    p_slow: float | None = None
    p_missing_fields: float | None = None
    missing_fields_share: float | None = None
    p_malformed_timestamp: float | None = None
    p_duplicate: float | None = None
    p_unstorable: float | None = None
    truncate_min_bytes: float | None = None
    slow_delay: float | None = None
    p429: float | None = None  # a 429 regardless of the budget (a storm), per page request
    retry_after: float = 1.0  # model seconds a chaos 429 asks to wait
    retry_after_form: str = "seconds"  # every 429's Retry-After: seconds, zero ("0"), http_date
    burst_every: int = 0  # outage bursts: the last `burst_length` of every `burst_every`
    burst_length: int = 0  # requests get a 503/502; 0: off
    garbage_cursor_502: bool = False
    # Paging that breaks in well-formed 200s (protocol.py): `hasMore` without `nextCursor`, a
    # `nextCursor` back to the page just served, or empty pages that claim more. Served now and
    # then (`protocol_fault_rate`: the share of page positions whose first
    # `protocol_fault_repeats` requests get it) and/or for good from position
    # `protocol_fault_from` of the order on, past which the server then never gets
    protocol_fault: str = "none"
    protocol_fault_rate: float = 0.0
    protocol_fault_repeats: int = 1
    protocol_fault_from: int | None = None
    # Dataset: this many events are replaced by hand-written hostile ones (hostile.py); arrivals
    # get them at the same share
    hostile_events: int = 0

    def __post_init__(self) -> None:
        checks = {
            "latency": (self.latency, LATENCY_MODES),
            "chaos": (self.chaos, CHAOS_MODES),
            "out_of_range_mode": (self.out_of_range_mode, OUT_OF_RANGE_MODES),
            "feed_timestamp_mode": (self.feed_timestamp_mode, FEED_TIMESTAMP_MODES),
            "feed_window_kind": (self.feed_window_kind, FEED_WINDOW_KINDS),
            "retry_after_form": (self.retry_after_form, RETRY_AFTER_FORMS),
            "protocol_fault": (self.protocol_fault, PROTOCOL_FAULTS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.events < 1:
            raise ValueError("events must be at least 1")
        if not self.time_scale >= 1.0:
            raise ValueError("time_scale must be at least 1")
        if not self.api_keys:
            raise ValueError("at least one API key is needed")
        if self.time_end <= self.time_start:
            raise ValueError("time_end must be after time_start")
        if not 0 <= self.arrival_rate < float("inf"):
            raise ValueError("arrival_rate must be a finite number of events per second, 0 or more")
        if not 0 <= self.protocol_fault_rate <= 1:
            raise ValueError("protocol_fault_rate must be between 0 and 1")
        if self.protocol_fault_repeats < 1:
            raise ValueError("protocol_fault_repeats must be at least 1")
        if self.protocol_fault_from is not None and self.protocol_fault_from < 0:
            raise ValueError("protocol_fault_from must be a position in the order: 0 or more")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(1, round(self.events / 1000))

    @property
    def n_sessions(self) -> int:
        return self.sessions if self.sessions is not None else max(1, round(self.events / 50))

    def scaled(self, seconds: float) -> float:
        """A model duration as wall seconds."""
        return seconds / self.time_scale

    def chaos_params(self) -> ChaosParams:
        preset = CHAOS_PRESETS[self.chaos]
        values: dict[str, float] = {}
        for name, default in preset.items():
            explicit = getattr(self, name)
            value = float(explicit) if explicit is not None else default
            if name in _PROBABILITIES:
                value = min(1.0, value * self.chaos_multiplier)
            values[name] = value
        return ChaosParams(**values)

    def effective(self) -> dict[str, Any]:
        """Every tunable with its applied value (chaos resolved, keys masked): echoed at start."""
        out = asdict(self)
        out["api_keys"] = [key[:6] + "…" for key in self.api_keys]
        out.update(asdict(self.chaos_params()))
        out["users"], out["sessions"] = self.n_users, self.n_sessions
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: SimulatorConfig | None = None) -> SimulatorConfig:
        """Build from a JSON-like mapping (config file, `--set`); unknown names are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown simulator setting(s): {', '.join(unknown)}")
        changes = dict(values)
        if "api_keys" in changes:
            changes["api_keys"] = tuple(changes["api_keys"])
        return replace(base, **changes) if base is not None else cls(**changes)


def parse_setting(config: SimulatorConfig, name: str, text: str) -> Any:
    """Turn `--set name=text` into a value of the field's type (JSON for non-strings)."""
    if name not in {f.name for f in fields(SimulatorConfig)}:
        raise ValueError(f"unknown simulator setting: {name}")
    if isinstance(getattr(config, name), str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        if text.lower() in ("on", "off", "yes", "no"):
            return text.lower() in ("on", "yes")
        raise ValueError(f"{name}: cannot parse {text!r}") from None


def scaled_type_counts(events: int) -> list[tuple[str, int]]:
    """The section 6 type counts scaled to `events` by largest remainder (sum is exact)."""
    total = sum(count for _, count in TYPE_COUNTS)
    raw = [(name, count * events / total) for name, count in TYPE_COUNTS]
    counts = {name: int(value) for name, value in raw}
    short = events - sum(counts.values())
    by_remainder = sorted(raw, key=lambda item: item[1] - int(item[1]), reverse=True)
    for name, _ in by_remainder[:short]:
        counts[name] += 1
    return [(name, counts[name]) for name, _ in TYPE_COUNTS]
