"""Stripe Connect OAuth, emulated: the sign-in page, the code exchange and deauthorization.

Mirrors connect.stripe.com closely enough for an OAuth client to run end to end offline:
`/oauth/authorize` (a sign-in form with a Deny choice, redirecting to the exact registered
`redirect_uri`), `/oauth/token` (authorization_code and refresh_token grants, platform key
required) and `/oauth/deauthorize`.
"""
from __future__ import annotations

import html
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit, parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mbi_widgets.sandbox.credentials import bearer_key

if TYPE_CHECKING:
    from mbi_widgets.sandbox.server import SandboxState

#: How long a sign-in page and an authorization code stay usable.
AUTHORIZE_TTL_S = 15 * 60
CODE_TTL_S = 5 * 60
SCOPES = ("read_only", "read_write")


@dataclass
class AuthorizeRequest:
    redirect_uri: str
    state: str | None
    scope: str
    created: float


@dataclass
class Grant:
    account_id: str
    scope: str
    redirect_uri: str
    created: float
    used: bool = False


class ConnectState:
    """Registered redirect URIs, pending sign-in pages and issued codes."""

    def __init__(self, sandbox: "SandboxState") -> None:
        self.sandbox = sandbox
        self.redirect_uris: list[str] = []
        self.pending: dict[str, AuthorizeRequest] = {}
        self.grants: dict[str, Grant] = {}
        self._lock = threading.Lock()

    def register_redirect_uri(self, uri: str) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ValueError(f"redirect URI must be an absolute http(s) URL without a fragment: {uri!r}")
        with self._lock:
            if uri not in self.redirect_uris:
                self.redirect_uris.append(uri)

    def open_request(self, redirect_uri: str, state: str | None, scope: str) -> str:
        request_id = secrets.token_urlsafe(18)
        with self._lock:
            self._expire()
            self.pending[request_id] = AuthorizeRequest(redirect_uri, state, scope, time.monotonic())
        return request_id

    def take_request(self, request_id: str) -> AuthorizeRequest | None:
        with self._lock:
            self._expire()
            return self.pending.pop(request_id, None)

    def issue_code(self, account_id: str, request: AuthorizeRequest) -> str:
        code = "ac_" + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
        with self._lock:
            self.grants[code] = Grant(account_id, request.scope, request.redirect_uri, time.monotonic())
        return code

    def _expire(self) -> None:
        cutoff = time.monotonic() - AUTHORIZE_TTL_S
        for key in [k for k, v in self.pending.items() if v.created < cutoff]:
            del self.pending[key]


