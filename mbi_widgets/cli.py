"""The `mbi-widgets` command line: sub-commands over the same functions the notebooks call."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Sequence

from mbi_widgets.errors import MbiError


def _scale(value: str) -> str | int:
    if value in ("demo", "bench"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError("scale is 'demo', 'bench' or a number of customers")


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


def _start_sandbox(args: argparse.Namespace):
    from mbi_widgets.sandbox import Sandbox

    return Sandbox(seed=args.seed, scale=args.scale, latency_ms=args.latency_ms, rate_limits=args.rate_limits,
                   port=args.port).start()


def cmd_sandbox(args: argparse.Namespace) -> int:
    sandbox = _start_sandbox(args)
    try:
        # Exactly one JSON line on stdout, so scripts can read it; then serve until interrupted.
        print(json.dumps(sandbox.connection_info()), flush=True)
        _wait_for_interrupt()
    finally:
        sandbox.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    sandbox = _start_sandbox(args)
    account = sandbox.accounts[0]
    try:
        print(f"""mbi-widgets demo: the Stripe sandbox is serving at {sandbox.api_url}

Try it (the restricted key reads {account.business_name}'s data):
  curl -s '{sandbox.api_url}/v1/charges?limit=3' -u "$MBI_SANDBOX_KEY:"
with MBI_SANDBOX_KEY set to the restricted key below, or from Python:
  import stripe
  client = stripe.StripeClient("<restricted key>", base_addresses={{"api": "{sandbox.api_url}"}})
  client.v1.charges.list({{"limit": 3}})

Restricted key (sandbox only, valid while this process runs): {sandbox.restricted_key}
Connect sign-in for {account.business_name}: {account.email} / {account.password}
Press Ctrl-C to stop.""", flush=True)
        _wait_for_interrupt()
    finally:
        sandbox.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbi-widgets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, help_ in (
        ("sandbox", cmd_sandbox, "serve the Stripe sandbox and print one JSON line with its URLs and test keys"),
        ("demo", cmd_demo, "start the demo on the embedded sandbox"),
    ):
        sub = commands.add_parser(name, help=help_)
        sub.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
        sub.add_argument("--seed", type=int, default=0, help="seed of the generated data (default 0)")
        sub.add_argument("--scale", type=_scale, default="demo", help="demo, bench or a number of customers")
        sub.add_argument("--latency-ms", type=float, default=0, help="latency added to every request")
        sub.add_argument("--rate-limits", choices=("test", "live"), default=None,
                         help="enforce Stripe's test- or live-mode rate limits")
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MbiError as exc:
        print(f"mbi-widgets: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
