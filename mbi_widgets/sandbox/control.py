"""Knobs for realism: Stripe's rate limits, per-request latency and faults injected on demand."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from email.utils import formatdate
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping

import orjson

from mbi_widgets.ratelimits import RateLimits, TokenBucket

FAULT_KINDS = frozenset({"429", "500", "502", "503", "drop", "slow"})


@dataclass
class Faults:
    """Faults to inject: a random share of requests (`rate`), or chosen request numbers (`on`).

    Kinds: "500", "502", "503" (Stripe-shaped server errors), "429" (Stripe's rate-limit answer,
    as if a limit had been hit), "drop" (the connection closes halfway through the response body)
    and "slow" (the answer waits `slow_ms`). Requests are
    numbered from 1 among those whose path starts with one of `paths`.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("500", "drop")
    on: Mapping[int, str] = field(default_factory=dict)
    slow_ms: int = 1_500
    seed: int = 0
    paths: tuple[str, ...] = ("/v1/",)

    def __post_init__(self) -> None:
        bad = (set(self.kinds) | set(self.on.values())) - FAULT_KINDS
        if bad:
            raise ValueError(f"unknown fault kinds {sorted(bad)}; use {sorted(FAULT_KINDS)}")
        if not 0 <= self.rate <= 1:
            raise ValueError("Faults.rate is a probability between 0 and 1")


class RateLimiter:
    """Stripe's limits on the server side: one bucket per account and one per (account, endpoint)."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._buckets: dict[tuple[str, str | None], TokenBucket] = {}

    def _bucket(self, account: str, endpoint: str | None) -> TokenBucket:
        key = (account, endpoint)
        bucket = self._buckets.get(key)
        if bucket is None:
            rate = self.limits.per_account if endpoint is None else self.limits.for_endpoint(endpoint)
            bucket = self._buckets[key] = TokenBucket(rate)
        return bucket

    def check(self, account: str, endpoint: str) -> str | None:
        """None when the request may go ahead, else Stripe's `Stripe-Rate-Limited-Reason`."""
        now = time.monotonic()
        endpoint_bucket, account_bucket = self._bucket(account, endpoint), self._bucket(account, None)
        if endpoint_bucket.wait_time(now) > 0:
            return "endpoint-rate"
        if not account_bucket.take(now):
            return "global-rate"
        endpoint_bucket.take(now)
        return None


class FaultPlan:
    """Decides, request by request, which fault (if any) to inject."""

    def __init__(self, faults: Faults | None) -> None:
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._count = 0
        self._queued: deque[tuple[str, str | None]] = deque()
        self._lock = threading.Lock()

    def inject(self, kind: str, count: int = 1, path: str | None = None) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use {sorted(FAULT_KINDS)}")
        with self._lock:
            self._queued.extend([(kind, path)] * count)

    def next_fault(self, path: str) -> str | None:
        if not path.startswith(self.faults.paths):
            return None
        with self._lock:
            self._count += 1
            for index, (kind, prefix) in enumerate(self._queued):
                if prefix is None or path.startswith(prefix):
                    del self._queued[index]
                    return kind
            if self._count in self.faults.on:
                return self.faults.on[self._count]
            if self.faults.rate and self._rng.random() < self.faults.rate:
                return self._rng.choice(self.faults.kinds)
        return None


class DroppedConnection(Exception):
    """Raised inside the server to cut a response short; the server then closes the socket."""


_SERVER_ERRORS = {
    "429": (429, "Request rate limit exceeded. You can learn more about rate limits here "
                 "https://stripe.com/docs/rate-limits. (Injected by the mbi-widgets sandbox.)"),
    "500": (500, "An unknown error occurred. (Injected by the mbi-widgets sandbox.)"),
    "502": (502, "Bad gateway. (Injected by the mbi-widgets sandbox.)"),
    "503": (503, "The service is temporarily unavailable. (Injected by the mbi-widgets sandbox.)"),
}

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class ControlMiddleware:
    """ASGI middleware applying latency and faults before the app sees a request."""

    def __init__(self, app: ASGIApp, *, latency_ms: float, faults: FaultPlan,
                 clock: Callable[[], int] | None = None) -> None:
        self.app, self.latency_ms, self.faults, self.clock = app, latency_ms, faults, clock

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.clock is not None:
            send = _dated(send, self.clock)
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        fault = self.faults.next_fault(scope["path"])
        if fault == "slow":
            await asyncio.sleep(self.faults.faults.slow_ms / 1000)
        elif fault in _SERVER_ERRORS:
            status, message = _SERVER_ERRORS[fault]
            error = ({"type": "invalid_request_error", "code": "rate_limit", "message": message} if status == 429
                     else {"type": "api_error", "message": message})
            body = orjson.dumps({"error": error})
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        elif fault == "drop":
            await self.app(scope, receive, _truncating(send))
            return
        await self.app(scope, receive, send)


def _dated(send: Callable, clock: Callable[[], int]) -> Callable:
    """Answers carry the sandbox clock in `Date`, as Stripe's carry its own time."""
    async def send_dated(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"date"]
            headers.append((b"date", formatdate(clock(), usegmt=True).encode()))
            message = {**message, "headers": headers}
        await send(message)

    return send_dated


def _truncating(send: Callable) -> Callable:
    async def send_half(message: dict) -> None:
        if message["type"] == "http.response.body":
            body = message.get("body", b"")
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise DroppedConnection("connection dropped mid-response by the sandbox's fault injection")
        await send(message)

    return send_half
