"""Fetching Stripe lists completely and fast: a shared rate budget, retries, and split `created` windows.

A table is fetched by windows over `created`. The first page tells whether the table is small
(done) or large; a large table starts as one window, and every idle worker splits the busiest
window in two at the middle of its remaining time range, so work spreads over the workers
without knowing the table's size. Windows never overlap and always cover everything (the
oldest window is unbounded below), and rows are merged by id.

Where the account's limit is above the per-endpoint limit (live mode), the Search API is a
second lane: Stripe counts `GET /v1/charges/search` as another endpoint, with its own limit (20/s
shared by every search endpoint, and counted against the account's). A window that has not
started yet goes to whichever lane of its table is less busy for its rate; search only takes
windows whose newest possible object is older than Stripe's indexing delay plus a margin, in
parts of about `Windowing.search_pages` pages, fewer near the end of a load (a search window is
never split: its `page` token holds its query). Search answers are the same objects as list
answers, so rows merge by id as before; a search window that fails (no search in the region, a
key without it, errors beyond retries, a wrong-shape answer) goes back to the list lane whole,
and no row is lost or doubled.

Workers go to the table furthest behind its share of the time left (its pages over the load's
least possible end), and each lane (and the account) gets about as many requests in flight as
its rate needs at the measured answer time: the account's budget is then spent where the load's
end is decided, and no table is left for last. A whole load (`tables()`, a full sync) types each
table's columns every `PART_ROWS` rows while the rest is still in flight, so that little is left
to do after the last page.

Nothing waits forever: each attempt has a connect and a read timeout, a call may have a
deadline, a page that would not move the cursor forward stops the fetch, and an answer that is
not a Stripe list (HTML, cut-off JSON, missing fields) is a `BadAnswer` saying what came back.
"""
from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from email.utils import parsedate_to_datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import orjson
import requests
import stripe
from urllib3 import exceptions as urllib3_errors

from mbi_widgets.errors import MbiError
from mbi_widgets.ratelimits import SEARCH_ENDPOINT, RateLimits, TokenBucket
from mbi_widgets.redaction import redact
from mbi_widgets.tables.collector import collector_paused
from mbi_widgets.tables.http import DEFAULT_MAXSIZE, PooledHTTPClient
from mbi_widgets.tables.shape import ShapeError

#: Lower bound for splitting when an account's creation date is unknown (Stripe's launch year).
STRIPE_EPOCH = 1_293_840_000
#: Windows narrower than this (seconds) are not split further.
MIN_SPLIT_SPAN = 2
#: Requests a budget may send back to back after a pause (Stripe's own buckets hold a second's worth).
BURST = 2
#: Extra windows a large table starts with, besides the one its first page opened.
INITIAL_SPLITS = 15
#: A window is split only when it is estimated to hold at least this many more objects, so
#: that splitting saves more requests than it costs (each new window costs a partial page).
MIN_SPLIT_OBJECTS = 200
#: Seconds to wait for a connection to Stripe, and for its answer once connected (stripe-python waits 80 s).
#: Stripe's list calls answer within a few seconds; a silent server is not waited on for minutes.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
#: `created` values beyond this (year 2286) are not Unix seconds: a wrong-shape answer, not a date.
MAX_CREATED = 10_000_000_000
#: How long a call with a deadline waits for requests still in flight before it gives up on them.
DEADLINE_GRACE = 1.0
#: Stripe makes new and changed objects searchable "in under 1 minute", and "up to an hour behind
#: during outages": search only takes windows whose objects are all older than this (seconds).
SEARCH_INDEXING_DELAY = 60
SEARCH_MARGIN = 3_540
SEARCH_DELAY = SEARCH_INDEXING_DELAY + SEARCH_MARGIN
#: Pages a search window is carved to (it cannot be split once started: a smaller one ends sooner).
SEARCH_PAGES = 8
#: Seconds Stripe usually takes to answer a page of 100 (a third of a second, more for large objects):
#: what a load assumes until it has measured answers of its own.
TYPICAL_ANSWER = 0.6
#: Rows a load that builds its frames as it goes (`Job(prebuild=True)`) turns into typed columns at a time.
PART_ROWS = 2_000
#: Requests in flight per lane, and in all, as a multiple of what the lane's (or the account's) rate
#: needs at the measured answer time: room for answers slower than average, not so much that every
#: lane queues on the account's budget (where the lane with the most work left would get no more than
#: its share of waiting threads).
IN_FLIGHT_HEADROOM = 1.35


def workers_for(limits: RateLimits) -> int:
    """Threads enough to keep the account's rate with answers of `TYPICAL_ANSWER` s (at least 16)."""
    return max(16, math.ceil(limits.per_account * TYPICAL_ANSWER))


@dataclass(frozen=True)
class Windowing:
    """How tables are cut into `created` windows; the defaults suit Stripe (tests shrink them).

    `page_size` is each request's `limit`; a large table starts with `initial_splits` extra
    windows; a window is split while it holds at least `min_split_objects` more objects; a search
    window is carved to about `search_pages` pages; `tables()` types every `part_rows` rows of a
    table into columns as they come.
    """

    page_size: int = 100
    initial_splits: int = INITIAL_SPLITS
    min_split_objects: int = MIN_SPLIT_OBJECTS
    search_pages: int = SEARCH_PAGES
    part_rows: int = PART_ROWS

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 100:
            raise ValueError(f"page_size is Stripe's limit, 1 to 100, not {self.page_size!r}")
        if self.initial_splits < 0 or self.min_split_objects < 1 or self.search_pages < 1 or self.part_rows < 1:
            raise ValueError("initial_splits >= 0, min_split_objects >= 1, search_pages >= 1 and part_rows >= 1")


class StripeSourceError(MbiError):
    """Fetching from Stripe failed; the message says what to do next."""


