"""The sandbox's shared state and its ASGI application: authentication, limits and lazy datasets."""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from mbi_widgets.sandbox import api, connect, search
from mbi_widgets.errors import SandboxError
from mbi_widgets.sandbox.api import StripeHTTPError
from mbi_widgets.sandbox.control import ControlMiddleware, DroppedConnection, FaultPlan, RateLimiter, RateLimits
from mbi_widgets.redaction import redact
from mbi_widgets.serving import client_went_away
from mbi_widgets.sandbox.credentials import Credentials, Principal, SandboxAccount, bearer_key
from mbi_widgets.sandbox.generator import (
    EVENT_WINDOW_DAYS,
    DAY,
    AccountProfile,
    History,
    generate_history,
)
from mbi_widgets.sandbox.store import Dataset, build_dataset


@dataclass
class AccountSeed:
    """How to generate one account's data on first use."""

    account: SandboxAccount
    seed: int
    customers: int
    created: int


class SandboxState:
    """Everything the routes share. Datasets are generated on first use, once, under a lock."""

    def __init__(self, *, platform: SandboxAccount, seeds: list[AccountSeed], now: int,
                 rate_limits: RateLimits | None, faults: FaultPlan, client_id: str,
                 horizon_days: int = 0, listing_lag: int = 0, search: bool = True,
                 search_delay: int = 60) -> None:
        self.platform = platform
        self.seeds = {seed.account.id: seed for seed in seeds}
        #: The sandbox clock (moves with `advance`); data is generated from `start` to `end`.
        self.start = self.now = now
        self.end = now + horizon_days * DAY
        self.horizon_days = horizon_days
        self.listing_lag = listing_lag
        #: Whether the Search API is served (Stripe offers none in some regions), and its indexing
        #: delay: objects created within the last `search_delay` seconds are not searchable yet.
        self.search = search
        self.search_delay = search_delay
        self._events: dict[str, dict] = {}
        self.credentials = Credentials(platform.id)
        self.credentials.connected.update(self.seeds)
        self.limiter = RateLimiter(rate_limits) if rate_limits else None
        self.faults = faults
        self.client_id = client_id
        self.connect = connect.ConnectState(self)
        self._datasets: dict[str, Dataset] = {}
        self._histories: dict[str, History] = {}
        self._build_lock = threading.Lock()
        self._publishable: dict[str, str] = {}

    def publishable_key(self, account_id: str) -> str:
        """The account's publishable key (harmless by design; shown to OAuth clients)."""
        return self._publishable.setdefault(account_id, "pk_test_" + secrets.token_hex(16))

    # --- data ----------------------------------------------------------------------------------

    def account(self, account_id: str) -> SandboxAccount | None:
        if account_id == self.platform.id:
            return self.platform
        seed = self.seeds.get(account_id)
        return seed.account if seed else None

    def history(self, account_id: str) -> History:
        self.dataset(account_id)
        return self._histories[account_id]

    def dataset(self, account_id: str) -> Dataset:
        """The account's dataset, generating it on first use (thread-safe)."""
        found = self._datasets.get(account_id)
        if found is not None:
            return found
        with self._build_lock:
            found = self._datasets.get(account_id)
            if found is None:
                found = self._build(account_id)
                self._datasets[account_id] = found
        return found

    def advance(self, seconds: int) -> int:
        """Moves the sandbox clock forward and re-renders every generated account at the new moment."""
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        with self._build_lock:
            target = self.now + seconds
            if target > self.end:
                raise SandboxError(
                    f"the sandbox simulates {self.horizon_days} days past its start and cannot advance "
                    f"{(target - self.end) / DAY:.1f} days beyond that: create it with a larger horizon_days")
            fresh = {account_id: build_dataset(self._histories[account_id], target, lag=self.listing_lag,
                                               events=self._events.setdefault(account_id, {}))
                     for account_id in self._datasets}
            self.now = target
            self._datasets.update(fresh)
        return target

    def profile(self, account_id: str) -> AccountProfile:
        """Who the account is (what `GET /v1/account` shows), without generating its data."""
        account = self.account(account_id)
        if account is None:
            raise KeyError(account_id)
        seed = self.seeds.get(account_id)
        return AccountProfile(account.id, account.business_name, account.email, account.country,
                              account.currency, account.domain,
                              account.business_name.upper().replace(" ", "")[:22],
                              seed.created if seed else self.start - 900 * DAY)

    def _build(self, account_id: str) -> Dataset:
        profile = self.profile(account_id)
        seed = self.seeds.get(account_id)
        history = generate_history(profile, seed=seed.seed if seed else 0,
                                   customers=seed.customers if seed else 0, now=self.start,
                                   horizon_days=self.horizon_days)
        self._histories[account_id] = history
        return build_dataset(history, self.now, lag=self.listing_lag, events=self._events.setdefault(account_id, {}))

    async def dataset_async(self, account_id: str) -> Dataset:
        found = self._datasets.get(account_id)
        return found if found is not None else await asyncio.to_thread(self.dataset, account_id)

    def event_window_start(self, dataset: Dataset) -> int:
        return dataset.now - EVENT_WINDOW_DAYS * DAY

    # --- authentication ------------------------------------------------------------------------

    def principal(self, request: Request) -> Principal:
        key = bearer_key(request.headers.get("authorization"))
        if not key:
            raise StripeHTTPError(401, "You did not provide an API key. You need to provide your API key in the "
                                  "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                                  "YOUR_SECRET_KEY').")
        if key.startswith("pk_"):
            raise StripeHTTPError(401, "This API call cannot be made with a publishable API key. Please use a "
                                  "secret API key or a restricted API key.", code="secret_key_required")
        principal = self.credentials.lookup(key)
        if principal is None:
            raise StripeHTTPError(401, f"Invalid API Key provided: {redact(key)}", code="api_key_invalid")
        return principal

    async def authorize(self, request: Request, permission: str, endpoint: str) -> tuple[Principal, Dataset]:
        """Authenticates, checks access and rate limits; returns the caller and the dataset to read."""
        principal = self.principal(request)
        account_id = principal.account_id
        wanted = request.headers.get("stripe-account")
        if wanted and wanted != account_id:
            if not (principal.platform and wanted in self.credentials.connected):
                raise StripeHTTPError(
                    403, f"The provided key '{redact(principal.key)}' does not have access to account "
                    f"'{wanted}' (or that account does not exist). Application access may have been revoked.",
                    code="account_invalid")
            account_id = wanted
        if principal.kind == "oauth" and principal.account_id not in self.credentials.connected:
            raise StripeHTTPError(401, "This access token has been revoked: the account disconnected the "
                                  "application.", code="api_key_expired")
        if not principal.can_read(permission):
            raise StripeHTTPError(
                403, f"The provided key '{redact(principal.key)}' does not have the required permissions for "
                f"this endpoint on account '{account_id}'. Having the '{principal.permission_name(permission)}' "
                "permission would allow this request to continue.", code="permission_error")
        if self.limiter is not None:
            reason = self.limiter.check(account_id, endpoint)
            if reason is not None:
                raise StripeHTTPError(429, "Request rate limit exceeded. You can learn more about rate limits "
                                      "here https://stripe.com/docs/rate-limits.", code="rate_limit",
                                      headers={"Stripe-Rate-Limited-Reason": reason})
        return principal, await self.dataset_async(account_id)


async def _stripe_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StripeHTTPError):
        return exc.response()
    if isinstance(exc, DroppedConnection):
        raise exc  # an injected fault, not a bug: the server closes the connection without logging it
    logging.getLogger("mbi_widgets.sandbox").exception("sandbox error on %s %s", request.method, request.url.path)
    return StripeHTTPError(500, "An unknown error occurred in the sandbox.", type_="api_error").response()


