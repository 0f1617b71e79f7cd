"""StripeSource against the sandbox: complete tables under faults and rate limits, errors, types, preview.

The sandbox's generator facts (`sandbox.history()`) and served collections (`sandbox.dataset()`)
are the truth every table is compared with: every object exactly once, newest first.
"""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime

import pandas as pd
import pytest
import stripe

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.sandbox import Faults
from mbi_widgets.tables.fetch import (
    AuthenticationFailed,
    FetchError,
    PermissionDenied,
    RetryPolicy,
    StripeSourceError,
)
from mbi_widgets.tables.schema import ALL_TABLES, CHILD_TABLES, EXPECTED_TABLES, schema

#: Client pacing far above what the tests need (the default paces at Stripe's real 25 req/s).
FAST = {"per_account": 500, "per_endpoint": 500}
#: Child table -> (dataset children key, parent table).
CHILD_SOURCES = {"invoices__lines": ("invoice_lines", "invoices"),
                 "subscriptions__items": ("subscription_items", "subscriptions"),
                 "charges__refunds": ("charge_refunds", "charges")}


def quick_retry(**overrides) -> RetryPolicy:
    return RetryPolicy(**{"base_delay": 0.01, "max_delay": 0.05, **overrides})


def make_source(sandbox: Sandbox, key: str | None = None, **options) -> StripeSource:
    options.setdefault("rate_limits", FAST)
    return StripeSource(key or sandbox.restricted_key, api_base=sandbox.api_url, **options)


# --- what the sandbox serves ---------------------------------------------------------------------

def fact_ids(sandbox: Sandbox, table: str, account: int = 0) -> set:
    """Ids of a top-level table, or (parent id, child id) pairs of a child table, from the generator."""
    h = sandbox.history(account)
    facts = {
        "customers": {c.id for c in h.customers},
        "charges": {c.id for c in h.charges},
        "coupons": {c.id for c in h.coupons},
        "invoices": {i.id for i in h.invoices},
        "plans": {p.id for p in h.plans},
        "subscriptions": {s.id for s in h.subscriptions},
        "events": {e.id for e in h.events},
        "invoices__lines": {(i.id, line.id) for i in h.invoices for line in i.lines},
        "subscriptions__items": {(s.id, item.id) for s in h.subscriptions for item in s.items},
        "charges__refunds": {(r.charge.id, r.id) for r in h.refunds},
    }
    return facts[table]


def served_order(sandbox: Sandbox, table: str, account: int = 0) -> list[str]:
    """Ids in the order the sandbox lists them: newest first; children in parent order, then list order."""
    dataset = sandbox.dataset(account)
    if table in EXPECTED_TABLES:
        return [record.id for record in dataset.collections[table].records]
    kind, parent = CHILD_SOURCES[table]
    ids = []
    for record in dataset.collections[parent].records:
        children = dataset.children[kind].get(record.id)
        if children is not None:
            ids += [child.id for child in children.records]
    return ids


def assert_complete(sandbox: Sandbox, frames: dict[str, pd.DataFrame], account: int = 0) -> None:
    for table, frame in frames.items():
        ids = frame["id"].tolist()
        assert len(ids) == len(set(ids)), f"{table}: duplicated ids"
        target = schema(table)
        if target.parent:
            got = set(zip(frame[target.parent_key].tolist(), ids))
        else:
            got = set(ids)
        expected = fact_ids(sandbox, table, account)
        assert got == expected, (f"{table}: {len(expected - got)} missing, {len(got - expected)} unexpected "
                                 f"of {len(expected)}")
        assert ids == served_order(sandbox, table, account), f"{table}: not in newest-first order"
        if not target.parent:
            created = frame["created"]
            assert created.is_monotonic_decreasing, f"{table}: created is not descending"


