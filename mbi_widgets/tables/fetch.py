"""Fetching Stripe lists completely and fast: a shared rate budget, retries, and split `created` windows.

A table is fetched by windows over `created`. The first page tells whether the table is small
(done) or large; a large table starts as one window, and every idle worker splits the busiest
window in two at the middle of its remaining time range, so work spreads over the workers
without knowing the table's size. Windows never overlap and always cover everything (the
oldest window is unbounded below), and rows are merged by id.
"""
from __future__ import annotations

import random
import threading
import time
from collections import deque
from email.utils import parsedate_to_datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import orjson
import stripe

from mbi_widgets.errors import MbiError
from mbi_widgets.ratelimits import RateLimits, TokenBucket

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
MIN_SPLIT_OBJECTS = 400


class StripeSourceError(MbiError):
    """Fetching from Stripe failed; the message says what to do next."""


class FetchError(StripeSourceError):
    """Retries ran out: raised instead of returning a silently short table."""

    def __init__(self, message: str, *, table: str, cursor: Mapping[str, Any], code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.table, self.cursor = table, dict(cursor)


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
                    bucket = self._endpoints[endpoint] = TokenBucket(self.limits.per_endpoint * self._scale, capacity=BURST)
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
        for bucket in self._endpoints.values():
            bucket.rate = self.limits.per_endpoint * self._scale


@dataclass
class RetryPolicy:
    """How hard to try before giving up on a page."""

    max_transient: int = 6
    max_rate_limited: int = 20
    base_delay: float = 0.25
    max_delay: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.5)


class Transport:
    """GET requests through a `stripe.StripeClient`, returning parsed JSON.

    Uses the client's raw requestor so that bodies are parsed once with orjson instead of into
    StripeObjects; the client's key, base address and HTTP client are used as they are.
    """

    def __init__(self, client: stripe.StripeClient, account: str | None) -> None:
        self.client = client
        self.account = account

    def get(self, path: str, params: Mapping[str, Any]) -> tuple[int, Any, Mapping[str, str]]:
        options: dict[str, Any] = {"stripe_account": self.account} if self.account else {}
        body, status, headers = self.client._requestor.request_raw(  # noqa: SLF001 - the stable raw path
            "get", path, params=dict(params), options=options, base_address="api", api_mode="V1")
        try:
            return status, orjson.loads(body), headers
        except orjson.JSONDecodeError:
            return (status if status >= 500 else 502), None, headers


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message") or payload["error"])
    return "no error message"


@dataclass
class FetchStats:
    """What a fetch cost: requests sent, retries, and how the work was split."""

    requests: int = 0
    rate_limited: int = 0
    retried: int = 0
    windows: int = 0
    child_requests: int = 0
    seconds: float = 0.0
    by_endpoint: dict[str, int] = field(default_factory=dict)

    def floor_seconds(self, limits: RateLimits) -> float:
        """The least time these requests could take under `limits` (the rate-limit ceiling)."""
        busiest = max(self.by_endpoint.values(), default=0)
        return max(self.requests / limits.per_account, busiest / limits.per_endpoint)


