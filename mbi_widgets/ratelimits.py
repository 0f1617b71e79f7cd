"""Stripe's rate limits as data, and the token bucket that both enforces them (sandbox) and paces to them (client)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping


#: The one endpoint Stripe's search endpoints (`/v1/charges/search`, `/v1/invoices/search`, ...) count
#: as: they share a single limit, on top of counting against the account's.
SEARCH_ENDPOINT = "search"


@dataclass(frozen=True)
class RateLimits:
    """Requests per second allowed per account, per endpoint, and for all search endpoints together.

    Stripe's documented defaults: 25/s per account in test mode, 100/s in live mode, 25/s per
    endpoint in both, and 20/s shared by the Search API's endpoints in both (each search request
    also counts against the account's limit).
    """

    per_account: float = 25.0
    per_endpoint: float = 25.0
    per_search: float = 20.0

    def __post_init__(self) -> None:
        if self.per_account <= 0 or self.per_endpoint <= 0 or self.per_search <= 0:
            raise ValueError("rate limits are positive requests per second")

    def for_endpoint(self, endpoint: str) -> float:
        """The limit of one endpoint's own bucket (`SEARCH_ENDPOINT` for every search endpoint)."""
        return self.per_search if endpoint == SEARCH_ENDPOINT else self.per_endpoint

    @classmethod
    def test_mode(cls) -> "RateLimits":
        return cls(per_account=25, per_endpoint=25)

    @classmethod
    def live_mode(cls) -> "RateLimits":
        return cls(per_account=100, per_endpoint=25)

    @classmethod
    def for_key(cls, key: str | None) -> "RateLimits":
        """Stripe's defaults for the mode a key belongs to (`sk_live_`, `rk_live_` are live)."""
        return cls.live_mode() if key and "_live_" in key else cls.test_mode()

    @classmethod
    def coerce(cls, value: "RateLimits | Mapping[str, float] | str | None") -> "RateLimits | None":
        if value is None or isinstance(value, RateLimits):
            return value
        if value == "test":
            return cls.test_mode()
        if value == "live":
            return cls.live_mode()
        if isinstance(value, Mapping):
            return cls(**value)
        raise ValueError(f"rate limits must be None, 'test', 'live', a RateLimits or a dict, not {value!r}")


class TokenBucket:
    """Refills at `rate` tokens per second up to `capacity`; not thread-safe on its own."""

    def __init__(self, rate: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = rate if capacity is None else capacity
        self._tokens = self.capacity
        self._last = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self, now: float | None = None) -> float:
        """Seconds until a token is available (0 when one is)."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self, now: float | None = None) -> bool:
        """Takes a token if one is available."""
        if self.wait_time(now) > 0:
            return False
        self._tokens -= 1
        return True
