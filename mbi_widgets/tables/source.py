"""`StripeSource`: the expected Stripe tables as pandas DataFrames, complete and as fast as the rate limits allow."""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import stripe

from mbi_widgets.ratelimits import RateLimits
from mbi_widgets.redaction import redact
from mbi_widgets.tables.fetch import (
    MAX_CREATED,
    SEARCH_DELAY,
    STRIPE_EPOCH,
    BadAnswer,
    ChildPlan,
    Fetcher,
    FetchStats,
    Job,
    NotFound,
    PermissionDenied,
    RateBudget,
    RetryPolicy,
    StripeSourceError,
    TablePlan,
    Timeouts,
    Transport,
    Windowing,
    next_cursor,
    workers_for,
)
from mbi_widgets.tables.schema import ALL_TABLES, CHILD_TABLES, EXPECTED_TABLES, TableSchema, schema
from mbi_widgets.tables.shape import ShapeError, Shaper

Progress = Callable[[int, "int | None"], None]
#: Tables Stripe's Search API serves (`GET /v1/{table}/search`): the search lane's candidates.
SEARCHABLE_TABLES = frozenset({"charges", "customers", "invoices", "subscriptions"})


def _check_key(api_key: str) -> None:
    if not isinstance(api_key, str):
        raise StripeSourceError(f"The key must be text (an rk_... restricted key, an sk_... secret key or an OAuth "
                                f"access token), not {type(api_key).__name__}.", code="invalid_key")
    if not api_key.isascii() or not api_key.isprintable() or any(c.isspace() for c in api_key):
        raise StripeSourceError("The key contains spaces, line breaks or other characters Stripe keys never have: "
                                "copy it again from the Stripe dashboard, without the surrounding text.",
                                code="invalid_key")
    if api_key.startswith("pk_"):
        raise StripeSourceError(
            "That is a publishable key (pk_...), which cannot read data. In the Stripe dashboard, open "
            "Developers > API keys, create a restricted key with Read access to the resources you need, "
            "and use the rk_... key.", code="publishable_key")
    if not api_key.startswith(("sk_", "rk_")):
        raise StripeSourceError("That does not look like a Stripe key: expected an rk_... restricted key, an sk_... "
                                "secret key or an OAuth access token.", code="invalid_key")


