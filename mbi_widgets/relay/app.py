"""The relay as an ASGI app: RFC 8628 towards notebooks, Stripe Connect OAuth towards Stripe.

The relay holds the platform's secret key; notebooks never see it. A notebook asks for a device
code, the admin confirms the user code in a browser, signs in with Stripe, and the relay
exchanges Connect's code server-side and hands the tokens to the polling notebook once.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import ipaddress
import logging
import math
import re
import secrets
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import requests
from oauthlib.oauth2 import OAuth2Error
from requests_oauthlib import OAuth2Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mbi_widgets.auth import CLIENT_ID, DEVICE_GRANT, json_object
from mbi_widgets.logfilters import install_log_redaction
from mbi_widgets.oauth import is_loopback, transport_allowed
from mbi_widgets.redaction import redact_text
from mbi_widgets.relay.atrest import TokenCipher, TokensUnreadable
from mbi_widgets.relay.sessions import (
    APPROVED,
    CANCELLED,
    DENIED,
    FAILED,
    GUESS,
    ISSUE,
    PENDING,
    REDEEMED,
    Session,
    SessionStore,
    format_user_code,
)
from mbi_widgets.serving import client_went_away

log = logging.getLogger("mbi_widgets.relay")
install_log_redaction()  # uvicorn's access log, requests-oauthlib and this module's own log

#: The cookie naming the browser that enters a code; the relay keeps only its SHA-256. It keys the
#: confirm form's CSRF token, and the Connect callback must come back with it (RFC 9700 sec. 4.7).
BROWSER_COOKIE = "mbi_relay_browser"
BROWSER_COOKIE_MAX_AGE = 24 * 3600
_BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)

#: Wrong user codes allowed per client address in `GUESS_WINDOW_S` before the relay says "wait".
MAX_GUESSES = 10
GUESS_WINDOW_S = 600
#: The window of the global cap on wrong guesses and of the per-address cap on issued codes.
MINUTE = 60.0


@dataclass
class RelayConfig:
    """Everything the relay needs; the secret key never leaves it."""

    client_id: str
    secret_key: str = field(repr=False)
    public_url: str
    connect_url: str = "https://connect.stripe.com"
    api_url: str = "https://api.stripe.com"
    db_path: str = "mbi-relay/sessions.sqlite3"
    session_ttl: float = 600.0
    interval: float = 5.0
    #: Fernet key for tokens at rest (MBI_RELAY_TOKEN_KEY); None: a 0600 key file beside the database.
    token_key: str | None = field(default=None, repr=False)
    #: Wrong user codes per address in `guess_window` seconds before its wrong guesses are told to wait.
    guess_limit: int = MAX_GUESSES
    guess_window: float = GUESS_WINDOW_S
    #: Wrong user codes per minute from everyone before addresses that guessed wrong are not heard at all.
    global_guess_limit: int = 60
    #: Device codes per address per minute, and pending codes at any one time.
    issue_limit: int = 30
    max_pending: int = 1000
    #: Seconds between rounds that erase expired sessions and deauthorize grants nobody collected.
    purge_interval: float = 30.0
    #: Timeout of the relay's own calls to Stripe (deauthorizing spare grants).
    stripe_timeout: float = 15.0

    @property
    def callback_url(self) -> str:
        return f"{self.public_url.rstrip('/')}/oauth/callback"


def _oauth_error(error: str, description: str, status: int = 400, *, retry_after: float | None = None) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(math.ceil(retry_after))
    return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=headers)


#: Verdicts on a typed user code (see `Relay._guess_verdict`).
_OPEN, _WRONG_WAITS, _CLOSED = "open", "wrong-waits", "closed"


def _client_key(request: Request) -> str:
    """Whom the throttles count: the peer address (a proxy's forwarded address only when uvicorn was told to
    trust it, `--forwarded-allow-ips`); IPv6 by /64, which one host typically holds whole."""
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _too_many_page(reason: str, next_step: str) -> HTMLResponse:
    response = page("Too many attempts", f"<h1>Too many attempts</h1><p class=\"error\">{html.escape(reason)}</p>"
                    f"<p>{html.escape(next_step)}</p>", 429)
    response.headers["Retry-After"] = str(int(MINUTE))
    return response


def _cancelled_page() -> HTMLResponse:
    return page("Sign-in cancelled", "<h1>This sign-in was cancelled in the notebook</h1><p>Nothing was connected. "
                "To connect a Stripe account, start again from the notebook and use the new code it shows.</p>", 410)


def _stripe_unreachable(reason: str) -> JSONResponse:
    return _oauth_error("stripe_unreachable", f"Stripe could not be reached to disconnect the account ({reason}); "
                        "nothing was changed. Try again in a minute.", 502)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · mbi-widgets</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: -apple-system, "Segoe UI", Roboto, Helvetica, sans-serif; background: #f4f6f8; color: #1f2a37;
        margin: 0; }}
 header {{ background: #1f2a37; color: #fff; padding: 14px 32px; font-weight: 600; letter-spacing: .2px; }}
 main {{ max-width: 520px; margin: 40px auto; background: #fff; border: 1px solid #dde3ea; border-radius: 6px;
        padding: 32px 40px; }}
 h1 {{ font-size: 22px; margin: 0 0 12px; }} p, li {{ line-height: 1.55; color: #374151; }}
 .code {{ font: 600 34px/1.2 ui-monospace, Menlo, Consolas, monospace; letter-spacing: 4px; margin: 18px 0;
        text-align: center; }}
 input[type=text] {{ font: 600 22px ui-monospace, Menlo, monospace; letter-spacing: 3px; text-transform: uppercase;
        width: 100%; box-sizing: border-box; padding: 10px; border: 1px solid #c7d0da; border-radius: 4px; }}
 .button {{ display: inline-block; margin-top: 18px; background: #635bff; color: #fff; border: 0; border-radius: 4px;
        padding: 11px 20px; font-size: 15px; text-decoration: none; cursor: pointer; }}
 .error {{ color: #b42318; font-weight: 600; }} .ok {{ color: #067647; }}
</style></head><body><header>mbi-widgets · Connections</header><main>{body}</main></body></html>"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status,
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 # Not no-referrer: with it browsers send `Origin: null` on the confirm form,
                                 # which the CSRF check must refuse. same-origin sends nothing off the relay.
                                 "Referrer-Policy": "same-origin",
                                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                            "form-action 'self'"})


def _csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf_token" value="{html.escape(csrf)}">'


def _code_form(csrf: str, error: str | None = None) -> str:
    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<h1>Connect a Stripe account</h1>
<p>Enter the code shown in your notebook.</p>{error_html}
<form method="post" action="device">{_csrf_field(csrf)}<input type="text" name="user_code" maxlength="12"
 autocomplete="off" autofocus required placeholder="XXXX-XXXX" aria-label="Code"><button class="button"
 type="submit">Continue</button></form>"""


