"""Device-style authorization end to end over real HTTP: notebook client, relay, and the sandbox's Connect.

Flows against the sandbox's embedded relay poll every 2 s; standalone relays (for expiry,
restarts, throttling and database checks) are configured with a 0.2 s interval, which the relay
advertises rounded up to whole seconds.
"""
from __future__ import annotations

import html
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.auth import (
    CLIENT_ID,
    DEVICE_GRANT,
    AuthError,
    Connected,
    Denied,
    DeviceFlow,
    Expired,
    Failed,
    Idle,
    RelayClient,
    StripeToken,
    Unreachable,
    Waiting,
    validate_key,
)
from mbi_widgets.oauth import transport_allowed
from mbi_widgets.relay import RelayConfig, create_app
from mbi_widgets.sandbox import confirm_code, parse_redirect
from mbi_widgets.serving import BackgroundServer

USER_CODE = re.compile(r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(scale=20) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------------------

class StandaloneRelay:
    """A relay of its own on loopback, wired to the sandbox's Connect and API."""

    def __init__(self, sandbox: Sandbox, db_path: Path, *, session_ttl: float, interval: float, port: int) -> None:
        self.sandbox, self.db_path, self.session_ttl, self.interval = sandbox, db_path, session_ttl, interval
        self.server = BackgroundServer(make_app=self._make_app, port=port, name="test-relay")
        self.app = None

    def _make_app(self, url: str):
        config = RelayConfig(client_id=self.sandbox.client_id, secret_key=self.sandbox.secret_key, public_url=url,
                             connect_url=self.sandbox.connect_url, api_url=self.sandbox.api_url,
                             db_path=str(self.db_path), session_ttl=self.session_ttl, interval=self.interval)
        self.app = create_app(config)
        return self.app

    def start(self) -> "StandaloneRelay":
        self.server.start()
        self.url = self.server.url
        self.port = int(urlsplit(self.url).port)
        self.sandbox.register_redirect_uri(self.url + "/oauth/callback")
        return self

    @property
    def sessions(self):
        return self.app.state.relay.sessions

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def start_relay(sandbox, tmp_path):
    started: list[StandaloneRelay] = []

    def start(*, db_path: Path | None = None, session_ttl: float = 60.0, interval: float = 0.2,
              port: int = 0) -> StandaloneRelay:
        relay = StandaloneRelay(sandbox, db_path or tmp_path / "relay.sqlite3", session_ttl=session_ttl,
                                interval=interval, port=port).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()
        relay.sessions.close()


class RecordingClient(RelayClient):
    """The real RelayClient, remembering every poll answer (and when it came)."""

    def __init__(self, relay_url: str, **options) -> None:
        super().__init__(relay_url, **options)
        self.answers: list[tuple[float, object]] = []
        self._changed = threading.Condition()

    def poll(self, device_code: str):
        answer = super().poll(device_code)
        with self._changed:
            self.answers.append((time.monotonic(), answer))
            self._changed.notify_all()
        return answer

    def wait_for(self, predicate) -> None:
        with self._changed:
            self._changed.wait_for(lambda: predicate([answer for _, answer in self.answers]))


def new_code(relay_url: str) -> dict:
    answer = requests.post(f"{relay_url}/device/code", data={"client_id": CLIENT_ID}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def poll_raw(relay_url: str, device_code: str, client_id: str = CLIENT_ID) -> requests.Response:
    return requests.post(f"{relay_url}/device/token", timeout=10,
                         data={"grant_type": DEVICE_GRANT, "client_id": client_id, "device_code": device_code})


def authorize_link(browser: requests.Session, relay_url: str, user_code: str) -> str:
    """The 'Sign in with Stripe' link of the relay's access page for `user_code`."""
    access = confirm_code(browser, relay_url, user_code)
    assert access.status_code == 200, access.text
    link = re.search(r'href="([^"]+)"[^>]*>Sign in with Stripe to Continue', access.text)
    assert link is not None, access.text
    return html.unescape(link.group(1))


def approve_at(sandbox: Sandbox, relay_url: str, user_code: str, *, account: int = 0,
               deny: bool = False) -> requests.Response:
    """Walks a relay's pages and the sandbox's Connect sign-in as an admin would; returns the callback page."""
    with requests.Session() as browser:
        location = sandbox.authorize(authorize_link(browser, relay_url, user_code),
                                     account=sandbox.accounts[account].id, deny=deny)
        return browser.get(location, timeout=30)


def connect_accounts(sandbox: Sandbox, *accounts: int) -> list[StripeToken]:
    """Runs one device flow per account on the embedded relay (concurrently) and returns the tokens."""
    flows = [DeviceFlow(sandbox.relay_url) for _ in accounts]
    codes = [flow.start() for flow in flows]
    for account, waiting in zip(accounts, codes):
        assert isinstance(waiting, Waiting)
        assert "Connection successful" in sandbox.approve(waiting.user_code, email=sandbox.accounts[account].email)
    tokens = []
    for account, flow in zip(accounts, flows):
        state = flow.wait()
        assert isinstance(state, Connected), state
        assert state.token.stripe_user_id == sandbox.accounts[account].id
        tokens.append(state.token)
    return tokens


def api_status(sandbox: Sandbox, key: str) -> int:
    return requests.get(f"{sandbox.api_url}/v1/account", auth=(key, ""), timeout=10).status_code


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- approve, deny, expire ------------------------------------------------------------------------------

def test_approve_connects_and_the_token_reads_the_accounts_charges(sandbox):
    flow = DeviceFlow(sandbox.relay_url)
    seen: list = []
    flow.observe(seen.append)
    waiting = flow.start()
    assert isinstance(waiting, Waiting)
    assert USER_CODE.match(waiting.user_code)
    assert waiting.verification_uri == f"{sandbox.relay_url}/device"
    assert waiting.link == f"{sandbox.relay_url}/device?user_code={waiting.user_code}"
    assert waiting.interval == 2

    assert "Connection successful" in sandbox.approve(waiting.user_code)
    state = flow.wait()
    assert isinstance(state, Connected), state
    token = state.token
    assert token.stripe_user_id == sandbox.accounts[0].id
    assert token.scope == "read_only"
    assert token.access_token.startswith("sk_test_") and token.refresh_token.startswith("rt_")
    assert token.access_token not in repr(state)
    assert [type(s) for s in seen] == [Waiting, Connected]

    charges = StripeSource(token.access_token, api_base=sandbox.api_url).table("charges")
    expected = set(sandbox.dataset(0).collections["charges"].position)
    assert len(expected) > 0
    assert set(charges["id"]) == expected


def test_deny_in_the_browser_ends_denied(sandbox):
    flow = DeviceFlow(sandbox.relay_url)
    waiting = flow.start()
    assert "denied" in sandbox.deny(waiting.user_code).lower()
    state = flow.wait()
    assert isinstance(state, Denied), state
    assert "denied" in state.message.lower()


def test_an_unapproved_code_expires(start_relay):
    relay = start_relay(session_ttl=2, interval=0.2)
    flow = DeviceFlow(relay.url)
    waiting = flow.start()
    state = flow.wait()
    assert isinstance(state, Expired), state
    answer = poll_raw(relay.url, waiting.device_code)
    assert answer.status_code == 400
    assert answer.json()["error"] == "expired_token"
    # Too late to approve it in the browser, too.
    with requests.Session() as browser:
        late = confirm_code(browser, relay.url, waiting.user_code)
    assert late.status_code == 400
    assert "not valid or has expired" in late.text


def test_the_advertised_interval_is_never_shorter_than_the_enforced_one(start_relay):
    """A client that waits exactly the advertised interval must not be told slow_down (RFC 8628 §3.5)."""
    relay = start_relay(interval=0.2)
    code = new_code(relay.url)
    assert code["interval"] >= 0.2
    assert poll_raw(relay.url, code["device_code"]).json()["error"] == "authorization_pending"
    time.sleep(code["interval"])
    assert poll_raw(relay.url, code["device_code"]).json()["error"] == "authorization_pending"


def test_polling_too_fast_is_told_slow_down_and_the_client_then_waits_longer(start_relay):
    relay = start_relay(interval=0.2)
    code = new_code(relay.url)
    assert poll_raw(relay.url, code["device_code"]).json()["error"] == "authorization_pending"
    second = poll_raw(relay.url, code["device_code"])
    assert second.status_code == 400
    assert second.json()["error"] == "slow_down"

    class Hasty(RecordingClient):
        """Polls twice at once the first time, as a careless client would."""

        def poll(self, device_code):
            if not self.answers:
                super().poll(device_code)
            return super().poll(device_code)

    client = Hasty(relay.url)
    flow = DeviceFlow(relay.url, client=client)
    seen: list = []
    flow.observe(seen.append)
    waiting = flow.start()
    client.wait_for(lambda answers: len(answers) >= 3)
    flow.cancel()
    (t_pending, first), (t_slow, slow), (t_next, after) = client.answers[:3]
    assert first.error == "authorization_pending"
    assert slow.error == "slow_down"
    # The flow announced the larger interval, waited it, and the relay was satisfied.
    assert [s.interval for s in seen if isinstance(s, Waiting)] == [waiting.interval, waiting.interval + 5]
    assert t_next - t_slow >= waiting.interval + 5
    assert after.error == "authorization_pending"


# --- the relay goes away ----------------------------------------------------------------------------------

def test_a_restarted_relay_keeps_the_pending_session_and_the_flow_completes(sandbox, start_relay, tmp_path):
    db = tmp_path / "restart.sqlite3"
    first = start_relay(db_path=db, interval=0.2)
    url, port = first.url, first.port
    client = RecordingClient(url)
    flow = DeviceFlow(url, client=client)
    waiting = flow.start()
    first.stop()
    # The notebook keeps polling through the outage.
    client.wait_for(lambda answers: any(isinstance(a, Unreachable) for a in answers))
    assert isinstance(flow.state, Waiting)

    second = start_relay(db_path=db, port=port, interval=0.2)
    assert second.url == url
    page = approve_at(sandbox, second.url, waiting.user_code)
    assert page.status_code == 200, page.text
    assert "Connection successful" in page.text
    state = flow.wait()
    assert isinstance(state, Connected), state
    assert state.token.stripe_user_id == sandbox.accounts[0].id
    assert api_status(sandbox, state.token.access_token) == 200


def test_start_against_a_closed_port_fails_relay_unreachable():
    flow = DeviceFlow(f"http://127.0.0.1:{closed_port()}")
    seen: list = []
    flow.observe(seen.append)
    state = flow.start()
    assert isinstance(state, Failed)
    assert state.code == "relay_unreachable"
    assert flow.wait() == state
    assert seen == [state]


def test_a_relay_lost_mid_flow_ends_failed_at_the_deadline(start_relay):
    relay = start_relay(session_ttl=2, interval=0.2)
    client = RecordingClient(relay.url)
    flow = DeviceFlow(relay.url, client=client)
    assert isinstance(flow.start(), Waiting)
    relay.stop()
    state = flow.wait()
    assert isinstance(state, Failed), state
    assert state.code == "relay_unreachable"
    answers = [answer for _, answer in client.answers]
    assert answers and isinstance(answers[-1], Unreachable)


def test_cancel_mid_wait_goes_idle_and_no_more_polls_reach_the_relay(start_relay):
    relay = start_relay(interval=0.2)
    client = RecordingClient(relay.url)
    flow = DeviceFlow(relay.url, client=client)
    waiting = flow.start()
    client.wait_for(lambda answers: len(answers) >= 1)
    flow.cancel()
    assert flow.state == Idle()
    assert flow.wait() == Idle()
    flow._thread.join()  # noqa: SLF001 - the polling thread really ends
    polls = len(client.answers)
    last_poll = relay.sessions.by_device_code(waiting.device_code).last_poll
    assert last_poll is not None
    time.sleep(2 * waiting.interval)  # two polling intervals in which nothing may arrive
    assert relay.sessions.by_device_code(waiting.device_code).last_poll == last_poll
    assert len(client.answers) == polls


# --- tokens leave once --------------------------------------------------------------------------------------

def _connect_through(sandbox, relay) -> tuple[Waiting, StripeToken]:
    flow = DeviceFlow(relay.url)
    waiting = flow.start()
    assert approve_at(sandbox, relay.url, waiting.user_code).status_code == 200
    state = flow.wait()
    assert isinstance(state, Connected), state
    return waiting, state.token


def test_a_replayed_device_code_is_refused_and_the_tokens_are_gone_from_the_database(sandbox, start_relay):
    relay = start_relay(interval=0.2)
    waiting, token = _connect_through(sandbox, relay)
    replay = poll_raw(relay.url, waiting.device_code)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert RelayClient(relay.url).poll(waiting.device_code).error == "invalid_grant"

    with sqlite3.connect(relay.db_path) as db:
        rows = db.execute("select * from sessions").fetchall()
    assert rows
    values = [value for row in rows for value in row if isinstance(value, str)]
    for value in values:
        assert "sk_test_" not in value and not value.startswith("rt_")
        assert token.access_token not in value and token.refresh_token not in value
    # Device codes are kept only as hashes.
    assert waiting.device_code not in values


def test_redeemed_tokens_leave_no_bytes_in_the_sqlite_files(sandbox, start_relay):
    """Not only the row: the database files (with SQLite's write-ahead log) must not keep the tokens."""
    relay = start_relay(interval=0.2)
    waiting, token = _connect_through(sandbox, relay)
    files = sorted(relay.db_path.parent.glob(relay.db_path.name + "*"))
    assert relay.db_path in files
    for path in files:
        raw = path.read_bytes()
        assert token.access_token.encode() not in raw, f"the access token is still in {path.name}"
        assert token.refresh_token.encode() not in raw, f"the refresh token is still in {path.name}"
        assert waiting.device_code.encode() not in raw


# --- the OAuth callback ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    {"code": "ac_forged", "state": "forged-state"},
    {"code": "ac_forged"},
    {"code": "ac_forged", "state": ""},
    {"error": "access_denied", "error_description": "denied", "state": "forged-state"},
], ids=["forged-state", "missing-state", "empty-state", "forged-denial"])
def test_a_callback_with_a_forged_or_missing_state_is_refused_and_changes_nothing(sandbox, start_relay, query):
    relay = start_relay(interval=0.2)
    code = new_code(relay.url)
    before = relay.sessions.by_device_code(code["device_code"])
    answer = requests.get(f"{relay.url}/oauth/callback", params=query, timeout=10)
    assert answer.status_code == 400
    assert "This link is not valid" in answer.text
    assert relay.sessions.by_device_code(code["device_code"]) == before
    assert poll_raw(relay.url, code["device_code"]).json()["error"] == "authorization_pending"
    # The real sign-in still works afterwards.
    assert "Connection successful" in approve_at(sandbox, relay.url, code["user_code"]).text