class StripeSource:
    """Reads the expected Stripe tables of one account.

    Give an API key (a restricted `rk_` key, a secret key or an OAuth access token) or a ready
    `stripe.StripeClient`; `account` sets the `Stripe-Account` header; `api_base` points at
    another Stripe-compatible server (the sandbox). Nothing is stored at module level, so any
    number of sources for different accounts live side by side.

    Nothing waits forever. `timeout` is how long one attempt waits, as requests takes it: seconds,
    or (connect, read); the default (5, 30) suits Stripe, whose list calls answer within a few
    seconds (stripe-python's own default is 80 s). A page is retried after errors and timeouts
    (`retry`; at most 3 attempts end in a timeout), so a silent server fails a call within about
    a minute and a half. `deadline` caps a whole call (`table()`, `tables()`, `fetch()`,
    `preview()`) in seconds; the default None sets no cap, since a large live account can take
    an hour to fetch. Both raise `FetchError` naming the table and the cursor. A client you pass
    keeps its own HTTP client's timeouts (`stripe.RequestsClient(timeout=(5, 30))`).

    `search` uses Stripe's Search API as a second lane for the older `created` windows of charges,
    customers, invoices and subscriptions (Stripe limits it separately: 20 requests/s for all search
    endpoints, on top of 25/s per list endpoint). None (the default) uses it when the account's
    limit is above the per-endpoint one (live mode), True always, False never. Search only reads
    objects created more than `search_delay` seconds before Stripe's clock (default an hour:
    Stripe indexes within a minute, later during incidents). The result is the same either way;
    a window search cannot read (a region without search, errors) is read from the list instead.
    `workers` is how many requests may be in flight at once; None (the default) sizes it to the
    account's limit and Stripe's usual answer times (`workers_for`: 16 in test mode, 60 in live
    mode), since at 100 requests/s and a third of a second per answer, 32 threads are already the
    bound. The pace is the rate budget's either way. `windowing` tunes how tables are cut into
    windows (tests and benchmarks).
    """

    def __init__(self, api_key: str | None = None, *, client: stripe.StripeClient | None = None,
                 account: str | None = None, api_base: str | None = None,
                 rate_limits: RateLimits | Mapping[str, float] | str | None = None, workers: int | None = None,
                 retry: RetryPolicy | None = None, timeout: float | tuple[float, float] | None = None,
                 deadline: float | None = None, search: bool | None = None, search_delay: float = SEARCH_DELAY,
                 windowing: Windowing | None = None) -> None:
        if search not in (None, True, False):
            raise StripeSourceError(f"search is True, False or None (automatic), not {search!r}", code="invalid_option")
        if (isinstance(search_delay, bool) or not isinstance(search_delay, (int, float))
                or not 0 <= search_delay < float("inf")):
            raise StripeSourceError(f"search_delay is seconds >= 0, not {search_delay!r}", code="invalid_option")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise StripeSourceError(f"workers is a number of threads >= 1, or None (automatic), not {workers!r}",
                                    code="invalid_option")
        self._search, self._search_delay = search, search_delay
        self._windowing = windowing or Windowing()
        #: Seconds to wait: connect and read per attempt, deadline per call (None: none).
        self.timeouts = Timeouts.coerce(timeout, deadline)
        if client is None:
            if not api_key:
                raise StripeSourceError("StripeSource needs an api_key (rk_..., sk_... or an OAuth access token) "
                                        "or a stripe.StripeClient.", code="missing_key")
            _check_key(api_key)
            connections = workers or workers_for(RateLimits.coerce(rate_limits) or RateLimits.for_key(api_key))
            client = stripe.StripeClient(api_key, base_addresses={"api": api_base} if api_base else None,
                                         max_network_retries=0, http_client=self.timeouts.http_client(connections))
        elif api_key:
            raise StripeSourceError("Give either api_key or client, not both.", code="ambiguous_credentials")
        elif timeout is not None:
            raise StripeSourceError("timeout applies to the HTTP client StripeSource builds from api_key; with "
                                    "client=..., set it on your client's http_client instead "
                                    "(stripe.RequestsClient(timeout=(5, 30))).", code="ambiguous_timeout")
        self._client = client
        account = account or client._requestor.stripe_account  # noqa: SLF001
        self._account = account
        key = client._requestor.api_key or ""  # noqa: SLF001 - read only to pick the mode and fingerprint
        self._key_hint = redact(key) if key else "(client)"
        self._api_base = api_base or client._requestor.base_addresses.get("api") or "https://api.stripe.com"  # noqa: SLF001
        limits = RateLimits.coerce(rate_limits) or RateLimits.for_key(key)
        self._fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        identity = account or "key:" + self._fingerprint
        self._budget = RateBudget.shared((self._api_base, identity), limits)
        self._transport = Transport(client, account)
        self._retry = retry or RetryPolicy()
        self._workers = workers or workers_for(limits)
        self._floor: int | None = None
        self._floor_lock = threading.Lock()
        self._account_id: str | None = None
        #: What the last `table()`/`tables()` call cost (requests, retries, windows, seconds).
        self.last_stats: FetchStats | None = None

    def __repr__(self) -> str:
        account = f", account={self._account}" if self._account else ""
        return f"StripeSource(key={self._key_hint}{account}, api={self._api_base})"

    @property
    def rate_limits(self) -> RateLimits:
        return self._budget.limits

    # --- public API ------------------------------------------------------------------------

    def schema(self, table: str) -> TableSchema:
        """The expected columns of a table, with dtypes and primary key."""
        return schema(table)

    def preview(self, table: str, rows: int = 100) -> pd.DataFrame:
        """The newest rows of a table: one request when rows <= 100.

        A child table pages its parent 100 at a time and completes long embedded lists, so that
        its preview equals the first rows of the full table.
        """
        if rows < 1:
            raise ValueError("rows must be at least 1")
        target = schema(table)
        parent = schema(target.parent) if target.parent else target
        plan = self._plan(parent, since=None, children=[table] if target.parent else [])
        job = Job(fetcher=self._fetcher(), plans=[plan], workers=1, floor=self._account_floor,
                  known_floor=self._floor, progress=None)
        collected = job.collected[table]
        after: str | None = None
        seen: set[str] = set()
        while True:
            limit = 100 if target.parent else min(100, rows - len(collected.order))
            params = plan.params(limit=limit, after=after)
            data, has_more = job.fetcher.list(parent.name, plan.path, params)
            job.absorb_page(plan, data, params)
            if len(collected.order) >= rows:
                break
            after = next_cursor(parent.name, plan.path, params, data, has_more, seen)
            if after is None:
                break
        return _frame(job, table, limit=rows)

    def table(self, table: str, *, since: datetime | None = None, progress: Progress | None = None) -> pd.DataFrame:
        """The whole table, or every object created since `since`; never silently short."""
        return self.tables([table], since=since, progress=progress)[table]

    def tables(self, names: Iterable[str] | None = None, *, since: datetime | None = None,
               progress: Progress | None = None) -> dict[str, pd.DataFrame]:
        """Several tables fetched concurrently under this account's one rate budget.

        Child tables come from their parents' embedded lists (fetched separately only when a
        list says `has_more`); asking for a child table fetches its parent too.
        """
        wanted = list(EXPECTED_TABLES + CHILD_TABLES if names is None else names)
        for name in wanted:
            schema(name)  # raises UnknownTableError with the valid names
        parents: dict[str, list[str]] = {}
        for name in wanted:
            target = schema(name)
            parents.setdefault(target.parent or name, [])
            if target.parent:
                parents[target.parent].append(name)
        since_ts = _timestamp(since)
        plans = [self._plan(schema(parent), since=since_ts, children=children) for parent, children in parents.items()]
        job = Job(fetcher=self._fetcher(), plans=plans, workers=self._workers, floor=self._account_floor,
                  known_floor=self._floor,
                  progress=progress, windowing=self._windowing, search_delay=self._search_lane_delay(), prebuild=True)
        job.fetcher.cancelled = lambda: job._error is not None  # noqa: SLF001 - stop sleeping retries early
        try:
            job.run()
        finally:
            self.last_stats = job.fetcher.stats
        return {name: _frame(job, name) for name in wanted}

    def account_id(self) -> str:
        """The Stripe account this source reads: the `Stripe-Account` given, else the key's own account.

        A restricted key that may not read the account is named by its key's fingerprint.
        """
        if self._account:
            return self._account
        with self._floor_lock:
            if self._account_id is None:
                try:
                    account = self._fetcher().object("account", "/v1/account", {})
                    self._account_id = account["id"]
                except PermissionDenied:
                    self._account_id = "key_" + self._fingerprint
            return self._account_id

    def fetch(self, requests: Mapping[str, "TableRequest"], *, progress: Progress | None = None,
              table_progress: Callable[[str, int], None] | None = None) -> "Fetched":
        """What a warehouse sync needs in one go, under this account's rate budget.

        Per parent table: list it (whole, or objects created since a moment) and/or retrieve some
        objects by id, with the child tables named. Objects found deleted on retrieve (Stripe's
        `deleted: true`, or 404 `resource_missing`) are reported, never silently skipped.
        """
        plans = []
        for name, request in requests.items():
            plan = self._plan(schema(name), since=request.since, children=list(request.children))
            plan.listed = request.listed
            plans.append(plan)
        fetcher = self._fetcher()
        # Frames are typed while pages arrive unless objects fetched by id join the lists afterwards.
        prebuild = not any(request.ids for request in requests.values())
        job = Job(fetcher=fetcher, plans=plans, workers=self._workers, floor=self._account_floor,
                  known_floor=self._floor, progress=progress, table_progress=table_progress,
                  windowing=self._windowing, search_delay=self._search_lane_delay(), prebuild=prebuild)
        fetcher.cancelled = lambda: job._error is not None  # noqa: SLF001
        deleted: dict[str, set[str]] = {name: set() for name in requests}
        try:
            job.run()
            for name, request in requests.items():
                ids = sorted(request.ids)
                if not ids:
                    continue
                params = {"expand": ["refunds"]} if name == "charges" else {}
                with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="mbi-retrieve") as pool:
                    found = list(pool.map(lambda object_id: _retrieve(fetcher, name, object_id, params), ids))
                live = [obj for obj in found if obj is not None and not obj.get("deleted")]
                deleted[name] |= {object_id for object_id, obj in zip(ids, found) if obj is None or obj.get("deleted")}
                job.absorb_page(job.plans[name], live)
        finally:
            self.last_stats = fetcher.stats
        names = [name for plan in plans for name in (plan.name, *(child.name for child in plan.children))]
        return Fetched(names=tuple(names), build=lambda name: _frame(job, name), deleted=deleted,
                       stats=fetcher.stats)

    def server_clock(self) -> tuple[int | None, bool]:
        """Stripe's clock (from the answer's `Date`) and whether this key may read events, in one request."""
        fetcher = self._fetcher()
        try:
            fetcher.get("events", "/v1/events", {"limit": 1})
        except PermissionDenied:
            return fetcher.server_time, False
        return fetcher.server_time, True

    # --- internals ---------------------------------------------------------------------------

    def _fetcher(self) -> Fetcher:
        return Fetcher(self._transport, self._budget, self._retry, timeouts=self.timeouts)

    def _search_lane_delay(self) -> float | None:
        """How old a window must be for the search lane, or None when the lane is off."""
        limits = self._budget.limits
        wanted = self._search if self._search is not None else limits.per_account > limits.per_endpoint
        return self._search_delay if wanted else None

    def _plan(self, table: TableSchema, *, since: int | None, children: list[str]) -> TablePlan:
        fixed: dict[str, Any] = dict(table.list_params)
        if table.name == "charges":
            fixed["expand"] = ["data.refunds"]  # not embedded by default since API version 2022-11-15
        child_plans = [self._child_plan(schema(child)) for child in children]
        searchable = table.name in SEARCHABLE_TABLES
        return TablePlan(table.name, table.endpoint, Shaper(table), fixed, since, child_plans,
                         search_path=f"{table.endpoint}/search" if searchable else None,
                         search_fixed={"expand": fixed["expand"]} if searchable and "expand" in fixed else {})

    @staticmethod
    def _child_plan(child: TableSchema) -> ChildPlan:
        if child.embedded_field == "items":
            return ChildPlan(child.name, "items", Shaper(child), lambda _: "/v1/subscription_items",
                             lambda parent_id: {"subscription": parent_id})
        return ChildPlan(child.name, child.embedded_field or "", Shaper(child),
                         child.child_endpoint, lambda _: {})

    def _account_floor(self) -> int:
        """The account's creation time: the lower bound used to split `created` ranges."""
        with self._floor_lock:
            if self._floor is None:
                try:
                    created = self._fetcher().object("account", "/v1/account", {}).get("created")
                    valid = isinstance(created, int) and not isinstance(created, bool) and 0 < created < MAX_CREATED
                    self._floor = created if valid else STRIPE_EPOCH
                except PermissionDenied:
                    self._floor = STRIPE_EPOCH  # a restricted key without account access: split from 2011
            return self._floor


