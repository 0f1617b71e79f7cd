"""The notebook side of authorization: a device-flow state machine, its polling driver, and key checks.

The flow is a pure `step(state, answer, now)` over explicit states; `DeviceFlow` drives it on a
background thread so the kernel stays free, and observers (a widget, a script) are told of
every state change. Nothing here prints, touches widgets or writes to disk.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import requests
import stripe
from oauthlib.oauth2 import DeviceClient, OAuth2Error
from requests_oauthlib import OAuth2Session

from mbi_widgets.errors import MbiError
from mbi_widgets.logfilters import install_log_redaction
from mbi_widgets.oauth import insecure_transport_reason, transport_allowed
from mbi_widgets.redaction import redact, redact_text

CLIENT_ID = "mbi-widgets"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP = 5.0

log = logging.getLogger("mbi_widgets.auth")
install_log_redaction()  # requests-oauthlib logs token requests and answers whole at DEBUG


class AuthError(MbiError):
    """Authorization could not be completed; `code` is the OAuth error where there is one."""


# --- states --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StripeToken:
    """What Connect returned for an approved account. Its repr never shows the tokens."""

    access_token: str = field(repr=False)
    stripe_user_id: str
    scope: str
    livemode: bool
    token_type: str = "bearer"
    refresh_token: str | None = field(default=None, repr=False)
    stripe_publishable_key: str | None = None

    @classmethod
    def from_response(cls, token: dict[str, Any]) -> "StripeToken":
        missing = [name for name in ("access_token", "stripe_user_id") if not token.get(name)]
        if missing:
            raise AuthError(f"the relay's answer lacks {', '.join(missing)}; check that the relay is an "
                            "mbi-widgets relay and try again", code="invalid_response")
        scope = token.get("scope", "read_only")
        return cls(access_token=token["access_token"], stripe_user_id=token["stripe_user_id"],
                   scope=" ".join(scope) if isinstance(scope, (list, tuple)) else str(scope), livemode=bool(token.get("livemode", False)),
                   token_type=str(token.get("token_type", "bearer")), refresh_token=token.get("refresh_token"),
                   stripe_publishable_key=token.get("stripe_publishable_key"))

    @property
    def hint(self) -> str:
        return redact(self.access_token)


@dataclass(frozen=True)
class Idle:
    """Nothing under way (never started, or cancelled)."""


@dataclass(frozen=True)
class Waiting:
    """Waiting for the admin to approve `user_code` at `verification_uri`."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    deadline: float  # time.monotonic() at which the code expires
    expires_at: datetime  # the same moment on the wall clock, for display
    interval: float
    device_code: str = field(repr=False)

    @property
    def link(self) -> str:
        return self.verification_uri_complete or self.verification_uri


@dataclass(frozen=True)
class Connected:
    token: StripeToken


@dataclass(frozen=True)
class Denied:
    message: str


@dataclass(frozen=True)
class Expired:
    message: str


@dataclass(frozen=True)
class Failed:
    message: str
    code: str


FlowState = Idle | Waiting | Connected | Denied | Expired | Failed
TERMINAL = (Connected, Denied, Expired, Failed)


# --- answers from one poll --------------------------------------------------------------------

@dataclass(frozen=True)
class TokenIssued:
    token: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class OAuthAnswer:
    error: str
    description: str | None = None


@dataclass(frozen=True)
class Unreachable:
    reason: str


PollAnswer = TokenIssued | OAuthAnswer | Unreachable


def step(state: Waiting, answer: PollAnswer, now: float) -> tuple[FlowState, float | None]:
    """The next state and how long to wait before polling again (None when the flow is over)."""
    match answer:
        case TokenIssued(token=token):
            try:
                return Connected(StripeToken.from_response(token)), None
            except AuthError as exc:
                return Failed(str(exc), exc.code or "invalid_response"), None
        case OAuthAnswer(error="authorization_pending") | Unreachable() if now < state.deadline:
            return state, _next_wait(state, now)
        case OAuthAnswer(error="authorization_pending"):
            return Expired("The code expired before it was approved. Start again to get a new code."), None
        case OAuthAnswer(error="slow_down"):
            slower = replace(state, interval=state.interval + SLOW_DOWN_STEP)
            return slower, _next_wait(slower, now)
        case OAuthAnswer(error="access_denied"):
            return Denied("Access was denied in the browser. Start again if that was a mistake."), None
        case OAuthAnswer(error="expired_token"):
            return Expired("The code expired before it was approved. Start again to get a new code."), None
        case OAuthAnswer(error=error, description=description):
            return Failed(f"The relay refused the request ({error}): {description or 'no details'}. "
                          "Start again; if it keeps failing, check the relay's URL.", error), None
        case Unreachable(reason=reason):
            return Failed(f"The relay could not be reached before the code expired ({reason}). Check the relay "
                          "URL and the network, then start again.", "relay_unreachable"), None
    raise TypeError(f"not a poll answer: {answer!r}")


