"""PooledHTTPClient (the urllib3 client StripeSource builds) against real loopback servers.

It must load the same tables as stripe-python's RequestsClient, fail the same way (same FetchError
codes and messages for timeouts, drops and refusals), honour the proxy and CA settings of the
environment as they were when it was built, never follow a redirect, and keep one connection per
busy thread however many requests they send.
"""
from __future__ import annotations

import datetime as dt
import gzip
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import pytest
import stripe

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.tables.fetch import FetchError, RequestRejected, RetryPolicy, _network_error
from mbi_widgets.tables.http import PooledHTTPClient

FAST = {"per_account": 1000, "per_endpoint": 1000}
QUICK = RetryPolicy(max_transient=1, base_delay=0.001, max_delay=0.002)
KEY = "rk_test_" + "HttpClientTests0123456789"
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")

#: An answer: status, headers, body.
Answer = tuple[int, dict[str, str], bytes]


# --- servers ---------------------------------------------------------------------------------------

class LoopbackServer:
    """A threaded HTTP/1.1 server (keep-alive) on loopback whose every answer is `answer(method, target,
    headers)`; it counts the connections it accepted and records each request's target and headers."""

    def __init__(self, answer: Callable[[str, str, dict[str, str]], Answer],
                 tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Each answer in one write, without Nagle's algorithm: no 40 ms delayed-ACK stalls per request.
            wbufsize, disable_nagle_algorithm = 65536, True

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                headers = {name.lower(): value for name, value in self.headers.items()}
                owner.requests.append((self.path, headers))
                status, extra, body = owner.answer(self.command, self.path, headers)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **extra}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # 32 threads connecting at once overflow the default 5: 1 s SYN retries

            def get_request(self):  # type: ignore[no-untyped-def]
                connection, address = super().get_request()
                owner.connections += 1  # one accept thread: no lock needed
                return (tls.wrap_socket(connection, server_side=True) if tls else connection), address

        self._server = Server(("127.0.0.1", 0), Handler)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="loopback-http",
                                        daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def json_answer(payload: Any, status: int = 200, **headers: str) -> Answer:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


def forwarding_proxy() -> LoopbackServer:
    """An HTTP proxy: forwards each absolute-form GET to its host and relays the answer."""

    def forward(method: str, target: str, headers: dict[str, str]) -> Answer:
        parts = urlsplit(target)
        assert parts.scheme == "http", f"a proxy is asked for absolute URLs, not {target!r}"
        upstream = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        hop = {"proxy-authorization", "proxy-connection", "connection", "host"}
        upstream.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                         headers={name: value for name, value in headers.items() if name not in hop})
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        relayed = {name: value for name, value in response.getheaders()
                   if name.lower() not in {"content-length", "transfer-encoding", "connection"}}
        return response.status, relayed, body

    return LoopbackServer(forward)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=3, scale=60) as running:
        yield running


@pytest.fixture
def clean_environment(monkeypatch):
    """No proxy or CA bundle settings from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def source_for(url: str, key: str = KEY, **options: Any) -> StripeSource:
    return StripeSource(key, api_base=url, rate_limits=FAST, **options)


def requests_source(url: str, key: str, timeout: tuple[float, float] = (5, 30), **options: Any) -> StripeSource:
    """The same source over stripe-python's RequestsClient (what StripeSource built before)."""
    client = stripe.StripeClient(key, base_addresses={"api": url}, max_network_retries=0,
                                 http_client=stripe.RequestsClient(timeout=timeout))
    return StripeSource(client=client, rate_limits=FAST, **options)


# --- the same tables -------------------------------------------------------------------------------

def test_a_whole_load_equals_the_same_load_over_requests(sandbox, clean_environment):
    pooled = source_for(sandbox.api_url, sandbox.restricted_key)
    assert isinstance(pooled._client._requestor._client, PooledHTTPClient)  # what StripeSource builds now
    frames = pooled.tables()
    expected = requests_source(sandbox.api_url, sandbox.restricted_key).tables()
    assert sorted(frames) == sorted(expected) and sum(len(frame) for frame in frames.values()) > 1000
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(frames[name], frame, obj=name)


