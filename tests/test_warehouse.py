"""`Warehouse` against the sandbox: full then incremental syncs equal a fresh load, deletions are
flagged, errors say what to do, failed syncs keep the previous state, and keys never reach the file.

The oracle is `assert_matches_fresh`: a fresh `StripeSource.tables()` taken at the same sandbox
moment. `tests/test_warehouse_properties.py` drives the same oracle with generated histories.
"""
from __future__ import annotations

import re
import select
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterable
from urllib.parse import urlencode

import duckdb
import pandas as pd
import pytest
import requests
from pandas.testing import assert_frame_equal

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.sandbox import parse_redirect
from mbi_widgets.sandbox.generator import DAY
from mbi_widgets.tables.fetch import AuthenticationFailed, FetchError, PermissionDenied, RetryPolicy
from mbi_widgets.tables.schema import ALL_TABLES, CHILD_TABLES, UnknownTableError, schema
from mbi_widgets.warehouse import ACCUMULATING, REREAD_TABLES, Warehouse, WarehouseError, WarehouseLocked

#: Client pacing far above what the tests need (the default paces at Stripe's real 25 req/s).
FAST = {"per_account": 2_000, "per_endpoint": 2_000}
REDIRECT = "http://127.0.0.1:8765/callback"
#: Top-level tables whose objects the sandbox deletes (with `*.deleted` events).
DELETABLE = ("customers", "coupons", "plans")
#: Every resource but events: a key that syncs every table except `events`.
NO_EVENTS = {"customers", "charges", "coupons", "invoices", "plans", "prices", "products", "subscriptions",
             "refunds", "account"}
PARENTS = tuple(t for t in ALL_TABLES if t not in CHILD_TABLES)


def quick_retry(**overrides) -> RetryPolicy:
    return RetryPolicy(**{"base_delay": 0.01, "max_delay": 0.05, **overrides})


def make_source(sb: Sandbox, key: str | None = None, **options) -> StripeSource:
    options.setdefault("rate_limits", FAST)
    options.setdefault("retry", quick_retry())
    return StripeSource(key or sb.restricted_key, api_base=sb.api_url, **options)


# --- the oracle ---------------------------------------------------------------------------------------

def assert_matches_fresh(wh: Warehouse, source: StripeSource, tables: Iterable[str] | None = None, *,
                         account: str | None = None, columns: dict[str, list[str]] | None = None,
                         held: dict[str, pd.DataFrame] | None = None,
                         read_live: bool = True) -> dict[str, pd.DataFrame]:
    """The warehouse's live rows equal a fresh full load taken now, table by table; returns the load.

    Values and dtypes are compared in every column the warehouse holds (after sorting by id);
    `columns` (table -> selected columns) also pins which columns those are. `events` keeps
    history beyond Stripe's 30 days, so there the warehouse must hold a superset and equal the
    fresh load on the ids the load has. `held`, when given, receives each table with its deleted
    rows (`include_deleted=True`), for further checks without reading again. `read_live` False
    takes the live rows from that one read instead of also calling `wh.table(name)` (the
    property tests do, to fit more histories in their time; the tests here read both ways).
    """
    names = list(ALL_TABLES if tables is None else tables)
    fresh = source.tables(names)
    for name in names:
        everything = wh.table(name, account=account, include_deleted=True)
        assert everything["id"].is_unique, f"{name}: the warehouse holds an id twice"
        stored = everything[everything["deleted_at"].isna()].drop(columns=["deleted_at", "synced_at"])
        if read_live:
            assert_frame_equal(wh.table(name, account=account).reset_index(drop=True),
                               stored.reset_index(drop=True), obj=f"{name}: wh.table() and its include_deleted rows")
        if held is not None:
            held[name] = everything
        if columns is not None and name in columns:
            wanted = [c for c in schema(name).column_names if c in columns[name]]
            assert list(stored.columns) == wanted, f"{name}: the warehouse holds other columns than selected"
        expected = fresh[name]
        if name in ACCUMULATING:
            missing = set(expected["id"]) - set(stored["id"])
            assert not missing, f"{name}: {len(missing)} object(s) of the fresh load are missing, e.g. " \
                                f"{sorted(missing)[:3]}"
            stored = stored[stored["id"].isin(set(expected["id"]))]
        extra, missing = set(stored["id"]) - set(expected["id"]), set(expected["id"]) - set(stored["id"])
        assert not extra and not missing, (f"{name}: live ids differ from a fresh load: {len(extra)} extra "
                                           f"{sorted(extra)[:3]}, {len(missing)} missing {sorted(missing)[:3]}")
        left = stored.sort_values("id").reset_index(drop=True)
        right = expected[list(stored.columns)].sort_values("id").reset_index(drop=True)
        assert_frame_equal(left, right, check_dtype=True, obj=f"warehouse table {name!r}")
    return fresh


