"""The decisions behind the Connections panel: connect, re-authenticate, test, delete, sync and keep syncing.

    connections = Connections(Registry(), relay_url="https://relay.example.com")
    outcome = connections.connect_with_key("rk_live_...")   # added, replaced, or already_connected
    report = connections.sync("Northwind Analytics")          # into the warehouse, opened when first needed
    cycle = UpdateCycle(connections, every=3600).start()      # every hour while the kernel lives

Scripts and tests call exactly what a click in `mbi_widgets.ui` calls; the views only draw what
these return and observe the `SyncRun` under way. Nothing here imports ipywidgets.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import requests

from mbi_widgets.auth import UNKNOWN_ACCOUNT, AuthError, RelayClient, StripeToken, account_of, validate_key
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import (
    NEEDS_REAUTH,
    OAUTH_REVOKED,
    Connection,
    MissingSecretError,
    Registry,
    default_registry_path,
)

if TYPE_CHECKING:  # pragma: no cover - the warehouse pulls in DuckDB, pandas and pyarrow: imported when used
    import pandas as pd

    from mbi_widgets.tables.source import StripeSource
    from mbi_widgets.warehouse import SyncReport, TableSync, Warehouse

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.stripe.com"
ADDED, REPLACED, ALREADY_CONNECTED = "added", "replaced", "already_connected"
#: How the Data Sources table names each way of connecting.
AUTH_LABELS = {"oauth": "OAuth", "restricted_key": "API key", "secret_key": "API key (secret)"}
#: Columns a table always keeps in the warehouse (its parent's id too, for a child table).
ALWAYS_SYNCED = ("id", "created")
MANUAL, AUTOMATIC = "manual", "automatic"


class ConnectionsError(MbiError):
    """A connections action could not be done; the message says what to do instead."""


class SyncInProgress(ConnectionsError):
    """A sync is already running in this kernel (a click, or the update cycle)."""


class NeedsReauthentication(ConnectionsError):
    """Stripe no longer accepts the connection's credential; it now shows Needs re-authentication."""

    def __init__(self, message: str, *, connection: Connection) -> None:
        super().__init__(message, code="needs_reauthentication")
        self.connection = connection


def auth_label(connection: Connection) -> str:
    return AUTH_LABELS.get(connection.auth_method, connection.auth_method)


def warehouse_path_for(registry: Registry) -> Path:
    """The default warehouse (`Warehouse()`'s file) for the default registry; beside any other registry
    file, so that a throw-away registry (a demo, a test) never writes to the user's warehouse."""
    from mbi_widgets.warehouse import default_warehouse_path

    if registry.path == default_registry_path():
        return default_warehouse_path()
    return registry.path.with_name("warehouse.duckdb")


# --- connecting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Grant:
    """A checked credential and the account it reads, before it is saved (its repr shows no secret)."""

    account_id: str
    account_name: str
    livemode: bool
    auth_method: str
    scope: str
    secret: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    relay_url: str | None = None
    warning: str | None = None


@dataclass(frozen=True)
class ConnectOutcome:
    """What one connect did. `kind` is `added` (a new connection), `replaced` (the credential of the
    connection being re-authenticated) or `already_connected`: nothing was saved, `connection` is the
    existing connection of that account, and `Connections.reauthenticate_existing(outcome)` puts the
    new credential on it."""

    kind: str
    connection: Connection
    warning: str | None = None
    _grant: _Grant | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """A working connection was saved (the panel then opens its preview)."""
        return self.kind != ALREADY_CONNECTED and self.connection.status == "Success"


# --- the warehouse as the views draw it ---------------------------------------------------------------

@dataclass(frozen=True)
class TableState:
    """One row of the Data Warehouse Manager: the selection and what the last sync left."""

    table: str
    title: str
    parent: str | None
    synced: bool
    columns: tuple[str, ...]
    all_columns: tuple[str, ...]
    required: tuple[str, ...]
    rows: int | None = None
    deleted_rows: int | None = None
    last_sync: datetime | None = None
    duration: float | None = None
    mode: str | None = None
    why: str | None = None
    last_data_point: datetime | None = None


@dataclass(frozen=True)
class StoredTable:
    """A table read from the warehouse for a preview: the rows, when they were synced, and the line of
    Python that returns the same DataFrame."""

    frame: "pd.DataFrame"
    synced_at: datetime
    code: str


