"""How fast the sandbox generates `scale="bench"` and serves pages of 100 charges.

    python -m benchmarks.sandbox [--seconds 5] [--connections 1 4]

The server runs in its own process (`mbi-widgets sandbox`), so it gets one core of its own and
the figures are the server's, not this client's. Clients read raw bytes without parsing JSON.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import requests

from benchmarks import sandbox_process
from mbi_widgets.sandbox import Sandbox

SEVEN = ("customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events")


def measure_generation() -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    sandbox = Sandbox(scale="bench")
    dataset = sandbox.dataset()
    elapsed = time.perf_counter() - started
    return elapsed, {name: dataset.count(name) for name in SEVEN}


def cursors(api_url: str, key: str) -> list[str | None]:
    """Every page's `starting_after` cursor over the whole charges list."""
    found: list[str | None] = [None]
    session = requests.Session()
    session.auth = (key, "")
    after = None
    while True:
        params = {"limit": 100, **({"starting_after": after} if after else {})}
        page = session.get(f"{api_url}/v1/charges", params=params, timeout=30).json()
        if not page["has_more"]:
            return found
        after = page["data"][-1]["id"]
        found.append(after)


def serve_pages(api_url: str, key: str, pages: list[str | None], connections: int, seconds: float) -> tuple[int, int]:
    """(pages, bytes) served to `connections` concurrent clients in `seconds`."""
    stop = time.perf_counter() + seconds
    totals = [[0, 0] for _ in range(connections)]

    def worker(index: int) -> None:
        session = requests.Session()
        session.auth = (key, "")
        position = index * 7
        while time.perf_counter() < stop:
            after = pages[position % len(pages)]
            params = {"limit": 100, **({"starting_after": after} if after else {})}
            response = session.get(f"{api_url}/v1/charges", params=params, timeout=30)
            response.raise_for_status()
            totals[index][0] += 1
            totals[index][1] += len(response.content)
            position += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)

    elapsed, counts = measure_generation()
    print(f"generate scale=bench: {elapsed:.1f} s for {sum(counts.values()):,} objects in the seven tables "
          f"({', '.join(f'{k} {v:,}' for k, v in counts.items())})")

    with sandbox_process("--scale", "bench") as info:
        api_url, key = info["api_url"], info["restricted_key"]
        pages = cursors(api_url, key)
        for connections in args.connections:
            served, size = serve_pages(api_url, key, pages, connections, args.seconds)
            rate = served / args.seconds
            print(f"serve charges, limit=100, {connections} connection(s): {rate:,.0f} pages/s, "
                  f"{rate * 100:,.0f} objects/s, {size / args.seconds / 1e6:,.1f} MB/s "
                  f"(server in one process, {len(pages):,} distinct pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
