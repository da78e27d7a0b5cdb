"""Paging that breaks: the `protocol_fault` setting.

A client must survive a server whose pages are well-formed 200s that still break the walk,
because nothing below the page level (status, body, JSON) shows anything wrong:

- `no_cursor`: `hasMore: true` and no `nextCursor`, the page's events intact;
- `repeat_cursor`: a `nextCursor` that leads back to the page just served;
- `empty_pages`: `hasMore: true` with no events, and a cursor that stays where it was.

Two dosages, which combine. Now and then (`protocol_fault_rate`): a share of the page
positions, chosen by a hash of the seed and the position, is served faulty for its first
`protocol_fault_repeats` requests and clean afterwards, so a client that asks again from
where it is gets past. For good (`protocol_fault_from`): the server is stuck at that position
of the (ts DESC, id DESC) order; every request positioned there or below it is answered with
the faulty form of the page at that position (or at the top of a since/until window below it),
so no cursor, forged or not, gets further.

`broken_shape` is the pure decision; `ProtocolFaults` adds the one piece of state, how often
each chosen position has been served faulty.
"""

from __future__ import annotations

import threading
import zlib
from collections import Counter
from dataclasses import dataclass

from ingest.simulator.config import SimulatorConfig


@dataclass(frozen=True)
class Shape:
    """The positions a broken page serves, and its pagination. `cursor_back`: a nextCursor
    at the event just above `start` (the next request gets this page again); otherwise none."""

    start: int
    end: int
    has_more: bool
    cursor_back: bool


def broken_shape(kind: str, start: int, end: int, lo: int, hi: int, limit: int, has_more: bool,
                 stuck_from: int | None, chosen: bool) -> Shape | None:
    """The faulty form of the clean page [start, end) of the window [lo, hi), or None to serve
    it clean. `chosen`: this request is one of a chosen position's faulty ones."""
    if kind == "none":
        return None
    if stuck_from is not None and start >= stuck_from:
        start = max(lo, stuck_from)
        end = min(hi, start + limit)
    elif not (chosen and has_more):  # a last page without a cursor is no fault
        return None
    if kind == "no_cursor":
        return Shape(start, end, True, cursor_back=False)
    if kind == "repeat_cursor":
        return Shape(start, end, True, cursor_back=True)
    return Shape(start, start, True, cursor_back=True)


def chosen_position(seed: int, key: str, rate: float) -> bool:
    """Whether a page position gets the occasional fault: the same for every run of a seed."""
    return zlib.crc32(f"{seed}:{key}".encode()) < rate * 2**32


class ProtocolFaults:
    """The configured fault, and how many faulty answers each chosen position has had."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.kind = config.protocol_fault
        self.rate, self.repeats = config.protocol_fault_rate, config.protocol_fault_repeats
        self.stuck_from, self.seed = config.protocol_fault_from, config.chaos_seed
        self._served: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def on(self) -> bool:
        return self.kind != "none" and (self.rate > 0 or self.stuck_from is not None)

    def shape(self, view_key: str, start: int, end: int, lo: int, hi: int, limit: int,
              has_more: bool) -> Shape | None:
        """`view_key` names the filtered view (positions are per view)."""
        key = f"{view_key}:{start}"
        stuck = self.stuck_from is not None and start >= self.stuck_from
        chosen = False
        if not stuck and has_more and self.rate > 0 and chosen_position(self.seed, key, self.rate):
            with self._lock:
                chosen = self._served[key] < self.repeats
                if chosen:
                    self._served[key] += 1
        return broken_shape(self.kind, start, end, lo, hi, limit, has_more, self.stuck_from, chosen)