def snapshot(wh: Warehouse, account: str | None = None) -> dict[str, pd.DataFrame]:
    """Every synced table with its deleted rows, and the status without its wall-clock age."""
    status = wh.status(account).drop(columns=["cursor_age"])
    tables = {"status": status}
    for name in status.loc[status["last_sync_started"].notna(), "table"]:
        tables[name] = wh.table(name, account=account, include_deleted=True)
    return tables


def assert_same_snapshot(before: dict[str, pd.DataFrame], after: dict[str, pd.DataFrame]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert_frame_equal(before[name], after[name], obj=f"{name} after the failed sync")


def parent_tables(report) -> list[str]:
    return [t for t in report.tables if t not in CHILD_TABLES]


def assert_children_follow_parents(report) -> None:
    for name, result in report.tables.items():
        parent = schema(name).parent
        if parent:
            assert result.mode == report[parent].mode, name
            assert result.reason == f"with {parent}: {report[parent].reason}", name


# --- fixtures and helpers ----------------------------------------------------------------------------

@pytest.fixture
def sb():
    """A small sandbox of its own per test: tests move its clock and disconnect accounts."""
    with Sandbox(seed=0, scale=40, redirect_uris=(REDIRECT,)) as running:
        yield running


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "wh.duckdb")


def connect_oauth(sb: Sandbox, account: int = 0) -> str:
    """An OAuth access token for a seeded account, through the sandbox's Connect sign-in and code exchange."""
    url = f"{sb.connect_url}/oauth/authorize?" + urlencode(
        {"response_type": "code", "client_id": sb.client_id, "scope": "read_only", "state": "wh",
         "redirect_uri": REDIRECT})
    code = parse_redirect(sb.authorize(url, account=account))["code"]
    answer = requests.post(f"{sb.connect_url}/oauth/token", timeout=10,
                           data={"grant_type": "authorization_code", "code": code, "client_secret": sb.secret_key})
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def deauthorize(sb: Sandbox, account: int = 0) -> None:
    """The account disconnects the platform's application (Stripe's /oauth/deauthorize)."""
    answer = requests.post(f"{sb.connect_url}/oauth/deauthorize", timeout=10,
                           data={"client_secret": sb.secret_key, "client_id": sb.client_id,
                                 "stripe_user_id": sb.accounts[account].id})
    assert answer.status_code == 200, answer.text


def drain_faults(sb: Sandbox, path: str | None) -> None:
    """Uses up injected faults still queued for `path` (the next clean answer proves none is left)."""
    url = f"{sb.api_url}{path or '/v1/customers'}"
    for _ in range(50):
        try:
            answer = requests.get(url, params={"limit": 1}, timeout=10,
                                  headers={"Authorization": f"Bearer {sb.secret_key}",
                                           "Stripe-Account": sb.accounts[0].id})
            answer.json()
        except (requests.RequestException, ValueError):
            continue
        if answer.status_code == 200:
            return
    raise AssertionError(f"faults for {path} never ran out")


# --- full, then incremental --------------------------------------------------------------------------

