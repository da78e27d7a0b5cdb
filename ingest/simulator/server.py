"""The simulated DataSync service: routes (`SimulatorApp`) and the HTTP shell around them.

`SimulatorApp.dispatch` turns a parsed `Request` into a `Reply` (status, headers, body, and
the delivery faults: a delay, or a connection reset after N bytes); it never touches a
socket, so most behaviour is testable without HTTP. `_Handler` is the thin shell: it parses
the request, adds the common Express-style headers, gzips, sleeps and writes.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import socket
import struct
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.message import Message
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import orjson

from ingest.simulator import chaos as faults
from ingest.simulator.arrivals import LiveData, Snapshot
from ingest.simulator.chaos import ChaosLayer, Decision
from ingest.simulator.config import SimulatorConfig
from ingest.simulator.cursor import CursorError, decode_cursor, encode_cursor
from ingest.simulator.dataset import Dataset, Truth, iso_ms
from ingest.simulator.limits import (
    FixedWindow,
    LatencyModel,
    ResponseCache,
    SlidingWindow,
    WindowState,
    duration_value,
    format_duration,
)
from ingest.simulator.protocol import ProtocolFaults
from ingest.simulator.truth import arrivals_text

API = "/api/v1"
FEED_PATH = API + "/events/d4ta/x7k9/feed"
STREAM_ACCESS_PATH = "/internal/dashboard/stream-access"
FORGE_ID = "ffffffff-ffff-ffff-ffff-ffffffffffff"  # sorts above every id in a millisecond
JSON_TYPE = "application/json; charset=utf-8"
GZIP_LEVEL = 1  # generation speed matters more than the last few percent of size
DASHBOARD_HTML = (
    b'<!doctype html><html lang="en"><head><meta charset="UTF-8"><title>DataSync Analytics</title>'
    b'<script type="module" src="/assets/index-sim.js"></script></head><body><div id="root"></div>'
    b"</body></html>"
)
MANIFEST = {
    "name": "DataSync Analytics API",
    "version": "v1",
    "endpoints": {"events": API + "/events", "sessions": API + "/sessions", "metrics": API + "/metrics"},
    "auth": {"method": "API Key", "header": "X-API-Key"},
}


def alb_page(status: int) -> bytes:
    phrase = HTTPStatus(status).phrase
    return (f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
            f"<center><h1>{status} {phrase}</h1></center>\r\n</body>\r\n</html>\r\n").encode()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Message
    now: float  # wall seconds at arrival
    body: bytes = b""
    gzip: bool = False  # the client accepts gzip (and the simulator may send it)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON_TYPE
    request_id: str = ""
    alb: bool = False  # a load-balancer page: `Server: awselb/2.0`, no Express headers
    delay: float = 0.0  # wall seconds to wait before answering
    reset_at: float | None = None  # send this fraction of the (encoded) body, then reset the connection
    route: str = ""
    body_ok: bool = True  # False once chaos damaged the body (not counted as events served)
    gzipped: bytes | None = None  # the body, already gzipped by the page renderer


@dataclass(frozen=True)
class PageSpec:
    """A served page, small enough to cache: the body is re-rendered from it identically."""

    data: Dataset | Snapshot  # what the page was built from (a HIT replays its `meta.total` too)
    view: Sequence[int]
    lo: int  # first position of the since/until window
    hi: int  # end of the since/until window
    start: int
    end: int
    limit: int
    has_more: bool
    next_cursor: str | None
    cursor_expires_in: int | float
    request_id: str
    mixed: bool
    after_cursor: bool


def has_dashboard_signal(headers: Message, host: str, key: str) -> bool:
    """Section 2.2: any one browser-ish signal lets stream-access issue a token."""
    origin = f"http://{host}"
    cookie = headers.get("Cookie") or ""
    cookies = dict(part.strip().split("=", 1) for part in cookie.split(";") if "=" in part)
    return (
        "Mozilla" in (headers.get("User-Agent") or "")
        or (bool(host) and (headers.get("Origin") or "").startswith(origin))
        or (bool(host) and (headers.get("Referer") or "").startswith(origin))
        or cookies.get("dashboard_api_key") == key
        or (headers.get("Sec-Fetch-Site") or "").lower() == "same-origin"
        or (headers.get("X-Requested-With") or "") == "XMLHttpRequest"
        or headers.get("X-Dashboard-Session") is not None
    )


def parse_limit(text: str | None, default: int, maximum: int) -> int:
    """Default when absent or not a positive number; silently capped at `maximum`."""
    try:
        value = int(text) if text is not None else default
    except ValueError:
        value = default
    return min(maximum, value if value > 0 else default)


def parse_epoch_ms(text: str | None) -> int | None:
    try:
        return int(float(text)) if text not in (None, "") else None
    except ValueError:
        return None


def error_body(status: int, code: str, message: str, **extra: Any) -> bytes:
    return orjson.dumps({"error": HTTPStatus(status).phrase, "message": message, "code": code, **extra})


@dataclass
class RenderedHead:
    """`{"data":[` plus the events of a page, as bytes and as an unfinished gzip stream.

    Only the envelope tail (pagination, meta) differs per request, so the slow parts (JSON
    generation and compression) can be done ahead of the request.
    """

    text: bytes
    deflated: bytes = b""
    deflate: Any = None  # zlib compress object holding the stream's state after `text`

    def finish(self, tail: bytes) -> bytes:
        stream = self.deflate.copy()
        return self.deflated + stream.compress(tail) + stream.flush()


class PageRenderer:
    """Renders pages, and the probable next page of a crawl while the client parses this one.

    Why: a sequential client alternates between waiting for a page and parsing it; rendering
    page n+1 on a worker thread during the parse roughly halves its wait. Output is identical
    either way; chaos-damaged pages never come from here.
    """

    MAX_PENDING = 8

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prerender")
        self._pending: dict[tuple[int, int, bool, bool], Future[RenderedHead]] = {}
        self._lock = threading.Lock()

    def render(self, start: int, end: int, mixed: bool, gzip: bool) -> RenderedHead:
        text = b'{"data":[' + ",".join(self.dataset.render(range(start, end), mixed)).encode()
        if not gzip:
            return RenderedHead(text)
        deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return RenderedHead(text, deflate.compress(text), deflate)

    def take(self, start: int, end: int, mixed: bool, gzip: bool) -> RenderedHead:
        """Events [start, end) of the unfiltered order: prepared ahead if scheduled, else now."""
        with self._lock:
            future = self._pending.pop((start, end, mixed, gzip), None)
        if future is not None and not future.cancelled():
            return future.result()
        return self.render(start, end, mixed, gzip)

    def schedule(self, start: int, end: int, mixed: bool, gzip: bool) -> None:
        key = (start, end, mixed, gzip)
        with self._lock:
            if key in self._pending:
                return
            while len(self._pending) >= self.MAX_PENDING:
                self._pending.pop(next(iter(self._pending))).cancel()
            try:
                self._pending[key] = self._pool.submit(self.render, start, end, mixed, gzip)
            except RuntimeError:
                pass  # shutting down

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SimulatorApp:
    """Every route of the simulated service, and its state (keys, tokens, windows, cache)."""

    def __init__(self, config: SimulatorConfig, dataset: Dataset) -> None:
        self.config, self.dataset = config, dataset
        self.live = LiveData(config, dataset) if config.arrival_rate > 0 else None
        s = config.time_scale
        self.scale = s
        self.events_window = FixedWindow(config.events_limit, config.rate_window / s)
        self.query_window = (
            FixedWindow(config.query_auth_limit, config.rate_window / s)
            if config.query_auth_separate_bucket else self.events_window
        )
        self.feed_window: FixedWindow | SlidingWindow = (
            SlidingWindow(config.feed_limit, config.feed_window / s, config.feed_count_rejected)
            if config.feed_window_kind == "sliding" else FixedWindow(config.feed_limit, config.feed_window / s)
        )
        self.stream_window = FixedWindow(config.stream_access_limit, config.stream_access_window / s)
        self.cache: ResponseCache[PageSpec] = ResponseCache(config.cache_ttl / s)
        self.chaos = ChaosLayer(config.chaos_params(), config.chaos_seed, (config.burst_every, config.burst_length))
        self.pages = PageRenderer(dataset)
        self.protocol = ProtocolFaults(config)
        self.latency = LatencyModel(
            config.base_latency / s, config.per_event_latency / s, config.latency_jitter,
            config.server_capacity * s, config.chaos_seed,
        )
        self.chaos_on = config.chaos != "none" or any(
            getattr(config.chaos_params(), name) > 0
            for name in ("p5xx", "p_truncate", "p_empty200", "p_reset", "p_slow", "p_missing_fields",
                         "p_malformed_timestamp", "p_duplicate", "p429")
        ) or bool(config.burst_every and config.burst_length)
        self.keys = frozenset(config.api_keys)
        self.first_call: dict[str, float] = {}
        self.tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.counters: dict[str, Counter[str]] = {
            "requests": Counter(), "responses": Counter(), "faults": Counter()
        }
        self.rate_limited = 0
        self.events_served = 0
        self.tokens_issued = 0
        self.token_history: list[str] = []  # every token ever issued, for secret-leak tests
        self.routes: dict[tuple[str, str], Callable[[Request], Reply]] = {
            ("GET", API + "/events"): self.events,
            ("HEAD", API + "/events"): self.events,
            ("GET", FEED_PATH): self.feed,
            ("POST", STREAM_ACCESS_PATH): self.stream_access,
            ("GET", API): self.manifest,
            ("GET", "/internal/stats"): self.internal_stats,
            ("GET", "/internal/health"): self.internal_health,
            ("GET", "/health"): self.health,
            ("GET", "/_sim/stats"): self.sim_stats,
            ("GET", "/_sim/arrivals"): self.sim_arrivals,
            ("POST", "/_sim/arrivals/freeze"): self.sim_freeze,
            ("POST", "/_sim/arrivals/resume"): self.sim_resume,
        }

    def data(self) -> Dataset | Snapshot:
        """What a request is served from: the static dataset, or a snapshot with the arrivals so far."""
        return self.live.snapshot() if self.live else self.dataset

    def truth(self) -> Truth:
        return self.live.snapshot().truth() if self.live else self.dataset.truth()

    def freeze_arrivals(self) -> Truth:
        return self.live.freeze().truth() if self.live else self.dataset.truth()

    def resume_arrivals(self) -> None:
        if self.live:
            self.live.resume()

    # -- dispatch ------------------------------------------------------------------------

    def dispatch(self, req: Request) -> Reply:
        path = req.path.rstrip("/") or "/"
        handler = self.routes.get((req.method, path))
        if handler is None:
            if req.method in ("GET", "HEAD") and path.startswith(API + "/events/") and path.count("/") == 4:
                handler = self.event_by_id
            elif path == API or path.startswith(API + "/"):
                handler = self.unknown_api
            else:
                handler = self.dashboard
        req.path = path
        reply = handler(req)
        reply.route = reply.route or handler.__name__
        with self._lock:
            self.counters["requests"][reply.route] += 1
            self.counters["responses"][str(reply.status)] += 1
            if reply.status == 429:
                self.rate_limited += 1
        return reply

    def error(self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None,
              **extra: Any) -> Reply:
        return Reply(status, error_body(status, code, message, **extra), headers or [])

    def authenticate(self, req: Request) -> tuple[str, bool] | Reply:
        """(key, came from ?api_key=) or the 401. A key's validity runs from its first call."""
        key = req.headers.get("X-API-Key")
        via_query = False
        if not key and self.config.query_auth and "api_key" in req.query:
            key, via_query = req.query["api_key"], True
        if not key or key not in self.keys:
            return self.error(401, "UNAUTHORIZED", "Missing or invalid API key",
                              hint="Send your key in the X-API-Key header")
        with self._lock:
            first = self.first_call.setdefault(key, req.now)
        if req.now - first > self.config.key_validity / self.scale:
            return self.error(401, "API_KEY_EXPIRED", "API key has expired")
        return key, via_query

    # -- rate-limit helpers --------------------------------------------------------------

    def rate_headers(self, state: WindowState) -> list[tuple[str, str]]:
        return [
            ("X-RateLimit-Limit", str(state.limit)),
            ("X-RateLimit-Remaining", str(state.remaining)),
            ("X-RateLimit-Reset", format_duration(state.reset, self.scale)),
        ]

    def retry_after_value(self, seconds: float, now: float) -> str:
        """Retry-After in the configured form: decimal seconds, "0", or an HTTP date (whole
        seconds, rounded up so that it never asks for less than `seconds`)."""
        form = self.config.retry_after_form
        if form == "zero":
            return "0"
        if form == "http_date":
            return formatdate(math.ceil(now + seconds), usegmt=True)
        return format_duration(seconds, self.scale)

    def too_many(self, state: WindowState, standard: bool, retry_after: bool, now: float | None = None) -> Reply:
        """429. Standard endpoints: X-RateLimit-* headers, Retry-After and a `rateLimit` object.
        Hidden limits (feed, stream-access): a bare body, Retry-After only if configured."""
        wait = format_duration(state.reset, self.scale)
        told = self.retry_after_value(state.reset, time.time() if now is None else now)
        headers = [("Retry-After", told)] if retry_after else []
        if not standard:
            return self.error(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded. Please slow down.", headers)
        value = duration_value(state.reset, self.scale)
        return self.error(
            429, "RATE_LIMIT_EXCEEDED", f"Rate limit exceeded. Try again in {wait} seconds.",
            headers + self.rate_headers(state),
            rateLimit={"limit": state.limit, "remaining": 0, "reset": value, "retryAfter": value},
        )

    # -- paged routes --------------------------------------------------------------------

    def events(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        if isinstance(auth, Reply):
            return auth
        key, via_query = auth
        window = self.query_window if via_query else self.events_window
        return self.serve_page(
            req, key, "events",
            count=lambda: window.hit(key, req.now), peek=lambda: window.peek(key, req.now),
            cacheable=True, mixed=True, honour_since_until=self.config.events_honour_since_until,
        )

    def feed(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        if isinstance(auth, Reply):
            return auth
        key, _ = auth
        token = req.headers.get("X-Stream-Token") or ""
        with self._lock:
            issued = self.tokens.get(token)
        if issued is None or issued[1] <= req.now or (self.config.token_bound_to_key and issued[0] != key):
            return self.error(403, "INVALID_STREAM_TOKEN", "Missing, invalid or expired stream token",
                              hint="Request a token from the dashboard stream-access endpoint")
        window: FixedWindow | SlidingWindow = (
            self.events_window if self.config.feed_shares_events_budget else self.feed_window
        )
        return self.serve_page(
            req, key, "feed", count=lambda: window.hit(key, req.now), peek=None,
            cacheable=self.config.cache_feed, mixed=self.config.feed_timestamp_mode == "mixed",
            honour_since_until=True,
        )

    def serve_page(
        self, req: Request, key: str, route: str, count: Callable[[], WindowState],
        peek: Callable[[], WindowState] | None, cacheable: bool, mixed: bool, honour_since_until: bool,
    ) -> Reply:
        """Cache lookup (HITs free), rate limit, cursor, page, then chaos: the section 4 order."""
        cfg, q = self.config, req.query
        limit = parse_limit(q.get("limit"), cfg.default_limit, cfg.max_limit)
        since = parse_epoch_ms(q.get("since")) if honour_since_until else None
        until = parse_epoch_ms(q.get("until")) if honour_since_until else None
        cache_key = (route, limit, q.get("cursor"), q.get("sessionId"), q.get("type"), since, until,
                     None if cfg.cache_shared_across_keys else key)
        if cacheable:
            spec = self.cache.get(cache_key, req.now)
            if spec is not None:
                state = peek() if (peek and cfg.rate_limits) else None
                headers = self.rate_headers(state) if state else []
                delay = cfg.base_latency / self.scale if cfg.latency == "realistic" else 0.0
                return self.deliver(req, spec, headers + [("X-Cache", "HIT")], delay, route)
        state = None
        if cfg.rate_limits:
            state = count()
            if not state.allowed:
                standard = peek is not None
                return self.too_many(state, standard, retry_after=standard or cfg.feed_retry_after, now=req.now)
        headers = self.rate_headers(state) if (state and peek) else []
        data = self.data()
        view = data.view(q.get("sessionId"), q.get("type"))
        built = self.build_page(req, data, view, limit, since, until, mixed)
        if isinstance(built, Reply):
            built.headers += headers
            return built
        spec, delay = built
        broken = self.break_paging(req, spec, f"{q.get('sessionId')}:{q.get('type')}")
        if cacheable and broken is None:  # a HIT replays a clean page: a broken one is never stored
            self.cache.put(cache_key, spec, req.now)
            headers += [("X-Cache", "MISS"), ("X-Cache-TTL", format_duration(cfg.cache_ttl / self.scale,
                                                                             self.scale))]
        return self.deliver(req, broken or spec, headers, delay, route)

    def break_paging(self, req: Request, spec: PageSpec, view_key: str) -> PageSpec | None:
        """The page in the form of the configured protocol fault (protocol.py), if it gets one."""
        if not self.protocol.on:
            return None
        shape = self.protocol.shape(view_key, spec.start, spec.end, spec.lo, spec.hi, spec.limit, spec.has_more)
        if shape is None:
            return None
        next_cursor = None
        if shape.cursor_back:
            exp = int(req.now * 1000) + round(self.config.cursor_ttl / self.scale * 1000)
            ds, view = spec.data, spec.view
            if shape.start > 0:
                above = view[shape.start - 1]
                next_cursor = encode_cursor(ds.id_of(above), ds.ts[above], exp)
            else:  # above the newest event: the next request gets the first page again
                next_cursor = encode_cursor(FORGE_ID, ds.ts[view[0]] + 1 if view else 0, exp)
        with self._lock:
            self.counters["faults"][self.protocol.kind] += 1
        return replace(spec, start=shape.start, end=shape.end, has_more=shape.has_more, next_cursor=next_cursor)

    def build_page(
        self, req: Request, ds: Dataset | Snapshot, view: Sequence[int], limit: int, since: int | None,
        until: int | None, mixed: bool,
    ) -> tuple[PageSpec, float] | Reply:
        cfg = self.config
        lo = ds.position_before_ts(view, until) if until is not None else 0
        hi = ds.position_before_ts(view, since) if since is not None else len(view)
        start, after_cursor = lo, False
        now_ms = int(req.now * 1000)
        text = req.query.get("cursor")
        if text:
            try:
                cursor = decode_cursor(text, now_ms, cfg.accept_base64url)
            except CursorError as exc:
                if exc.code == "CURSOR_INVALID_FORMAT" and cfg.garbage_cursor_502:
                    return Reply(502, alb_page(502), content_type="text/html", alb=True)
                return self.error(400, exc.code, exc.message)
            if cursor.ts < ds.oldest_ts:
                if cfg.out_of_range_mode == "teapot":
                    return self.error(418, "IM_A_TEAPOT", "I'm a teapot")
                start = hi
            else:
                start = max(lo, ds.position_after(view, cursor.ts, cursor.id))
            after_cursor = True
        start = min(start, max(lo, hi))
        end = min(hi, start + limit) if start < hi else start
        has_more = end < hi
        delay = self.latency.delay(end - start, req.now) if cfg.latency == "realistic" else 0.0
        exp = now_ms + round(cfg.cursor_ttl / self.scale * 1000)
        next_cursor = None
        if has_more:
            last = view[end - 1]
            next_cursor = encode_cursor(ds.id_of(last), ds.ts[last], exp)
        expires_in = duration_value(exp / 1000 - (req.now + delay), self.scale, rounding="floor")
        spec = PageSpec(ds, view, lo, hi, start, end, limit, has_more, next_cursor, expires_in, str(uuid.uuid4()),
                        mixed, after_cursor)
        return spec, delay

    def deliver(self, req: Request, spec: PageSpec, headers: list[tuple[str, str]], delay: float,
                route: str) -> Reply:
        """Render a page (clean, from the cache or fresh) and apply the fault layer to it."""
        ds = spec.data
        decision = self.chaos.decide(page=True, may_duplicate=spec.after_cursor and spec.start > spec.lo) \
            if self.chaos_on else None
        if decision and decision.status:
            self.count_faults(decision)
            if decision.status == 429:  # a storm: refused whatever the budget says
                seconds = self.config.retry_after / self.scale
                state = WindowState(False, self.config.events_limit, 0, seconds)
                reply = self.too_many(state, standard=route == "events", retry_after=True, now=req.now)
                reply.route = route
                return reply
            return self.server_error(decision.status, headers, route)
        duplicates = decision.duplicates if decision else 0
        first = max(spec.lo, spec.start - duplicates)
        indices = list(spec.view[first : spec.end])
        special: dict[int, str] = {}
        dropped: list[str] = []
        if decision:
            special, dropped = self.chaos.damage(decision, ds, indices, spec.mixed)
            if decision.missing_fields:
                headers = headers + [
                    ("X-Chaos-Applied", "missingFields"),
                    ("X-Chaos-Description", "Missing fields: " + (", ".join(dropped) or "none applicable")),
                ]
        next_cursor = f'"{spec.next_cursor}"' if spec.next_cursor else "null"
        tail = (
            f'],"pagination":{{"limit":{spec.limit},'
            f'"hasMore":{"true" if spec.has_more else "false"},"cursorExpiresIn":{spec.cursor_expires_in},'
            f'"nextCursor":{next_cursor}}},"meta":{{"total":{len(ds)},"returned":{len(indices)},'
            f'"requestId":"{spec.request_id}"}}}}'
        ).encode()
        reply = Reply(200, b"", headers, request_id=spec.request_id, delay=delay, route=route)
        static = None if special or first != spec.start else ds.static_range(spec.view, first, spec.end)
        if static is None:
            reply.body = b'{"data":[' + ",".join(ds.render(indices, spec.mixed, special)).encode() + tail
        else:
            head = self.pages.take(*static, spec.mixed, req.gzip)
            reply.body = head.text + tail
            reply.gzipped = head.finish(tail) if head.deflate else None
        ahead = ds.static_range(spec.view, spec.end, min(spec.hi, spec.end + spec.limit)) if spec.has_more else None
        if ahead:
            self.pages.schedule(*ahead, spec.mixed, req.gzip)
        if decision:
            self.apply_body_fault(decision, reply)
            reply.delay += decision.slow / self.scale
            self.count_faults(decision)
        if reply.body_ok and req.method != "HEAD":
            with self._lock:
                self.events_served += len(indices)
        return reply

    def apply_body_fault(self, decision: Decision, reply: Reply) -> None:
        kind = decision.body_fault
        if kind == "truncate" and len(reply.body) >= self.chaos.params.truncate_min_bytes:
            reply.body = faults.truncate(reply.body, decision.rng)
        elif kind == "empty200":
            reply.body = faults.empty_body(decision.rng)
        elif kind == "reset":
            reply.reset_at = decision.rng.uniform(0.0, 0.5)
        else:
            return
        decision.kinds.append(kind)
        reply.body_ok = False
        reply.gzipped = None

    def count_faults(self, decision: Decision) -> None:
        with self._lock:
            self.counters["faults"].update(decision.kinds)

    def close(self) -> None:
        self.pages.close()

    def server_error(self, status: int, headers: list[tuple[str, str]], route: str) -> Reply:
        if status in (502, 504):
            return Reply(status, alb_page(status), content_type="text/html", alb=True, route=route)
        code = "INTERNAL_ERROR" if status == 500 else "SERVICE_UNAVAILABLE"
        return self.error(status, code, "An unexpected error occurred" if status == 500 else
                          "Service temporarily unavailable", headers)

    # -- token flow ----------------------------------------------------------------------

    def stream_access(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        if isinstance(auth, Reply):
            return auth
        key, _ = auth
        host = req.headers.get("Host") or ""
        if self.config.require_dashboard_signal and not has_dashboard_signal(req.headers, host, key):
            return self.error(403, "DASHBOARD_REQUIRED", "Stream access is only available from the dashboard",
                              hint="Open the dashboard to access the event stream")
        if self.config.rate_limits:
            state = self.stream_window.hit(key, req.now)
            if not state.allowed:
                return self.too_many(state, standard=False, retry_after=False)
        if self.chaos_on:
            decision = self.chaos.decide(page=False, may_duplicate=False)
            if decision.status:
                self.count_faults(decision)
                return self.server_error(decision.status, [], "stream_access")
        token = secrets.token_hex(32)
        ttl = self.config.token_ttl / self.scale
        with self._lock:
            self.tokens = {t: v for t, v in self.tokens.items() if v[1] > req.now}
            self.tokens[token] = (key, req.now + ttl)
            self.tokens_issued += 1
            self.token_history.append(token)
        body = {
            "streamAccess": {"endpoint": FEED_PATH, "token": token, "expiresIn": duration_value(ttl, self.scale),
                             "tokenHeader": "X-Stream-Token"},
            "meta": {"generatedAt": iso_ms(int(req.now * 1000))},
        }
        return Reply(200, orjson.dumps(body))

    # -- small routes --------------------------------------------------------------------

    def event_by_id(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        if isinstance(auth, Reply):
            return auth
        key, via_query = auth
        headers: list[tuple[str, str]] = []
        if self.config.rate_limits:
            window = self.query_window if via_query else self.events_window
            state = window.hit(key, req.now)
            if not state.allowed:
                return self.too_many(state, standard=True, retry_after=True)
            headers = self.rate_headers(state)
        event_id = req.path.rsplit("/", 1)[1]
        data = self.data()
        index = data.find_id(event_id)
        if index is None:
            return self.error(404, "EVENT_NOT_FOUND", f"Event with id '{event_id}' not found", headers)
        item = data.render([index], mixed=False)[0]
        return Reply(200, b'{"data":%s}' % item.encode(), headers)

    def manifest(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        return auth if isinstance(auth, Reply) else Reply(200, orjson.dumps(MANIFEST))

    def internal_stats(self, req: Request) -> Reply:
        auth = self.authenticate(req)
        if isinstance(auth, Reply):
            return auth
        return Reply(200, orjson.dumps({**self.data().stats, "cache": self.cache.snapshot()}))

    def internal_health(self, req: Request) -> Reply:
        return Reply(200, orjson.dumps({"status": "healthy", "database": "connected", "cache": "connected",
                                        "timestamp": iso_ms(int(req.now * 1000))}))

    def health(self, req: Request) -> Reply:
        return Reply(200, b"OK", content_type="text/plain; charset=utf-8")

    def sim_stats(self, req: Request) -> Reply:
        return Reply(200, orjson.dumps(self.stats()))

    # The arrivals' truth and clock for a handle in another process (process.py).

    def sim_arrivals(self, req: Request) -> Reply:
        return Reply(200, arrivals_text(self.live.snapshot() if self.live else None),
                     content_type="text/plain; charset=utf-8")

    def sim_freeze(self, req: Request) -> Reply:
        return Reply(200, arrivals_text(self.live.freeze() if self.live else None),
                     content_type="text/plain; charset=utf-8")

    def sim_resume(self, req: Request) -> Reply:
        self.resume_arrivals()
        return Reply(200, b'{"resumed":true}')

    def unknown_api(self, req: Request) -> Reply:
        return self.error(404, "ENDPOINT_NOT_FOUND", f"Endpoint {req.method} {req.path} not found")

    def dashboard(self, req: Request) -> Reply:
        return Reply(200, DASHBOARD_HTML, content_type="text/html; charset=utf-8")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.counters["requests"]),
                "responses": dict(self.counters["responses"]),
                "rate_limited": self.rate_limited,
                "faults": dict(self.counters["faults"]),
                "events_served": self.events_served,
                "arrived": self.live.count if self.live else 0,
                "tokens_issued": self.tokens_issued,
                "cache": self.cache.snapshot(),
            }


# ---------------------------------------------------------------------------------------
# HTTP shell


def etag(body: bytes) -> str:
    digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
    return f'W/"{len(body):x}-{digest}"'


def wire_headers(reply: Reply, body: bytes, gzipped: bool, keep_alive: bool) -> bytes:
    """Status line and headers: Express-like for the app, bare ALB-like for load-balancer pages."""
    lines = [f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}"]
    if reply.alb:
        lines.append("Server: awselb/2.0")
    else:
        lines += ["X-Powered-By: Express", "Access-Control-Allow-Origin: *",
                  f"X-Request-ID: {reply.request_id or uuid.uuid4()}", f"ETag: {etag(reply.body)}"]
    lines += [f"{name}: {value}" for name, value in reply.headers]
    lines.append(f"Content-Type: {reply.content_type}")
    if gzipped:
        lines += ["Content-Encoding: gzip", "Vary: Accept-Encoding"]
    lines += [f"Content-Length: {len(body)}", f"Date: {formatdate(usegmt=True)}",
              "Connection: " + ("keep-alive" if keep_alive else "close")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: SimulatorApp) -> None:
        self.app = app
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except (OSError, ValueError):
            pass  # the connection was reset on purpose, or the client went away

    def do_GET(self) -> None:
        self.serve("GET")

    def do_HEAD(self) -> None:
        self.serve("HEAD")

    def do_POST(self) -> None:
        self.serve("POST")

    def serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        wants_gzip = self.server.app.config.gzip and "gzip" in (self.headers.get("Accept-Encoding") or "")
        req = Request(method, url.path, query, self.headers, time.time(), body, wants_gzip)
        reply = self.server.app.dispatch(req)
        payload = reply.body
        gzipped = bool(payload and wants_gzip)
        if gzipped:
            payload = reply.gzipped or zlib.compress(payload, GZIP_LEVEL, wbits=31)
        head = wire_headers(reply, payload, gzipped, not self.close_connection)
        if reply.delay > 0 and self.server.stopping.wait(reply.delay):
            self.close_connection = True
            return
        if reply.reset_at is not None:
            self.reset(head + payload[: int(len(payload) * reply.reset_at)])
            return
        self.wfile.write(head if method == "HEAD" else head + payload)

    def reset(self, partial: bytes) -> None:
        """Send part of the response, then abort the TCP connection (RST, not FIN)."""
        self.wfile.write(partial)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.rfile.close()
        self.connection.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a crawl makes thousands of requests; counters live in `/_sim/stats`."""


# ---------------------------------------------------------------------------------------
# In-process handle


class Simulator:
    """A running simulator in this process (a background thread). Also a context manager.

    With live arrivals (`arrival_rate > 0`), `truth()` is a snapshot, taken at one instant
    under the lock that publishes arrivals; `truth().clock` is the model time of that instant.
    It guarantees:

    * every event in it was servable when it was taken: any page built after `truth()`
      returned can see all of them (an `/events` cache HIT, though, replays a page built up
      to `cache_ttl` earlier);
    * no other event was: whatever arrives afterwards has a timestamp >= `clock`, so it sorts
      above every event of the snapshot and a walk down from any of them never meets it. A
      walk from the top begun before the call yields a subset of the snapshot (the events
      servable at its first page), one begun after it a superset;
    * while arrivals are frozen nothing arrives: `truth()` stays what `freeze_arrivals()`
      returned, and a full walk from the top yields exactly its storable ids (plus the
      unstorable events it counts).

    `freeze_arrivals()` arrives up to now, stops the model clock and returns the truth of that
    instant; `resume_arrivals()` runs the clock on from there (the frozen stretch is skipped,
    not caught up: no burst follows, and timestamps stay at arrival time). With a static
    dataset both are no-ops and `truth()` never changes.
    """

    def __init__(self, config: SimulatorConfig, app: SimulatorApp, server: _Server) -> None:
        self.config, self.app, self._server = config, app, server
        host, port = server.server_address[:2]
        self.host, self.port = str(host), int(port)
        self.base_url = f"http://{self.host}:{self.port}{API}"
        self.api_key = config.api_keys[0]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="simulator", daemon=True)
        self._thread.start()

    def truth(self) -> Truth:
        return self.app.truth()

    def freeze_arrivals(self) -> Truth:
        return self.app.freeze_arrivals()

    def resume_arrivals(self) -> None:
        self.app.resume_arrivals()

    def stats(self) -> dict[str, Any]:
        return self.app.stats()

    def issued_tokens(self) -> list[str]:
        """Every stream token handed out so far (tests check none of them leaks)."""
        return list(self.app.token_history)

    def stop(self) -> None:
        server = self._server
        if server.stopping.is_set():
            return
        server.stopping.set()
        server.shutdown()
        with server.connections_lock:
            for conn in list(server.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        server.server_close()
        self.app.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_simulator(config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                    dataset: Dataset | None = None) -> Simulator:
    """Build the dataset (or reuse one built from the same config) and serve it in a thread."""
    config = config or SimulatorConfig()
    app = SimulatorApp(config, dataset or Dataset.build(config))
    return Simulator(config, app, _Server((host, port), app))
