"""The relay's secrets at rest: a private folder and database file, and the key that encrypts tokens.

Tokens sit in the relay's database only between Stripe's callback and the notebook's next poll,
but they sit there encrypted (Fernet: AES-128-CBC with an HMAC-SHA256) under a key that is not in
the database: `MBI_RELAY_TOKEN_KEY` when set (`RelayConfig.token_key`), otherwise a key file
beside the database, created once with mode 0600.

The key file beside the database protects against the database leaking alone (a backup, a copy,
a snapshot of that one file), not against someone who can read the whole disk as the relay's
user: for that, give the key through MBI_RELAY_TOKEN_KEY from a secret manager.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from mbi_widgets.errors import MbiError

log = logging.getLogger("mbi_widgets.relay")

TOKEN_KEY_ENV = "MBI_RELAY_TOKEN_KEY"
_NEW_KEY_HINT = ('python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"')


class TokensUnreadable(MbiError):
    """Stored tokens could not be decrypted (the token key changed since they were stored)."""


def key_path_for(db_path: str | Path) -> Path:
    """Where the key file of a database lives: beside it, named after it."""
    path = Path(db_path)
    return path.with_name(path.name + ".key")


def private_folder(folder: Path) -> None:
    """Creates `folder` and any missing parents with mode 0700; folders that exist are left as they are.

    An existing folder may be shared (/tmp, a home directory): it is not ours to chmod. The files
    in it are 0600 either way.
    """
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(created, 0o700)  # mkdir's mode goes through the umask


def private_file(path: Path) -> None:
    """Makes sure `path` exists with mode 0600 before SQLite opens it (its -wal/-shm take the same mode).

    A file left readable by others (an older relay created its database 0644) is tightened, with a warning.
    """
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _tighten(each)


def _tighten(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.getuid():
        os.chmod(path, 0o600)
        log.warning("%s was readable by other users (mode %o); it is now 0600", path, stat.S_IMODE(info.st_mode))


class TokenCipher:
    """Seals token answers for storage and opens them again; its repr never shows the key."""

    def __init__(self, key: str | bytes, *, source: str = TOKEN_KEY_ENV) -> None:
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise MbiError(f"{source} is not a valid token key (32 url-safe base64-encoded bytes). Generate one "
                           f"with: {_NEW_KEY_HINT}", code="relay_config") from exc

    @classmethod
    def ephemeral(cls) -> "TokenCipher":
        """A key that lives as long as this process (for an in-memory database)."""
        return cls(Fernet.generate_key())

    @classmethod
    def for_database(cls, db_path: str | Path, key: str | None = None) -> "TokenCipher":
        """The cipher from `key` (MBI_RELAY_TOKEN_KEY) when given, else from the key file beside the database."""
        if key:
            return cls(key.strip())
        if str(db_path) == ":memory:":
            return cls.ephemeral()
        path = key_path_for(db_path)
        return cls(_read_or_create_key(path), source=f"the key file {path}")

    def seal(self, tokens: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(tokens).encode()).decode("ascii")

    def open(self, sealed: str) -> dict[str, Any]:
        try:
            return json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, UnicodeEncodeError, ValueError) as exc:
            raise TokensUnreadable("the relay could not decrypt this sign-in's tokens: its token key changed "
                                   "since they were stored. Start again from the notebook.",
                                   code="tokens_unreadable") from exc

    def __repr__(self) -> str:
        return "TokenCipher(<key hidden>)"


def _read_or_create_key(path: Path) -> bytes:
    private_folder(path.parent)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    # Written to a private temporary file, then linked into place: a second relay starting at the same
    # moment either wins the link or reads the complete key, never half of one.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(Fernet.generate_key() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    _tighten(path)
    try:
        key = path.read_bytes().strip()
    except PermissionError as exc:
        raise MbiError(f"the relay's token key {path} cannot be read ({exc.strerror}); run the relay as the user "
                       f"that owns it, or set {TOKEN_KEY_ENV}", code="relay_config") from exc
    if not key:
        raise MbiError(f"the relay's token key file {path} is empty; delete it (tokens stored under the old key "
                       f"are lost: those sign-ins start again) or set {TOKEN_KEY_ENV}", code="relay_config")
    return key
