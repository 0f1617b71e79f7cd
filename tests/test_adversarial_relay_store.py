"""Issue 9, items 1, 3 and 4: the relay's tokens at rest, its guess and issuance throttles, and cancellation.

Everything runs over real HTTP on loopback: standalone relays (`BackgroundServer`, or the real
`mbi-widgets relay` process where uvicorn's own options matter) wired to one sandbox, whose Connect
emulation shows whether a grant was deauthorized. Different client addresses are real: requests
leave from 127.0.0.x source addresses.
"""
from __future__ import annotations

import html
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from requests.adapters import HTTPAdapter

from mbi_widgets import Sandbox
from mbi_widgets.errors import MbiError
from mbi_widgets.auth import CLIENT_ID, DEVICE_GRANT, AuthError, Connected, DeviceFlow, Idle, RelayClient, Waiting
from mbi_widgets.relay import RelayConfig, config_from_env, create_app
from mbi_widgets.relay.atrest import key_path_for
from mbi_widgets.relay.sessions import SessionStore
from mbi_widgets.sandbox import Faults, confirm_code
from mbi_widgets.serving import BackgroundServer


@pytest.fixture(scope="module")
def sandbox():
    # Faults only on Connect's endpoints, and only when a test injects one (slow exchanges, a failing deauthorize).
    with Sandbox(scale=20, faults=Faults(rate=0.0, paths=("/oauth/",), slow_ms=700)) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------------------

class Served:
    """A relay of its own on loopback, wired to the sandbox's Connect and API."""

    def __init__(self, sandbox: Sandbox, config: RelayConfig) -> None:
        self.sandbox, self.config = sandbox, config
        self.server = BackgroundServer(make_app=self._make_app, name="test-relay")
        self.app = None

    def _make_app(self, url: str):
        self.config.public_url = url
        self.app = create_app(self.config)
        return self.app

    def start(self) -> "Served":
        self.server.start()
        self.url = self.server.url
        self.sandbox.register_redirect_uri(self.url + "/oauth/callback")
        return self

    @property
    def relay(self):
        return self.app.state.relay

    def stop(self) -> None:
        self.server.stop()
        self.relay.sessions.close()


@pytest.fixture
def serve(sandbox, tmp_path):
    started: list[Served] = []

    def start(*, db_path: Path | None = None, port: int = 0, **options) -> Served:
        config = RelayConfig(client_id=sandbox.client_id, secret_key=sandbox.secret_key, public_url="http://unset",
                             connect_url=sandbox.connect_url, api_url=sandbox.api_url,
                             db_path=str(db_path or tmp_path / "relay.sqlite3"), **{"interval": 0.2, **options})
        served = Served(sandbox, config)
        served.server.port = port
        started.append(served.start())
        return served

    yield start
    for served in started:
        if served.server.url is not None:
            served.stop()


class FromAddress(HTTPAdapter):
    """Sends from another loopback address: the relay sees a different client, as behind another NAT."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        return super().init_poolmanager(*args, **kwargs)


def browser_at(address: str = "127.0.0.1") -> requests.Session:
    browser = requests.Session()
    browser.mount("http://", FromAddress(address))
    return browser


def new_code(relay_url: str, address: str = "127.0.0.1") -> requests.Response:
    with browser_at(address) as client:
        return client.post(f"{relay_url}/device/code", data={"client_id": CLIENT_ID}, timeout=10)


def poll(relay_url: str, device_code: str) -> dict:
    return requests.post(f"{relay_url}/device/token", timeout=10, data={
        "grant_type": DEVICE_GRANT, "client_id": CLIENT_ID, "device_code": device_code}).json()


def stripe_link(browser: requests.Session, relay_url: str, user_code: str) -> str:
    access = confirm_code(browser, relay_url, user_code)
    assert access.status_code == 200, access.text
    link = re.search(r'href="([^"]+)"[^>]*>Sign in with Stripe to Continue', access.text)
    assert link is not None, access.text
    return html.unescape(link.group(1))


def approve(sandbox: Sandbox, relay_url: str, user_code: str, *, account: int = 0) -> requests.Response:
    """Confirms the code and signs in at the sandbox's Connect in one browser; returns the callback page."""
    with requests.Session() as browser:
        location = sandbox.authorize(stripe_link(browser, relay_url, user_code), account=sandbox.accounts[account].id)
        return browser.get(location, timeout=30)


