"""Property: whatever the sandbox's business does between syncs, the warehouse equals a fresh load.

Hypothesis draws histories of syncs: clock steps from minutes to beyond Stripe's 30-day events
window, subsets of tables, column selections dropped and added back, faults that make a sync fail
(then a clean re-run), and listing lag. After every successful sync the warehouse's live rows
must equal a fresh `StripeSource.tables()` taken at the same sandbox moment (values and dtypes of
every column held), objects that vanished must stay as rows with `deleted_at`, and each report
must say the mode the rules call for. The oracle's teeth are tested too: a stale or tampered
warehouse must fail it.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.generator import DAY
from mbi_widgets.tables.fetch import FetchError
from mbi_widgets.tables.schema import ALL_TABLES, schema
from mbi_widgets.warehouse import ACCUMULATING, REREAD_TABLES, Warehouse

from tests.test_warehouse import (
    assert_matches_fresh,
    assert_same_snapshot,
    drain_faults,
    make_source,
    quick_retry,
    snapshot,
)

HORIZON_DAYS = 90
#: Small accounts keep an example to a few seconds; the rules do not depend on size.
SCALES = (25, 40)
FAULT_PATHS = (None, "/v1/events", "/v1/customers", "/v1/charges", "/v1/invoices", "/v1/subscriptions",
               "/v1/coupons")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                print_blob=True)


# --- strategies --------------------------------------------------------------------------------------

ADVANCE = st.one_of(
    st.integers(1, 600).map(lambda m: m * 60),                 # minutes
    st.integers(1, 72).map(lambda h: h * 3_600),               # hours
    st.integers(1, 14).map(lambda d: d * DAY),                 # days
    st.integers(25 * 24, 29 * 24 - 1).map(lambda h: h * 3_600),  # inside the events window, near its edge
    st.integers(31, 40).map(lambda d: d * DAY),                # beyond Stripe's 30-day events window
)

TABLES = st.one_of(st.none(), st.lists(st.sampled_from(ALL_TABLES), min_size=1, max_size=3, unique=True))


@st.composite
def column_changes(draw) -> tuple[str, list[str] | None]:
    """A table and its new column selection: all, a few columns, or all but a few."""
    table = draw(st.sampled_from(ALL_TABLES))
    names = schema(table).column_names
    how = draw(st.sampled_from(["all", "few", "all_but"]))
    if how == "all":
        return table, None
    picked = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    return table, picked if how == "few" else [c for c in names if c not in picked]


@dataclass(frozen=True)
class Fault:
    kind: str
    count: int
    path: str | None


FAULTS = st.builds(Fault, st.sampled_from(["500", "502", "503", "drop"]), st.integers(1, 8),
                   st.sampled_from(FAULT_PATHS))


@dataclass(frozen=True)
class Step:
    advance: int
    tables: list[str] | None
    changes: list[tuple[str, list[str] | None]]
    fault: Fault | None


def steps(*, faults: bool, changes: bool) -> st.SearchStrategy[Step]:
    return st.builds(Step, ADVANCE, TABLES,
                     st.lists(column_changes(), max_size=2) if changes else st.just([]),
                     st.one_of(st.none(), FAULTS) if faults else st.none())


# --- a model of what each report must say --------------------------------------------------------------

@dataclass
class Model:
    """What the test knows: per table, the clock of its last sync, the columns selected and held."""

    cursor: dict[str, int] = field(default_factory=dict)
    selected: dict[str, list[str]] = field(default_factory=lambda: {t: schema(t).column_names for t in ALL_TABLES})
    held: dict[str, list[str]] = field(default_factory=dict)
    #: Ids ever seen live, per table: none may silently leave the warehouse.
    seen: dict[str, set[str]] = field(default_factory=dict)

    def names(self, tables: list[str] | None) -> list[str]:
        """The tables a sync of `tables` covers: parents come with children and children with parents."""
        wanted = set(ALL_TABLES if tables is None else tables)
        wanted |= {schema(t).parent for t in wanted if schema(t).parent}
        wanted |= {c for t in list(wanted) for c in schema(t).children}
        return [t for t in ALL_TABLES if t in wanted]

    def select(self, table: str, chosen: list[str]) -> None:
        self.selected[table] = chosen
        if table in self.held:
            self.held[table] = [c for c in self.held[table] if c in chosen]

    def expected_mode(self, table: str, names: list[str], now: int) -> tuple[str, str | None]:
        """(mode, a phrase its reason must contain); phrase None when only the mode is certain."""
        if table not in self.cursor:
            return "full", "first sync"
        if table in REREAD_TABLES:
            return "full", "re-read whole"
        age = now - self.cursor[table]
        if age > 30 * DAY:
            return "full", "30-day"
        if age > 29 * DAY:
            return "full", None  # the warehouse keeps a day's margin inside the window
        added = set(self.selected[table]) - set(self.held[table])
        if added:
            return "full", "column"
        if any(set(self.selected[c]) - set(self.held.get(c, [])) for c in schema(table).children if c in names):
            return "full", "child table"
        return "incremental", "events since the last sync"

    def synced(self, names: list[str], now: int) -> None:
        for name in names:
            self.cursor[name] = now
            self.held[name] = list(self.selected[name])


def assert_report_follows_the_rules(report, model: Model, names: list[str], now: int) -> None:
    assert list(report.tables) == names
    for name in names:
        parent = schema(name).parent
        if parent:
            assert report[name].mode == report[parent].mode, name
            assert report[name].reason.startswith(f"with {parent}: "), report[name].reason
            continue
        mode, phrase = model.expected_mode(name, names, now)
        assert report[name].mode == mode, (name, report[name].reason, now - model.cursor.get(name, now))
        if phrase is not None:
            assert phrase in report[name].reason, (name, report[name].reason)


def assert_nothing_silently_dropped(held: dict[str, pd.DataFrame], model: Model, fresh: dict[str, pd.DataFrame],
                                    names: list[str], now: int) -> None:
    """Objects the warehouse once held live and the fresh load lacks stay, flagged `deleted_at`
    (child rows too: a parent's list that lost an entry flags it)."""
    for name in names:
        everything = held[name].set_index("id")
        live_now = set(fresh[name]["id"])
        seen = model.seen.setdefault(name, set())
        dropped = seen - set(everything.index)
        assert not dropped, f"{name}: rows silently dropped: {sorted(dropped)[:3]}"
        flagged = everything.index[everything["deleted_at"].notna()]
        assert not set(flagged) & live_now, f"{name}: live objects flagged deleted"
        if name in ACCUMULATING:
            assert len(flagged) == 0
        else:
            vanished = seen - live_now
            assert set(vanished) <= set(flagged), f"{name}: vanished objects not flagged: {sorted(vanished)[:3]}"
        assert (everything["deleted_at"].dropna() <= pd.Timestamp(now, unit="s", tz="UTC")).all()
        seen |= live_now


def record(what: str) -> None:
    """Counts what examples covered (pytest --hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


# --- the run --------------------------------------------------------------------------------------------

def run_history(seed: int, scale: int, lag: int, first: list[str] | None, history: list[Step]) -> None:
    with tempfile.TemporaryDirectory(prefix="mbi-wh-prop-") as folder, \
            Sandbox(seed=seed, scale=scale, listing_lag=lag, horizon_days=HORIZON_DAYS) as sb:
        wh = Warehouse(Path(folder) / "wh.duckdb")
        source = make_source(sb, retry=quick_retry(max_transient=2, base_delay=0.002, max_delay=0.01))
        account = source.account_id()
        model = Model()
        sync_and_check(sb, wh, source, model, first, None)
        end = sb.started_at + HORIZON_DAYS * DAY
        for step in history:
            sb.advance(seconds=min(step.advance, end - sb.now))
            for table, columns in step.changes:
                model.select(table, wh.select(table, columns, account=account))
            sync_and_check(sb, wh, source, model, step.tables, step.fault)


def sync_and_check(sb: Sandbox, wh: Warehouse, source, model: Model, tables: list[str] | None,
                   fault: Fault | None) -> None:
    names = model.names(tables)
    if fault is not None:
        before = snapshot(wh) if model.cursor else None
        sb.inject_fault(fault.kind, fault.count, fault.path)
        try:
            report = wh.sync(source, tables)
        except FetchError:
            record("a sync failed from faults, then ran again")
            # Every table keeps its last committed state; the re-run below must still be exact.
            if before is not None:
                assert_same_snapshot(before, snapshot(wh))
            drain_faults(sb, fault.path)
            report = wh.sync(source, tables)
        else:
            drain_faults(sb, fault.path)
    else:
        report = wh.sync(source, tables)
    assert_report_follows_the_rules(report, model, names, sb.now)
    for name in names:
        record(f"{report[name].mode}: {report[name].reason.removeprefix('with ').split(': ')[-1][:40]}")
    held: dict[str, pd.DataFrame] = {}
    fresh = assert_matches_fresh(wh, source, names, columns=model.selected, held=held, read_live=False)
    for name in names:
        assert report[name].rows == held[name]["deleted_at"].isna().sum(), name
    assert_nothing_silently_dropped(held, model, fresh, names, sb.now)
    model.synced(names, sb.now)


@settings(max_examples=4, **SETTINGS)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from(SCALES), first=TABLES,
       history=st.lists(steps(faults=False, changes=True), min_size=1, max_size=3))
# Always run: columns dropped, re-added while their table is not synced (a parent's and a child's),
# then a gap beyond 30 days.
@example(seed=0, scale=25, first=["customers", "invoices"], history=[
    Step(3 * DAY, ["customers"], [("customers", ["email"]), ("invoices__lines", ["amount"])], None),
    Step(2 * 3_600, ["charges", "invoices"], [("customers", None)], None),
    Step(DAY, None, [("invoices__lines", None)], None),
    Step(35 * DAY, None, [], None)])
def test_incremental_syncs_equal_a_fresh_load_whatever_the_clock_tables_and_columns(seed, scale, first, history):
    run_history(seed, scale, 0, first, history)


@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 10_000), first=TABLES,
       history=st.lists(steps(faults=True, changes=False), min_size=1, max_size=3))
# Always run: retries that run out on one endpoint, then dropped connections anywhere.
@example(seed=0, first=None, history=[Step(2 * DAY, None, [], Fault("503", 8, "/v1/charges")),
                                      Step(DAY, ["invoices", "events"], [], Fault("drop", 3, None))])
def test_a_sync_failing_from_faults_keeps_the_previous_state_and_the_re_run_is_exact(seed, first, history):
    run_history(seed, 25, 0, first, history)


@settings(max_examples=2, **SETTINGS)
@given(seed=st.integers(0, 10_000), lag=st.integers(1, 120),
       history=st.lists(st.builds(Step, st.integers(1, 1_800), TABLES, st.just([]), st.none()),
                        min_size=1, max_size=3))
@example(seed=0, lag=120, history=[Step(60, None, [], None), Step(3_600, None, [], None)])
def test_listing_lag_within_the_lookback_loses_nothing(seed, lag, history):
    """Objects listing up to `lag` seconds after `created` (lag < the 300 s lookback), with short steps
    so that many objects are still hidden at some sync and must be picked up by the next."""
    run_history(seed, 25, lag, None, history)


# --- the oracle has teeth ---------------------------------------------------------------------------------

@settings(max_examples=2, **SETTINGS)
@given(seed=st.integers(0, 10_000), days=st.integers(5, 20))  # past the first plan and coupon deletions
def test_a_warehouse_not_synced_since_the_sandbox_moved_fails_the_comparison(seed, days):
    with tempfile.TemporaryDirectory(prefix="mbi-wh-prop-") as folder, Sandbox(seed=seed, scale=25) as sb:
        wh = Warehouse(Path(folder) / "wh.duckdb")
        source = make_source(sb)
        wh.sync(source)
        before = source.tables()
        sb.advance(days=days)
        after = source.tables()
        changed = [t for t in ALL_TABLES if not before[t].equals(after[t])]
        assert "events" in changed, "days of business without a single event?"
        with pytest.raises(AssertionError):
            assert_matches_fresh(wh, source)
        for name in changed:
            with pytest.raises(AssertionError):
                assert_matches_fresh(wh, source, [name])
        wh.sync(source)
        assert_matches_fresh(wh, source)


TAMPERING = {
    "a changed value": ("customers", "UPDATE customers SET email = 'someone@else.example' "
                                     "WHERE id = (SELECT max(id) FROM customers)"),
    "a lost row": ("charges", "DELETE FROM charges WHERE id = (SELECT max(id) FROM charges)"),
    "a live row flagged deleted": ("invoices", "UPDATE invoices SET deleted_at = now() "
                                               "WHERE id = (SELECT max(id) FROM invoices)"),
    "a duplicated row": ("plans", "INSERT INTO plans SELECT * FROM plans WHERE id = (SELECT max(id) FROM plans)"),
    "a lost event": ("events", "DELETE FROM events WHERE id = (SELECT max(id) FROM events)"),
    "a lost child row": ("invoices__lines", "DELETE FROM invoices__lines "
                                            "WHERE id = (SELECT max(id) FROM invoices__lines)"),
    "a moved timestamp": ("subscriptions", "UPDATE subscriptions SET created = created + INTERVAL 1 SECOND "
                                           "WHERE id = (SELECT max(id) FROM subscriptions)"),
    "a NULL where a value was": ("coupons", "UPDATE coupons SET name = NULL WHERE name IS NOT NULL"),
}


def test_a_tampered_warehouse_fails_the_comparison(tmp_path):
    with Sandbox(seed=1, scale=25) as sb:
        path = tmp_path / "wh.duckdb"
        source = make_source(sb)
        Warehouse(path).sync(source)
        assert_matches_fresh(Warehouse(path), source)
        for what, (table, statement) in TAMPERING.items():
            copy = tmp_path / f"tampered-{table}.duckdb"
            shutil.copyfile(path, copy)
            if path.with_name(path.name + ".wal").exists():
                shutil.copyfile(path.with_name(path.name + ".wal"), copy.with_name(copy.name + ".wal"))
            tampered = Warehouse(copy)
            assert_matches_fresh(tampered, source, [table])
            tampered.sql(statement)
            with pytest.raises(AssertionError):
                assert_matches_fresh(tampered, source, [table])
                pytest.fail(f"{what} in {table} went unnoticed")