def test_a_replayed_connect_code_is_refused_by_the_relay_and_by_connect(sandbox):
    code = new_code(sandbox.relay_url)
    with requests.Session() as browser:
        link = authorize_link(browser, sandbox.relay_url, code["user_code"])
        asked = parse_qs(urlsplit(link).query)
        assert asked["client_id"] == [sandbox.client_id]
        assert asked["scope"] == ["read_only"]
        assert asked["redirect_uri"] == [f"{sandbox.relay_url}/oauth/callback"]
        location = sandbox.authorize(link)
        first = browser.get(location, timeout=30)
        assert first.status_code == 200 and "Connection successful" in first.text
        again = browser.get(location, timeout=30)
    assert again.status_code == 400
    assert "already used" in again.text
    connect_code = parse_redirect(location)["code"]
    direct = requests.post(f"{sandbox.connect_url}/oauth/token", timeout=10,
                           data={"grant_type": "authorization_code", "code": connect_code,
                                 "client_secret": sandbox.secret_key})
    assert direct.status_code == 400
    assert direct.json()["error"] == "invalid_grant"


# --- the browser pages ------------------------------------------------------------------------------------------

def test_a_wrong_user_code_rerenders_the_form_and_repeated_guesses_are_throttled(start_relay):
    relay = start_relay(interval=0.2)
    code = new_code(relay.url)
    with requests.Session() as browser:
        # The right code, typed in lower case without the dash, is accepted.
        typed = code["user_code"].replace("-", "").lower()
        accepted = confirm_code(browser, relay.url, typed)
        assert accepted.status_code == 200 and "Sign in with Stripe" in accepted.text
        for _ in range(10):
            wrong = confirm_code(browser, relay.url, "BBBB-BBBB")
            assert wrong.status_code == 400
            assert "That code is not valid or has expired" in wrong.text
            assert 'name="user_code"' in wrong.text
        blocked = confirm_code(browser, relay.url, "BBBB-BBBB")
        assert blocked.status_code == 429
        assert "Too many attempts" in blocked.text
        # Only wrong codes wait: the right one still goes through (the address may be a NAT shared with a guesser).
        assert confirm_code(browser, relay.url, code["user_code"]).status_code == 200