def _next_wait(state: Waiting, now: float) -> float:
    # Poll once more right at the deadline, so the relay's own `expired_token` ends the flow.
    return max(0.0, min(state.interval, state.deadline - now))


# --- talking to the relay ---------------------------------------------------------------------

class RelayClient:
    """RFC 8628 requests to an mbi-widgets relay, through requests-oauthlib for the token polls."""

    def __init__(self, relay_url: str, *, client_id: str = CLIENT_ID, timeout: float = 10.0,
                 session: requests.Session | None = None) -> None:
        self.relay_url = relay_url.strip().rstrip("/")  # a URL pasted into MBI_RELAY_URL may end in a newline
        self.client_id = client_id
        self.timeout = timeout
        self._session = session or requests.Session()

    def request_code(self, *, scope: str = "read_only", clock: Callable[[], float] = time.monotonic) -> Waiting:
        response, body = self._post("/device/code", {"client_id": self.client_id, "scope": scope},
                                    unreachable="{exc}. Check MBI_RELAY_URL and the network.")
        if response.status_code != 200 or "device_code" not in body:
            raise AuthError(f"The relay refused to start a device flow ({response.status_code}: {_said(body)}).",
                            code=body.get("error") or "relay_error")
        expires_in = float(body.get("expires_in", 600))
        return Waiting(user_code=body["user_code"], verification_uri=body["verification_uri"],
                       verification_uri_complete=body.get("verification_uri_complete"),
                       deadline=clock() + expires_in,
                       expires_at=datetime.now(timezone.utc) + timedelta(seconds=expires_in),
                       interval=float(body.get("interval", 5)), device_code=body["device_code"])

    def poll(self, device_code: str) -> PollAnswer:
        oauth = OAuth2Session(client=DeviceClient(self.client_id))
        oauth.register_compliance_hook("access_token_response", _raise_for_server_error)
        try:
            with transport_allowed(self.relay_url):
                token = oauth.fetch_token(f"{self.relay_url}/device/token", device_code=device_code,
                                          include_client_id=True, timeout=self.timeout)
        except OAuth2Error as exc:
            return OAuthAnswer(exc.error, exc.description)
        except (requests.RequestException, _ServerError, ValueError) as exc:
            return Unreachable(f"{type(exc).__name__}: {exc}"[:200])
        return TokenIssued(dict(token))

    def cancel(self, device_code: str, *, timeout: float = 5.0) -> None:
        """Tells the relay this code is abandoned: its link stops working and a late grant is revoked.

        Raises AuthError when the relay cannot be reached or refuses (the code then simply expires).
        """
        response, body = self._post("/device/cancel", {"client_id": self.client_id, "device_code": device_code},
                                    timeout=min(timeout, self.timeout),
                                    unreachable=" to cancel the code {exc}; it expires by itself.")
        if response.status_code != 200:
            raise AuthError(f"The relay did not cancel the code ({response.status_code}: {_said(body)}); it expires by "
                            "itself.", code=body.get("error") or "cancel_failed")

    def deauthorize(self, *, access_token: str, stripe_user_id: str) -> None:
        """Asks the relay to revoke the platform's access to `stripe_user_id` (for Delete)."""
        response, body = self._post("/oauth/deauthorize", {"stripe_user_id": stripe_user_id},
                                    headers={"Authorization": f"Bearer {access_token}"},
                                    unreachable=" to disconnect the account {exc}; nothing was deleted. Try again.")
        if response.status_code != 200:
            raise AuthError(f"The relay could not disconnect {stripe_user_id} ({response.status_code}: "
                            f"{_said(body)}); nothing was deleted.", code=body.get("error") or "deauthorize_failed")

    def _post(self, path: str, data: dict[str, str], *, unreachable: str, headers: dict[str, str] | None = None,
              timeout: float | None = None) -> tuple[requests.Response, dict[str, Any]]:
        """POSTs a form to the relay; the answer and its JSON object. `unreachable` completes "The relay at
        URL could not be reached" ({exc} stands for the error's type, in brackets)."""
        try:
            response = self._session.post(f"{self.relay_url}{path}", data=data, headers=headers,
                                          timeout=self.timeout if timeout is None else timeout)
        except requests.RequestException as exc:
            raise AuthError(f"The relay at {self.relay_url} could not be reached"
                            + unreachable.replace("{exc}", f"({type(exc).__name__})"),
                            code="relay_unreachable") from exc
        return response, json_object(response)