def test_date_is_readable_in_any_case_and_sets_the_server_clock(sandbox, clean_environment):
    client = PooledHTTPClient()
    body, status, headers = client.request("get", f"{sandbox.api_url}/v1/coupons?limit=1",
                                           {"Authorization": f"Bearer {sandbox.restricted_key}"})
    assert status == 200 and json.loads(body)["object"] == "list"
    assert headers.get("Date") and headers.get("Date") == headers.get("date") == headers["DATE"]
    moment, _ = source_for(sandbox.api_url, sandbox.restricted_key).server_clock()
    assert moment == int(dt.datetime.strptime(headers["Date"], "%a, %d %b %Y %H:%M:%S GMT")
                         .replace(tzinfo=dt.UTC).timestamp())


# --- failures: the same errors as over requests ----------------------------------------------------

def _refused_url() -> str:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


class Unreachable:
    """Loopback addresses that fail in each way a network can: by name (see `url`)."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def _serve(self, behave: Callable[[socket.socket], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        self._sockets.append(listener)

        def accept() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                self._sockets.append(connection)
                behave(connection)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    def _full_backlog(self) -> str:
        """A listener whose accept queue is full: the kernel drops new SYNs, so connecting times out."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        self._sockets.append(listener)
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            self._sockets.append(filler)
        time.sleep(0.05)
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    def url(self, kind: str) -> str:
        if kind == "connect_timeout":
            return self._full_backlog()
        if kind == "read_timeout":
            return self._serve(lambda connection: None)
        if kind == "dropped":
            return self._serve(lambda connection: connection.close())
        if kind == "cut_off":
            def cut(connection: socket.socket) -> None:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
                                   b"\r\n{\"object\": \"li")
                connection.close()
            return self._serve(cut)
        return _refused_url()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def unreachable():
    made = Unreachable()
    yield made
    made.close()


@pytest.mark.parametrize("kind, said", [
    ("connect_timeout", "no connection within "),
    ("read_timeout", "no answer within "),
    ("dropped", "the connection failed or dropped ("),
    ("refused", "the connection failed or dropped ("),
    ("cut_off", None),
])
@pytest.mark.parametrize("client", ["pooled", "requests"])
def test_network_failures_are_the_same_fetch_errors(unreachable, clean_environment, kind, said, client):
    url = unreachable.url(kind)
    make = source_for if client == "pooled" else requests_source
    source = make(url, KEY, timeout=(0.3, 0.3), retry=RetryPolicy(max_transient=6, base_delay=0.001,
                                                                  max_delay=0.002))
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        source.table("coupons")
    error = caught.value
    assert error.code == "unavailable" and error.table == "coupons" and KEY not in str(error)
    if said is not None:
        assert f"(last error: {said}" in str(error)
    if said is not None and said.endswith("within ") and client == "pooled":
        # (A client of one's own keeps its timeouts; the message names the source's, 5 and 30 s.)
        assert f"(last error: {said}0.3 s)" in str(error)
    if kind.endswith("timeout"):  # three attempts end in a timeout (max_timeouts=2), however many retries remain
        assert "after 3 attempts" in str(error)
        assert time.monotonic() - started < 3 * 0.3 + 2.0
    else:
        assert "after 7 attempts" in str(error)


def test_a_cut_off_answer_reads_as_a_dropped_connection(unreachable, clean_environment):
    """requests called it a ChunkedEncodingError; urllib3 says the connection broke, which it did."""
    with pytest.raises(FetchError) as caught:
        source_for(unreachable.url("cut_off"), timeout=(0.3, 0.3), retry=QUICK).table("coupons")
    assert "(last error: the connection failed or dropped (ProtocolError))" in str(caught.value)


