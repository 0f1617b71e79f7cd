"""The Data Warehouse Manager and the update cycle in the panel, driven as a user drives them: clicks,
values, then widget traits; against a real sandbox, registry and DuckDB warehouse (no browser)."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Iterator

import pandas as pd
import pytest
import requests
from urllib.parse import urlencode

from mbi_widgets import Sandbox
from mbi_widgets.auth import RelayClient, StripeToken
from mbi_widgets.registry import NEEDS_REAUTH, OAUTH_REVOKED, SUCCESS, Registry
from mbi_widgets.sandbox import parse_redirect
from mbi_widgets.secretstore import MemoryStore
from mbi_widgets.ui.format import period, time_left, timestamp
from mbi_widgets.ui.panel import ConnectionsPanel
from mbi_widgets.ui.warehouse import HEAD, SYNCED_TABLES_FILTER, WarehouseView
from mbi_widgets.warehouse import Warehouse

from .test_panel import (
    MBI_TABLES,
    NORTHWIND,
    button,
    code_line,
    is_data_sources_view,
    row_action,
    row_status,
    shown_text,
    text_of,
    wait_until,
)

REDIRECT_URI = "http://127.0.0.1:9/mbi-widgets/callback"
PROGRESS_DONE = re.compile(r"\+\d[\d,]* ~\d[\d,]* −\d[\d,]*")


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(seed=9, scale=10, redirect_uris=(REDIRECT_URI,)) as running:
        yield running


@pytest.fixture
def panel(tmp_path, sandbox) -> Iterator[ConnectionsPanel]:
    made = ConnectionsPanel(Registry(tmp_path / "connections.sqlite3", store=MemoryStore()), sandbox=sandbox)
    made.TICK_SECONDS = 0.05
    yield made
    made.close()
    made.wait(30)


def connect_key(panel: ConnectionsPanel, key: str | None = None) -> str:
    connection = panel.connect_with_key(key or panel.sandbox.restricted_key)
    panel.wait(60)
    return connection.id


def oauth_token(sandbox: Sandbox, account: int = 0) -> StripeToken:
    """A real Connect authorization of a seeded account (what the relay hands the notebook)."""
    query = urlencode({"response_type": "code", "client_id": sandbox.client_id, "scope": "read_only",
                       "redirect_uri": REDIRECT_URI, "state": "ui-test"})
    code = parse_redirect(sandbox.authorize(f"{sandbox.connect_url}/oauth/authorize?{query}", account=account))["code"]
    answer = requests.post(f"{sandbox.connect_url}/oauth/token", timeout=10,
                           data={"grant_type": "authorization_code", "code": code, "client_secret": sandbox.secret_key})
    return StripeToken.from_response(answer.json())


def connect_oauth(panel: ConnectionsPanel) -> tuple[str, StripeToken]:
    """Connect with Stripe for the first account, as the panel saves it when the device flow reports Connected."""
    token = oauth_token(panel.sandbox)
    panel._connected(token)
    panel.wait(60)
    return panel.registry.list()[-1].id, token


def manage(panel: ConnectionsPanel, connection_id: str) -> WarehouseView:
    row_action(panel, connection_id, "Manage Data").click()
    assert isinstance(panel.view, WarehouseView) and panel.view.connection_id == connection_id
    return panel.view


def only(panel: ConnectionsPanel, connection_id: str, *tables: str) -> None:
    """Leaves only `tables` ticked, so that a sync costs a few requests."""
    for table in MBI_TABLES:
        panel.connections.set_synced(connection_id, table, table in tables)


# --- the view --------------------------------------------------------------------------------------

def test_manage_data_opens_every_table_with_its_choices_and_creates_no_file(panel):
    connection_id = connect_key(panel)
    view = manage(panel, connection_id)
    assert "Data Warehouse Manager · Northwind Analytics" in shown_text(panel)
    assert panel.registry.get(connection_id).account_id in text_of(view.title) and "API key" in text_of(view.title)
    # Changed on purpose (issue 10): a header row, then one row box per table (cards when the panel is narrow).
    assert [text_of(cell) for cell in view.header.children] == list(HEAD)
    assert list(view.grid.children) == [view.header] + [row.box for row in view.rows.values()]
    assert list(view.rows) == MBI_TABLES
    for table, row in view.rows.items():
        assert row.checkbox.value is True and row.checkbox.disabled is False
        total = len(view.states[table].all_columns)
        assert row.columns_button.description == f"{total} of {total}"
        assert (text_of(row.rows), text_of(row.last_sync), text_of(row.mode)) == ("—", "never", "—")
        assert row.progress.layout.visibility == "hidden"
    assert not panel.connections.warehouse_path.exists()  # looking is not syncing
    button(panel.body, "Back to Data Sources").click()
    assert is_data_sources_view(panel)


def test_sync_now_fills_a_progress_bar_per_table_then_shows_the_summary(panel):
    connection_id = connect_key(panel)
    view = manage(panel, connection_id)
    view.sync_button.click()
    assert view.sync_button.disabled and view.full_button.disabled  # at once, before the sync thread runs
    assert all(row.checkbox.disabled and row.columns_button.disabled for row in view.rows.values())
    panel.wait(60)
    run = panel.connections.current
    report = run.report
    assert report is not None and set(report.tables) == set(MBI_TABLES)
    for table, row in view.rows.items():
        assert row.progress.bar_style == "success" and row.progress.value == row.progress.max, table
        assert PROGRESS_DONE.fullmatch(text_of(row.progress_label)), text_of(row.progress_label)
        assert text_of(row.rows) == f"{report[table].rows:,}" and text_of(row.mode) == "full"
        assert text_of(row.last_sync) == "just now"
    assert run.fetched["charges"] == report["charges"].rows  # the bars followed rows as they arrived
    summary = text_of(view.summary)
    assert f"Synced 10 table(s) of {NORTHWIND}" in summary and f"{report.added:,} added" in summary
    assert "first sync of this table" in summary
    assert not view.sync_button.disabled and not any(row.checkbox.disabled for row in view.rows.values())

    view.sync_button.click()
    panel.wait(60)
    assert text_of(view.rows["customers"].mode) == "incremental"
    assert "events since the last sync" in text_of(view.summary)
    button(panel.body, "Back to Data Sources").click()
    assert text_of(panel.rows[connection_id][5]) == "just now"  # Last Updated


def test_python_sync_draws_in_the_open_view_and_a_forced_refresh_rereads_whole(panel):
    connection_id = connect_key(panel)
    only(panel, connection_id, "customers", "coupons")
    view = manage(panel, connection_id)
    first = panel.sync(NORTHWIND)  # from Python: the open view follows it as it would a click
    assert set(first.tables) == {"customers", "coupons"}
    assert f"Synced 2 table(s) of {NORTHWIND}" in text_of(view.summary)
    assert view.rows["charges"].progress.layout.visibility == "hidden"  # not part of this sync
    view.full_button.click()
    panel.wait(60)
    forced = panel.connections.current
    assert forced.full and forced.expected == {"customers": first["customers"].rows, "coupons": first["coupons"].rows}
    assert {text_of(view.rows[t].mode) for t in ("customers", "coupons")} == {"full"}
    assert "a full refresh was asked for" in text_of(view.summary)


def test_unticked_tables_are_saved_filtered_and_left_out_of_the_sync(panel):
    connection_id = connect_key(panel)
    account = panel.registry.get(connection_id).account_id
    view = manage(panel, connection_id)
    view.rows["coupons"].checkbox.value = False
    view.rows["charges"].checkbox.value = False
    assert view.rows["charges__refunds"].checkbox.value is False  # a child goes with its parent
    assert panel.warehouse.selection("coupons", account=account)[0] is False
    view.filter.value = SYNCED_TABLES_FILTER
    assert view.rows["coupons"].box.layout.display == "none"
    assert view.rows["customers"].box.layout.display == ""
    view.rows["charges__refunds"].checkbox.value = True  # ticking a child ticks its parent
    assert view.rows["charges"].checkbox.value is True
    assert view.rows["charges"].box.layout.display == ""
    view.sync_button.click()
    panel.wait(60)
    assert "coupons" not in panel.connections.current.report.tables
    assert view.rows["coupons"].progress.layout.visibility == "hidden"
    again = panel.show_warehouse(NORTHWIND)  # the choice was saved, not only drawn
    assert again.rows["coupons"].checkbox.value is False and again.rows["charges"].checkbox.value is True


def test_the_column_picker_saves_columns_and_keeps_the_required_ones(panel):
    connection_id = connect_key(panel)
    account = panel.registry.get(connection_id).account_id
    view = manage(panel, connection_id)
    row = view.rows["coupons"]
    total = len(view.states["coupons"].all_columns)
    row.columns_button.click()
    picker = view.picker
    assert picker is not None and picker.table == "coupons" and "Columns of Coupons" in shown_text(panel)
    assert picker.checkboxes["id"].disabled and picker.checkboxes["created"].disabled
    assert not picker.checkboxes["name"].disabled
    picker.checkboxes["name"].value = False
    assert "name" not in panel.warehouse.selection("coupons", account=account)[1]
    assert row.columns_button.description == f"{total - 1} of {total}"
    button(picker.box, "Only required").click()
    assert panel.warehouse.selection("coupons", account=account)[1] == ["id", "created"]
    assert [c for c, box in picker.checkboxes.items() if box.value] == ["id", "created"]
    assert row.columns_button.description == f"2 of {total}"
    view.sync_button.click()
    panel.wait(60)
    assert list(panel.warehouse.table("coupons", account=account).columns) == ["id", "created"]
    button(picker.box, "Select all").click()
    assert len(panel.warehouse.selection("coupons", account=account)[1]) == total
    view.rows["charges__refunds"].columns_button.click()
    assert view.picker.checkboxes["charge_id"].disabled  # a child row's link to its parent stays
    button(view.picker.box, "Done").click()
    assert view.picker is None and view.picker_box.children == ()


# --- failures --------------------------------------------------------------------------------------

def test_a_sync_that_finds_the_token_revoked_turns_the_row_and_says_reauthenticate(panel):
    connection_id, token = connect_oauth(panel)
    assert "Connection successful!" in text_of(panel.banner)
    only(panel, connection_id, "coupons")
    view = manage(panel, connection_id)
    panel.sync(connection_id)
    kept = panel.warehouse.table("coupons")
    account = panel.registry.get(connection_id).account_id
    RelayClient(panel.sandbox.relay_url).deauthorize(access_token=token.access_token, stripe_user_id=account)
    view.sync_button.click()
    panel.wait(60)
    for where in (text_of(panel.banner), text_of(view.message)):
        assert OAUTH_REVOKED in where and "Invalid API Key" not in where
    assert view.rows["coupons"].progress.bar_style == "danger"
    assert view.reauth_button.layout.display == "" and "Needs re-authentication" in text_of(view.title)
    assert not view.sync_button.disabled
    assert panel.warehouse.table("coupons").equals(kept)
    view.reauth_button.click()
    heading = text_of(panel.body.children[0])
    assert f"Re-authenticate {NORTHWIND}" in heading and account in heading and "OAuth" in heading
    button(panel.body, "Back").click()
    assert row_status(panel, connection_id) == NEEDS_REAUTH


def test_a_success_banner_does_not_outlive_the_connection_it_praised(panel):
    connection_id, token = connect_oauth(panel)
    assert "Connection successful!" in text_of(panel.banner)
    RelayClient(panel.sandbox.relay_url).deauthorize(access_token=token.access_token,
                                                     stripe_user_id=panel.registry.get(connection_id).account_id)
    row_action(panel, connection_id, "Preview").click()  # reading the tables now fails
    panel.wait(60)
    assert row_status(panel, connection_id) == NEEDS_REAUTH
    assert "Connection successful!" not in text_of(panel.banner)
    assert f"{NORTHWIND}: Needs re-authentication" in text_of(panel.banner)
    status = text_of(panel.preview.tabs["customers"].status)
    assert OAUTH_REVOKED in status and "Invalid API Key" not in status and "restricted key" not in status


def test_an_oauth_grant_for_another_account_does_not_reauthenticate_the_row(panel):
    connection_id = connect_key(panel)
    row_action(panel, connection_id, "Re-authenticate").click()
    panel._connected(oauth_token(panel.sandbox, account=1))  # the admin signed in to the wrong account
    assert "Brightwave Studio GmbH" in text_of(panel.banner) and f"not {NORTHWIND}" in text_of(panel.banner)
    assert button(panel.body, "Try again") is not None
    assert panel.registry.secret(connection_id) == panel.sandbox.restricted_key
    assert [c.id for c in panel.registry.list()] == [connection_id]


def test_a_warehouse_another_process_is_syncing_says_to_wait(tmp_path, sandbox):
    warehouse = Warehouse(tmp_path / "shared.duckdb", lock_timeout=0.3)
    panel = ConnectionsPanel(Registry(tmp_path / "r.sqlite3", store=MemoryStore()), sandbox=sandbox,
                             warehouse=warehouse)
    connection_id = connect_key(panel)
    only(panel, connection_id, "coupons")
    view = manage(panel, connection_id)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.readline()", str(tmp_path / "shared.duckdb.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        view.rows["plans"].checkbox.value = True  # a choice cannot be saved meanwhile: it says so, and undoes
        assert "another process is syncing" in text_of(view.message)
        assert view.rows["plans"].checkbox.value is False
        view.sync_button.click()
        panel.wait(60)
        assert "another process is syncing" in text_of(panel.banner)
        assert "Let it finish, then sync again" in text_of(view.message)
        assert panel.registry.get(connection_id).status == SUCCESS  # not a credential problem
        assert not view.sync_button.disabled
        holder.communicate("go\n", timeout=10)
        view.sync_button.click()
        panel.wait(60)
        assert "Synced 1 table(s)" in text_of(view.summary)
    finally:
        holder.kill()
        panel.close()


# --- the update cycle ----------------------------------------------------------------------------------

def test_auto_sync_counts_down_syncs_and_stops(panel):
    connection_id = connect_key(panel)
    only(panel, connection_id, "coupons")
    account = panel.registry.get(connection_id).account_id
    assert panel.cycle_bar.layout.display == "none"  # off by default
    view = manage(panel, connection_id)
    cycle = panel.auto_sync(every=timedelta(seconds=0.3))
    assert panel.cycle is cycle and cycle.active
    assert panel.cycle_bar.layout.display == ""
    assert re.search(r"Automatic updates every 0\.3 seconds · (Next update in \d s|updating Northwind)",
                     text_of(panel.cycle_status))
    assert view.cycle.value == 0.3  # the view shows the period set from Python
    assert "Automatic updates every 0.3 seconds" in panel.plain_text()
    wait_until(lambda: cycle.rounds >= 1, what="a first round")
    first = panel.warehouse.status(account).set_index("table").loc["coupons", "last_sync_started"]
    wait_until(lambda: cycle.rounds >= 3, what="two more rounds")
    later = panel.warehouse.status(account).set_index("table").loc["coupons", "last_sync_started"]
    assert later > first  # the warehouse was synced again, not only the counter moved
    assert text_of(view.rows["coupons"].last_sync) == "just now"
    panel.cycle_stop.click()
    assert not cycle.active and panel.cycle is None and panel.cycle_bar.layout.display == "none"
    assert view.cycle.value == 0
    cycle.join(30)
    runs = len(panel.connections.runs)
    time.sleep(0.6)
    assert len(panel.connections.runs) == runs


def test_the_update_cycle_menu_and_the_handle_start_and_stop_it(panel):
    connection_id = connect_key(panel)
    view = manage(panel, connection_id)
    view.cycle.value = 3600
    cycle = panel.cycle
    assert cycle is not None and cycle.every == 3600
    assert "Automatic updates every hour · Next update in 60 min" in text_of(panel.cycle_status)
    view.cycle.value = 0
    assert panel.cycle is None and not cycle.active
    handle = panel.auto_sync(86_400)
    assert view.cycle.value == 86_400
    handle.stop()  # stopped through its handle: the panel says so too
    wait_until(lambda: panel.cycle_bar.layout.display == "none" and view.cycle.value == 0, what="the bar to hide")
    again = panel.auto_sync(600)
    panel.close()
    assert not again.active


def test_a_cycle_round_skips_while_a_click_sync_runs(tmp_path):
    with Sandbox(seed=10, scale=10, latency_ms=100) as slow:
        panel = ConnectionsPanel(Registry(tmp_path / "slow.sqlite3", store=MemoryStore()), sandbox=slow)
        try:
            connection_id = connect_key(panel)
            view = manage(panel, connection_id)
            view.sync_button.click()
            wait_until(lambda: panel.connections.busy, what="the click's sync to start")
            cycle = panel.auto_sync(0.05)
            wait_until(lambda: cycle.skipped >= 1, what="a skipped round")
            assert "is running" not in text_of(panel.banner)  # a skipped round is not an error
            panel.wait(60)
            panel.auto_sync(None)
            cycle.join(30)
            runs = panel.connections.runs
            assert runs[0].trigger == "manual"
            assert all(later.started >= earlier.finished for earlier, later in zip(runs, runs[1:]))
        finally:
            panel.close()


# --- the preview and the text fallback ------------------------------------------------------------------

def test_the_preview_reads_synced_tables_from_the_warehouse_and_says_how_old(panel):
    connection_id = connect_key(panel)
    panel.sync(NORTHWIND, ["customers"])
    account = panel.registry.get(connection_id).account_id
    preview = panel.open_preview(NORTHWIND)
    panel.wait(60)
    customers = preview.tabs["customers"]
    status = text_of(customers.status)
    assert "from the warehouse, synced just now" in status and "(the whole table)" in status
    assert customers.load_button.layout.display == "none" and customers.full
    assert code_line(customers) == f"panel.warehouse.table('customers', account={account!r})"
    frame = eval(code_line(customers), {"panel": panel})  # noqa: S307 - the line the user is told to run
    pd.testing.assert_frame_equal(frame, customers.frame)
    preview.tab.selected_index = MBI_TABLES.index("charges")  # never synced: read from Stripe, as before
    panel.wait(60)
    assert "rows previewed" in text_of(preview.tabs["charges"].status)
    assert code_line(preview.tabs["charges"]) == f"panel.source({NORTHWIND!r}).table('charges')"


def test_print_shows_the_connections_and_the_link_and_code_while_waiting(panel, capsys):
    connection_id = connect_key(panel)
    panel.sync(connection_id, ["coupons"])
    waiting = panel.connect_with_stripe()
    capsys.readouterr()
    print(panel)
    printed = capsys.readouterr().out
    assert f"- {NORTHWIND} · Stripe · Success · API key · data updated just now" in printed
    assert waiting.link in printed and waiting.user_code in printed
    panel.flow.cancel()
    assert waiting.user_code not in str(panel)


def test_the_reauthenticate_view_names_its_connection(panel):
    connection_id = connect_key(panel)
    row_action(panel, connection_id, "Re-authenticate").click()
    heading = text_of(panel.body.children[0])
    assert heading.startswith(f"Re-authenticate {NORTHWIND}")
    assert panel.registry.get(connection_id).account_id in heading and "API key" in heading


# --- wording ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "expected"), [(0, "0 s"), (0.2, "1 s"), (59, "59 s"), (60, "1 min"),
                                                   (61, "2 min"), (3_600, "60 min"), (3_601, "1 h 01 min"),
                                                   (7_260, "2 h 01 min")])
def test_time_left_rounds_up(seconds, expected):
    assert time_left(seconds) == expected


@pytest.mark.parametrize(("seconds", "expected"), [(0.3, "every 0.3 seconds"), (1, "every second"),
                                                   (45, "every 45 seconds"), (60, "every minute"),
                                                   (900, "every 15 minutes"), (3_600, "every hour"),
                                                   (5_400, "every 90 minutes"), (21_600, "every 6 hours"),
                                                   (86_400, "every day"), (172_800, "every 2 days")])
def test_period_words(seconds, expected):
    assert period(seconds) == expected


def test_timestamps_are_absolute_and_utc():
    assert timestamp(datetime(2026, 11, 1, 14, 3, tzinfo=UTC)) == "Nov 01, 2026 14:03 UTC"
    assert timestamp(None) == "—"