@dataclass(eq=False)
class SyncRun:
    """One sync as the views draw it: the tables it writes, rows fetched per table, each table's result
    once committed, then the report or the error. Observers are told of every change (on the sync's
    thread)."""

    connection_id: str
    name: str
    account: str
    tables: tuple[str, ...]
    full: bool
    trigger: str
    #: Live rows before the sync, for tables re-read whole (a progress bar's end); None when unknown.
    expected: dict[str, int | None] = field(default_factory=dict)
    fetched: dict[str, int] = field(default_factory=dict)
    written: dict[str, "TableSync"] = field(default_factory=dict)
    report: "SyncReport | None" = None
    error: MbiError | None = None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    _observers: list[Callable[["SyncRun"], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        return self.finished is None

    def observe(self, callback: Callable[["SyncRun"], None]) -> None:
        with self._lock:
            self._observers.append(callback)

    def _rows(self, table: str, rows: int) -> None:
        if rows > self.fetched.get(table, 0):
            self.fetched[table] = rows
            self._changed()

    def _written(self, result: "TableSync") -> None:
        self.written[result.table] = result
        self._changed()

    def _finish(self, *, report: "SyncReport | None" = None, error: MbiError | None = None) -> None:
        self.report, self.error, self.finished = report, error, datetime.now(UTC)
        self._changed()

    def _changed(self) -> None:
        with self._lock:
            observers = list(self._observers)
        for callback in observers:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a view that fails to draw must not fail the sync
                log.exception("a sync observer failed")


# --- the service --------------------------------------------------------------------------------------

class Connections:
    """The connections of one registry, and the warehouse they sync into.

    `api_base` is Stripe's API (the sandbox's in a demo); `relay_url` the device-flow relay that
    OAuth connections were made through. `warehouse` is a `Warehouse`, or a path where one is
    opened when first needed (default: `warehouse_path_for(registry)`), so showing connections
    never creates a file.
    """

    def __init__(self, registry: Registry, *, api_base: str | None = None, relay_url: str | None = None,
                 warehouse: "Warehouse | str | os.PathLike[str] | None" = None) -> None:
        self.registry = registry
        self.api_base = (api_base or DEFAULT_API_BASE).rstrip("/")
        self.relay_url = relay_url
        is_path = warehouse is None or isinstance(warehouse, (str, os.PathLike))
        self._warehouse: Warehouse | None = None if is_path else warehouse  # type: ignore[assignment]
        self.warehouse_path = (warehouse_path_for(registry) if warehouse is None
                               else Path(warehouse).expanduser() if is_path else warehouse.path)  # type: ignore[union-attr]
        self._sources: dict[str, StripeSource] = {}
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._syncing: str | None = None  # the name of the connection whose sync holds the lock
        self._run_observers: list[Callable[[SyncRun], None]] = []
        #: The sync under way, else the last one; `runs` keeps the recent ones (newest last).
        self.current: SyncRun | None = None
        self.runs: list[SyncRun] = []

    def __repr__(self) -> str:
        return f"Connections({self.registry!r}, api_base={self.api_base!r}, warehouse={str(self.warehouse_path)!r})"

    # --- finding ---------------------------------------------------------------------------------

    def list(self) -> list[Connection]:
        return self.registry.list()

    def find(self, name_or_id: str) -> Connection:
        """The connection with this id or name; the error lists the names there are."""
        connections = self.registry.list()
        for connection in connections:
            if name_or_id in (connection.id, connection.name):
                return connection
        names = ", ".join(repr(c.name) for c in connections) or "none yet"
        raise ConnectionsError(f"There is no connection named {name_or_id!r}; connections: {names}.",
                               code="unknown_connection")

    def unique_name(self, name: str) -> str:
        """The account's name, numbered when another connection already uses it (names select sources)."""
        taken = {connection.name for connection in self.registry.list()}
        candidate, number = name, 2
        while candidate in taken:
            candidate, number = f"{name} ({number})", number + 1
        return candidate

    def already_connected(self, account_id: str, *, livemode: bool) -> Connection | None:
        """The connection reading this account (same mode, same API), if there is one."""
        if account_id == UNKNOWN_ACCOUNT:
            return None
        for connection in self.registry.list():
            if (connection.account_id, connection.livemode, connection.api_base) == (account_id, livemode,
                                                                                      self.api_base):
                return connection
        return None

    # --- connecting ------------------------------------------------------------------------------

    def connect_with_key(self, key: str, *, reauth_id: str | None = None) -> ConnectOutcome:
        """Checks a restricted (or secret) key with Stripe, then saves it: as a new connection, on the
        connection `reauth_id`, or not at all when its account is already connected. Raises AuthError
        (a publishable key, a wrong key) with what to create instead."""
        check = validate_key(key, api_base=self.api_base, warn=False)  # the outcome carries the warning
        grant = _Grant(account_id=check.account_id, account_name=check.account_name, livemode=check.livemode,
                       auth_method=check.auth_method,
                       scope="read_only" if check.auth_method == "restricted_key" else "full",
                       secret=key.strip(), warning=check.warning)
        return self._connect(grant, reauth_id)

    def connect_with_token(self, token: StripeToken, *, reauth_id: str | None = None) -> ConnectOutcome:
        """Saves what Connect with Stripe returned, like `connect_with_key`."""
        account_id, name = account_of(token.access_token, api_base=self.api_base)
        account_id = token.stripe_user_id or account_id
        grant = _Grant(account_id=account_id, account_name=name or account_id, livemode=token.livemode,
                       auth_method="oauth", scope=token.scope, secret=token.access_token,
                       refresh_token=token.refresh_token, relay_url=self.relay_url)
        return self._connect(grant, reauth_id)

    def reauthenticate_existing(self, outcome: ConnectOutcome) -> ConnectOutcome:
        """Puts the credential of an `already_connected` outcome on that existing connection."""
        if outcome.kind != ALREADY_CONNECTED or outcome._grant is None:
            raise ConnectionsError("Only an already-connected outcome holds a credential to re-authenticate with; "
                                   "connect again.", code="nothing_to_reauthenticate")
        return self._replace(outcome.connection.id, outcome._grant)

    def _connect(self, grant: _Grant, reauth_id: str | None) -> ConnectOutcome:
        if reauth_id is not None:
            return self._replace(reauth_id, grant)
        existing = self.already_connected(grant.account_id, livemode=grant.livemode)
        if existing is not None:
            return ConnectOutcome(ALREADY_CONNECTED, existing, grant.warning, grant)
        connection = self.registry.add(
            name=self.unique_name(grant.account_name), account_id=grant.account_id, account_name=grant.account_name,
            livemode=grant.livemode, scope=grant.scope, auth_method=grant.auth_method, secret=grant.secret,
            refresh_token=grant.refresh_token, api_base=self.api_base, relay_url=grant.relay_url)
        return ConnectOutcome(ADDED, self._tested(connection.id), grant.warning)

    def _replace(self, connection_id: str, grant: _Grant) -> ConnectOutcome:
        connection = self.registry.get(connection_id)
        if grant.account_id not in (UNKNOWN_ACCOUNT, connection.account_id):
            # Checked before anything is replaced: the working (or revoked) credential stays as it was.
            raise AuthError(f"That credential reads {grant.account_name} ({grant.account_id}), not "
                            f"{connection.name} ({connection.account_id}). Re-authenticate with access to "
                            f"{connection.account_id}, or add {grant.account_name} as a new data source.",
                            code="wrong_account")
        self.registry.replace_secret(connection_id, grant.secret, auth_method=grant.auth_method,
                                     refresh_token=grant.refresh_token, relay_url=grant.relay_url)
        self._forget_source(connection_id)
        return ConnectOutcome(REPLACED, self._tested(connection_id), grant.warning)

    def _tested(self, connection_id: str) -> Connection:
        return self.registry.test(connection_id)

    # --- row actions -----------------------------------------------------------------------------

    def test(self, name_or_id: str) -> Connection:
        """Calls Stripe with the connection's credential and records the outcome (its status)."""
        return self.registry.test(self.find(name_or_id).id)

    def delete(self, name_or_id: str) -> Connection:
        """Deletes a connection, disconnecting it at Stripe first when it was made with OAuth. A token
        Stripe already refuses (revoked elsewhere) has nothing left to disconnect; the warehouse keeps
        the tables synced so far."""
        connection = self.find(name_or_id)
        removed = self.registry.delete(connection.id, deauthorize=self._deauthorize)
        self._forget_source(connection.id)
        return removed

    def _deauthorize(self, connection: Connection, token: str) -> None:
        if not connection.relay_url:
            return
        try:
            RelayClient(connection.relay_url).deauthorize(access_token=token, stripe_user_id=connection.account_id)
        except AuthError as exc:
            if exc.code == "invalid_grant" and _token_refused(connection.api_base, token):
                log.info("connection %s: its token was already revoked, so there is nothing to disconnect",
                         connection.id)
                return
            raise

    def explain(self, name_or_id: str, error: BaseException) -> str:
        """What to tell the user about an error reading this connection (OAuth and keys differ)."""
        from mbi_widgets.tables.fetch import AuthenticationFailed

        if isinstance(error, AuthenticationFailed):
            connection = next((c for c in self.registry.list() if name_or_id in (c.id, c.name)), None)
            if connection is not None and connection.auth_method == "oauth":
                return OAUTH_REVOKED
        return str(error)

    # --- reading ---------------------------------------------------------------------------------

    def source(self, name_or_id: str) -> "StripeSource":
        """The StripeSource behind a connection (one per connection, so its rate budget is shared)."""
        connection = self.find(name_or_id)
        with self._lock:
            if connection.id not in self._sources:
                self._sources[connection.id] = self.registry.source(connection.id)
            return self._sources[connection.id]

    def _forget_source(self, connection_id: str) -> None:
        with self._lock:
            self._sources.pop(connection_id, None)

    @property
    def warehouse(self) -> "Warehouse":
        """The warehouse the connections sync into, opened (and created) on first use."""
        from mbi_widgets.warehouse import Warehouse

        with self._lock:
            if self._warehouse is None:
                self._warehouse = Warehouse(self.warehouse_path)
            return self._warehouse

    def _existing_warehouse(self) -> "Warehouse | None":
        """The warehouse when it exists already: reading never creates the file."""
        if self._warehouse is None and not self.warehouse_path.exists():
            return None
        return self.warehouse

    def warehouse_account(self, connection: Connection) -> str:
        """The account under which the warehouse keeps this connection's tables."""
        if connection.account_id.startswith("acct_"):
            return connection.account_id
        return self.source(connection.id).account_id()  # a key without account access: its fingerprint

    def last_updated(self) -> dict[str, datetime | None]:
        """Per connection id, when its data was last synced (None: never)."""
        connections = self.registry.list()
        warehouse = self._existing_warehouse()
        synced = warehouse.last_synced() if warehouse is not None else {}
        result: dict[str, datetime | None] = {}
        for connection in connections:
            account = connection.account_id if connection.account_id.startswith("acct_") else None
            if account is None and synced:
                account = self.warehouse_account(connection)
            moments = synced.get(account or "", {})
            result[connection.id] = max(moments.values()) if moments else None
        return result

    def table_states(self, name_or_id: str) -> list[TableState]:
        """Every table of the connection's account, synced or not, as the Data Warehouse Manager shows it."""
        from mbi_widgets.tables.schema import ALL_TABLES, schema

        from mbi_widgets.warehouse import WarehouseError

        connection = self.find(name_or_id)
        warehouse = self._existing_warehouse()
        selections: dict[str, tuple[bool, list[str]]] = {}
        status: dict[str, dict[str, Any]] = {}
        if warehouse is not None:
            account = self.warehouse_account(connection)
            selections = warehouse.selections(account)
            try:
                status = {row["table"]: row for row in warehouse.status(account).to_dict("records")}
            except WarehouseError as exc:
                if exc.code != "unknown_account":  # nothing synced yet for this account is no error
                    raise
        states = []
        for table in ALL_TABLES:
            spec = schema(table)
            synced, columns = selections.get(table, (True, list(spec.column_names)))
            row = status.get(table) or {}
            stored = _text(row.get("mode")) is not None
            states.append(TableState(
                table=table, title=spec.title, parent=spec.parent, synced=synced, columns=tuple(columns),
                all_columns=tuple(spec.column_names), required=required_columns(table),
                rows=row.get("rows") if stored else None, deleted_rows=row.get("deleted_rows") if stored else None,
                last_sync=_moment(row.get("last_sync_started")), duration=_number(row.get("duration_s")),
                mode=_text(row.get("mode")), why=_text(row.get("why")),
                last_data_point=_moment(row.get("last_data_point"))))
        return states

    def stored_table(self, name_or_id: str, table: str) -> StoredTable | None:
        """The table as the warehouse last synced it, or None when it never was (read Stripe instead)."""
        connection = self.find(name_or_id)
        warehouse = self._existing_warehouse()
        if warehouse is None:
            return None
        account = self.warehouse_account(connection)
        synced_at = warehouse.last_synced().get(account, {}).get(table)
        if synced_at is None:
            return None
        frame = warehouse.table(table, account=account)
        return StoredTable(frame, synced_at, f"panel.warehouse.table({table!r}, account={account!r})")

    # --- choosing what to sync -------------------------------------------------------------------

    def set_synced(self, name_or_id: str, table: str, synced: bool) -> dict[str, bool]:
        """Ticks or unticks a table; returns every table whose choice changed. A child table comes with
        its parent (ticking it ticks the parent), and unticking a parent unticks its children."""
        from mbi_widgets.tables.schema import schema

        connection = self.find(name_or_id)
        spec = schema(table)
        linked = [table] + ([spec.parent] if synced and spec.parent else []) + ([] if synced else list(spec.children))
        warehouse, account = self.warehouse, self.warehouse_account(connection)
        changed: dict[str, bool] = {}
        for name in linked:
            was, columns = warehouse.selection(name, account=account)
            if was != synced:
                warehouse.select(name, columns, account=account, synced=synced)
                changed[name] = synced
        return changed

    def set_columns(self, name_or_id: str, table: str, columns: Iterable[str] | None) -> tuple[str, ...]:
        """Chooses the table's columns (None: all); `id`, `created` and a child's parent id always stay.
        Returns the columns selected."""
        connection = self.find(name_or_id)
        warehouse, account = self.warehouse, self.warehouse_account(connection)
        synced, _ = warehouse.selection(table, account=account)
        return tuple(warehouse.select(table, columns, account=account, synced=synced))

    # --- syncing ---------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A sync is running in this kernel."""
        return self._sync_lock.locked()

    def on_run(self, callback: Callable[[SyncRun], None]) -> None:
        """Calls `callback(run)` when a sync starts (the panel follows it with its views)."""
        self._run_observers.append(callback)

    def sync(self, name_or_id: str, tables: Iterable[str] | None = None, *, full: bool = False,
             wait: bool = True, trigger: str = MANUAL) -> "SyncReport":
        """Brings the connection's tables (the selected ones, or `tables`) up to date in the warehouse.

        One sync at a time per kernel: with `wait` False a running sync raises SyncInProgress instead of
        waiting for it. A credential Stripe refuses raises NeedsReauthentication (the connection now
        says so, and the warehouse keeps its last good state).
        """
        connection = self.find(name_or_id)
        if not self._sync_lock.acquire(blocking=wait):
            raise SyncInProgress(f"A sync of {self._syncing or 'another connection'} is running; it finishes on its "
                                 "own. Sync again after it.", code="sync_running")
        try:
            self._syncing = connection.name
            return self._sync_locked(connection, tables, full, trigger)
        finally:
            self._syncing = None
            self._sync_lock.release()

    def _sync_locked(self, connection: Connection, tables: Iterable[str] | None, full: bool,
                     trigger: str) -> "SyncReport":
        from mbi_widgets.tables.fetch import AuthenticationFailed

        tables = list(tables) if tables is not None else None
        run = SyncRun(connection.id, connection.name, "", tuple(tables or ()), full, trigger)
        try:
            source = self.source(connection.id)
            run.account = self.warehouse_account(connection)
            run.tables = tuple(self.warehouse.tables_to_sync(run.account, tables))
            run.expected = self._expected_rows(run.account, run.tables) if full else {}
        except MissingSecretError as exc:
            tested = self.registry.test(connection.id)  # records Needs re-authentication
            self._begin(run)
            raise self._failed(run, NeedsReauthentication(tested.status_message, connection=tested)) from exc
        except MbiError as exc:
            self._begin(run)
            self._failed(run, exc)
            raise
        self._begin(run)
        try:
            report = self.registry.sync(connection.id, self.warehouse, tables, full=full, source=source,
                                        table_progress=run._rows, on_table=run._written)
        except AuthenticationFailed as exc:
            refused = self.registry.get(connection.id)
            raise self._failed(run, NeedsReauthentication(refused.status_message, connection=refused)) from exc
        except MbiError as exc:
            self._failed(run, exc)
            raise
        except BaseException as exc:  # Ctrl-C, a bug: the views must still stop drawing a sync under way
            self._failed(run, ConnectionsError(f"The sync stopped: {exc!r}. Each table keeps its last good state; "
                                               "sync again.", code="sync_failed"))
            raise
        run._finish(report=report)
        return report

    def _begin(self, run: SyncRun) -> None:
        self.current = run
        self.runs = [*self.runs[-49:], run]
        for callback in list(self._run_observers):
            try:
                callback(run)
            except Exception:  # noqa: BLE001 - a view must not stop a sync
                log.exception("a sync observer failed")

    @staticmethod
    def _failed(run: SyncRun, error: MbiError) -> MbiError:
        run._finish(error=error)
        return error

    def _expected_rows(self, account: str, tables: Iterable[str]) -> dict[str, int | None]:
        warehouse = self.warehouse
        if account not in warehouse.accounts():
            return {}
        rows = {row["table"]: row["rows"] for row in warehouse.status(account).to_dict("records")
                if _text(row["mode"])}
        return {table: int(rows[table]) for table in tables if table in rows}


def required_columns(table: str) -> tuple[str, ...]:
    """The columns the warehouse always keeps for `table` (its id, created and parent's id)."""
    from mbi_widgets.tables.schema import schema

    spec = schema(table)
    return tuple(c for c in spec.column_names if c in ALWAYS_SYNCED or c == spec.parent_key)


# --- the update cycle -----------------------------------------------------------------------------------

class UpdateCycle:
    """Syncs every connection that can sync, every `every` (seconds or a timedelta), on a daemon thread
    while the kernel lives; `stop()` ends it.

    The next round is counted from the end of the last, and a round that comes while another sync
    is running (a click on Sync now) is skipped, not queued. Connections that need re-authentication
    are left out until they are re-authenticated.
    """

    def __init__(self, connections: Connections, every: float | timedelta, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connections = connections
        self.every = period_seconds(every)
        self._clock = clock
        self.rounds = 0
        self.skipped = 0
        self.errors: dict[str, MbiError] = {}
        self.next_run = clock() + self.every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mbi-update-cycle", daemon=True)

    def __repr__(self) -> str:
        state = "running" if self.active else "stopped"
        return f"UpdateCycle(every={self.every:g} s, {state}, rounds={self.rounds}, skipped={self.skipped})"

    def start(self) -> "UpdateCycle":
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the cycle; a sync under way finishes (each table commits whole)."""
        self._stop.set()

    @property
    def active(self) -> bool:
        return not self._stop.is_set()

    def seconds_left(self) -> float:
        return max(0.0, self.next_run - self._clock())

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds_left()):
            try:
                self.run_round()
            except Exception:  # noqa: BLE001 - the cycle outlives one bad round (a registry that went away)
                log.exception("an automatic update round failed")
            self.next_run = self._clock() + self.every

    def run_round(self) -> bool:
        """Syncs each connection once now; False when skipped because a sync was already running."""
        if self.connections.busy:
            self.skipped += 1
            return False
        for connection in self.connections.list():
            if self._stop.is_set():
                break
            if connection.status == NEEDS_REAUTH:
                continue
            try:
                self.connections.sync(connection.id, wait=False, trigger=AUTOMATIC)
                self.errors.pop(connection.id, None)
            except SyncInProgress:
                self.skipped += 1
                return False
            except MbiError as exc:  # shown by the panel through the run; the next round tries again
                self.errors[connection.id] = exc
                log.warning("automatic update of %s failed: %s", connection.name, exc)
        self.rounds += 1
        return True


def period_seconds(every: float | timedelta) -> float:
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConnectionsError(f"An update period must be a positive duration, not {every!r}: e.g. "
                               "timedelta(hours=1).", code="invalid_period")
    return seconds


# --- small helpers --------------------------------------------------------------------------------------

def _token_refused(api_base: str, token: str) -> bool:
    """Stripe answers 401 to this token (it was revoked): there is nothing left to disconnect."""
    try:
        answer = requests.get(f"{api_base}/v1/account", auth=(token, ""), timeout=10)
    except requests.RequestException:
        return False
    return answer.status_code == 401


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
        return pd.Timestamp(value).tz_convert("UTC").to_pydatetime()
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


__all__ = ["Connections", "ConnectOutcome", "ConnectionsError", "SyncInProgress", "NeedsReauthentication",
           "SyncRun", "TableState", "StoredTable", "UpdateCycle", "ADDED", "REPLACED", "ALREADY_CONNECTED",
           "AUTH_LABELS", "auth_label", "required_columns", "warehouse_path_for", "period_seconds"]