def test_connection_errors_are_stripes_and_say_whether_to_retry(unreachable, clean_environment):
    client = PooledHTTPClient((0.3, 0.3))
    for kind, retry in [("refused", True), ("read_timeout", True), ("dropped", True)]:
        with pytest.raises(stripe.APIConnectionError) as caught:
            client.request("get", unreachable.url(kind) + "/v1/coupons", {})
        assert caught.value.should_retry is retry and caught.value.__cause__ is not None, kind
    with pytest.raises(stripe.APIConnectionError) as caught:
        client.request("get", "ftp://127.0.0.1/v1/coupons", {})
    assert caught.value.should_retry is False


# --- proxies and certificates, read once from the environment ------------------------------------------

def test_http_proxy_from_the_environment_is_used(sandbox, clean_environment):
    with forwarding_proxy() as proxy:
        clean_environment.setenv("HTTP_PROXY", proxy.url.replace("://", "://user:pa%20ss@"))
        source = source_for(sandbox.api_url, sandbox.restricted_key)
        clean_environment.delenv("HTTP_PROXY")  # read once, when the client was built
        coupons = source.table("coupons")
    assert len(proxy.requests) >= 1
    assert all(target.startswith(sandbox.api_url + "/v1/") for target, _ in proxy.requests)
    # Basic auth from the proxy URL's user and password ("pa ss", unquoted).
    assert proxy.requests[0][1]["proxy-authorization"] == "Basic dXNlcjpwYSBzcw=="
    assert "pa%20ss" not in repr(source._client._requestor._client)
    assert "***@127.0.0.1" in repr(source._client._requestor._client)
    assert len(coupons) == len(source_for(sandbox.api_url, sandbox.restricted_key).table("coupons"))


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.0/8", "*"])
def test_no_proxy_bypasses_the_proxy(sandbox, clean_environment, no_proxy):
    with forwarding_proxy() as proxy:
        clean_environment.setenv("http_proxy", proxy.url)
        clean_environment.setenv("NO_PROXY", no_proxy)
        coupons = source_for(sandbox.api_url, sandbox.restricted_key).table("coupons")
    assert len(coupons) > 0
    assert proxy.requests == []


def test_no_proxy_for_other_hosts_still_proxies(sandbox, clean_environment):
    with forwarding_proxy() as proxy:
        clean_environment.setenv("HTTP_PROXY", proxy.url)
        clean_environment.setenv("NO_PROXY", "example.com,10.0.0.0/8,127.0.0.2")
        source_for(sandbox.api_url, sandbox.restricted_key).table("coupons")
    assert len(proxy.requests) >= 1


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A TLS context for 127.0.0.1 and the path of its certificate (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "loopback.pem", tmp_path / "loopback.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, str(cert_path)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"])
def test_tls_is_verified_against_the_environments_ca_bundle(tmp_path, clean_environment, variable):
    context, certificate = _self_signed(tmp_path)
    with LoopbackServer(lambda *_: json_answer({"ok": True}), tls=context) as server:
        untrusting = PooledHTTPClient((2, 2))  # certifi's CAs: the loopback certificate is nobody's
        with pytest.raises(stripe.APIConnectionError) as caught:
            untrusting.request("get", server.url + "/v1/ping", {})
        assert caught.value.should_retry is False and "certificate" in str(caught.value)
        assert _network_error(caught.value, source_for(server.url).timeouts).startswith(
            "the connection failed or dropped (SSLError")

        clean_environment.setenv(variable, certificate)
        body, status, _ = PooledHTTPClient((2, 2)).request("get", server.url + "/v1/ping", {})
    assert (status, json.loads(body)) == (200, {"ok": True})


# --- redirects, compression, threads ------------------------------------------------------------------

