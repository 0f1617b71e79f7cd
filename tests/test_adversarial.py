"""Attacks and malformed input from the hardening review (issue 9), each over real HTTP on loopback.

This file: superscript digits in the sandbox's integer parameters, keys that are not text or carry
line breaks, a delete from a registry another process has locked, forwarded headers on the embedded
servers, and a relay whose public URL is not https. The rest lives beside it:
`test_adversarial_relay_store.py` (tokens at rest, throttles, cancel, spare grants),
`test_adversarial_relay_browser.py` (browser binding, CSRF, logs, plain http, deauthorize errors),
`test_adversarial_extraction.py` (silent servers, stuck cursors, wrong-shape answers) and
`test_adversarial_storage.py` (failing keyrings, loose folders, client disconnects).
"""
from __future__ import annotations

import pytest
import requests

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.tables.fetch import StripeSourceError


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=3, scale=20) as running:
        yield running


@pytest.mark.parametrize("query, param", [
    ("limit=%C2%B2", "limit"),                  # "²": str.isdigit() says yes, int() says no
    ("created[gt]=%C2%B2", "created[gt]"),
    ("created=%D9%A3", "created"),              # an Arabic-Indic digit three
    ("limit=99999999999999999999999", "limit"),
])
def test_non_ascii_or_huge_integers_are_a_400_naming_the_parameter(sandbox, query, param):
    answer = requests.get(f"{sandbox.api_url}/v1/charges?{query}", timeout=10,
                          headers={"Authorization": f"Bearer {sandbox.restricted_key}"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_superscript_array_index_is_a_400(sandbox):
    answer = requests.get(f"{sandbox.api_url}/v1/charges?expand[%C2%B2]=data.customer", timeout=10,
                          headers={"Authorization": f"Bearer {sandbox.restricted_key}"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("key", [12345, 3.5, b"rk_test_abc"])
def test_a_key_that_is_not_text_is_refused_at_once(sandbox, key):
    with pytest.raises(StripeSourceError, match="must be text") as caught:
        StripeSource(key, api_base=sandbox.api_url)
    assert caught.value.code == "invalid_key"


@pytest.mark.parametrize("suffix", ["\r\nX-Injected: 1", "\n", " ", "\t", "\u00a0"])
def test_a_key_with_line_breaks_or_spaces_is_refused_before_any_request(sandbox, suffix):
    with pytest.raises(StripeSourceError, match="line breaks") as caught:
        StripeSource(sandbox.restricted_key + suffix, api_base=sandbox.api_url)
    assert caught.value.code == "invalid_key"
    assert sandbox.restricted_key not in str(caught.value)


def test_deleting_from_a_registry_another_process_has_locked_loses_nothing(tmp_path, monkeypatch, sandbox):
    """A registry that cannot be written (here: another process holds SQLite's write lock) must
    keep both the row and the credential when a delete fails; before, the secrets went first."""
    import subprocess
    import sys

    from mbi_widgets import registry as registry_module
    from mbi_widgets.registry import Registry, RegistryError
    from mbi_widgets.secretstore import FileStore

    store = FileStore(tmp_path / "secrets.json")
    registry = Registry(tmp_path / "connections.sqlite3", store=store)
    connection = registry.add(name="Northwind", account_id=sandbox.accounts[0].id, account_name="Northwind",
                              livemode=False, scope="read_only", auth_method="restricted_key",
                              secret=sandbox.restricted_key, api_base=sandbox.api_url)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.readline()",
         str(registry.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(registry_module, "BUSY_TIMEOUT_MS", 300)
        with pytest.raises(RegistryError) as caught:
            registry.delete(connection.id)
        assert "locked" in str(caught.value).lower() or "busy" in str(caught.value).lower()
    finally:
        holder.communicate("\n", timeout=10)
    assert registry.get(connection.id) == connection
    assert store.get(connection.secret_ref) == sandbox.restricted_key
    registry.delete(connection.id)  # once the other process lets go, the delete goes through whole
    assert registry.list() == [] and store.get(connection.secret_ref) is None


def test_embedded_servers_count_the_connecting_address_not_a_forwarded_header():
    """uvicorn trusts X-Forwarded-For from loopback by default: the sandbox and test relays must not,
    or a client could pick the address a throttle counts."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from mbi_widgets.serving import BackgroundServer

    async def who(request):
        return PlainTextResponse(f"{request.client.host} {request.url.scheme}")

    server = BackgroundServer(Starlette(routes=[Route("/", who)])).start()
    try:
        answer = requests.get(server.url, timeout=10,
                              headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    finally:
        server.stop()
    assert answer.text == "127.0.0.1 http"


@pytest.mark.parametrize("public_url", ["http://relay.example.com", "ftp://relay.example.com"])
def test_the_relay_refuses_a_public_url_that_is_not_https_off_loopback(public_url, tmp_path, monkeypatch, capsys):
    from mbi_widgets.cli import main

    monkeypatch.setenv("MBI_RELAY_SECRET_KEY", "sk_test_" + "x" * 24)
    code = main(["relay", "--client-id", "ca_test", "--public-url", public_url, "--db",
                 str(tmp_path / "relay" / "sessions.sqlite3"), "--port", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert "https" in error and public_url in error
    assert not (tmp_path / "relay").exists()  # refused before anything was created