class CountingTransport:
    """Wraps `source._transport.get` to count requests (and optionally run a hook before each)."""

    def __init__(self, source: StripeSource, before=None) -> None:
        self.inner = source._transport.get
        self.paths: list[str] = []
        self.before = before
        self.in_flight: dict[int, str] = {}
        self.overlaps: list[set[str]] = []
        self._lock = threading.Lock()
        source._transport.get = self.get

    def get(self, path, params):
        with self._lock:
            self.paths.append(path)
            self.in_flight[threading.get_ident()] = path
            self.overlaps.append(set(self.in_flight.values()))
        try:
            if self.before is not None:
                self.before(path, params)
            return self.inner(path, params)
        finally:
            with self._lock:
                del self.in_flight[threading.get_ident()]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_source(sandbox):
    return make_source(sandbox)


@pytest.fixture(scope="module")
def demo_frames(demo_source):
    frames = demo_source.tables()
    return frames, demo_source.last_stats


@pytest.fixture(scope="module")
def small():
    """A plain small sandbox for credentials and error tests (keys get added to it)."""
    with Sandbox(seed=3, scale=60) as running:
        yield running


@pytest.fixture(scope="module")
def faulty():
    with Sandbox(seed=1, scale=120, faults=Faults(rate=0.2, kinds=("500", "503", "drop"), seed=1)) as running:
        yield running


@pytest.fixture(scope="module")
def limited():
    with Sandbox(seed=2, scale=60, rate_limits={"per_account": 10, "per_endpoint": 10}) as running:
        yield running


# --- completeness ----------------------------------------------------------------------------------

def test_every_object_exactly_once_newest_first(sandbox, demo_frames):
    frames, stats = demo_frames
    assert set(frames) == set(ALL_TABLES)
    assert_complete(sandbox, frames)
    assert stats.requests > 0 and stats.retried == 0 and stats.rate_limited == 0


def test_embedded_lists_with_has_more_are_followed(sandbox, demo_frames):
    frames, _ = demo_frames
    history = sandbox.history()
    dataset = sandbox.dataset()
    big_sub = max(history.subscriptions, key=lambda s: len(s.items))
    assert len(big_sub.items) > 10
    assert json.loads(dataset.collections["subscriptions"].get(big_sub.id).body)["items"]["has_more"] is True
    items = frames["subscriptions__items"]
    mine = items[items["subscription_id"] == big_sub.id]
    assert mine["id"].tolist() == [item.id for item in big_sub.items]
    assert (mine["subscription"] == big_sub.id).all()

    charge = max(history.charges, key=lambda c: len(c.refunds))
    assert len(charge.refunds) == 12
    assert "refunds" not in json.loads(dataset.collections["charges"].get(charge.id).body)  # only when expanded
    assert len(dataset.children["charge_refunds"][charge.id]) > 10  # beyond what an expansion embeds
    refunds = frames["charges__refunds"]
    mine = refunds[refunds["charge_id"] == charge.id]
    assert mine["id"].tolist() == [r.id for r in reversed(charge.refunds)]  # newest first, like Stripe
    assert mine["amount"].tolist() == [r.amount for r in reversed(charge.refunds)]
    charges = frames["charges"].set_index("id")
    assert charges.loc[charge.id, "amount_refunded"] == sum(r.amount for r in charge.refunds)


def test_charges_are_split_into_created_windows(sandbox, demo_source):
    charges = demo_source.table("charges")
    stats = demo_source.last_stats
    assert sandbox.dataset().count("charges") > 500
    assert stats.windows > 1
    assert stats.requests >= len(charges) // 100 + 1
    assert_complete(sandbox, {"charges": charges})


def test_complete_under_server_rate_limits(limited):
    source = make_source(limited, workers=4, retry=quick_retry(max_rate_limited=200))
    frames = source.tables()
    assert source.last_stats.rate_limited > 0, "the server's lower limits should have answered 429s"
    assert_complete(limited, frames)


def test_complete_under_5xx_and_dropped_connections(faulty):
    source = make_source(faulty, retry=quick_retry(max_transient=10))
    frames = source.tables()
    assert source.last_stats.retried > 0, "faults at a 20% rate should have forced retries"
    assert_complete(faulty, frames)

    charges = source.table("charges")
    assert faulty.dataset().count("charges") > 500
    assert source.last_stats.windows > 1
    assert_complete(faulty, {"charges": charges})


