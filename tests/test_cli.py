"""The `mbi-widgets` command line, run as a real subprocess: `sandbox` prints exactly one JSON line
and serves until interrupted; `demo` prints where the sandbox is; bad options fail cleanly."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from mbi_widgets.sandbox import DEFAULT_NOW
from mbi_widgets.sandbox.generator import DAY

ROOT = Path(__file__).resolve().parent.parent
#: Generous guard against a hung child; not a performance bound.
HANG_GUARD_S = 60


def _console_script() -> str | None:
    beside = Path(sys.executable).parent / "mbi-widgets"
    if beside.exists():
        return str(beside)
    return shutil.which("mbi-widgets")


MODULE = [sys.executable, "-m", "mbi_widgets.cli"]
SCRIPT = _console_script()
LAUNCHERS = [pytest.param(MODULE, id="python-m")] + (
    [pytest.param([SCRIPT], id="console-script")] if SCRIPT else
    [pytest.param(None, id="console-script", marks=pytest.mark.skip(reason="mbi-widgets is not installed"))])


def _default_sigint() -> None:
    # A child started from a shell's background job would inherit SIGINT as ignored; give it the
    # default disposition so Python turns SIGINT into KeyboardInterrupt as it would in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def launched(command: list[str], *args: str) -> Iterator[subprocess.Popen]:
    # A session of its own, so that the child and anything it starts (JupyterLab) can be stopped together.
    proc = subprocess.Popen([*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, preexec_fn=_default_sigint, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=HANG_GUARD_S)


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=HANG_GUARD_S)
        pytest.fail(f"the command printed nothing and exited with {proc.returncode}: {proc.stderr.read()}")
    return line


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[str, str]:
    """Signals the child and returns what it printed afterwards (stdout, stderr)."""
    assert proc.poll() is None, "the server exited before it was asked to"
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=HANG_GUARD_S)
    return rest, err


def run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)


def check_connection_info(info: dict) -> None:
    assert set(info) >= {"api_url", "connect_url", "secret_key", "client_id", "restricted_key", "accounts"}
    assert info["api_url"].startswith("http://127.0.0.1:")
    assert int(info["api_url"].rsplit(":", 1)[1]) > 0
    assert info["connect_url"].startswith("http://127.0.0.1:")
    assert info["secret_key"].startswith("sk_test_")
    assert info["restricted_key"].startswith("rk_test_")
    assert info["client_id"].startswith("ca_")
    assert isinstance(info["accounts"], list) and len(info["accounts"]) >= 2
    for account in info["accounts"]:
        assert account["id"].startswith("acct_")
        assert "@" in account["email"]
        assert isinstance(account["password"], str) and len(account["password"]) >= 8
    assert len({account["id"] for account in info["accounts"]}) == len(info["accounts"])


def charges(info: dict, key: str, **headers: str) -> list[dict]:
    answer = requests.get(f"{info['api_url']}/v1/charges", params={"limit": 5},
                          headers={"Authorization": f"Bearer {key}", **headers}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    return body["data"]


# --- mbi-widgets sandbox ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", LAUNCHERS)
def test_sandbox_prints_one_json_line_serves_and_stops_on_sigint(command):
    with launched(command, "sandbox", "--scale", "20", "--seed", "3") as proc:
        line = first_line(proc)
        assert line.endswith("\n")
        info = json.loads(line)
        check_connection_info(info)

        data = charges(info, info["restricted_key"])
        assert data and all(charge["id"].startswith("ch_") for charge in data)
        # The platform key reads a seeded account through Stripe-Account, as Connect does.
        assert charges(info, info["secret_key"], **{"Stripe-Account": info["accounts"][1]["id"]})
        rejected = requests.get(f"{info['api_url']}/v1/charges", timeout=30,
                                headers={"Authorization": "Bearer sk_test_not_a_key"})
        assert rejected.status_code == 401

        rest, err = stop(proc, signal.SIGINT)
        assert rest == "", f"stdout must hold exactly one line, but then came: {rest!r}"
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert info["secret_key"] not in err and info["restricted_key"] not in err


def test_sandbox_stops_cleanly_on_sigterm():
    with launched(MODULE, "sandbox", "--scale", "20") as proc:
        info = json.loads(first_line(proc))
        assert charges(info, info["restricted_key"])
        rest, err = stop(proc, signal.SIGTERM)
        assert rest == ""
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{info['api_url']}/v1/charges", timeout=5,
                     headers={"Authorization": f"Bearer {info['restricted_key']}"})


def test_the_printed_credentials_run_connect_oauth_end_to_end():
    """The printed client_id, secret key and account sign-in complete the Connect flow."""
    with launched(MODULE, "sandbox", "--scale", "20", "--seed", "5") as proc:
        info = json.loads(first_line(proc))
        connect = info["connect_url"]
        who = info["accounts"][1]
        page = requests.get(f"{connect}/oauth/authorize", timeout=10, params={
            "client_id": info["client_id"], "response_type": "code", "scope": "read_only", "state": "cli"})
        assert page.status_code == 200, page.text
        request_id = re.search(r'name="request" value="([^"]+)"', page.text).group(1)
        signed_in = requests.post(f"{connect}/oauth/authorize", allow_redirects=False, timeout=10, data={
            "request": request_id, "action": "approve", "email": who["email"], "password": who["password"]})
        assert signed_in.status_code == 302, signed_in.text
        query = dict(parse_qsl(urlsplit(signed_in.headers["location"]).query))
        assert query["state"] == "cli"
        token = requests.post(f"{connect}/oauth/token", timeout=10, data={
            "grant_type": "authorization_code", "code": query["code"], "client_secret": info["secret_key"]})
        assert token.status_code == 200, token.text
        assert token.json()["stripe_user_id"] == who["id"]
        assert charges(info, token.json()["access_token"])
        # An address nobody registered is refused, even from the command-line sandbox.
        elsewhere = requests.get(f"{connect}/oauth/authorize", allow_redirects=False, timeout=10, params={
            "client_id": info["client_id"], "redirect_uri": "http://evil.example/cb"})
        assert elsewhere.status_code == 400 and "location" not in elsewhere.headers
        rest, _ = stop(proc)
        assert rest == "" and proc.returncode == 0


def test_the_same_seed_gives_the_same_accounts_and_data_but_fresh_keys():
    seen = []
    for _ in range(2):
        with launched(MODULE, "sandbox", "--scale", "20", "--seed", "3") as proc:
            info = json.loads(first_line(proc))
            seen.append((info, [charge["id"] for charge in charges(info, info["restricted_key"])]))
            stop(proc)
            assert proc.returncode == 0
    (first, first_charges), (second, second_charges) = seen
    assert [a["id"] for a in first["accounts"]] == [a["id"] for a in second["accounts"]]
    assert first["client_id"] == second["client_id"]
    assert first_charges == second_charges
    assert first["secret_key"] != second["secret_key"]
    assert first["restricted_key"] != second["restricted_key"]
    assert first["accounts"][0]["password"] != second["accounts"][0]["password"]


def test_a_signal_right_after_the_first_line_still_stops_cleanly():
    """Scripts read the JSON line and may signal at once: the handlers are in place before it is printed
    (a Ctrl-C landing between the print and the wait used to kill the process with SIGINT)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        with launched(MODULE, "sandbox", "--scale", "20") as proc:
            first_line(proc)
            _, err = stop(proc, sig)
            assert proc.returncode == 0, err