@pytest.mark.parametrize("payload", [HOSTILE, '"><img src=x onerror=alert(1)>'])
def test_the_code_page_escapes_hostile_input(sandbox, payload):
    page = requests.get(f"{sandbox.relay_url}/device", params={"user_code": payload}, timeout=10)
    assert page.status_code == 200
    text = page.text.lower()
    assert "<script>alert" not in text
    assert "<img" not in text
    assert html.escape(payload.upper()).lower() in text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_the_access_page_is_served_while_an_in_process_client_holds_the_oauth_transport_lock(start_relay):
    """A notebook polling an in-process relay (the sandbox's) holds `transport_allowed` for the whole poll;
    the relay's access page must not block its event loop on that lock, or the poll and the page deadlock."""
    relay = start_relay(interval=0.2)
    code = new_code(relay.url)
    with ThreadPoolExecutor(1) as pool, requests.Session() as browser:
        with transport_allowed(relay.url):  # as RelayClient.poll does around its request
            page = pool.submit(confirm_code, browser, relay.url, code["user_code"])
            time.sleep(0.3)  # let the relay take up the page request first
            poll = poll_raw(relay.url, code["device_code"])  # times out (10 s) if the relay's loop is stuck
        assert poll.json()["error"] == "authorization_pending"
        assert page.result().status_code == 200