@pytest.mark.parametrize("kind", ["drop", "500", "502", "503"])
def test_each_transient_fault_is_retried(small, kind):
    small.inject_fault(kind, count=3, path="/v1/coupons")
    source = make_source(small, retry=quick_retry())
    coupons = source.table("coupons")
    assert source.last_stats.retried == 3
    assert_complete(small, {"coupons": coupons})


# --- errors -----------------------------------------------------------------------------------------

def test_exhausted_retries_raise_fetch_error_with_cursor():
    with Sandbox(seed=4, scale=60) as sb:
        sb.inject_fault("503", count=50, path="/v1/charges")
        source = make_source(sb, retry=RetryPolicy(max_transient=2, base_delay=0.01, max_delay=0.02))
        with pytest.raises(FetchError) as caught:
            source.table("charges")
    error = caught.value
    assert "charges" in str(error)
    assert error.table == "charges"
    assert isinstance(error.cursor, dict)
    assert error.cursor["limit"] == 100 and error.cursor["expand"] == ["data.refunds"]
    assert source.last_stats.retried == 3  # the first attempt and max_transient retries


def test_failure_after_some_pages_raises_instead_of_a_short_table():
    with Sandbox(seed=5, scale=60) as sb:
        assert sb.dataset().count("charges") > 200
        source = make_source(sb, workers=1, retry=RetryPolicy(max_transient=2, base_delay=0.01, max_delay=0.02))
        seen = []

        def break_after_first_page(path, params):
            if path != "/v1/charges":
                return  # the account (where windows start), asked for beside the first page
            seen.append(dict(params))
            if len(seen) == 2:  # the first page came back: every later charges page fails
                sb.inject_fault("503", count=100, path="/v1/charges")

        CountingTransport(source, before=break_after_first_page)
        with pytest.raises(FetchError) as caught:
            source.table("charges")
    cursor = caught.value.cursor
    assert caught.value.table == "charges"
    assert "starting_after" in cursor or "created" in cursor, cursor
    assert cursor in seen


def test_wrong_key_raises_authentication_failed(small):
    wrong = "rk_test_" + "Wr0ngKeyWr0ngKeyWr0ngKeyWr0ngKey"
    source = make_source(small, key=wrong)
    with pytest.raises(AuthenticationFailed) as caught:
        source.table("customers")
    assert wrong not in str(caught.value)
    with pytest.raises(AuthenticationFailed):
        source.preview("charges")


def test_restricted_key_without_charges_permission(small):
    key = small.create_restricted_key({"customers"})
    source = make_source(small, key=key)
    with pytest.raises(PermissionDenied) as caught:
        source.table("charges")
    assert "charges" in str(caught.value)
    with pytest.raises(PermissionDenied):
        source.tables(["customers", "charges"])  # never the readable half alone
    customers = source.table("customers")  # lists beyond one page without /v1/account access
    assert_complete(small, {"customers": customers})


def test_publishable_key_is_refused_at_construction(small):
    with pytest.raises(StripeSourceError) as caught:
        StripeSource("pk_test_" + "a1b2c3d4e5f6a1b2c3d4e5f6", api_base=small.api_url)
    assert not isinstance(caught.value, FetchError)
    assert "restricted key" in str(caught.value)


# --- since -----------------------------------------------------------------------------------------

