"""Small OAuth helpers shared by the relay and the notebook client (no printing, no disk)."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from typing import Iterator
from urllib.parse import urlsplit

from mbi_widgets.errors import MbiError

_INSECURE_ENV = "OAUTHLIB_INSECURE_TRANSPORT"
_env_lock = threading.Lock()
_users = 0
_previous: str | None = None


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_transport_reason(url: str) -> str | None:
    """Why OAuth secrets must not travel to `url`; None for https, and for plain http to loopback.

    `transport_allowed` and the device flow's up-front check both ask this, so a URL accepted
    when a flow starts is never refused by the transport later (`http://127.1` is refused by both:
    loopback must be written as localhost, 127.0.0.1 or [::1]).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return None
    if scheme == "http" and is_loopback(url):
        return None
    if scheme != "http":
        return f"{url!r} is not an https URL: use the relay's https address"
    return (f"refusing to send OAuth secrets over plain http to {parts.hostname or url}: use an https URL (plain "
            "http is only allowed on loopback, written as localhost, 127.0.0.1 or [::1])")


@contextlib.contextmanager
def transport_allowed(url: str) -> Iterator[None]:
    """Lets oauthlib talk plain http to loopback (the sandbox), and nowhere else.

    oauthlib refuses non-https token URLs unless OAUTHLIB_INSECURE_TRANSPORT is set for the
    whole process; we set it only while calls to loopback addresses are under way (counted, so
    concurrent calls neither wait for each other nor unset it early) and restore it after.
    """
    global _users, _previous
    reason = insecure_transport_reason(url)
    if reason is not None:
        raise MbiError(reason, code="insecure_transport")
    if urlsplit(url).scheme.lower() == "https":
        yield
        return
    with _env_lock:
        if _users == 0:
            _previous = os.environ.get(_INSECURE_ENV)
            os.environ[_INSECURE_ENV] = "1"
        _users += 1
    try:
        yield
    finally:
        with _env_lock:
            _users -= 1
            if _users == 0:
                if _previous is None:
                    os.environ.pop(_INSECURE_ENV, None)
                else:
                    os.environ[_INSECURE_ENV] = _previous
