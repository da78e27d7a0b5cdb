"""The lanes: endpoints of the API with a request budget of their own, and the modes a
plan is made for (which lanes it walks). Three words once shared the one name `source`:
the `--source` choice (auto, feed, events) is the user's; a mode is what a checkpoint's
plan walks; a lane is what one partition walks now."""

from __future__ import annotations

from typing import Literal, get_args

from ingest.config import Config

Lane = Literal["feed", "events", "events_query"]  # the feed, /events (key in the header), /events?api_key=
Mode = Literal["feed", "events", "mixed"]
LANES: tuple[Lane, ...] = get_args(Lane)
# /events' documented budget per window (datasync-api.md section 4): its pace until the
# API's X-RateLimit-Limit says otherwise, when the user gave no --events-rate.
EVENTS_RATE_DOCUMENTED = 10.0


def lane_rates(config: Config) -> dict[Lane, float]:
    """Requests per rate window each lane may make (0: the lane is not used)."""
    events = config.events_rate if config.events_rate is not None else EVENTS_RATE_DOCUMENTED
    return {"feed": config.feed_rate, "events": events, "events_query": config.query_rate}