def stored_tokens(db_path: Path, device_code: str, key: bytes) -> dict | None:
    """The tokens a session holds, opened with the relay's key (as only the relay can)."""
    from mbi_widgets.relay.sessions import hash_code

    with sqlite3.connect(db_path) as db:
        row = db.execute("select tokens from sessions where device_hash = ?", (hash_code(device_code),)).fetchone()
    return json.loads(Fernet(key).decrypt(row[0].encode())) if row and row[0] else None


def api_status(sandbox: Sandbox, key: str) -> int:
    return requests.get(f"{sandbox.api_url}/v1/account", auth=(key, ""), timeout=10).status_code


def connected_at_stripe(sandbox: Sandbox, account: int) -> bool:
    """Whether the platform is still connected to the account (asking disconnects it: check last)."""
    answer = requests.post(f"{sandbox.connect_url}/oauth/deauthorize", auth=(sandbox.secret_key, ""), timeout=10,
                           data={"client_id": sandbox.client_id, "stripe_user_id": sandbox.accounts[account].id})
    assert answer.status_code in (200, 400), answer.text
    return answer.status_code == 200


def eventually(predicate, timeout: float = 5.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 1. tokens at rest ---------------------------------------------------------------------------------------

def test_the_database_is_0600_in_a_new_0700_folder_and_its_tokens_are_encrypted(sandbox, serve, tmp_path):
    """Was: mbi-relay.sqlite3 0644 (umask) with access and refresh tokens in plain text."""
    db = tmp_path / "deploy" / "relay" / "sessions.sqlite3"
    existing = mode(tmp_path)
    old_umask = os.umask(0o022)
    try:
        served = serve(db_path=db)
    finally:
        os.umask(old_umask)
    code = new_code(served.url).json()
    assert "Connection successful" in approve(sandbox, served.url, code["user_code"]).text

    key_file = key_path_for(db)
    assert mode(db.parent) == 0o700 and mode(db.parent.parent) == 0o700  # folders it created
    assert mode(tmp_path) == existing  # an existing folder is left alone
    files = sorted(db.parent.glob(db.name + "*"))
    assert db in files and key_file in files
    for path in files:
        assert mode(path) == 0o600, f"{path.name} is {oct(mode(path))}"
    tokens = stored_tokens(db, code["device_code"], key_file.read_bytes().strip())
    assert tokens and tokens["access_token"].startswith("sk_test_")
    for path in files:  # the database files hold no token in the clear, the key file holds only the key
        raw = path.read_bytes()
        assert tokens["access_token"].encode() not in raw and tokens["refresh_token"].encode() not in raw
    # The notebook still collects them, once.
    collected = poll(served.url, code["device_code"])
    assert collected["access_token"] == tokens["access_token"]


def test_a_key_from_the_environment_is_used_and_a_changed_key_fails_the_session_clearly(sandbox, serve, tmp_path):
    key = Fernet.generate_key().decode()
    config = config_from_env({"MBI_RELAY_CLIENT_ID": sandbox.client_id, "MBI_RELAY_SECRET_KEY": sandbox.secret_key,
                              "MBI_RELAY_PUBLIC_URL": "http://unset", "MBI_RELAY_TOKEN_KEY": key})
    assert config.token_key == key and key not in repr(config)
    db = tmp_path / "env" / "sessions.sqlite3"
    first = serve(db_path=db, token_key=key)
    code = new_code(first.url).json()
    assert "Connection successful" in approve(sandbox, first.url, code["user_code"], account=1).text
    assert not key_path_for(db).exists()
    token = stored_tokens(db, code["device_code"], key.encode())["access_token"]
    first.stop()

    # Restarted with another key: the stored tokens cannot be opened. The notebook is told why, the relay
    # does not crash, and the grant that nobody can collect any more is deauthorized.
    second = serve(db_path=db, token_key=Fernet.generate_key().decode())
    answer = poll(second.url, code["device_code"])
    assert answer["error"] == "invalid_grant"
    assert "decrypt" in answer["error_description"] and "Start again" in answer["error_description"]
    time.sleep(0.25)  # the polling interval
    assert poll(second.url, code["device_code"])["error"] == "access_denied"  # failed for good, no second try
    assert api_status(sandbox, token) == 401
    assert new_code(second.url).status_code == 200  # still serving

    with pytest.raises(MbiError, match="MBI_RELAY_TOKEN_KEY is not a valid token key") as bad:
        create_app(RelayConfig(client_id="ca_x", secret_key="sk_test_x", public_url="http://127.0.0.1:1",
                               db_path=str(tmp_path / "bad.sqlite3"), token_key="not-a-key"))
    assert bad.value.code == "relay_config" and "Fernet.generate_key" in str(bad.value)


def test_an_older_world_readable_database_is_tightened(tmp_path):
    db = tmp_path / "old.sqlite3"
    sqlite3.connect(db).close()
    os.chmod(db, 0o644)
    os.chmod(tmp_path, 0o755)
    SessionStore(db).close()
    assert mode(db) == 0o600
    assert mode(key_path_for(db)) == 0o600
    assert mode(tmp_path) == 0o755  # not our folder to change


def test_an_approved_code_nobody_collects_loses_its_tokens_and_its_grant_on_a_timer(sandbox, serve, tmp_path):
    """Was: tokens stayed until someone asked for a new code, 60 s after expiry, and stayed valid at Stripe."""
    db = tmp_path / "timer.sqlite3"
    served = serve(db_path=db, session_ttl=1.0, purge_interval=0.1)
    code = new_code(served.url).json()
    assert "Connection successful" in approve(sandbox, served.url, code["user_code"]).text
    token = stored_tokens(db, code["device_code"], key_path_for(db).read_bytes().strip())["access_token"]
    assert api_status(sandbox, token) == 200

    # No request reaches the relay meanwhile: only its timer can act.
    assert eventually(lambda: api_status(sandbox, token) == 401, timeout=6)
    assert stored_tokens(db, code["device_code"], key_path_for(db).read_bytes().strip()) is None
    assert poll(served.url, code["device_code"])["error"] == "expired_token"


def test_a_failed_deauthorization_is_logged_without_secrets_and_retried(sandbox, serve, tmp_path, caplog):
    db = tmp_path / "retry.sqlite3"
    served = serve(db_path=db, session_ttl=1.0, purge_interval=0.2)
    code = new_code(served.url).json()
    assert "Connection successful" in approve(sandbox, served.url, code["user_code"]).text
    token = stored_tokens(db, code["device_code"], key_path_for(db).read_bytes().strip())
    sandbox.inject_fault("503", count=1, path="/oauth/deauthorize")  # Stripe fails the first attempt
    with caplog.at_level(logging.INFO, logger="mbi_widgets.relay"):
        assert eventually(lambda: "could not deauthorize" in caplog.text, timeout=6), caplog.text
        assert eventually(lambda: api_status(sandbox, token["access_token"]) == 401, timeout=6)
    assert "HTTP 503" in caplog.text and sandbox.accounts[0].id in caplog.text
    for secret in (token["access_token"], token["refresh_token"], sandbox.secret_key, code["device_code"]):
        assert secret not in caplog.text

    def queued() -> int:
        with sqlite3.connect(db) as check:
            return check.execute("select count(*) from revocations").fetchone()[0]

    assert eventually(lambda: queued() == 0)  # done: off the queue (the relay notes it just after Stripe answers)


# --- 3. guess throttling -----------------------------------------------------------------------------------

def test_wrong_guesses_are_still_counted_after_a_restart_and_a_right_code_gets_through(serve, tmp_path):
    """Was: a restart forgot the counters, and a valid code from a throttled address waited ten minutes."""
    db = tmp_path / "counters.sqlite3"
    first = serve(db_path=db, guess_limit=3)
    code = new_code(first.url).json()
    with requests.Session() as browser:
        for _ in range(3):
            assert confirm_code(browser, first.url, "BBBB-BBBB").status_code == 400
        assert confirm_code(browser, first.url, "BBBB-BBBB").status_code == 429
    port = urlsplit(first.url).port
    first.stop()

    second = serve(db_path=db, guess_limit=3, port=port)
    with requests.Session() as browser:
        wrong = confirm_code(browser, second.url, "CCCC-CCCC")
        assert wrong.status_code == 429 and "Too many attempts" in wrong.text
        right = confirm_code(browser, second.url, code["user_code"])
        assert right.status_code == 200 and "Sign in with Stripe" in right.text


def test_a_global_cap_on_wrong_guesses_holds_against_many_addresses_but_not_a_first_right_code(serve):
    relay = serve(guess_limit=100, global_guess_limit=4)
    code = new_code(relay.url).json()
    for n in range(2, 6):  # four addresses, one wrong guess each: the per-address limit never bites
        with browser_at(f"127.0.0.{n}") as browser:
            assert confirm_code(browser, relay.url, "BBBB-BBBB").status_code == 400
    with browser_at("127.0.0.2") as browser:
        # An address that guessed wrong lately is not even heard now: not a wrong code, nor a right one.
        assert confirm_code(browser, relay.url, "CCCC-CCCC").status_code == 429
        assert confirm_code(browser, relay.url, code["user_code"]).status_code == 429
    with browser_at("127.0.0.9") as browser:
        # Someone typing their right code the first time is served.
        assert confirm_code(browser, relay.url, code["user_code"]).status_code == 200


def test_forwarded_headers_do_not_dodge_the_throttle_unless_the_proxy_is_trusted(sandbox, tmp_path):
    """Was: uvicorn trusted X-Forwarded-For from loopback, so a new header per guess was never throttled."""

    def run(*options: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        env = {name: value for name, value in os.environ.items() if not name.startswith("MBI_RELAY_")}
        env["MBI_RELAY_SECRET_KEY"] = sandbox.secret_key
        process = subprocess.Popen(
            [sys.executable, "-m", "mbi_widgets.cli", "relay", "--client-id", sandbox.client_id, "--connect-url",
             sandbox.connect_url, "--api-url", sandbox.api_url, "--port", str(port), *options],
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        assert eventually(lambda: _answers(url) or process.poll() is not None, timeout=30) and process.poll() is None
        return process, url

    def guesses(url: str, count: int, forwarded_for) -> list[int]:
        statuses = []
        with requests.Session() as browser:
            for n in range(count):
                browser.headers["X-Forwarded-For"] = forwarded_for(n)
                statuses.append(confirm_code(browser, url, "BBBB-BBBB").status_code)
        return statuses

    process, url = run()
    try:
        assert guesses(url, 11, lambda n: f"203.0.113.{n + 1}") == [400] * 10 + [429]
    finally:
        process.terminate()
        process.wait(timeout=20)
    # The default database is private: a 0700 folder in the working directory.
    assert mode(tmp_path / "mbi-relay") == 0o700 and mode(tmp_path / "mbi-relay" / "sessions.sqlite3") == 0o600

    process, url = run("--forwarded-allow-ips", "127.0.0.1", "--db", str(tmp_path / "proxied.sqlite3"))
    try:  # behind a trusted proxy, each forwarded address has its own count
        assert guesses(url, 11, lambda n: f"203.0.113.{n + 1}") == [400] * 11
        assert guesses(url, 11, lambda n: "198.51.100.7") == [400] * 10 + [429]
    finally:
        process.terminate()
        process.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        requests.get(f"{url}/device", timeout=2)
    except requests.ConnectionError:
        return False
    return True


def test_device_code_issuance_is_capped_per_address_and_in_total(serve):
    """Was: 500 codes in 1.2 s from one address."""
    relay = serve(issue_limit=3, max_pending=5)
    issued = [new_code(relay.url, "127.0.0.2") for _ in range(4)]
    assert [answer.status_code for answer in issued] == [200, 200, 200, 429]
    refused = issued[-1]
    assert refused.json()["error"] == "slow_down" and "wait a minute" in refused.json()["error_description"]
    assert int(refused.headers["retry-after"]) > 0
    with pytest.raises(AuthError) as caught:
        RelayClient(relay.url, session=browser_at("127.0.0.2")).request_code()
    assert caught.value.code == "slow_down"

    assert [new_code(relay.url, "127.0.0.3").status_code for _ in range(3)] == [200, 200, 429]
    full = new_code(relay.url, "127.0.0.4")
    assert full.status_code == 429 and full.json()["error"] == "temporarily_unavailable"
    # A cancelled code no longer holds a place.
    RelayClient(relay.url).cancel(issued[0].json()["device_code"])
    assert new_code(relay.url, "127.0.0.4").status_code == 200


# --- 4. cancel means cancelled -------------------------------------------------------------------------------------

def test_cancel_in_the_notebook_kills_the_link(serve):
    """Was: after Cancel, the link still worked and signing in said "Connection successful"."""
    relay = serve()
    flow = DeviceFlow(relay.url)
    waiting = flow.start()
    assert isinstance(waiting, Waiting)
    started = time.monotonic()
    flow.cancel()
    assert time.monotonic() - started < 0.5  # the click never waits on the network
    assert flow.state == Idle()
    flow._cancelled.join(10)  # noqa: SLF001 - the background call telling the relay

    page = requests.get(waiting.link, timeout=10)
    assert page.status_code == 410 and "cancelled in the notebook" in page.text
    with requests.Session() as browser:  # typing the code on the code page
        form = browser.get(f"{relay.url}/device", timeout=10)
        csrf = re.search(r'name="csrf_token" value="([^"]*)"', form.text)
        typed = browser.post(f"{relay.url}/device", timeout=10, data={
            "user_code": waiting.user_code, "csrf_token": html.unescape(csrf.group(1)) if csrf else ""})
    assert typed.status_code == 410 and "cancelled in the notebook" in typed.text
    assert poll(relay.url, waiting.device_code)["error"] == "invalid_grant"
    # Cancelling needs the device code, which only the notebook holds.
    with pytest.raises(AuthError) as caught:
        RelayClient(relay.url).cancel("not-a-device-code")
    assert caught.value.code == "invalid_grant"


def test_a_stripe_sign_in_finished_after_cancel_is_deauthorized(sandbox, serve):
    relay = serve()
    code = new_code(relay.url).json()
    with requests.Session() as browser:
        link = stripe_link(browser, relay.url, code["user_code"])  # the admin is on Stripe's page...
        RelayClient(relay.url).cancel(code["device_code"])  # ...when the notebook cancels
        location = sandbox.authorize(link, account=sandbox.accounts[1].id)
        page = browser.get(location, timeout=30)
    assert page.status_code == 410 and "cancelled in the notebook" in page.text
    assert "Connection successful" not in page.text
    assert poll(relay.url, code["device_code"])["error"] == "invalid_grant"
    assert not connected_at_stripe(sandbox, 1)


def test_cancel_after_approval_drops_the_uncollected_tokens_and_their_grant(sandbox, serve, tmp_path):
    db = tmp_path / "approved.sqlite3"
    relay = serve(db_path=db)
    code = new_code(relay.url).json()
    assert "Connection successful" in approve(sandbox, relay.url, code["user_code"]).text
    token = stored_tokens(db, code["device_code"], key_path_for(db).read_bytes().strip())["access_token"]
    RelayClient(relay.url).cancel(code["device_code"])
    assert stored_tokens(db, code["device_code"], key_path_for(db).read_bytes().strip()) is None
    assert poll(relay.url, code["device_code"])["error"] == "invalid_grant"
    assert api_status(sandbox, token) == 401


def test_cancel_that_cannot_reach_the_relay_does_not_block_and_logs_no_secret(serve, caplog):
    relay = serve()
    flow = DeviceFlow(relay.url, client=RelayClient(relay.url, timeout=0.3))
    waiting = flow.start()
    port = urlsplit(relay.url).port
    relay.stop()
    with socket.socket() as hole:  # accepts connections into its backlog and never answers
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", port))
        hole.listen(8)
        with caplog.at_level(logging.WARNING, logger="mbi_widgets.auth"):
            started = time.monotonic()
            flow.cancel()
            assert time.monotonic() - started < 0.2
            flow._cancelled.join(10)  # noqa: SLF001
    assert "was not told" in caplog.text and "relay_unreachable" in caplog.text
    assert waiting.device_code not in caplog.text


def test_a_code_approved_twice_at_once_keeps_one_grant(sandbox, serve, tmp_path):
    """Was: the second grant's tokens were dropped but stayed valid at Stripe. Both sign-ins run their code
    exchange at the same time (Connect answers slowly), from the browser that confirmed the code."""

    def approve_twice(accounts: tuple[int, int]) -> tuple[list[str], DeviceFlow]:
        relay = serve(db_path=tmp_path / f"twice-{accounts[0]}{accounts[1]}.sqlite3")
        flow = DeviceFlow(relay.url)
        waiting = flow.start()
        pages: list[str] = []
        with requests.Session() as browser:
            links = [stripe_link(browser, relay.url, waiting.user_code) for _ in accounts]
            locations = [sandbox.authorize(link, account=sandbox.accounts[a].id) for link, a in zip(links, accounts)]
            sandbox.inject_fault("slow", count=2, path="/oauth/token")
            threads = [threading.Thread(target=lambda loc=loc: pages.append(browser.get(loc, timeout=30).text))
                       for loc in locations]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert sum("Connection successful" in page for page in pages) == 1, pages
        assert sum("already used" in page for page in pages) == 1, pages
        return pages, flow

    # Two different accounts: the one the notebook gets works, the other one is disconnected again.
    _, flow = approve_twice((0, 1))
    state = flow.wait(30)
    assert isinstance(state, Connected), state
    assert api_status(sandbox, state.token.access_token) == 200
    kept = [a.id for a in sandbox.accounts].index(state.token.stripe_user_id)
    assert not connected_at_stripe(sandbox, 1 - kept)

    # The same account twice: deauthorizing the spare grant would cut off the one handed out, so it is dropped.
    _, flow = approve_twice((1, 1))
    state = flow.wait(30)
    assert isinstance(state, Connected), state
    assert api_status(sandbox, state.token.access_token) == 200