def _confirm_form(csrf: str, shown_code: str) -> str:
    shown = html.escape(shown_code)
    return f"""<h1>Confirm the code</h1>
<p>Check that this code matches the one shown in your notebook:</p><div class="code">{shown}</div>
<form method="post" action="device">{_csrf_field(csrf)}<input type="hidden" name="user_code" value="{shown}">
<button class="button" type="submit">The codes match: continue</button></form>"""


def _refused_page(reason: str, hint: str = "") -> HTMLResponse:
    """403 for a confirm form that did not come from this relay's own page in this browser."""
    return page("Request refused", f"""<h1>This request was refused</h1><p class="error">{html.escape(reason)}</p>
<p>For your security the code was not accepted. {html.escape(hint)}<a href="device">Open the code page again</a>
and enter the code shown in your notebook.</p>""", 403)


def _other_browser_page() -> HTMLResponse:
    return page("Different browser", """<h1>Open this link in the same browser</h1>
<p class="error">This sign-in link was opened in a different browser from the one that entered the code.</p>
<p>For your security the account was not connected: only the browser where the code was entered can finish
connecting it. Open the link in the same browser where you entered the code, or start again from the
notebook.</p>""", 400)


def _origin(url: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (default ports left out)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" if port is None or port == default else f"{scheme}://{host}:{port}"


def _browser_of(request: Request) -> str | None:
    """The browser's id from its cookie, when it has a well-formed one."""
    value = request.cookies.get(BROWSER_COOKIE, "")
    return value if _BROWSER_ID.fullmatch(value) else None


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Relay:
    """State and handlers of one relay instance."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.sessions = SessionStore(config.db_path, cipher=TokenCipher.for_database(config.db_path,
                                                                                     config.token_key))
        self._purger: asyncio.Task | None = None

    # --- device endpoints (RFC 8628) -------------------------------------------------------

    async def device_code(self, request: Request) -> Response:
        form = await request.form()
        if form.get("client_id") != CLIENT_ID:
            return _oauth_error("invalid_client", f"Unknown client; notebooks identify as client_id={CLIENT_ID}.", 401)
        scope = str(form.get("scope") or "read_only")
        if scope != "read_only":
            return _oauth_error("invalid_scope", "This relay grants read_only access only.")
        refusal = self._issue_refusal(_client_key(request))
        if refusal is not None:
            return refusal
        device_code, session = self.sessions.create(scope=scope, ttl=self.config.session_ttl,
                                                    interval=self.config.interval)
        base = self.config.public_url.rstrip("/")
        shown = format_user_code(session.user_code)
        return JSONResponse({
            "device_code": device_code, "user_code": shown, "verification_uri": f"{base}/device",
            "verification_uri_complete": f"{base}/device?user_code={shown}",
            # Round the interval up: a client that waits what is advertised must never be told slow_down.
            "expires_in": int(self.config.session_ttl), "interval": math.ceil(self.config.interval)},
            headers={"Cache-Control": "no-store"})

    async def device_token(self, request: Request) -> Response:
        form = await request.form()
        if form.get("grant_type") != DEVICE_GRANT:
            return _oauth_error("unsupported_grant_type", f"Use grant_type={DEVICE_GRANT}.")
        if form.get("client_id") != CLIENT_ID:
            return _oauth_error("invalid_client", f"Unknown client; notebooks identify as client_id={CLIENT_ID}.", 401)
        session = self.sessions.by_device_code(str(form.get("device_code", "")))
        if session is None or session.status == REDEEMED:
            return _oauth_error("invalid_grant", "Unknown or already redeemed device code.")
        if session.status == CANCELLED:
            return _oauth_error("invalid_grant", "This device code was cancelled; start again.")
        if session.expired:
            return _oauth_error("expired_token", "The device code expired; start again.")
        if session.last_poll is not None and time.time() - session.last_poll < session.interval:
            slower = session.interval + 5
            self.sessions.record_poll(session, interval=slower)
            return _oauth_error("slow_down", f"Polling too fast; wait {int(slower)} seconds between polls.")
        self.sessions.record_poll(session)
        if session.status == PENDING:
            return _oauth_error("authorization_pending", "Waiting for the code to be approved in a browser.")
        if session.status in (DENIED, FAILED):
            return _oauth_error("access_denied", session.error or "Access was denied.")
        try:
            tokens = self.sessions.redeem(session) if session.status == APPROVED else None
        except TokensUnreadable as exc:
            log.warning("stored tokens could not be decrypted (the token key changed); the grant is revoked")
            if session.stripe_user_id:
                await run_in_threadpool(self.revoke_grant, session.stripe_user_id)
            return _oauth_error("invalid_grant", str(exc))
        if tokens is None:
            return _oauth_error("invalid_grant", "Unknown or already redeemed device code.")
        return JSONResponse(tokens, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def device_cancel(self, request: Request) -> Response:
        """The notebook gave up on its code (proved by the device code, which only it holds).

        The code's pages then say the sign-in was cancelled, and a grant made for it (now, or by a
        Stripe sign-in still under way) is deauthorized at Stripe.
        """
        form = await request.form()
        if form.get("client_id") != CLIENT_ID:
            return _oauth_error("invalid_client", f"Unknown client; notebooks identify as client_id={CLIENT_ID}.", 401)
        session = self.sessions.by_device_code(str(form.get("device_code", "")))
        if session is None:
            return _oauth_error("invalid_grant", "Unknown device code.")
        account = self.sessions.cancel(session)
        if account is not None:
            await run_in_threadpool(self._revoke_queued, account)
        return JSONResponse({"status": CANCELLED}, headers={"Cache-Control": "no-store"})

    def _cancelled(self, user_code: str) -> bool:
        session = self.sessions.by_user_code(user_code)
        return session is not None and session.status == CANCELLED

    # --- grants nobody will use: deauthorized at Stripe -------------------------------------------------

    def revoke_grant(self, account: str) -> bool:
        """Deauthorizes `account`'s grant at Stripe (queued first, so a failure is retried by the purge).

        False when nothing was revoked: the account's connection was handed out by this relay (or
        awaits collection), so the spare grant is that same connection and its tokens are just
        dropped; or Stripe could not be reached (retried later).
        """
        if not self.sessions.queue_revocation(account):
            log.info("a spare grant for %s was dropped: that account's connection was handed to a notebook", account)
            return False
        return self._revoke_queued(account)

    def _revoke_queued(self, account: str) -> bool:
        failure = self._deauthorize_grant(account)
        if failure is None:
            self.sessions.revocation_done(account)
            log.info("deauthorized an unused grant for %s at Stripe", account)
            return True
        self.sessions.revocation_failed(account, failure)
        log.warning("could not deauthorize an unused grant for %s at Stripe (%s); retrying every %g s", account,
                    failure, self.config.purge_interval)
        return False

    def _deauthorize_grant(self, account: str) -> str | None:
        """None when Stripe no longer connects `account` to the platform; else why not (no secrets in it)."""
        try:
            answer = requests.post(f"{self.config.connect_url.rstrip('/')}/oauth/deauthorize",
                                   data={"client_id": self.config.client_id, "stripe_user_id": account},
                                   auth=(self.config.secret_key, ""), timeout=self.config.stripe_timeout)
        except requests.RequestException as exc:
            return f"Stripe unreachable: {type(exc).__name__}"
        if answer.status_code == 200:
            return None
        body = json_object(answer)
        if "not connected" in str(body.get("error_description", "")):
            return None  # already disconnected (by the account, or an earlier round)
        return f"HTTP {answer.status_code} {body.get('error') or ''}".strip()

    def _revoke_code(self, code: str) -> None:
        """Exchanges a Connect code only to learn its account, then deauthorizes that grant; no token is kept."""
        try:
            tokens = self._exchange(code)
        except (OAuth2Error, requests.RequestException, ValueError) as exc:
            reason = getattr(exc, "description", None) or type(exc).__name__
            log.warning("the Connect code of a cancelled sign-in could not be exchanged (%s); no token was issued",
                        reason)
            return
        if tokens.get("stripe_user_id"):
            self.revoke_grant(tokens["stripe_user_id"])

    # --- the purge timer ----------------------------------------------------------------------------------

    def purge_once(self) -> None:
        """One round: expired sessions give up their tokens (their grants are queued) and go; queued grants are
        deauthorized at Stripe (one that fails stays queued for the next round)."""
        self.sessions.purge_expired(keep_attempts=max(self.config.guess_window, MINUTE))
        for account in self.sessions.due_revocations():
            self._revoke_queued(account)

    async def _purge_forever(self) -> None:
        while True:
            try:
                # In a thread: deauthorizing calls Stripe, which for the sandbox is served by this very loop.
                await asyncio.to_thread(self.purge_once)
            except Exception as exc:  # one bad round must not stop the timer
                log.warning("a purge round of the relay failed (%s); next round in %g s", type(exc).__name__,
                            self.config.purge_interval)
            await asyncio.sleep(self.config.purge_interval)

    def ensure_purging(self) -> None:
        """Starts the purge timer on the running event loop unless it runs there already."""
        loop = asyncio.get_running_loop()
        task = self._purger
        if task is None or task.done() or task.get_loop() is not loop:
            self._purger = loop.create_task(self._purge_forever(), name="mbi-relay-purge")

    async def stop_purging(self) -> None:
        task, self._purger = self._purger, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    # --- browser pages ------------------------------------------------------------------------

    async def device_page(self, request: Request) -> Response:
        browser = _browser_of(request) or secrets.token_urlsafe(32)
        code = request.query_params.get("user_code")
        if not code:
            return self._remember_browser(page("Enter your code", _code_form(self._csrf_token(browser))), browser)
        if self._cancelled(code):  # only says so of a cancelled code: no oracle for live ones
            return _cancelled_page()
        return self._remember_browser(page("Confirm your code", _confirm_form(self._csrf_token(browser),
                                                                               code.upper())), browser)

    async def device_submit(self, request: Request) -> Response:
        client = _client_key(request)
        verdict = self._guess_verdict(client)
        if verdict == _CLOSED:
            return _too_many_page("Too many wrong codes were entered on this relay in the last minute.",
                                  "Wait a minute, then enter the code from your notebook again.")
        form = await request.form()
        refusal = self._refuse_forgery(request, str(form.get("csrf_token", "")))
        if refusal is not None:
            return refusal
        browser = _browser_of(request) or ""  # present: the CSRF token is checked against it
        session = self.sessions.by_user_code(str(form.get("user_code", "")))
        if session is not None and session.status == CANCELLED:
            return _cancelled_page()
        if session is None or session.status != PENDING or session.expired:
            self.sessions.record_attempt(GUESS, client)
            if verdict == _WRONG_WAITS:
                minutes = max(1, math.ceil(self.config.guess_window / 60))
                return _too_many_page("Too many wrong codes were entered from this address.",
                                      "Check the code shown in your notebook and enter it again: the right code is "
                                      f"still accepted, wrong ones are refused for up to {minutes} minutes.")
            return page("Enter your code", _code_form(self._csrf_token(browser), "That code is not valid or has "
                        "expired. Check the code in your notebook, or start again there to get a new one."), 400)
        # Only this browser may finish the sign-in: a link handed to someone else is refused at the callback.
        self.sessions.bind_browser(session, _digest(browser))
        # Off the event loop: building the URL takes the process-wide OAuth transport lock, which an
        # in-process client (the sandbox in a notebook) may hold while it waits for this very server.
        return self._remember_browser(page("Allow access", await run_in_threadpool(self._access_request, session)),
                                      browser)

    # --- binding the sign-in to one browser (CSRF token, cookie) ---------------------------------------

    def _csrf_token(self, browser: str) -> str:
        # Keyed by a derivation of the platform key: stable across restarts and replicas, useless elsewhere.
        key = hashlib.sha256(b"mbi-widgets relay csrf\0" + self.config.secret_key.encode()).digest()
        return hmac.new(key, browser.encode(), hashlib.sha256).hexdigest()

    def _refuse_forgery(self, request: Request, csrf: str) -> Response | None:
        """A 403 page unless the confirm form came from this relay's page in this browser (None: accepted)."""
        origin, own = request.headers.get("origin"), _origin(self.config.public_url)
        if origin is not None and origin != own:
            # Also what a wrong public URL looks like (a proxy serving another host name): say both.
            log.warning("confirm form refused: it came from origin %.100r, not from this relay's %s", origin, own)
            return _refused_page("The form was sent from another site.")
        browser = _browser_of(request)
        if browser is None:
            hint = ("This relay's address is plain http, where browsers do not keep its secure cookie: it must be "
                    "served over https. ") if self._cookie_secure and self._served_over_http else (
                    "Your browser did not send this site's cookie: allow cookies for it. ")
            return _refused_page("The form did not come from this page in this browser.", hint)
        if not hmac.compare_digest(csrf, self._csrf_token(browser)):
            return _refused_page("The form did not come from this page in this browser, or it is out of date.")
        return None

    @property
    def _cookie_secure(self) -> bool:
        return not (self._served_over_http and is_loopback(self.config.public_url))

    @property
    def _served_over_http(self) -> bool:
        return urlsplit(self.config.public_url).scheme.lower() == "http"

    def _remember_browser(self, response: Response, browser: str) -> Response:
        path = urlsplit(self.config.public_url).path.rstrip("/") + "/"  # the relay may be mounted under /relay
        response.set_cookie(BROWSER_COOKIE, browser, max_age=BROWSER_COOKIE_MAX_AGE, path=path,
                            secure=self._cookie_secure, httponly=True, samesite="lax")
        return response

    def _same_browser(self, request: Request, session: Session) -> bool:
        """Whether the callback comes from the browser that confirmed the session's code."""
        browser = _browser_of(request)
        return (browser is not None and session.browser_hash is not None
                and hmac.compare_digest(_digest(browser), session.browser_hash))

    # --- throttling (guessed user codes, issued device codes) --------------------------------------------

    def _guess_verdict(self, client: str) -> str:
        """How to treat a code typed from `client`, from the persisted counters of wrong guesses.

        _OPEN: as usual. _WRONG_WAITS: the address guessed wrong too often, so a wrong code is told to
        wait, but a right one goes through (the address may be a NAT shared with the attacker).
        _CLOSED: everyone together guessed wrong too often in the last minute, so an address that
        guessed wrong lately is not even looked up: what bounds a brute force over many codes, while
        a user typing a right code first time is still served.
        """
        mine = self.sessions.count_attempts(GUESS, within=self.config.guess_window, client=client)
        if mine and self.sessions.count_attempts(GUESS, within=MINUTE) >= self.config.global_guess_limit:
            return _CLOSED
        return _WRONG_WAITS if mine >= self.config.guess_limit else _OPEN

    def _issue_refusal(self, client: str) -> Response | None:
        """A 429 when `client` asked for too many device codes this minute or too many codes are pending."""
        if self.sessions.count_attempts(ISSUE, within=MINUTE, client=client) >= self.config.issue_limit:
            return _oauth_error("slow_down", "Too many device codes were requested from this address; wait a "
                                "minute, then start again.", 429, retry_after=MINUTE)
        if self.sessions.live_pending() >= self.config.max_pending:
            return _oauth_error("temporarily_unavailable", "Too many sign-ins are waiting for a code to be "
                                "entered; try again in a minute.", 429, retry_after=MINUTE)
        self.sessions.record_attempt(ISSUE, client)
        return None

    def _access_request(self, session: Session) -> str:
        oauth = OAuth2Session(self.config.client_id, redirect_uri=self.config.callback_url, scope=["read_only"],
                              state=session.state)
        authorize_url = f"{self.config.connect_url.rstrip('/')}/oauth/authorize"
        with transport_allowed(authorize_url):
            url, _ = oauth.authorization_url(authorize_url, stripe_landing="login")
        return f"""<h1>Allow access to your Stripe data</h1>
<p>A notebook using <strong>mbi-widgets</strong> asks for <strong>read-only access</strong> to your Stripe
account's data: customers, charges, coupons, invoices, plans, subscriptions and events.</p>
<ul><li>It cannot create charges, refunds or payouts, or change anything.</li>
<li>You can disconnect it at any time (Delete in the notebook, or in Stripe's dashboard).</li></ul>
<p>Code <strong>{html.escape(format_user_code(session.user_code))}</strong></p>
<a class="button" href="{html.escape(url)}">Sign in with Stripe to Continue</a>"""

    async def callback(self, request: Request) -> Response:
        q = request.query_params
        session = self.sessions.by_state(q.get("state", "")) if q.get("state") else None
        if session is None:
            log.warning("oauth callback with a missing or unknown state")
            return page("Invalid link", "<h1>This link is not valid</h1><p>It does not belong to a sign-in started "
                        "here (it may be forged or expired). Start again from your notebook.</p>", 400)
        if not self._same_browser(request, session):
            # Not settled, and the Connect code is not exchanged: the browser that entered the code can still finish.
            log.warning("oauth callback refused: opened in a different browser from the one that entered the code")
            return _other_browser_page()
        if session.status == CANCELLED:
            if q.get("code"):  # Stripe made a grant the notebook no longer wants: take it back at once
                await run_in_threadpool(self._revoke_code, q["code"])
            return _cancelled_page()
        if session.status != PENDING or session.expired:
            return page("Link already used", "<h1>This link was already used</h1><p>Return to your notebook; start "
                        "again there if it is not connected.</p>", 400)
        if q.get("error"):
            self.sessions.settle(session, status=DENIED, error=q.get("error_description") or "Access was denied.")
            return page("Access denied", "<h1>Access was denied</h1><p>The notebook was told. Return to it and start "
                        "again if that was a mistake.</p>")
        try:
            tokens = await run_in_threadpool(self._exchange, q.get("code", ""))
        except (OAuth2Error, requests.RequestException, ValueError) as exc:
            # Stripe's descriptions quote the code ("Authorization code does not exist: ac_..."): not shown whole.
            reason = redact_text(str(getattr(exc, "description", None) or type(exc).__name__))
            log.warning("connect code exchange failed: %s", reason)
            self.sessions.settle(session, status=FAILED, error=f"Stripe refused the authorization: {reason}")
            return page("Connection failed", "<h1>The connection failed</h1><p class=\"error\">Stripe refused the "
                        f"authorization ({html.escape(str(reason))}).</p><p>Return to your notebook and start again.</p>",
                        502)
        if not self.sessions.settle(session, status=APPROVED, tokens=tokens):
            # Approved twice at once, or cancelled during the exchange: these tokens go to nobody.
            if tokens.get("stripe_user_id"):
                await run_in_threadpool(self.revoke_grant, tokens["stripe_user_id"])
            current = self.sessions.by_state(session.state)
            if current is not None and current.status == CANCELLED:
                return _cancelled_page()
            return page("Link already used", "<h1>This link was already used</h1>", 400)
        return page("Connection successful", "<h1 class=\"ok\">Connection successful!</h1><p>You can close this "
                    "tab and return to your notebook: it connects by itself.</p>")

    def _exchange(self, code: str) -> dict[str, Any]:
        oauth = OAuth2Session(self.config.client_id, redirect_uri=self.config.callback_url)
        token_url = f"{self.config.connect_url.rstrip('/')}/oauth/token"
        with transport_allowed(token_url):
            token = oauth.fetch_token(token_url, code=code, client_secret=self.config.secret_key,
                                      include_client_id=True, timeout=15)
        keep = ("access_token", "refresh_token", "token_type", "stripe_user_id", "stripe_publishable_key",
                "scope", "livemode")
        answer = {name: token.get(name) for name in keep}
        if isinstance(answer["scope"], (list, tuple)):  # requests-oauthlib splits scopes into a list
            answer["scope"] = " ".join(answer["scope"])
        return answer

    # --- deauthorization on behalf of a notebook ----------------------------------------------

    async def deauthorize(self, request: Request) -> Response:
        form = await request.form()
        account_id = str(form.get("stripe_user_id", ""))
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or not account_id:
            return _oauth_error("invalid_request", "Send the connection's access token as a Bearer token and "
                                "stripe_user_id.", 400)
        return await run_in_threadpool(self._deauthorize, token.strip(), account_id)

    def _deauthorize(self, token: str, account_id: str) -> Response:
        try:
            # Only the holder of a working token for the account may disconnect it.
            check = requests.get(f"{self.config.api_url.rstrip('/')}/v1/account", auth=(token, ""),
                                 timeout=self.config.stripe_timeout)
            if check.status_code >= 500 or check.status_code == 429 or (check.status_code == 200
                                                                         and "id" not in json_object(check)):
                return _stripe_unreachable(f"Stripe's API answered {check.status_code} without an account")
            if check.status_code != 200 or json_object(check).get("id") != account_id:
                return _oauth_error("invalid_grant", "The access token does not belong to that account (or was "
                                    "already revoked).", 403)
            answer = requests.post(f"{self.config.connect_url.rstrip('/')}/oauth/deauthorize",
                                   data={"client_id": self.config.client_id, "stripe_user_id": account_id},
                                   auth=(self.config.secret_key, ""), timeout=self.config.stripe_timeout)
        except requests.RequestException as exc:
            return _stripe_unreachable(type(exc).__name__)
        if answer.status_code == 200:
            return JSONResponse({"stripe_user_id": account_id})
        body = json_object(answer)
        if not isinstance(body.get("error"), str):  # an HTML error page, a proxy's answer: not Connect speaking
            return _stripe_unreachable(f"Connect answered {answer.status_code} without an OAuth error")
        return _oauth_error(body["error"], str(body.get("error_description") or f"Stripe answered "
                                                 f"{answer.status_code}."), 502)


