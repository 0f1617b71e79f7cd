"""The connections registry: which data sources are connected and how they last tested, in SQLite (never a secret)."""
from __future__ import annotations

import builtins
import logging
import os
import secrets as random_tokens
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import platformdirs
import stripe

from mbi_widgets.errors import MbiError
from mbi_widgets.redaction import redact
from mbi_widgets.secretstore import APP_NAME, SecretStore, SecretStoreError, default_store, ensure_private_dir

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.tables.source import StripeSource
    from mbi_widgets.warehouse import SyncReport, Warehouse

log = logging.getLogger(__name__)

#: Environment variable that moves the registry database.
REGISTRY_ENV = "MBI_WIDGETS_REGISTRY"

SUCCESS = "Success"
PENDING = "Pending"
NEEDS_REAUTH = "Needs re-authentication"
ERROR = "Error"
STATUSES = (SUCCESS, PENDING, NEEDS_REAUTH, ERROR)
AUTH_METHODS = ("oauth", "restricted_key", "secret_key")
STRIPE = "Stripe"

#: What a connection authorized with Connect with Stripe says when Stripe no longer accepts its token.
OAUTH_REVOKED = ("Stripe no longer accepts this connection's access: it was revoked (the account disconnected the "
                 "app in its Stripe Dashboard, or the connection was deleted elsewhere). To read its data again, "
                 "re-authenticate the connection with Connect with Stripe.")
#: How long a write waits for another process's transaction before giving up.
BUSY_TIMEOUT_MS = 30_000
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    connection_type TEXT NOT NULL,
    account_id TEXT NOT NULL,
    account_name TEXT NOT NULL,
    livemode INTEGER NOT NULL,
    scope TEXT NOT NULL,
    auth_method TEXT NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT NOT NULL,
    created TEXT NOT NULL,
    last_started TEXT,
    last_duration REAL,
    api_base TEXT NOT NULL,
    relay_url TEXT,
    secret_ref TEXT NOT NULL
)"""


class RegistryError(MbiError):
    """The connections registry could not do what was asked."""


class UnknownConnectionError(RegistryError):
    """No connection has that id (it was deleted, or the id is mistyped)."""


class MissingSecretError(RegistryError):
    """A connection's credential is not in the secret store: the connection must be re-authenticated."""


@dataclass(frozen=True, slots=True)
class Connection:
    """One connected data source as the registry keeps it. It holds no secret: only `secret_ref`, the key
    under which the secret sits in the `SecretStore`."""

    id: str
    name: str
    connection_type: str
    account_id: str
    account_name: str
    livemode: bool
    scope: str
    auth_method: str
    status: str
    status_message: str
    created: datetime
    last_started: datetime | None
    last_duration: float | None
    api_base: str
    relay_url: str | None
    secret_ref: str

    @property
    def refresh_ref(self) -> str:
        """Where an OAuth connection's refresh token sits in the secret store."""
        return f"{self.secret_ref}:refresh_token"


_COLUMNS = tuple(field.name for field in fields(Connection))


def default_registry_path() -> Path:
    """`$MBI_WIDGETS_REGISTRY`, else `connections.sqlite3` in the platform's per-user data directory."""
    override = os.environ.get(REGISTRY_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME)) / "connections.sqlite3"


