"""Exit codes, named by who reads them.

`ExitCode` is what an operator, a scheduler or a container runtime reads from the
`datasync-ingest` process (DESIGN.md section 3). `ChildExit` is what the supervisor reads
from a fetcher or loader it started, to decide whether a restart can help (see
`supervisor.restart_action`).
"""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0  # drained and loaded (or, for `verify`, a match)
    FAILED = 1  # a fatal error, named in one line; the state is kept
    USAGE = 2  # bad usage or configuration
    UNCHECKED = 3  # `verify` could not compare (the source, the database or scratch space failed)
    SIGINT = 130  # stopped by SIGINT after a clean drain; the next run resumes
    SIGTERM = 143  # stopped by SIGTERM, likewise


EXIT_BY_SIGNAL = {signal.SIGINT: ExitCode.SIGINT, signal.SIGTERM: ExitCode.SIGTERM}


class ChildExit(enum.IntEnum):
    DONE = 0  # finished: drained, or stopped on request (the checkpoint says where to resume)
    CRASHED = 1  # an unexpected exception (Python's own code for one): a restart may help
    FATAL = 3  # restarting cannot help: a refused key, a full disk, a database that stayed away
    RETRYABLE = 4  # retries ran out on a transient fault: a restart may help