def test_a_device_code_request_with_a_wrong_client_id_is_refused(sandbox):
    for form in ({"client_id": "someone-else"}, {}):
        answer = requests.post(f"{sandbox.relay_url}/device/code", data=form, timeout=10)
        assert answer.status_code == 401
        assert answer.json()["error"] == "invalid_client"
    with pytest.raises(AuthError) as refused:
        RelayClient(sandbox.relay_url, client_id="someone-else").request_code()
    assert refused.value.code == "invalid_client"
    code = new_code(sandbox.relay_url)
    assert poll_raw(sandbox.relay_url, code["device_code"], client_id="someone-else").status_code == 401


# --- deauthorization ------------------------------------------------------------------------------------------------

def test_deauthorize_through_the_relay_revokes_only_with_the_accounts_own_token(sandbox):
    first, second = connect_accounts(sandbox, 0, 1)
    relay = RelayClient(sandbox.relay_url)

    with pytest.raises(AuthError) as refused:
        relay.deauthorize(access_token=second.access_token, stripe_user_id=first.stripe_user_id)
    assert "403" in str(refused.value)
    assert refused.value.code == "invalid_grant"
    assert api_status(sandbox, first.access_token) == 200

    missing = requests.post(f"{sandbox.relay_url}/oauth/deauthorize", data={"stripe_user_id": first.stripe_user_id},
                            timeout=10)
    assert missing.status_code == 400
    assert api_status(sandbox, first.access_token) == 200

    relay.deauthorize(access_token=first.access_token, stripe_user_id=first.stripe_user_id)
    assert api_status(sandbox, first.access_token) == 401
    assert api_status(sandbox, second.access_token) == 200


