"""How close StripeSource gets to Stripe's rate-limit ceiling, against the sandbox playing Stripe.

    python -m benchmarks.tables [--latency-ms 300] [--seconds 10]

The sandbox runs in its own process at scale "bench", enforcing Stripe's rate limits and adding
per-request latency like api.stripe.com. Compared, in one run:
- a plain sequential pager (stripe-python's `auto_paging_iter`, one request at a time);
- `StripeSource.table("charges")` (one table: at most 25 pages/s per endpoint);
- `StripeSource.tables()` (all tables at once under one budget: 25 requests/s per account in
  test mode, 100/s in live mode, and still 25/s per endpoint);
- in live mode, each strategy in turn: the list endpoints only (`search=False`), and the Search
  API as a second lane (`search=True`), for `charges` alone and for all ten tables;
each reported against the least time Stripe's limits allow for the requests it made: with the
per-endpoint limits (the busiest endpoint at 25/s), and the account floor (requests / 100 per s);
and, CPU only, the cost of shaping a page into columns next to parsing it (`benchmarks.shaping`
compares it with `pd.json_normalize`). Times are whole calls: fetching and building the frames.
"""
from __future__ import annotations

import argparse
import sys
import time

import orjson
import requests
import stripe

from benchmarks import sandbox_process
from mbi_widgets.ratelimits import SEARCH_ENDPOINT
from mbi_widgets.tables.schema import schema
from mbi_widgets.tables.shape import Shaper
from mbi_widgets.tables.source import StripeSource


def sequential_pager(info: dict, seconds: float) -> float:
    """Objects/s of stripe-python's auto-pager, the way most scripts read a table."""
    client = stripe.StripeClient(info["restricted_key"], base_addresses={"api": info["api_url"]})
    started, count = time.perf_counter(), 0
    for _ in client.v1.charges.list({"limit": 100}).auto_paging_iter():
        count += 1
        if count % 100 == 0 and time.perf_counter() - started > seconds:
            break
    return count / (time.perf_counter() - started)


def shaping_cost(info: dict) -> tuple[float, float, float]:
    """Milliseconds per page of 100 charges: orjson parse, our shaping (rows per page, the frame
    built once per table and spread over 50 pages), and stripe-python's StripeObjects."""
    body = requests.get(f"{info['api_url']}/v1/charges", params={"limit": 100},
                        auth=(info["restricted_key"], ""), timeout=30).content
    shaper = Shaper(schema("charges"))
    rounds = 30

    def timed(fn) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - started) / rounds * 1000

    objects = orjson.loads(body)["data"]
    parse = timed(lambda: orjson.loads(body))
    shape = timed(lambda: shaper.frame([shaper.row(o) for _ in range(50) for o in objects])) / 50
    as_objects = timed(lambda: stripe.convert_to_stripe_object(orjson.loads(body)))
    return parse, shape, as_objects


def report(label: str, source: StripeSource, frames: dict, seconds: float) -> float:
    """Prints one load's line; returns its rows/s. `seconds` is the whole call, frames included."""
    stats = source.last_stats
    rows = sum(len(frame) for frame in frames.values())
    floor = stats.floor_seconds(source.rate_limits)
    account_floor = stats.requests / source.rate_limits.per_account
    searches = stats.by_endpoint.get(SEARCH_ENDPOINT, 0)
    print(f"  {label}: {rows:,} rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s; "
          f"{stats.requests:,} requests ({stats.requests / seconds:.1f}/s, {searches} on search); least time "
          f"the limits allow these requests: {floor:.1f} s with the per-endpoint limits "
          f"({floor / seconds:.0%} of that ceiling), {account_floor:.1f} s at the account's "
          f"{source.rate_limits.per_account:g}/s: {seconds / account_floor:.2f}x the account floor; "
          f"{stats.windows} windows, {stats.rate_limited} answered 429")
    return rows / seconds


def timed_load(load) -> tuple[dict, float]:
    """A load's frames and its wall time (fetching and building the frames)."""
    started = time.perf_counter()
    frames = load()
    return frames, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=10, help="how long to run the sequential pager")
    args = parser.parse_args(argv)

    with sandbox_process("--scale", "bench", "--rate-limits", "test", "--latency-ms", str(args.latency_ms)) as info:
        print(f"test mode limits, {args.latency_ms:.0f} ms latency per request, scale=bench:")
        pager = sequential_pager(info, args.seconds)
        print(f"  sequential auto_paging_iter on charges: {pager:,.0f} rows/s")
        source = StripeSource(info["restricted_key"], api_base=info["api_url"], rate_limits="test")
        frames, seconds = timed_load(lambda: {"charges": source.table("charges")})
        rate = report("StripeSource.table('charges')", source, frames, seconds)
        print(f"  speed-up over the sequential pager: {rate / pager:.1f}x")
        report("StripeSource.tables() (all ten)", source, *timed_load(source.tables))
        parse, shape, as_objects = shaping_cost(info)
        print(f"CPU per page of 100 charges: parse {parse:.1f} ms, shape into columns {shape:.1f} ms, "
              f"stripe-python StripeObjects {as_objects:.1f} ms (budget at 100 pages/s: 10 ms)")
    with sandbox_process("--scale", "bench", "--rate-limits", "live", "--latency-ms", str(args.latency_ms)) as info:
        print(f"live mode limits (100/s per account, 25/s per endpoint, 20/s for search), {args.latency_ms:.0f} ms "
              "latency per request, scale=bench; each strategy in turn:")
        rates = {}
        for strategy, search in (("list only", False), ("list + search", True)):
            source = StripeSource(info["restricted_key"], api_base=info["api_url"], rate_limits="live", search=search)
            frames, seconds = timed_load(lambda: {"charges": source.table("charges")})
            rates[strategy] = report(f"charges, {strategy}", source, frames, seconds)
            report(f"all ten tables, {strategy}", source, *timed_load(source.tables))
        print(f"  charges alone: list + search reads {rates['list + search'] / rates['list only']:.2f}x the list-only "
              "rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