def test_since_returns_exactly_objects_created_at_or_after(sandbox, demo_source):
    records = sandbox.dataset().collections["charges"].records
    moment = records[250].created  # a second that some charge was created at
    charges = demo_source.table("charges", since=datetime.fromtimestamp(moment, UTC))
    expected = [r.id for r in records if r.created >= moment]
    assert charges["id"].tolist() == expected
    assert (charges["created"] >= pd.Timestamp(moment, unit="s", tz="UTC")).all()
    assert len(expected) < len(records)

    naive = demo_source.table("charges", since=datetime.fromtimestamp(moment, UTC).replace(tzinfo=None))
    assert naive["id"].tolist() == expected  # a naive moment is read as UTC

    invoices = sandbox.dataset().collections["invoices"].records
    moment = invoices[len(invoices) // 3].created
    frames = demo_source.tables(["invoices", "invoices__lines"], since=datetime.fromtimestamp(moment, UTC))
    wanted = {r.id for r in invoices if r.created >= moment}
    assert set(frames["invoices"]["id"]) == wanted
    lines = {pair for pair in fact_ids(sandbox, "invoices__lines") if pair[0] in wanted}
    assert set(zip(frames["invoices__lines"]["invoice_id"], frames["invoices__lines"]["id"])) == lines


# --- columns and types -------------------------------------------------------------------------------

def assert_unknown_to_schema(table: str, column: str) -> None:
    """An extra column must be a field the schema has no place for (not even inside a JSON column)."""
    target = schema(table)
    path = tuple(column.split("__"))
    assert column not in target.column_names, f"{table}.{column} is a schema column"
    for known in target.columns:
        assert known.path[:len(path)] != path, f"{table}.{column} is a known object ({known.name})"
        inside = len(known.path) < len(path) and path[:len(known.path)] == known.path
        assert not inside, f"{table}.{column} belongs in the known column {known.name}"


def test_full_account_columns_and_dtypes_follow_schema(demo_frames):
    frames, _ = demo_frames
    extras_seen = {}
    for table, frame in frames.items():
        target = schema(table)
        assert list(frame.columns[:len(target.columns)]) == target.column_names, table
        assert {c: str(frame[c].dtype) for c in target.column_names} == target.dtypes, table
        extras = list(frame.columns[len(target.columns):])
        for column in extras:
            assert_unknown_to_schema(table, column)
        extras_seen[table] = extras
        assert frame["id"].notna().all() and frame["id"].is_unique, table
        assert target.primary_key == "id"
    # The sandbox renders invoices with the pre-2025 top-level `subscription` field, which the
    # pinned API version moved to parent.subscription_details: kept as an extra column.
    assert extras_seen["invoices"] == ["subscription"]


def test_extra_columns_keep_the_served_values(sandbox, demo_frames):
    frames, _ = demo_frames
    invoices = frames["invoices"].set_index("id")
    for inv in sandbox.history().invoices:
        expected = inv.subscription.id if inv.subscription else None
        for column in ("subscription", "parent__subscription_details__subscription"):
            got = invoices.loc[inv.id, column]
            assert (None if pd.isna(got) else got) == expected, (inv.id, column)


def test_values_and_dtypes_match_the_generator(sandbox, demo_frames):
    frames, _ = demo_frames
    charges = frames["charges"].set_index("id")
    assert str(charges["created"].dtype) == "datetime64[ns, UTC]"
    assert str(charges["amount"].dtype) == "Int64"
    assert str(charges["paid"].dtype) == "boolean"
    assert str(charges.index.dtype) == "string" and str(charges["customer"].dtype) == "string"
    for ch in sandbox.history().charges:
        row = charges.loc[ch.id]
        assert row["created"] == pd.Timestamp(ch.created, unit="s", tz="UTC")
        assert row["amount"] == ch.amount
        assert row["customer"] == ch.customer.id
        assert bool(row["paid"]) is ch.succeeded
        assert row["billing_details__address__city"] == ch.customer.attrs(ch.created)["address"]["city"]
        assert row["payment_method_details__card__last4"] == ch.customer.card.last4

    invoices = frames["invoices"].set_index("id")
    now = sandbox.history().now
    paid = [inv for inv in sandbox.history().invoices if inv.status(now) == "paid"]
    assert paid
    for inv in paid:
        assert invoices.loc[inv.id, "status_transitions__paid_at"] == pd.Timestamp(inv.paid_at, unit="s", tz="UTC")
        assert invoices.loc[inv.id, "total"] == inv.total
    statuses = set(frames["subscriptions"]["status"])
    assert "canceled" in statuses and "active" in statuses

    for table, frame in frames.items():
        for column in schema(table).columns:
            if column.kind == "timestamp":
                assert str(frame[column.name].dtype) == "datetime64[ns, UTC]"
            if column.kind == "bool":
                assert str(frame[column.name].dtype) == "boolean"


def test_metadata_is_json_text(demo_frames):
    frames, _ = demo_frames
    for table, frame in frames.items():
        if "metadata" not in frame.columns:
            continue
        values = frame["metadata"].dropna()
        assert len(values) == len(frame), f"{table}: metadata missing"
        for text in values:
            assert isinstance(json.loads(text), dict)


def test_events_carry_their_object(sandbox, demo_frames):
    frames, _ = demo_frames
    events = frames["events"]
    assert {"data__object__id", "data__object__object", "data__object"} <= set(events.columns)
    served = {r.id: json.loads(r.body) for r in sandbox.dataset().collections["events"].records}
    for row in events.itertuples(index=False):
        obj = json.loads(row.data__object)
        assert obj["id"] == row.data__object__id == served[row.id]["data"]["object"]["id"]
        assert obj["object"] == row.data__object__object
        assert obj == served[row.id]["data"]["object"]
    assert events["data__object__id"].notna().all()


def test_child_tables_point_at_their_parents(demo_frames):
    frames, _ = demo_frames
    for child in CHILD_TABLES:
        target = schema(child)
        frame = frames[child]
        parent_ids = set(frames[target.parent]["id"])
        assert len(frame) > 0
        assert frame[target.parent_key].notna().all()
        assert set(frame[target.parent_key]) <= parent_ids
        own_field = {"invoice_id": "invoice", "subscription_id": "subscription", "charge_id": "charge"}
        reference = own_field[target.parent_key]
        if reference in frame.columns:
            assert (frame[reference] == frame[target.parent_key]).all(), child


def test_empty_account_has_the_schema_columns(sandbox):
    platform = make_source(sandbox, key=sandbox.secret_key)
    frames = platform.tables()
    for table in ("customers", "charges", "invoices", "subscriptions", *CHILD_TABLES):
        assert len(frames[table]) == 0, table
    for table, frame in frames.items():
        target = schema(table)
        assert list(frame.columns) == target.column_names, table
        assert {c: str(t) for c, t in frame.dtypes.items()} == target.dtypes, table


def test_all_tables_empty_give_identical_columns(sandbox):
    source = make_source(sandbox, key=sandbox.secret_key)
    source._transport.get = lambda path, params: (200, {"object": "list", "data": [], "has_more": False}, {})
    frames = source.tables()
    assert set(frames) == set(ALL_TABLES)
    for table, frame in frames.items():
        target = schema(table)
        assert len(frame) == 0
        assert list(frame.columns) == target.column_names
        assert {c: str(t) for c, t in frame.dtypes.items()} == target.dtypes


# --- preview -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", EXPECTED_TABLES)
def test_preview_is_the_newest_rows_in_one_request(sandbox, demo_frames, table):
    frames, _ = demo_frames
    source = make_source(sandbox)
    counter = CountingTransport(source)
    preview = source.preview(table)
    assert counter.paths == [f"/v1/{table}"]
    full = frames[table]
    assert len(preview) == min(100, len(full))
    pd.testing.assert_frame_equal(preview, full.head(len(preview)).reset_index(drop=True), check_like=False)

    five = source.preview(table, rows=5)
    assert len(counter.paths) == 2
    assert five["id"].tolist() == full["id"].head(5).tolist()


def test_preview_beyond_one_page(demo_source, demo_frames):
    frames, _ = demo_frames
    preview = demo_source.preview("charges", rows=150)
    assert preview["id"].tolist() == frames["charges"]["id"].head(150).tolist()


def test_preview_of_a_child_table(sandbox, demo_frames):
    frames, _ = demo_frames
    source = make_source(sandbox)
    counter = CountingTransport(source)
    items = source.preview("subscriptions__items")
    assert counter.paths == ["/v1/subscriptions"]
    assert len(items) == 100
    assert items["id"].tolist() == frames["subscriptions__items"]["id"].head(100).tolist()
    assert list(items.columns) == schema("subscriptions__items").column_names
    five = source.preview("subscriptions__items", rows=5)
    assert five["id"].tolist() == frames["subscriptions__items"]["id"].head(5).tolist()


# Guards: a child preview pages parents until it has the rows asked for.
def test_preview_of_a_child_table_returns_the_rows_asked_for(sandbox, demo_frames):
    frames, _ = demo_frames
    assert len(frames["charges__refunds"]) > 5
    five = make_source(sandbox).preview("charges__refunds", rows=5)
    assert five["id"].tolist() == frames["charges__refunds"]["id"].head(5).tolist()


# Guards: a child preview completes long embedded lists, so it is a prefix of the full table.
def test_preview_of_a_child_table_is_a_prefix_of_the_table(sandbox, demo_frames):
    frames, _ = demo_frames
    preview = make_source(sandbox).preview("invoices__lines")
    assert len(preview) > 0
    assert preview["id"].tolist() == frames["invoices__lines"]["id"].head(len(preview)).tolist()


# --- several sources, several tables -----------------------------------------------------------------

def test_sources_for_different_accounts_do_not_share_credentials(sandbox):
    global_key = stripe.api_key
    first = make_source(sandbox)
    second_account = sandbox.accounts[1].id
    second = make_source(sandbox, key=sandbox.secret_key, account=second_account)
    platform = make_source(sandbox, key=sandbox.secret_key)
    results: dict[str, pd.DataFrame] = {}

    def read(name, source):
        results[name] = source.table("customers")

    threads = [threading.Thread(target=read, args=item) for item in
               (("first", first), ("second", second), ("platform", platform))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results["first"]["id"]) == fact_ids(sandbox, "customers", 0)
    assert set(results["second"]["id"]) == fact_ids(sandbox, "customers", 1)
    assert len(results["platform"]) == 0
    assert not set(results["first"]["id"]) & set(results["second"]["id"])
    assert stripe.api_key == global_key  # nothing stored at module level

    redacted = re.compile(r"(rk|sk)_test_[A-Za-z0-9]{4}\*\*\*\*[A-Za-z0-9]{4}")
    for source, key in ((first, sandbox.restricted_key), (second, sandbox.secret_key)):
        text = repr(source)
        assert key not in text and key[8:] not in text
        assert redacted.search(text), text
        assert f"{key[:12]}****{key[-4:]}" in text
    assert second_account in repr(second)
    assert "account=" not in repr(first)


def test_tables_fetches_concurrently_and_equals_table_calls(sandbox, demo_frames):
    frames, _ = demo_frames
    source = make_source(sandbox)

    def slow(path, params):
        time.sleep(0.01)  # long enough for other workers' requests to be in flight meanwhile

    counter = CountingTransport(source, before=slow)
    names = ["customers", "charges", "coupons", "plans", "subscriptions__items"]
    together = source.tables(names)
    assert any(len(paths) > 1 for paths in counter.overlaps), "no two endpoints were ever requested at once"
    assert set(together) == set(names)
    separate = make_source(sandbox)
    for name in names:
        pd.testing.assert_frame_equal(together[name], separate.table(name))
        pd.testing.assert_frame_equal(together[name], frames[name])


def test_progress_counts_increase_to_the_total(demo_source):
    calls = []
    charges = demo_source.table("charges", progress=lambda done, total: calls.append((done, total)))
    counts = [done for done, _ in calls]
    assert len(counts) > 1
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] == len(charges)


def test_progress_is_reported_in_order_across_workers(demo_source):
    calls, active, overlapped = [], [0], []
    lock = threading.Lock()

    def progress(done, total):
        with lock:
            active[0] += 1
            overlapped.append(active[0] > 1)
            calls.append(done)
        time.sleep(0.005)  # a callback that takes a moment, like redrawing a progress bar
        with lock:
            active[0] -= 1

    frames = demo_source.tables(["charges", "invoices", "events"], progress=progress)
    total = sum(len(frame) for frame in frames.values())
    assert not any(overlapped), "the progress callback ran on two workers at once"
    assert all(a < b for a, b in zip(calls, calls[1:])), calls
    assert calls[-1] == total