class FetchError(StripeSourceError):
    """Fetching stopped before a table was complete (retries ran out, the deadline passed, the cursor
    did not advance): raised instead of returning a silently short table. `cursor` is the request's
    parameters, `code` says which (`unavailable`, `rate_limit`, `deadline_exceeded`, `stuck_cursor`, ...)."""

    def __init__(self, message: str, *, table: str, cursor: Mapping[str, Any], code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.table, self.cursor = table, dict(cursor)


class BadAnswer(FetchError):
    """The server's answer was not what Stripe sends (HTML, cut-off JSON, a list without `data`, an
    object without `id`): a proxy, an outage page or a server that is not Stripe. Code `bad_answer`."""


class AuthenticationFailed(StripeSourceError):
    """Stripe rejected the key or token (revoked, deauthorized, mistyped): re-authenticate."""


class PermissionDenied(StripeSourceError):
    """The key lacks a permission (a restricted key without read access to a resource)."""


class RequestRejected(StripeSourceError):
    """Stripe answered 400/404: a bug or an API version mismatch, never retried."""


class NotFound(RequestRejected):
    """Stripe answered 404 `resource_missing`: the object does not exist (or was deleted)."""


class RateBudget:
    """Paces requests to one account's limits; shared by every table fetched from that account.

    Requests are spaced evenly, with room for one extra request so that a thread waking a little
    late does not lose its slot for good (`BURST`); bursts never trip Stripe's limiter. A 429
    still slows the pace down for a while (multiplicative decrease, additive recovery).
    Each endpoint has its own bucket at its own limit (`SEARCH_ENDPOINT`: one bucket for every
    search endpoint), and every request also takes from the account's bucket.
    """

    _registry: dict[tuple[str, str], "RateBudget"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._account = TokenBucket(limits.per_account, capacity=BURST)
        self._endpoints: dict[str, TokenBucket] = {}
        self._scale = 1.0

    @classmethod
    def shared(cls, identity: tuple[str, str], limits: RateLimits) -> "RateBudget":
        """The process-wide budget of one account (identity: API base and account or key fingerprint)."""
        with cls._registry_lock:
            budget = cls._registry.get(identity)
            if budget is None or budget.limits != limits:
                budget = cls._registry[identity] = cls(limits)
            return budget

    def acquire(self, endpoint: str) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                bucket = self._endpoints.get(endpoint)
                if bucket is None:
                    bucket = self._endpoints[endpoint] = TokenBucket(self.limits.for_endpoint(endpoint) * self._scale,
                                                                     capacity=BURST)
                wait = max(self._account.wait_time(now), bucket.wait_time(now))
                if wait == 0:
                    self._account.take(now)
                    bucket.take(now)
                    return
            time.sleep(wait)

    def rate_limited(self) -> None:
        with self._lock:
            self._scale = max(0.2, self._scale * 0.7)
            self._apply()

    def succeeded(self) -> None:
        if self._scale < 1.0:
            with self._lock:
                self._scale = min(1.0, self._scale + 0.02)
                self._apply()

    def _apply(self) -> None:
        self._account.rate = self.limits.per_account * self._scale
        for endpoint, bucket in self._endpoints.items():
            bucket.rate = self.limits.for_endpoint(endpoint) * self._scale


@dataclass
class RetryPolicy:
    """How hard to try before giving up on a page."""

    max_transient: int = 6
    max_rate_limited: int = 20
    #: Attempts of a page that ended in a timeout, beyond the first, before giving up: a server that
    #: stayed silent for a whole read timeout three times running is not about to answer.
    max_timeouts: int = 2
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class Timeouts:
    """How long to wait, in seconds: for a connection and for an answer (each attempt), and for a
    whole call such as `table()` (`deadline`; None: no limit beyond the timeouts and retries)."""

    connect: float = CONNECT_TIMEOUT
    read: float = READ_TIMEOUT
    deadline: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "deadline"):
            value = getattr(self, name)
            if value is None and name == "deadline":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")

    @classmethod
    def coerce(cls, timeout: "float | tuple[float, float] | None", deadline: float | None) -> "Timeouts":
        """From `timeout` as requests takes it (seconds, or (connect, read)) and a deadline."""
        if timeout is None:
            return cls(deadline=deadline)
        if isinstance(timeout, tuple):
            if len(timeout) != 2:
                raise ValueError(f"timeout must be seconds or a (connect, read) pair, not {timeout!r}")
            return cls(timeout[0], timeout[1], deadline)
        return cls(timeout, timeout, deadline)

    def http_client(self, connections: int = 0) -> stripe.HTTPClient:
        """A pooled urllib3 client with these timeouts instead of stripe-python's 80 s, shared by a source's
        workers (stripe.RequestsClient spends about twice the CPU per page), keeping at least `connections`
        connections per host open."""
        return PooledHTTPClient(timeout=(self.connect, self.read), maxsize=max(DEFAULT_MAXSIZE, connections))


@dataclass(frozen=True)
class NotJson:
    """An answer body that did not parse as JSON, described for the error message (never quoted:
    a body can hold anything)."""

    description: str


def _not_json(body: bytes, headers: Mapping[str, str] | None, error: orjson.JSONDecodeError) -> NotJson:
    content_type = str((headers or {}).get("Content-Type") or (headers or {}).get("content-type") or "").lower()
    text = body.lstrip()[:64].lower()
    if not text:
        return NotJson("an empty answer")
    if "html" in content_type or text.startswith(b"<"):
        return NotJson("an HTML page, not JSON (a proxy, a firewall or an outage page? check api_base)")
    if "not valid UTF-8" in str(error):
        return NotJson("bytes that are not UTF-8 text (binary, or wrongly compressed?)")
    if "unexpected end of data" in str(error):
        return NotJson(f"JSON cut off after {len(body)} bytes (the connection dropped mid-answer?)")
    return NotJson(f"{len(body)} bytes that are not JSON ({content_type or 'no content type'})")


class Transport:
    """GET requests through a `stripe.StripeClient`, returning parsed JSON (or `NotJson`).

    Uses the client's raw requestor so that bodies are parsed once with orjson instead of into
    StripeObjects; the client's key, base address and HTTP client are used as they are.
    """

    def __init__(self, client: stripe.StripeClient, account: str | None) -> None:
        self.client = client
        self.account = account

    @property
    def secret(self) -> str:
        """The client's key, only to mask it in server-provided text."""
        return self.client._requestor.api_key or ""  # noqa: SLF001

    def get(self, path: str, params: Mapping[str, Any]) -> tuple[int, Any, Mapping[str, str]]:
        options: dict[str, Any] = {"stripe_account": self.account} if self.account else {}
        try:
            body, status, headers = self._send(path, dict(params), options)
        except UnicodeDecodeError:  # stripe-python's own logging decodes bodies, and fails on bytes that are not text
            return 0, NotJson("bytes that are not UTF-8 text (binary, or wrongly compressed?)"), {}
        try:
            return status, orjson.loads(body), headers
        except orjson.JSONDecodeError as exc:
            return status, _not_json(bytes(body), headers, exc), headers

    def _send(self, path: str, params: dict[str, Any], options: dict[str, Any]) -> tuple[Any, int, Mapping[str, str]]:
        """One GET through the client's requestor and HTTP client: the body as bytes, status, headers.

        `request_raw` is the same two steps plus logging, and its debug line decodes and `repr`s the
        whole body whether or not anything logs it (half a millisecond per page of 100 objects, at
        100 pages/s). Should a stripe-python version drop either private step, `request_raw` does.
        """
        requestor = self.client._requestor  # noqa: SLF001 - the stable raw path
        prepare = getattr(requestor, "_args_for_request_with_retries", None)
        if prepare is None:
            body, status, headers = requestor.request_raw("get", path, params=params, options=options,
                                                          base_address="api", api_mode="V1")
            return body, status, headers
        method, url, headers, post_data, retries, usage, _, _ = prepare(
            "get", path, params, options, base_address="api", api_mode="V1")
        return requestor._get_http_client().request_with_retries(  # noqa: SLF001
            method, url, headers, post_data, max_network_retries=retries, _usage=usage)


def _error_message(payload: Any) -> str:
    """What an error answer says: Stripe's `error.message`, or what the body was instead."""
    if isinstance(payload, NotJson):
        return f"the server answered {payload.description}"
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        message = payload["error"].get("message")
        return str(message) if message else f"an error without a message ({payload['error'].get('type') or 'no type'})"
    return f"the server answered a JSON {_kind(payload)} without Stripe's `error` object"


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


def _timed_out(exc: BaseException) -> bool:
    """Whether a network error was a timeout (stripe-python wraps requests' or urllib3's exception)."""

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, urllib3_errors.NewConnectionError):
            return False  # refused or unreachable: urllib3 files it under its connect timeouts
        if isinstance(cause, (requests.Timeout, urllib3_errors.TimeoutError, TimeoutError)):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _network_error(exc: stripe.StripeError, timeouts: Timeouts) -> str:
    """A network failure in a few words (stripe-python's own text asks to contact Stripe support)."""

    cause = exc.__cause__
    # A refused connection is a NewConnectionError, which urllib3 derives from its ConnectTimeoutError.
    if isinstance(cause, urllib3_errors.NewConnectionError):
        return f"the connection failed or dropped ({type(cause).__name__})"
    if isinstance(cause, (requests.ConnectTimeout, urllib3_errors.ConnectTimeoutError)):
        return f"no connection within {timeouts.connect:g} s"
    if isinstance(cause, (requests.ReadTimeout, urllib3_errors.ReadTimeoutError)):
        return f"no answer within {timeouts.read:g} s"
    if isinstance(cause, (requests.ConnectionError, urllib3_errors.ProtocolError, urllib3_errors.ProxyError,
                          urllib3_errors.SSLError)):
        return f"the connection failed or dropped ({type(cause).__name__})"
    if cause is not None:
        return f"{type(cause).__name__}"
    return f"{type(exc).__name__}"


