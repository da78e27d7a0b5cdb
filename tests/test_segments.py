"""The segment state machine: writer, transitions, the claim race, reconcile."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from ingest.sink.segments import (
    STATES,
    RotationLimits,
    SegmentStore,
    SegmentWriter,
    claim,
    id_of,
    reconcile,
    reconcile_action,
    reject,
    requeue,
    retire,
    rotation_due,
    segment_id,
)


@pytest.fixture
def store(data_dir: Path) -> SegmentStore:
    s = SegmentStore(data_dir / "segments")
    s.ensure()
    return s


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def put(store: SegmentStore, state: str, name: str, data: bytes = b"x\n") -> Path:
    path = store.folder(state) / name
    path.write_bytes(data)
    return path


def names(store: SegmentStore, state: str) -> list[str]:
    return sorted(os.listdir(store.folder(state)))


def test_segment_ids_sort_in_fetch_order() -> None:
    assert segment_id(0, 1, "3fa9c2d1") == "p00-00000001-3fa9c2d1"
    ids = [segment_id(p, s, "ab") for p in (0, 1, 12) for s in (1, 2, 10, 11, 99999999)]
    assert sorted(ids) == ids
    assert id_of(Path("loading/p03-00000007-ab.4242.tsv")) == "p03-00000007-ab"
    assert id_of(Path("rejected/p03-00000007-ab.reason")) == "p03-00000007-ab"


LIMITS = RotationLimits(max_rows=10, max_bytes=1000, max_age=5.0)


@pytest.mark.parametrize(
    ("rows", "size", "age", "due"),
    [
        (0, 0, 0.0, False),
        (0, 0, 99.0, False),  # nothing written: never due, however old
        (1, 10, 0.0, False),
        (9, 999, 4.99, False),
        (10, 10, 0.0, True),  # rows
        (1, 1000, 0.0, True),  # bytes
        (1, 10, 5.0, True),  # age
    ],
)
def test_rotation_due(rows: int, size: int, age: float, due: bool) -> None:
    assert rotation_due(rows, size, age, LIMITS) is due


def test_writer_opens_lazily_rotates_and_seals(store: SegmentStore) -> None:
    clock = FakeClock()
    w = SegmentWriter(store, 2, "beef", next_seq=7, max_rows=3, max_bytes=1 << 20, max_age=10.0, clock=clock)
    assert w.seal() is None and names(store, "open") == [] and not w.due()
    w.append(b"", 0)
    assert names(store, "open") == []
    w.append(b"a\n", 1)
    assert names(store, "open") == ["p02-00000007-beef.tsv"] and not w.due()
    clock.now += 10.0
    assert w.due()  # by age
    w.append(b"b\nc\n", 2)
    assert w.seal() == "p02-00000007-beef"
    assert w.next_seq == 8 and names(store, "open") == []
    assert (store.ready / "p02-00000007-beef.tsv").read_bytes() == b"a\nb\nc\n"
    w.append(b"d\n", 1)
    w.append(b"e\n", 1)
    assert not w.due()
    w.append(b"f\n", 1)
    assert w.due()  # by rows
    assert w.seal() == "p02-00000008-beef"
    assert store.counts() == {"open": 0, "ready": 2, "loading": 0, "loaded": 0, "rejected": 0}
    assert store.ready_bytes() == 12


def test_writer_rotates_by_bytes_and_abort_discards(store: SegmentStore) -> None:
    w = SegmentWriter(store, 0, "aa", next_seq=1, max_rows=1000, max_bytes=4, max_age=10.0, clock=FakeClock())
    w.append(b"abc\n", 1)
    assert w.due()
    w.abort()
    assert names(store, "open") == [] and w.next_seq == 1 and not w.due()
    w.append(b"z\n", 1)
    assert w.seal() == "p00-00000001-aa"


def test_claim_takes_the_oldest_and_marks_the_pid(store: SegmentStore) -> None:
    for seq in (3, 1, 2):
        put(store, "ready", f"{segment_id(0, seq, 'aa')}.tsv")
    first = claim(store, 4242)
    assert first == store.loading / "p00-00000001-aa.4242.tsv" and first.exists()
    assert names(store, "ready") == ["p00-00000002-aa.tsv", "p00-00000003-aa.tsv"]
    assert claim(store, 1) is not None and claim(store, 1) is not None
    assert claim(store, 1) is None


def _claim_all(root: str, start: multiprocessing.synchronize.Event, out: str) -> None:
    store = SegmentStore(Path(root))
    start.wait()
    won = []
    while (path := claim(store, os.getpid())) is not None:
        won.append(id_of(path))
    Path(out).write_text("\n".join(won))


def test_two_processes_racing_claim_each_segment_exactly_once(store: SegmentStore, tmp_path: Path) -> None:
    ids = [segment_id(0, seq, "aa") for seq in range(1, 401)]
    for seg in ids:
        put(store, "ready", f"{seg}.tsv")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    outs = [tmp_path / f"won{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=_claim_all, args=(str(store.root), start, str(o))) for o in outs]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    won = [o.read_text().split() for o in outs]
    assert sorted(won[0] + won[1]) == ids  # nobody lost, nobody twice
    assert names(store, "ready") == [] and len(names(store, "loading")) == len(ids)


def test_retire_requeue_reject(store: SegmentStore) -> None:
    a = put(store, "loading", "p00-00000001-aa.11.tsv")
    retire(store, a, keep=True)
    assert names(store, "loaded") == ["p00-00000001-aa.tsv"] and names(store, "loading") == []
    b = put(store, "loading", "p00-00000002-aa.11.tsv")
    retire(store, b, keep=False)
    assert names(store, "loaded") == ["p00-00000001-aa.tsv"] and names(store, "loading") == []
    c = put(store, "loading", "p00-00000003-aa.11.tsv", b"data\n")
    requeue(store, c)
    assert names(store, "ready") == ["p00-00000003-aa.tsv"]
    d = put(store, "loading", "p00-00000004-aa.11.tsv", b"junk\n")
    reject(store, d, "cannot load: because")
    assert names(store, "rejected") == ["p00-00000004-aa.reason", "p00-00000004-aa.tsv"]
    assert (store.rejected / "p00-00000004-aa.reason").read_text() == "cannot load: because\n"
    assert (store.rejected / "p00-00000004-aa.tsv").read_bytes() == b"junk\n"
    put(store, "rejected", "p00-00000005-aa.lines.tsv")
    assert store.counts()["rejected"] == 1  # side files are not segments


@pytest.mark.parametrize(
    ("state", "in_ledger", "action"),
    [
        ("open", False, "discard"),
        ("open", True, "discard"),
        ("ready", False, "keep"),
        ("ready", True, "retire"),
        ("loading", False, "requeue"),
        ("loading", True, "retire"),
        ("loaded", False, "keep"),
        ("loaded", True, "keep"),
        ("rejected", False, "keep"),
        ("rejected", True, "keep"),
    ],
)
def test_reconcile_action(state: str, in_ledger: bool, action: str) -> None:
    assert reconcile_action(state, in_ledger) == action


def test_reconcile_action_covers_every_state() -> None:
    for state in STATES:
        for in_ledger in (False, True):
            assert reconcile_action(state, in_ledger) in ("retire", "requeue", "discard", "keep")


FILE_NAMES = {"open": "{id}.tsv", "ready": "{id}.tsv", "loading": "{id}.999.tsv"}


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize(
    ("state", "in_ledger", "ends_in", "report_counts"),
    [
        # report_counts: (retired, requeued, discarded, kept), the bystander included
        ("open", False, None, (0, 0, 2, 0)),
        ("open", True, None, (0, 0, 2, 0)),
        ("ready", False, "ready", (0, 0, 0, 2)),
        ("ready", True, "retired", (1, 0, 0, 1)),
        ("loading", False, "ready", (0, 2, 0, 0)),
        ("loading", True, "retired", (1, 1, 0, 0)),
    ],
)
def test_reconcile_moves_files(
    store: SegmentStore,
    state: str,
    in_ledger: bool,
    ends_in: str | None,
    report_counts: tuple[int, int, int, int],
    keep: bool,
) -> None:
    seg = "p01-00000042-cafe"
    other = "p01-00000043-cafe"  # a bystander in the same state, never in the ledger
    put(store, state, FILE_NAMES[state].format(id=seg), b"rows\n")
    put(store, state, FILE_NAMES[state].format(id=other), b"more\n")
    report = reconcile(store, {seg} if in_ledger else set(), keep=keep)
    where = {s: [id_of(Path(n)) for n in names(store, s)] for s in STATES}
    copies = sum(ids.count(seg) for ids in where.values())
    if ends_in is None:
        assert copies == 0
    elif ends_in == "retired":
        assert where["loaded"] == ([seg] if keep else []) and copies == int(keep)
    else:
        assert copies == 1 and (store.folder(ends_in) / f"{seg}.tsv").read_bytes() == b"rows\n"
    assert where["loading"] == [] and where["open"] == []
    assert (other in where["ready"]) is (state != "open")  # open/ is discarded, loading/ requeued
    assert (report.retired, report.requeued, report.discarded, report.kept) == report_counts