def test_first_sync_is_full_says_why_and_equals_a_fresh_load(sb, wh):
    source = make_source(sb)
    report = wh.sync(source)
    assert list(report.tables) == list(ALL_TABLES)
    for name in PARENTS:
        assert (report[name].mode, report[name].reason) == ("full", "first sync of this table")
    assert_children_follow_parents(report)
    fresh = assert_matches_fresh(wh, source)
    for name in ALL_TABLES:
        assert report[name].rows == report[name].added == len(fresh[name]) > 0, name
        assert report[name].updated == report[name].deleted == 0, name
    assert report.requests == sum(t.requests for t in report.tables.values()) > 0
    assert report.account == sb.accounts[0].id == wh.accounts()[0]
    assert report.server_time == datetime.fromtimestamp(sb.now, UTC)


def test_second_sync_is_incremental_far_cheaper_and_exact(tmp_path):
    with Sandbox(seed=2, scale=600) as big:
        source = make_source(big)
        wh = Warehouse(tmp_path / "wh.duckdb")
        first = wh.sync(source)
        big.advance(hours=6)
        second = wh.sync(source)
        for name in PARENTS:
            if name in REREAD_TABLES:
                assert second[name].mode == "full"
                assert "times_redeemed" in second[name].reason
            else:
                assert (second[name].mode, second[name].reason) == ("incremental", "events since the last sync")
        assert_children_follow_parents(second)
        assert second.added + second.updated > 0, "six hours of business changed nothing?"
        # Full: every page of every table. Incremental: the events since, the newest page of each table.
        assert second.requests * 4 <= first.requests, (first.requests, second.requests)
        for name in ("charges", "invoices", "customers"):
            assert second[name].requests < first[name].requests, name
        assert_matches_fresh(wh, source)


def test_a_gap_beyond_stripes_30_day_events_window_forces_a_full_refresh(sb, wh):
    source = make_source(sb)
    wh.sync(source)
    sb.advance(days=28)
    within = wh.sync(source)
    assert within["charges"].mode == "incremental"
    assert_matches_fresh(wh, source)
    sb.advance(days=31)
    report = wh.sync(source)
    for name in PARENTS:
        if name in REREAD_TABLES:
            continue
        assert report[name].mode == "full", name
        assert "30-day" in report[name].reason and "31.0 days ago" in report[name].reason, report[name].reason
    assert_children_follow_parents(report)
    fresh = assert_matches_fresh(wh, source)
    # Events older than Stripe's 30 days stay in the warehouse.
    kept = wh.table("events")
    assert len(kept) > len(fresh["events"])
    assert kept["created"].min() < pd.Timestamp(sb.now - 30 * DAY, unit="s", tz="UTC")


def test_a_child_table_is_synced_with_its_parent(sb, wh):
    source = make_source(sb)
    report = wh.sync(source, ["charges__refunds"])
    assert set(report.tables) == {"charges", "charges__refunds"}
    assert_matches_fresh(wh, source, ["charges", "charges__refunds"])
    with pytest.raises(WarehouseError, match="not been synced") as caught:
        wh.table("customers")
    assert caught.value.code == "not_synced"


