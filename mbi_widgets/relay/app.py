"""The relay as an ASGI app: RFC 8628 towards notebooks, Stripe Connect OAuth towards Stripe.

The relay holds the platform's secret key; notebooks never see it. A notebook asks for a device
code, the admin confirms the user code in a browser, signs in with Stripe, and the relay
exchanges Connect's code server-side and hands the tokens to the polling notebook once.
"""
from __future__ import annotations

import html
import logging
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import requests
from oauthlib.oauth2 import OAuth2Error
from requests_oauthlib import OAuth2Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mbi_widgets.auth import CLIENT_ID, DEVICE_GRANT
from mbi_widgets.oauth import transport_allowed
from mbi_widgets.relay.sessions import (
    APPROVED,
    DENIED,
    FAILED,
    PENDING,
    REDEEMED,
    Session,
    SessionStore,
    format_user_code,
)

log = logging.getLogger("mbi_widgets.relay")

#: Wrong user codes allowed per client address in `GUESS_WINDOW_S` before the relay says "wait".
MAX_GUESSES = 10
GUESS_WINDOW_S = 600


@dataclass
class RelayConfig:
    """Everything the relay needs; the secret key never leaves it."""

    client_id: str
    secret_key: str = field(repr=False)
    public_url: str
    connect_url: str = "https://connect.stripe.com"
    api_url: str = "https://api.stripe.com"
    db_path: str = "mbi-relay.sqlite3"
    session_ttl: float = 600.0
    interval: float = 5.0

    @property
    def callback_url(self) -> str:
        return f"{self.public_url.rstrip('/')}/oauth/callback"


def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status,
                        headers={"Cache-Control": "no-store"})


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
                                 "Referrer-Policy": "no-referrer",
                                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                            "form-action 'self'"})


def _code_form(error: str | None = None) -> str:
    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<h1>Connect a Stripe account</h1>
<p>Enter the code shown in your notebook.</p>{error_html}
<form method="post" action="device"><input type="text" name="user_code" maxlength="12" autocomplete="off"
 autofocus required placeholder="XXXX-XXXX" aria-label="Code"><button class="button" type="submit">Continue</button></form>"""


class Relay:
    """State and handlers of one relay instance."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.sessions = SessionStore(config.db_path)
        self._guesses: dict[str, deque[float]] = defaultdict(deque)

    # --- device endpoints (RFC 8628) -------------------------------------------------------

    async def device_code(self, request: Request) -> Response:
        form = await request.form()
        if form.get("client_id") != CLIENT_ID:
            return _oauth_error("invalid_client", f"Unknown client; notebooks identify as client_id={CLIENT_ID}.", 401)
        scope = str(form.get("scope") or "read_only")
        if scope != "read_only":
            return _oauth_error("invalid_scope", "This relay grants read_only access only.")
        self.sessions.purge_expired()
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
        tokens = self.sessions.redeem(session) if session.status == APPROVED else None
        if tokens is None:
            return _oauth_error("invalid_grant", "Unknown or already redeemed device code.")
        return JSONResponse(tokens, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    # --- browser pages ------------------------------------------------------------------------

    async def device_page(self, request: Request) -> Response:
        code = request.query_params.get("user_code")
        if not code:
            return page("Enter your code", _code_form())
        shown = html.escape(code.upper())
        return page("Confirm your code", f"""<h1>Confirm the code</h1>
<p>Check that this code matches the one shown in your notebook:</p><div class="code">{shown}</div>
<form method="post" action="device"><input type="hidden" name="user_code" value="{shown}">
<button class="button" type="submit">The codes match: continue</button></form>""")

    async def device_submit(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        if self._throttled(client):
            return page("Too many attempts", "<h1>Too many attempts</h1><p>Too many wrong codes were entered from "
                        "this address. Wait ten minutes, then try again with the code from your notebook.</p>", 429)
        form = await request.form()
        session = self.sessions.by_user_code(str(form.get("user_code", "")))
        if session is None or session.status != PENDING or session.expired:
            self._guesses[client].append(time.monotonic())
            return page("Enter your code", _code_form("That code is not valid or has expired. Check the code in "
                                                       "your notebook, or start again there to get a new one."), 400)
        # Off the event loop: building the URL takes the process-wide OAuth transport lock, which an
        # in-process client (the sandbox in a notebook) may hold while it waits for this very server.
        return page("Allow access", await run_in_threadpool(self._access_request, session))

    def _throttled(self, client: str) -> bool:
        recent = self._guesses[client]
        cutoff = time.monotonic() - GUESS_WINDOW_S
        while recent and recent[0] < cutoff:
            recent.popleft()
        return len(recent) >= MAX_GUESSES

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
            reason = getattr(exc, "description", None) or type(exc).__name__
            log.warning("connect code exchange failed: %s", reason)
            self.sessions.settle(session, status=FAILED, error=f"Stripe refused the authorization: {reason}")
            return page("Connection failed", "<h1>The connection failed</h1><p class=\"error\">Stripe refused the "
                        f"authorization ({html.escape(str(reason))}).</p><p>Return to your notebook and start again.</p>",
                        502)
        if not self.sessions.settle(session, status=APPROVED, tokens=tokens):
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
        # Only the holder of a working token for the account may disconnect it.
        check = requests.get(f"{self.config.api_url.rstrip('/')}/v1/account", auth=(token, ""), timeout=15)
        if check.status_code != 200 or check.json().get("id") != account_id:
            return _oauth_error("invalid_grant", "The access token does not belong to that account (or was already "
                                "revoked).", 403)
        answer = requests.post(f"{self.config.connect_url.rstrip('/')}/oauth/deauthorize",
                               data={"client_id": self.config.client_id, "stripe_user_id": account_id},
                               auth=(self.config.secret_key, ""), timeout=15)
        if answer.status_code != 200:
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
            return _oauth_error(body.get("error", "deauthorize_failed"),
                                body.get("error_description", f"Stripe answered {answer.status_code}."), 502)
        return JSONResponse({"stripe_user_id": account_id})


def create_app(config: RelayConfig) -> Starlette:
    relay = Relay(config)
    app = Starlette(routes=[
        Route("/device/code", relay.device_code, methods=["POST"]),
        Route("/device/token", relay.device_token, methods=["POST"]),
        Route("/device", relay.device_page, methods=["GET"]),
        Route("/device", relay.device_submit, methods=["POST"]),
        Route("/oauth/callback", relay.callback, methods=["GET"]),
        Route("/oauth/deauthorize", relay.deauthorize, methods=["POST"]),
    ])
    app.state.relay = relay
    return app
