"""The relay's device sessions in SQLite: pending sessions survive a restart; tokens leave once.

Device codes are stored only as SHA-256 hashes, so the database alone cannot redeem a session.
Tokens sit in a row only between the Connect callback and the notebook's next poll.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: Unambiguous letters only (no vowels, no look-alikes), as RFC 8628 §6.1 suggests.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8

PENDING, APPROVED, DENIED, REDEEMED, FAILED = "pending", "approved", "denied", "redeemed", "failed"

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

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires


class SessionStore:
    """Thread-safe access to the sessions table (one connection, serialised by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma busy_timeout=5000")
        self._db.execute("pragma secure_delete=on")  # erased tokens are zeroed, not left in free space
        self._db.executescript(_SCHEMA)
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
                        "insert into sessions values (?,?,?,?,?,?,?,?,?,?,?)",
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

    def record_poll(self, session: Session, *, interval: float | None = None) -> None:
        with self._lock:
            self._db.execute("update sessions set last_poll = ?, interval = ? where device_hash = ?",
                             (time.time(), interval if interval is not None else session.interval,
                              session.device_hash))

    def settle(self, session: Session, *, status: str, tokens: dict | None = None, error: str | None = None) -> bool:
        """Moves a pending session to approved/denied/failed; False when it was no longer pending."""
        with self._lock:
            cursor = self._db.execute(
                "update sessions set status = ?, tokens = ?, error = ? where device_hash = ? and status = ?",
                (status, json.dumps(tokens) if tokens else None, error, session.device_hash, PENDING))
        return cursor.rowcount == 1

    def redeem(self, session: Session) -> dict | None:
        """The tokens, exactly once: they are erased in the same transaction."""
        with self._lock:
            self._db.execute("begin immediate")
            try:
                row = self._db.execute("select tokens from sessions where device_hash = ? and status = ?",
                                       (session.device_hash, APPROVED)).fetchone()
                self._db.execute("update sessions set status = ?, tokens = null where device_hash = ?",
                                 (REDEEMED, session.device_hash))
                self._db.execute("commit")
            except BaseException:
                self._db.execute("rollback")
                raise
            # The write-ahead log still holds the page with the tokens: fold it in and empty it.
            self._db.execute("pragma wal_checkpoint(TRUNCATE)")
        return json.loads(row["tokens"]) if row and row["tokens"] else None

    def purge_expired(self) -> int:
        """Deletes expired sessions (and any tokens they still held)."""
        with self._lock:
            cursor = self._db.execute("delete from sessions where expires < ?", (time.time() - 60,))
            if cursor.rowcount:
                self._db.execute("pragma wal_checkpoint(TRUNCATE)")
        return cursor.rowcount