def test_a_full_refresh_asked_for_and_a_rebuild_are_exact(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers", "charges"])
    sb.advance(days=1)
    report = wh.sync(source, ["customers"], full=True)
    assert (report["customers"].mode, report["customers"].reason) == ("full", "a full refresh was asked for")
    sb.advance(days=1)
    rebuilt = wh.rebuild(source, ["charges"])
    assert list(rebuilt.tables) == ["charges", "charges__refunds"]
    assert rebuilt["charges"].mode == "full" and rebuilt["charges"].added == rebuilt["charges"].rows
    assert_matches_fresh(wh, source, ["charges", "charges__refunds"])
    sb.advance(hours=1)
    wh.sync(source, ["customers"])
    assert_matches_fresh(wh, source, ["customers"])


def test_a_table_deselected_is_left_out_of_later_syncs(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers", "events"])
    wh.select("events", synced=False)
    sb.advance(hours=2)
    report = wh.sync(source)
    assert "events" not in report.tables and "customers" in report.tables
    status = wh.status().set_index("table")
    assert not status.loc["events", "synced"] and status.loc["customers", "synced"]
    assert_matches_fresh(wh, source, [t for t in ALL_TABLES if t != "events"])


# --- deletions ----------------------------------------------------------------------------------------

def sandbox_deleting_a_customer(within_days: int = 20) -> tuple[Sandbox, object]:
    """A small sandbox (the first seed that works) where an existing customer is deleted within
    `within_days` of the start, and that customer; found from the generator's facts, so the
    test does not depend on what one seed happens to generate."""
    for seed in range(50):
        sandbox = Sandbox(seed=seed, scale=40)
        customers = sandbox.history(0, whole=True).customers
        doomed = [c for c in customers if c.deleted_at and c.created < sandbox.now < c.deleted_at
                  <= sandbox.now + within_days * DAY]
        if doomed:
            return sandbox, min(doomed, key=lambda c: c.deleted_at)
    raise AssertionError("no seed deletes a customer early: the sandbox no longer simulates deletions?")


def test_a_deleted_customer_stays_as_a_flagged_row(tmp_path):
    unstarted, doomed = sandbox_deleting_a_customer()
    with unstarted as sb:
        wh = Warehouse(tmp_path / "wh.duckdb")
        assert_deleted_objects_stay_flagged(sb, wh, doomed)


def assert_deleted_objects_stay_flagged(sb: Sandbox, wh: Warehouse, doomed) -> None:
    history = sb.history(0, whole=True)
    source = make_source(sb)
    wh.sync(source)
    assert doomed.id in set(wh.table("customers")["id"])
    # Past the customer's deletion, and the sandbox's first coupon and plan deletions (days 2 to 4).
    sb.advance(seconds=max(doomed.deleted_at - sb.now, 5 * DAY) + 3_600)
    report = wh.sync(source)
    assert report["customers"].mode == "incremental"
    assert report["customers"].deleted >= 1
    assert doomed.id not in set(wh.table("customers")["id"])
    everything = wh.table("customers", include_deleted=True)
    row = everything.loc[everything["id"] == doomed.id].iloc[0]
    assert row["deleted_at"] == pd.Timestamp(doomed.deleted_at, unit="s", tz="UTC")
    assert pd.notna(row["synced_at"])
    assert everything["deleted_at"].notna().sum() == wh.status().set_index("table").loc["customers", "deleted_rows"]
    fresh = assert_matches_fresh(wh, source)
    # Coupons and plans deleted meanwhile too (a full re-read each sync notices them).
    for name in ("coupons", "plans"):
        facts = getattr(history, name)
        gone = {o.id for o in facts if o.deleted_at and o.created < sb.started_at < o.deleted_at <= sb.now}
        assert gone, f"the sandbox deleted no {name}"
        flagged = wh.table(name, include_deleted=True).set_index("id")
        assert gone <= set(flagged.index), name
        assert flagged.loc[sorted(gone), "deleted_at"].notna().all(), name
        assert not gone & set(fresh[name]["id"])
    # A later full refresh keeps the deleted customer flagged, with its deletion time.
    sb.advance(days=31)
    assert wh.sync(source)["customers"].mode == "full"
    row = wh.table("customers", include_deleted=True).set_index("id").loc[doomed.id]
    assert row["deleted_at"] == pd.Timestamp(doomed.deleted_at, unit="s", tz="UTC")
    assert_matches_fresh(wh, source)


# --- choosing tables and columns --------------------------------------------------------------------

def test_an_unknown_table_is_refused_with_the_valid_names(sb, wh):
    source = make_source(sb)
    for call in (lambda: wh.sync(source, ["customer"]), lambda: wh.table("customer"),
                 lambda: wh.select("customer", account="acct_x"), lambda: wh.rebuild("acct_x", ["customer"])):
        with pytest.raises(UnknownTableError) as caught:
            call()
        message = str(caught.value)
        assert "'customer'" in message
        assert all(name in message for name in ALL_TABLES), message
    assert wh.accounts() == [], "a refused sync must not create the account"


def test_an_unknown_column_is_refused_with_the_valid_columns(sb, wh):
    wh.sync(make_source(sb), ["customers"])
    for call in (lambda: wh.select("customers", ["email", "emial"]),
                 lambda: wh.table("customers", columns=["emial"])):
        with pytest.raises(WarehouseError) as caught:
            call()
        assert caught.value.code == "unknown_column"
        message = str(caught.value)
        assert "'emial'" in message and all(c in message for c in schema("customers").column_names)
    # Nothing changed: every column is still selected and stored.
    assert list(wh.table("customers").columns) == schema("customers").column_names


def test_id_created_and_the_parent_key_cannot_be_dropped(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers", "invoices"])
    assert wh.select("customers", ["email"]) == ["id", "created", "email"]
    assert wh.select("customers", []) == ["id", "created"]
    assert list(wh.table("customers").columns) == ["id", "created"]
    kept = wh.select("invoices__lines", ["amount"])
    assert kept[:2] == ["id", "invoice_id"] and set(kept) == {"id", "invoice_id", "amount"}
    wh.sync(source, ["invoices"])
    assert_matches_fresh(wh, source, ["customers", "invoices", "invoices__lines"],
                         columns={"customers": ["id", "created"], "invoices__lines": kept})


def test_a_dropped_column_leaves_now_and_adding_it_back_makes_the_next_sync_full(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers"])
    all_columns = schema("customers").column_names
    chosen = wh.select("customers", [c for c in all_columns if c != "name"])
    assert "name" not in wh.table("customers").columns, "a dropped column leaves the warehouse at once"
    with pytest.raises(WarehouseError) as caught:
        wh.table("customers", columns=["name"])
    assert caught.value.code == "column_not_synced" and "wh.select" in str(caught.value)
    sb.advance(hours=3)
    report = wh.sync(source, ["customers"])
    assert report["customers"].mode == "incremental"
    assert_matches_fresh(wh, source, ["customers"], columns={"customers": chosen})
    assert wh.status().set_index("table").loc["customers", "columns"] == len(all_columns) - 1

    assert wh.select("customers") == all_columns
    sb.advance(hours=3)
    report = wh.sync(source, ["customers"])
    assert report["customers"].mode == "full"
    assert "columns were added" in report["customers"].reason
    assert_matches_fresh(wh, source, ["customers"], columns={"customers": all_columns})


def test_dropping_and_re_adding_a_column_before_the_next_sync_refills_it(sb, wh):
    """Regression guard: `select` drops the column from the table at once, so re-adding it before any
    sync must still make the next sync re-read the table (else the column comes back all NULL)."""
    source = make_source(sb)
    wh.sync(source, ["customers"])
    wh.select("customers", ["email"])
    wh.select("customers")
    sb.advance(hours=1)
    report = wh.sync(source, ["customers"])
    assert report["customers"].mode == "full", report["customers"].reason
    assert_matches_fresh(wh, source, ["customers"])


def test_a_child_tables_added_columns_re_read_its_parent(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["subscriptions"])
    wh.select("subscriptions__items", ["quantity"])
    sb.advance(hours=2)
    assert wh.sync(source, ["subscriptions"])["subscriptions"].mode == "incremental"
    wh.select("subscriptions__items")
    sb.advance(hours=2)
    report = wh.sync(source, ["subscriptions"])
    assert report["subscriptions"].mode == "full"
    assert "child table" in report["subscriptions"].reason
    assert_matches_fresh(wh, source, ["subscriptions", "subscriptions__items"])


# --- failures keep the previous state ----------------------------------------------------------------

def test_a_token_revoked_mid_sync_raises_and_leaves_the_warehouse_as_it_was(sb, wh):
    token = connect_oauth(sb)
    source = make_source(sb, token, workers=1)
    wh.sync(source)
    before = snapshot(wh)
    sb.advance(days=2)
    revoked = []

    def revoke_on_first_rows(done: int, total: int | None) -> None:
        if not revoked:
            revoked.append(done)
            deauthorize(sb)

    with pytest.raises(AuthenticationFailed) as caught:
        wh.sync(source, progress=revoke_on_first_rows)
    assert revoked, "the sync never got to its first rows: the revocation was not mid-sync"
    assert "Re-authenticate" in str(caught.value)
    assert token not in str(caught.value)
    assert_same_snapshot(before, snapshot(wh))
    # Connecting again picks up where the warehouse left off, exactly.
    again = make_source(sb, connect_oauth(sb))
    report = wh.sync(again)
    assert report["charges"].mode == "incremental"
    assert_matches_fresh(wh, again)


def test_an_invalid_key_raises_before_touching_the_warehouse(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers"])
    before = snapshot(wh)
    with pytest.raises(AuthenticationFailed):
        wh.sync(make_source(sb, "rk_test_" + "x" * 40), ["customers"])
    assert_same_snapshot(before, snapshot(wh))


@pytest.mark.parametrize("kind", ["503", "drop"])
def test_a_sync_failing_from_faults_keeps_the_previous_state_and_the_next_is_exact(sb, wh, kind):
    source = make_source(sb, retry=quick_retry(max_transient=2))
    wh.sync(source)
    before = snapshot(wh)
    sb.advance(days=3)
    sb.inject_fault(kind, count=3, path="/v1/invoices")
    with pytest.raises(FetchError) as caught:
        wh.sync(source)
    assert caught.value.table == "invoices"
    assert "silently short" in str(caught.value)
    assert_same_snapshot(before, snapshot(wh))
    drain_faults(sb, "/v1/invoices")
    report = wh.sync(source)
    assert report["invoices"].mode == "incremental"
    assert_matches_fresh(wh, source)


def test_a_key_that_may_not_read_events_gets_full_syncs_that_say_so(sb, wh):
    source = make_source(sb, sb.create_restricted_key(NO_EVENTS))
    names = [t for t in ALL_TABLES if t != "events"]
    wh.sync(source, names)
    sb.advance(hours=5)
    report = wh.sync(source, names)
    for name in PARENTS:
        if name == "events":
            continue
        assert report[name].mode == "full"
        if name not in REREAD_TABLES:
            assert "may not read events" in report[name].reason, report[name].reason
    assert_matches_fresh(wh, source, names)
    # Asking for the events table itself is refused whole: nothing half-synced.
    before = snapshot(wh)
    with pytest.raises(PermissionDenied, match="events"):
        wh.sync(source, ["events", "customers"])
    assert_same_snapshot(before, snapshot(wh))
    # Syncing everything leaves the events table out, and says why; the other tables still sync.
    everything = wh.sync(source)
    assert "events" not in everything.tables and "may not read events" in everything.skipped["events"]
    assert "events: skipped" in str(everything)
    assert set(everything.tables) == set(names)
    assert_matches_fresh(wh, source, names)


def test_a_key_that_may_not_read_events_still_dates_syncs_on_stripes_clock(tmp_path):
    """Regression guard: without Events access the sync must still take Stripe's clock (any answer's
    `Date`), not this machine's: deletions are dated by it, and it is the events cursor that a later
    key with Events access follows. Here Stripe's clock runs 10 days behind the machine's."""
    with Sandbox(seed=0, scale=40, now=int(time.time()) - 10 * DAY) as sb:
        wh = Warehouse(tmp_path / "wh.duckdb")
        limited = make_source(sb, sb.create_restricted_key(NO_EVENTS))
        names = ["customers", "coupons", "plans"]
        report = wh.sync(limited, names)
        assert report.server_time == datetime.fromtimestamp(sb.now, UTC)
        sb.advance(days=5)  # past the sandbox's first coupon and plan deletions (days 2 to 4)
        wh.sync(limited, names)
        stripe_now = pd.Timestamp(sb.now, unit="s", tz="UTC")
        assert (wh.status().set_index("table").loc[names, "events_cursor"] == stripe_now).all()
        for name in ("coupons", "plans"):
            deleted = wh.table(name, include_deleted=True)["deleted_at"].dropna()
            assert len(deleted) >= 1 and (deleted <= stripe_now).all(), (name, list(deleted), stripe_now)
        # Events access granted: the next sync follows events from where the last one really was.
        full = make_source(sb)
        sb.advance(days=3)
        wh.sync(full, names)
        assert_matches_fresh(wh, full, names)


# --- one writer at a time, readable errors ------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, duckdb
    from mbi_widgets.warehouse import Warehouse
    wh = Warehouse(sys.argv[1])
    with wh._writing():
        con = duckdb.connect(sys.argv[1]) if sys.argv[2] == "file" else None
        print("holding", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


@pytest.mark.parametrize("held", ["lock", "file"])
def test_a_second_writer_gets_a_clear_error_naming_the_file(sb, tmp_path, held):
    path = tmp_path / "shared.duckdb"
    source = make_source(sb)
    Warehouse(path).sync(source, ["coupons"])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), held], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 30)
        assert ready and holder.stdout.readline().strip() == "holding", holder.stderr.read()
        started = time.monotonic()
        with pytest.raises(WarehouseLocked) as caught:
            Warehouse(path, lock_timeout=0.5).sync(source, ["coupons"])
        waited = time.monotonic() - started
        assert 0.5 <= waited < 10
        assert str(path) in str(caught.value)
        assert caught.value.code == "locked"
        assert "another process" in str(caught.value)
        if held == "lock":
            # A sync still fetching holds only the writer lock: readers go on reading.
            assert len(Warehouse(path, lock_timeout=0.5).table("coupons")) > 0
        else:
            with pytest.raises(WarehouseLocked, match=re.escape(str(path))):
                Warehouse(path, lock_timeout=0.5).table("coupons")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0, holder.stderr.read()
    # The lock went with the other process.
    assert Warehouse(path, lock_timeout=0.5).sync(source, ["coupons"])["coupons"].mode == "full"


def test_a_corrupt_file_says_which_file_and_what_to_do(tmp_path):
    path = tmp_path / "broken.duckdb"
    path.write_bytes(b"this is not a DuckDB file \x00\xff" * 4_000)
    with pytest.raises(WarehouseError) as caught:
        Warehouse(path)
    message = str(caught.value)
    assert str(path) in message
    assert "Move the file aside" in message and "sync again" in message
    assert caught.value.code == "unreadable"
    assert isinstance(caught.value.__cause__, duckdb.Error)


def test_the_warehouse_before_any_sync_says_to_sync(wh):
    for call in (wh.status, lambda: wh.table("customers"), lambda: wh.select("customers")):
        with pytest.raises(WarehouseError, match=r"wh\.sync\(source\)") as caught:
            call()
        assert caught.value.code == "empty"


# --- reading: SQL, status, timestamps ------------------------------------------------------------------

def test_sql_reaches_bare_table_names_with_one_account_and_qualified_ones_always(sb, wh):
    source = make_source(sb)
    wh.sync(source, ["customers", "charges"])
    account = source.account_id()
    count = wh.sql("select count(*) as n from customers where deleted_at is null")["n"].iloc[0]
    assert count == len(wh.table("customers"))
    joined = wh.sql("select c.id, count(ch.id) as n from customers c left join charges ch on ch.customer = c.id "
                    "group by 1")
    assert joined["n"].sum() == wh.table("charges")["customer"].isin(set(joined["id"])).sum()
    assert wh.sql(f'select count(*) as n from "{account}".customers')["n"].iloc[0] == count
    with pytest.raises(WarehouseError) as caught:
        wh.sql("select * from no_such_table")
    assert caught.value.code == "sql_error" and "no_such_table" in str(caught.value)
    # A second account: bare names are ambiguous, account= picks one.
    other = make_source(sb, sb.secret_key, account=sb.accounts[1].id)
    wh.sync(other, ["customers"])
    with pytest.raises(WarehouseError):
        wh.sql("select count(*) from customers")
    mine = wh.sql("select count(*) as n from customers where deleted_at is null", account=account)["n"].iloc[0]
    theirs = wh.sql("select count(*) as n from customers where deleted_at is null",
                    account=sb.accounts[1].id)["n"].iloc[0]
    assert (mine, theirs) == (count, len(wh.table("customers", account=sb.accounts[1].id)))
    assert_matches_fresh(wh, other, ["customers"], account=sb.accounts[1].id)


def test_status_has_one_row_per_table_with_rows_deleted_rows_and_mode(sb, wh):
    source = make_source(sb)
    wh.sync(source)
    sb.advance(days=5)  # past the sandbox's first coupon and plan deletions (days 2 to 4)
    report = wh.sync(source)
    status = wh.status()
    assert list(status["table"]) == list(ALL_TABLES)
    for row in status.itertuples():
        everything = wh.table(row.table, include_deleted=True)
        assert row.rows == everything["deleted_at"].isna().sum() == report[row.table].rows
        assert row.deleted_rows == everything["deleted_at"].notna().sum()
        assert (row.mode, row.why) == (report[row.table].mode, report[row.table].reason)
        assert row.requests == report[row.table].requests
        assert row.events_cursor == pd.Timestamp(sb.now, unit="s", tz="UTC")
        assert row.columns == len(schema(row.table).column_names)
    assert status["deleted_rows"].sum() >= 2, "customers, coupons or plans deleted meanwhile are counted"


def test_synced_at_and_deleted_at_are_utc_timestamps(sb, wh):
    source = make_source(sb)
    before = pd.Timestamp.now(tz="UTC")
    wh.sync(source)
    sb.advance(days=5)  # past the sandbox's first coupon and plan deletions (days 2 to 4)
    wh.sync(source)
    after = pd.Timestamp.now(tz="UTC")
    for name in DELETABLE:
        everything = wh.table(name, include_deleted=True)
        assert list(everything.columns[-2:]) == ["deleted_at", "synced_at"]
        for column in ("deleted_at", "synced_at"):
            assert str(everything[column].dtype) == "datetime64[ns, UTC]", (name, column)
        assert everything["synced_at"].between(before, after).all(), name
        deleted = everything["deleted_at"].dropna()
        if name == "customers":
            continue  # whether a customer is deleted this early depends on the seed
        assert len(deleted) >= 1, name
        # Deletions are dated on Stripe's (the sandbox's) clock, not the wall clock.
        assert (deleted > pd.Timestamp(sb.started_at, unit="s", tz="UTC")).all()
        assert (deleted <= pd.Timestamp(sb.now, unit="s", tz="UTC")).all()
    kinds = wh.sql("select distinct data_type from information_schema.columns "
                   "where column_name in ('deleted_at', 'synced_at')")
    assert list(kinds["data_type"]) == ["TIMESTAMP WITH TIME ZONE"]


# --- secrets ----------------------------------------------------------------------------------------------

def test_keys_never_reach_the_report_the_status_or_the_file(sb, tmp_path):
    path = tmp_path / "secret-check.duckdb"
    wh = Warehouse(path)
    token = connect_oauth(sb)
    keys = [sb.restricted_key, token, sb.secret_key]
    texts = []
    for key, account in ((sb.restricted_key, None), (token, None), (sb.secret_key, sb.accounts[1].id)):
        source = make_source(sb, key, account=account)
        report = wh.sync(source, ["customers", "charges"])
        texts += [str(report), repr(report), report._repr_html_(), report.frame().to_csv(),
                  wh.status(source.account_id()).to_csv()]
    texts += [repr(wh), str(wh.accounts())]
    for text in texts:
        for key in keys:
            assert key not in text and key[8:] not in text
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert path.stat().st_size > 0
    for key in keys:
        assert key.encode() not in stored and key[8:].encode() not in stored, "a key was written to the warehouse"
    # DuckDB compresses strings on disk, so also search every text column through SQL.
    columns = wh.sql("select table_schema, table_name, column_name from information_schema.columns "
                     "where data_type = 'VARCHAR'")
    assert len(columns) > 100
    for (schema_name, table), group in columns.groupby(["table_schema", "table_name"]):
        for key in keys:
            found = " or ".join(f'contains("{c}", \'{key[8:]}\')' for c in group["column_name"])
            hits = wh.sql(f'select count(*) as n from "{schema_name}"."{table}" where {found}')["n"].iloc[0]
            assert hits == 0, f"a key is stored in {schema_name}.{table}"