def _said(body: dict[str, Any]) -> str:
    """What an OAuth error answer says, for a message."""
    return body.get("error_description") or body.get("error") or "no details"


class _ServerError(Exception):
    pass


def _raise_for_server_error(response: requests.Response) -> requests.Response:
    if response.status_code >= 500:
        raise _ServerError(f"HTTP {response.status_code}")
    return response


def json_object(response: requests.Response) -> dict[str, Any]:
    """A response's JSON object, or {} when the body is not one (HTML error pages, empty bodies)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# --- the driver ---------------------------------------------------------------------------

class DeviceFlow:
    """Runs one device authorization in the background; observers see every state.

        flow = DeviceFlow(relay_url)
        waiting = flow.start()          # show waiting.link and waiting.user_code
        state = flow.wait()             # or observe(...) and keep the kernel free
    """

    def __init__(self, relay_url: str, *, client: RelayClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client or RelayClient(relay_url)
        self._clock = clock
        self._state: FlowState = Idle()
        self._observers: list[Callable[[FlowState], None]] = []
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancelled: threading.Thread | None = None  # the last call telling the relay of a cancel
        self._lock = threading.RLock()

    @property
    def state(self) -> FlowState:
        return self._state

    def observe(self, callback: Callable[[FlowState], None]) -> None:
        self._observers.append(callback)

    def _set(self, state: FlowState, cancel: threading.Event | None = None) -> None:
        # One lock over the check, the change and the notifications: a cancel() landing while the
        # polling thread steps is neither overwritten nor announced out of order.
        with self._lock:
            if cancel is not None and cancel.is_set():
                return
            self._state = state
            for callback in list(self._observers):
                callback(state)

    def start(self) -> FlowState:
        """Asks the relay for a code and starts polling; returns Waiting, or Failed when the relay is unreachable."""
        self.cancel()
        self._cancel, self._done = threading.Event(), threading.Event()
        try:
            self._check_transport()
            waiting = self.client.request_code(clock=self._clock)
        except AuthError as exc:
            self._set(Failed(str(exc), exc.code or "relay_error"))
            self._done.set()
            return self._state
        self._set(waiting)
        self._thread = threading.Thread(target=self._run, args=(waiting, self._cancel, self._done),
                                        name="mbi-device-flow", daemon=True)
        self._thread.start()
        return waiting

    def _check_transport(self) -> None:
        """Refuses, before anything is sent, a relay URL the token polls would be refused for later."""
        url = getattr(self.client, "relay_url", None)
        reason = insecure_transport_reason(url) if isinstance(url, str) else None
        if reason is not None:
            raise AuthError(f"The relay URL {url} cannot be used: {reason}.", code="insecure_transport")

    def _run(self, state: Waiting, cancel: threading.Event, done: threading.Event) -> None:
        try:
            wait: float | None = state.interval
            current: FlowState = state
            while isinstance(current, Waiting) and wait is not None:
                if cancel.wait(wait):
                    return
                answer = self.client.poll(current.device_code)
                if cancel.is_set():
                    return
                current, wait = step(current, answer, self._clock())
                if current != self._state:
                    self._set(current, cancel)
        except Exception as exc:  # whatever it is, the flow ends Failed: never Waiting forever on a dead thread
            log.warning("the device flow's polling stopped", exc_info=True)
            code = exc.code if isinstance(exc, MbiError) and exc.code else "internal_error"
            detail = redact_text(str(exc)) or type(exc).__name__
            self._set(Failed(f"Checking for approval stopped ({detail}). Start again; if it keeps failing, check "
                             "the relay URL and report the problem.", code), cancel)
        finally:
            done.set()

    def cancel(self) -> None:
        """Stops polling at once; the flow goes back to Idle, and the relay is told the code is abandoned.

        Telling the relay is best effort, on a background thread (the caller, a button click, never
        waits on the network): the code's link then says the sign-in was cancelled, and a Stripe
        grant that still arrives for it is revoked. If the relay cannot be told, the code expires.
        """
        with self._lock:
            self._cancel.set()
            abandoned = self._state if isinstance(self._state, Waiting) else None
            if abandoned is not None:
                self._set(Idle())
        self._done.set()
        if abandoned is not None:
            self._cancelled = threading.Thread(target=self._tell_relay_cancelled, args=(abandoned.device_code,),
                                               name="mbi-device-cancel", daemon=True)
            self._cancelled.start()

    def _tell_relay_cancelled(self, device_code: str) -> None:
        cancel = getattr(self.client, "cancel", None)  # a client without it (an older or scripted one): nothing to tell
        if cancel is None:
            return
        try:
            cancel(device_code)
        except Exception as exc:  # best effort: the code expires at the relay anyway
            log.warning("the relay was not told that the sign-in was cancelled (%s)", getattr(exc, "code", None)
                        or type(exc).__name__)

    def wait(self, timeout: float | None = None) -> FlowState:
        """Blocks until the flow ends (or `timeout`), and returns the state then."""
        self._done.wait(timeout)
        return self._state


# --- the alternative: a restricted API key -----------------------------------------------------

@dataclass(frozen=True)
class KeyCheck:
    """A validated key: which account it reads and any warning to show."""

    account_id: str
    account_name: str
    livemode: bool
    auth_method: str
    warning: str | None = None


#: A key check is interactive (a click in the panel): (connect, read) seconds per attempt, two attempts at
#: The account id of a restricted key that may read neither the account nor name it in its refusal.
UNKNOWN_ACCOUNT = "unknown"
#: most, instead of stripe-python's 80 s read timeout.
KEY_CHECK_TIMEOUT = (5.0, 15.0)


def validate_key(api_key: str, *, api_base: str | None = None,
                 timeout: float | tuple[float, float] = KEY_CHECK_TIMEOUT, warn: bool = True) -> KeyCheck:
    """Checks a pasted key by calling the API; raises AuthError saying what to create instead.

    A full secret key is accepted with `KeyCheck.warning`, also issued as a Python warning unless
    `warn` is False (the panel shows it itself, and a warning would land in JupyterLab's log console).
    """
    _refuse_malformed(api_key)
    key = api_key.strip()  # whitespace pasted around the key is forgiven; inside it is refused below
    if key.startswith("pk_"):
        raise AuthError("That is a publishable key (pk_...), which cannot read data. In the Stripe dashboard open "
                        "Developers > API keys > Create restricted key, give it Read access to Customers, Charges, "
                        "Coupons, Invoices, Plans/Prices, Subscriptions and Events, and paste the rk_... key.",
                        code="publishable_key")
    if not key.startswith(("rk_", "sk_")):
        raise AuthError("That does not look like a Stripe API key: paste a restricted key (rk_live_... or "
                        "rk_test_...).", code="invalid_key")
    account_id, name = account_of(key, api_base=api_base, timeout=timeout)
    warning = None
    method = "restricted_key"
    if key.startswith("sk_"):
        method = "secret_key"
        warning = ("This is a full secret key: it can also move money. Prefer a restricted key with read-only "
                   "access (Developers > API keys > Create restricted key).")
        if warn:
            warnings.warn(warning, stacklevel=2)
    elif name is None:  # a restricted key that may not read the account: name it after what it reads
        access = table_access(key, api_base=api_base, timeout=timeout)
        name = access.name(account_id)
        warning = access.warning()
    return KeyCheck(account_id, name, "_live_" in key, method, warning)


#: Where Stripe names the account in a restricted key's permission error ("... on account 'acct_...'").
_ACCOUNT_IN_MESSAGE = re.compile(r"on account '(acct_[A-Za-z0-9]+)'")
_PERMISSION_IN_MESSAGE = re.compile(r"'(rak_[a-z_]+)'")
#: The list call that proves read access to each expected table (MBI's order).
_TABLE_PROBES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Customers", "customers", {}), ("Charges", "charges", {}), ("Coupons", "coupons", {}),
    ("Invoices", "invoices", {}), ("Plans", "plans", {}), ("Subscriptions", "subscriptions", {"status": "all"}),
    ("Events", "events", {}))


@dataclass(frozen=True)
class TableAccess:
    """Which expected tables a credential may read, and the permission each refused one lacks."""

    readable: tuple[str, ...]
    refused: dict[str, str]  # table title -> the permission Stripe names (or its message)

    @property
    def complete(self) -> bool:
        return not self.refused

    def name(self, account_id: str) -> str:
        """A connection name for a key that may not read the account's details: its account, and what it reads."""
        what = "all tables" if self.complete else ", ".join(self.readable)
        who = account_id if account_id != UNKNOWN_ACCOUNT else "Stripe account"
        return f"{who} · {what}"

    def warning(self) -> str:
        text = "This key may not read the account's details, so the connection is named after what it reads."
        if self.refused:
            missing = ", ".join(self.refused)
            permissions = sorted({p for p in self.refused.values() if p.startswith("rak_")})
            text += (f" It cannot read {missing}: previews and syncs of those fail until the key gets Read access"
                     + (f" ({', '.join(permissions)})." if permissions else "."))
        return text


def table_access(key: str, *, api_base: str | None = None, client: stripe.StripeClient | None = None,
                 timeout: float | tuple[float, float] = KEY_CHECK_TIMEOUT) -> TableAccess:
    """Probes each expected table with one `limit=1` list call (in parallel). Raises AuthError when the
    credential is rejected outright or Stripe cannot be reached."""
    from concurrent.futures import ThreadPoolExecutor

    client = client or stripe.StripeClient(key, base_addresses={"api": api_base} if api_base else None,
                                           max_network_retries=1, http_client=stripe.RequestsClient(timeout=timeout))

    def probe(item: tuple[str, str, dict[str, Any]]) -> str | None:
        title, service, params = item
        try:
            getattr(client.v1, service).list({"limit": 1, **params})
        except stripe.PermissionError as exc:
            found = _PERMISSION_IN_MESSAGE.search(exc.user_message or str(exc))
            return found.group(1) if found else "read access"
        except stripe.StripeError as exc:
            raise _key_error(key, exc, timeout) from exc
        return None

    with ThreadPoolExecutor(max_workers=len(_TABLE_PROBES), thread_name_prefix="mbi-key-check") as pool:
        results = list(pool.map(probe, _TABLE_PROBES))
    readable = tuple(title for (title, _, _), refused in zip(_TABLE_PROBES, results) if refused is None)
    refused = {title: why for (title, _, _), why in zip(_TABLE_PROBES, results) if why is not None}
    return TableAccess(readable, refused)


def account_of(key: str, *, api_base: str | None = None,
               timeout: float | tuple[float, float] = KEY_CHECK_TIMEOUT) -> tuple[str, str | None]:
    """(account id, display name) of the account a key or OAuth token reads; raises AuthError.

    A restricted key that may not read the account gets the id Stripe names in its refusal (or
    `UNKNOWN_ACCOUNT`) and no name: `validate_key` names it after the tables it reads.

    Each attempt waits `timeout` (seconds, or (connect, read)); a failed one is retried once.
    """
    _refuse_malformed(key)
    client = stripe.StripeClient(key, base_addresses={"api": api_base} if api_base else None, max_network_retries=1,
                                 http_client=stripe.RequestsClient(timeout=timeout))
    try:
        account = client.v1.accounts.retrieve_current()
    except stripe.PermissionError as denied:
        # A restricted key without account access can still read the tables. Stripe names the account in
        # its refusal; the name is left to the caller (None), who knows what the key reads.
        access = table_access(key, client=client, timeout=timeout)
        if not access.readable:
            raise AuthError(f"The key {redact(key)} may read neither the account nor any of the expected tables "
                            f"({_stripe_words(denied, key)}). In the Stripe dashboard give the restricted key Read "
                            "access to Customers, Charges, Coupons, Invoices, Plans/Prices, Subscriptions and Events "
                            f"({', '.join(sorted(set(access.refused.values())))}), then paste it again.",
                            code="key_refused") from denied
        found = _ACCOUNT_IN_MESSAGE.search(denied.user_message or str(denied))
        return (found.group(1) if found else UNKNOWN_ACCOUNT), None
    except stripe.StripeError as exc:
        raise _key_error(key, exc, timeout) from exc
    except UnicodeDecodeError as exc:  # stripe-python decodes every body to log it: bytes that are not text fail
        raise AuthError("The key could not be checked: the server answered bytes that are not text. Check the API "
                        "address (a proxy in between?) and try again.", code="bad_answer") from exc
    account_id = getattr(account, "id", None)
    if not isinstance(account_id, str) or not account_id:
        raise AuthError(f"The server at {api_base or 'api.stripe.com'} answered the key check with something that is "
                        "not a Stripe account (no account id). Check the API address (a proxy in between?) and try "
                        "again.", code="bad_answer")
    return account_id, _account_name(account)


def _refuse_malformed(key: object) -> None:
    """Refuses, before any request, what cannot be a key (sending a line break would inject a header)."""
    if not isinstance(key, str):
        raise AuthError(f"The key must be text (an rk_... restricted key), not {type(key).__name__}.",
                        code="invalid_key")
    inner = key.strip()
    if not inner.isascii() or not inner.isprintable() or any(c.isspace() for c in inner):
        raise AuthError("The key contains spaces, line breaks or other characters Stripe keys never have: copy it "
                        "again from the Stripe dashboard, without the surrounding text.", code="invalid_key")


def _account_name(account: Any) -> str:
    profile = getattr(account, "business_profile", None)
    settings = getattr(account, "settings", None)
    dashboard = getattr(settings, "dashboard", None) if settings else None
    names = (getattr(profile, "name", None), getattr(dashboard, "display_name", None), getattr(account, "email", None))
    return next((name for name in names if isinstance(name, str) and name), account.id)


def _key_error(key: str, exc: stripe.StripeError,
               timeout: float | tuple[float, float] = KEY_CHECK_TIMEOUT) -> AuthError:
    if isinstance(exc, stripe.AuthenticationError):
        return AuthError(f"Stripe rejected the key {redact(key)}: it is mistyped, deleted or expired. Create a new "
                         "restricted key and paste it again.", code="invalid_key")
    if isinstance(exc, stripe.APIConnectionError):
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        why = (f"no connection within {connect:g} s" if isinstance(exc.__cause__, requests.ConnectTimeout)
               else f"no answer within {read:g} s" if isinstance(exc.__cause__, requests.ReadTimeout)
               else "no connection")
        return AuthError(f"Stripe could not be reached to check the key ({why}). Check the network and try again.",
                         code="unreachable")
    status = exc.http_status or 0
    # Whether the body held Stripe's error object (stripe-python puts the headers in json_body when it did not parse).
    stripe_error = isinstance(exc.json_body, dict) and isinstance(exc.json_body.get("error"), dict)
    if status and not stripe_error:  # stripe-python's own message quotes the whole body: not shown
        return AuthError(f"The key could not be checked: the server answered HTTP {status} with "
                         f"{_answer_kind(exc.http_body)}. Try again in a minute; if it persists, check the API "
                         "address.", code="bad_answer")
    if status >= 500:
        return AuthError(f"Stripe could not check the key just now (HTTP {status}). Try again in a minute.",
                         code="unavailable")
    message = exc.user_message if isinstance(exc.user_message, str) and exc.user_message else f"HTTP {status}"
    return AuthError(f"Stripe refused the key {redact(key)}: {message.replace(key, redact(key))}", code="key_refused")


def _stripe_words(exc: stripe.StripeError, key: str) -> str:
    """Stripe's message about an error, with the key masked should the server echo it."""
    text = exc.user_message if isinstance(exc.user_message, str) and exc.user_message else type(exc).__name__
    return text.replace(key, redact(key))


def _answer_kind(body: object) -> str:
    """What an answer without Stripe's error object was, in a few words (never quoted)."""
    text = body.strip() if isinstance(body, str) else ""
    if not text:
        return "an empty answer"
    if text.startswith("<"):
        return "an HTML page, not JSON (a proxy or an outage page?)"
    try:
        json.loads(text)
    except ValueError:
        return "an answer that is not JSON (cut off?)"
    return "JSON without Stripe's `error` object"

