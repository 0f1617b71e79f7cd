"""The `mbi-widgets` command line: sub-commands over the same functions the notebooks call."""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from typing import Callable, Sequence

from mbi_widgets.errors import MbiError


def _scale(value: str) -> str | int:
    if value in ("demo", "bench"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError("scale is 'demo', 'bench' or a number of customers")


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        days = math.nan
    # float() also takes "nan" and "inf": neither is a moment the sandbox can move to.
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days >= 0")
    return days


def _horizon(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of days >= 0")
    return int(value)


def _serve_until_interrupted(announce: Callable[[], None]) -> None:
    """Announces (prints the URLs) and waits for Ctrl-C or SIGTERM. The handlers go in before the
    announcement: a script that reads the first line and signals at once must still get a clean stop."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announce()
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_sandbox(args: argparse.Namespace):
    from mbi_widgets.sandbox import Sandbox

    sandbox = Sandbox(seed=args.seed, scale=args.scale, latency_ms=args.latency_ms, rate_limits=args.rate_limits,
                      port=args.port, horizon_days=args.horizon_days).start()
    try:
        if args.advance_days:
            sandbox.advance(days=args.advance_days)
    except BaseException:  # Ctrl-C while re-rendering included: never leave the port serving
        sandbox.stop()
        raise
    return sandbox


def cmd_sandbox(args: argparse.Namespace) -> int:
    sandbox = _start_sandbox(args)
    try:
        # Exactly one JSON line on stdout, so scripts can read it; then serve until interrupted.
        _serve_until_interrupted(lambda: print(json.dumps({**sandbox.connection_info(), "now": sandbox.now}),
                                               flush=True))
    finally:
        sandbox.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """JupyterLab on the onboarding notebooks, whose panel runs on the embedded sandbox."""
    if args.sandbox_only:
        return _demo_sandbox_only(args)
    import os
    import secrets as tokens
    import socket
    import subprocess
    from pathlib import Path

    notebooks = _notebooks_dir()
    if notebooks is None:
        print("mbi-widgets demo: the notebooks/ folder was not found; run it from a clone of mbi-widgets",
              file=sys.stderr)
        return 2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", args.port or 0))
        port = probe.getsockname()[1]
    token = tokens.token_hex(16)
    url = f"http://127.0.0.1:{port}/lab/tree/01_connect_stripe.ipynb?token={token}"
    print(f"""mbi-widgets demo: JupyterLab is starting on {notebooks}

Open this URL in a browser:

    {url}

then run the first cell: the Connections panel appears, wired to a Stripe sandbox on this machine.
Press Ctrl-C to stop.""", flush=True)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.root_dir={notebooks}", f"--IdentityProvider.token={token}",
               "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    lab = subprocess.Popen(command, cwd=Path(notebooks))
    # SIGTERM (kill, systemd, docker stop) must take JupyterLab and its kernels along, not orphan them.
    signal.signal(signal.SIGTERM, lambda *_: lab.terminate())
    try:
        return lab.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached JupyterLab too; let it shut its kernels down cleanly.
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        return 0


def _notebooks_dir():
    from pathlib import Path

    for candidate in (Path.cwd() / "notebooks", Path(__file__).resolve().parent.parent / "notebooks"):
        if (candidate / "01_connect_stripe.ipynb").exists():
            return candidate
    return None


def _demo_sandbox_only(args: argparse.Namespace) -> int:
    sandbox = _start_sandbox(args)
    account = sandbox.accounts[0]
    try:
        _serve_until_interrupted(lambda: print(f"""mbi-widgets demo: the Stripe sandbox is serving at {sandbox.api_url}

Try it (the restricted key reads {account.business_name}'s data):
  curl -s '{sandbox.api_url}/v1/charges?limit=3' -u "$MBI_SANDBOX_KEY:"
with MBI_SANDBOX_KEY set to the restricted key below, or from Python:
  import stripe
  client = stripe.StripeClient("<restricted key>", base_addresses={{"api": "{sandbox.api_url}"}})
  client.v1.charges.list({{"limit": 3}})

Restricted key (sandbox only, valid while this process runs): {sandbox.restricted_key}
Connect sign-in for {account.business_name}: {account.email} / {account.password}
Sandbox clock: {_iso(sandbox.now)}
Press Ctrl-C to stop.""", flush=True))
    finally:
        sandbox.stop()
    return 0


def _iso(timestamp: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_relay(args: argparse.Namespace) -> int:
    import logging
    import os
    from urllib.parse import urlsplit

    import uvicorn

    from mbi_widgets.oauth import is_loopback
    from mbi_widgets.relay import config_from_env, create_app

    secret = os.environ.get(args.secret_key_env)
    if not secret:
        print(f"mbi-widgets relay: set {args.secret_key_env} to the platform's Stripe secret key (it is never "
              "taken on the command line, so it stays out of shell history)", file=sys.stderr)
        return 2
    public_url = args.public_url or f"http://{args.host}:{args.port}"
    config = config_from_env(client_id=args.client_id, secret_key=secret, public_url=public_url,
                             connect_url=args.connect_url, api_url=args.api_url, db_path=args.db)
    if urlsplit(public_url).scheme != "https" and not is_loopback(public_url):
        # Browsers would send OAuth codes in the clear, and drop the relay's Secure sign-in cookie anyway.
        print(f"mbi-widgets relay: the public URL {public_url} is not https: serve the relay behind https (a "
              "reverse proxy terminating TLS, named with --forwarded-allow-ips) and pass --public-url https://...; "
              "plain http works on loopback only", file=sys.stderr)
        return 2
    app = create_app(config)  # opens the database and its token key: a bad key fails here, before "serving"
    if args.db is None and os.path.exists("mbi-relay.sqlite3"):
        logging.getLogger("mbi_widgets.relay").warning(
            "mbi-relay.sqlite3 in this folder is an older relay's database, which kept tokens in plain text; the "
            "relay now uses %s. Delete mbi-relay.sqlite3 and its -wal/-shm files.", config.db_path)
    print(f"mbi-widgets relay: serving {public_url} (device page {public_url.rstrip('/')}/device, Connect "
          f"redirect URI to register: {config.callback_url})", flush=True)
    # Forwarded headers only from the proxies named: otherwise anyone could pick the address the throttles count.
    proxies = {"proxy_headers": True, "forwarded_allow_ips": args.forwarded_allow_ips} if args.forwarded_allow_ips \
        else {"proxy_headers": False}
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **proxies)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbi-widgets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_ in (
        ("sandbox", cmd_sandbox, "serve the Stripe sandbox and print one JSON line with its URLs and test keys"),
        ("demo", cmd_demo, "start JupyterLab on the onboarding notebooks, wired to the embedded sandbox"),
    ):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
        sub.add_argument("--scale", type=_scale, default="demo", help="demo, bench or a number of customers")
        sub.add_argument("--latency-ms", type=float, default=0, help="latency added to every request")
        sub.add_argument("--rate-limits", choices=("test", "live"), default=None,
                         help="enforce Stripe's test- or live-mode rate limits")
        sub.add_argument("--advance-days", type=_days, default=0.0, metavar="N",
                         help="start the sandbox's clock N days (may be fractional) after its default start")
        sub.add_argument("--horizon-days", type=_horizon, default=60, metavar="N",
                         help="how many days past its start the sandbox's clock can advance (default 60)")
        sub.set_defaults(handler=handler, usage_error=sub.error)
        if name == "demo":
            sub.add_argument("--sandbox-only", action="store_true",
                             help="serve only the sandbox and print how to reach it (no JupyterLab)")
    relay = commands.add_parser("relay", help="serve the device-style authorization relay for a Connect platform")
    relay.add_argument("--client-id", help="the platform's Connect client ID (ca_...); or MBI_RELAY_CLIENT_ID")
    relay.add_argument("--secret-key-env", default="MBI_RELAY_SECRET_KEY",
                       help="environment variable holding the platform's secret key (default MBI_RELAY_SECRET_KEY)")
    relay.add_argument("--public-url", help="the relay's public base URL (default http://HOST:PORT)")
    relay.add_argument("--connect-url", help="Connect base URL (default https://connect.stripe.com)")
    relay.add_argument("--api-url", help="Stripe API base URL (default https://api.stripe.com)")
    relay.add_argument("--db", help="SQLite database of device sessions, created 0600 (default "
                       "mbi-relay/sessions.sqlite3); tokens in it are encrypted with MBI_RELAY_TOKEN_KEY, or else "
                       "with a key file created beside it")
    relay.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    relay.add_argument("--port", type=int, default=8765)
    relay.add_argument("--forwarded-allow-ips", metavar="IPS",
                       help="comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto to trust "
                            "(default: none, so the throttles count the connecting address)")
    relay.set_defaults(handler=cmd_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "advance_days", 0) > getattr(args, "horizon_days", math.inf):
        args.usage_error(f"--advance-days {args.advance_days:g} is beyond --horizon-days {args.horizon_days}: "
                         "the sandbox simulates only that far; raise --horizon-days")
    try:
        return args.handler(args)
    except MbiError as exc:
        print(f"mbi-widgets: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