def test_sandbox_listens_on_the_requested_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with launched(MODULE, "sandbox", "--scale", "20", "--port", str(port)) as proc:
        info = json.loads(first_line(proc))
        assert info["api_url"] == f"http://127.0.0.1:{port}"
        assert charges(info, info["restricted_key"])
        stop(proc)
        assert proc.returncode == 0


def test_sandbox_on_a_port_in_use_fails_with_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(MODULE, "sandbox", "--scale", "20", "--port", str(port))
    assert result.returncode != 0
    assert result.stdout == ""
    assert str(port) in result.stderr
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("scale", ["nonsense", "-5", "1.5", ""])
def test_a_bad_scale_exits_with_code_2_and_says_why(scale):
    result = run(MODULE, "sandbox", "--scale", scale)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--scale" in result.stderr
    assert "demo" in result.stderr and "bench" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["unknown-command"], ["sandbox", "--port", "eighty"],
                                  ["sandbox", "--rate-limits", "fast"]])
def test_bad_usage_exits_with_code_2(args):
    result = run(MODULE, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: mbi-widgets" in result.stderr


@pytest.mark.parametrize("command", LAUNCHERS)
def test_help_lists_the_subcommands(command):
    result = run(command, "--help")
    assert result.returncode == 0
    assert "sandbox" in result.stdout and "demo" in result.stdout


# --- the sandbox clock: --advance-days, --horizon-days and the control endpoint ------------------------


def clock_of(answer: requests.Response) -> int:
    return int(parsedate_to_datetime(answer.headers["Date"]).timestamp())


def advance(info: dict, key: str, **form: str) -> requests.Response:
    return requests.post(f"{info['api_url']}/_sandbox/advance", data=form, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})


