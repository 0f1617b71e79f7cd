"""The Search API as a second lane: loads that use it equal list-only loads, row for row, whatever happens.

Runs against the sandbox over HTTP with live mode's limits (100/s per account, 25/s per endpoint,
20/s for all search endpoints) or the same ratios four times faster, and a long indexing delay
(`DELAY`) so that a good part of each table is too new for search.
"""
from __future__ import annotations

import re
import threading
import time
from urllib.parse import parse_qsl, urlsplit

import orjson
import pandas as pd
import pytest
import stripe
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mbi_widgets import Sandbox
from mbi_widgets.ratelimits import SEARCH_ENDPOINT, RateLimits
from mbi_widgets.sandbox import Faults
from mbi_widgets.sandbox.generator import DAY
from mbi_widgets.tables.fetch import FetchStats, RateBudget, RetryPolicy, Windowing
from mbi_widgets.tables.source import StripeSource

SEED, SCALE = 7, 60
#: Live mode's ratios (account 4x an endpoint, search 4/5 of an endpoint), four times faster.
LIMITS = {"per_account": 400, "per_endpoint": 100, "per_search": 80}
#: Objects newer than this are not searchable in the sandbox: about a seventh of each table.
DELAY = 100 * DAY
TABLES = ["charges", "invoices", "customers", "subscriptions", "charges__refunds", "invoices__lines",
          "subscriptions__items"]
#: Small pages and windows, so that a small account makes many windows in both lanes.
SMALL = Windowing(page_size=10, initial_splits=6, min_split_objects=30, search_pages=3)
QUICK = RetryPolicy(max_transient=2, max_rate_limited=20, base_delay=0.005, max_delay=0.05)


class Recording(stripe.RequestsClient):
    """stripe-python's HTTP client, recording each request's path and query; `refuse_search` answers
    every search with that status instead (a key or account Stripe refuses search to)."""

    def __init__(self, refuse_search: int | None = None) -> None:
        super().__init__(timeout=(5, 30))
        self.refuse_search = refuse_search
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def request(self, method, url, headers, post_data=None):
        parts = urlsplit(url)
        with self._lock:
            self.calls.append((parts.path, dict(parse_qsl(parts.query))))
        if self.refuse_search and parts.path.endswith("/search"):
            error = {"type": "invalid_request_error", "message": "Search is refused here."}
            return orjson.dumps({"error": error}), self.refuse_search, {"Content-Type": "application/json"}
        return super().request(method, url, headers, post_data)

    def searches(self) -> list[dict[str, str]]:
        return [params for path, params in self.calls if path.endswith("/search")]


def source_for(sandbox: Sandbox, http: Recording | None = None, **options) -> StripeSource:
    options = {"rate_limits": LIMITS, "search_delay": DELAY, "retry": QUICK, "windowing": SMALL} | options
    if http is None:
        return StripeSource(sandbox.restricted_key, api_base=sandbox.api_url, **options)
    client = stripe.StripeClient(sandbox.restricted_key, base_addresses={"api": sandbox.api_url},
                                 max_network_retries=0, http_client=http)
    return StripeSource(client=client, **options)


def sandbox_for(**options) -> Sandbox:
    return Sandbox(seed=SEED, scale=SCALE, search_delay=DELAY, **({"rate_limits": LIMITS} | options))


@pytest.fixture(scope="module")
def baseline() -> dict[str, pd.DataFrame]:
    """The list-only load everything is compared with (the same seed gives the same objects); its frames
    are built in one go after the last page (`part_rows` above any table's size)."""
    whole = Windowing(page_size=10, initial_splits=6, min_split_objects=30, search_pages=3, part_rows=10**9)
    with sandbox_for() as sandbox:
        frames = source_for(sandbox, search=False, windowing=whole).tables(TABLES)
    assert len(frames["charges"]) > 300 and len(frames["invoices__lines"]) > 300
    return frames


def assert_same(frames: dict[str, pd.DataFrame], baseline: dict[str, pd.DataFrame]) -> None:
    assert list(frames) == list(baseline)
    for name, frame in frames.items():
        pd.testing.assert_frame_equal(frame, baseline[name], check_exact=True, obj=name)


def newest_searched(http: Recording) -> int:
    """The highest `created<` bound of every search sent (every search has one)."""
    bounds = [int(re.search(r"created<(\d+)", params["query"]).group(1)) for params in http.searches()]
    return max(bounds)


