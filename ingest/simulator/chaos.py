"""The fault layer: per-response damage a client must survive (section 5 and 9).

Reproducible: the n-th request that reaches the layer gets a private `random.Random` seeded
from (chaos_seed, n), so the same seed and the same request sequence give the same faults
whatever the thread timing. The layer sits after the response cache: the cache stores clean
pages, and every delivery (HIT or MISS) is damaged independently.
"""

from __future__ import annotations

import itertools
import random
import threading
from dataclasses import dataclass, field

import orjson

from ingest.simulator.arrivals import Snapshot
from ingest.simulator.config import ChaosParams
from ingest.simulator.dataset import Dataset, iso_ms

FIVE_XX = (500, 502, 503, 504)
MISSABLE_FIELDS = ("name", "properties", "session", "userId")
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\ufeff")
MALFORMED_FORMS = ("seconds", "numeric_string", "whitespace", "zero_width")
MAX_DUPLICATES = 3


@dataclass
class Decision:
    """What to do to one response. `rng` keeps drawing for the per-event damage."""

    rng: random.Random
    status: int | None = None  # a 5xx instead of the page
    body_fault: str | None = None  # "truncate", "reset" or "empty200"
    slow: float = 0.0  # extra model seconds before answering
    duplicates: int = 0  # events of the previous page to repeat at the top
    missing_fields: bool = False
    kinds: list[str] = field(default_factory=list)  # for the stats


def response_fault(u: float, p: ChaosParams) -> tuple[str, int | None]:
    """Map one uniform draw to at most one whole-response fault (they exclude each other)."""
    edges = (("5xx", p.p5xx), ("truncate", p.p_truncate), ("reset", p.p_reset), ("empty200", p.p_empty200),
             ("429", p.p429))
    acc = 0.0
    for kind, prob in edges:
        acc += prob
        if u < acc:
            if kind == "5xx":
                return kind, FIVE_XX[min(3, int((u - acc + prob) / prob * 4))]
            if kind == "429":
                return kind, 429
            return kind, None
    return "", None


class ChaosLayer:
    def __init__(self, params: ChaosParams, seed: int, burst: tuple[int, int] = (0, 0)) -> None:
        self.params, self.seed = params, seed
        self.burst_every, self.burst_length = burst
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def decide(self, page: bool, may_duplicate: bool) -> Decision:
        """Faults for the next response; `page` is False for stream-access (5xx only)."""
        with self._lock:
            n = next(self._counter)
        p = self.params
        rng = random.Random(f"chaos:{self.seed}:{n}")
        decision = Decision(rng)
        kind, status = response_fault(rng.random(), p)
        slow, dup, missing = rng.random(), rng.random(), rng.random()
        if kind == "429" and not page:  # storms hit page requests only
            kind, status = "", None
        if self.burst_length and self.burst_every and n % self.burst_every >= self.burst_every - self.burst_length:
            kind, status = "burst", (503, 502)[n % 2]
            decision.kinds.append("burst")
        if kind in ("5xx", "burst", "429"):
            decision.status = status
            decision.kinds.append(f"http_{status}")
            return decision
        if not page:
            return decision
        if kind:
            decision.body_fault = kind
        if slow < p.p_slow:
            decision.slow = p.slow_delay * (0.5 + rng.random())
            decision.kinds.append("slow")
        if may_duplicate and dup < p.p_duplicate:
            decision.duplicates = rng.randint(1, MAX_DUPLICATES)
            decision.kinds.append("duplicate")
        decision.missing_fields = missing < p.p_missing_fields
        return decision

    def damage(
        self, decision: Decision, dataset: Dataset | Snapshot, indices: list[int], mixed: bool
    ) -> tuple[dict[int, str], list[str]]:
        """Per-event damage for one page: replacement texts by position, and the fields dropped.

        Unstorable events keep their static form; damage here is always storable.
        """
        rng, p = decision.rng, self.params
        special: dict[int, str] = {}
        dropped: set[str] = set()
        candidates = [pos for pos, i in enumerate(indices) if i not in dataset.unstorable]
        if decision.missing_fields and candidates:
            count = max(1, round(len(indices) * p.missing_fields_share))
            for pos in rng.sample(candidates, min(count, len(candidates))):
                event = dataset.event_dict(indices[pos], not mixed or pos % 3 == 0)
                for name in rng.sample(MISSABLE_FIELDS, rng.randint(1, 2)):
                    del event[name]
                    dropped.add(name)
                special[pos] = orjson.dumps(event).decode()
        malformed = 0
        if p.p_malformed_timestamp > 0:
            for pos in candidates:
                if rng.random() >= p.p_malformed_timestamp:
                    continue
                malformed += 1
                event = orjson.loads(special[pos]) if pos in special else dataset.event_dict(indices[pos], True)
                event["timestamp"] = malformed_timestamp(dataset.ts[indices[pos]], rng)
                special[pos] = orjson.dumps(event).decode()
        decision.kinds.extend(["missing_fields"] * bool(decision.missing_fields) + ["malformed_timestamp"] * malformed)
        return special, [name for name in MISSABLE_FIELDS if name in dropped]


def malformed_timestamp(ts: int, rng: random.Random) -> float | str:
    """A rare but parseable timestamp form: epoch seconds, numeric string, padded or zero-width ISO."""
    form = rng.choice(MALFORMED_FORMS)
    if form == "seconds":
        return ts / 1000
    if form == "numeric_string":
        return str(ts)
    if form == "whitespace":
        return rng.choice((" ", "\t", "\n", "  ")) + iso_ms(ts) + rng.choice(("", " ", "\r\n"))
    return rng.choice(ZERO_WIDTH) + iso_ms(ts) + rng.choice(("",) + ZERO_WIDTH)


def truncate(body: bytes, rng: random.Random) -> bytes:
    """Cut a JSON body somewhere in its middle half, so it cannot parse."""
    return body[: len(body) // 4 + rng.randrange(max(1, len(body) // 2))]


def empty_body(rng: random.Random) -> bytes:
    """An empty 200, or one that is valid JSON but not an object."""
    return rng.choice((b"", b"", b"[]", b"null"))
