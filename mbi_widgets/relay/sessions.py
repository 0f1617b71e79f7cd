"""The relay's device sessions in SQLite: pending sessions survive a restart; tokens leave once.

Device codes are stored only as SHA-256 hashes, so the database alone cannot redeem a session.
Tokens sit in a row only between the Connect callback and the notebook's next poll, encrypted
under a key kept outside the database (see `mbi_widgets.relay.atrest`); the database file is 0600.
The same database keeps the guess and issuance counters (so a restart does not reset them) and
the queue of grants to deauthorize at Stripe (so a failed deauthorization is retried, not lost).
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mbi_widgets.relay.atrest import TokenCipher, TokensUnreadable, private_file, private_folder

#: Unambiguous letters only (no vowels, no look-alikes), as RFC 8628 §6.1 suggests.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8

PENDING, APPROVED, DENIED, REDEEMED, FAILED = "pending", "approved", "denied", "redeemed", "failed"
CANCELLED = "cancelled"  # the notebook gave up on the code: its link is dead, a late grant is revoked

#: Kinds of counted attempts: a wrong user code typed in a browser, a device code issued.
GUESS, ISSUE = "guess", "issue"

_SCHEMA = """
create table if not exists sessions (
    device_hash text primary key,
    user_code text not null unique,
    state text not null unique,
    status text not null,
    scope text not null,
    created real not null,
    expires real not null,
    interval real not null,
    last_poll real,
    tokens text,
    error text
);
create index if not exists sessions_expires on sessions (expires);
create table if not exists attempts (
    kind text not null,
    client text not null,
    at real not null
);
create index if not exists attempts_by_client on attempts (kind, client, at);
create index if not exists attempts_by_time on attempts (kind, at);
create table if not exists revocations (
    stripe_user_id text primary key,
    queued real not null,
    tries integer not null default 0,
    last_error text
);
"""


def hash_code(device_code: str) -> str:
    return hashlib.sha256(device_code.encode()).hexdigest()


def new_user_code() -> str:
    return "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def format_user_code(code: str) -> str:
    return f"{code[:4]}-{code[4:]}"


def normalise_user_code(text: str) -> str:
    return "".join(ch for ch in text.upper() if ch.isalnum())


@dataclass(frozen=True)
class Session:
    device_hash: str
    user_code: str
    state: str
    status: str
    scope: str
    created: float
    expires: float
    interval: float
    last_poll: float | None
    tokens: str | None
    error: str | None
    #: SHA-256 of the cookie of the browser that confirmed the user code; only it may finish the sign-in.
    browser_hash: str | None = None
    #: The Stripe account an approved session's tokens are for (not a secret): what a revocation names.
    stripe_user_id: str | None = None

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires


def _add_column(db: sqlite3.Connection, name: str, kind: str) -> None:
    """Adds a nullable column to `sessions` unless it is there already (idempotent migration)."""
    if name in {row[1] for row in db.execute("pragma table_info(sessions)")}:
        return
    try:
        db.execute(f"alter table sessions add column {name} {kind}")
    except sqlite3.OperationalError as exc:  # another process opening the same database added it first
        if "duplicate column" not in str(exc):
            raise


class SessionStore:
    """Thread-safe access to the sessions table (one connection, serialised by a lock)."""

    def __init__(self, path: str | Path, *, cipher: TokenCipher | None = None) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            # Created 0600 (in a 0700 folder when the folder is new) before SQLite opens it: its -wal
            # and -shm files take the database's mode.
            private_folder(Path(self.path).parent)
            private_file(Path(self.path))
        self.cipher = cipher or TokenCipher.for_database(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma busy_timeout=5000")
        self._db.execute("pragma secure_delete=on")  # erased tokens are zeroed, not left in free space
        self._db.executescript(_SCHEMA)
        _add_column(self._db, "browser_hash", "text")  # databases from before browser binding
        _add_column(self._db, "stripe_user_id", "text")  # databases from before revocations
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple) -> Session | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return Session(**dict(row)) if row else None

    def create(self, *, scope: str, ttl: float, interval: float) -> tuple[str, Session]:
        """A new pending session; returns the device code (shown once, stored hashed) and the session."""
        now = time.time()
        for _ in range(10):
            device_code = secrets.token_urlsafe(32)
            session = Session(hash_code(device_code), new_user_code(), secrets.token_urlsafe(24), PENDING, scope,
                              now, now + ttl, interval, None, None, None)
            try:
                with self._lock:
                    self._db.execute(
                        "insert into sessions (device_hash, user_code, state, status, scope, created, expires, "
                        "interval, last_poll, tokens, error) values (?,?,?,?,?,?,?,?,?,?,?)",
                        (session.device_hash, session.user_code, session.state, session.status, session.scope,
                         session.created, session.expires, session.interval, None, None, None))
                return device_code, session
            except sqlite3.IntegrityError:  # a user code collision: draw again
                continue
        raise RuntimeError("could not allocate a unique user code")

    def by_device_code(self, device_code: str) -> Session | None:
        return self._one("select * from sessions where device_hash = ?", (hash_code(device_code),))

    def by_user_code(self, user_code: str) -> Session | None:
        return self._one("select * from sessions where user_code = ?", (normalise_user_code(user_code),))

    def by_state(self, state: str) -> Session | None:
        return self._one("select * from sessions where state = ?", (state,))

    def bind_browser(self, session: Session, browser_hash: str) -> bool:
        """Binds a pending session to the browser that confirmed its code; False when no longer pending."""
        with self._lock:
            cursor = self._db.execute("update sessions set browser_hash = ? where device_hash = ? and status = ?",
                                      (browser_hash, session.device_hash, PENDING))
        return cursor.rowcount == 1

    def record_poll(self, session: Session, *, interval: float | None = None) -> None:
        with self._lock:
            self._db.execute("update sessions set last_poll = ?, interval = ? where device_hash = ?",
                             (time.time(), interval if interval is not None else session.interval,
                              session.device_hash))

    def settle(self, session: Session, *, status: str, tokens: dict | None = None, error: str | None = None) -> bool:
        """Moves a pending session to approved/denied/failed; False when it was no longer pending.

        Tokens are stored sealed; the account they are for is stored in the clear, so that an
        uncollected grant can be deauthorized without opening them.
        """
        sealed = self.cipher.seal(tokens) if tokens else None
        account = (tokens or {}).get("stripe_user_id") or None
        with self._lock:
            cursor = self._db.execute(
                "update sessions set status = ?, tokens = ?, error = ?, stripe_user_id = ? "
                "where device_hash = ? and status = ?",
                (status, sealed, error, account, session.device_hash, PENDING))
        return cursor.rowcount == 1

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction under the lock; the WAL is emptied afterwards (it may hold erased tokens)."""
        with self._lock:
            self._db.execute("begin immediate")
            try:
                yield self._db
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
            # The write-ahead log still holds the pages with the tokens: fold it in and empty it.
            self._db.execute("pragma wal_checkpoint(TRUNCATE)")

    def redeem(self, session: Session) -> dict | None:
        """The tokens, exactly once: they are erased in the same transaction.

        Raises TokensUnreadable (and fails the session) when they cannot be decrypted.
        """
        unreadable: TokensUnreadable | None = None
        tokens = None
        with self._transaction() as db:
            row = db.execute("select tokens, stripe_user_id from sessions where device_hash = ? and status = ?",
                             (session.device_hash, APPROVED)).fetchone()
            if row and row["tokens"]:
                try:
                    tokens = self.cipher.open(row["tokens"])
                except TokensUnreadable as exc:
                    unreadable = exc
            db.execute("update sessions set status = ?, tokens = null, error = ? where device_hash = ?",
                       (FAILED if unreadable else REDEEMED, str(unreadable) if unreadable else None,
                        session.device_hash))
            if tokens and row["stripe_user_id"]:
                # The account now has a connection someone holds: deauthorizing it would cut that one off.
                db.execute("delete from revocations where stripe_user_id = ?", (row["stripe_user_id"],))
        if unreadable is not None:
            raise unreadable
        return tokens

    def cancel(self, session: Session) -> str | None:
        """Marks a session cancelled and erases its tokens; returns the account of a grant nobody will use.

        That account is queued for deauthorization (see `queue_revocation`) in the same transaction.
        """
        with self._transaction() as db:
            row = db.execute("select status, stripe_user_id from sessions where device_hash = ?",
                             (session.device_hash,)).fetchone()
            if row is None:
                return None
            db.execute("update sessions set status = ?, tokens = null where device_hash = ?",
                       (CANCELLED, session.device_hash))
            account = row["stripe_user_id"] if row["status"] in (APPROVED, REDEEMED) else None
            if account and not self._queue(db, account):
                account = None
        return account

    def purge_expired(self, *, grace: float = 60.0, keep_attempts: float = 3600.0) -> int:
        """Erases the tokens of expired sessions and queues their grants for deauthorization; deletes sessions
        expired more than `grace` seconds ago (until then a late poll is told `expired_token`) and counted
        attempts older than `keep_attempts`. Returns how many sessions gave up uncollected tokens."""
        now = time.time()
        with self._transaction() as db:
            uncollected = db.execute("select device_hash, stripe_user_id from sessions where status = ? and "
                                     "expires <= ?", (APPROVED, now)).fetchall()
            for row in uncollected:
                db.execute("update sessions set status = ?, tokens = null, error = ? where device_hash = ?",
                           (FAILED, "The code expired before the notebook collected the connection.",
                            row["device_hash"]))
                if row["stripe_user_id"]:
                    self._queue(db, row["stripe_user_id"])
            db.execute("delete from sessions where expires < ?", (now - grace,))
            db.execute("delete from attempts where at < ?", (now - keep_attempts,))
        return len(uncollected)

    # --- grants to deauthorize at Stripe -------------------------------------------------------------

    def queue_revocation(self, account: str) -> bool:
        """Queues `account`'s grant for deauthorization; False (nothing queued) when that would cut off a
        connection this relay handed out or is about to (see `_queue`)."""
        with self._transaction() as db:
            return self._queue(db, account)

    @staticmethod
    def _queue(db: sqlite3.Connection, account: str) -> bool:
        # Stripe's deauthorize ends the platform's whole connection to the account, every token of it.
        # When another session of this relay holds that account's connection (handed to a notebook, or
        # approved and waiting to be collected), the spare grant is the same connection: its tokens are
        # simply dropped. The relay only remembers sessions until they expire; older connections to the
        # same account (in another notebook) cannot be seen and are cut off too. (Callers first move the
        # session whose grant is spare out of approved/redeemed, so it does not count itself.)
        if SessionStore._handed_out(db, account):
            return False
        db.execute("insert into revocations (stripe_user_id, queued) values (?, ?) "
                   "on conflict (stripe_user_id) do nothing", (account, time.time()))
        return True

    @staticmethod
    def _handed_out(db: sqlite3.Connection, account: str) -> bool:
        row = db.execute("select 1 from sessions where stripe_user_id = ? and status in (?, ?) limit 1",
                         (account, APPROVED, REDEEMED)).fetchone()
        return row is not None

    def due_revocations(self) -> list[str]:
        """Accounts to deauthorize now; entries that became someone's live connection are dropped."""
        with self._transaction() as db:
            accounts = [row["stripe_user_id"] for row in
                        db.execute("select stripe_user_id from revocations order by queued").fetchall()]
            live = [account for account in accounts if self._handed_out(db, account)]
            db.executemany("delete from revocations where stripe_user_id = ?", [(a,) for a in live])
        return [account for account in accounts if account not in live]

    def revocation_done(self, account: str) -> None:
        with self._lock:
            self._db.execute("delete from revocations where stripe_user_id = ?", (account,))

    def revocation_failed(self, account: str, reason: str) -> None:
        with self._lock:
            self._db.execute("update revocations set tries = tries + 1, last_error = ? where stripe_user_id = ?",
                             (reason[:200], account))

    # --- throttling counters ----------------------------------------------------------------------------

    def record_attempt(self, kind: str, client: str) -> None:
        with self._lock:
            self._db.execute("insert into attempts values (?, ?, ?)", (kind, client, time.time()))

    def count_attempts(self, kind: str, *, within: float, client: str | None = None) -> int:
        """How many `kind` attempts (from `client`, or from anyone) in the last `within` seconds."""
        since = time.time() - within
        with self._lock:
            if client is None:
                row = self._db.execute("select count(*) from attempts where kind = ? and at > ?",
                                       (kind, since)).fetchone()
            else:
                row = self._db.execute("select count(*) from attempts where kind = ? and client = ? and at > ?",
                                       (kind, client, since)).fetchone()
        return int(row[0])

    def live_pending(self) -> int:
        """Pending sessions that have not expired: codes waiting for someone to type them."""
        with self._lock:
            row = self._db.execute("select count(*) from sessions where status = ? and expires > ?",
                                   (PENDING, time.time())).fetchone()
        return int(row[0])