# --- what a well-formed answer looks like ---------------------------------------------------------

def _list_problem(payload: Any, *, dated: bool, created: Any = None) -> str | None:
    """What is wrong with a list page, or None. Checks every object's id (cheap next to parsing);
    `created` is the request's filter, which the first and last objects must fall within."""
    if not isinstance(payload, dict):
        return f"the answer is a JSON {_kind(payload)}, not a list object"
    data, has_more = payload.get("data"), payload.get("has_more")
    if not isinstance(data, list):
        return "the answer has no `data` list" if data is None else f"its `data` is a JSON {_kind(data)}, not an array"
    if not isinstance(has_more, bool):
        return ("the answer has no `has_more` flag" if has_more is None
                else f"its `has_more` is a JSON {_kind(has_more)}, not true or false")
    for index, obj in enumerate(data):
        problem = _object_problem(obj, dated=dated)
        if problem:
            return f"data[{index}] {problem}"
    if dated and data and isinstance(created, Mapping):
        lowest, highest = created.get("gte"), created.get("lt")
        for obj in (data[0], data[-1]):
            if (lowest is not None and obj["created"] < lowest) or (highest is not None and obj["created"] >= highest):
                return (f"it holds objects created outside the requested range {dict(created)}: the server ignores "
                        "the `created` filter")
    return None


def _search_problem(payload: Any, created: Mapping[str, int]) -> str | None:
    """What is wrong with a search page, or None. Stripe does not document the order of search
    results, so every object is checked against the query's range (two comparisons each)."""
    problem = _list_problem(payload, dated=True)
    if problem:
        return problem
    next_page = payload.get("next_page")
    if payload["has_more"] and (not isinstance(next_page, str) or not next_page):
        return "it says more results follow but has no `next_page` token"
    lowest, highest = created.get("gte"), created.get("lt")
    for obj in payload["data"]:
        if (lowest is not None and obj["created"] < lowest) or (highest is not None and obj["created"] >= highest):
            return (f"it holds objects created outside the range the query asked for {dict(created)}: the server "
                    "ignores the query")
    return None


def _object_problem(obj: Any, *, dated: bool) -> str | None:
    """What is wrong with one object, or None."""
    if not isinstance(obj, dict):
        return f"is a JSON {_kind(obj)}, not an object"
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id:
        return "has no `id`"
    if dated:
        created = obj.get("created")
        if isinstance(created, bool) or not isinstance(created, int) or not 0 <= created < MAX_CREATED:
            return "has no `created` time in Unix seconds"
    return None


def _bad_answer(table: str, path: str, params: Mapping[str, Any], problem: str) -> BadAnswer:
    return BadAnswer(f"The answer for {table} at {path} with {dict(params)} is not what Stripe sends: {problem}. "
                     "Nothing was returned so that no table is silently short. Check api_base (is it Stripe, or "
                     "a proxy in between?) and try again; if it persists, report it with the table.",
                     table=table, cursor=params, code="bad_answer")


def next_cursor(table: str, path: str, params: Mapping[str, Any], data: list[dict], has_more: bool,
                seen: set[str]) -> str | None:
    """The id to continue after, or None when the list is complete.

    Stripe's cursor always moves to older objects, so the last id of a page never comes back:
    a page that repeats one (`seen` holds every page's last id) or is empty while saying
    `has_more` would be fetched forever, and stops the fetch instead.
    """
    if not has_more:
        return None
    if not data:
        raise FetchError(f"The server answered an empty page of {table} that says more follow (at {path} with "
                         f"{dict(params)}); stopped instead of asking forever. Check api_base (is it Stripe?); "
                         "if it persists, report it with the table and cursor.",
                         table=table, cursor=params, code="stuck_cursor")
    last = data[-1]["id"]
    if last in seen:
        raise FetchError(f"The server answered a page of {table} it had already sent (at {path} with {dict(params)}"
                         f"; the cursor stays at {last[:80]!r} although has_more is true); stopped instead of looping "
                         "forever. Check api_base (is it Stripe?); if it persists, report it with the table and "
                         "cursor.", table=table, cursor=params, code="stuck_cursor")
    seen.add(last)
    return last


@dataclass
class FetchStats:
    """What a fetch cost: requests sent, retries, and how the work was split."""

    requests: int = 0
    rate_limited: int = 0
    retried: int = 0
    windows: int = 0
    child_requests: int = 0
    seconds: float = 0.0
    #: Requests per endpoint; every search endpoint counts as `SEARCH_ENDPOINT`, as Stripe counts them.
    by_endpoint: dict[str, int] = field(default_factory=dict)
    #: Search windows that failed and went back to the list lane.
    search_fallbacks: int = 0

    def floor_seconds(self, limits: RateLimits) -> float:
        """The least time these requests could take under `limits` (the rate-limit ceiling)."""
        searches = self.by_endpoint.get(SEARCH_ENDPOINT, 0)
        busiest = max((count for endpoint, count in self.by_endpoint.items() if endpoint != SEARCH_ENDPOINT),
                      default=0)
        return max(self.requests / limits.per_account, busiest / limits.per_endpoint, searches / limits.per_search)