# --- restricted keys instead of OAuth ----------------------------------------------------------------------------------

def test_validate_key_refuses_a_publishable_key_and_names_restricted_keys(sandbox):
    with pytest.raises(AuthError) as refused:
        validate_key("pk_test_51Habcdefghijklmnop", api_base=sandbox.api_url)
    assert refused.value.code == "publishable_key"
    assert "restricted key" in str(refused.value)


def test_validate_key_accepts_a_restricted_key_without_warning(sandbox):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check = validate_key(sandbox.restricted_key, api_base=sandbox.api_url)
    assert check.account_id == sandbox.accounts[0].id
    assert check.auth_method == "restricted_key"
    assert check.warning is None
    assert check.livemode is False


def test_validate_key_accepts_a_full_secret_key_with_a_warning(sandbox):
    with pytest.warns(UserWarning, match="full secret key"):
        check = validate_key(sandbox.secret_key, api_base=sandbox.api_url)
    assert check.account_id == sandbox.platform_account_id
    assert check.auth_method == "secret_key"
    assert check.warning and "restricted key" in check.warning


@pytest.mark.parametrize("key", ["rk_test_" + "x" * 40, "sk_test_" + "y" * 40, "not-a-key"])
def test_validate_key_rejects_a_wrong_key(sandbox, key):
    with pytest.raises(AuthError) as refused:
        validate_key(key, api_base=sandbox.api_url)
    assert refused.value.code == "invalid_key"
    if len(key) > 20:
        assert key not in str(refused.value)


