"""`Warehouse`: the Stripe tables kept in an embedded DuckDB file, brought up to date from Stripe's events.

    wh = Warehouse()                       # warehouse.duckdb beside the connections registry
    report = wh.sync(source)               # the first sync of a table is full, later ones incremental
    wh.table("subscriptions")              # a DataFrame with StripeSource's columns and dtypes
    wh.sql("select status, count(*) from subscriptions group by 1")

A table's incremental sync lists the objects created since its high-water mark (minus a
lookback, as objects can list a little after their `created`), and re-fetches, as they are
now, the objects that Stripe's events say changed since the table's cursor. Event payloads only
say *which* objects changed: they are rendered at the account's API version and cut embedded
lists at 10 entries. Deleted objects stay as rows with `deleted_at` set. A cursor older than
Stripe's 30-day events window, or a key that may not read events, means a full refresh of that
table, said in the report. Coupons and plans are small and change without events
(`times_redeemed`), so each sync re-reads them whole.

Each table commits in one transaction together with its cursor, so a failed sync leaves the
previous state, and the next sync is exact. Writers take a lock file; a second writer waits,
then gets a clear error.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mbi_widgets.errors import MbiError
from mbi_widgets.registry import default_registry_path
from mbi_widgets.secretstore import ensure_private_dir
from mbi_widgets.tables.schema import ALL_TABLES, TableSchema, schema
from mbi_widgets.tables.source import Fetched, StripeSource, TableRequest

__all__ = ["Warehouse", "SyncReport", "TableSync", "WarehouseError", "WarehouseLocked", "default_warehouse_path"]

HOME_ENV = "MBI_WIDGETS_HOME"
#: Stripe lists events of the last 30 days; a cursor older than this (a day's margin) means a full refresh.
EVENTS_WINDOW = 30 * 86_400
WINDOW_MARGIN = 86_400
#: Objects can appear in lists a little after their `created`: incremental lists reach back this far.
LOOKBACK = 300
#: Small tables whose objects change without events; every sync re-reads them whole.
REREAD_TABLES = ("coupons", "plans")
#: Tables whose objects Stripe never deletes and whose list forgets old ones (events: 30 days).
ACCUMULATING = ("events",)
_META = "mbi_meta"
_DTYPES_SQL = {"string": "VARCHAR", "Int64": "BIGINT", "Float64": "DOUBLE", "boolean": "BOOLEAN",
               "datetime64[ns, UTC]": "TIMESTAMPTZ"}
_ALWAYS = ("id", "created")
_PROCESS_LOCKS: dict[str, threading.RLock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


class WarehouseError(MbiError):
    """The warehouse could not do what was asked; the message names the file and the way out."""


class WarehouseLocked(WarehouseError):
    """Another process is writing to the warehouse (a sync in another kernel)."""


def default_warehouse_path() -> Path:
    """`$MBI_WIDGETS_HOME/warehouse.duckdb`, else beside the connections registry."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser() / "warehouse.duckdb"
    return default_registry_path().with_name("warehouse.duckdb")


# --- the report ------------------------------------------------------------------------------------

@dataclass
class TableSync:
    """What one table's sync did."""

    table: str
    mode: str  # "full" or "incremental"
    reason: str
    added: int = 0
    updated: int = 0
    deleted: int = 0
    requests: int = 0
    #: Time spent writing this table (fetching is shared by every table of the sync: see the report's).
    seconds: float = 0.0
    rows: int = 0


@dataclass
class SyncReport:
    """Per table: the mode used and why, rows added, updated and deleted, requests and seconds."""

    account: str
    tables: dict[str, TableSync] = field(default_factory=dict)
    requests: int = 0
    seconds: float = 0.0
    #: Stripe's clock when the sync started (the new events cursor).
    server_time: datetime | None = None
    #: Tables left out, and why (the events table, for a key that may not read events).
    skipped: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, table: str) -> TableSync:
        return self.tables[table]

    @property
    def added(self) -> int:
        return sum(t.added for t in self.tables.values())

    @property
    def updated(self) -> int:
        return sum(t.updated for t in self.tables.values())

    @property
    def deleted(self) -> int:
        return sum(t.deleted for t in self.tables.values())

    def frame(self) -> pd.DataFrame:
        rows = [{"table": t.table, "mode": t.mode, "added": t.added, "updated": t.updated, "deleted": t.deleted,
                 "rows": t.rows, "requests": t.requests, "seconds": round(t.seconds, 2), "why": t.reason}
                for t in self.tables.values()]
        rows += [{"table": table, "mode": "skipped", "added": 0, "updated": 0, "deleted": 0, "rows": 0,
                  "requests": 0, "seconds": 0.0, "why": why} for table, why in self.skipped.items()]
        return pd.DataFrame(rows, columns=["table", "mode", "added", "updated", "deleted", "rows", "requests",
                                           "seconds", "why"])

    def __str__(self) -> str:
        lines = [f"Synced {len(self.tables)} table(s) of {self.account} in {self.seconds:.1f} s, "
                 f"{self.requests:,} requests: {self.added:,} added, {self.updated:,} updated, "
                 f"{self.deleted:,} deleted"]
        for t in self.tables.values():
            lines.append(f"  {t.table}: {t.mode} ({t.reason}); +{t.added:,} ~{t.updated:,} -{t.deleted:,}, "
                         f"{t.rows:,} rows, {t.requests:,} requests")
        for table, why in self.skipped.items():
            lines.append(f"  {table}: skipped ({why})")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<p>{self.__str__().splitlines()[0]}</p>" + self.frame().to_html(index=False)


