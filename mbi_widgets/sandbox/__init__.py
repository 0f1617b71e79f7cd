"""The embedded Stripe sandbox: a Stripe-compatible server on loopback, seeded with realistic data.

    with Sandbox() as sandbox:
        client = stripe.StripeClient(sandbox.restricted_key,
                                     base_addresses={"api": sandbox.api_url, "connect": sandbox.connect_url})
        client.v1.charges.list({"limit": 3})

It serves Stripe's read API for the tables MBI expects, Connect OAuth (so authorization runs end
to end offline), Stripe's rate limits, latency and faults on demand.
"""
from __future__ import annotations

import html
import math
import random
import re
import secrets
import tempfile
from datetime import UTC, datetime
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

import requests

from mbi_widgets.errors import MbiError, SandboxError
from mbi_widgets.relay import RelayConfig, create_app as create_relay_app
from mbi_widgets.serving import BackgroundServer
from mbi_widgets.sandbox.control import FaultPlan, Faults, RateLimits
from mbi_widgets.redaction import redact
from mbi_widgets.sandbox.credentials import SandboxAccount
from mbi_widgets.sandbox.generator import DAY, History, scale_to_customers
from mbi_widgets.sandbox.server import AccountSeed, SandboxState, build_app
from mbi_widgets.sandbox.store import Dataset

__all__ = ["Sandbox", "SandboxAccount", "RateLimits", "Faults"]

#: The sandbox clock: data is generated as of this moment, whatever the wall clock says, so a
#: seed always gives the same objects.
DEFAULT_NOW = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())

_ACCOUNT_PROFILES = (
    ("Northwind Analytics", "owner@northwind-analytics.example", "US", "usd", "northwind-analytics.example"),
    ("Brightwave Studio GmbH", "finance@brightwave-studio.example", "DE", "eur", "brightwave-studio.example"),
)


def _account_id(rng: random.Random) -> str:
    return "acct_1" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", k=15))


