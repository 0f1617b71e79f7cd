"""The relay's browser side and its logs under attack (issue 9, items 2, 5, 6 and 7), over real HTTP on loopback.

A sign-in link handed to another browser, forged confirm forms, secrets in DEBUG and access logs,
relay URLs the OAuth transport refuses, a polling thread that dies, and deauthorization while
Stripe is unreachable. Standalone relays run on `BackgroundServer`, wired to a sandbox's Connect.
"""
from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from mbi_widgets import Sandbox
from mbi_widgets.auth import (
    CLIENT_ID,
    DEVICE_GRANT,
    AuthError,
    Connected,
    DeviceFlow,
    Failed,
    RelayClient,
    StripeToken,
    TokenIssued,
    Waiting,
)
from mbi_widgets.errors import MbiError
from mbi_widgets.oauth import insecure_transport_reason, transport_allowed
from mbi_widgets.relay import RelayConfig, create_app
from mbi_widgets.relay.app import BROWSER_COOKIE
from mbi_widgets.relay.sessions import PENDING
from mbi_widgets.sandbox import confirm_code, parse_redirect
from mbi_widgets.serving import BackgroundServer


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=5, scale=20) as running:
        yield running


class Relay:
    """A relay of its own on loopback (its session store inspectable), wired to the sandbox by default."""

    def __init__(self, sandbox: Sandbox, db_path: Path, *, public_url: str | None = None,
                 connect_url: str | None = None, api_url: str | None = None, access_log: bool = False) -> None:
        self.sandbox, self.app, self.db_path = sandbox, None, db_path
        self._public_url = public_url
        self._connect_url, self._api_url = connect_url or sandbox.connect_url, api_url or sandbox.api_url
        self.server = BackgroundServer(make_app=self._make_app, name="test-relay", access_log=access_log).start()
        self.url = self.server.url
        sandbox.register_redirect_uri(f"{self.url}/oauth/callback")

    def _make_app(self, url: str):
        self.app = create_app(RelayConfig(
            client_id=self.sandbox.client_id, secret_key=self.sandbox.secret_key, public_url=self._public_url or url,
            connect_url=self._connect_url, api_url=self._api_url, db_path=str(self.db_path), interval=0.05))
        return self.app

    @property
    def sessions(self):
        return self.app.state.relay.sessions


@pytest.fixture
def start_relay(sandbox, tmp_path):
    started: list[Relay] = []

    def start(*, db_path: Path | None = None, **options) -> Relay:
        relay = Relay(sandbox, db_path or tmp_path / f"relay-{len(started)}.sqlite3", **options)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.server.stop()
        relay.sessions.close()


