"""The seeded, static event dataset, held as compact arrays and rendered on demand.

Why arrays: 3,000,000 events as Python dicts would take gigabytes. Here an event is one slot
in a few flat arrays (timestamp, 16 id bytes, 6 name characters, session index, type index),
about 35 bytes, and its JSON is produced only when a page is served. Sessions (60,000 at full
size) are few enough to keep their JSON fragments pre-formatted.

Order is (timestamp DESC, id DESC), ids compared as lowercase strings; page lookups are binary
searches on the timestamp array. "Unstorable" events (section 9 chaos) are part of the data:
the same events are damaged on every fetch, so a correct client ends with exactly
`storable_ids()`. The same layout, append-only, holds the live arrivals (arrivals.py).
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ingest.simulator.config import SimulatorConfig, scaled_type_counts
from ingest.simulator.hostile import HOSTILE_KINDS, hostile_json
from ingest.simulator.hostile import storable as hostile_storable

DEVICE_TYPES = ("mobile", "tablet", "desktop")
BROWSERS = ("Chrome", "Safari", "Firefox", "Edge")
UNSTORABLE_KINDS = ("no_id", "nul", "bad_timestamp", "not_object")
SESSION_MIN_DURATION_MS = 5 * 60_000
SESSION_MAX_DURATION_MS = 60 * 60_000

_NAME_ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
_NAME_TABLE = bytes(_NAME_ALPHABET[b % 36] for b in range(256))
_V4_TABLE = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_TABLE = bytes((b & 0x3F) | 0x80 for b in range(256))
_EVENT = (
    '{"id":"%s-%s-%s-%s-%s",%s"type":"%s","name":"event_%s","properties":{"page":"/home"},'
    '"timestamp":%s%s'
)


def uuid4_bytes(rng: random.Random, count: int) -> bytearray:
    """`count` random UUID v4 values, 16 bytes each, version and variant bits set in bulk."""
    raw = bytearray()
    for done in range(0, count, 65536):  # in chunks: no second full-size copy at the peak
        raw += rng.randbytes(16 * min(65536, count - done))
    raw[6::16] = raw[6::16].translate(_V4_TABLE)
    raw[8::16] = raw[8::16].translate(_VARIANT_TABLE)
    return raw


def random_names(rng: random.Random, count: int) -> str:
    """`count` event name suffixes (6 characters of [a-z0-9] each), concatenated."""
    return rng.randbytes(6 * count).translate(_NAME_TABLE).decode("ascii")


def shuffled_types(rng: random.Random, count: int) -> bytearray:
    """Type indices for `count` events: the section 6 multiset scaled to `count`, shuffled."""
    counts = scaled_type_counts(count)
    types = bytearray(b"".join(bytes([t]) * n for t, (_, n) in enumerate(counts)))
    rng.shuffle(types)
    return types


def session_fragments(session_id: str, user_id: str, device: str, browser: str) -> tuple[str, str]:
    """The pre-formatted JSON around an event's own fields: its session's part of every event."""
    return (f'"sessionId":"{session_id}","userId":"{user_id}",',
            f',"session":{{"id":"{session_id}","deviceType":"{device}","browser":"{browser}"}}}}')


def format_uuid(raw: bytes | bytearray) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ISO formatting is the hot spot of rendering: a minute prefix (memoised, at most ~43,000 for
# the 30-day span, plus one per model minute of live arrivals) plus one of 60,000 precomputed
# "SS.mmmZ" suffixes.
_MINUTE_SUFFIX = tuple(f"{second:02d}.{ms:03d}Z" for second in range(60) for ms in range(1000))
_minute_prefix: dict[int, str] = {}


def iso_ms(ts: int) -> str:
    """Epoch ms as `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    minute, rest = divmod(ts, 60_000)
    prefix = _minute_prefix.get(minute)
    if prefix is None:
        prefix = _minute_prefix[minute] = time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minute * 60))
    return prefix + _MINUTE_SUFFIX[rest]


def session_sizes(rng: random.Random, events: int, sessions: int, low: int, high: int) -> list[int]:
    """Events per session, each in [low, high] where possible, summing exactly to `events`."""
    low = min(low, events // sessions)
    high = max(high, -(-events // sessions))
    sizes = [rng.randint(low, high) for _ in range(sessions)]
    diff = events - sum(sizes)
    while diff:
        i = rng.randrange(sessions)
        if diff > 0 and sizes[i] < high:
            sizes[i] += 1
            diff -= 1
        elif diff < 0 and sizes[i] > low:
            sizes[i] -= 1
            diff += 1
    return sizes


@dataclass(frozen=True)
class Truth:
    """What a correct client ends with: every storable id, and how many events cannot be stored.

    With live arrivals it is a snapshot: `arrived` of the `total` events are arrivals, and
    `clock` is the model time (epoch ms on the dataset's axis) it was taken at: every event
    with a timestamp below it is in the snapshot, every later arrival has one at or above it.
    """

    storable_ids: frozenset[str]
    unstorable: int
    total: int
    arrived: int = 0
    clock: int | None = None  # None: a static dataset


class Dataset:
    """The events of one seed, in serving order. Build with `Dataset.build(config)`."""

    def __init__(
        self,
        ts: array,
        ids: bytearray,
        names: str,
        sess: array,
        types: bytes | bytearray,
        type_names: Sequence[str],
        session_prefix: list[str],
        session_suffix: list[str],
        session_index: dict[str, int],
        unstorable: dict[int, str],
        stats: dict[str, Any],
        hostile: dict[int, str] | None = None,
        user_ids: bytes | bytearray = b"",
    ) -> None:
        self.ts = ts
        self.ids = ids
        self.names = names
        self.sess = sess
        self.types = types
        self.type_names = tuple(type_names)
        self.session_prefix = session_prefix
        self.session_suffix = session_suffix
        self.session_index = session_index
        self.unstorable = unstorable
        self.hostile = hostile or {}  # storable hostile events (unstorable ones are in `unstorable`)
        self.stats = stats
        self.user_ids = user_ids  # 16 bytes per user: arrivals' sessions belong to the same users
        self._views: dict[tuple[str, str], Sequence[int]] = {}
        self.everything = range(len(ts))  # the unfiltered view

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def build(cls, config: SimulatorConfig) -> Dataset:
        rng = random.Random(config.seed)
        n, n_sessions = config.events, min(config.n_sessions, config.events)
        sizes = session_sizes(rng, n, n_sessions, config.session_events_min, config.session_events_max)
        span = config.time_end - config.time_start
        # Sort key: timestamp offset in the high bits, session index in the low bits. The
        # arrays are filled from iterators: an intermediate list would double the peak memory.
        bits = max(1, n_sessions.bit_length())
        keys: list[int] = []
        append, rnd = keys.append, rng.random
        for s, size in enumerate(sizes):
            duration = min(span, rng.randint(SESSION_MIN_DURATION_MS, SESSION_MAX_DURATION_MS))
            start = rng.randrange(span - duration + 1)
            width = duration + 1
            for _ in range(size):
                append(((start + int(rnd() * width)) << bits) | s)
        keys.sort(reverse=True)
        base, mask = config.time_start, (1 << bits) - 1
        ts = array("q", (base + (k >> bits) for k in keys))
        sess = array("i", (k & mask for k in keys))
        del keys
        ts[0] = config.time_end
        if n > 1:
            ts[n - 1] = config.time_start
        ids = uuid4_bytes(rng, n)
        _sort_ties(ts, ids)
        type_counts = scaled_type_counts(n)
        types = shuffled_types(rng, n)
        names = random_names(rng, n)
        session_ids = uuid4_bytes(rng, n_sessions)
        user_ids = uuid4_bytes(rng, config.n_users)
        prefix, suffix, index = [], [], {}
        device_counts = dict.fromkeys(DEVICE_TYPES, 0)
        for s in range(n_sessions):
            sid = format_uuid(session_ids[16 * s : 16 * s + 16])
            u = rng.randrange(config.n_users)
            uid = format_uuid(user_ids[16 * u : 16 * u + 16])
            device, browser = rng.choice(DEVICE_TYPES), rng.choice(BROWSERS)
            device_counts[device] += sizes[s]
            head, tail = session_fragments(sid, uid, device, browser)
            prefix.append(head)
            suffix.append(tail)
            index[sid] = s
        unstorable = pick_unstorable(config, n)
        hostile: dict[int, str] = {}
        for i, kind in pick_hostile(config, n, unstorable).items():
            (hostile if hostile_storable(kind) else unstorable)[i] = kind
        stats = {
            "events": n,
            "sessions": n_sessions,
            "users": config.n_users,
            "eventTypes": [{"type": name, "count": count} for name, count in type_counts],
            "deviceTypes": [{"deviceType": d, "count": c} for d, c in device_counts.items()],
        }
        return cls(ts, ids, names, sess, bytes(types), [t for t, _ in type_counts], prefix, suffix,
                   index, unstorable, stats, hostile, user_ids)

    # -- lookups -------------------------------------------------------------------------

    def id_of(self, i: int) -> str:
        return format_uuid(self.ids[16 * i : 16 * i + 16])

    @property
    def oldest_ts(self) -> int:
        return self.ts[len(self.ts) - 1]

    def find_id(self, event_id: str) -> int | None:
        """Index of an id, by scanning the id bytes (a rare discovery route; no 100 MB map)."""
        try:
            raw = bytes.fromhex(event_id.replace("-", ""))
        except ValueError:
            return None
        if len(raw) != 16:
            return None
        at = self.ids.find(raw)
        while at >= 0:
            if at % 16 == 0:
                return at // 16
            at = self.ids.find(raw, at + 1)
        return None

    def view(self, session_id: str | None, type_name: str | None) -> Sequence[int]:
        """The indices matching the filters, in serving order; memoised per filter."""
        if not session_id and not type_name:
            return self.everything
        key = (session_id or "", type_name or "")
        found = self._views.get(key)
        if found is None:
            s = self.session_index.get(session_id, -1) if session_id else None
            t = self.type_names.index(type_name) if type_name in self.type_names else -1
            sess, types = self.sess, self.types
            unknown = s == -1 or (type_name is not None and t == -1)  # no match: no scan of the data
            found = array("i", [] if unknown else [
                i for i in range(len(self))
                if (s is None or sess[i] == s) and (type_name is None or types[i] == t)
            ])
            if len(self._views) > 64:
                self._views.clear()
            self._views[key] = found
        return found

    def position_after(self, view: Sequence[int], ts: int, event_id: str) -> int:
        return position_after(self.ts, self.id_of, view, ts, event_id)

    def position_before_ts(self, view: Sequence[int], ts: int) -> int:
        return position_before_ts(self.ts, view, ts)

    def static_range(self, view: Sequence[int], start: int, end: int) -> tuple[int, int] | None:
        """Positions [start, end) of `view` as a range of the static order, if they are one
        (only such pages are rendered ahead by the server)."""
        return (start, end) if view is self.everything else None

    # -- rendering -----------------------------------------------------------------------

    def event_dict(self, i: int, numeric_ts: bool) -> dict[str, Any]:
        """One event as a dict in the section 6 key order (the slow path, for damaged events)."""
        s = self.sess[i]
        event = orjson.loads("{" + self.session_prefix[s] + self.session_suffix[s][1:])
        ts = self.ts[i]
        return {
            "id": self.id_of(i),
            "sessionId": event["sessionId"],
            "userId": event["userId"],
            "type": self.type_names[self.types[i]],
            "name": "event_" + self.names[6 * i : 6 * i + 6],
            "properties": {"page": "/home"},
            "timestamp": ts if numeric_ts else iso_ms(ts),
            "session": event["session"],
        }

    def unstorable_json(self, i: int, numeric_ts: bool) -> str:
        """The static damaged form of an unstorable event."""
        kind = self.unstorable[i]
        if kind in HOSTILE_KINDS:
            return self.hostile_json(i)
        if kind == "not_object":  # distinct per event, like real corruption would be
            return orjson.dumps(["not an object", self.id_of(i)]).decode()
        event = self.event_dict(i, numeric_ts)
        if kind == "no_id":
            del event["id"]
        elif kind == "nul":
            event["name"] = event["name"][:6] + "\x00" + event["name"][6:]
        else:
            event["timestamp"] = "not-a-date"
        return orjson.dumps(event).decode()

    def hostile_json(self, i: int) -> str:
        """The hand-written text of a hostile event (its timestamp is always epoch ms)."""
        kind = self.hostile.get(i) or self.unstorable[i]
        return hostile_json(kind, self.event_dict(i, True))

    def render(self, indices: Iterable[int], mixed: bool, special: dict[int, str] | None = None,
               offset: int = 0) -> list[str]:
        """Event JSON texts for `indices`; position p gets epoch ms when p % 3 == 0 (if mixed).

        `special` maps positions to replacement texts (per-response chaos damage). Positions
        start at `offset`: a page can be rendered in parts (arrivals, then the static events).
        """
        ids, names, times, sess, types = self.ids, self.names, self.ts, self.sess, self.types
        type_names, prefix, suffix = self.type_names, self.session_prefix, self.session_suffix
        unstorable, hostile = self.unstorable, self.hostile
        out: list[str] = []
        minute_prefix, minute_suffix = _minute_prefix, _MINUTE_SUFFIX
        for p, i in enumerate(indices, offset):
            numeric = not mixed or p % 3 == 0
            if special and p in special:
                out.append(special[p])
                continue
            if unstorable and i in unstorable:
                out.append(self.unstorable_json(i, numeric))
                continue
            if hostile and i in hostile:
                out.append(self.hostile_json(i))
                continue
            h = ids[16 * i : 16 * i + 16].hex()
            t = times[i]
            if numeric:
                stamp = str(t)
            else:
                minute, rest = divmod(t, 60_000)
                stamp = '"' + (minute_prefix.get(minute) or iso_ms(t)[:17]) + minute_suffix[rest] + '"'
            s = sess[i]
            out.append(_EVENT % (
                h[:8], h[8:12], h[12:16], h[16:20], h[20:], prefix[s], type_names[types[i]],
                names[6 * i : 6 * i + 6], stamp, suffix[s],
            ))
        return out

    # -- truth ---------------------------------------------------------------------------

    def storable_id_iter(self) -> Iterator[str]:
        unstorable = self.unstorable
        for i in range(len(self)):
            if i not in unstorable:
                yield self.id_of(i)

    def truth(self) -> Truth:
        return Truth(frozenset(self.storable_id_iter()), len(self.unstorable), len(self))


class Timestamps(Protocol):
    """Timestamp by storage index: a Dataset's array, or one index space over two of them."""

    def __getitem__(self, i: int, /) -> int: ...


def position_after(times: Timestamps, id_of: Callable[[int], str], view: Sequence[int], ts: int,
                   event_id: str) -> int:
    """First position in `view` strictly after (ts, id) in (ts DESC, id DESC) order."""
    lo, hi = 0, len(view)
    while lo < hi:  # first position whose ts <= cursor ts
        mid = (lo + hi) // 2
        if times[view[mid]] > ts:
            lo = mid + 1
        else:
            hi = mid
    event_id = event_id.lower()
    while lo < len(view) and times[view[lo]] == ts and id_of(view[lo]) >= event_id:
        lo += 1
    return lo


def position_before_ts(times: Timestamps, view: Sequence[int], ts: int) -> int:
    """First position in `view` whose timestamp is < ts (the `until`/`since` bounds)."""
    lo, hi = 0, len(view)
    while lo < hi:
        mid = (lo + hi) // 2
        if times[view[mid]] >= ts:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _sort_ties(ts: array, ids: bytearray) -> None:
    """Within runs of equal timestamps, order the ids descending (the section 3.3 tie-break)."""
    n, i = len(ts), 0
    while i < n - 1:
        if ts[i] != ts[i + 1]:
            i += 1
            continue
        j = i + 1
        while j < n and ts[j] == ts[i]:
            j += 1
        chunk = sorted((bytes(ids[16 * k : 16 * k + 16]) for k in range(i, j)), reverse=True)
        ids[16 * i : 16 * j] = b"".join(chunk)
        i = j


def pick_hostile(config: SimulatorConfig, n: int, taken: dict[int, str]) -> dict[int, str]:
    """`config.hostile_events` events, spread over the data, each of one hostile kind in turn."""
    free = [i for i in range(n) if i not in taken]
    count = min(len(free), config.hostile_events)
    if count == 0:
        return {}
    rng = random.Random(f"hostile:{config.seed}")
    kinds = list(HOSTILE_KINDS)
    return {i: kinds[k % len(kinds)] for k, i in enumerate(sorted(rng.sample(free, count)))}


def pick_unstorable(config: SimulatorConfig, n: int) -> dict[int, str]:
    """The static set of events no client can store, and how each is broken.

    Seeded by both seeds so the same data and chaos settings always damage the same events.
    """
    share = config.chaos_params().p_unstorable
    count = min(n, round(n * share))
    if count == 0:
        return {}
    rng = random.Random(f"unstorable:{config.seed}:{config.chaos_seed}")
    return {i: UNSTORABLE_KINDS[k % len(UNSTORABLE_KINDS)] for k, i in enumerate(sorted(rng.sample(range(n), count)))}
