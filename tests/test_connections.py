"""The connections service without any widget, on a real sandbox, registry and warehouse files: what a click
decides (add, re-authenticate, already connected, unique names, delete, sync) and the update cycle.

Every test here calls `Connections` exactly as the panel's views do; tests/test_ui_warehouse.py drives
the same through widgets.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable, Iterator
from urllib.parse import urlencode

import pytest
import requests

from mbi_widgets import Sandbox
from mbi_widgets.auth import AuthError, RelayClient, StripeToken
from mbi_widgets.connections import (
    ADDED,
    ALREADY_CONNECTED,
    AUTOMATIC,
    REPLACED,
    Connections,
    ConnectionsError,
    NeedsReauthentication,
    SyncInProgress,
    UpdateCycle,
    warehouse_path_for,
)
from mbi_widgets.registry import NEEDS_REAUTH, OAUTH_REVOKED, SUCCESS, Registry
from mbi_widgets.sandbox import parse_redirect
from mbi_widgets.secretstore import MemoryStore

REDIRECT_URI = "http://127.0.0.1:9/mbi-widgets/callback"
NORTHWIND = "Northwind Analytics"
#: Two small tables: a sync of just these costs a few requests.
SMALL = ["coupons", "plans"]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(seed=5, scale=10, redirect_uris=(REDIRECT_URI,)) as running:
        yield running


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "connections.sqlite3", store=MemoryStore())


@pytest.fixture
def connections(registry, sandbox) -> Connections:
    return Connections(registry, api_base=sandbox.api_url, relay_url=sandbox.relay_url)


def oauth_token(sandbox: Sandbox, account: int = 0) -> StripeToken:
    """A real Connect authorization of a seeded account (what the relay hands a notebook)."""
    query = urlencode({"response_type": "code", "client_id": sandbox.client_id, "scope": "read_only",
                       "redirect_uri": REDIRECT_URI, "state": "connections-test"})
    code = parse_redirect(sandbox.authorize(f"{sandbox.connect_url}/oauth/authorize?{query}", account=account))["code"]
    answer = requests.post(f"{sandbox.connect_url}/oauth/token", timeout=10,
                           data={"grant_type": "authorization_code", "code": code, "client_secret": sandbox.secret_key})
    assert answer.status_code == 200, answer.text
    return StripeToken.from_response(answer.json())


def api_status(sandbox: Sandbox, key: str) -> int:
    return requests.get(f"{sandbox.api_url}/v1/account", auth=(key, ""), timeout=10).status_code


def wait_until(condition: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


# --- connecting -------------------------------------------------------------------------------------

def test_a_key_adds_a_tested_connection_and_no_warehouse_file(connections, sandbox):
    outcome = connections.connect_with_key(sandbox.restricted_key)
    assert outcome.kind == ADDED and outcome.ok
    assert outcome.connection.status == SUCCESS and outcome.connection.name == NORTHWIND
    assert outcome.connection.last_started is not None  # tested, not only saved
    assert connections.registry.secret(outcome.connection.id) == sandbox.restricted_key
    assert connections.last_updated() == {outcome.connection.id: None}
    assert not connections.warehouse_path.exists()  # nothing synced, nothing created


def test_the_same_account_again_is_already_connected_and_nothing_is_saved(connections, sandbox):
    """Guards issue 10: the same account used to be added again as "Northwind Analytics (2)"."""
    first_key = sandbox.create_restricted_key({"account", "customers"})
    first = connections.connect_with_key(first_key).connection
    again = connections.connect_with_key(sandbox.restricted_key)
    assert again.kind == ALREADY_CONNECTED and not again.ok
    assert again.connection.id == first.id
    assert [c.id for c in connections.list()] == [first.id]
    assert connections.registry.secret(first.id) == first_key  # untouched until the user says so
    assert sandbox.restricted_key not in repr(again)

    replaced = connections.reauthenticate_existing(again)
    assert replaced.kind == REPLACED and replaced.ok and replaced.connection.id == first.id
    assert connections.registry.secret(first.id) == sandbox.restricted_key
    with pytest.raises(ConnectionsError) as refused:
        connections.reauthenticate_existing(replaced)
    assert refused.value.code == "nothing_to_reauthenticate"


def test_an_oauth_connection_and_a_key_of_its_account_are_the_same_account(connections, sandbox):
    token = oauth_token(sandbox)
    added = connections.connect_with_token(token)
    assert added.kind == ADDED and added.connection.auth_method == "oauth"
    assert added.connection.relay_url == sandbox.relay_url
    assert token.access_token not in repr(added)
    assert connections.connect_with_key(sandbox.restricted_key).kind == ALREADY_CONNECTED
    other = connections.connect_with_key(sandbox.create_restricted_key({"account", "customers"}, account=1))
    assert other.kind == ADDED and other.connection.name == "Brightwave Studio GmbH"


def test_another_api_or_mode_is_another_account_and_names_stay_unique(connections, registry, sandbox):
    registry.add(name=NORTHWIND, account_id=sandbox.accounts[0].id, account_name=NORTHWIND, livemode=False,
                 scope="read_only", auth_method="restricted_key", secret="rk_test_" + "x" * 40,
                 api_base="http://127.0.0.1:9")
    registry.add(name=f"{NORTHWIND} (2)", account_id=sandbox.accounts[0].id, account_name=NORTHWIND, livemode=True,
                 scope="read_only", auth_method="restricted_key", secret="rk_live_" + "x" * 40,
                 api_base=sandbox.api_url)
    outcome = connections.connect_with_key(sandbox.restricted_key)
    assert outcome.kind == ADDED
    assert outcome.connection.name == f"{NORTHWIND} (3)"  # names select sources: never two alike
    assert connections.unique_name("Brand new") == "Brand new"


def test_a_key_that_cannot_read_the_account_is_known_by_the_account_stripe_names(connections, sandbox):
    """Stripe names the account in a restricted key's refusal ("... on account 'acct_...'"): such a key is
    named after that account and what it reads, and a second one for the same account is already connected."""
    first = connections.connect_with_key(sandbox.create_restricted_key({"customers", "charges"}))
    assert first.kind == ADDED
    assert first.connection.account_id == sandbox.accounts[0].id
    assert first.connection.name == f"{sandbox.accounts[0].id} · Customers, Charges"
    assert "cannot read Coupons, Invoices, Plans, Subscriptions, Events" in first.warning
    second = connections.connect_with_key(sandbox.create_restricted_key({"customers", "charges"}))
    assert second.kind == ALREADY_CONNECTED and second.connection.id == first.connection.id


def test_reauthenticating_with_another_accounts_credential_is_refused_and_keeps_the_old(connections, sandbox):
    first = connections.connect_with_key(sandbox.restricted_key).connection
    with pytest.raises(AuthError) as refused:
        connections.connect_with_key(sandbox.create_restricted_key({"account", "customers"}, account=1),
                                     reauth_id=first.id)
    assert refused.value.code == "wrong_account"
    assert "Brightwave Studio GmbH" in str(refused.value) and first.account_id in str(refused.value)
    assert connections.registry.secret(first.id) == sandbox.restricted_key
    assert connections.registry.get(first.id).status == SUCCESS


def test_a_key_connection_reauthenticated_with_oauth_is_disconnected_at_stripe_on_delete(connections, sandbox):
    first = connections.connect_with_key(sandbox.restricted_key).connection
    token = oauth_token(sandbox)
    replaced = connections.connect_with_token(token, reauth_id=first.id)
    assert replaced.kind == REPLACED
    assert (replaced.connection.auth_method, replaced.connection.relay_url) == ("oauth", sandbox.relay_url)
    connections.delete(NORTHWIND)
    assert connections.list() == []
    assert api_status(sandbox, token.access_token) == 401  # the relay recorded: delete deauthorized


def test_an_oauth_connection_revoked_elsewhere_can_still_be_deleted(connections, sandbox):
    """Guards: a revoked token made the relay refuse to deauthorize, and Delete then refused forever."""
    token = oauth_token(sandbox)
    connection = connections.connect_with_token(token).connection
    RelayClient(sandbox.relay_url).deauthorize(access_token=token.access_token, stripe_user_id=connection.account_id)
    assert connections.test(connection.id).status == NEEDS_REAUTH
    removed = connections.delete(connection.id)
    assert removed.id == connection.id and connections.list() == []


def test_a_relay_that_cannot_be_reached_deletes_nothing(connections, registry, sandbox):
    token = oauth_token(sandbox)
    connection = connections.connect_with_token(token).connection
    registry._update(connection.id, relay_url="http://127.0.0.1:9")
    with pytest.raises(AuthError) as failed:
        connections.delete(connection.id)
    assert failed.value.code == "relay_unreachable" and "nothing was deleted" in str(failed.value)
    assert [c.id for c in connections.list()] == [connection.id]


def test_find_by_name_or_id_and_what_an_unknown_name_says(connections, sandbox):
    connection = connections.connect_with_key(sandbox.restricted_key).connection
    assert connections.find(NORTHWIND) == connections.find(connection.id)
    assert connections.source(NORTHWIND) is connections.source(connection.id)
    with pytest.raises(ConnectionsError) as unknown:
        connections.find("Nobody")
    assert unknown.value.code == "unknown_connection" and repr(NORTHWIND) in str(unknown.value)


def test_the_service_imports_no_widgets():
    """Guards the layering: scripts use the service without ipywidgets (and without DuckDB until needed)."""
    probe = ("import sys, mbi_widgets.connections; "
             "print(sorted(m for m in ('ipywidgets', 'mbi_widgets.ui', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# --- syncing ---------------------------------------------------------------------------------------

def test_sync_fills_the_warehouse_beside_the_registry_and_every_view_reads_it(connections, registry, sandbox):
    connection = connections.connect_with_key(sandbox.restricted_key).connection
    assert connections.warehouse_path == warehouse_path_for(registry) == registry.path.with_name("warehouse.duckdb")
    started = []
    connections.on_run(started.append)
    report = connections.sync(NORTHWIND, ["customers", "coupons"])
    assert set(report.tables) == {"customers", "coupons"}
    (run,) = started
    assert run is connections.current and not run.running and run.report is report
    assert run.tables == ("customers", "coupons") and set(run.written) == {"customers", "coupons"}
    assert run.fetched["customers"] == report["customers"].rows > 0  # rows counted per table as they came
    assert connections.warehouse_path.exists()
    assert connections.last_updated()[connection.id] is not None

    states = {state.table: state for state in connections.table_states(connection.id)}
    assert states["customers"].rows == report["customers"].rows and states["customers"].mode == "full"
    assert states["customers"].last_sync is not None and states["customers"].last_data_point is not None
    assert states["charges"].rows is None and states["charges"].last_sync is None  # never synced
    stored = connections.stored_table(connection.id, "customers")
    assert stored is not None and len(stored.frame) == report["customers"].rows
    assert stored.code == f"panel.warehouse.table('customers', account={connection.account_id!r})"
    assert connections.stored_table(connection.id, "charges") is None  # read from Stripe instead


def test_a_revoked_oauth_token_found_by_a_sync_says_so_and_keeps_the_warehouse(connections, sandbox):
    token = oauth_token(sandbox, account=1)
    connection = connections.connect_with_token(token).connection
    connections.sync(connection.id, SMALL)
    before = connections.warehouse.table("coupons", account=connection.account_id)
    RelayClient(sandbox.relay_url).deauthorize(access_token=token.access_token, stripe_user_id=connection.account_id)
    with pytest.raises(NeedsReauthentication) as refused:
        connections.sync(connection.id, SMALL)
    now = connections.registry.get(connection.id)
    assert now.status == NEEDS_REAUTH and refused.value.connection.id == connection.id
    for message in (str(refused.value), now.status_message, connections.test(connection.id).status_message):
        assert OAUTH_REVOKED in message
        assert "Invalid API Key" not in message and "restricted key" not in message
    assert connections.current.error is refused.value
    assert connections.warehouse.table("coupons", account=connection.account_id).equals(before)


def test_ticking_and_unticking_tables_keeps_parents_and_children_together(connections, sandbox):
    connection = connections.connect_with_key(sandbox.restricted_key).connection
    assert connections.set_synced(connection.id, "charges", False) == {"charges": False, "charges__refunds": False}
    assert connections.set_synced(connection.id, "charges__refunds", True) == {"charges__refunds": True,
                                                                               "charges": True}
    assert connections.set_synced(connection.id, "coupons", False) == {"coupons": False}
    report = connections.sync(connection.id)
    assert "coupons" not in report.tables and "charges" in report.tables
    states = {state.table: state for state in connections.table_states(connection.id)}
    assert states["coupons"].synced is False and states["charges__refunds"].synced is True


def test_chosen_columns_always_keep_id_created_and_the_parent_id(connections, sandbox):
    connection = connections.connect_with_key(sandbox.restricted_key).connection
    assert connections.set_columns(connection.id, "coupons", ["name"]) == ("id", "created", "name")
    refunds = connections.set_columns(connection.id, "charges__refunds", [])
    assert set(refunds) == {"id", "created", "charge_id"}
    states = {state.table: state for state in connections.table_states(connection.id)}
    assert states["coupons"].columns == ("id", "created", "name")
    assert states["coupons"].required == ("id", "created")
    assert set(states["charges__refunds"].required) == {"id", "created", "charge_id"}
    connections.sync(connection.id, ["coupons"])
    assert list(connections.warehouse.table("coupons").columns) == ["id", "created", "name"]
    assert len(connections.set_columns(connection.id, "coupons", None)) == len(states["coupons"].all_columns)


@pytest.fixture
def slow(tmp_path) -> Iterator[tuple[Sandbox, Connections]]:
    """A sandbox answering in 120 ms, so that a sync lasts long enough to meet another."""
    with Sandbox(seed=6, scale=10, latency_ms=120) as running:
        connections = Connections(Registry(tmp_path / "slow.sqlite3", store=MemoryStore()),
                                  api_base=running.api_url)
        connections.connect_with_key(running.restricted_key)
        yield running, connections


def test_one_sync_at_a_time_refused_or_waited_for(slow):
    _, connections = slow
    first = threading.Thread(target=connections.sync, args=(NORTHWIND,), daemon=True)
    first.start()
    wait_until(lambda: connections.busy, what="the first sync to start")
    with pytest.raises(SyncInProgress) as busy:
        connections.sync(NORTHWIND, wait=False)
    assert busy.value.code == "sync_running" and NORTHWIND in str(busy.value)
    second = connections.sync(NORTHWIND, SMALL)  # waits for the first, then runs
    first.join(30)
    runs = connections.runs
    assert len(runs) == 2 and runs[1].started >= runs[0].finished and second is runs[1].report


# --- the update cycle ------------------------------------------------------------------------------------

def test_the_update_cycle_syncs_every_period_until_stopped(connections, sandbox):
    good = connections.connect_with_key(sandbox.restricted_key).connection
    revoked = connections.connect_with_key(sandbox.create_restricted_key({"account", "coupons"}, account=1)).connection
    connections.set_synced(good.id, "events", False)  # keep each round short
    connections.registry._update(revoked.id, status=NEEDS_REAUTH)
    cycle = UpdateCycle(connections, 0.2).start()
    try:
        wait_until(lambda: cycle.rounds >= 2, what="two rounds")
    finally:
        cycle.stop()
    cycle.join(30)
    automatic = [run for run in connections.runs if run.trigger == AUTOMATIC]
    assert len(automatic) >= 2 and {run.connection_id for run in automatic} == {good.id}  # re-auth ones wait
    assert all(run.report is not None for run in automatic)
    done = len(connections.runs)
    time.sleep(0.5)
    assert len(connections.runs) == done and not cycle.active


def test_a_round_due_while_a_sync_runs_is_skipped_not_queued(slow):
    _, connections = slow
    manual = threading.Thread(target=connections.sync, args=(NORTHWIND,), daemon=True)
    cycle = UpdateCycle(connections, 0.05)
    manual.start()
    wait_until(lambda: connections.busy, what="the manual sync to start")
    cycle.start()
    wait_until(lambda: cycle.skipped >= 2, what="rounds skipped during the sync")
    manual.join(30)
    cycle.stop()
    cycle.join(30)
    runs = connections.runs
    assert runs[0].trigger == "manual"
    for earlier, later in zip(runs, runs[1:]):
        assert later.started >= earlier.finished  # never two at once, nothing queued behind the manual one


@pytest.mark.parametrize("every", [0, -5, float("nan"), float("inf")])
def test_an_update_period_must_be_a_positive_duration(connections, every):
    with pytest.raises(ConnectionsError) as refused:
        UpdateCycle(connections, every)
    assert refused.value.code == "invalid_period" and "timedelta" in str(refused.value)
