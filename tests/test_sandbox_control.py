"""Rate limits, latency and faults: the sandbox's realism knobs behave as configured."""
from __future__ import annotations

import logging
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from mbi_widgets import Faults, Sandbox


def get(sandbox: Sandbox, path: str = "/v1/charges", params: dict | None = None, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {sandbox.restricted_key}", "Connection": "close"}
    return requests.get(sandbox.api_url + path, params=params, headers=headers, timeout=30, **kwargs)


def burst(sandbox: Sandbox, paths: list[str]) -> list[requests.Response]:
    """All requests at once, from as many threads."""
    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda path: get(sandbox, path, {"limit": 1}), paths))


def assert_stripe_error(response: requests.Response, status: int, type_: str) -> dict:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"]
    return error


# --- rate limits -----------------------------------------------------------------------------------

def test_burst_is_rate_limited_then_recovers():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 5, "per_endpoint": 5}) as sandbox:
        responses = burst(sandbox, ["/v1/charges"] * 20)
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}
        assert 200 in statuses and 429 in statuses
        for response in responses:
            if response.status_code == 429:
                error = assert_stripe_error(response, 429, "invalid_request_error")
                assert error["code"] == "rate_limit"
                assert response.headers["Stripe-Rate-Limited-Reason"] in ("endpoint-rate", "global-rate")
            else:
                assert len(response.json()["data"]) == 1
        time.sleep(1.2)
        for _ in range(3):
            assert get(sandbox, "/v1/charges", {"limit": 1}).status_code == 200


def test_per_endpoint_limit_leaves_other_endpoints_alone():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 1000, "per_endpoint": 2}) as sandbox:
        limited = [r for r in burst(sandbox, ["/v1/charges"] * 12) if r.status_code == 429]
        assert limited
        assert {r.headers["Stripe-Rate-Limited-Reason"] for r in limited} == {"endpoint-rate"}
        # Another endpoint has its own bucket, full whatever happened to /v1/charges.
        assert get(sandbox, "/v1/customers", {"limit": 1}).status_code == 200
        assert get(sandbox, "/v1/invoices", {"limit": 1}).status_code == 200


def test_per_account_limit_spans_endpoints():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 3, "per_endpoint": 1000}) as sandbox:
        paths = ["/v1/charges", "/v1/customers", "/v1/invoices", "/v1/coupons", "/v1/plans", "/v1/products"] * 2
        limited = [r for r in burst(sandbox, paths) if r.status_code == 429]
        assert limited
        assert {r.headers["Stripe-Rate-Limited-Reason"] for r in limited} == {"global-rate"}


def test_limits_are_per_account():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 2, "per_endpoint": 2}) as sandbox:
        assert any(r.status_code == 429 for r in burst(sandbox, ["/v1/charges"] * 10))
        other = requests.get(sandbox.api_url + "/v1/charges", params={"limit": 1}, timeout=30,
                             headers={"Authorization": f"Bearer {sandbox.secret_key}",
                                      "Stripe-Account": sandbox.accounts[1].id})
        assert other.status_code == 200


def test_unlimited_by_default():
    with Sandbox(seed=2, scale=20) as sandbox:
        assert {r.status_code for r in burst(sandbox, ["/v1/charges"] * 30)} == {200}


# --- latency ---------------------------------------------------------------------------------------

def test_latency_is_a_lower_bound_on_every_request():
    with Sandbox(seed=2, scale=20, latency_ms=150) as sandbox:
        for path in ("/v1/charges", "/v1/account", "/v1/no_such_thing"):
            started = time.perf_counter()
            response = get(sandbox, path)
            elapsed = time.perf_counter() - started
            assert response.status_code in (200, 404)
            assert elapsed >= 0.149, (path, elapsed)


# --- faults ----------------------------------------------------------------------------------------

def test_fault_on_the_second_request_only():
    with Sandbox(seed=2, scale=20, faults=Faults(on={2: "503"})) as sandbox:
        assert get(sandbox, "/").status_code == 404  # not under /v1/: not counted
        statuses = []
        for _ in range(5):
            response = get(sandbox, "/v1/charges", {"limit": 1})
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert_stripe_error(response, 503, "api_error")
        assert statuses == [200, 503, 200, 200, 200]