class Fetcher:
    """One GET with retries under the shared budget; raises our errors, never a short result.

    Every attempt is bounded by the HTTP client's timeouts; the call as a whole by
    `timeouts.deadline`, counted from when the fetcher is made (one fetcher per call).
    """

    def __init__(self, transport: Transport, budget: RateBudget, retry: RetryPolicy,
                 cancelled: Callable[[], bool] = lambda: False, *, timeouts: Timeouts | None = None) -> None:
        self.transport, self.budget, self.retry, self.cancelled = transport, budget, retry, cancelled
        self.timeouts = timeouts or Timeouts()
        #: time.monotonic() after which no request is started (None: no deadline).
        self.deadline = None if self.timeouts.deadline is None else time.monotonic() + self.timeouts.deadline
        self.stats = FetchStats()
        self._stats_lock = threading.Lock()
        #: The request each thread is waiting on, to say where a call stood when its deadline passed.
        self._in_flight: dict[int, tuple[str, str, Mapping[str, Any]]] = {}
        #: Stripe's clock (Unix seconds) from the `Date` header of the latest answer.
        self.server_time: int | None = None
        #: Seconds a successful answer takes, a moving average (None until the first one).
        self.answer_time: float | None = None

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def list(self, table: str, path: str, params: Mapping[str, Any], endpoint: str | None = None, *,
             dated: bool = True) -> tuple[list[dict], bool]:
        """One page of a list: its objects (each with an `id`, and a `created` time when `dated`) and `has_more`."""
        payload = self.get(table, path, params, endpoint)
        problem = _list_problem(payload, dated=dated, created=params.get("created"))
        if problem:
            raise _bad_answer(table, path, params, problem)
        return payload["data"], payload["has_more"]

    def search(self, table: str, path: str, params: Mapping[str, Any], *,
               created: Mapping[str, int]) -> tuple[list[dict], bool, str | None]:
        """One page of a search: its objects (each created within `created`: gte, lt), `has_more`, `next_page`."""
        payload = self.get(table, path, params, SEARCH_ENDPOINT)
        problem = _search_problem(payload, created)
        if problem:
            raise _bad_answer(table, path, params, problem)
        return payload["data"], payload["has_more"], payload.get("next_page")

    def object(self, table: str, path: str, params: Mapping[str, Any], endpoint: str | None = None) -> dict:
        """One object by id: a dict with an `id` (and a `created` time unless it says it was deleted)."""
        payload = self.get(table, path, params, endpoint)
        dated = not (isinstance(payload, dict) and payload.get("deleted") is True)
        problem = _object_problem(payload, dated=dated)
        if problem:
            raise _bad_answer(table, path, params, f"the object {problem}")
        return payload

    def get(self, table: str, path: str, params: Mapping[str, Any], endpoint: str | None = None) -> Any:
        transient = rate_limited = timeouts = 0
        last_error = ""
        while True:
            self._check_running(table, path, params)
            self.budget.acquire(endpoint or path)
            self._started(table, path, params, endpoint or path)
            sent = time.monotonic()
            try:
                status, payload, headers = self.transport.get(path, params)
            except stripe.StripeError as exc:  # connection refused, reset, dropped mid-body, timeout
                status, payload, headers = 0, None, None
                last_error = _network_error(exc, self.timeouts)
                if _timed_out(exc):
                    timeouts += 1
            finally:
                self._finished()
            self._clock(headers)  # every answer, errors too, says what time it is at Stripe
            if status == 200 and not isinstance(payload, NotJson):
                self.budget.succeeded()
                self._answered(time.monotonic() - sent)
                return payload
            if status == 429:
                rate_limited += 1
                self._count(rate_limited=1)
                self.budget.rate_limited()
                if rate_limited > self.retry.max_rate_limited:
                    raise FetchError(f"Stripe kept rate-limiting requests for {table} ({rate_limited} times at "
                                     f"{path} {dict(params)}); nothing was returned so that no table is silently "
                                     "short. Try again later or lower the rate limits.",
                                     table=table, cursor=params, code="rate_limit")
                self._pause(self.retry.delay(min(rate_limited, 5)), table, path, params)
                continue
            # A 200 whose body is not JSON was almost always cut off by a dropped connection: retried too.
            if status in (0, 200) or status >= 500:
                transient += 1
                self._count(retried=1)
                if status or isinstance(payload, NotJson):
                    last_error = (f"HTTP {status}: " if status else "") + self._scrub(_error_message(payload))
                if transient > self.retry.max_transient or timeouts > self.retry.max_timeouts:
                    raise FetchError(f"could not fetch {table} at {path} with {dict(params)} after {transient} "
                                     f"attempts (last error: {last_error}); nothing was returned so that no table "
                                     "is silently short. Check the network, api_base or Stripe's status, then try "
                                     "again.", table=table, cursor=params, code="unavailable")
                self._pause(self.retry.delay(transient - 1), table, path, params)
                continue
            raise self._refusal(table, status, payload)

    def _refusal(self, table: str, status: int, payload: Any) -> StripeSourceError:
        """The error for an answer that is not retried (401, 403, 404, other 4xx)."""
        message = self._scrub(_error_message(payload))
        if status == 401:
            return AuthenticationFailed(f"Stripe rejected the credentials while reading {table}: {message} "
                                        "Re-authenticate the connection (or create a new restricted key).",
                                        code="authentication_failed")
        if status == 403:
            return PermissionDenied(f"The key may not read {table}: {message} Grant read access to it in the "
                                    "Stripe dashboard (Developers > API keys), or use another key.",
                                    code="permission_denied")
        error = payload.get("error") if isinstance(payload, dict) else None
        if status == 404 and isinstance(error, dict) and error.get("code") == "resource_missing":
            return NotFound(f"Stripe has no such object for {table}: {message}", code="resource_missing")
        return RequestRejected(f"Stripe refused the request for {table} ({status}): {message}", code=str(status))

    def _scrub(self, text: str) -> str:
        """Server-provided text with our own key masked (a proxy or a test server may echo it)."""
        key = self.transport.secret
        return text.replace(key, redact(key)) if key and key in text else text

    def _check_running(self, table: str, path: str, params: Mapping[str, Any]) -> None:
        if self.cancelled():
            raise StripeSourceError(f"fetching {table} was cancelled", code="cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.deadline_error(table, path, params)

    def _pause(self, seconds: float, table: str, path: str, params: Mapping[str, Any]) -> None:
        """Sleeps before a retry, but never past the deadline."""
        if self.deadline is not None:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        time.sleep(seconds)
        self._check_running(table, path, params)

    def _started(self, table: str, path: str, params: Mapping[str, Any], endpoint: str) -> None:
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.by_endpoint[endpoint] = self.stats.by_endpoint.get(endpoint, 0) + 1
            self._in_flight[threading.get_ident()] = (table, path, params)

    def _finished(self) -> None:
        with self._stats_lock:
            self._in_flight.pop(threading.get_ident(), None)

    def _answered(self, seconds: float) -> None:
        """Folds one answer's time into `answer_time` (a fifth of the way: a few answers follow a change)."""
        with self._stats_lock:
            previous = self.answer_time
            self.answer_time = seconds if previous is None else previous + (seconds - previous) * 0.2

    def deadline_error(self, table: str | None = None, path: str | None = None,
                       params: Mapping[str, Any] | None = None) -> FetchError:
        """The error for a call that ran out of time; names a request in flight when none is given."""
        if table is None:
            with self._stats_lock:
                table, path, params = next(iter(self._in_flight.values()), ("the tables", "", {}))
        where = f" (at {path} with {dict(params or {})})" if path else ""
        return FetchError(f"fetching {table} did not finish within the deadline of {self.timeouts.deadline:g} s"
                          f"{where}; nothing was returned so that no table is silently short. Give a longer "
                          "deadline (StripeSource(..., deadline=seconds) or None) or fewer tables, or check the "
                          "network.", table=table, cursor=params or {}, code="deadline_exceeded")

    def _clock(self, headers: Mapping[str, str] | None) -> None:
        value = None
        if headers:
            value = headers.get("Date") or headers.get("date")
        if not value:
            return
        try:
            moment = int(parsedate_to_datetime(value).timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        with self._stats_lock:
            self.server_time = max(self.server_time or moment, moment)


@dataclass
class Window:
    """A range of `created` still to fetch: lo <= created < hi, continuing after `after` (list lane)
    or from `page` (search lane). `lane` is None until a worker takes the window and picks one."""

    table: str
    lo: int | None
    hi: int | None
    after: str | None = None
    lane: str | None = None
    #: The search lane's `next_page` token.
    page: str | None = None
    #: `created` of the last object fetched: what remains lies in [lo, top].
    top: int | None = None
    pages: int = 0
    busy: bool = False
    done: bool = False
    #: Objects per second of `created`, measured on the last full page.
    density: float = 0.0
    #: The last id (list) or token (search) of every page so far: one that comes back means no progress.
    seen: set[str] = field(default_factory=set)

    def span(self, floor: int) -> int:
        if self.top is None:
            return 0
        return self.top - (self.lo if self.lo is not None else floor)

    def remaining(self, floor: int) -> float:
        """Estimated objects left, assuming the density seen so far."""
        return self.density * self.span(floor)

    def observe(self, data: list[dict]) -> None:
        if len(data) >= 2:
            self.density = len(data) / max(1, data[0]["created"] - data[-1]["created"])


def endpoint_pattern(path: str) -> str:
    """The endpoint a child-list path counts against: `/v1/invoices/in_1/lines` is `/v1/invoices/*/lines`.

    Stripe counts every parent's child list as one endpoint with one per-endpoint limit, so the
    budget must too (one bucket per parent would let requests run far past 25/s and draw 429s).
    """
    parts = path.split("?", 1)[0].split("/")
    if len(parts) == 5 and parts[1] == "v1":  # "", "v1", parent, id, kind
        parts[3] = "*"
    return "/".join(parts)


@dataclass
class ChildTask:
    """Remaining entries of one parent's embedded list, fetched from the child endpoint."""

    table: str
    parent_id: str
    path: str
    params: dict[str, Any]
    after: str | None
    parent_order: tuple[int, str]
    position: int
    busy: bool = False
    done: bool = False
    seen: set[str] = field(default_factory=set)


@dataclass
class Collected:
    """Rows of one table, keyed by id so that overlapping pages never duplicate a row.

    A load that builds frames as it goes (`Job(prebuild=True)`) turns every `PART_ROWS` rows into a
    part of typed columns (`parts`, with their ids) and keeps only the rows since in `rows`.
    """

    rows: dict[str, Any] = field(default_factory=dict)
    #: Sort key per id ever stored: (created, id) for tables; (parent created, parent id, -position) for children.
    order: dict[str, tuple] = field(default_factory=dict)
    parts: list[tuple[list[str], Any]] = field(default_factory=list)

    def newest_first(self, ids: Any) -> list[str]:
        """`ids` newest first, like Stripe's lists; child rows in their parent's order, then list order."""
        return sorted(ids, key=self.order.__getitem__, reverse=True)

    def sorted_rows(self) -> list[Any]:
        """The rows not in a part yet, newest first."""
        return [self.rows[i] for i in self.newest_first(self.rows)]


class Job:
    """Fetches several tables concurrently with one pool of workers and one budget.

    `search_delay` (seconds) turns the search lane on for plans with a `search_path`: it takes
    windows whose objects were all created longer ago than that, by Stripe's clock (None: off).

    Workers go first to the table furthest behind its share of the time left (`_next_window`), and
    no lane is given many more requests in flight than its rate needs at the measured answer
    time, nor the account in all (`IN_FLIGHT_HEADROOM`): otherwise every lane's threads queue on
    the account's budget and the longest table gets only its share of them. With `prebuild`, a table's frame is built as soon as the table is complete, while
    the others are still being fetched (`frame()` then returns it).
    """

    def __init__(self, *, fetcher: Fetcher, plans: list["TablePlan"], workers: int, floor: Callable[[], int],
                 progress: Callable[[int, int | None], None] | None,
                 table_progress: Callable[[str, int], None] | None = None,
                 windowing: Windowing | None = None, search_delay: float | None = None,
                 prebuild: bool = False, known_floor: int | None = None) -> None:
        self.fetcher, self.plans, self.workers, self._floor_fn = fetcher, {p.name: p for p in plans}, workers, floor
        self.windowing = windowing or Windowing()
        self.search_delay = search_delay
        #: Tables whose search failed (search stays off for them), or "*" for every table.
        self._search_off: set[str] = set()
        #: Windows being read per lane: each list endpoint, and `SEARCH_ENDPOINT` for every search.
        self._lane_busy: dict[str, int] = {}
        #: Parents whose long embedded list is already being paged (a window re-read must not page it twice).
        self._followed: set[tuple[str, str]] = set()
        self.progress = progress
        #: Rows collected so far per table (a warehouse sync's per-table progress bars).
        self.table_progress = table_progress
        self.collected: dict[str, Collected] = {}
        for plan in plans:
            self.collected[plan.name] = Collected()
            for child in plan.children:
                self.collected[child.name] = Collected()
        self._windows: list[Window] = []
        self._children: deque[ChildTask] = deque()
        self._probes: deque[str] = deque(p.name for p in plans if p.listed)
        self._busy = 0
        self._lock = threading.Condition()
        self._error: BaseException | None = None
        self._rows = 0
        #: Progress is reported by one worker at a time, in increasing order, ending at the total.
        self._progress_lock = threading.Lock()
        self._reported = 0
        #: The account's creation time (`floor()` asks Stripe; `known_floor` when the caller has it already).
        self._floor: int | None = known_floor
        #: Each child table's parent, and child-list tasks being fetched per parent table.
        self._parent_of = {child.name: plan.name for plan in plans for child in plan.children}
        self._child_busy: dict[str, int] = {plan.name: 0 for plan in plans}
        #: Tables whose first page is being fetched (their windows do not exist yet).
        self._probing: set[str] = set()
        #: Whether a worker should ask for the account's creation time (where the oldest windows start),
        #: and whether one has: asked for by the first large table read whole, and not waited on.
        self._floor_wanted = self._floor_asked = False
        #: Frames built while the load ran (`prebuild`), or the error building one raised, by table.
        self._prebuild = prebuild
        self._built: dict[str, Any] = {}
        self._building: set[str] = set()

    # --- scheduling ------------------------------------------------------------------------

    def run(self) -> dict[str, Collected]:
        started = time.perf_counter()
        threads = [threading.Thread(target=self._worker, name=f"mbi-fetch-{i}", daemon=True)
                   for i in range(self.workers)]
        with collector_paused():  # pages are short-lived and acyclic: no collector passes over them
            for thread in threads:
                thread.start()
            # With a deadline, a request stuck past it (a server trickling bytes) does not hold the call.
            end = None if self.fetcher.deadline is None else self.fetcher.deadline + DEADLINE_GRACE
            for thread in threads:
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            with self._lock:
                if self._error is None:
                    self._error = self.fetcher.deadline_error()
        self.fetcher.stats.seconds = time.perf_counter() - started
        if self._error is not None:
            raise self._error
        return self.collected

    def _worker(self) -> None:
        while True:
            with self._lock:
                task = self._next_task()
                while task is None:
                    if self._error is not None or self._finished():
                        self._lock.notify_all()
                        return
                    self._lock.wait(0.5)
                    task = self._next_task()
                self._busy += 1
            complete: list[str] = []
            try:
                self._execute(task)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by run()
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._lock:
                    self._busy -= 1
                    if isinstance(task, ChildTask):
                        self._child_busy[self._parent_of[task.table]] -= 1
                    elif isinstance(task, tuple):
                        self._probing.discard(task[1])
                    if self._prebuild and self._error is None:
                        complete = self._newly_complete(_task_table(task, self._parent_of))
                    # The worker that finished takes the next task itself (a finished page frees one request's
                    # room, which it fills): waking others would only have them find no room, a hundred times
                    # a second. New work (a table's windows, child lists) wakes them where it is made.
                    if self._error is not None or self._finished():
                        self._lock.notify_all()
            for table in complete:
                self._build(table)

    def _finished(self) -> bool:
        return (self._busy == 0 and not self._probes and not self._children
                and all(w.done for w in self._windows))

    def _next_task(self) -> Any:
        if self._error is not None:
            return None
        if self._floor_wanted and not self._floor_asked:
            self._floor_asked = True
            return ("floor", None)
        if self._probes:
            table = self._probes.popleft()
            self._probing.add(table)
            return ("probe", table)
        window = self._next_window()
        if window is not None:
            return self._assign(window)
        if self._children:
            task = self._children.popleft()
            task.busy = True
            self._child_busy[self._parent_of[task.table]] += 1
            return task
        return None

    def _next_window(self) -> Window | None:
        """An idle window (split off a busy one if need be) of the table furthest behind its share, among
        tables whose lanes have room for one more request in flight; None when none has.

        The load cannot end before its busiest table has read its pages at its lanes' rate, nor before
        the account has read every page at its rate: a table's share is its pages left over that end,
        so that every table ends with it instead of the small ones being left for last (where only
        their own lanes would be left to work).
        """
        limits = self.fetcher.budget.limits
        answer = self.fetcher.answer_time or TYPICAL_ANSWER
        if sum(self._lane_busy.values()) >= max(1.0, limits.per_account * answer * IN_FLIGHT_HEADROOM):
            return None
        floor = self._floor if self._floor is not None else STRIPE_EPOCH
        pages: dict[str, float] = {}
        busy: dict[str, int] = {}
        idle: dict[str, list[Window]] = {}
        for window in self._windows:
            if not window.done:
                pages[window.table] = pages.get(window.table, 0.0) + max(
                    1.0, window.remaining(floor) / self.windowing.page_size)
                if window.busy:
                    busy[window.table] = busy.get(window.table, 0) + 1
                else:
                    idle.setdefault(window.table, []).append(window)
        if not pages:
            return None
        rates = {table: self._table_rate(table) for table in pages}
        end = max(sum(pages.values()) / limits.per_account, *(pages[t] / rates[t] for t in pages))
        behind = {table: pages[table] / end * answer * IN_FLIGHT_HEADROOM - busy.get(table, 0) for table in pages}
        search_room = self._room(SEARCH_ENDPOINT, limits.per_search, answer)
        for table in sorted(pages, key=behind.__getitem__, reverse=True):
            list_room = self._room(self.plans[table].path, limits.per_endpoint, answer)
            may_search = search_room and self._search_cutoff(table) is not None
            for window in idle.get(table, ()):
                # A search window under way keeps its lane (its query is in its page token), searchable or not.
                if (list_room if window.lane == "list" else search_room if window.lane == "search"
                        else list_room or may_search):
                    return window
            if list_room or may_search:
                older = self._split(table=table)
                if older is not None:
                    return older
        return None

    def _room(self, lane: str, rate: float, answer: float) -> bool:
        """Whether a lane has fewer requests in flight than its rate needs at the measured answer time."""
        return self._lane_busy.get(lane, 0) < max(1.0, rate * answer * IN_FLIGHT_HEADROOM)

    def _table_rate(self, table: str) -> float:
        """Requests per second a table can be read at: its list endpoint's, plus search's where it may search."""
        limits = self.fetcher.budget.limits
        rate = min(limits.per_endpoint, limits.per_account)
        if self._search_cutoff(table) is not None:
            rate = min(limits.per_account, rate + limits.per_search)
        return rate

    def _split(self, *, table: str | None = None) -> Window | None:
        """Halves the list window with the most objects left (of `table`, if given); returns the older
        half, idle and without a lane. Search windows are never split: their `page` token holds the query."""
        floor = self._floor if self._floor is not None else STRIPE_EPOCH
        candidates = [w for w in self._windows if not w.done and w.lane == "list" and w.pages > 0
                      and (w.lo is not None or self._floor is not None) and w.span(floor) > MIN_SPLIT_SPAN and w.remaining(floor) >= self.windowing.min_split_objects
                      and (table is None or w.table == table)]
        if not candidates:
            return None
        widest = max(candidates, key=lambda w: w.remaining(floor))
        low = widest.lo if widest.lo is not None else min(floor, widest.top - MIN_SPLIT_SPAN * 2)
        middle = (low + widest.top) // 2
        if middle <= low or (widest.lo is not None and middle <= widest.lo):
            return None
        return self._cut(widest, middle)

    def _cut(self, window: Window, at: int) -> Window:
        """Moves [window.lo, at) into a new idle window without a lane (returned); `window` keeps the rest."""
        older = Window(window.table, window.lo, at, top=at - 1, density=window.density)
        window.lo = at
        self._windows.append(older)
        self.fetcher._count(windows=1)
        return older

    # --- lanes -------------------------------------------------------------------------------

    def _assign(self, window: Window) -> Window:
        """Marks a window taken by the calling worker, picking a lane for one that has none yet."""
        if window.lane is None:
            window = self._search_part(window) or window
            if window.lane is None:
                window.lane = "list"
        window.busy = True
        key = self._lane_key(window)
        self._lane_busy[key] = self._lane_busy.get(key, 0) + 1
        return window

    def _lane_key(self, window: Window) -> str:
        return SEARCH_ENDPOINT if window.lane == "search" else self.plans[window.table].path

    def _search_part(self, window: Window) -> Window | None:
        """The part of a window without a lane that the search lane takes now, or None (list lane).

        Search takes it when its lane is the less busy of the two for its rate, and only below the
        cutoff (Stripe's clock minus the indexing delay and margin), about `search_pages` pages of the
        window's newest part by the density seen so far; the rest keeps no lane, for later.
        """
        cutoff = self._search_cutoff(window.table)
        limits = self.fetcher.budget.limits
        answer = self.fetcher.answer_time or TYPICAL_ANSWER
        if (cutoff is None or window.density <= 0 or not self._search_less_busy(window.table)
                or not self._room(SEARCH_ENDPOINT, limits.per_search, answer)):
            return None  # no search, or no estimate of the window's size (the list lane can split it)
        floor = self._floor if self._floor is not None else STRIPE_EPOCH
        low = window.lo if window.lo is not None else floor
        high = cutoff if window.hi is None else min(window.hi, cutoff)
        if high - low <= MIN_SPLIT_SPAN:
            return None  # nothing in it is old enough for search
        part = window if high == window.hi else self._cut(window, high)
        objects = self._search_pages(floor, answer) * self.windowing.page_size
        span = max(MIN_SPLIT_SPAN, int(objects / part.density))
        if high - low > span * 3 // 2:
            self._cut(part, high - span)
        part.lane = "search"
        return part

    def _search_pages(self, floor: int, answer: float) -> int:
        """Pages to carve a search window to: `search_pages`, fewer as the load nears its end (a search window
        cannot be split, so one started late would be read one page at a time after everything else)."""
        pages_left = sum(w.remaining(floor) for w in self._windows if not w.done) / self.windowing.page_size
        seconds_left = pages_left / self.fetcher.budget.limits.per_account
        return max(1, min(self.windowing.search_pages, int(seconds_left / answer / 2)))

    def _search_cutoff(self, table: str) -> int | None:
        """The newest `created` search may be asked for in `table` now, or None when search is off for it."""
        if (self.search_delay is None or self.plans[table].search_path is None
                or {"*", table} & self._search_off or self.fetcher.server_time is None):
            return None
        return int(self.fetcher.server_time - self.search_delay)

    def _search_less_busy(self, table: str) -> bool:
        """Whether the search lane has fewer windows in progress than the table's list lane, for their rates."""
        limits = self.fetcher.budget.limits
        searching = self._lane_busy.get(SEARCH_ENDPOINT, 0) / limits.per_search
        listing = self._lane_busy.get(self.plans[table].path, 0) / limits.per_endpoint
        return searching <= listing

    # --- work --------------------------------------------------------------------------------

    def _execute(self, task: Any) -> None:
        if isinstance(task, tuple) and task[0] == "floor":
            self._floor = self._floor_fn()
        elif isinstance(task, tuple):
            self._probe(task[1])
        elif isinstance(task, Window):
            lane = self._lane_key(task)  # before the page: a failed search window changes lanes
            try:
                if task.lane == "search":
                    self._search_page(task)
                else:
                    self._page(task)
            finally:
                with self._lock:
                    self._lane_busy[lane] -= 1
        else:
            self._child_page(task)

    def _probe(self, table: str) -> None:
        plan = self.plans[table]
        params = plan.params(limit=self.windowing.page_size)
        data, has_more = self.fetcher.list(table, plan.path, params)
        self._absorb(plan, data, params)
        seen: set[str] = set()
        after = next_cursor(table, plan.path, params, data, has_more, seen)
        if after is not None:
            window = Window(table, plan.since, None, after=after, lane="list", top=data[-1]["created"], pages=1,
                            seen=seen)
            window.observe(data)
            self.fetcher._count(windows=1)
            with self._lock:
                self._windows.append(window)
                # A large table starts with a few windows at once, so its endpoint's budget fills up even
                # while every worker is busy with other tables; idle workers keep halving them later.
                if self._floor is None and window.lo is None:
                    self._carve(window)  # where the table starts is not known yet: a worker asks
                    self._floor_wanted = True
                else:
                    for _ in range(self.windowing.initial_splits):
                        if self._split(table=table) is None:
                            break
                self._lock.notify_all()

    def _carve(self, window: Window) -> None:
        """Cuts `initial_splits` windows of about 4 x `min_split_objects` objects each below a table's first page,
        by its density, the oldest staying open below (split once the account's creation time is known)."""
        step = max(MIN_SPLIT_SPAN, int(4 * self.windowing.min_split_objects / max(window.density, 1e-9)))
        oldest = window
        for _ in range(self.windowing.initial_splits):
            at = (oldest.top or 0) - step
            if at <= STRIPE_EPOCH:
                break
            oldest = self._cut(oldest, at)

    def _page(self, window: Window) -> None:
        plan = self.plans[window.table]
        with self._lock:
            lo, hi, after = window.lo, window.hi, window.after
        params = plan.params(limit=self.windowing.page_size, gte=lo, lt=hi, after=after)
        data, has_more = self.fetcher.list(window.table, plan.path, params)
        self._absorb(plan, data, params)
        following = next_cursor(window.table, plan.path, params, data, has_more, window.seen)
        with self._lock:
            window.pages += 1
            window.busy = False
            if data:
                window.after, window.top = data[-1]["id"], data[-1]["created"]
                window.observe(data)
            if following is None:
                window.done = True

    def _search_page(self, window: Window) -> None:
        """One page of a search window; a failure sends the window back to the list lane, whole."""
        plan = self.plans[window.table]
        assert plan.search_path is not None
        with self._lock:
            lo, hi, page = window.lo, window.hi, window.page
        params = plan.search_params(limit=self.windowing.page_size, gte=lo, lt=hi, page=page)
        try:
            data, has_more, following = self.fetcher.search(window.table, plan.search_path, params,
                                                            created=plan.created(gte=lo, lt=hi))
            if has_more and following in window.seen:
                raise FetchError(f"The search for {window.table} answered a `next_page` it had already sent.",
                                 table=window.table, cursor=params, code="stuck_cursor")
        except (PermissionDenied, RequestRejected, FetchError) as exc:
            if isinstance(exc, FetchError) and exc.code == "deadline_exceeded":
                raise
            self._fall_back(window, exc)
            return
        self._absorb(plan, data, params)
        with self._lock:
            window.pages += 1
            window.busy = False
            if has_more:
                window.page = following
                window.seen.add(following)  # type: ignore[arg-type]
            else:
                window.done = True

    def _fall_back(self, window: Window, error: StripeSourceError) -> None:
        """Sends a failed search window to the list lane, to be read whole (rows already taken merge by id).

        A refusal (403: a key without search; 404: a region without it; 400) turns search off for
        every table; other failures (errors beyond retries, wrong-shape answers) for this table.
        """
        with self._lock:
            self._search_off.add("*" if isinstance(error, (PermissionDenied, RequestRejected)) else window.table)
            window.lane, window.page, window.after = "list", None, None
            window.pages, window.seen, window.busy = 0, set(), False
            if window.hi is not None:
                window.top = window.hi - 1
        self.fetcher._count(search_fallbacks=1)

    def _child_page(self, task: ChildTask) -> None:
        params = dict(task.params, limit=self.windowing.page_size)
        if task.after:
            params["starting_after"] = task.after
        data, has_more = self.fetcher.list(task.table, task.path, params, endpoint=endpoint_pattern(task.path),
                                           dated=False)
        self.fetcher._count(child_requests=1)
        child = self._child_plan(task.table)
        self._store(child.name, [(child.shaper.row(obj, task.parent_id), obj["id"],
                                  (*task.parent_order, -(task.position + index)))
                                 for index, obj in enumerate(data)])
        task.position += len(data)
        following = next_cursor(task.table, task.path, params, data, has_more, task.seen)
        with self._lock:
            if following is not None:
                task.after, task.busy = following, False
                self._children.append(task)
            else:
                task.done = True

    def absorb_page(self, plan: "TablePlan", objects: list[dict], params: Mapping[str, Any] | None = None) -> None:
        """Takes one page of checked parents on the calling thread, completing their long embedded lists."""
        self._absorb(plan, objects, params)
        while self._children:
            self._child_page(self._children.popleft())

    def frame(self, name: str, limit: int | None = None) -> Any:
        """The collected rows of a table (newest first, at most `limit`) as a typed DataFrame."""
        if limit is None and name in self._built:
            built = self._built[name]
            if isinstance(built, BaseException):
                raise built
            return built
        shaper = self._shaper(name)
        collected = self.collected[name]
        if not collected.parts:
            return shaper.frame(collected.sorted_rows()[:limit])
        rest = collected.newest_first(collected.rows)
        ids = [object_id for part_ids, _ in collected.parts for object_id in part_ids] + rest
        parts = [part for _, part in collected.parts] + [shaper.part([collected.rows[i] for i in rest])]
        key = collected.order.__getitem__
        # Each part is newest first already: the sort merges runs, and the rows are read part by part.
        positions = np.asarray(sorted(range(len(ids)), key=lambda position: key(ids[position]), reverse=True)[:limit],
                               dtype=np.intp)
        in_place = limit is None and bool(np.all(positions == np.arange(len(positions))))
        return shaper.joined(parts, None if in_place else positions)

    def _newly_complete(self, table: str | None) -> list[str]:
        """`table` if it (with its child tables) has just been fetched whole and not built yet; under the lock."""
        if (table is None or table in self._building or table in self._probes or table in self._probing
                or self._child_busy[table]
                or any(task.table in self.plans[table].child_names() for task in self._children)
                or any(w.table == table and not w.done for w in self._windows)
                or any(w.table == table and w.busy for w in self._windows)):
            return []
        self._building.add(table)
        return [table]

    def _build(self, table: str) -> None:
        """Builds the frames of a complete table and its child tables, keeping an error for `frame()`."""
        for name in (table, *self.plans[table].child_names()):
            try:
                self._built[name] = self.frame(name)
            except Exception as exc:  # noqa: BLE001 - raised by frame(name) when asked, like an unbuilt one
                self._built[name] = exc

    def _shaper(self, name: str) -> Any:
        return self.plans[name].shaper if name in self.plans else self._child_plan(name).shaper

    def _child_plan(self, name: str) -> "ChildPlan":
        for plan in self.plans.values():
            for child in plan.children:
                if child.name == name:
                    return child
        raise KeyError(name)

    def _absorb(self, plan: "TablePlan", objects: list[dict], params: Mapping[str, Any] | None = None) -> None:
        """Stores a page of checked objects and their embedded lists; `params` (the page's request) names
        where a malformed embedded list came from."""
        self._store(plan.name, [(plan.shaper.row(obj), obj["id"], (obj.get("created") or 0, obj["id"]))
                                for obj in objects])
        for child in plan.children:
            rows, follow_ups = [], []
            for number, obj in enumerate(objects):
                embedded = obj.get(child.field)
                if not isinstance(embedded, dict):
                    continue
                problem = _list_problem(embedded, dated=False)
                if problem:
                    raise _bad_answer(plan.name, plan.path, params or {},
                                      f"in data[{number}], the embedded `{child.field}` list: {problem}")
                entries = embedded["data"]
                parent_order = (obj.get("created") or 0, obj["id"])
                rows += [(child.shaper.row(entry, obj["id"]), entry["id"], (*parent_order, -index))
                         for index, entry in enumerate(entries)]
                if embedded["has_more"] and self._follow(child.name, obj["id"]):
                    task = child.task(obj["id"], entries[-1]["id"] if entries else None, parent_order, len(entries))
                    task.seen.update([task.after] if task.after else [])
                    follow_ups.append(task)
            self._store(child.name, rows)
            if follow_ups:
                with self._lock:
                    self._children.extend(follow_ups)
                    self._lock.notify_all()

    def _follow(self, child: str, parent_id: str) -> bool:
        """True the first time a parent's long embedded list is met: only then is it paged."""
        with self._lock:
            if (child, parent_id) in self._followed:
                return False
            self._followed.add((child, parent_id))
            return True

    def _store(self, table: str, rows: list[tuple[dict, str, tuple]]) -> None:
        with self._lock:
            collected = self.collected[table]
            for row, object_id, order in rows:
                if object_id not in collected.order:
                    collected.rows[object_id] = row
                    collected.order[object_id] = order
                    self._rows += 1
            batch = None
            if self._prebuild and len(collected.rows) >= self.windowing.part_rows:
                batch, collected.rows = collected.rows, {}
                # Newest first within the part: the final reordering then reads each part front to back
                # (a random order over a table's text columns is cache misses over all of their bytes).
                batch_ids = collected.newest_first(batch)
        if batch is not None:  # typed columns now, while other threads wait on Stripe, not all at the end
            try:
                part = self._shaper(table).part([batch[object_id] for object_id in batch_ids])
            except ShapeError as exc:  # the table's frame raises it when asked for, as an unbuilt one would
                with self._lock:
                    self._built[table] = exc
                return
            with self._lock:
                collected.parts.append((batch_ids, part))
        if self.progress is not None and rows:
            with self._progress_lock:
                with self._lock:
                    done = self._rows
                if done > self._reported:
                    self._reported = done
                    self.progress(done, None)
        if self.table_progress is not None and rows:
            with self._progress_lock:  # one caller at a time, so each table's count only grows
                with self._lock:
                    count = len(collected.order)
                self.table_progress(table, count)


def _task_table(task: Any, parent_of: Mapping[str, str]) -> str | None:
    """The parent table a finished task belongs to."""
    if isinstance(task, tuple):
        return task[1]
    if isinstance(task, Window):
        return task.table
    if isinstance(task, ChildTask):
        return parent_of[task.table]
    return None


@dataclass
class ChildPlan:
    name: str
    field: str
    shaper: Any
    path_for: Callable[[str], str]
    params_for: Callable[[str], dict[str, Any]]

    def task(self, parent_id: str, after: str | None, parent_order: tuple[int, str], position: int) -> ChildTask:
        return ChildTask(self.name, parent_id, self.path_for(parent_id), self.params_for(parent_id), after,
                         parent_order, position)


@dataclass
class TablePlan:
    """How to list one table: path, fixed parameters, the `since` bound and its child tables."""

    name: str
    path: str
    shaper: Any
    fixed: dict[str, Any]
    since: int | None = None
    children: list[ChildPlan] = field(default_factory=list)
    #: False for a table whose objects are only retrieved by id (changed objects, not its list).
    listed: bool = True
    #: The table's search endpoint (None: no search lane), and what its search passes besides `query`
    #: (a search covers every status, so the list's `status=all` has no counterpart).
    search_path: str | None = None
    search_fixed: dict[str, Any] = field(default_factory=dict)

    def child_names(self) -> tuple[str, ...]:
        return tuple(child.name for child in self.children)

    def created(self, *, gte: int | None = None, lt: int | None = None) -> dict[str, int]:
        """The `created` range of a window, within `since`."""
        created: dict[str, int] = {}
        lower = gte if gte is not None else self.since
        if lower is not None:
            created["gte"] = max(lower, self.since) if self.since is not None else lower
        if lt is not None:
            created["lt"] = lt
        return created

    def params(self, *, limit: int, gte: int | None = None, lt: int | None = None,
               after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.fixed, limit=limit)
        created = self.created(gte=gte, lt=lt)
        if created:
            params["created"] = created
        if after is not None:
            params["starting_after"] = after
        return params

    def search_params(self, *, limit: int, gte: int | None, lt: int | None, page: str | None) -> dict[str, Any]:
        """A search request for a window: `created>=gte AND created<lt` in Stripe's query language."""
        created = self.created(gte=gte, lt=lt)
        clauses = [f"created>={created['gte']}"] if "gte" in created else []
        clauses += [f"created<{created['lt']}"] if "lt" in created else []
        params: dict[str, Any] = dict(self.search_fixed, query=" AND ".join(clauses) or "created>=0", limit=limit)
        if page is not None:
            params["page"] = page
        return params
