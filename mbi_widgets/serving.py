"""Serving an ASGI app with uvicorn on a background thread bound to loopback (sandbox, relay, tests)."""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from mbi_widgets.errors import MbiError
from mbi_widgets.logfilters import install_log_redaction

log = logging.getLogger(__name__)


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready socket; port 0 picks a free one. Raises MbiError saying what to do when taken."""
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose protocol says TCP,
    # and with Nagle on, small keep-alive answers wait ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MbiError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another port, or 0 for a free one",
                       code="port_unavailable") from exc
    return sock


async def client_went_away(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for `ClientDisconnect`: a client hanging up before its request body is in
    is routine, not a server fault, so it is one DEBUG line rather than an ERROR traceback. Register it in every
    app that reads bodies: `exception_handlers={ClientDisconnect: client_went_away, ...}`."""
    client = request.client.host if request.client else "a client"
    # The path only: a query may carry an OAuth code or state.
    log.debug("%s went away before sending the whole request (%s %s); nothing to answer",
              client, request.method, request.url.path)
    return Response(status_code=400)  # never delivered (the connection is gone); uvicorn drops it quietly


class BackgroundServer:
    """Runs `app` (or `make_app(base_url)`, for apps that must know their own URL) until stop()."""

    def __init__(self, app: Any = None, *, make_app: Callable[[str], Any] | None = None,
                 host: str = "127.0.0.1", port: int = 0, name: str = "mbi-server", date_header: bool = True,
                 access_log: bool = False) -> None:
        if (app is None) == (make_app is None):
            raise ValueError("give either app or make_app")
        self._app, self._make_app, self.host, self.port, self.name = app, make_app, host, port, name
        #: False when the app sets `Date` itself (the sandbox answers with its simulated clock).
        self.date_header = date_header
        #: True logs every request on `uvicorn.access` at INFO, with secret query values redacted.
        self.access_log = access_log
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self) -> "BackgroundServer":
        sock = bind(self.host, self.port)
        url = f"http://{self.host}:{sock.getsockname()[1]}"
        app = self._app if self._app is not None else self._make_app(url)  # type: ignore[misc]
        config = uvicorn.Config(app, log_level="warning", access_log=self.access_log, lifespan="off",
                                http="httptools", loop="asyncio", timeout_graceful_shutdown=2, server_header=False,
                                date_header=self.date_header, proxy_headers=False)  # client = the peer, always
        install_log_redaction()  # after uvicorn's logging setup, which may have created its loggers
        if self.access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"{self.name}-{sock.getsockname()[1]}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise MbiError(f"the {self.name} did not start; see the log above for the cause", code="not_started")
            time.sleep(0.01)
        self.url = url
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server, self._thread, self.url = None, None, None