class Registry:
    """The connections, in a SQLite file shared safely by several kernels; secrets go to `store`.

    Every write is one `BEGIN IMMEDIATE` transaction on a WAL database with a busy timeout, so two
    processes using the same registry at once lose nothing. `store` defaults to `default_store()`.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, store: SecretStore | None = None, *,
                 http_client: stripe.HTTPClient | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_registry_path()
        self.store: SecretStore = store if store is not None else default_store()
        self._http_client = http_client
        ensure_private_dir(self.path.parent)
        self._enable_wal()
        with self._transaction() as db:
            db.execute(_SCHEMA)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RegistryError(f"The connections registry {self.path} was written by a newer mbi-widgets "
                                    f"(schema {version}); upgrade mbi-widgets, or set {REGISTRY_ENV} to another "
                                    "file.", code="schema_too_new")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r}, store={self.store!r})"

    def _enable_wal(self) -> None:
        """Switches the file to WAL. The switch needs the file to itself for a moment and SQLite does not
        wait for that (no busy handler), so two kernels opening a new registry at once retry here."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode = WAL")
                return
            except RegistryError as exc:
                locked = isinstance(exc.__cause__, sqlite3.OperationalError) and "locked" in str(exc.__cause__)
                if not locked or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, id: str) -> Connection:
        """The connection with this id; `UnknownConnectionError` when there is none."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM connections WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise UnknownConnectionError(f"There is no connection {id!r} in {self.path}; Registry.list() shows "
                                         "the connections there are.", code="unknown_connection")
        return _connection(row)

    def list(self) -> builtins.list[Connection]:
        """Every connection, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM connections ORDER BY created, rowid").fetchall()
        return [_connection(row) for row in rows]

    def secret(self, id: str) -> str:
        """The connection's access token or key; `MissingSecretError` (re-authenticate) when it is gone."""
        connection = self.get(id)
        secret = self.store.get(connection.secret_ref)
        if secret is None:
            raise MissingSecretError(
                f"The credential of connection {connection.name!r} ({id}) is missing from {self.store!r}. "
                "Re-authenticate the connection (connect it again or paste a new key).", code="missing_secret")
        return secret

    def refresh_token(self, id: str) -> str | None:
        """An OAuth connection's refresh token, when one was stored."""
        return self.store.get(self.get(id).refresh_ref)

    def source(self, id: str) -> StripeSource:
        """A `StripeSource` reading this connection's account."""
        # Imported here: the tables layer pulls in pandas, which registry users may not need.
        from mbi_widgets.tables.source import StripeSource

        connection = self.get(id)
        return StripeSource(self.secret(id), api_base=connection.api_base)

    # --- writing ---------------------------------------------------------------------------------

    def add(self, *, name: str, account_id: str, account_name: str, livemode: bool, scope: str,
            auth_method: str, secret: str, api_base: str, relay_url: str | None = None,
            refresh_token: str | None = None) -> Connection:
        """Registers a connection, status Pending until `test()`.

        The secret (and refresh token) go to the store first, then the row in one transaction; if the row
        cannot be written the secrets are removed again, so nothing is left half-written.
        """
        _check_auth_method(auth_method)
        _check_secret(secret)
        connection_id = self._new_id()
        connection = Connection(
            id=connection_id, name=_clean_name(name), connection_type=STRIPE, account_id=account_id,
            account_name=account_name, livemode=bool(livemode), scope=scope, auth_method=auth_method,
            status=PENDING, status_message="Not tested yet.", created=_now(), last_started=None,
            last_duration=None, api_base=api_base.rstrip("/"), relay_url=relay_url,
            secret_ref=f"{APP_NAME}:connection:{connection_id}")
        self._store_secrets(connection, secret, refresh_token)
        try:
            with self._transaction() as db:
                placeholders = ", ".join(f":{column}" for column in _COLUMNS)
                db.execute(f"INSERT INTO connections ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                           _row(connection))
        except BaseException:
            self._forget_secrets(connection)
            raise
        log.info("added connection %s (%s %s, %s)", connection.id, STRIPE, account_id, auth_method)
        return connection

    def rename(self, id: str, name: str) -> Connection:
        """Gives the connection a new display name."""
        self._update(id, name=_clean_name(name))
        return self.get(id)

    def replace_secret(self, id: str, secret: str, *, auth_method: str | None = None,
                       refresh_token: str | None = None, relay_url: str | None = None) -> Connection:
        """Re-authenticates: the new secret replaces the old one and the status is Pending until tested.

        A refresh token not given is removed (it belonged to the old grant). An OAuth grant records the
        relay it came through (`relay_url`, else the one recorded); a key keeps none. If the row cannot
        be updated, the old secrets are put back.
        """
        _check_secret(secret)
        if auth_method is not None:
            _check_auth_method(auth_method)
        connection = self.get(id)
        method = auth_method or connection.auth_method
        relay = (relay_url or connection.relay_url) if method == "oauth" else None
        previous = (self.store.get(connection.secret_ref), self.store.get(connection.refresh_ref))
        self._store_secrets(connection, secret, refresh_token)
        try:
            self._update(id, auth_method=method, relay_url=relay, status=PENDING,
                         status_message="Re-authenticated; not tested yet.")
        except BaseException:
            self._restore_secrets(connection, *previous)
            raise
        log.info("replaced the credential of connection %s", id)
        return self.get(id)

    def delete(self, id: str, *, deauthorize: Callable[[Connection, str], None] | None = None) -> Connection:
        """Removes a connection: deauthorizes it first (OAuth, when `deauthorize` is given), then its
        row and its secrets together. If anything fails, nothing is removed and the error propagates.
        Returns the removed connection."""
        connection = self.get(id)
        if connection.auth_method == "oauth" and deauthorize is not None:
            token = self.store.get(connection.secret_ref)
            if token is None:
                log.warning("Connection %s has no access token left, so its Stripe access could not be revoked "
                            "from here; revoke it in the Stripe Dashboard under Settings > Connected apps.", id)
            else:
                deauthorize(connection, token)
        # The row goes first, inside the transaction; the secrets go before it commits, and come back if
        # the commit fails: a registry that cannot be written (locked, read-only, full) loses nothing.
        secret, refresh_token = self.store.get(connection.secret_ref), self.store.get(connection.refresh_ref)
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM connections WHERE id = ?", (id,))
                self._forget_secrets(connection)
        except BaseException:
            self._restore_secrets(connection, secret, refresh_token)
            raise
        log.info("deleted connection %s", id)
        return connection

    # --- testing ---------------------------------------------------------------------------------

    def test(self, id: str) -> Connection:
        """Calls `GET /v1/account` with the connection's credential and records the outcome.

        Success (with start time and duration); Needs re-authentication when Stripe answers 401, the
        credential reads another account, or the secret is missing from the store (then no request is
        made and the last start and duration are kept); Error otherwise. The row is updated either way.
        """
        connection = self.get(id)
        try:
            secret = self.store.get(connection.secret_ref)
        except SecretStoreError as exc:
            return self._record(id, ERROR, str(exc))
        if secret is None:
            return self._record(id, NEEDS_REAUTH, "The credential is missing from the secret store (it was "
                                "removed, or the store could not be read). Re-authenticate the connection.")
        started, clock = _now(), time.perf_counter()
        status, message = _probe(connection, secret, self._http_client)
        duration = time.perf_counter() - clock
        log.info("tested connection %s: %s", id, status)
        return self._record(id, status, message, started=started, duration=duration)

    def sync(self, id: str, warehouse: "Warehouse", tables: Iterable[str] | None = None, *, full: bool = False,
             progress: Callable[[int, int | None], None] | None = None, source: "StripeSource | None" = None,
             **hooks: Any) -> "SyncReport":
        """Brings this connection's tables up to date in `warehouse` (through `source` when given, else a
        new one); `hooks` go to `Warehouse.sync` (`table_progress`, `on_table`).

        When Stripe rejects the credential (revoked, deauthorized), the connection turns to Needs
        re-authentication and the error is raised; the warehouse keeps its last good state.
        """
        from mbi_widgets.tables.fetch import AuthenticationFailed

        connection = self.get(id)
        source = source if source is not None else self.source(id)
        try:
            return warehouse.sync(source, tables, full=full, progress=progress, **hooks)
        except AuthenticationFailed as exc:
            reason = OAUTH_REVOKED if connection.auth_method == "oauth" else str(exc)
            self._record(id, NEEDS_REAUTH, f"{reason} The warehouse keeps the tables of the last good sync.")
            raise

    # --- internals -------------------------------------------------------------------------------

    def _record(self, id: str, status: str, message: str, *, started: datetime | None = None,
                duration: float | None = None) -> Connection:
        changes: dict[str, Any] = {"status": status, "status_message": message}
        if started is not None:
            changes |= {"last_started": _iso(started), "last_duration": duration}
        self._update(id, **changes)
        return self.get(id)

    def _update(self, id: str, **changes: Any) -> None:
        assignments = ", ".join(f"{column} = :{column}" for column in changes)
        with self._transaction() as db:
            cursor = db.execute(f"UPDATE connections SET {assignments} WHERE id = :id", changes | {"id": id})
            if cursor.rowcount == 0:
                raise UnknownConnectionError(f"Connection {id!r} no longer exists (another kernel may have deleted "
                                             "it); Registry.list() shows the connections there are.",
                                             code="unknown_connection")

    def _new_id(self) -> str:
        while True:
            candidate = "conn_" + random_tokens.token_hex(5)
            with self._connect() as db:
                if db.execute("SELECT 1 FROM connections WHERE id = ?", (candidate,)).fetchone() is None:
                    return candidate

    def _store_secrets(self, connection: Connection, secret: str, refresh_token: str | None) -> None:
        self.store.set(connection.secret_ref, secret)
        try:
            if refresh_token:
                self.store.set(connection.refresh_ref, refresh_token)
            else:
                self.store.delete(connection.refresh_ref)
        except BaseException:
            self.store.delete(connection.secret_ref)
            raise

    def _forget_secrets(self, connection: Connection) -> None:
        self.store.delete(connection.refresh_ref)
        self.store.delete(connection.secret_ref)

    def _restore_secrets(self, connection: Connection, secret: str | None, refresh_token: str | None) -> None:
        for ref, value in ((connection.secret_ref, secret), (connection.refresh_ref, refresh_token)):
            if value is None:
                self.store.delete(ref)
            else:
                self.store.set(ref, value)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (safe across threads and processes); SQLite errors become RegistryError."""
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            yield db
        except sqlite3.Error as exc:
            raise RegistryError(
                f"The connections registry {self.path} could not be read or written ({exc}). If another kernel "
                f"is busy with it, try again; if the file is damaged, move it away (or set {REGISTRY_ENV} to "
                "another path) and connect your data sources again.", code="registry_storage") from exc
        finally:
            if db is not None:
                db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so concurrent writers queue, not fail."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _probe(connection: Connection, secret: str, http_client: stripe.HTTPClient | None) -> tuple[str, str]:
    """The status and message that one `GET /v1/account` with `secret` earns."""
    # No Stripe-Account header: OAuth tokens and restricted keys already act as their account, and a
    # secret key is taken to be the account's own (Stripe rejects the header for non-Connect accounts).
    client = stripe.StripeClient(secret, base_addresses={"api": connection.api_base}, max_network_retries=0,
                                 http_client=http_client)
    try:
        account = client.v1.accounts.retrieve_current()
    except stripe.AuthenticationError as exc:
        if connection.auth_method == "oauth":  # Stripe's words ("Invalid API Key provided") are about keys
            return NEEDS_REAUTH, OAUTH_REVOKED
        return NEEDS_REAUTH, (f"Stripe rejected the credential ({_stripe_message(exc, secret)}). The access was "
                              "revoked or the key is wrong: re-authenticate the connection.")
    except stripe.PermissionError as exc:
        return _probe_tables(client, secret, exc, connection)
    except stripe.APIConnectionError as exc:
        return ERROR, (f"Could not reach {connection.api_base} ({_stripe_message(exc, secret)}). Check the "
                       "network connection and test again.")
    except stripe.StripeError as exc:
        return ERROR, f"Stripe answered with an error ({_stripe_message(exc, secret)}). Test again later."
    if account.id != connection.account_id:
        return NEEDS_REAUTH, (f"The credential reads account {account.id}, not {connection.account_id}. "
                              "Re-authenticate with a credential for the right account.")
    return SUCCESS, "Connected."


def _probe_tables(client: stripe.StripeClient, secret: str, denied: stripe.PermissionError,
                  connection: Connection) -> tuple[str, str]:
    """A restricted key without Account access is fine if it reads the tables: each expected one is probed."""
    from mbi_widgets.auth import _ACCOUNT_IN_MESSAGE, AuthError, table_access

    named = _ACCOUNT_IN_MESSAGE.search(denied.user_message or str(denied))
    if named and connection.account_id.startswith("acct_") and named.group(1) != connection.account_id:
        return NEEDS_REAUTH, (f"The credential reads account {named.group(1)}, not {connection.account_id}. "
                              "Re-authenticate with a credential for the right account.")
    try:
        access = table_access(secret, client=client)
    except AuthError as exc:
        status = NEEDS_REAUTH if exc.code == "invalid_key" else ERROR
        return status, f"{exc} Re-authenticate the connection if it persists."
    if not access.readable:
        return ERROR, (f"The credential may read neither the account ({_stripe_message(denied, secret)}) nor any "
                       f"expected table ({', '.join(sorted(set(access.refused.values())))}). Give the restricted key "
                       "Read access to the tables, or re-authenticate with a key that has it.")
    if access.complete:
        return SUCCESS, "Connected (the key reads every expected table, but not the account's details)."
    return SUCCESS, (f"Connected, but the key reads only {', '.join(access.readable)}; it cannot read "
                     f"{', '.join(access.refused)} ({', '.join(sorted(set(access.refused.values())))}).")


def _stripe_message(exc: stripe.StripeError, secret: str) -> str:
    """Stripe's own words about an error, with the secret scrubbed should the server echo it."""
    text = (exc.user_message or str(exc) or type(exc).__name__).strip()
    code = f", code {exc.code}" if exc.code else ""
    status = f"HTTP {exc.http_status}: " if exc.http_status else ""
    return f"{status}{text.replace(secret, redact(secret))}{code}"


def _check_auth_method(auth_method: str) -> None:
    if auth_method not in AUTH_METHODS:
        raise RegistryError(f"Unknown auth_method {auth_method!r}; use one of {', '.join(AUTH_METHODS)}.",
                            code="invalid_auth_method")


def _check_secret(secret: str) -> None:
    if not isinstance(secret, str) or not secret.strip():
        raise RegistryError("The connection needs its credential (an OAuth access token or an API key), but none "
                            "was given; authorize again or paste the key.", code="missing_secret")


def _clean_name(name: str) -> str:
    cleaned = " ".join(str(name).split())
    if not cleaned:
        raise RegistryError("A connection needs a name; give it one, e.g. the Stripe account's business name.",
                            code="invalid_name")
    return cleaned


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    """UTC, always with microseconds, so that stored timestamps sort as text."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("registry timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _row(connection: Connection) -> dict[str, Any]:
    row = asdict(connection)
    row |= {"livemode": int(connection.livemode), "created": _iso(connection.created),
            "last_started": _iso(connection.last_started)}
    return row


def _connection(row: sqlite3.Row) -> Connection:
    values = dict(row)
    values["livemode"] = bool(values["livemode"])
    values["created"] = datetime.fromisoformat(values["created"])
    if values["last_started"] is not None:
        values["last_started"] = datetime.fromisoformat(values["last_started"])
    return Connection(**{column: values[column] for column in _COLUMNS})


__all__ = ["Registry", "Connection", "RegistryError", "UnknownConnectionError", "MissingSecretError",
           "SUCCESS", "PENDING", "NEEDS_REAUTH", "ERROR", "STATUSES", "AUTH_METHODS", "REGISTRY_ENV", "OAUTH_REVOKED",
           "default_registry_path"]