@pytest.mark.parametrize("kind", ["500", "502", "503"])
def test_injected_server_errors_are_stripe_shaped(kind):
    with Sandbox(seed=2, scale=20) as sandbox:
        sandbox.inject_fault(kind, count=2, path="/v1/customers")
        assert get(sandbox, "/v1/charges").status_code == 200
        for _ in range(2):
            assert_stripe_error(get(sandbox, "/v1/customers"), int(kind), "api_error")
        assert get(sandbox, "/v1/customers").status_code == 200


def test_drop_cuts_the_body_and_the_server_keeps_serving():
    with Sandbox(seed=2, scale=20) as sandbox:
        sandbox.inject_fault("drop")
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            get(sandbox, "/v1/charges", {"limit": 100})
        for _ in range(3):
            response = get(sandbox, "/v1/charges", {"limit": 100})
            assert response.status_code == 200 and len(response.json()["data"]) == min(100, sandbox.dataset().count("charges"))


def test_drop_is_not_logged_as_a_server_error(caplog):
    """Injected drops are expected (`server._QuietDrops` says so): they must not log a traceback."""
    with Sandbox(seed=2, scale=20) as sandbox:
        sandbox.inject_fault("drop")
        with caplog.at_level(logging.ERROR):
            with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
                get(sandbox, "/v1/charges", {"limit": 100})
            assert get(sandbox, "/v1/charges").status_code == 200  # the server has finished the dropped request
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_slow_fault_delays_the_answer():
    with Sandbox(seed=2, scale=20, faults=Faults(slow_ms=300)) as sandbox:
        sandbox.inject_fault("slow")
        started = time.perf_counter()
        response = get(sandbox, "/v1/charges", {"limit": 1})
        assert time.perf_counter() - started >= 0.299
        assert response.status_code == 200 and len(response.json()["data"]) == 1


def _outcomes(sandbox: Sandbox, count: int) -> list[str]:
    outcomes = []
    for _ in range(count):
        try:
            response = get(sandbox, "/v1/charges", {"limit": 3})
            response.json()
            outcomes.append(str(response.status_code))
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
            outcomes.append("drop")
    return outcomes


def test_random_faults_hit_some_requests_but_not_all():
    with Sandbox(seed=2, scale=20, faults=Faults(rate=0.5, seed=1)) as sandbox:
        outcomes = _outcomes(sandbox, 40)
    assert set(outcomes) <= {"200", "500", "drop"}
    faults = sum(outcome != "200" for outcome in outcomes)
    assert 0 < faults < 40
    assert {"500", "drop"} <= set(outcomes)  # both default kinds occur


def test_random_faults_are_reproducible_from_their_seed():
    with Sandbox(seed=2, scale=20, faults=Faults(rate=0.3, seed=5)) as sandbox:
        first = _outcomes(sandbox, 20)
    with Sandbox(seed=2, scale=20, faults=Faults(rate=0.3, seed=5)) as sandbox:
        second = _outcomes(sandbox, 20)
    assert first == second
    assert "200" in first and set(first) != {"200"}


# --- clients that go away ---------------------------------------------------------------------------

def _abandon(sandbox: Sandbox, *, read: int, reset: bool) -> None:
    """Asks for a big page, reads `read` bytes and hangs up (with a RST when `reset`)."""
    host, port = sandbox.api_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the server cannot write it all at once
    sock.settimeout(30)
    sock.connect((host, int(port)))
    request = (f"GET /v1/charges?limit=100&expand[]=data.customer HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {sandbox.restricted_key}\r\n\r\n")
    sock.sendall(request.encode())
    received = b""
    while len(received) < read:
        chunk = sock.recv(read - len(received))
        assert chunk
        received += chunk
    if read:
        assert received.startswith(b"HTTP/1.1 200")
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("read, reset", [(64, False), (64, True), (0, True)])
def test_client_disconnecting_mid_response_leaves_the_server_serving(read, reset):
    with Sandbox(seed=2, scale=20) as sandbox:
        for _ in range(5):
            _abandon(sandbox, read=read, reset=reset)
        for _ in range(3):
            response = get(sandbox, "/v1/charges", {"limit": 100, "expand[]": "data.customer"})
            assert response.status_code == 200
            assert len(response.json()["data"]) == min(100, sandbox.dataset().count("charges"))
