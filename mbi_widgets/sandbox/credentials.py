"""Who may call the sandbox: secret keys, restricted keys, OAuth tokens and connected accounts.

Keys are random per sandbox run, never derived from the seed, so they are never worth saving.
"""
from __future__ import annotations

import base64
import secrets
import threading
from dataclasses import dataclass, field


#: Resources a key can be granted read access to (Stripe groups them the same way).
RESOURCES = frozenset({"customers", "charges", "coupons", "invoices", "plans", "prices", "products",
                       "subscriptions", "refunds", "events", "account"})


def _token(prefix: str, length: int = 32) -> str:
    return prefix + secrets.token_urlsafe(length).replace("-", "x").replace("_", "y")[:length]


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity behind a key: whose data it reads by default and what it may do."""

    key: str
    kind: str  # "secret", "restricted" or "oauth"
    account_id: str
    #: Readable resources, or None for every resource.
    permissions: frozenset[str] | None = None
    #: A platform key may act on its connected accounts with the Stripe-Account header.
    platform: bool = False
    client_id: str | None = None
    grant_code: str | None = None

    def can_read(self, resource: str) -> bool:
        return self.permissions is None or resource in self.permissions

    def permission_name(self, resource: str) -> str:
        return f"rak_{resource.rstrip('s')}_read"


@dataclass
class SandboxAccount:
    """A seeded Stripe account an admin can sign in as on the sandbox's Connect page."""

    id: str
    business_name: str
    email: str
    password: str = field(repr=False)
    country: str
    currency: str
    domain: str

    def public(self) -> dict[str, str]:
        return {"id": self.id, "business_name": self.business_name, "email": self.email,
                "password": self.password, "country": self.country, "currency": self.currency}


class Credentials:
    """The sandbox's key registry; safe to use from the server thread and from Python."""

    def __init__(self, platform_id: str) -> None:
        self.platform_id = platform_id
        self._keys: dict[str, Principal] = {}
        self._refresh: dict[str, Principal] = {}
        #: Accounts connected to the platform (seeded ones start connected, as Connect accounts do).
        self.connected: set[str] = set()
        self._lock = threading.Lock()

    def _add(self, principal: Principal) -> str:
        with self._lock:
            self._keys[principal.key] = principal
        return principal.key

    def lookup(self, key: str) -> Principal | None:
        return self._keys.get(key)

    def issue_secret(self, account_id: str, *, platform: bool = False) -> str:
        return self._add(Principal(_token("sk_test_", 40), "secret", account_id, platform=platform))

    def issue_restricted(self, account_id: str, resources: set[str] | frozenset[str] | None = None) -> str:
        granted = RESOURCES if resources is None else frozenset(resources)
        unknown = granted - RESOURCES
        if unknown:
            raise ValueError(f"unknown resources {sorted(unknown)}; choose from {sorted(RESOURCES)}")
        return self._add(Principal(_token("rk_test_", 40), "restricted", account_id, granted))

    def issue_oauth(self, account_id: str, client_id: str, grant_code: str | None) -> tuple[str, str]:
        """A read-only access token and its refresh token for a connected account."""
        access = Principal(_token("sk_test_", 40), "oauth", account_id, RESOURCES, client_id=client_id,
                           grant_code=grant_code)
        refresh = _token("rt_", 40)
        with self._lock:
            self._keys[access.key] = access
            self._refresh[refresh] = access
            self.connected.add(account_id)
        return access.key, refresh

    def refresh(self, refresh_token: str, client_id: str) -> tuple[Principal, str] | None:
        """A new access token for a refresh token, or None when it is unknown or revoked."""
        with self._lock:
            original = self._refresh.get(refresh_token)
            if original is None or original.client_id != client_id:
                return None
            access = Principal(_token("sk_test_", 40), "oauth", original.account_id, RESOURCES,
                               client_id=client_id, grant_code=original.grant_code)
            self._keys[access.key] = access
            return access, refresh_token

    def revoke(self, *, account_id: str | None = None, client_id: str | None = None,
               grant_code: str | None = None) -> int:
        """Revokes OAuth tokens matching every given criterion; returns how many went."""
        def matches(p: Principal) -> bool:
            return (p.kind == "oauth" and (account_id is None or p.account_id == account_id)
                    and (client_id is None or p.client_id == client_id)
                    and (grant_code is None or p.grant_code == grant_code))

        with self._lock:
            keys = [k for k, p in self._keys.items() if matches(p)]
            for key in keys:
                del self._keys[key]
            for token in [t for t, p in self._refresh.items() if matches(p)]:
                del self._refresh[token]
            if account_id is not None and grant_code is None:
                self.connected.discard(account_id)
        return len(keys)


def bearer_key(header: str | None) -> str | None:
    """The API key in an Authorization header, Bearer or Basic (`curl -u sk_...:`)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None