# --- the warehouse ---------------------------------------------------------------------------------

class Warehouse:
    """Each connected account's Stripe tables in one DuckDB file; `sync` keeps them current.

    `path` None is the default file (`default_warehouse_path()`). `lock_timeout` is how long a
    writer waits for another process's sync before raising `WarehouseLocked`.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, lock_timeout: float = 30.0,
                 lookback: int = LOOKBACK) -> None:
        self.path = Path(path).expanduser() if path is not None else default_warehouse_path()
        self.lock_timeout = lock_timeout
        self.lookback = lookback
        ensure_private_dir(self.path.parent)  # customers' names and emails: a 0700 folder when we create it
        fresh = not self.path.exists()
        with _PROCESS_LOCKS_GUARD:
            # Writers of one file in this process take turns; readers never wait for a sync's fetching.
            self._write_lock = _PROCESS_LOCKS.setdefault(str(self.path.resolve()), threading.RLock())
        with self._connect() as con:
            _exec(con, f"CREATE SCHEMA IF NOT EXISTS {_META}")
            _exec(con, f"""CREATE TABLE IF NOT EXISTS {_META}.state (
                account VARCHAR, table_name VARCHAR, cursor BIGINT, high_water BIGINT, mode VARCHAR, reason VARCHAR,
                last_started TIMESTAMPTZ, last_seconds DOUBLE, last_requests BIGINT, columns VARCHAR,
                PRIMARY KEY (account, table_name))""")
            _exec(con, f"""CREATE TABLE IF NOT EXISTS {_META}.selection (
                account VARCHAR, table_name VARCHAR, synced BOOLEAN, columns VARCHAR,
                PRIMARY KEY (account, table_name))""")
        if fresh:
            os.chmod(self.path, 0o600)

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    # --- reading --------------------------------------------------------------------------------

    def accounts(self) -> list[str]:
        """The accounts with at least one synced table."""
        with self._connect() as con:
            return self._accounts_in(con)

    @staticmethod
    def _accounts_in(con: duckdb.DuckDBPyConnection) -> list[str]:
        return [row[0] for row in con.execute(f"SELECT DISTINCT account FROM {_META}.state ORDER BY 1").fetchall()]

    def table(self, table: str, *, account: str | None = None, columns: Iterable[str] | None = None,
              include_deleted: bool = False) -> pd.DataFrame:
        """A synced table with StripeSource's columns and dtypes, newest first.

        Deleted objects are left out unless `include_deleted`, which also adds the `deleted_at`
        and `synced_at` columns.
        """
        schema(table)  # UnknownTableError lists the valid names
        with self._connect() as con:
            return self._read(con, self._account(account, con=con), table, columns, include_deleted)

    def tables(self, names: Iterable[str] | None = None, *, account: str | None = None,
               include_deleted: bool = False) -> dict[str, pd.DataFrame]:
        """Every synced table (or `names`), read in one go."""
        with self._connect() as con:
            account = self._account(account, con=con)
            stored = self._all_stored_columns(con, account)
            names = [t for t in ALL_TABLES if t in stored] if names is None else list(names)
            for name in names:
                schema(name)
            # One cursor per table, read in parallel: DuckDB scans without holding the GIL.
            with ThreadPoolExecutor(max_workers=4, thread_name_prefix="mbi-read") as pool:
                frames = pool.map(lambda name: self._read(con.cursor(), account, name, None, include_deleted,
                                                          stored.get(name)), names)
                return dict(zip(names, frames))

    def _read(self, con: duckdb.DuckDBPyConnection, account: str, table: str, columns: Iterable[str] | None,
              include_deleted: bool, stored: list[str] | None = None) -> pd.DataFrame:
        target = schema(table)
        if stored is None:
            stored = self._stored_columns(con, account, table)
        if stored is None:
            raise WarehouseError(f"{table} of {account} has not been synced yet: run wh.sync(source, "
                                 f"tables=[{table!r}]) first.", code="not_synced")
        wanted = [c for c in target.column_names if c in stored]
        if columns is not None:
            columns = list(columns)
            unknown = [c for c in columns if c not in target.column_names]
            if unknown:
                raise WarehouseError(f"{table} has no column(s) {', '.join(map(repr, unknown))}; "
                                     f"its columns are: {', '.join(target.column_names)}", code="unknown_column")
            missing = [c for c in columns if c not in stored]
            if missing:
                raise WarehouseError(f"column(s) {', '.join(map(repr, missing))} of {table} are not synced: add "
                                     f"them with wh.select({table!r}, columns=...) and sync again.",
                                     code="column_not_synced")
            wanted = columns
        extra = ["deleted_at", "synced_at"] if include_deleted else []
        where = "" if include_deleted else " WHERE deleted_at IS NULL"
        arrow = con.sql(f"SELECT {', '.join(_q(c) for c in wanted + extra)} FROM {_qual(account, table)}{where}"
                        ).to_arrow_table()
        keys = [k for k in _order_keys(target) if k in arrow.column_names]
        if keys and arrow.num_rows > 1:
            order = pc.sort_indices(arrow.select(keys), sort_keys=[(k, "descending") for k in keys])
            # Tables are written newest first, so most reads need no reordering (a copy of every column).
            if not pc.all(pc.equal(order, pa.array(range(arrow.num_rows), order.type))).as_py():
                arrow = arrow.take(order)
        frame = _to_pandas(arrow)
        dtypes = {**target.dtypes, "deleted_at": "datetime64[ns, UTC]", "synced_at": "datetime64[ns, UTC]"}
        return frame.astype({c: dtypes[c] for c in frame.columns if str(frame[c].dtype) != dtypes[c]})

    def sql(self, query: str, *, account: str | None = None) -> pd.DataFrame:
        """A SQL query (DuckDB) over the warehouse. Tables are `<account>.<table>`; with one
        account (or `account` given) its tables are also reachable by their bare names."""
        with self._connect() as con:
            accounts = self._accounts_in(con)
            chosen = account if account is not None else (accounts[0] if len(accounts) == 1 else None)
            if chosen is not None:
                _exec(con, f"SET search_path = '{_schema_name(chosen)},main'")
            try:
                relation = con.sql(query)
                if relation is None:
                    return pd.DataFrame()
                return _to_pandas(relation.to_arrow_table())
            except duckdb.Error as exc:
                raise WarehouseError(f"the query failed: {exc}", code="sql_error") from exc

    def last_synced(self) -> dict[str, dict[str, datetime]]:
        """When each table was last synced, per account: {account: {table: moment}} (one small query)."""
        with self._connect() as con:
            rows = con.execute(f"SELECT account, table_name, last_started FROM {_META}.state "
                               "WHERE last_started IS NOT NULL").fetchall()
        synced: dict[str, dict[str, datetime]] = {}
        for account, table, started in rows:
            synced.setdefault(account, {})[table] = pd.Timestamp(started).tz_convert("UTC").to_pydatetime()
        return synced

    def status(self, account: str | None = None) -> pd.DataFrame:
        """Per table: rows, deleted rows, columns synced, last sync, duration, mode, newest `created`
        ("last data point"), the events cursor and its age."""
        account = self._account(account)
        rows = []
        now = datetime.now(UTC)
        with self._connect() as con:
            states = {row[0]: row for row in con.execute(
                f"SELECT table_name, cursor, high_water, mode, reason, last_started, last_seconds, last_requests "
                f"FROM {_META}.state WHERE account = ?", [account]).fetchall()}
            for table in ALL_TABLES:
                state = states.get(table)
                stored = self._stored_columns(con, account, table)
                synced = self._selection(con, account, table)[0]
                live = deleted = 0
                newest = None
                if stored is not None:
                    created = "max(created)" if "created" in stored else "NULL"
                    live, deleted, newest = con.execute(
                        f"SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE deleted_at IS NOT NULL), "
                        f"{created} FROM {_qual(account, table)}").fetchall()[0]
                cursor = pd.Timestamp(state[1], unit="s", tz="UTC") if state and state[1] is not None else None
                started = pd.Timestamp(state[5]).tz_convert("UTC") if state and state[5] is not None else None
                rows.append({
                    "table": table, "synced": synced, "rows": live, "deleted_rows": deleted,
                    "columns": len(stored) - 2 if stored else 0,
                    "last_sync_started": started, "duration_s": state[6] if state else None,
                    "mode": state[3] if state else None, "why": state[4] if state else None,
                    "requests": state[7] if state else None,
                    "last_data_point": pd.Timestamp(newest).tz_convert("UTC") if newest is not None else None,
                    "events_cursor": cursor,
                    "cursor_age": (now - started) if started is not None else None,
                })
        frame = pd.DataFrame(rows)
        for name in ("last_sync_started", "last_data_point", "events_cursor"):
            frame[name] = pd.to_datetime(frame[name], utc=True)
        return frame

    # --- choosing what to sync (MBI's Data Warehouse Manager) --------------------------------------

    def select(self, table: str, columns: Iterable[str] | None = None, *, account: str | None = None,
               synced: bool = True) -> list[str]:
        """Chooses whether `table` is synced and which of its columns (None: all). `id` and `created`
        always stay. Dropped columns leave the warehouse now; added ones arrive with the next sync,
        which re-reads that table whole. Returns the selected columns."""
        target = schema(table)
        account = self._account(account, allow_new=True)
        if columns is None:
            chosen = target.column_names
        else:
            columns = list(columns)
            unknown = [c for c in columns if c not in target.column_names]
            if unknown:
                raise WarehouseError(f"{table} has no column(s) {', '.join(map(repr, unknown))}; its columns are: "
                                     f"{', '.join(target.column_names)}", code="unknown_column")
            keep = set(columns) | {c for c in _ALWAYS if c in target.column_names}
            if target.parent_key:
                keep.add(target.parent_key)
            chosen = [c for c in target.column_names if c in keep]
        with self._writing(), self._connect() as con:
            _exec(con, "BEGIN")
            try:
                _exec(con, f"INSERT OR REPLACE INTO {_META}.selection VALUES (?, ?, ?, ?)",
                            [account, table, synced, json.dumps(chosen)])
                stored = self._stored_columns(con, account, table)
                if stored is not None:
                    for column in [c for c in stored if c not in chosen and c not in ("deleted_at", "synced_at")]:
                        _exec(con, f"ALTER TABLE {_qual(account, table)} DROP COLUMN {_q(column)}")
                _exec(con, "COMMIT")
            except BaseException:
                _exec(con, "ROLLBACK")
                raise
        return chosen

    def selections(self, account: str | None = None) -> dict[str, tuple[bool, list[str]]]:
        """(synced?, columns) of every table, in one read (the Data Warehouse Manager draws them all)."""
        account = self._account(account, allow_new=True)
        with self._connect() as con:
            return {table: self._selection(con, account, table) for table in ALL_TABLES}

    def selection(self, table: str, *, account: str | None = None) -> tuple[bool, list[str]]:
        """(synced?, columns) for a table."""
        schema(table)
        account = self._account(account, allow_new=True)
        with self._connect() as con:
            return self._selection(con, account, table)

    # --- syncing ------------------------------------------------------------------------------------

    def sync(self, source: StripeSource, tables: Iterable[str] | None = None, *, full: bool = False,
             progress: Callable[[int, int | None], None] | None = None,
             table_progress: Callable[[str, int], None] | None = None,
             on_table: Callable[[TableSync], None] | None = None) -> SyncReport:
        """Brings `source`'s account up to date: every selected table, or `tables`.

        A child table is synced with its parent. On any error (network, revoked token, Ctrl-C)
        each table keeps its last committed state; tables committed before the error stay new.
        `table_progress(table, rows)` reports rows fetched per table, `on_table` each table once
        committed (its requests are counted at the end, in the report).
        """
        started = time.perf_counter()
        wall = datetime.now(UTC)
        account = source.account_id()
        names = self._resolve_tables(account, tables)
        with self._writing():
            with self._connect() as con:
                states = {row[0]: row for row in con.execute(
                    f"SELECT table_name, cursor, high_water, columns FROM {_META}.state WHERE account = ?",
                    [account]).fetchall()}
                # What each table holds now (select() may have dropped columns since its last sync).
                states = {name: (*row[:3], json.dumps([c for c in (self._stored_columns(con, account, name) or [])
                                                       if c not in ("deleted_at", "synced_at")]))
                          for name, row in states.items()}
                selections = {name: self._selection(con, account, name) for name in names}
            report = SyncReport(account)
            plan = self._plan(source, account, names, states, selections, full,
                              events_asked=tables is not None and "events" in tables)
            names = [name for name in names if name not in plan.skipped]
            report.skipped = dict(plan.skipped)
            fetched = (source.fetch(plan.requests, progress=progress, table_progress=table_progress)
                       if plan.requests else None)
            report.server_time = datetime.fromtimestamp(plan.clock, UTC)
            # Frames are built on a second thread while the tables before them are written (DuckDB
            # writes without holding the GIL), so the two overlap on a multi-core machine.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbi-frames") as builder:
                if fetched is not None:
                    for name in names:
                        if name in fetched.names:
                            builder.submit(fetched.frame, name)
                try:
                    for name in names:
                        report.tables[name] = self._commit(account, name, plan, fetched, selections[name][1], wall)
                        if on_table is not None:
                            on_table(report.tables[name])
                except BaseException:
                    builder.shutdown(wait=False, cancel_futures=True)
                    raise
            stats = fetched.stats if fetched else None
            requests_by_table = _requests_by_table(stats.by_endpoint if stats else {}, plan.feed_requests)
            for name, result in report.tables.items():
                result.requests = requests_by_table.get(name, 0)
            report.requests = (stats.requests if stats else 0) + plan.feed_requests
            report.seconds = time.perf_counter() - started
            with self._connect() as con:
                for name, result in report.tables.items():
                    _exec(con, f"UPDATE {_META}.state SET last_seconds = ?, last_requests = ? "
                                f"WHERE account = ? AND table_name = ?",
                                [report.seconds, result.requests, account, name])
        return report

    def rebuild(self, source: StripeSource | str, tables: Iterable[str] | None = None) -> SyncReport | None:
        """Forgets an account's tables (all, or `tables`) and, given a source, fetches them again whole.

        The way out of a table that went wrong: `wh.rebuild(source)`.
        """
        account = source if isinstance(source, str) else source.account_id()
        names = list(ALL_TABLES if tables is None else tables)
        for name in names:
            schema(name)
        with self._writing(), self._connect() as con:
            _exec(con, "BEGIN")
            for name in names:
                _exec(con, f"DROP TABLE IF EXISTS {_qual(account, name)}")
                _exec(con, f"DELETE FROM {_META}.state WHERE account = ? AND table_name = ?", [account, name])
            _exec(con, "COMMIT")
        if isinstance(source, str):
            return None
        return self.sync(source, names, full=True)

    # --- planning -------------------------------------------------------------------------------------

    def tables_to_sync(self, account: str, tables: Iterable[str] | None = None) -> list[str]:
        """The tables `sync(source, tables)` would write for `account`: the selected ones (or `tables`),
        with their parents and synced children, in MBI's order."""
        return self._resolve_tables(account, tables)

    def _resolve_tables(self, account: str, tables: Iterable[str] | None) -> list[str]:
        with self._connect() as con:
            synced = {t for t in ALL_TABLES if self._selection(con, account, t)[0]}
        if tables is None:
            wanted = set(synced)
        else:
            wanted = set(tables)
            for name in wanted:
                schema(name)  # UnknownTableError lists the valid names
        # A child table comes with its parent, and a parent with its synced children.
        result = wanted | {schema(name).parent for name in wanted if schema(name).parent}
        result |= {child for name in list(result) for child in schema(name).children if child in synced}
        return [t for t in ALL_TABLES if t in result]

    def _plan(self, source: StripeSource, account: str, names: list[str], states: dict, selections: dict,
              full: bool, *, events_asked: bool = False) -> "_Plan":
        plan = _Plan()
        clock, events_readable = source.server_clock()
        plan.feed_requests += 1
        # Stripe's clock dates cursors and deletions; this machine's only when answers carry no `Date`.
        plan.clock = clock if clock is not None else int(time.time())
        if not events_readable and "events" in names and not events_asked:
            # Syncing "everything" with a key that may not read events: the other tables still sync.
            plan.skipped["events"] = ("this key may not read events: grant Events read access to sync the events "
                                      "table (and to make the other tables' syncs incremental)")
            names = [name for name in names if name != "events"]
        modes: dict[str, tuple[str, str]] = {}
        for name in names:
            target = schema(name)
            if target.parent:
                continue
            state = states.get(name)
            stored_columns = json.loads(state[3]) if state and state[3] else None
            wanted_columns = selections[name][1]
            if full:
                modes[name] = ("full", "a full refresh was asked for")
            elif state is None or state[1] is None:
                modes[name] = ("full", "first sync of this table")
            elif name in REREAD_TABLES:
                modes[name] = ("full", "small table re-read whole each sync (Stripe sends no event when "
                                       "times_redeemed or validity change)")
            elif not events_readable:
                modes[name] = ("full", "this key may not read events, which incremental syncs follow: grant "
                                       "Events read access for faster syncs")
            elif plan.clock - state[1] > EVENTS_WINDOW - WINDOW_MARGIN:
                age = (plan.clock - state[1]) / 86_400
                modes[name] = ("full", f"the last sync was {age:.1f} days ago: its events reach past (or within a "
                                       f"day of) the end of Stripe's 30-day events window")
            elif stored_columns is not None and set(wanted_columns) - set(stored_columns):
                modes[name] = ("full", "columns were added to the selection")
            elif any(set(selections[c][1]) - set(json.loads(states[c][3]) if c in states and states[c][3] else [])
                     for c in target.children if c in names):
                modes[name] = ("full", "a child table is new or has new columns")
            else:
                modes[name] = ("incremental", "events since the last sync")
        for name in names:
            target = schema(name)
            if target.parent:
                mode, reason = modes[target.parent]
                modes[name] = (mode, f"with {target.parent}: {reason}")
        plan.modes = modes
        incremental = [n for n in names if modes[n][0] == "incremental" and not schema(n).parent]
        if incremental:
            cursor = min(states[n][1] for n in incremental) - self.lookback
            feed = source.fetch({"events": TableRequest(listed=True, since=cursor)})
            plan.feed_requests += feed.stats.requests
            plan.events = feed.frame("events")
        for name in names:
            target = schema(name)
            if target.parent:
                continue
            mode = modes[name][0]
            children = tuple(c for c in target.children if c in names)
            if name == "events":
                if mode == "incremental":
                    continue  # the change feed above already listed the new events
                plan.requests[name] = TableRequest(listed=True, since=None)
                continue
            if mode == "full":
                plan.requests[name] = TableRequest(listed=True, since=None, children=children)
                continue
            state = states[name]
            changed, deleted = _changes(plan.events, name, state[1] - self.lookback)
            plan.deleted_by_event[name] = deleted
            since = (state[2] if state[2] is not None else 0) - self.lookback
            since, retrieve = self._cheapest(account, name, since, changed)
            plan.requests[name] = TableRequest(listed=True, since=since, ids=frozenset(retrieve), children=children)
        return plan

    def _cheapest(self, account: str, table: str, since: int, changed: dict[str, int | None]) -> tuple[int, set[str]]:
        """Re-list from `since` (or earlier) and retrieve the rest, for the fewest requests."""
        with self._connect() as con:
            known = dict(con.execute(
                f"SELECT id, epoch(created)::BIGINT FROM {_qual(account, table)} WHERE id IN (SELECT unnest(?))",
                [list(changed)]).fetchall()) if changed else {}
            created_all = [row[0] for row in con.execute(
                f"SELECT epoch(created)::BIGINT FROM {_qual(account, table)} WHERE created IS NOT NULL "
                f"ORDER BY created DESC").fetchall()]
        times = {object_id: known.get(object_id, created) for object_id, created in changed.items()}
        older = sorted((t if t is not None else -1, i) for i, t in times.items() if t is None or t < since)
        best_since, best_cost = since, len(older) + _pages(created_all, since)
        for index, (moment, _) in enumerate(older):
            if moment < 0:
                continue
            cost = index + _pages(created_all, moment)  # retrieve the `index` older ones, list from `moment`
            if cost < best_cost:
                best_since, best_cost = moment, cost
        retrieve = {object_id for moment, object_id in older if moment < best_since}
        return best_since, retrieve

    # --- committing ---------------------------------------------------------------------------------

    def _commit(self, account: str, name: str, plan: "_Plan", fetched: Fetched | None, columns: list[str],
                wall: datetime) -> TableSync:
        target = schema(name)
        mode, reason = plan.modes[name]
        result = TableSync(name, mode, reason)
        parent = target.parent or name
        if name == "events" and mode == "incremental":
            frame = plan.events
        else:
            frame = fetched.frame(name) if fetched is not None else None
        if frame is None:
            raise WarehouseError(f"nothing was fetched for {name}", code="internal")
        frame = frame[[c for c in target.column_names if c in columns]]
        deleted_ids = set(fetched.deleted.get(parent, set())) if fetched is not None else set()
        event_deletions = plan.deleted_by_event.get(parent, {})
        deleted_ids |= set(event_deletions)
        synced_at = pd.Timestamp(wall)
        qual = _qual(account, name)
        writing = time.perf_counter()
        with self._connect() as con:
            _exec(con, "BEGIN")
            try:
                _exec(con, f"CREATE SCHEMA IF NOT EXISTS {_q(_schema_name(account))}")
                new = self._ensure_table(con, account, target, columns)
                incoming = pa.Table.from_pandas(frame, preserve_index=False)
                con.register("incoming", incoming)
                cols = ", ".join(_q(c) for c in frame.columns)
                clock = pd.Timestamp(plan.clock, unit="s", tz="UTC")
                if new:  # the first sync: nothing to compare with
                    result.added = len(frame)
                else:
                    result.added = con.execute(
                        f"SELECT count(*) FROM incoming WHERE id NOT IN (SELECT id FROM {qual} WHERE deleted_at IS NULL)"
                    ).fetchall()[0][0]
                    changed = con.execute(
                        f"SELECT count(*) FROM (SELECT {cols} FROM incoming EXCEPT "
                        f"SELECT {cols} FROM {qual} WHERE deleted_at IS NULL)").fetchall()[0][0]
                    result.updated = changed - result.added
                    if target.parent:
                        # A fetched parent's child list is complete: children it no longer has are flagged deleted.
                        parents = self._fetched_parents(fetched, parent)
                        con.register("parents", pa.table({"id": pa.array(sorted(parents), pa.string())}))
                        result.deleted = con.execute(
                            f"UPDATE {qual} SET deleted_at = ?, synced_at = ? WHERE deleted_at IS NULL AND "
                            f"{_q(target.parent_key)} IN (SELECT id FROM parents) AND id NOT IN (SELECT id FROM incoming)",
                            [clock, synced_at]).fetchall()[0][0]
                    _exec(con, f"DELETE FROM {qual} WHERE id IN (SELECT id FROM incoming)")
                _exec(con, f"INSERT INTO {qual} ({cols}, deleted_at, synced_at) SELECT {cols}, NULL, ? FROM incoming",
                      [synced_at])
                # Deletions: objects Stripe says are deleted, and (on a full re-read) objects that vanished.
                flagged = 0
                key = target.parent_key if target.parent else "id"
                if deleted_ids:
                    con.register("gone", pa.table({"id": pa.array(sorted(deleted_ids), pa.string()),
                                                   "gone_at": pa.array([event_deletions.get(i) for i in sorted(deleted_ids)],
                                                                  pa.int64())}))
                    flagged += con.execute(
                        f"UPDATE {qual} SET deleted_at = coalesce(to_timestamp((SELECT gone_at FROM gone WHERE gone.id = "
                        f"{qual}.{_q(key)})), ?), synced_at = ? WHERE deleted_at IS NULL AND {_q(key)} IN "
                        f"(SELECT id FROM gone)", [clock, synced_at]).fetchall()[0][0]
                if mode == "full" and name not in ACCUMULATING and not new:
                    flagged += con.execute(
                        f"UPDATE {qual} SET deleted_at = ?, synced_at = ? WHERE deleted_at IS NULL AND id NOT IN "
                        f"(SELECT id FROM incoming)", [clock, synced_at]).fetchall()[0][0]
                if not target.parent:
                    result.deleted = flagged
                else:
                    result.deleted += flagged
                after_live = con.execute(f"SELECT count(*) FROM {qual} WHERE deleted_at IS NULL").fetchall()[0][0]
                result.rows = after_live
                high = con.execute(f"SELECT epoch(max(created))::BIGINT FROM {qual}").fetchall()[0][0] \
                    if "created" in frame.columns else None
                _exec(con, f"INSERT OR REPLACE INTO {_META}.state VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [account, name, plan.clock, high, mode, reason, wall, None, None, json.dumps(columns)])
                _exec(con, "COMMIT")
                result.seconds = time.perf_counter() - writing
            except BaseException as exc:
                _exec(con, "ROLLBACK")
                if isinstance(exc, duckdb.IOException):
                    raise WarehouseError(
                        f"writing {name} to the warehouse {self.path} failed ({exc}); {name} keeps its previous "
                        f"state. Free disk space or check the file, then sync again; wh.rebuild(source) fetches "
                        f"the account again if the file is damaged.", code="write_failed") from exc
                raise
        return result

    @staticmethod
    def _fetched_parents(fetched: Fetched | None, parent: str) -> set[str]:
        if fetched is None or parent not in fetched.names:
            return set()
        return set(fetched.frame(parent)["id"].dropna().tolist())

    def _ensure_table(self, con: duckdb.DuckDBPyConnection, account: str, target: TableSchema,
                      columns: list[str]) -> bool:
        """Creates the table or brings its columns to the selection; True when it was created."""
        stored = self._stored_columns(con, account, target.name)
        qual = _qual(account, target.name)
        if stored is None:
            defs = ", ".join(f"{_q(c)} {_DTYPES_SQL[target.dtypes[c]]}" for c in target.column_names if c in columns)
            _exec(con, f"CREATE TABLE {qual} ({defs}, deleted_at TIMESTAMPTZ, synced_at TIMESTAMPTZ)")
            return True
        for column in target.column_names:
            if column in columns and column not in stored:
                _exec(con, f"ALTER TABLE {qual} ADD COLUMN {_q(column)} {_DTYPES_SQL[target.dtypes[column]]}")
        for column in stored:
            if column not in columns and column not in ("deleted_at", "synced_at"):
                _exec(con, f"ALTER TABLE {qual} DROP COLUMN {_q(column)}")
        return False

    # --- plumbing -----------------------------------------------------------------------------------

    def _account(self, account: str | None, *, allow_new: bool = False,
                 con: duckdb.DuckDBPyConnection | None = None) -> str:
        accounts = self.accounts() if con is None else self._accounts_in(con)
        if account is not None:
            if account not in accounts and not allow_new:
                raise WarehouseError(f"the warehouse holds no tables of {account!r}; it holds "
                                     f"{', '.join(accounts) or 'none yet'}. Run wh.sync(source) first.",
                                     code="unknown_account")
            return account
        if len(accounts) == 1:
            return accounts[0]
        if not accounts:
            raise WarehouseError("the warehouse is empty: run wh.sync(source) first.", code="empty")
        raise WarehouseError(f"the warehouse holds several accounts ({', '.join(accounts)}): pass account=...",
                             code="ambiguous_account")

    def _selection(self, con: duckdb.DuckDBPyConnection, account: str, table: str) -> tuple[bool, list[str]]:
        rows = con.execute(f"SELECT synced, columns FROM {_META}.selection WHERE account = ? AND table_name = ?",
                           [account, table]).fetchall()
        row = rows[0] if rows else None
        if row is None:
            return True, schema(table).column_names
        # A selection saved by an older version may name a column the schema no longer has (a secret such as
        # `confirmation_secret__client_secret`, or a field stripe-python dropped): left out, so that the next
        # sync drops it from the stored table (`_ensure_table`) instead of keeping its old values.
        known = set(schema(table).column_names)
        return bool(row[0]), [column for column in json.loads(row[1]) if column in known]

    @staticmethod
    def _all_stored_columns(con: duckdb.DuckDBPyConnection, account: str) -> dict[str, list[str]]:
        stored: dict[str, list[str]] = {}
        for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns WHERE "
                                         "table_schema = ? ORDER BY table_name, ordinal_position",
                                         [_schema_name(account)]).fetchall():
            stored.setdefault(table, []).append(column)
        return stored

    @staticmethod
    def _stored_columns(con: duckdb.DuckDBPyConnection, account: str, table: str) -> list[str] | None:
        rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND "
                           "table_name = ? ORDER BY ordinal_position", [_schema_name(account), table]).fetchall()
        return [row[0] for row in rows] or None

    @contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation. Another process holding the file makes us wait up to
        `lock_timeout`, then raise WarehouseLocked; a file DuckDB cannot read raises WarehouseError."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.Error as exc:
                locked = isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()
                if locked and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if locked:
                    raise WarehouseLocked(
                        f"the warehouse {self.path} is in use by another process ({exc}); wait for it to finish "
                        "and try again.", code="locked") from exc
                raise WarehouseError(f"the warehouse {self.path} cannot be opened ({exc}). Move the file aside "
                                     "(or delete it) and sync again to fetch every table anew.",
                                     code="unreadable") from exc
        try:
            _exec(con, "SET TimeZone = 'UTC'")
            yield con
        finally:
            con.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer at a time, across threads and processes (a lock file beside the warehouse)."""
        with self._write_lock:
            lock_path = self.path.with_name(self.path.name + ".lock")
            handle = open(lock_path, "a+")  # noqa: SIM115 - held for the whole write
            try:
                deadline = time.monotonic() + self.lock_timeout
                while True:
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise WarehouseLocked(
                                f"another process is syncing the warehouse {self.path} (it holds {lock_path}); "
                                f"waited {self.lock_timeout:g} s. Let it finish, then sync again.",
                                code="locked") from None
                        time.sleep(0.1)
                yield
            finally:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                finally:
                    handle.close()


@dataclass
class _Plan:
    clock: int = 0
    modes: dict[str, tuple[str, str]] = field(default_factory=dict)
    requests: dict[str, TableRequest] = field(default_factory=dict)
    events: pd.DataFrame | None = None
    deleted_by_event: dict[str, dict[str, int]] = field(default_factory=dict)
    feed_requests: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


# --- events to changes ------------------------------------------------------------------------------

_DELETED_TYPES = {"customers": ("customer.deleted",), "invoices": ("invoice.deleted",),
                  "coupons": ("coupon.deleted",), "plans": ("plan.deleted",)}


#: Which table an event is about, and where the object's id is in its payload (first match wins).
_EVENT_TARGETS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("customer.subscription.",), "subscriptions", "id"),
    (("customer.discount.", "customer.source.", "customer.tax_id.", "customer.bank_account.", "customer.card."),
     "customers", "customer"),
    (("customer.",), "customers", "id"),
    (("invoice.",), "invoices", "id"),
    (("charge.refund.", "charge.dispute.", "refund."), "charges", "charge"),
    (("charge.",), "charges", "id"),
    (("coupon.",), "coupons", "id"),
    (("plan.", "price."), "plans", "id"),
)


def _target(event_type: str, obj: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """The table and object id an event says changed."""
    for prefixes, table, key in _EVENT_TARGETS:
        if event_type.startswith(prefixes):
            return table, obj.get(key)
    return None


def _changes(events: pd.DataFrame | None, table: str, since: int) -> tuple[dict[str, int | None], dict[str, int]]:
    """Ids of `table` that events since `since` say changed (with their `created`), and deleted ones (with when)."""
    changed: dict[str, int | None] = {}
    deleted: dict[str, int] = {}
    if events is None or events.empty:
        return changed, deleted
    recent = events[events["created"] >= pd.Timestamp(since, unit="s", tz="UTC")]
    recent = recent.sort_values("created")
    for event_type, payload, created in zip(recent["type"], recent["data__object"], recent["created"]):
        if payload is None or payload is pd.NA:
            continue
        obj = json.loads(payload)
        target = _target(str(event_type), obj)
        if target is None or target[0] != table or not target[1]:
            continue
        object_id = target[1]
        if str(event_type) in _DELETED_TYPES.get(table, ()):
            deleted[object_id] = int(created.timestamp())
            changed.pop(object_id, None)
        elif object_id not in deleted:
            born = obj.get("created") if obj.get("id") == object_id else None
            changed[object_id] = born if isinstance(born, int) else None
    return changed, deleted


def _pages(created_desc: list[int], since: int) -> int:
    """Requests to list every stored object created at or after `since` (100 per page, at least one)."""
    lo, hi = 0, len(created_desc)
    while lo < hi:  # created_desc is sorted newest first
        mid = (lo + hi) // 2
        if created_desc[mid] >= since:
            lo = mid + 1
        else:
            hi = mid
    return max(1, math.ceil(lo / 100))


def _requests_by_table(by_endpoint: Mapping[str, int], feed: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for endpoint, count in by_endpoint.items():
        parts = endpoint.split("/")
        resource = parts[2] if len(parts) > 2 else ""
        table = "subscriptions" if resource == "subscription_items" else resource
        counts[table] = counts.get(table, 0) + count
    if feed:
        counts["events"] = counts.get("events", 0) + feed
    return counts


# --- SQL and frames -------------------------------------------------------------------------------------

def _exec(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> list[tuple]:
    """Runs a statement to completion (DuckDB wants every result consumed before the next one)."""
    return con.execute(sql, params).fetchall() if params is not None else con.execute(sql).fetchall()


def _schema_name(account: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", account)


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _qual(account: str, table: str) -> str:
    return f"{_q(_schema_name(account))}.{_q(table)}"


def _order_keys(target: TableSchema) -> list[str]:
    """Newest first, like Stripe's lists; child rows grouped by parent."""
    if target.parent:
        return [target.parent_key or "id", "id"]
    return ["created", "id"]


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    def mapper(kind: pa.DataType) -> Any:
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return pd.StringDtype("pyarrow")
        if pa.types.is_integer(kind):
            return pd.Int64Dtype()
        if pa.types.is_boolean(kind):
            return pd.BooleanDtype()
        if pa.types.is_floating(kind):
            return pd.Float64Dtype()
        return None

    for index, kind in enumerate(table.schema.types):
        if pa.types.is_timestamp(kind) and (kind.unit != "ns" or kind.tz is None):
            column = table.column(index).cast(pa.timestamp("ns", tz="UTC"))
            table = table.set_column(index, table.schema.field(index).with_type(column.type), column)
        if pa.types.is_decimal(kind):  # DuckDB sums integers into HUGEINT/DECIMAL: back to numbers pandas adds
            target = pa.int64() if kind.scale == 0 and kind.precision <= 38 else pa.float64()
            try:
                column = table.column(index).cast(target)
            except pa.ArrowInvalid:
                column = table.column(index).cast(pa.float64(), safe=False)
            table = table.set_column(index, table.schema.field(index).with_type(column.type), column)
    return table.to_pandas(types_mapper=mapper)