def charges_answer(info: dict) -> requests.Response:
    answer = requests.get(f"{info['api_url']}/v1/charges", params={"limit": 1}, timeout=30,
                          headers={"Authorization": f"Bearer {info['restricted_key']}"})
    assert answer.status_code == 200, answer.text
    return answer


def events_since(info: dict, moment: int) -> list[dict]:
    answer = requests.get(f"{info['api_url']}/v1/events", params={"limit": 100, "created[gt]": moment},
                          headers={"Authorization": f"Bearer {info['restricted_key']}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_sandbox_prints_its_clock_which_starts_at_the_default_moment():
    with launched(MODULE, "sandbox", "--scale", "20", "--seed", "3") as proc:
        info = json.loads(first_line(proc))
        assert info["now"] == DEFAULT_NOW
        assert clock_of(charges_answer(info)) == DEFAULT_NOW
        assert not events_since(info, DEFAULT_NOW)  # nothing has happened after the clock
        stop(proc)
        assert proc.returncode == 0


@pytest.mark.parametrize("command", LAUNCHERS)
def test_sandbox_advance_days_starts_the_clock_later_with_the_business_gone_on(command):
    with launched(command, "sandbox", "--scale", "60", "--seed", "3", "--advance-days", "10.5") as proc:
        info = json.loads(first_line(proc))
        check_connection_info(info)
        assert info["now"] == DEFAULT_NOW + 10 * DAY + DAY // 2
        answer = requests.get(f"{info['api_url']}/v1/charges", params={"limit": 100}, timeout=30,
                              headers={"Authorization": f"Bearer {info['restricted_key']}"})
        assert clock_of(answer) == info["now"]
        assert all(charge["created"] <= info["now"] for charge in answer.json()["data"])
        # Ten days of business happened between the default start and the printed clock.
        happened = events_since(info, DEFAULT_NOW)
        assert happened and all(DEFAULT_NOW < event["created"] <= info["now"] for event in happened)
        rest, err = stop(proc)
        assert rest == "" and proc.returncode == 0, err


def test_the_control_endpoint_of_a_cli_sandbox_moves_its_clock_up_to_the_horizon():
    with launched(MODULE, "sandbox", "--scale", "20", "--advance-days", "1", "--horizon-days", "5") as proc:
        info = json.loads(first_line(proc))
        assert info["now"] == DEFAULT_NOW + DAY
        refused = advance(info, info["restricted_key"], days="1")
        assert refused.status_code == 403, refused.text
        moved = advance(info, info["secret_key"], days="2", hours="6")
        assert moved.status_code == 200, moved.text
        assert moved.json() == {"object": "sandbox_clock", "now": DEFAULT_NOW + 3 * DAY + 6 * 3_600}
        assert clock_of(charges_answer(info)) == DEFAULT_NOW + 3 * DAY + 6 * 3_600
        # --horizon-days 5: two more days are too far; the clock stays where it was.
        too_far = advance(info, info["secret_key"], days="2")
        assert too_far.status_code == 400 and "horizon" in too_far.json()["error"]["message"]
        assert advance(info, info["secret_key"], days="-1").status_code == 400
        assert clock_of(charges_answer(info)) == DEFAULT_NOW + 3 * DAY + 6 * 3_600
        assert advance(info, info["secret_key"], hours="42").json()["now"] == DEFAULT_NOW + 5 * DAY
        rest, err = stop(proc)
        assert rest == "" and proc.returncode == 0, err
        assert info["secret_key"] not in err


@pytest.mark.parametrize("args, flag", [
    (["--advance-days", "-1"], "--advance-days"),
    (["--advance-days", "nan"], "--advance-days"),
    (["--advance-days", "inf"], "--advance-days"),
    (["--advance-days", "soon"], "--advance-days"),
    (["--horizon-days", "-3"], "--horizon-days"),
    (["--horizon-days", "1.5"], "--horizon-days"),
    (["--advance-days", "8", "--horizon-days", "7"], "--horizon-days"),
])
@pytest.mark.parametrize("subcommand", [["sandbox"], ["demo", "--sandbox-only"]])
def test_bad_clock_options_exit_with_code_2_and_say_why(subcommand, args, flag):
    result = run(MODULE, *subcommand, "--scale", "20", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert flag in result.stderr
    assert f"usage: mbi-widgets {subcommand[0]}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sandbox_help_describes_the_clock_options():
    result = run(MODULE, "sandbox", "--help")
    assert result.returncode == 0
    assert "--advance-days" in result.stdout and "--horizon-days" in result.stdout


# --- mbi-widgets demo -----------------------------------------------------------------------------------


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    lines = [first_line(proc)]
    while marker not in lines[-1]:
        line = proc.stdout.readline()
        assert line, f"the demo stopped printing early: {''.join(lines)!r} {proc.stderr.read()}"
        lines.append(line)
    return lines


def wait_until_serving(url: str) -> requests.Response:
    """Polls a server that is starting up; the guard only catches a hang."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return requests.get(url, timeout=10)
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_demo_sandbox_only_prints_the_sandbox_url_and_stops_on_sigint():
    with launched(MODULE, "demo", "--sandbox-only", "--scale", "20") as proc:
        lines = read_until(proc, "Press Ctrl-C to stop.")
        text = "".join(lines)
        assert "serving at http://127.0.0.1:" in lines[0]
        url = lines[0].split("serving at ", 1)[1].strip()
        key_line = next(line for line in lines if line.startswith("Restricted key"))
        key = key_line.rsplit(" ", 1)[1].strip()
        assert key.startswith("rk_test_")
        assert f"{url}/v1/charges" in text
        data = charges({"api_url": url}, key)
        assert data and all(charge["id"].startswith("ch_") for charge in data)

        rest, err = stop(proc, signal.SIGINT)
        assert proc.returncode == 0, err
        assert rest == ""
        assert "Traceback" not in err
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/charges", headers={"Authorization": f"Bearer {key}"}, timeout=5)


needs_jupyterlab = pytest.mark.skipif(importlib.util.find_spec("jupyterlab") is None,
                                      reason="JupyterLab is not installed")


def start_lab_demo(proc: subprocess.Popen) -> str:
    lines = read_until(proc, "Press Ctrl-C to stop.")
    assert "JupyterLab is starting" in lines[0]
    url = next(line.strip() for line in lines if "token=" in line)
    assert url.startswith("http://127.0.0.1:") and "/lab/tree/01_connect_stripe.ipynb?token=" in url
    page = wait_until_serving(url)
    assert page.status_code == 200
    # The token in the printed URL is what lets the browser in.
    without_token = requests.get(f"{url.split('/lab/', 1)[0]}/api/contents", allow_redirects=False, timeout=10)
    assert without_token.status_code in (401, 403)
    return url


@needs_jupyterlab
def test_demo_starts_jupyterlab_and_ctrl_c_stops_it():
    with launched(MODULE, "demo", "--scale", "20") as proc:
        url = start_lab_demo(proc)
        # Ctrl-C in a terminal reaches the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


@needs_jupyterlab
# Guards: SIGTERM must not leave JupyterLab running, orphaned, with a valid token.
def test_demo_stopped_with_sigterm_takes_jupyterlab_with_it():
    with launched(MODULE, "demo", "--scale", "20") as proc:
        url = start_lab_demo(proc)
        proc.send_signal(signal.SIGTERM)  # as `kill`, systemd or docker stop would
        proc.wait(timeout=HANG_GUARD_S)
        # Once the command has exited, nothing it started may still be serving.
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=5)


def test_demo_sandbox_only_starts_the_clock_later_and_says_when():
    with launched(MODULE, "demo", "--sandbox-only", "--scale", "20", "--advance-days", "2.25") as proc:
        lines = read_until(proc, "Press Ctrl-C to stop.")
        url = lines[0].split("serving at ", 1)[1].strip()
        key = next(line for line in lines if line.startswith("Restricted key")).rsplit(" ", 1)[1].strip()
        now = DEFAULT_NOW + 2 * DAY + 6 * 3_600
        clock_line = next(line for line in lines if line.startswith("Sandbox clock:"))
        assert clock_line.split(": ", 1)[1].strip() == datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        answer = requests.get(f"{url}/v1/charges", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert answer.status_code == 200 and clock_of(answer) == now
        rest, err = stop(proc)
        assert proc.returncode == 0, err