def test_a_redirect_is_the_answer_not_followed(clean_environment):
    def answer(method: str, target: str, headers: dict[str, str]) -> Answer:
        if target.startswith("/v1/elsewhere"):
            return json_answer({"object": "list", "data": [], "has_more": False})
        return json_answer({"error": {"message": "Moved."}}, 302, Location="/v1/elsewhere")

    with LoopbackServer(answer) as server:
        body, status, headers = PooledHTTPClient().request("get", server.url + "/v1/coupons?limit=1", {})
        assert status == 302 and headers["location"] == "/v1/elsewhere"
        assert json.loads(body)["error"]["message"] == "Moved."
        with pytest.raises(RequestRejected) as caught:
            source_for(server.url, retry=QUICK).table("coupons")
        assert caught.value.code == "302"
        assert [target for target, _ in server.requests if target.startswith("/v1/elsewhere")] == []


def test_gzip_is_asked_for_and_decoded(clean_environment):
    payload = {"object": "list", "data": [{"id": f"cpn_{n}", "created": 1_700_000_000 - n} for n in range(100)],
               "has_more": False}

    def answer(method: str, target: str, headers: dict[str, str]) -> Answer:
        status, extra, body = json_answer(payload)
        if "gzip" in headers.get("accept-encoding", ""):
            return status, {**extra, "Content-Encoding": "gzip"}, gzip.compress(body)
        return status, extra, body

    with LoopbackServer(answer) as server:
        body, status, _ = PooledHTTPClient().request("get", server.url + "/v1/coupons", {"User-Agent": "t"})
        plain, _, _ = PooledHTTPClient(compress=False).request("get", server.url + "/v1/coupons", {})
        stripes_choice, _, _ = PooledHTTPClient().request("get", server.url + "/v1/coupons",
                                                          {"Accept-Encoding": "identity"})
    assert json.loads(body) == json.loads(plain) == json.loads(stripes_choice) == payload
    said = [headers.get("accept-encoding") for _, headers in server.requests]
    assert said == ["gzip, deflate", "identity", "identity"]


def test_many_threads_share_one_client_and_few_connections(clean_environment):
    threads, each = 32, 10
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most at once

    def answer(method: str, target: str, headers: dict[str, str]) -> Answer:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        time.sleep(0.002)  # long enough for requests to overlap
        with lock:
            in_flight[0] -= 1
        return json_answer({"path": target})

    with LoopbackServer(answer) as server:
        client = PooledHTTPClient()
        failures: list[BaseException] = []
        answers: list[tuple[int, str]] = []

        def work(number: int) -> None:
            try:
                for request in range(each):
                    body, status, _ = client.request("get", f"{server.url}/v1/t{number}/{request}", {})
                    answers.append((status, json.loads(body)["path"]))
                    time.sleep(0.001)  # a worker's parsing between pages: the connection waits in the pool
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert failures == []
        assert sorted(answers) == sorted((200, f"/v1/t{n}/{r}") for n in range(threads) for r in range(each))
        # Keep-alive: at most one connection per thread (a client that opened one per request would
        # need 320), and requests did overlap, so the pool was shared for real.
        assert in_flight[1] > 1 and server.connections <= threads, (server.connections, in_flight[1])

        client.close()
        before = server.connections
        for request in range(5):  # closed, then reconnected once, then reused
            assert client.request("get", f"{server.url}/v1/again/{request}", {})[1] == 200
        assert server.connections == before + 1


def test_repr_and_options(clean_environment):
    client = PooledHTTPClient((2, 7), maxsize=8)
    assert repr(client) == "PooledHTTPClient(timeout=(2, 7), maxsize=8)"
    assert client.timeout == (2, 7) and client.name == "urllib3"
    assert "proxies" in repr(PooledHTTPClient(proxy="http://u:secret@proxy.example:3128"))
    assert "secret" not in repr(PooledHTTPClient(proxy="http://u:secret@proxy.example:3128"))
    with pytest.raises(ValueError, match="maxsize"):
        PooledHTTPClient(maxsize=0)
