"""CPU per page: shaping 100 charges into typed columns, next to `pd.json_normalize` (untyped), in one run.

    python -m benchmarks.shaping [--rounds 200]

The page is a real `GET /v1/charges?limit=100` answer of the in-process sandbox (scale "demo").
Figures, in milliseconds per page (median of `--rounds` rounds, after a warm-up):
- parse: `orjson.loads` of the body;
- ours: `Shaper` rows for the page, then its typed frame (every expected column with its dtype);
- json_normalize: `pd.json_normalize(objects, sep="__")` on the parsed objects (object columns, no dtypes);
- StripeObjects: what stripe-python builds for the same body (`convert_to_stripe_object`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import orjson
import pandas as pd
import requests
import stripe

from mbi_widgets.sandbox import Sandbox
from mbi_widgets.tables.schema import schema
from mbi_widgets.tables.shape import Shaper


def charges_page() -> bytes:
    """The body of one page of 100 charges, as the sandbox serves it."""
    with Sandbox(seed=0, scale="demo") as sandbox:
        answer = requests.get(f"{sandbox.api_url}/v1/charges", params={"limit": 100},
                              auth=(sandbox.restricted_key, ""), timeout=30)
        answer.raise_for_status()
        return answer.content


def milliseconds(fn: Callable[[], object], rounds: int) -> float:
    """Median milliseconds of one call, after a few warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)

    body = charges_page()
    objects = orjson.loads(body)["data"]
    shaper = Shaper(schema("charges"))
    ours_frame = shaper.frame(shaper.row(obj) for obj in objects)
    normalized = pd.json_normalize(objects, sep="__")
    parse = milliseconds(lambda: orjson.loads(body), args.rounds)
    ours = milliseconds(lambda: shaper.frame(shaper.row(obj) for obj in objects), args.rounds)
    untyped = milliseconds(lambda: pd.json_normalize(objects, sep="__"), args.rounds)
    as_objects = milliseconds(lambda: stripe.convert_to_stripe_object(orjson.loads(body)), args.rounds)
    print(f"A page of {len(objects)} charges ({len(body):,} bytes), median ms of {args.rounds} rounds:")
    print(f"  parse (orjson)                 {parse:6.2f} ms")
    print(f"  ours: rows + typed frame       {ours:6.2f} ms  ({ours_frame.shape[1]} typed columns)")
    print(f"  pd.json_normalize (untyped)    {untyped:6.2f} ms  ({normalized.shape[1]} object/inferred columns)")
    print(f"  stripe-python StripeObjects    {as_objects:6.2f} ms")
    print(f"  ours / json_normalize: {ours / untyped:.2f}x (budget at 100 pages/s: 10 ms for everything)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