def new_code(relay_url: str) -> dict:
    answer = requests.post(f"{relay_url}/device/code", data={"client_id": CLIENT_ID}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def poll(relay_url: str, device_code: str) -> dict:
    time.sleep(0.06)  # the relay's interval is 0.05 s: a faster poll is told slow_down
    return requests.post(f"{relay_url}/device/token", timeout=10, data={
        "grant_type": DEVICE_GRANT, "client_id": CLIENT_ID, "device_code": device_code}).json()


def sign_in_link(access_page: requests.Response) -> str:
    assert access_page.status_code == 200, access_page.text
    link = re.search(r'href="([^"]+)"[^>]*>Sign in with Stripe to Continue', access_page.text)
    assert link is not None, access_page.text
    return html.unescape(link.group(1))


def csrf_of(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- item 2: the Connect callback belongs to the browser that confirmed the code --------------------------

@pytest.mark.parametrize("other_has_a_cookie, deny", [(False, False), (True, False), (True, True)],
                         ids=["no-cookie-approves", "own-cookie-approves", "own-cookie-denies"])
def test_a_sign_in_link_opened_in_another_browser_is_refused_and_the_first_browser_can_still_finish(
        sandbox, start_relay, other_has_a_cookie, deny):
    """Remote phishing (RFC 8628 sec. 5.4): A confirms the code and hands the Stripe link to B. B's approval
    must not deliver B's account to A's device code, nor may B's Deny end A's flow."""
    relay = start_relay()
    code = new_code(relay.url)
    with requests.Session() as browser_a, requests.Session() as browser_b:
        link = sign_in_link(confirm_code(browser_a, relay.url, code["user_code"]))
        if other_has_a_cookie:  # B has been on the relay's page too, with a cookie of its own
            assert browser_b.get(f"{relay.url}/device", timeout=10).status_code == 200
            assert browser_b.cookies.get(BROWSER_COOKIE) not in (None, browser_a.cookies.get(BROWSER_COOKIE))
        location = sandbox.authorize(link, account=1, deny=deny)  # B signs in at Stripe as *its* account
        refused = browser_b.get(location, timeout=30)
        assert refused.status_code == 400
        text = " ".join(refused.text.split())
        assert "opened in a different browser from the one that entered the code" in text
        assert "same browser where you entered the code, or start again from the notebook" in text
        # Nothing was settled, no tokens are held, and the device still waits.
        session = relay.sessions.by_device_code(code["device_code"])
        assert session.status == PENDING and session.tokens is None
        assert poll(relay.url, code["device_code"])["error"] == "authorization_pending"

        # A signs in (as its own account) in its own browser and finishes.
        finished = browser_a.get(sandbox.authorize(link, account=0), timeout=30)
        assert finished.status_code == 200 and "Connection successful" in finished.text
    tokens = poll(relay.url, code["device_code"])
    assert tokens["stripe_user_id"] == sandbox.accounts[0].id
    if not deny:  # B's Connect code was never exchanged by the relay: it is still unused at Connect
        unused = requests.post(f"{sandbox.connect_url}/oauth/token", timeout=10, data={
            "grant_type": "authorization_code", "code": parse_redirect(location)["code"],
            "client_secret": sandbox.secret_key})
        assert unused.status_code == 200, unused.text


def test_the_browser_cookie_is_httponly_lax_scoped_to_the_relay_and_never_in_the_page(sandbox):
    """On the sandbox the relay is mounted under /relay on loopback http: not Secure, Path /relay/."""
    with requests.Session() as browser:
        page = browser.get(f"{sandbox.relay_url}/device", timeout=10)
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"{BROWSER_COOKIE}=")
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=lax", "path=/relay/"} <= attributes
        assert "secure" not in attributes
        value = browser.cookies.get(BROWSER_COOKIE)
        assert value and value not in page.text  # the page carries a token derived from it, never the cookie
        # With no-referrer, browsers send `Origin: null` on the confirm form, which is refused as cross-site.
        assert page.headers["referrer-policy"] == "same-origin"


@pytest.mark.parametrize("public_url, path", [("https://relay.example/base", "/base/"),
                                              ("http://relay.example", "/")])
def test_the_cookie_is_secure_unless_the_relay_is_plain_http_on_loopback(sandbox, start_relay, public_url, path):
    relay = start_relay(public_url=public_url)
    page = requests.get(f"{relay.url}/device", timeout=10)
    attributes = {part.strip().lower() for part in page.headers["set-cookie"].split(";")[1:]}
    assert {"secure", "httponly", "samesite=lax", f"path={path}"} <= attributes
    if public_url.startswith("http:"):
        # Browsers drop a Secure cookie over plain http: the refusal says why, instead of failing mysteriously.
        code = new_code(relay.url)
        refused = requests.post(f"{relay.url}/device", data={"user_code": code["user_code"],
                                                             "csrf_token": csrf_of(page)}, timeout=10)
        assert refused.status_code == 403 and "must be served over https" in refused.text


def forged(relay_url: str, user_code: str, variant: str) -> requests.Response:
    """One confirm POST of `variant`, from a browser that has opened the relay's page (it holds a cookie)."""
    with requests.Session() as browser, requests.Session() as other:
        token = csrf_of(browser.get(f"{relay_url}/device", timeout=10))
        someone_elses = csrf_of(other.get(f"{relay_url}/device", timeout=10))
        form = {"user_code": user_code, "csrf_token": token}
        headers: dict[str, str] = {}
        if variant == "no-token":
            del form["csrf_token"]
        elif variant == "wrong-token":
            form["csrf_token"] = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
        elif variant == "another-browsers-token":
            form["csrf_token"] = someone_elses
        elif variant == "no-cookie":
            browser.cookies.clear()
        elif variant == "cross-site-origin":
            headers["Origin"] = "https://evil.example"
        elif variant == "null-origin":
            headers["Origin"] = "null"
        return browser.post(f"{relay_url}/device", data=form, headers=headers, timeout=10)


@pytest.mark.parametrize("variant", ["no-token", "wrong-token", "another-browsers-token", "no-cookie",
                                     "cross-site-origin", "null-origin"])
def test_a_forged_confirm_form_is_refused_with_a_403_page_and_binds_nothing(start_relay, variant):
    relay = start_relay()
    code = new_code(relay.url)
    answer = forged(relay.url, code["user_code"], variant)
    assert answer.status_code == 403, answer.text
    assert "This request was refused" in answer.text and "Sign in with Stripe" not in answer.text
    assert 'href="device"' in answer.text  # the way back: the code page, with a fresh token
    session = relay.sessions.by_device_code(code["device_code"])
    assert session.status == PENDING and session.browser_hash is None


def test_the_relay_s_own_origin_and_the_code_entry_form_are_accepted(start_relay):
    relay = start_relay()
    code = new_code(relay.url)
    with requests.Session() as browser:
        entry = browser.get(f"{relay.url}/device", timeout=10)  # the form without a code carries the token too
        accepted = browser.post(f"{relay.url}/device", headers={"Origin": relay.url}, timeout=10,
                                data={"user_code": code["user_code"], "csrf_token": csrf_of(entry)})
        cookie = browser.cookies.get(BROWSER_COOKIE)
    assert accepted.status_code == 200 and "Sign in with Stripe" in accepted.text
    # The session is bound to the browser by the cookie's hash only: the database alone cannot replay it.
    bound = relay.sessions.by_device_code(code["device_code"]).browser_hash
    assert bound == hashlib.sha256(cookie.encode()).hexdigest()
    stored = b"".join(path.read_bytes() for path in relay.db_path.parent.glob(f"{relay.db_path.name}*"))
    assert cookie.encode() not in stored


def test_a_database_from_before_browser_binding_is_migrated_and_its_unbound_sessions_cannot_be_finished(
        start_relay, tmp_path):
    """An upgraded relay opens its old database (no browser column, twice: the migration is idempotent); a
    session confirmed before the upgrade is bound to no browser, so its callback is refused, not settled."""
    db_path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(db_path)
    old.executescript("""create table sessions (device_hash text primary key, user_code text not null unique,
        state text not null unique, status text not null, scope text not null, created real not null,
        expires real not null, interval real not null, last_poll real, tokens text, error text);""")
    old.execute("insert into sessions values ('h', 'BCDFGHJK', 'old-state', 'pending', 'read_only', 0, 9e9, 5, "
                "null, null, null)")
    old.commit()
    old.close()
    start_relay(db_path=db_path).server.stop()
    relay = start_relay(db_path=db_path)
    with requests.Session() as browser:
        browser.get(f"{relay.url}/device", timeout=10)  # a browser with a cookie, but not the one bound
        refused = browser.get(f"{relay.url}/oauth/callback", params={"code": "ac_x", "state": "old-state"}, timeout=10)
    assert refused.status_code == 400 and "different browser" in refused.text
    session = relay.sessions.by_state("old-state")
    assert session.status == PENDING and session.browser_hash is None


# --- item 5: no secrets in logs ------------------------------------------------------------------------

class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter("%(name)s %(message)s").format(record))


