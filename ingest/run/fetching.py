"""The fetcher process: walker threads that write the source's pages into the sink's
segments, the one place where the two meet (the source never imports the sink).

A walker waits on the network nearly all the time against a paced API, so the walkers of a
run are threads in as few processes as the parsing needs (`fetch_processes`): each process
costs its own interpreter and HTTP stack, a thread only the page it holds.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from ingest.config import Config
from ingest.counters import ClientStatsPublisher
from ingest.run.children import Child
from ingest.run.exits import ChildExit
from ingest.sink.segments import SegmentStore, SegmentWriter
from ingest.source import checkpoint
from ingest.source.api import ApiClient, ApiError, FatalApiError
from ingest.source.fetcher import FetchContext, walk_and_help
from ingest.source.lanes import Lane
from ingest.source.normalise import deep_stack_thread
from ingest.source.pacing import SharedRateLimiter
from ingest.waits import wait_for

# Out of space (or over a file-size limit): restarting cannot help until space returns.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(exc: OSError, data_dir: Path) -> str:
    """One line for the user: what failed, and where."""
    what = "no space left in the data directory" if exc.errno in DISK_FULL else "cannot write to the data directory"
    return f"{what} {data_dir}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def fetch_context(config: Config, generation: str, client: ApiClient, should_stop: Callable[[], bool],
                  wait: Callable[[float], bool], on_page: Callable[[int], None] = lambda rows: None) -> FetchContext:
    """A walk of the source that writes into this data directory's segments."""
    store = SegmentStore(config.segments_dir)

    def open_output(partition: int, next_seq: int) -> SegmentWriter:
        return SegmentWriter(store, partition, generation, next_seq,
                             config.segment_max_rows, config.segment_max_bytes, config.segment_max_age)

    return FetchContext(config, client, open_output, store.ready_bytes, should_stop, wait, on_page)


def fetch_processes(walkers: int, cpus: int) -> int:
    """Processes the walkers of a run share. A walker waits on the network nearly all the
    time against a paced API, so the walkers are threads; processes are added only where
    parsing can be CPU-bound (a local source), one per two cores, the others being the
    loaders', PostgreSQL's and the source's."""
    return max(1, min(walkers, cpus // 2))


def assign_walkers(indices: list[int], processes: int) -> list[tuple[int, ...]]:
    """Partitions dealt round-robin, so each process gets the lanes in the plan's mix."""
    groups = [tuple(indices[slot::processes]) for slot in range(processes)]
    return [group for group in groups if group]


# A walker's exit decides its process's: the most severe one wins.
SEVERITY = (ChildExit.DONE, ChildExit.RETRYABLE, ChildExit.CRASHED, ChildExit.FATAL)


def worst(codes: list[ChildExit]) -> ChildExit:
    return max(codes, key=SEVERITY.index, default=ChildExit.DONE)


def walk_partition(child: Child, index: int, generation: str, limiters: dict[Lane, SharedRateLimiter],
                   should_stop: Callable[[], bool], wait: Callable[[float], bool]) -> ChildExit:
    """One walker: walk partition `index`, then help walk the others."""
    config = child.config
    state = checkpoint.read(config.state_path)
    assert state is not None, "the supervisor writes the checkpoint before starting fetchers"
    part = state.partitions[index]
    client = ApiClient(config, limiters, should_stop=should_stop)
    publisher = ClientStatsPublisher(child.counters)

    def on_page(rows: int) -> None:
        child.counters.add_many({"events_fetched": rows, "pages": 1})
        publisher.publish(client.stats)

    ctx = fetch_context(config, generation, client, should_stop, wait, on_page)
    try:
        walk_and_help(ctx, part)
    except FatalApiError as exc:
        child.report(f"partition {index}: {exc}")
        return ChildExit.FATAL
    except ApiError as exc:
        child.report(f"partition {index}: {exc}")
        return ChildExit.RETRYABLE
    except OSError as exc:
        child.report(f"partition {index}: {describe_os_error(exc, config.data_dir)}")
        return ChildExit.FATAL if exc.errno in DISK_FULL else ChildExit.RETRYABLE
    except Exception as exc:
        logger.exception("partition {}: walker crashed", index)
        child.report(f"partition {index}: walker crashed: {exc!r}")
        return ChildExit.CRASHED
    finally:
        publisher.publish(client.stats)
        client.close()
    return ChildExit.DONE


def fetcher(child: Child, indices: tuple[int, ...], generation: str,
            limiters: dict[Lane, SharedRateLimiter]) -> ChildExit:
    """Walk `indices`, a thread each. A walker that fails stops its siblings at their next
    page (each seals and checkpoints what it holds), so the process exits with the failure
    and the supervisor's restart resumes every walk of it from its checkpoint."""
    failed = threading.Event()

    def should_stop() -> bool:
        return failed.is_set() or child.should_stop()

    def wait(seconds: float) -> bool:
        return wait_for(seconds, should_stop, nap=failed.wait)

    codes: list[ChildExit] = []

    def walker(index: int) -> None:
        code = walk_partition(child, index, generation, limiters, should_stop, wait)
        codes.append(code)
        if code != ChildExit.DONE:
            failed.set()

    # The deep-JSON stack for each: the recursion limit a deep event raises is process-wide.
    threads = [deep_stack_thread(walker, index, name=f"partition-{index}") for index in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return worst(codes)