class _PurgesWhileServing:
    """Starts the relay's purge timer with the first request as well as at startup: a relay mounted in
    another app (the sandbox's) never sees lifespan events, which Starlette does not pass to a Mount."""

    def __init__(self, app: ASGIApp, relay: Relay) -> None:
        self.app, self.relay = app, relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.relay.ensure_purging()
        await self.app(scope, receive, send)


def create_app(config: RelayConfig) -> Starlette:
    relay = Relay(config)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        relay.ensure_purging()  # at once: a restarted relay may hold tokens nobody collected
        try:
            yield
        finally:
            await relay.stop_purging()

    app = Starlette(middleware=[Middleware(_PurgesWhileServing, relay=relay)], lifespan=lifespan, routes=[
        Route("/device/code", relay.device_code, methods=["POST"]),
        Route("/device/token", relay.device_token, methods=["POST"]),
        Route("/device/cancel", relay.device_cancel, methods=["POST"]),
        Route("/device", relay.device_page, methods=["GET"]),
        Route("/device", relay.device_submit, methods=["POST"]),
        Route("/oauth/callback", relay.callback, methods=["GET"]),
        Route("/oauth/deauthorize", relay.deauthorize, methods=["POST"]),
    ])
    app.state.relay = relay
    app.add_exception_handler(ClientDisconnect, client_went_away)  # a client hanging up mid-body is no error
    return app