def run_whole_flow(sandbox: Sandbox, relay_url: str, *, driven: bool = True
                   ) -> tuple[Connected, Waiting, str, str]:
    """A device flow from start to tokens; returns the state, the code shown, the Connect redirect and the cookie.

    `driven` polls with DeviceFlow's thread; otherwise the client polls once, after the approval
    (a relay advertising 5 s makes the driven flow wait that long before its first poll).
    """
    flow, client = DeviceFlow(relay_url), RelayClient(relay_url)
    waiting = flow.start() if driven else client.request_code()
    assert isinstance(waiting, Waiting), waiting
    with requests.Session() as browser:
        link = sign_in_link(confirm_code(browser, relay_url, waiting.user_code))
        location = sandbox.authorize(link)
        assert "Connection successful" in browser.get(location, timeout=30).text
    if driven:
        state = flow.wait(30)
    else:
        answer = client.poll(waiting.device_code)
        assert isinstance(answer, TokenIssued), answer
        state = Connected(StripeToken.from_response(answer.token))
    assert isinstance(state, Connected), state
    return state, waiting, location, browser.cookies.get(BROWSER_COOKIE) or ""


def secrets_of(sandbox: Sandbox, state: Connected, waiting: Waiting, location: str, cookie: str) -> dict[str, str]:
    redirect = parse_redirect(location)
    return {"access token": state.token.access_token, "refresh token": state.token.refresh_token or "",
            "platform secret key": sandbox.secret_key, "device code": waiting.device_code,
            "Connect code": redirect["code"], "state": redirect["state"], "browser cookie": cookie,
            "user code": waiting.user_code}


