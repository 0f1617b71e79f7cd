"""The connections registry on real files against a real sandbox: statuses from `test()`, re-authentication,
deletion with deauthorization, no half-written state, two kernels at once, and no secret in SQLite or logs."""
from __future__ import annotations

import logging
import re
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from mbi_widgets import Sandbox
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import (
    ERROR,
    NEEDS_REAUTH,
    PENDING,
    REGISTRY_ENV,
    SUCCESS,
    Connection,
    MissingSecretError,
    Registry,
    RegistryError,
    UnknownConnectionError,
)
from mbi_widgets.sandbox import parse_redirect
from mbi_widgets.secretstore import FileStore, MemoryStore

from .registry_writer import secret_for

REDIRECT_URI = "http://127.0.0.1:9/mbi-widgets/callback"
WRITER = Path(__file__).with_name("registry_writer.py")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(scale=20, redirect_uris=(REDIRECT_URI,)) as running:
        yield running


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "secrets" / "secrets.json")


@pytest.fixture
def registry(tmp_path, store):
    return Registry(tmp_path / "data" / "connections.sqlite3", store=store)


def add_key(registry: Registry, sandbox: Sandbox, key: str, *, name: str = "Northwind",
            auth_method: str = "restricted_key", account: int = 0, **extra) -> Connection:
    who = sandbox.accounts[account]
    return registry.add(name=name, account_id=who.id, account_name=who.business_name, livemode=False,
                        scope="read_only", auth_method=auth_method, secret=key, api_base=sandbox.api_url, **extra)


def oauth_tokens(sandbox: Sandbox, account: int = 1) -> dict:
    """A real Connect authorization of a seeded account: sign in, then exchange the code."""
    query = urlencode({"response_type": "code", "client_id": sandbox.client_id, "scope": "read_only",
                       "redirect_uri": REDIRECT_URI, "state": "registry-test"})
    code = parse_redirect(sandbox.authorize(f"{sandbox.connect_url}/oauth/authorize?{query}", account=account))["code"]
    answer = requests.post(f"{sandbox.connect_url}/oauth/token", timeout=10,
                           data={"grant_type": "authorization_code", "code": code, "client_secret": sandbox.secret_key})
    assert answer.status_code == 200, answer.text
    return answer.json()


def relay_deauthorize(sandbox: Sandbox):
    """What the relay does on delete: Stripe's /oauth/deauthorize with the platform key."""
    calls: list[tuple[Connection, str]] = []

    def deauthorize(connection: Connection, access_token: str) -> None:
        calls.append((connection, access_token))
        answer = requests.post(f"{sandbox.connect_url}/oauth/deauthorize", timeout=10,
                               data={"client_id": sandbox.client_id, "stripe_user_id": connection.account_id,
                                     "client_secret": sandbox.secret_key})
        answer.raise_for_status()

    deauthorize.calls = calls  # type: ignore[attr-defined]
    return deauthorize


# --- adding and reading ----------------------------------------------------------------------------

