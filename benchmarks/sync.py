"""What a warehouse sync costs next to `StripeSource.tables()`, against the sandbox playing Stripe.

    python -m benchmarks.sync [--latency-ms 300] [--workers N]

The sandbox runs in its own process at scale "bench", enforcing Stripe's test-mode rate limits
(25 requests/s per account and per endpoint) and adding per-request latency like api.stripe.com.
Measured, in one run (a fresh StripeSource for each of the three fetches):
1. `StripeSource.tables()` (all ten tables), then a first, full `Warehouse.sync` into a fresh
   DuckDB file on the same server: seconds and requests of each, and their ratio;
2. the sandbox moved on one day, an incremental sync: its requests and seconds next to the
   full sync's, and its per-table report;
3. every table read back from the warehouse into pandas: rows and seconds, the file's size on
   disk and the peak RSS of this process;
4. the memory of those DataFrames: string columns as loaded (pyarrow-backed) and the same frames
   with python-object strings (`pd.StringDtype("python")`).
Each figure is printed on its own line with its target.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import requests

from benchmarks import sandbox_process
from mbi_widgets.tables.schema import ALL_TABLES
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.warehouse import Warehouse

MODE = "test"
#: Targets.
SYNC_OVER_TABLES = 1.1
INCREMENTAL_SHARE = 0.05
READ_SECONDS = 1.0


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def advance(info: dict, days: float) -> int:
    """Moves the sandbox clock (re-rendering the bench account takes several seconds)."""
    answer = requests.post(f"{info['api_url']}/_sandbox/advance", data={"days": days},
                           headers={"Authorization": f"Bearer {info['secret_key']}"}, timeout=300)
    answer.raise_for_status()
    return int(answer.json()["now"])


def file_size(path: Path) -> int:
    """The warehouse file and its write-ahead log, if any."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".wal")) if p.exists())


def string_columns(frame: pd.DataFrame) -> list[str]:
    return [name for name, dtype in frame.dtypes.items() if isinstance(dtype, pd.StringDtype)]


