"""A lean, thread-shared stripe-python HTTP client over urllib3's connection pools, for fetching pages fast.

stripe-python's `RequestsClient` goes through requests, which on every call looks the proxies and CA
bundle up in the environment again, copies header dicts and reads a body in 10 KB chunks: for a
page of 100 events, 1.1 ms of CPU against urllib3's 0.3 ms on one thread, and 1.4 ms more per page
with 32 threads sharing the GIL (4.4 against 3.0 ms, JSON parsing included), at 100 pages/s a
seventh of a core. `PooledHTTPClient` asks urllib3 directly and decides everything else once, when it is
built: the proxies (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY, as requests reads them), the CA
bundle (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, CURL_CA_BUNDLE, else certifi's) and the timeouts.

It never retries (stripe-python's `max_network_retries` and our `Fetcher` do) and never follows
a redirect (Stripe's API does not redirect; a 3xx is returned as the answer it is). Failures are
`stripe.APIConnectionError`s chained to urllib3's exception (`raise ... from exc`), with
`should_retry` set as `RequestsClient` sets it.
"""
from __future__ import annotations

import ipaddress
import os
import textwrap
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

import certifi
import stripe
import urllib3
from urllib3.exceptions import (
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    SSLError,
    TimeoutError as Urllib3Timeout,
)

from mbi_widgets.redaction import redact_text

#: Connections kept open per host: enough for every worker thread of a few loads at once.
DEFAULT_MAXSIZE = 64
#: Seconds to connect and to wait for an answer, unless given (the same as `Timeouts`' defaults).
DEFAULT_TIMEOUT = (5.0, 30.0)
#: What requests asks for by default, unless stripe-python's headers say otherwise; urllib3 decodes it
#: (a page of 100 events gzips 14-fold, 362 KB to 25 KB, and decodes in 0.2 ms).
ACCEPT_ENCODING = "gzip, deflate"
#: CA bundle variables, in the order they are honoured (requests reads the first and the last).
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")

#: Never retry inside urllib3, on errors or answers (a 503 with Retry-After included), nor follow redirects.
_NO_RETRIES = urllib3.Retry(total=False, redirect=False, raise_on_redirect=False)


@dataclass(frozen=True)
class ProxyRoutes:
    """Which proxy each address goes through: a snapshot of the proxy settings taken once.

    `proxies` maps a scheme (`http`, `https`, `all`) to a proxy URL; `no_proxy` is NO_PROXY as
    written (host names, domain suffixes, IP addresses or networks such as 10.0.0.0/8, `*`).
    """

    proxies: Mapping[str, str] = field(default_factory=dict)
    no_proxy: str = ""

    @classmethod
    def from_environment(cls) -> "ProxyRoutes":
        """The proxies requests would use now: the environment's, else the system's (macOS, Windows)."""
        found = urllib.request.getproxies()
        no_proxy = found.pop("no", "")
        proxies = {scheme: _with_scheme(url) for scheme, url in found.items() if scheme in ("http", "https", "all")}
        return cls(proxies, no_proxy)

    def proxy_for(self, scheme: str, host: str, port: int | None) -> str | None:
        """The proxy URL for an address, or None to connect directly."""
        proxy = self.proxies.get(scheme) or self.proxies.get("all")
        if proxy is None or self.bypassed(host, port):
            return None
        return proxy

    def bypassed(self, host: str, port: int | None) -> bool:
        """Whether NO_PROXY names the host (by name, domain suffix, address or network)."""
        if not self.no_proxy:
            return False
        if self.no_proxy.strip() == "*":
            return True
        address = f"{host}:{port}" if port else host
        if urllib.request.proxy_bypass_environment(address, {"no": self.no_proxy}):
            return True
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        for entry in self.no_proxy.split(","):
            try:
                if ip in ipaddress.ip_network(entry.strip(), strict=False):
                    return True
            except ValueError:
                continue
        return False

    def __repr__(self) -> str:
        shown = {scheme: _without_credentials(url) for scheme, url in self.proxies.items()}
        return f"ProxyRoutes({shown}, no_proxy={self.no_proxy!r})"


def ca_bundle_from_environment() -> str:
    """The CA bundle (a file or a folder) requests-style tools would verify with: the environment's, else certifi's."""
    for name in CA_BUNDLE_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return certifi.where()


