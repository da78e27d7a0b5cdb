"""Live arrivals: new events at the newest end of the data, `arrival_rate` per model second.

Why a second store: the static `Dataset` may be shared (the CLI builds it once and writes its
truth file from it), so arrivals never touch it. They live in a `Dataset` of their own, in
the same compact layout but append-only and in arrival order (oldest first), addressed by
storage indices from `len(static)` on. Every arrival is newer than every static event, so the
serving order is simply the arrivals newest first, then the static order.

What arrives is a pure function of the seed and the model clock, never of request timing:
one seeded stream of sessions and their events in time order, cut at the clock. An event is
released once its millisecond is over, all events of that millisecond at once and ties
sorted, so each arrival sorts strictly above everything that was servable before it: walks
already under way never meet new events, and cursors stay valid. The clock runs on the
dataset's own time axis: it starts at the newest static timestamp (`time_end`, not the wall
clock) when the simulator starts, and runs `time_scale` model ms per wall ms.

Concurrency: one lock serialises the advance; a request takes a `Snapshot` (a count) and then
reads without the lock, which is safe because no slot below a published count ever changes
(the arrays only grow).
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from ingest.simulator.config import SimulatorConfig
from ingest.simulator.dataset import (
    BROWSERS,
    DEVICE_TYPES,
    SESSION_MAX_DURATION_MS,
    SESSION_MIN_DURATION_MS,
    UNSTORABLE_KINDS,
    Dataset,
    Truth,
    format_uuid,
    position_after,
    position_before_ts,
    random_names,
    session_fragments,
    shuffled_types,
    uuid4_bytes,
)
from ingest.simulator.hostile import HOSTILE_KINDS
from ingest.simulator.hostile import storable as hostile_storable

CHUNK = 4096  # arrival slots whose ids, names, types and damage are drawn together


class ArrivalStream:
    """Sessions like the generator's (35-70 events spread over 5-60 min, users of the static
    pool, random device and browser), starting at random at the rate that makes
    `arrival_rate` events per model second.

    Sessions already running when the clock starts (begun up to an hour before it) contribute
    their remaining events, so the rate is right from the first millisecond. Only running
    sessions are held (about `arrival_rate` x 37), each as one heap entry keyed by its next
    event: the next of a session's remaining events is drawn when the previous one is taken,
    as the minimum of the remaining uniform draws.
    """

    def __init__(self, config: SimulatorConfig, sessions: Dataset, user_ids: bytes | bytearray) -> None:
        self.origin = config.time_end + 1  # the timestamp of model ms 0: just above the newest static event
        self.sessions = sessions  # arrival sessions are appended to its session tables
        self.devices = bytearray()  # device type index per arrival session (for /internal/stats)
        self._users = user_ids
        self._n_users = len(user_ids) // 16
        self._low = max(1, config.session_events_min)
        self._high = max(self._low, config.session_events_max)
        self._rate = (config.arrival_rate / 1000) / ((self._low + self._high) / 2)  # session starts per model ms
        self._rng = random.Random(f"arrivals:{config.seed}")
        self._heap: list[tuple[int, int, float, float, int]] = []  # (ts, session, position, end, events left)
        start = -float(SESSION_MAX_DURATION_MS)
        while True:
            start += self._rng.expovariate(self._rate)
            if start >= 0:
                break
            self._begin(start)
        self._next_start = start  # model ms (from the origin) at which the next session begins

    def until(self, limit: int) -> tuple[list[int], list[int]]:
        """Timestamps and session indices of the next events, up to (excluding) timestamp `limit`.

        The stream is one sequence of steps (begin a session, take an event) in time order;
        a call stops at the first step at or after `limit`, so where calls cut it never
        changes what it holds.
        """
        times: list[int] = []
        sessions: list[int] = []
        heap = self._heap
        while True:
            begins = self.origin + int(self._next_start)
            if begins < limit and (not heap or begins <= heap[0][0]):
                self._begin(self._next_start)
                self._next_start += self._rng.expovariate(self._rate)
                continue
            if not heap or heap[0][0] >= limit:
                return times, sessions
            ts, session, position, end, left = heapq.heappop(heap)
            times.append(ts)
            sessions.append(session)
            if left:
                self._push(session, position, end, left)

    def _begin(self, start: float) -> None:
        rng = self._rng
        size = rng.randint(self._low, self._high)
        duration = rng.randint(SESSION_MIN_DURATION_MS, SESSION_MAX_DURATION_MS)
        end = start + duration
        if end <= 0:
            return  # over before the clock started
        # Events are uniform over the session; of one begun earlier, those after the origin remain.
        left = size if start >= 0 else sum(rng.random() * duration > -start for _ in range(size))
        if not left:
            return
        session_id = format_uuid(uuid4_bytes(rng, 1))
        u = rng.randrange(self._n_users)
        device = rng.randrange(len(DEVICE_TYPES))
        head, tail = session_fragments(session_id, format_uuid(self._users[16 * u : 16 * u + 16]),
                                       DEVICE_TYPES[device], rng.choice(BROWSERS))
        tables = self.sessions
        session = len(tables.session_prefix)
        tables.session_prefix.append(head)
        tables.session_suffix.append(tail)
        tables.session_index[session_id] = session
        self.devices.append(device)
        self._push(session, max(start, 0.0), end, left)

    def _push(self, session: int, position: float, end: float, left: int) -> None:
        position += (end - position) * (1.0 - self._rng.random() ** (1.0 / left))
        heapq.heappush(self._heap, (self.origin + int(position), session, position, end, left - 1))


class LiveView(Sequence[int]):
    """A serving order over storage indices: the first `split` entries of `newer` (ascending,
    so served reversed, newest first), then `older`.

    Fixed at one snapshot, so the positions of a cached page keep meaning the same events
    however many arrived since.
    """

    __slots__ = ("newer", "older", "split")

    def __init__(self, newer: Sequence[int], split: int, older: Sequence[int]) -> None:
        self.newer, self.split, self.older = newer, split, older

    def __len__(self) -> int:
        return self.split + len(self.older)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        split = self.split
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("only contiguous slices")
            top = list(self.newer[split - min(stop, split) : split - start])[::-1] if start < split else []
            return top + list(self.older[max(start, split) - split : max(stop, split) - split])
        if index < 0:
            index += len(self)
        return self.newer[split - 1 - index] if 0 <= index < split else self.older[index - split]


class _Joined:
    """One storage index space over the static events and the arrivals (indices from `n` on)."""

    __slots__ = ("arrived", "n", "static")

    def __init__(self, static: Any, arrived: Any, n: int) -> None:
        self.static, self.arrived, self.n = static, arrived, n

    def __getitem__(self, i: int) -> Any:
        return self.static[i] if i < self.n else self.arrived[i - self.n]

    def __contains__(self, i: object) -> bool:
        if not isinstance(i, int):
            return False
        return i in self.static if i < self.n else (i - self.n) in self.arrived


class LiveData:
    """The static dataset plus the arrivals so far; hands out `Snapshot`s.

    `clock` is any monotonic clock in seconds (injectable, so tests can drive the arrivals
    with plain numbers).
    """

    def __init__(self, config: SimulatorConfig, static: Dataset, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.static, self.n = config, static, len(static)
        self.block = Dataset(array("q"), bytearray(), "", array("i"), bytearray(), static.type_names, [], [], {},
                             {}, {}, {})
        self.stream = ArrivalStream(config, self.block, static.user_ids)
        self.ts = _Joined(static.ts, self.block.ts, self.n)
        self.unstorable = _Joined(static.unstorable, self.block.unstorable, self.n)
        self._clock = clock
        self._lock = threading.Lock()
        self._scale = config.time_scale
        self._since = clock()  # the clock reading `_elapsed` counts from
        self._elapsed = 0.0  # model ms run at `_since` (frozen stretches do not count)
        self.frozen = False
        self.count = 0  # published arrivals
        self.watermark = self.stream.origin  # every arrival with a lower timestamp is published
        self._capacity = 0  # slots with ids, names, types and damage drawn
        self._p_unstorable = config.chaos_params().p_unstorable
        self._p_hostile = min(1.0, config.hostile_events / config.events)  # the static dataset's share
        self._unstorable_drawn = self._hostile_drawn = 0  # each cycles through its kinds
        self._type_counts = [0] * len(static.type_names)
        self._device_counts = [0] * len(DEVICE_TYPES)
        self._seen = bytearray()  # per arrival session: has a published event
        self._sessions = 0
        self._unstorable_published = 0
        # Of the published arrivals: sessions, unstorable events, events per type and per device
        # type. One tuple, replaced per batch, so a snapshot holds it without copying.
        self.counts: tuple[int, int, tuple[int, ...], tuple[int, ...]] = (0, 0, (), ())
        self._matches: dict[tuple[str, str], tuple[int, array]] = {}
        self._static_ids: frozenset[str] | None = None

    # -- the clock -----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything servable now: arrivals are generated up to the model clock first."""
        with self._lock:
            self._advance(self._clock())
            return Snapshot(self)

    def freeze(self) -> Snapshot:
        """Stop the model clock (after arriving up to now): nothing arrives until `resume`."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            if not self.frozen:
                self._elapsed, self._since, self.frozen = self._model_ms(now), now, True
            return Snapshot(self)

    def resume(self) -> None:
        """Run the clock on from where it stopped: the frozen stretch is skipped, not caught up."""
        with self._lock:
            if self.frozen:
                self._since, self.frozen = self._clock(), False

    def _model_ms(self, now: float) -> float:
        return self._elapsed if self.frozen else self._elapsed + (now - self._since) * 1000 * self._scale

    def _advance(self, now: float) -> None:
        watermark = self.stream.origin + int(self._model_ms(now))
        if watermark > self.watermark:
            self._publish(*self.stream.until(watermark))
            self.watermark = watermark

    # -- publication ---------------------------------------------------------------------

    def _publish(self, times: list[int], sessions: list[int]) -> None:
        """Append one batch (in time order); the count moves last, so readers never see a
        slot half written."""
        first, size = self.count, len(times)
        if not size:
            return
        self._reserve(first + size)
        block = self.block
        ids = block.ids
        i = 0
        while i < size:  # equal timestamps: ids ascending in storage, so descending when served
            j = i + 1
            while j < size and times[j] == times[i]:
                j += 1
            if j - i > 1:
                a, z = 16 * (first + i), 16 * (first + j)
                ids[a:z] = b"".join(sorted(bytes(ids[k : k + 16]) for k in range(a, z, 16)))
            i = j
        devices, types, seen = self.stream.devices, block.types, self._seen
        seen.extend(bytes(len(devices) - len(seen)))
        for k, s in enumerate(sessions, first):
            self._type_counts[types[k]] += 1
            self._device_counts[devices[s]] += 1
            if not seen[s]:
                seen[s] = 1
                self._sessions += 1
            if k in block.unstorable:
                self._unstorable_published += 1
        block.sess.extend(sessions)
        block.ts.extend(times)
        self.count += size
        self.counts = (self._sessions, self._unstorable_published, tuple(self._type_counts),
                       tuple(self._device_counts))

    def _reserve(self, needed: int) -> None:
        """Draw ids, names, types and damage for whole chunks of slots, up to `needed`.

        By chunk, so that each chunk holds the exact type multiset, and so that what a slot
        gets depends on its index only.
        """
        block, cfg = self.block, self.config
        names: list[str] = []
        while self._capacity < needed:
            chunk = self._capacity // CHUNK
            rng = random.Random(f"arrivals:{cfg.seed}:{chunk}")
            block.ids += uuid4_bytes(rng, CHUNK)
            block.types += shuffled_types(rng, CHUNK)
            names.append(random_names(rng, CHUNK))
            self._damage(chunk)
            self._capacity += CHUNK
        if names:
            block.names += "".join(names)

    def _damage(self, chunk: int) -> None:
        """Unstorable and hostile arrivals, at the shares the static dataset has them."""
        cfg, block, base = self.config, self.block, chunk * CHUNK
        if self._p_unstorable > 0:
            rng = random.Random(f"arrival-unstorable:{cfg.seed}:{cfg.chaos_seed}:{chunk}")
            for k in range(base, base + CHUNK):
                if rng.random() < self._p_unstorable:
                    block.unstorable[k] = UNSTORABLE_KINDS[self._unstorable_drawn % len(UNSTORABLE_KINDS)]
                    self._unstorable_drawn += 1
        if self._p_hostile > 0:
            kinds = list(HOSTILE_KINDS)
            rng = random.Random(f"arrival-hostile:{cfg.seed}:{chunk}")
            for k in range(base, base + CHUNK):
                if rng.random() < self._p_hostile and k not in block.unstorable:
                    kind = kinds[self._hostile_drawn % len(kinds)]
                    self._hostile_drawn += 1
                    (block.hostile if hostile_storable(kind) else block.unstorable)[k] = kind

    # -- reads ---------------------------------------------------------------------------

    def matches(self, session_id: str | None, type_name: str | None, count: int) -> tuple[array, int]:
        """Storage indices of the arrivals matching the filters (ascending), and how many of
        them are among the first `count`; scanned incrementally, memoised per filter."""
        key = (session_id or "", type_name or "")
        block = self.block
        with self._lock:
            scanned, hits = self._matches.get(key) or (0, array("q"))
            s = block.session_index.get(session_id, -1) if session_id else None
            t = block.type_names.index(type_name) if type_name in block.type_names else -1
            sess, types = block.sess, block.types
            hits.extend(self.n + j for j in range(scanned, self.count)
                        if (s is None or sess[j] == s) and (type_name is None or types[j] == t))
            if len(self._matches) > 64:
                self._matches.clear()
            self._matches[key] = (self.count, hits)
        return hits, bisect_left(hits, self.n + count)

    def static_ids(self) -> frozenset[str]:
        if self._static_ids is None:
            self._static_ids = frozenset(self.static.storable_id_iter())
        return self._static_ids


class Snapshot:
    """The data as one request sees it: the static events and the first `count` arrivals.

    It offers what the server reads of a `Dataset` (views, lookups, rendering), over one
    storage index space. Cheap to make (one per request) and safe to keep: a cached page
    holds the snapshot it was built from.
    """

    __slots__ = ("block", "clock", "count", "counts", "everything", "live", "n", "static", "ts", "unstorable")

    def __init__(self, live: LiveData) -> None:
        self.live, self.static, self.block, self.n = live, live.static, live.block, live.n
        self.count, self.clock, self.counts = live.count, live.watermark, live.counts
        self.ts, self.unstorable = live.ts, live.unstorable
        self.everything = LiveView(range(self.n, self.n + self.count), self.count, self.static.everything)

    def __len__(self) -> int:
        return self.n + self.count

    @property
    def oldest_ts(self) -> int:
        return self.static.oldest_ts

    def id_of(self, i: int) -> str:
        return self.static.id_of(i) if i < self.n else self.block.id_of(i - self.n)

    def find_id(self, event_id: str) -> int | None:
        found = self.static.find_id(event_id)
        if found is not None:
            return found
        found = self.block.find_id(event_id)
        return self.n + found if found is not None and found < self.count else None

    def view(self, session_id: str | None, type_name: str | None) -> Sequence[int]:
        if not session_id and not type_name:
            return self.everything
        hits, split = self.live.matches(session_id, type_name, self.count)
        return LiveView(hits, split, self.static.view(session_id, type_name))

    def position_after(self, view: Sequence[int], ts: int, event_id: str) -> int:
        return position_after(self.ts, self.id_of, view, ts, event_id)

    def position_before_ts(self, view: Sequence[int], ts: int) -> int:
        return position_before_ts(self.ts, view, ts)

    def static_range(self, view: Sequence[int], start: int, end: int) -> tuple[int, int] | None:
        """As `Dataset.static_range`: pages wholly below the arrivals of the unfiltered order."""
        if isinstance(view, LiveView) and view.older is self.static.everything and start >= view.split:
            return start - view.split, end - view.split
        return None

    def event_dict(self, i: int, numeric_ts: bool) -> dict[str, Any]:
        return self.static.event_dict(i, numeric_ts) if i < self.n else self.block.event_dict(i - self.n, numeric_ts)

    def render(self, indices: Sequence[int], mixed: bool, special: dict[int, str] | None = None) -> list[str]:
        """As `Dataset.render`, for indices in serving order (the arrivals among them first)."""
        n, split = self.n, 0
        for i in indices:
            if i < n:
                break
            split += 1
        top = self.block.render([i - n for i in indices[:split]], mixed, special) if split else []
        return top + self.static.render(indices[split:], mixed, special, split)

    @property
    def stats(self) -> dict[str, Any]:
        """The static dataset's `/internal/stats` totals, with the arrivals counted in."""
        base = self.static.stats
        if not self.count:
            return base
        sessions, _, types, devices = self.counts
        return {
            **base,
            "events": base["events"] + self.count,
            "sessions": base["sessions"] + sessions,
            "eventTypes": [{**e, "count": e["count"] + c} for e, c in zip(base["eventTypes"], types, strict=True)],
            "deviceTypes": [{**d, "count": d["count"] + c} for d, c in zip(base["deviceTypes"], devices, strict=True)],
        }

    @property
    def arrivals_unstorable(self) -> int:
        return self.counts[1]

    def arrival_ids(self) -> Iterator[str]:
        """The storable ids among the arrivals, oldest first."""
        unstorable = self.block.unstorable
        for j in range(self.count):
            if j not in unstorable:
                yield self.block.id_of(j)

    def truth(self) -> Truth:
        return Truth(self.live.static_ids() | frozenset(self.arrival_ids()),
                     len(self.static.unstorable) + self.arrivals_unstorable, len(self), self.count, self.clock)
