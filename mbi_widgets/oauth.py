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


@contextlib.contextmanager
def transport_allowed(url: str) -> Iterator[None]:
    """Lets oauthlib talk plain http to loopback (the sandbox), and nowhere else.

    oauthlib refuses non-https token URLs unless OAUTHLIB_INSECURE_TRANSPORT is set for the
    whole process; we set it only while calls to loopback addresses are under way (counted, so
    concurrent calls neither wait for each other nor unset it early) and restore it after.
    """
    global _users, _previous
    if url.lower().startswith("https://"):
        yield
        return
    if not is_loopback(url):
        raise MbiError(f"refusing to send OAuth secrets over plain http to {urlsplit(url).netloc}: "
                       "use an https URL (plain http is only allowed on loopback)", code="insecure_transport")
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