def memory(frames: dict[str, pd.DataFrame]) -> int:
    return sum(int(frame.memory_usage(deep=True, index=True).sum()) for frame in frames.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=300)
    parser.add_argument("--workers", type=int, default=None,
                        help="StripeSource workers (default: the library's, sized to the rate limits)")
    args = parser.parse_args(argv)

    begun = time.perf_counter()
    options = ("--scale", "bench", "--rate-limits", MODE, "--latency-ms", str(args.latency_ms))
    with sandbox_process(*options) as info, tempfile.TemporaryDirectory(prefix="mbi-bench-sync-") as tmp:
        print(f"{MODE} mode limits, {args.latency_ms:.0f} ms latency per request, scale=bench, "
              f"{args.workers or 'default'} workers:")

        def source() -> StripeSource:
            return StripeSource(info["restricted_key"], api_base=info["api_url"], rate_limits=MODE,
                                workers=args.workers)

        # 1. tables() then the first (full) sync, on the same server and the same rate limits.
        plain = source()
        started = time.perf_counter()
        frames = plain.tables()
        tables_seconds = time.perf_counter() - started
        tables_stats = plain.last_stats
        tables_rows = sum(len(frame) for frame in frames.values())
        del frames
        print(f"  StripeSource.tables(): {tables_rows:,} rows, {tables_stats.requests:,} requests in "
              f"{tables_seconds:.1f} s (fetching {tables_stats.seconds:.1f} s, the rest building the frames; "
              f"the rate limits allow these requests in {tables_stats.floor_seconds(plain.rate_limits):.1f} s at best)")

        wh = Warehouse(Path(tmp) / "warehouse.duckdb")
        syncing = source()
        full = wh.sync(syncing)
        fetch_seconds = syncing.last_stats.seconds
        ratio = full.seconds / tables_seconds
        print(f"  first sync (full): {full.requests:,} requests in {full.seconds:.1f} s (fetching {fetch_seconds:.1f} s, "
              f"the rest building frames, planning and writing DuckDB; the rate limits allow these requests in "
              f"{syncing.last_stats.floor_seconds(syncing.rate_limits):.1f} s at best)")
        commits = sorted(full.tables.values(), key=lambda t: -t.seconds)
        print(f"  full sync, writing each table to DuckDB: {sum(t.seconds for t in commits):.1f} s ("
              + ", ".join(f"{t.table} {t.seconds:.1f} s" for t in commits) + ")")
        print(f"  full sync / tables() time: {ratio:.2f}x (target <= {SYNC_OVER_TABLES}x): {verdict(ratio <= SYNC_OVER_TABLES)}")
        print(f"  full sync / tables() requests: {full.requests / tables_stats.requests:.2f}x "
              f"({full.requests:,} vs {tables_stats.requests:,})")

        # 2. One day later: the incremental sync.
        started = time.perf_counter()
        now = advance(info, 1)
        print(f"  sandbox advanced 1 day to {pd.Timestamp(now, unit='s', tz='UTC'):%Y-%m-%d %H:%M} UTC "
              f"in {time.perf_counter() - started:.1f} s")
        incremental = wh.sync(source())
        share = incremental.requests / full.requests
        print(f"  incremental sync: {incremental.requests:,} requests in {incremental.seconds:.1f} s")
        print(f"  incremental / full sync requests: {share:.1%} (target <= {INCREMENTAL_SHARE:.0%}): "
              f"{verdict(share <= INCREMENTAL_SHARE)}")
        print(f"  incremental / full sync time: {incremental.seconds / full.seconds:.1%}")
        print("  " + str(incremental).replace("\n", "\n  "))

        # 3. Every table read back into pandas: all at once (one connection), best of three, then one by one.
        attempts = []
        for _ in range(3):
            started = time.perf_counter()
            loaded = wh.tables(ALL_TABLES)
            attempts.append(time.perf_counter() - started)
        rows = sum(len(frame) for frame in loaded.values())
        read_seconds = min(attempts)
        print(f"  read all {len(loaded)} tables back with wh.tables(): {rows:,} rows in {read_seconds:.2f} s "
              f"(best of 3; first {attempts[0]:.2f} s) (target < {READ_SECONDS:.0f} s): "
              f"{verdict(read_seconds < READ_SECONDS)}")
        reads = {}
        for name in ALL_TABLES:
            started = time.perf_counter()
            wh.table(name)
            reads[name] = time.perf_counter() - started
        slowest = sorted(reads, key=reads.get, reverse=True)[:4]
        print(f"  one by one with wh.table(): {sum(reads.values()):.2f} s; slowest: "
              + ", ".join(f"{name} {reads[name]:.2f} s ({len(loaded[name]):,} rows)" for name in slowest))
        print(f"  warehouse file on disk: {file_size(wh.path) / 1e6:.1f} MB")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        print(f"  peak RSS of this process (fetches, syncs and reads): {peak / 1024:.0f} MB")

        # 4. Memory of the frames: pyarrow-backed strings (pandas 3's default) vs python objects.
        arrow_bytes = memory(loaded)
        storages = sorted({frame[c].dtype.storage for frame in loaded.values() for c in string_columns(frame)})
        count = sum(len(string_columns(frame)) for frame in loaded.values())
        as_objects = {name: frame.astype({c: pd.StringDtype("python") for c in string_columns(frame)})
                      for name, frame in loaded.items()}
        object_bytes = memory(as_objects)
        print(f"  DataFrames in memory, strings as loaded ({count} string columns, storage "
              f"{'/'.join(storages)}): {arrow_bytes / 1e6:.1f} MB")
        print(f"  DataFrames in memory, python-object strings: {object_bytes / 1e6:.1f} MB")
        print(f"  python-object / pyarrow strings: {object_bytes / arrow_bytes:.2f}x")
    print(f"benchmark wall time, sandbox start to stop: {time.perf_counter() - begun:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