def _with_query(uri: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} | Stripe (sandbox)</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: -apple-system, "Segoe UI", Roboto, sans-serif; background: #f6f9fc; color: #1a1f36; margin: 0; }}
 header {{ padding: 24px 40px; font-weight: 700; font-size: 26px; color: #635bff; }}
 header small {{ font-size: 12px; color: #697386; font-weight: 500; margin-left: 8px; }}
 main {{ max-width: 440px; margin: 24px auto; background: #fff; border-radius: 8px; padding: 32px 40px;
        box-shadow: 0 15px 35px rgba(60,66,87,.08), 0 5px 15px rgba(0,0,0,.12); }}
 h1 {{ font-size: 22px; margin: 0 0 12px; }} p {{ color: #3c4257; line-height: 1.5; }}
 label {{ display: block; font-size: 14px; font-weight: 500; margin: 16px 0 6px; }}
 input[type=email], input[type=password] {{ width: 100%; box-sizing: border-box; padding: 9px 12px;
        border: 1px solid #d5dbe1; border-radius: 4px; font-size: 15px; }}
 button {{ margin-top: 20px; width: 100%; padding: 10px; border-radius: 4px; font-size: 15px; border: 0;
        cursor: pointer; }}
 .primary {{ background: #635bff; color: #fff; }} .secondary {{ background: #fff; color: #3c4257;
        border: 1px solid #d5dbe1; }}
 .error {{ color: #df1b41; font-weight: 500; }}
 .hint {{ margin-top: 24px; padding: 12px 14px; background: #f6f8fa; border-radius: 6px; font-size: 13px; }}
</style></head>
<body><header>stripe<small>sandbox</small></header><main>{body}</main></body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=html.escape(title), body=body), status_code=status,
                        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                            "form-action 'self'"})


def _sandbox_hint(accounts: list) -> str:
    """Test-mode sign-ins, shown on this loopback-only page so that no notebook ever has to print them."""
    rows = "".join(f"<li><code>{html.escape(a.email)}</code> / <code class='pw'>{html.escape(a.password)}</code> "
                   f"({html.escape(a.business_name)})</li>" for a in accounts)
    return f'<div class="hint"><strong>Sandbox accounts</strong> (test mode, valid while this sandbox runs)<ul>{rows}</ul></div>'


def _sign_in_form(request_id: str, platform_name: str, scope: str, error: str | None = None,
                  email: str = "", hint: str = "") -> str:
    access = "read-only access to" if scope == "read_only" else "read and write access to"
    error_html = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""
<h1>Sign in to your account</h1>
<p><strong>{html.escape(platform_name)}</strong> would like {access} your Stripe account's data.</p>
{error_html}
<form method="post" action="/oauth/authorize">
 <input type="hidden" name="request" value="{html.escape(request_id)}">
 <label for="email">Email</label>
 <input id="email" name="email" type="email" autocomplete="username" value="{html.escape(email)}" required>
 <label for="password">Password</label>
 <input id="password" name="password" type="password" autocomplete="current-password" required>
 <button class="primary" type="submit" name="action" value="approve">Sign in to your account</button>
</form>
<form method="post" action="/oauth/authorize">
 <input type="hidden" name="request" value="{html.escape(request_id)}">
 <button class="secondary" type="submit" name="action" value="deny">Deny access</button>
</form>
{hint}
"""


def routes(state: "SandboxState") -> list[Route]:
    connect = state.connect
    platform_name = "mbi-widgets (sandbox platform)"

    def hint() -> str:
        return _sandbox_hint([seed.account for seed in state.seeds.values()])

    async def authorize_page(request: Request) -> Response:
        q = request.query_params
        if q.get("client_id") != state.client_id:
            return _page("Invalid request", "<h1>Invalid request</h1><p>Unknown or missing <code>client_id</code>. "
                         "Check the Connect client ID of your platform.</p>", 400)
        redirect_uri = q.get("redirect_uri") or (connect.redirect_uris[0] if connect.redirect_uris else None)
        if redirect_uri is None or redirect_uri not in connect.redirect_uris:
            # Never redirect to an unregistered address: show the error here instead.
            return _page("Invalid redirect URI", "<h1>Invalid redirect URI</h1><p>The redirect URI "
                         f"<code>{html.escape(redirect_uri or '(none)')}</code> does not match any URI "
                         "registered for this platform.</p>", 400)
        oauth_state = q.get("state")
        if q.get("response_type", "code") != "code":
            return RedirectResponse(_with_query(redirect_uri, {
                "error": "unsupported_response_type",
                "error_description": "Only response_type=code is supported.", "state": oauth_state}), 302)
        scope = q.get("scope", "read_write")
        if scope not in SCOPES:
            return RedirectResponse(_with_query(redirect_uri, {
                "error": "invalid_scope", "error_description": f"Invalid scope: {scope}",
                "state": oauth_state}), 302)
        request_id = connect.open_request(redirect_uri, oauth_state, scope)
        return _page("Sign in", _sign_in_form(request_id, platform_name, scope, hint=hint()))

    async def authorize_submit(request: Request) -> Response:
        form = await request.form()
        request_id = str(form.get("request", ""))
        with connect._lock:
            pending = connect.pending.get(request_id)
        if pending is None:
            return _page("Session expired", "<h1>This sign-in page has expired</h1><p>Go back to the "
                         "application and start connecting again.</p>", 400)
        if form.get("action") == "deny":
            connect.take_request(request_id)
            return RedirectResponse(_with_query(pending.redirect_uri, {
                "error": "access_denied", "error_description": "The user denied your request",
                "state": pending.state}), 302)
        email, password = str(form.get("email", "")).strip(), str(form.get("password", ""))
        account = next((seed.account for seed in state.seeds.values()
                        if seed.account.email.lower() == email.lower()
                        and secrets.compare_digest(seed.account.password, password)), None)
        if account is None:
            return _page("Sign in", _sign_in_form(request_id, platform_name, pending.scope,
                                                  "Incorrect email or password.", email, hint()), 401)
        taken = connect.take_request(request_id)
        if taken is None:
            return _page("Session expired", "<h1>This sign-in page has expired</h1>", 400)
        code = connect.issue_code(account.id, taken)
        return RedirectResponse(_with_query(taken.redirect_uri, {
            "code": code, "scope": taken.scope, "state": taken.state}), 302)

    def platform_authenticated(request: Request, form: dict) -> bool:
        key = form.get("client_secret") or bearer_key(request.headers.get("authorization"))
        principal = state.credentials.lookup(str(key)) if key else None
        return principal is not None and principal.platform

    async def token(request: Request) -> Response:
        form = dict(await request.form())
        if not platform_authenticated(request, form):
            return _oauth_error(401, "invalid_client", "The platform's secret key is missing or invalid: send "
                                "it as client_secret or in the Authorization header.")
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return exchange_code(str(form.get("code", "")))
        if grant_type == "refresh_token":
            refreshed = state.credentials.refresh(str(form.get("refresh_token", "")), state.client_id)
            if refreshed is None:
                return _oauth_error(400, "invalid_grant", "Invalid refresh token: it is unknown or was revoked.")
            principal, refresh_token = refreshed
            # A refreshed token keeps the scope the account granted.
            grant = connect.grants.get(principal.grant_code or "")
            scope = grant.scope if grant is not None else "read_only"
            return JSONResponse(token_body(principal.key, refresh_token, principal.account_id, scope))
        return _oauth_error(400, "unsupported_grant_type",
                            f"Unsupported grant_type: {grant_type!r}; use authorization_code or refresh_token.")

    def exchange_code(code: str) -> Response:
        with connect._lock:
            grant = connect.grants.get(code)
            reused = grant is not None and grant.used
            if grant is not None:
                grant.used = True
        if grant is None:
            return _oauth_error(400, "invalid_grant", f"Authorization code does not exist: {code}")
        if reused:
            # RFC 6749 §4.1.2: a replayed code revokes what it granted.
            state.credentials.revoke(grant_code=code)
            return _oauth_error(400, "invalid_grant", f"Authorization code has already been used: {code}. "
                                "Tokens issued with it have been revoked.")
        if time.monotonic() - grant.created > CODE_TTL_S:
            return _oauth_error(400, "invalid_grant", f"Authorization code expired: {code}")
        access, refresh_token = state.credentials.issue_oauth(grant.account_id, state.client_id, code)
        return JSONResponse(token_body(access, refresh_token, grant.account_id, grant.scope))

    def token_body(access: str, refresh_token: str, account_id: str, scope: str) -> dict:
        return {"access_token": access, "refresh_token": refresh_token, "token_type": "bearer",
                "stripe_user_id": account_id, "stripe_publishable_key": state.publishable_key(account_id),
                "scope": scope, "livemode": False}

    async def deauthorize(request: Request) -> Response:
        form = dict(await request.form())
        if not platform_authenticated(request, form):
            return _oauth_error(401, "invalid_client", "The platform's secret key is missing or invalid.")
        if form.get("client_id") != state.client_id:
            return _oauth_error(400, "invalid_client", f"No such application: {form.get('client_id')!r}")
        account_id = str(form.get("stripe_user_id", ""))
        if account_id not in state.credentials.connected:
            return _oauth_error(400, "invalid_client", f"This application is not connected to stripe account "
                                f"{account_id!r}, or that account does not exist.")
        state.credentials.revoke(account_id=account_id, client_id=state.client_id)
        state.credentials.connected.discard(account_id)
        return JSONResponse({"stripe_user_id": account_id})

    return [
        Route("/oauth/authorize", authorize_page, methods=["GET"]),
        Route("/oauth/authorize", authorize_submit, methods=["POST"]),
        Route("/oauth/token", token, methods=["POST"]),
        Route("/oauth/deauthorize", deauthorize, methods=["POST"]),
    ]