class Fetcher:
    """One GET with retries under the shared budget; raises our errors, never a short result."""

    def __init__(self, transport: Transport, budget: RateBudget, retry: RetryPolicy,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.transport, self.budget, self.retry, self.cancelled = transport, budget, retry, cancelled
        self.stats = FetchStats()
        self._stats_lock = threading.Lock()
        #: Stripe's clock (Unix seconds) from the `Date` header of the latest answer.
        self.server_time: int | None = None

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def get(self, table: str, path: str, params: Mapping[str, Any], endpoint: str | None = None) -> dict:
        transient = rate_limited = 0
        last_error = ""
        while True:
            if self.cancelled():
                raise StripeSourceError(f"fetching {table} was cancelled", code="cancelled")
            self.budget.acquire(endpoint or path)
            self._count(requests=1)
            with self._stats_lock:
                key = endpoint or path
                self.stats.by_endpoint[key] = self.stats.by_endpoint.get(key, 0) + 1
            try:
                status, payload, headers = self.transport.get(path, params)
            except stripe.StripeError as exc:  # connection refused, reset, dropped mid-body, timeout
                status, payload, headers = 0, None, None
                last_error = f"{type(exc).__name__}: {exc.user_message or exc}"
            self._clock(headers)  # every answer, errors too, says what time it is at Stripe
            if status == 200:
                self.budget.succeeded()
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
                time.sleep(self.retry.delay(min(rate_limited, 5)))
                continue
            if status == 0 or status >= 500:
                transient += 1
                self._count(retried=1)
                last_error = last_error if status == 0 else f"HTTP {status}: {_error_message(payload)}"
                if transient > self.retry.max_transient:
                    raise FetchError(f"could not fetch {table} at {path} with {dict(params)} after {transient} "
                                     f"attempts (last error: {last_error}); nothing was returned so that no table "
                                     "is silently short. Check the network or Stripe's status, then try again.",
                                     table=table, cursor=params, code="unavailable")
                time.sleep(self.retry.delay(transient - 1))
                continue
            message = _error_message(payload)
            if status == 401:
                raise AuthenticationFailed(f"Stripe rejected the credentials while reading {table}: {message} "
                                           "Re-authenticate the connection (or create a new restricted key).",
                                           code="authentication_failed")
            if status == 403:
                raise PermissionDenied(f"The key may not read {table}: {message} Grant read access to it in the "
                                       "Stripe dashboard (Developers > API keys), or use another key.",
                                       code="permission_denied")
            error = payload.get("error") if isinstance(payload, dict) else None
            if status == 404 and isinstance(error, dict) and error.get("code") == "resource_missing":
                raise NotFound(f"Stripe has no such object for {table}: {message}", code="resource_missing")
            raise RequestRejected(f"Stripe refused the request for {table} ({status}): {message}",
                                  code=str(status))

    def _clock(self, headers: Mapping[str, str] | None) -> None:
        value = None
        if headers:
            value = headers.get("Date") or headers.get("date")
        if not value:
            return
        try:
            moment = int(parsedate_to_datetime(value).timestamp())
        except (TypeError, ValueError, IndexError):
            return
        with self._stats_lock:
            self.server_time = max(self.server_time or moment, moment)


@dataclass
class Window:
    """A range of `created` still to fetch: lo <= created < hi, continuing after `after`."""

    table: str
    lo: int | None
    hi: int | None
    after: str | None = None
    #: `created` of the last object fetched: what remains lies in [lo, top].
    top: int | None = None
    pages: int = 0
    busy: bool = False
    done: bool = False
    #: Objects per second of `created`, measured on the last full page.
    density: float = 0.0

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


@dataclass
class Collected:
    """Rows of one table, keyed by id so that overlapping pages never duplicate a row."""

    rows: dict[str, dict] = field(default_factory=dict)
    #: Sort key per id: (created, id) for tables; (parent created, parent id, -position) for children.
    order: dict[str, tuple] = field(default_factory=dict)

    def sorted_rows(self) -> list[dict]:
        """Newest first, like Stripe's lists; child rows in their parent's order, then list order."""
        ids = sorted(self.order, key=self.order.__getitem__, reverse=True)
        return [self.rows[i] for i in ids]


class Job:
    """Fetches several tables concurrently with one pool of workers and one budget."""

    def __init__(self, *, fetcher: Fetcher, plans: list["TablePlan"], workers: int, floor: Callable[[], int],
                 progress: Callable[[int, int | None], None] | None) -> None:
        self.fetcher, self.plans, self.workers, self._floor_fn = fetcher, {p.name: p for p in plans}, workers, floor
        self.progress = progress
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
        self._floor: int | None = None

    # --- scheduling ------------------------------------------------------------------------

    def run(self) -> dict[str, Collected]:
        started = time.perf_counter()
        threads = [threading.Thread(target=self._worker, name=f"mbi-fetch-{i}", daemon=True)
                   for i in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
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
            try:
                self._execute(task)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by run()
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._lock:
                    self._busy -= 1
                    self._lock.notify_all()

    def _finished(self) -> bool:
        return (self._busy == 0 and not self._probes and not self._children
                and all(w.done for w in self._windows))

    def _next_task(self) -> Any:
        if self._error is not None:
            return None
        if self._probes:
            return ("probe", self._probes.popleft())
        for window in self._windows:
            if not window.busy and not window.done:
                window.busy = True
                return window
        while self._children:
            task = self._children.popleft()
            task.busy = True
            return task
        return self._split()

    def _split(self, *, table: str | None = None, busy: bool = True) -> Window | None:
        """Halves the window with the most objects left (of `table`, if given); returns the older half."""
        floor = self._floor if self._floor is not None else STRIPE_EPOCH
        candidates = [w for w in self._windows if not w.done and w.pages > 0 and w.span(floor) > MIN_SPLIT_SPAN
                      and w.remaining(floor) >= MIN_SPLIT_OBJECTS and (table is None or w.table == table)]
        if not candidates:
            return None
        widest = max(candidates, key=lambda w: w.remaining(floor))
        low = widest.lo if widest.lo is not None else min(floor, widest.top - MIN_SPLIT_SPAN * 2)
        middle = (low + widest.top) // 2
        if middle <= low or (widest.lo is not None and middle <= widest.lo):
            return None
        older = Window(widest.table, widest.lo, middle, top=middle - 1, busy=busy, density=widest.density)
        widest.lo = middle
        self._windows.append(older)
        self.fetcher._count(windows=1)
        return older

    # --- work --------------------------------------------------------------------------------

    def _execute(self, task: Any) -> None:
        if isinstance(task, tuple):
            self._probe(task[1])
        elif isinstance(task, Window):
            self._page(task)
        else:
            self._child_page(task)

    def _probe(self, table: str) -> None:
        plan = self.plans[table]
        payload = self.fetcher.get(table, plan.path, plan.params(limit=100))
        self._absorb(plan, payload["data"])
        if payload["has_more"] and payload["data"]:
            last = payload["data"][-1]
            if self._floor is None:
                self._floor = self._floor_fn()
            window = Window(table, plan.since, None, after=last["id"], top=last["created"], pages=1)
            window.observe(payload["data"])
            self.fetcher._count(windows=1)
            with self._lock:
                self._windows.append(window)
                # A large table starts with a few windows at once, so its endpoint's budget fills up even
                # while every worker is busy with other tables; idle workers keep halving them later.
                for _ in range(INITIAL_SPLITS):
                    if self._split(table=table, busy=False) is None:
                        break
                self._lock.notify_all()

    def _page(self, window: Window) -> None:
        plan = self.plans[window.table]
        with self._lock:
            lo, hi, after = window.lo, window.hi, window.after
        params = plan.params(limit=100, gte=lo, lt=hi, after=after)
        payload = self.fetcher.get(window.table, plan.path, params)
        data = payload["data"]
        self._absorb(plan, data)
        with self._lock:
            window.pages += 1
            window.busy = False
            if data:
                window.after, window.top = data[-1]["id"], data[-1]["created"]
                window.observe(data)
            if not payload["has_more"] or not data:
                window.done = True

    def _child_page(self, task: ChildTask) -> None:
        params = dict(task.params, limit=100)
        if task.after:
            params["starting_after"] = task.after
        payload = self.fetcher.get(task.table, task.path, params, endpoint=task.path.split("?")[0])
        self.fetcher._count(child_requests=1)
        child = self._child_plan(task.table)
        self._store(child.name, [(child.shaper.row(obj, task.parent_id), obj["id"],
                                  (*task.parent_order, -(task.position + index)))
                                 for index, obj in enumerate(payload["data"])])
        task.position += len(payload["data"])
        with self._lock:
            if payload["has_more"] and payload["data"]:
                task.after, task.busy = payload["data"][-1]["id"], False
                self._children.append(task)
            else:
                task.done = True

    def absorb_page(self, plan: "TablePlan", objects: list[dict]) -> None:
        """Takes one page of parents on the calling thread, completing their long embedded lists."""
        self._absorb(plan, objects)
        while self._children:
            self._child_page(self._children.popleft())

    def frame(self, name: str, limit: int | None = None) -> Any:
        """The collected rows of a table (newest first, at most `limit`) as a typed DataFrame."""
        shaper = self.plans[name].shaper if name in self.plans else self._child_plan(name).shaper
        return shaper.frame(self.collected[name].sorted_rows()[:limit])

    def _child_plan(self, name: str) -> "ChildPlan":
        for plan in self.plans.values():
            for child in plan.children:
                if child.name == name:
                    return child
        raise KeyError(name)

    def _absorb(self, plan: "TablePlan", objects: list[dict]) -> None:
        self._store(plan.name, [(plan.shaper.row(obj), obj["id"], (obj.get("created") or 0, obj["id"]))
                                for obj in objects])
        for child in plan.children:
            rows, follow_ups = [], []
            for obj in objects:
                embedded = obj.get(child.field)
                if not isinstance(embedded, dict):
                    continue
                entries = embedded.get("data") or []
                parent_order = (obj.get("created") or 0, obj["id"])
                rows += [(child.shaper.row(entry, obj["id"]), entry["id"], (*parent_order, -index))
                         for index, entry in enumerate(entries)]
                if embedded.get("has_more"):
                    follow_ups.append(child.task(obj["id"], entries[-1]["id"] if entries else None,
                                                 parent_order, len(entries)))
            self._store(child.name, rows)
            if follow_ups:
                with self._lock:
                    self._children.extend(follow_ups)
                    self._lock.notify_all()

    def _store(self, table: str, rows: list[tuple[dict, str, tuple]]) -> None:
        with self._lock:
            collected = self.collected[table]
            for row, object_id, order in rows:
                if object_id not in collected.rows:
                    collected.rows[object_id] = row
                    collected.order[object_id] = order
                    self._rows += 1
        if self.progress is not None and rows:
            with self._progress_lock:
                with self._lock:
                    done = self._rows
                if done > self._reported:
                    self._reported = done
                    self.progress(done, None)


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

    def params(self, *, limit: int, gte: int | None = None, lt: int | None = None,
               after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.fixed, limit=limit)
        created: dict[str, int] = {}
        lower = gte if gte is not None else self.since
        if lower is not None:
            created["gte"] = max(lower, self.since) if self.since is not None else lower
        if lt is not None:
            created["lt"] = lt
        if created:
            params["created"] = created
        if after is not None:
            params["starting_after"] = after
        return params