def test_add_keeps_the_secret_in_the_store_and_the_row_in_sqlite(registry, store, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    assert re.fullmatch(r"conn_[0-9a-f]{10}", connection.id)
    assert (connection.connection_type, connection.status, connection.auth_method) == ("Stripe", PENDING,
                                                                                       "restricted_key")
    assert connection.created.tzinfo is not None and connection.created.utcoffset() == timedelta(0)
    assert (connection.last_started, connection.last_duration, connection.relay_url) == (None, None, None)
    assert store.get(connection.secret_ref) == sandbox.restricted_key
    assert registry.secret(connection.id) == sandbox.restricted_key
    again = Registry(registry.path, store=store)  # another kernel opening the same files
    assert again.get(connection.id) == connection


def test_list_is_ordered_by_creation_and_rename_persists(registry, sandbox):
    first = add_key(registry, sandbox, sandbox.restricted_key, name="first")
    second = add_key(registry, sandbox, sandbox.restricted_key, name="second")
    third = add_key(registry, sandbox, sandbox.restricted_key, name="third")
    assert [c.id for c in registry.list()] == [first.id, second.id, third.id]
    renamed = registry.rename(second.id, "  Brightwave   EU ")
    assert renamed.name == "Brightwave EU" and registry.get(second.id).name == "Brightwave EU"
    assert [c.name for c in registry.list()] == ["first", "Brightwave EU", "third"]


def test_unknown_ids_raise_an_error_that_says_what_to_do(registry):
    with pytest.raises(UnknownConnectionError) as caught:
        registry.get("conn_0000000000")
    assert isinstance(caught.value, MbiError) and "list()" in str(caught.value)
    with pytest.raises(UnknownConnectionError):
        registry.rename("conn_0000000000", "x")


@pytest.mark.parametrize(("field", "value", "words"), [("auth_method", "password", "auth_method"),
                                                       ("secret", "", "credential"), ("name", "   ", "name")])
def test_add_refuses_bad_input_and_stores_nothing(registry, store, sandbox, field, value, words):
    arguments = {"name": "N", "auth_method": "restricted_key", "secret": sandbox.restricted_key} | {field: value}
    with pytest.raises(RegistryError) as caught:
        add_key(registry, sandbox, arguments.pop("secret"), **arguments)
    assert words in str(caught.value)
    assert registry.list() == [] and store.refs() == []


def test_registry_path_comes_from_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "env" / "registry.sqlite3"
    monkeypatch.setenv(REGISTRY_ENV, str(target))
    registry = Registry(store=MemoryStore())
    assert registry.path == target and target.exists()


def test_a_registry_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "connections.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RegistryError) as caught:
        Registry(path, store=MemoryStore())
    assert "upgrade mbi-widgets" in str(caught.value)


# --- test(): what each outcome records -----------------------------------------------------------------

def test_a_good_restricted_key_tests_successful_with_time_and_duration(registry, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    tested = registry.test(connection.id)
    assert tested.status == SUCCESS
    assert tested.last_duration is not None and tested.last_duration > 0
    assert tested.last_started is not None and tested.last_started.tzinfo is not None
    assert tested.last_started >= connection.created
    assert registry.get(connection.id) == tested  # persisted, not only returned


def test_an_invalid_key_needs_reauthentication_with_the_reason(registry, sandbox):
    wrong = "rk_test_" + "W" * 36 + "nope"
    connection = add_key(registry, sandbox, wrong)
    tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH
    assert "401" in tested.status_message and "Invalid API Key" in tested.status_message
    assert "re-authenticate" in tested.status_message
    assert wrong not in tested.status_message
    assert tested.last_started is not None


def test_a_deauthorized_oauth_token_needs_reauthentication(registry, sandbox):
    tokens = oauth_tokens(sandbox)
    connection = add_key(registry, sandbox, tokens["access_token"], auth_method="oauth", account=1,
                         refresh_token=tokens["refresh_token"])
    assert registry.test(connection.id).status == SUCCESS
    relay_deauthorize(sandbox)(connection, tokens["access_token"])
    tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH and "revoked" in tested.status_message


def test_a_key_for_another_account_needs_reauthentication(registry, sandbox):
    connection = add_key(registry, sandbox, sandbox.create_restricted_key({"account"}, account=1), account=0)
    tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH and sandbox.accounts[1].id in tested.status_message


def test_a_key_that_reads_the_tables_but_not_the_account_is_a_success(registry, sandbox):
    """Guards: restricted keys need no Account permission to be a working connection."""
    every = {"customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events"}
    connection = add_key(registry, sandbox, sandbox.create_restricted_key(every))
    tested = registry.test(connection.id)
    assert tested.status == SUCCESS and "every expected table" in tested.status_message


def test_a_key_that_reads_some_tables_says_which_it_cannot_read(registry, sandbox):
    """Changed on purpose (issue 10): one readable table used to pass for a key that reads everything."""
    connection = add_key(registry, sandbox, sandbox.create_restricted_key({"customers", "charges"}))
    tested = registry.test(connection.id)
    assert tested.status == SUCCESS
    assert "reads only Customers, Charges" in tested.status_message
    assert "Events" in tested.status_message and "rak_event_read" in tested.status_message


def test_a_key_that_reads_neither_account_nor_tables_is_an_error_not_a_reauthentication(registry, sandbox):
    connection = add_key(registry, sandbox, sandbox.create_restricted_key(set()))
    tested = registry.test(connection.id)
    assert tested.status == ERROR and "rak_account_read" in tested.status_message
    assert "rak_customer_read" in tested.status_message


def test_a_key_without_account_access_for_another_account_needs_reauthentication(registry, sandbox):
    """Stripe names the account in a restricted key's refusal: a key for another account is caught."""
    connection = add_key(registry, sandbox, sandbox.create_restricted_key({"customers"}, account=1))
    tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH and sandbox.accounts[1].id in tested.status_message


def test_an_unreachable_server_is_an_error(registry, sandbox):
    connection = registry.add(name="down", account_id="acct_x", account_name="x", livemode=False,
                              scope="read_only", auth_method="restricted_key", secret=sandbox.restricted_key,
                              api_base="http://127.0.0.1:9")
    tested = registry.test(connection.id)
    assert tested.status == ERROR and "Could not reach http://127.0.0.1:9" in tested.status_message


def test_a_missing_secret_needs_reauthentication_without_a_request(registry, store, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    store.delete(connection.secret_ref)
    tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH and "missing" in tested.status_message
    assert tested.last_started is None  # nothing was started
    with pytest.raises(MissingSecretError) as caught:
        registry.secret(connection.id)
    assert "Re-authenticate" in str(caught.value)


def test_a_corrupt_store_file_means_reauthentication_not_a_crash(registry, store, sandbox, caplog):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    store.path.write_bytes(b'{"version": 1, "secrets": {"mbi-widgets:conn')  # a torn write by some other tool
    with caplog.at_level(logging.WARNING):
        tested = registry.test(connection.id)
    assert tested.status == NEEDS_REAUTH
    assert "not valid JSON" in caplog.text
    assert [c.id for c in registry.list()] == [connection.id]  # the registry itself is intact


def test_replace_secret_reauthenticates(registry, store, sandbox):
    connection = add_key(registry, sandbox, "rk_test_" + "R" * 40, auth_method="oauth",
                         refresh_token="rt_" + "old" * 12)
    assert registry.test(connection.id).status == NEEDS_REAUTH
    replaced = registry.replace_secret(connection.id, sandbox.restricted_key, auth_method="restricted_key")
    assert (replaced.status, replaced.auth_method) == (PENDING, "restricted_key")
    assert registry.secret(connection.id) == sandbox.restricted_key
    assert registry.refresh_token(connection.id) is None  # the old grant's refresh token went with it
    assert registry.test(connection.id).status == SUCCESS


def test_source_reads_the_connections_account(registry, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    source = registry.source(connection.id)
    assert len(source.preview("customers", rows=3)) == 3
    assert sandbox.restricted_key not in repr(source)


# --- delete ----------------------------------------------------------------------------------------

def test_delete_deauthorizes_an_oauth_connection_then_removes_secret_and_row(registry, store, sandbox):
    tokens = oauth_tokens(sandbox)
    connection = add_key(registry, sandbox, tokens["access_token"], auth_method="oauth", account=1,
                         refresh_token=tokens["refresh_token"])
    seen_while_deauthorizing: list[tuple[bool, bool]] = []
    relay = relay_deauthorize(sandbox)

    def deauthorize(conn: Connection, token: str) -> None:
        seen_while_deauthorizing.append((store.get(conn.secret_ref) is not None,
                                         any(c.id == conn.id for c in registry.list())))
        relay(conn, token)

    registry.delete(connection.id, deauthorize=deauthorize)
    assert relay.calls == [(connection, tokens["access_token"])]
    assert seen_while_deauthorizing == [(True, True)]  # deauthorized before anything was removed
    assert store.get(connection.secret_ref) is None and store.get(connection.refresh_ref) is None
    assert registry.list() == []
    revoked = requests.get(f"{sandbox.api_url}/v1/account", timeout=10,
                           headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert revoked.status_code == 401


def test_a_failing_deauthorize_leaves_everything_in_place(registry, store, sandbox):
    connection = add_key(registry, sandbox, "sk_test_" + "o" * 40, auth_method="oauth",
                         refresh_token="rt_" + "r" * 40)

    def refuse(conn: Connection, token: str) -> None:
        raise ConnectionError("the relay is down")

    with pytest.raises(ConnectionError):
        registry.delete(connection.id, deauthorize=refuse)
    assert registry.get(connection.id) == connection
    assert store.get(connection.secret_ref) == "sk_test_" + "o" * 40
    assert store.get(connection.refresh_ref) == "rt_" + "r" * 40


def test_delete_of_a_key_connection_does_not_deauthorize(registry, store, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    calls = []
    removed = registry.delete(connection.id, deauthorize=lambda conn, token: calls.append(conn))
    assert calls == [] and removed == connection
    assert registry.list() == [] and store.refs() == []


# --- nothing half-written, nothing lost ------------------------------------------------------------------

def test_a_failed_insert_leaves_no_orphan_secret(registry, store, sandbox):
    with sqlite3.connect(registry.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON connections BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(RegistryError) as caught:
        add_key(registry, sandbox, sandbox.restricted_key, refresh_token="rt_" + "z" * 40)
    assert "disk says no" in str(caught.value)
    assert store.refs() == []
    assert registry.list() == []


def test_two_processes_adding_at_once_lose_nothing(tmp_path):
    registry_path, secrets_path = tmp_path / "connections.sqlite3", tmp_path / "secrets" / "secrets.json"
    writers = [subprocess.Popen([sys.executable, str(WRITER), str(registry_path), str(secrets_path), name, "25"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in ("alpha", "beta")]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    for writer in writers:  # both are initialised: release them together
        writer.stdin.write("go\n")
        writer.stdin.flush()
    outputs = [writer.communicate()[0] for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    registry = Registry(registry_path, store=FileStore(secrets_path))
    connections = registry.list()
    assert len(connections) == 50 and len({c.id for c in connections}) == 50
    assert len(FileStore(secrets_path).refs()) == 50
    for connection in connections:
        writer, index = connection.name.split("-")
        assert registry.secret(connection.id) == secret_for(writer, int(index))


# --- no secret anywhere it should not be ---------------------------------------------------------------

def test_no_secret_in_the_database_logs_or_reprs(tmp_path, sandbox, caplog):
    store = FileStore(tmp_path / "s" / "secrets.json")
    registry = Registry(tmp_path / "r" / "connections.sqlite3", store=store)
    wrong = "rk_test_" + "L" * 36 + "leak"
    refresh = "rt_" + "F" * 40
    reader = sqlite3.connect(registry.path)  # an open reader keeps the -wal file on disk
    reader.execute("SELECT count(*) FROM connections").fetchone()
    try:
        with caplog.at_level(logging.DEBUG):
            good = add_key(registry, sandbox, sandbox.restricted_key, refresh_token=refresh, auth_method="oauth")
            bad = add_key(registry, sandbox, wrong)
            tested = [registry.test(good.id), registry.test(bad.id)]
            registry.replace_secret(bad.id, wrong + "2")
            registry.rename(good.id, "renamed")
            texts = [repr(c) for c in [good, bad, *tested, *registry.list()]] + [repr(registry), repr(store),
                                                                                  str(registry.list())]
        files = [registry.path, registry.path.with_name(registry.path.name + "-wal")]
        assert files[1].exists() and files[1].stat().st_size > 0
        database = b"".join(path.read_bytes() for path in files)
    finally:
        reader.close()
    assert good.id.encode() in database  # the rows are there...
    for secret in (sandbox.restricted_key, wrong, wrong + "2", refresh):
        assert secret.encode() not in database  # ...the secrets are not
        assert secret not in caplog.text
        assert all(secret not in text for text in texts)
    assert caplog.records  # logging did happen


def test_timestamps_are_stored_in_utc(registry, sandbox):
    connection = add_key(registry, sandbox, sandbox.restricted_key)
    with sqlite3.connect(registry.path) as db:
        created, = db.execute("SELECT created FROM connections WHERE id = ?", (connection.id,)).fetchone()
    assert created.endswith("+00:00")
    assert registry.get(connection.id).created == connection.created.astimezone(UTC)


def test_kernels_opening_a_new_registry_at_once_all_succeed(tmp_path):
    """Guards: switching a new file to WAL does not wait for other openers; Registry() retries it."""
    opener = ("import sys; from mbi_widgets.registry import Registry; from mbi_widgets.secretstore import MemoryStore; "
              "sys.stdin.readline(); Registry(sys.argv[1], store=MemoryStore()); print('ok')")
    for round_ in range(5):
        path = tmp_path / f"round{round_}" / "connections.sqlite3"
        openers = [subprocess.Popen([sys.executable, "-c", opener, str(path)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
        time.sleep(0.5)  # let every interpreter start, so that they open the file together
        for process in openers:
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=60) for process in openers]
        assert [out.strip() for out, _ in results] == ["ok"] * 8, [err[-300:] for _, err in results]


def test_a_sync_that_finds_the_token_revoked_needs_reauthentication_and_keeps_the_warehouse(registry, sandbox,
                                                                                             tmp_path):
    from mbi_widgets.tables.fetch import AuthenticationFailed
    from mbi_widgets.warehouse import Warehouse

    tokens = oauth_tokens(sandbox)
    connection = add_key(registry, sandbox, tokens["access_token"], auth_method="oauth", account=1,
                         refresh_token=tokens["refresh_token"])
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    first = registry.sync(connection.id, warehouse, ["customers", "coupons"])
    assert first["customers"].mode == "full" and first["customers"].rows > 0
    before = warehouse.table("customers")
    status_before = warehouse.status().drop(columns="cursor_age")  # the age grows with the wall clock
    relay_deauthorize(sandbox)(connection, tokens["access_token"])
    with pytest.raises(AuthenticationFailed):
        registry.sync(connection.id, warehouse, ["customers", "coupons"])
    refused = registry.get(connection.id)
    assert refused.status == NEEDS_REAUTH and "last good sync" in refused.status_message
    assert tokens["access_token"] not in refused.status_message
    assert warehouse.table("customers").equals(before)
    assert warehouse.status().drop(columns="cursor_age").equals(status_before)