def test_validate_key_accepts_a_key_without_account_permission(sandbox):
    """Changed on purpose (issue 10): the account is the one Stripe names in its refusal, not "unknown"."""
    key = sandbox.create_restricted_key({"customers"})
    check = validate_key(key, api_base=sandbox.api_url)
    assert check.auth_method == "restricted_key"
    assert check.account_id == sandbox.accounts[0].id
    assert check.account_name == f"{sandbox.accounts[0].id} · Customers"
    assert "cannot read Charges" in check.warning


def test_validate_key_refuses_a_key_that_can_read_neither_the_account_nor_any_table(sandbox):
    key = sandbox.create_restricted_key(set())
    with pytest.raises(AuthError) as refused:
        validate_key(key, api_base=sandbox.api_url)
    assert refused.value.code == "key_refused"
    assert "rak_customer_read" in str(refused.value) and key not in str(refused.value)


# --- the command line -------------------------------------------------------------------------------------------------

def test_the_relay_command_without_the_secret_key_exits_2_naming_the_variable(tmp_path):
    env = {name: value for name, value in os.environ.items() if not name.startswith("MBI_RELAY_")}
    done = subprocess.run([sys.executable, "-m", "mbi_widgets.cli", "relay", "--port", str(closed_port())],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "MBI_RELAY_SECRET_KEY" in done.stderr
    assert "serving" not in done.stdout
    assert list(tmp_path.iterdir()) == []  # no database was created


def test_the_relay_command_serves_a_connect_platform_given_its_keys(sandbox, tmp_path):
    """`mbi-widgets relay` run as a process for a platform (here the sandbox's) completes a device flow."""
    port = closed_port()
    relay_url = f"http://127.0.0.1:{port}"
    sandbox.register_redirect_uri(f"{relay_url}/oauth/callback")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MBI_RELAY_")}
    env["MBI_RELAY_SECRET_KEY"] = sandbox.secret_key
    command = [sys.executable, "-m", "mbi_widgets.cli", "relay", "--client-id", sandbox.client_id,
               "--connect-url", sandbox.connect_url, "--api-url", sandbox.api_url,
               "--db", str(tmp_path / "relay.sqlite3"), "--port", str(port)]
    relay = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"serving {relay_url}" in relay.stdout.readline()
        deadline = time.monotonic() + 60
        while True:  # uvicorn binds just after the banner
            try:
                requests.get(f"{relay_url}/device", timeout=2)
                break
            except requests.ConnectionError:
                assert relay.poll() is None and time.monotonic() < deadline, "the relay process did not start"
                time.sleep(0.1)
        flow = DeviceFlow(relay_url)
        waiting = flow.start()
        assert isinstance(waiting, Waiting)
        assert "Connection successful" in sandbox.approve(waiting.user_code, relay_url=relay_url)
        state = flow.wait(60)
        assert isinstance(state, Connected)
        assert state.token.stripe_user_id == sandbox.accounts[0].id
        assert sandbox.secret_key not in (tmp_path / "relay.sqlite3").read_bytes().decode("latin-1")
    finally:
        relay.terminate()
        relay.wait(timeout=20)