class PooledHTTPClient(stripe.HTTPClient):
    """stripe-python's HTTP client over urllib3's pools: one instance serves every worker thread.

    `timeout` is seconds or (connect, read), as requests takes it; `maxsize` is how many
    connections each host keeps open (more threads than that still get connections, which are
    closed after use). `proxy` (a URL, or {"http": ..., "https": ...}) overrides the environment's
    proxies; `ca_bundle` its CA bundle. TLS is always verified. `close()` closes every connection;
    the client stays usable and reconnects on the next request.
    """

    name = "urllib3"

    def __init__(self, timeout: float | tuple[float, float] = DEFAULT_TIMEOUT, *, maxsize: int = DEFAULT_MAXSIZE,
                 proxy: str | Mapping[str, str] | None = None, ca_bundle: str | None = None,
                 compress: bool = True) -> None:
        super().__init__(verify_ssl_certs=True, proxy=dict(proxy) if isinstance(proxy, Mapping) else proxy)
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize is a number of connections >= 1, not {maxsize!r}")
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        self._timeout = (connect, read)  # the attribute's name in stripe-python's own clients
        self.maxsize = maxsize
        self.routes = ProxyRoutes.from_environment() if proxy is None else _explicit_routes(self._proxy)
        self.ca_bundle = ca_bundle or ca_bundle_from_environment()
        self._accept_encoding = ACCEPT_ENCODING if compress else None
        verify = {"ca_cert_dir" if os.path.isdir(self.ca_bundle) else "ca_certs": self.ca_bundle}
        self._pool_options: dict[str, Any] = dict(maxsize=maxsize, block=False, cert_reqs="CERT_REQUIRED",
                                                  timeout=urllib3.Timeout(connect=connect, read=read),
                                                  retries=_NO_RETRIES, **verify)
        self._direct = urllib3.PoolManager(**self._pool_options)
        self._proxied = {url: self._proxy_manager(url) for url in set(self.routes.proxies.values())}
        #: (scheme, netloc) -> the manager its requests go through, decided on the first request.
        self._managers: dict[tuple[str, str], urllib3.PoolManager] = {}

    @property
    def timeout(self) -> tuple[float, float]:
        """Seconds to wait for a connection and for each read of an answer."""
        return self._timeout

    def _proxy_manager(self, url: str) -> urllib3.ProxyManager:
        credentials = urlsplit(url)
        headers = None
        if credentials.username is not None:
            auth = f"{unquote(credentials.username)}:{unquote(credentials.password or '')}"
            headers = urllib3.make_headers(proxy_basic_auth=auth)
        return urllib3.ProxyManager(url, proxy_headers=headers, **self._pool_options)

    def _manager_for(self, url: str) -> urllib3.PoolManager:
        """The direct pools or a proxy's, for a URL; decided once per scheme and host."""
        if not self._proxied:
            return self._direct
        parts = urlsplit(url)
        manager = self._managers.get((parts.scheme, parts.netloc))
        if manager is None:
            proxy = self.routes.proxy_for(parts.scheme, parts.hostname or "", parts.port)
            manager = self._direct if proxy is None else self._proxied[proxy]
            self._managers[(parts.scheme, parts.netloc)] = manager  # threads racing here decide the same
        return manager

    def _headers(self, headers: Mapping[str, str] | None) -> Mapping[str, str]:
        headers = headers or {}
        if self._accept_encoding and "Accept-Encoding" not in headers and "accept-encoding" not in headers:
            return {**headers, "Accept-Encoding": self._accept_encoding}
        return headers

    def _open(self, method: str, url: str, headers: Mapping[str, str] | None, post_data: Any,
              *, preload: bool) -> urllib3.BaseHTTPResponse:
        body = post_data.encode("utf-8") if isinstance(post_data, str) else post_data
        try:
            return self._manager_for(url).urlopen(method.upper(), url, body=body, headers=self._headers(headers),
                                                  redirect=False, retries=_NO_RETRIES, preload_content=preload,
                                                  decode_content=True)
        except Exception as exc:  # noqa: BLE001 - any failure is stripe's connection error, as in RequestsClient
            raise connection_error(exc) from exc

    def request(self, method: str, url: str, headers: Mapping[str, str] | None,
                post_data: Any = None) -> tuple[bytes, int, Mapping[str, str]]:
        """One request: the whole body as bytes (decompressed), the status and the headers (any case)."""
        response = self._open(method, url, headers, post_data, preload=True)
        return response.data, response.status, response.headers

    def request_stream(self, method: str, url: str, headers: Mapping[str, str] | None,
                       post_data: Any = None) -> tuple[Any, int, Mapping[str, str]]:
        """One request whose body is read by the caller (a urllib3 response, as RequestsClient gives)."""
        response = self._open(method, url, headers, post_data, preload=False)
        return response, response.status, response.headers

    def close(self) -> None:
        """Closes every pooled connection (the client reconnects if used again)."""
        self._direct.clear()
        for manager in self._proxied.values():
            manager.clear()

    def __repr__(self) -> str:
        connect, read = self.timeout
        proxies = {scheme: _without_credentials(url) for scheme, url in self.routes.proxies.items()}
        via = f", proxies={proxies}, no_proxy={self.routes.no_proxy!r}" if proxies else ""
        return f"PooledHTTPClient(timeout=({connect:g}, {read:g}), maxsize={self.maxsize}{via})"


def connection_error(exc: Exception) -> stripe.APIConnectionError:
    """stripe-python's error for a failed request, retryable when RequestsClient's would be (chain `exc` to it)."""
    if isinstance(exc, SSLError):
        advice = ("Could not verify Stripe's SSL certificate. Please make sure that your network is not "
                  "intercepting certificates (or point REQUESTS_CA_BUNDLE at your network's CA bundle).")
        retry = False
    elif isinstance(exc, (Urllib3Timeout, NewConnectionError, ProtocolError, ProxyError)):
        advice, retry = "Unexpected error communicating with Stripe.", True
    elif isinstance(exc, HTTPError):
        advice, retry = "Unexpected error communicating with Stripe.", False
    else:
        advice, retry = "Unexpected error communicating with Stripe; probably a configuration issue locally.", False
    detail = redact_text(f"{type(exc).__name__}: {exc}")
    return stripe.APIConnectionError(f"{textwrap.fill(advice)}\n\n(Network error: {detail})", should_retry=retry)


def _explicit_routes(proxy: Mapping[str, str | None] | None) -> ProxyRoutes:
    """Routes from stripe-python's `proxy` argument: every host through it, none bypassed."""
    return ProxyRoutes({scheme: _with_scheme(url) for scheme, url in (proxy or {}).items() if url})


def _with_scheme(url: str) -> str:
    """`proxy:3128` as requests reads it: http://proxy:3128."""
    return url if "://" in url else f"http://{url}"


def _without_credentials(url: str) -> str:
    """A proxy URL fit to show: its user and password replaced."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl()