# --- the property ----------------------------------------------------------------------------------

_LANE_FAULTS = st.dictionaries(
    keys=st.tuples(st.sampled_from(["list", "search"]), st.sampled_from(["charges", "invoices", "customers"])),
    values=st.tuples(st.sampled_from(["429", "500", "503", "drop"]), st.integers(1, 5)),
    max_size=4)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page_size=st.integers(5, 40), initial_splits=st.integers(0, 8), min_split=st.integers(10, 200),
       search_pages=st.integers(1, 5), part_rows=st.integers(1, 400), workers=st.integers(1, 6),
       faults=_LANE_FAULTS)
def test_list_and_search_equal_list_only(baseline, page_size, initial_splits, min_split, search_pages, part_rows,
                                         workers, faults):
    """Whatever the windows, lanes, 429s, 5xx and dropped connections, and however the frames are typed
    part by part while pages arrive: the same rows, columns, dtypes and order as a list-only load built
    in one go, and search never asked for objects newer than the indexing delay."""
    windowing = Windowing(page_size=page_size, initial_splits=initial_splits, min_split_objects=min_split,
                          search_pages=search_pages, part_rows=part_rows)
    with sandbox_for() as sandbox:
        for (lane, table), (kind, count) in faults.items():
            # A list page may fail twice (QUICK retries it); a search page as often as it likes (it falls back).
            path = f"/v1/{table}/search" if lane == "search" else f"/v1/{table}"
            sandbox.inject_fault(kind, count if lane == "search" else min(count, 2), path)
        http = Recording()
        source = source_for(sandbox, http, search=True, windowing=windowing, workers=workers)
        frames = source.tables(TABLES)
        assert_same(frames, baseline)
        if http.searches():
            assert newest_searched(http) <= sandbox.now - DELAY
        event(f"searched: {bool(http.searches())}, fell back: {source.last_stats.search_fallbacks > 0}")


# --- when the lane is used -----------------------------------------------------------------------------

def test_live_mode_uses_search_for_older_windows_with_the_same_rows(baseline):
    """Stripe's live limits, for real: search takes part by default and changes nothing in the result."""
    with sandbox_for(rate_limits="live") as sandbox:
        http = Recording()
        source = source_for(sandbox, http, rate_limits="live", windowing=Windowing(page_size=20, min_split_objects=40))
        frames = source.tables(TABLES)
        stats = source.last_stats
    assert_same(frames, baseline)
    assert stats.by_endpoint[SEARCH_ENDPOINT] >= 3 and stats.by_endpoint["/v1/charges"] >= 3
    assert stats.search_fallbacks == 0 and stats.rate_limited == 0
    assert newest_searched(http) <= sandbox.now - DELAY
    # A search window is started once and then followed by its tokens.
    first_pages = [params["query"] for params in http.searches() if "page" not in params]
    assert len(first_pages) == len(set(first_pages))


def test_test_mode_limits_and_search_false_never_search(baseline):
    """Without headroom above the per-endpoint limit search cannot help, so it is off unless forced."""
    with sandbox_for() as sandbox:
        for options in ({"rate_limits": {"per_account": 100, "per_endpoint": 100}}, {"search": False}):
            http = Recording()
            assert_same(source_for(sandbox, http, **options).tables(TABLES), baseline)
            assert http.searches() == [] and {path for path, _ in http.calls if "/search" in path} == set()


def test_windows_newer_than_the_delay_go_to_the_list():
    """The guard matters: a source that trusted search for newer windows would lose the rows not yet
    indexed (here, with no delay of its own); with the delay it loses none."""
    with sandbox_for() as sandbox:
        listed = source_for(sandbox, search=False).table("charges")
        http = Recording()
        trusting = source_for(sandbox, http, search=True, search_delay=0, workers=4).table("charges")
        assert newest_searched(http) > sandbox.now - DELAY  # it did search the new windows
        assert len(trusting) < len(listed)
        careful = source_for(sandbox, search=True, workers=4).table("charges")
        pd.testing.assert_frame_equal(careful, listed, check_exact=True)


# --- falling back ----------------------------------------------------------------------------------