class Sandbox:
    """A Stripe-compatible server on 127.0.0.1, run on a background thread.

    `scale` is "demo" (a few hundred customers per account), "bench" (over 100,000 objects) or a
    number of customers. `rate_limits` is None (unlimited), "test", "live" or a `RateLimits`;
    `faults` a `Faults`. Keys and passwords are random per instance and never printed by repr.

    The sandbox has its own clock, starting at `now`: `advance(days=1)` moves it and the business
    goes on (sign-ups, renewals, failed payments, refunds, cancellations, edits and deletions,
    each with the events Stripe sends), up to `horizon_days` after the start. With `listing_lag`
    (seconds), a new object appears in lists only up to that long after its `created`, as
    Stripe's lists sometimes do.

    The Search API (`/v1/charges/search` and the like) is served unless `search` is False (as
    for Stripe accounts in regions without search: 404); objects become searchable
    `search_delay` seconds of the sandbox clock after their `created`, like Stripe's index.
    """

    def __init__(self, seed: int = 0, scale: str | int = "demo", latency_ms: float = 0,
                 rate_limits: RateLimits | Mapping[str, float] | str | None = None,
                 faults: Faults | None = None, *, port: int = 0, now: int | datetime | None = None,
                 redirect_uris: tuple[str, ...] = (), horizon_days: int = 60, listing_lag: int = 0,
                 search: bool = True, search_delay: int = 60) -> None:
        if isinstance(search_delay, bool) or not isinstance(search_delay, int) or search_delay < 0:
            raise SandboxError(f"search_delay is whole seconds >= 0, not {search_delay!r}")
        self.seed, self.scale, self.latency_ms, self.port = seed, scale, latency_ms, port
        customers = scale_to_customers(scale)
        start = int(now.timestamp()) if isinstance(now, datetime) else int(now or DEFAULT_NOW)
        rng = random.Random(seed)
        platform = SandboxAccount(_account_id(rng), "mbi-widgets Platform", "platform@mbi-widgets.example",
                                  _password(), "US", "usd", "mbi-widgets.example")
        self.accounts: list[SandboxAccount] = []
        seeds = []
        for index, (name, email, country, currency, domain) in enumerate(_ACCOUNT_PROFILES):
            account = SandboxAccount(_account_id(rng), name, email, _password(), country, currency, domain)
            self.accounts.append(account)
            seeds.append(AccountSeed(account, seed * 1_000 + index + 1, customers,
                                     start - (800 + 40 * index) * DAY))
        self.client_id = "ca_" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=24))
        self._state = SandboxState(platform=platform, seeds=seeds, now=start,
                                   rate_limits=RateLimits.coerce(rate_limits), faults=FaultPlan(faults),
                                   client_id=self.client_id, horizon_days=horizon_days, listing_lag=listing_lag,
                                   search=search, search_delay=search_delay)
        self.platform_account_id = platform.id
        self.secret_key = self._state.credentials.issue_secret(platform.id, platform=True)
        self.restricted_key = self._state.credentials.issue_restricted(self.accounts[0].id)
        for uri in redirect_uris:
            self.register_redirect_uri(uri)
        self._server: BackgroundServer | None = None
        self._relay_dir: tempfile.TemporaryDirectory | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Sandbox":
        """Generates the first account's data and serves on a free loopback port; returns self."""
        if self._server is not None:
            return self
        self._state.dataset(self.accounts[0].id)
        self._relay_dir = tempfile.TemporaryDirectory(prefix="mbi-sandbox-relay-")
        try:
            self._server = BackgroundServer(make_app=self._make_app, port=self.port, name="sandbox",
                                            date_header=False).start()
        except MbiError as exc:
            self._server = None
            self._relay_dir.cleanup()
            raise SandboxError(f"the sandbox could not start: {exc}") from exc
        return self

    def _make_app(self, url: str) -> Any:
        relay = RelayConfig(client_id=self.client_id, secret_key=self.secret_key, public_url=f"{url}/relay",
                            connect_url=url, api_url=url, db_path=f"{self._relay_dir.name}/relay.sqlite3",
                            interval=2.0)
        self.register_redirect_uri(relay.callback_url)
        return build_app(self._state, latency_ms=self.latency_ms, mounts={"/relay": create_relay_app(relay)})

    def stop(self) -> None:
        """Stops serving; safe to call twice."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._relay_dir is not None:
            self._relay_dir.cleanup()
            self._relay_dir = None

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.url is not None

    @property
    def api_url(self) -> str:
        """Base URL of the API, for `StripeClient(base_addresses={"api": ...})`."""
        if self._server is None or self._server.url is None:
            raise SandboxError("the sandbox is not running: call start() or use it as a context manager")
        return self._server.url

    @property
    def relay_url(self) -> str:
        """Base URL of the embedded relay (device-style authorization wired to this sandbox's Connect)."""
        return f"{self.api_url}/relay"

    @property
    def connect_url(self) -> str:
        """Base URL of the Connect OAuth emulation (stands in for https://connect.stripe.com)."""
        return self.api_url

    # --- the clock --------------------------------------------------------------------------------

    @property
    def now(self) -> int:
        """The sandbox's current moment (Unix seconds); answers carry it in their `Date` header."""
        return self._state.now

    clock = now

    @property
    def started_at(self) -> int:
        return self._state.start

    def advance(self, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0) -> int:
        """Moves the sandbox clock forward; objects and events created meanwhile appear. Returns the clock.

        Raises SandboxError beyond `horizon_days` after the start.
        """
        step = days * DAY + hours * 3_600 + minutes * 60 + seconds
        if not math.isfinite(step):
            raise SandboxError("give the sandbox clock a finite duration (days, hours, minutes, seconds)")
        if step < 0:
            raise SandboxError("the sandbox clock only moves forward: give a positive duration")
        return self._state.advance(int(step))

    # --- what tests and demos use ----------------------------------------------------------------

    def account(self, which: int | str = 0) -> SandboxAccount:
        """A seeded account by index or id."""
        if isinstance(which, int):
            return self.accounts[which]
        for account in self.accounts:
            if account.id == which:
                return account
        raise SandboxError(f"no seeded account {which!r}; the sandbox has {[a.id for a in self.accounts]}")

    def history(self, account: int | str = 0, *, whole: bool = False) -> History:
        """The generated facts behind an account's data as of the sandbox clock (to check what the API serves).

        `whole` gives the entire simulation, up to `horizon_days` after the start.
        """
        history = self._state.history(self.account(account).id)
        return history if whole else history.as_of(self._state.now)

    def dataset(self, account: int | str = 0) -> Dataset:
        return self._state.dataset(self.account(account).id)

    def register_redirect_uri(self, uri: str) -> None:
        """Registers an OAuth redirect URI for the platform (Connect requires an exact match)."""
        self._state.connect.register_redirect_uri(uri)

    def create_restricted_key(self, resources: set[str], account: int | str = 0) -> str:
        """A restricted key for a seeded account that may read only `resources` (e.g. {"charges"})."""
        return self._state.credentials.issue_restricted(self.account(account).id, resources)

    def inject_fault(self, kind: str, count: int = 1, path: str | None = None) -> None:
        """The next `count` requests (whose path starts with `path`, if given) get fault `kind`."""
        self._state.faults.inject(kind, count, path)

    def authorize(self, authorize_url: str, *, account: int | str = 0, deny: bool = False,
                  password: str | None = None) -> str:
        """Completes the Connect sign-in page over HTTP, as a person would; returns the redirect URL.

        The URL is where the browser would be sent: the registered redirect URI with `code` and
        `state`, or with `error=access_denied` when `deny` is set.
        """
        who = self.account(account)
        with requests.Session() as session:
            page = session.get(authorize_url, allow_redirects=False, timeout=10)
            if page.status_code != 200:
                raise SandboxError(f"the sandbox's authorize page answered {page.status_code}: "
                                   f"{_text_of(page.text)}")
            request_id = _hidden_request_id(page.text)
            form = {"request": request_id, "action": "deny" if deny else "approve"}
            if not deny:
                form |= {"email": who.email, "password": password if password is not None else who.password}
            answer = session.post(f"{self.connect_url}/oauth/authorize", data=form, allow_redirects=False,
                                  timeout=10)
        if answer.status_code != 302:
            raise SandboxError(f"signing in on the sandbox's Connect page failed ({answer.status_code}): "
                               f"{_text_of(answer.text)}")
        return answer.headers["location"]

    def approve(self, user_code: str, email: str | None = None, password: str | None = None, *,
                relay_url: str | None = None) -> str:
        """Approves a device code as an admin would in a browser; returns the final page's text.

        Walks the relay's code page and access request, signs in on the Connect page (as the
        account with `email`, the first seeded account by default) and follows the callback.
        `relay_url` picks another relay wired to this sandbox's Connect (default: the embedded one).
        """
        return self._walk_device(user_code, email=email, password=password, deny=False, relay_url=relay_url)

    def deny(self, user_code: str, *, relay_url: str | None = None) -> str:
        """Like `approve`, but clicks Deny on the Connect page."""
        return self._walk_device(user_code, email=None, password=None, deny=True, relay_url=relay_url)

    def _walk_device(self, user_code: str, *, email: str | None, password: str | None, deny: bool,
                     relay_url: str | None) -> str:
        relay = (relay_url or self.relay_url).rstrip("/")
        account = next((a for a in self.accounts if email is None or a.email.lower() == email.lower()), None)
        if account is None:
            raise SandboxError(f"no seeded account signs in as {email!r}; use one of {[a.email for a in self.accounts]}")
        with requests.Session() as browser:
            access = confirm_code(browser, relay, user_code)
            link = re.search(r'href="([^"]+)"[^>]*>Sign in with Stripe to Continue', access.text)
            if access.status_code != 200 or link is None:
                raise SandboxError(f"the relay did not accept code {user_code!r}: {_text_of(access.text)}")
            location = self.authorize(html.unescape(link.group(1)), account=account.id, deny=deny, password=password)
            final = browser.get(location, timeout=30)
        if final.status_code != 200:
            raise SandboxError(f"the relay's callback failed ({final.status_code}): {_text_of(final.text)}")
        return _text_of(final.text)

    def connection_info(self) -> dict[str, Any]:
        """What `mbi-widgets sandbox` prints: URLs, test keys and the seeded accounts."""
        return {"api_url": self.api_url, "connect_url": self.connect_url, "secret_key": self.secret_key,
                "client_id": self.client_id, "restricted_key": self.restricted_key,
                "platform_account": self.platform_account_id, "relay_url": self.relay_url,
                "accounts": [account.public() for account in self.accounts]}

    def __repr__(self) -> str:
        where = self._server.url if self._server and self._server.url else "not running"
        return (f"Sandbox({where}, seed={self.seed}, scale={self.scale!r}, secret_key={redact(self.secret_key)}, "
                f"restricted_key={redact(self.restricted_key)})")


def confirm_code(browser: requests.Session, relay_url: str, user_code: str) -> requests.Response:
    """Confirms `user_code` on a relay's pages as a browser does; returns the access page.

    Opens the code page first, as the notebook's link does: it sets the relay's cookie in
    `browser`, and its form carries the CSRF token the confirmation needs.
    """
    relay = relay_url.rstrip("/")
    form = browser.get(f"{relay}/device", params={"user_code": user_code}, timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]*)"', form.text)
    return browser.post(f"{relay}/device", timeout=10,
                        data={"user_code": user_code, "csrf_token": html.unescape(token.group(1)) if token else ""})


def _password() -> str:
    return secrets.token_urlsafe(12)


def _hidden_request_id(page: str) -> str:
    marker = 'name="request" value="'
    start = page.find(marker)
    if start < 0:
        raise SandboxError("the sandbox's authorize page has no sign-in form")
    start += len(marker)
    return page[start:page.index('"', start)]


def _text_of(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<style.*?</style>", "", page))).strip()[:300]


def parse_redirect(location: str) -> dict[str, str]:
    """The query parameters of an OAuth redirect."""
    return dict(parse_qsl(urlsplit(location).query))