def test_a_whole_flow_with_every_logger_at_debug_and_the_access_log_on_logs_no_secret(sandbox, start_relay, caplog):
    relay = start_relay(access_log=True)
    access = Collect()
    logging.getLogger("uvicorn.access").addHandler(access)  # uvicorn's access log does not propagate to root
    caplog.set_level(logging.DEBUG)
    try:
        state, waiting, location, cookie = run_whole_flow(sandbox, relay.url)
    finally:
        logging.getLogger("uvicorn.access").removeHandler(access)
    lines = [logging.Formatter("%(name)s %(message)s").format(record) for record in caplog.records] + access.lines
    # The logs were really on, and still useful: the token exchange and the callback's request line are there.
    assert any("requests_oauthlib" in line and "Request to fetch token completed" in line for line in lines)
    assert any("GET /oauth/callback?" in line for line in access.lines), access.lines
    assert any("urllib3" in line and "/oauth/callback?" in line for line in lines)
    for name, secret in secrets_of(sandbox, state, waiting, location, cookie).items():
        assert secret, name
        leaks = [line for line in lines if secret in line or secret.replace("-", "") in line]
        assert not leaks, f"the {name} is in the logs: {leaks[:2]}"


def test_the_relay_command_s_access_log_shows_requests_without_codes_or_state(sandbox, tmp_path):
    port = closed_port()
    relay_url = f"http://127.0.0.1:{port}"
    sandbox.register_redirect_uri(f"{relay_url}/oauth/callback")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MBI_RELAY_")}
    env["MBI_RELAY_SECRET_KEY"] = sandbox.secret_key
    command = [sys.executable, "-m", "mbi_widgets.cli", "relay", "--client-id", sandbox.client_id,
               "--connect-url", sandbox.connect_url, "--api-url", sandbox.api_url,
               "--db", str(tmp_path / "relay.sqlite3"), "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{relay_url}/device", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "the relay process did not start"
                time.sleep(0.05)
        state, waiting, location, cookie = run_whole_flow(sandbox, relay_url, driven=False)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert "GET /oauth/callback?code=[redacted]" in output and "state=[redacted]" in output, output
    assert "POST /device/token" in output
    for name, secret in secrets_of(sandbox, state, waiting, location, cookie).items():
        assert secret not in output, f"the {name} is in the relay's log"


def test_a_refused_connect_code_is_not_quoted_whole_on_the_page_or_to_the_notebook(sandbox, start_relay):
    """Connect's refusal quotes the code ("Authorization code does not exist: ac_..."); the relay passes the
    reason on to the page and the notebook, but not the code."""
    relay = start_relay()
    code = new_code(relay.url)
    connect_code = "ac_" + "Q7wX" * 8
    with requests.Session() as browser:
        link = sign_in_link(confirm_code(browser, relay.url, code["user_code"]))
        state = dict(parse_redirect(link))["state"]
        failed = browser.get(f"{relay.url}/oauth/callback", params={"code": connect_code, "state": state}, timeout=30)
    assert failed.status_code == 502 and "does not exist" in failed.text
    told = poll(relay.url, code["device_code"])
    assert told["error"] == "access_denied" and "does not exist" in told["error_description"]
    assert connect_code not in failed.text and connect_code not in told["error_description"]


# --- item 6: a relay URL the transport would refuse is refused up front; a dying poller ends Failed ----------

@pytest.mark.parametrize("host", ["127.1", "relay.example"])
def test_a_plain_http_relay_url_off_loopback_fails_at_start_and_sends_nothing(start_relay, host):
    relay = start_relay()
    url = f"http://{host}:{urlsplit(relay.url).port}"  # 127.1 reaches the relay above: nothing may get there
    # The up-front check and the transport agree.
    assert insecure_transport_reason(url) is not None
    with pytest.raises(MbiError) as refused, transport_allowed(url):
        pass
    assert refused.value.code == "insecure_transport"

    flow = DeviceFlow(url)
    state = flow.start()
    assert isinstance(state, Failed), state
    assert state.code == "insecure_transport"
    assert "https" in state.message and "127.0.0.1" in state.message
    assert flow.wait(1) == state
    assert relay.sessions._one("select * from sessions", ()) is None  # noqa: SLF001 - no code was requested

    # Loopback written out still starts: the check refuses only what the transport would.
    spelled_out = DeviceFlow(f"http://localhost:{urlsplit(relay.url).port}")
    try:
        assert isinstance(spelled_out.start(), Waiting)
    finally:
        spelled_out.cancel()


class PollRaises(RelayClient):
    """A real client whose polls raise `error` (a bug, or a transport refusing mid-flow)."""

    def __init__(self, relay_url: str, error: Exception) -> None:
        super().__init__(relay_url)
        self.error = error

    def request_code(self, **options) -> Waiting:
        return replace(super().request_code(**options), interval=0.01)  # poll at once

    def poll(self, device_code: str):
        raise self.error


@pytest.mark.parametrize("error, code", [
    (RuntimeError("boom device_code=SECRETDEVICECODE"), "internal_error"),
    (MbiError("refusing to send OAuth secrets", code="insecure_transport"), "insecure_transport"),
])
def test_an_exception_in_the_polling_thread_ends_the_flow_failed_with_its_message(start_relay, error, code):
    relay = start_relay()
    flow = DeviceFlow(relay.url, client=PollRaises(relay.url, error))
    seen: list = []
    flow.observe(seen.append)
    assert isinstance(flow.start(), Waiting)
    state = flow.wait(5)
    assert isinstance(state, Failed), state
    assert state.code == code
    assert str(error).split()[0] in state.message and "Start again" in state.message
    assert "SECRETDEVICECODE" not in state.message
    assert [type(s) for s in seen] == [Waiting, Failed]


# --- item 7: deauthorize while Stripe is unreachable answers JSON 502 ---------------------------------------

@pytest.fixture(scope="module")
def html_500():
    """A server that answers every request with an HTML 500 page, as a failing proxy does."""
    async def fail(request):
        return HTMLResponse("<html><body><h1>500 Internal Server Error</h1></body></html>", status_code=500)

    app = Starlette(routes=[Route("/{path:path}", fail, methods=["GET", "POST"])])
    server = BackgroundServer(app, name="html-500").start()
    yield server.url
    server.stop()


@pytest.mark.parametrize("api, connect", [("sandbox", "closed"), ("sandbox", "html"), ("closed", "sandbox"),
                                          ("html", "sandbox")])
def test_deauthorize_with_stripe_unreachable_answers_json_502_stripe_unreachable(sandbox, start_relay, html_500,
                                                                                  api, connect):
    where = {"sandbox": sandbox.api_url, "closed": f"http://127.0.0.1:{closed_port()}", "html": html_500}
    relay = start_relay(api_url=where[api], connect_url=where[connect])
    account = sandbox.accounts[0].id
    answer = requests.post(f"{relay.url}/oauth/deauthorize", data={"stripe_user_id": account}, timeout=30,
                           headers={"Authorization": f"Bearer {sandbox.restricted_key}"})
    assert answer.status_code == 502, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["error"] == "stripe_unreachable"
    assert "Try again" in body["error_description"] and sandbox.secret_key not in answer.text
    with pytest.raises(AuthError) as failed:
        RelayClient(relay.url).deauthorize(access_token=sandbox.restricted_key, stripe_user_id=account)
    assert failed.value.code == "stripe_unreachable" and "nothing was deleted" in str(failed.value)
    # Nothing was revoked: the key still reads the account.
    assert requests.get(f"{sandbox.api_url}/v1/account", auth=(sandbox.restricted_key, ""), timeout=10).ok
