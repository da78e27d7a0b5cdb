"""No pacing flags needed: a run against a rate-limited simulator at a time scale learns
the scaled window from the API's answers, and every fetcher paces by it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ingest.config import Config
from ingest.run.exits import ExitCode
from ingest.run.supervisor import Supervisor
from tests.e2e import assert_exact

SCALE = 4.0
NOMINAL_BUDGET = 39 + 10 + 5  # requests per 60 s on the three lanes, as configured for the real service


def test_a_run_with_no_pacing_flags_paces_at_the_scaled_window(sim_factory: Any, pg_dsn: str, data_dir: Path) -> None:
    """Realistic latency and budgets at time scale 4: windows of 15 s. The run is given no
    --rate-window and no rates. It must learn 15 s (not pace at the real service's 60 s,
    which would hold it a whole minute once a lane's budget is spent) and keep every lane
    inside its budget: no request refused with a 429. Small pages, so that the run needs
    more than one window's budget. /events allows 12 a window here, which only its
    X-RateLimit-Limit header tells."""
    sim = sim_factory(events=40_000, latency="realistic", rate_limits=True, time_scale=SCALE, events_limit=12)
    config = Config(api_url=sim.base_url, api_key=sim.api_key, data_dir=data_dir, database_url=pg_dsn,
                    page_limit=500, log_format="text", workers=2)
    supervisor = Supervisor(config, pg_dsn)
    started = time.monotonic()
    assert supervisor.run() == ExitCode.OK
    elapsed = time.monotonic() - started
    assert_exact(pg_dsn, sim.truth())
    stats = sim.stats()
    assert stats["rate_limited"] == 0 and "429" not in stats["responses"], stats
    pages = stats["requests"].get("feed", 0) + stats["requests"].get("events", 0)
    assert pages > NOMINAL_BUDGET + 3, "more requests than one nominal window allows: the pace shows"
    for lane, limiter in supervisor.limiters.items():
        state = limiter.snapshot()
        assert state.window_learnt and abs(state.window - 60 / SCALE) <= 0.03 * 60 / SCALE, (lane, state)
    assert supervisor.limiters["events"].snapshot().per_window == 12, "the count X-RateLimit-Limit reports"
    # Paced at 60 s windows, the requests beyond the first window's budget could not have
    # gone before a minute had passed.
    assert elapsed < 60, f"{elapsed:.1f} s: paced at the nominal window"