@dataclass(frozen=True)
class TableRequest:
    """What to fetch of one parent table for a sync: its list (since a moment) and objects by id."""

    listed: bool = True
    since: int | None = None
    ids: frozenset[str] = frozenset()
    children: tuple[str, ...] = ()


@dataclass
class Fetched:
    """What a fetch found: a frame per table (parents and their children: typed while the pages
    arrived when nothing was retrieved by id, else built on first use, so that a caller can write
    one table while the next is built), objects found deleted, and the cost."""

    names: tuple[str, ...]
    build: Callable[[str], pd.DataFrame]
    deleted: dict[str, set[str]]
    stats: FetchStats
    _frames: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def frame(self, name: str) -> pd.DataFrame:
        with self._lock:
            if name not in self._frames:
                if name not in self.names:
                    raise KeyError(name)
                self._frames[name] = self.build(name)
            return self._frames[name]


def _retrieve(fetcher: Fetcher, table: str, object_id: str, params: dict[str, Any]) -> dict | None:
    try:
        return fetcher.object(table, f"/v1/{table}/{object_id}", params, endpoint=f"/v1/{table}/*")
    except NotFound:
        return None


def _frame(job: Job, name: str, limit: int | None = None) -> pd.DataFrame:
    """The table's frame; a value that fits no column is a wrong-shape answer like any other."""
    try:
        return job.frame(name, limit=limit)
    except ShapeError as exc:
        raise BadAnswer(f"The answer for {name} is not what Stripe sends: {exc}", table=name, cursor={},
                        code="bad_answer") from exc


def _timestamp(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


__all__ = ["StripeSource", "TableRequest", "Fetched", "EXPECTED_TABLES", "CHILD_TABLES", "ALL_TABLES"]