async def _not_found(request: Request) -> Response:
    return StripeHTTPError(404, f"Unrecognized request URL ({request.method}: {request.url.path}). The sandbox "
                           "serves Stripe's read API and Connect OAuth: see https://docs.stripe.com/api.").response()


def _advance_route(state: SandboxState) -> Any:
    """`POST /_sandbox/advance` (days, hours, minutes, seconds): moves the sandbox clock.

    Loopback callers holding the platform's secret key only; answers the new clock.
    """
    async def advance(request: Request) -> Response:
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1"):
            raise StripeHTTPError(403, "The sandbox's clock can only be moved from this machine.")
        principal = state.principal(request)
        if principal.kind != "secret" or principal.account_id != state.platform.id:
            raise StripeHTTPError(403, "Moving the sandbox's clock needs the platform's secret key (sk_test_...).")
        form = dict(await request.form()) | dict(request.query_params)
        units = (("days", DAY), ("hours", 3_600), ("minutes", 60), ("seconds", 1))
        if not any(unit in form for unit, _ in units):
            raise StripeHTTPError(400, "Say how far to move the clock: days, hours, minutes or seconds (form fields).",
                                  param="days")
        try:
            seconds = sum(float(form.get(unit) or 0) * size for unit, size in units)
        except (TypeError, ValueError):
            raise StripeHTTPError(400, "days, hours, minutes and seconds must be numbers", param="days") from None
        if not math.isfinite(seconds):
            raise StripeHTTPError(400, "days, hours, minutes and seconds must be finite numbers", param="days")
        if seconds < 0:
            raise StripeHTTPError(400, "The sandbox's clock only moves forward.", param="days")
        try:
            now = await asyncio.to_thread(state.advance, int(seconds))
        except SandboxError as exc:
            raise StripeHTTPError(400, str(exc), param="days") from None
        return api.stripe_response(orjson.dumps({"object": "sandbox_clock", "now": now}))

    return advance


class _QuietDrops(logging.Filter):
    """Injected dropped connections are expected; keep them out of the server's error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


def build_app(state: SandboxState, *, latency_ms: float = 0, mounts: dict[str, Any] | None = None) -> Any:
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    app = Starlette(
        routes=[Route("/_sandbox/advance", _advance_route(state), methods=["POST"]),
                *search.routes(state), *api.routes(state), *connect.routes(state),
                *(Mount(path, app=sub_app) for path, sub_app in (mounts or {}).items()),
                Route("/{path:path}", _not_found, methods=all_methods)],
        exception_handlers={StripeHTTPError: _stripe_error, ClientDisconnect: client_went_away,
                            Exception: _stripe_error, 404: _not_found, 405: _not_found},
    )
    return ControlMiddleware(app, latency_ms=latency_ms, faults=state.faults, clock=lambda: state.now)