def test_a_region_without_search_gives_the_same_rows(baseline):
    with sandbox_for(search=False) as sandbox:
        http = Recording()
        source = source_for(sandbox, http, search=True, workers=4)
        assert_same(source.tables(TABLES), baseline)
    # A 404 turns search off for every table: only the windows already on their way asked.
    assert 1 <= source.last_stats.search_fallbacks == len(http.searches()) <= 4


@pytest.mark.parametrize("status", [400, 403, 404])
def test_search_refused_falls_back_to_the_list(baseline, status):
    """A key Stripe refuses search to (403), a query it rejects (400), no search here (404)."""
    with sandbox_for() as sandbox:
        http = Recording(refuse_search=status)
        source = source_for(sandbox, http, search=True, workers=3)
        assert_same(source.tables(TABLES), baseline)
    assert 1 <= len(http.searches()) <= 3 and source.last_stats.search_fallbacks == len(http.searches())


def test_a_window_that_fails_halfway_through_search_is_reread_whole_by_the_list():
    """A search window's second page fails three times (beyond QUICK's retries): the list reads the
    whole window again, from its top; no row is lost or doubled."""
    windowing = Windowing(page_size=10, initial_splits=2, min_split_objects=30, search_pages=4)
    with sandbox_for() as sandbox:  # one worker: the same requests in the same order every time
        listed = source_for(sandbox, search=False).table("charges")
        rehearsal = Recording()
        source_for(sandbox, rehearsal, search=True, workers=1, windowing=windowing).table("charges")
    second_page = next(n for n, params in enumerate(rehearsal.searches(), 1) if "page" in params)
    faults = Faults(paths=("/v1/charges/search",), on={second_page: "500", second_page + 1: "503",
                                                        second_page + 2: "drop"})
    with sandbox_for(faults=faults) as sandbox:
        http = Recording()
        source = source_for(sandbox, http, search=True, workers=1, windowing=windowing)
        charges = source.table("charges")
    pd.testing.assert_frame_equal(charges, listed, check_exact=True)
    assert source.last_stats.search_fallbacks == 1
    searches = http.searches()
    failed = searches[second_page - 1]["query"]
    assert "page" in searches[second_page - 1] and searches[second_page - 2]["query"] == failed
    low, high = (int(v) for v in re.fullmatch(r"created>=(\d+) AND created<(\d+)", failed).groups())
    reread = [params for path, params in http.calls if path == "/v1/charges" and params.get("created[gte]") == str(low)
              and params.get("created[lt]") == str(high)]
    assert reread and "starting_after" not in reread[0]
    assert searches[second_page - 1] == searches[second_page] == searches[second_page + 1]  # retried twice
    # Then search is off for charges: no new search window starts (one already under way may finish its pages).
    assert all("page" in params for params in searches[second_page + 2:])


# --- budgets -------------------------------------------------------------------------------------

def test_search_has_its_own_budget_under_the_accounts():
    budget = RateBudget(RateLimits(per_account=10_000, per_endpoint=10_000, per_search=100))
    started = time.monotonic()
    for _ in range(30):
        budget.acquire("/v1/charges")
    listing = time.monotonic() - started
    started = time.monotonic()
    for _ in range(30):
        budget.acquire(SEARCH_ENDPOINT)
    searching = time.monotonic() - started
    assert listing < 0.1 and 0.25 < searching < 1.0  # 28 beyond the burst at 100/s

    shared = RateBudget(RateLimits(per_account=100, per_endpoint=10_000, per_search=10_000))
    started = time.monotonic()
    for index in range(30):
        shared.acquire(SEARCH_ENDPOINT if index % 2 else "/v1/charges")
    assert time.monotonic() - started > 0.25  # searches and lists draw on the one account budget


def test_floor_counts_the_search_lane_at_its_own_limit():
    stats = FetchStats(requests=450, by_endpoint={"/v1/charges": 250, SEARCH_ENDPOINT: 200})
    assert stats.floor_seconds(RateLimits.live_mode()) == pytest.approx(10.0)  # 250/25 and 200/20
    stats = FetchStats(requests=450, by_endpoint={"/v1/charges": 450})
    assert stats.floor_seconds(RateLimits.live_mode()) == pytest.approx(18.0)


def test_search_options_are_checked():
    with pytest.raises(Exception, match="search is True, False or None"):
        StripeSource("rk_test_abc", search="yes")
    for bad in (-1, float("inf"), "60", True):
        with pytest.raises(Exception, match="search_delay"):
            StripeSource("rk_test_abc", search_delay=bad)
