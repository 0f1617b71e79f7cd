"""Where secrets live: the `SecretStore` strategy and its memory, OS-keyring and 0600-file implementations."""
from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
import warnings
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import keyring
import platformdirs
from keyring.backends import fail, null
from keyring.errors import KeyringError, PasswordDeleteError

from mbi_widgets.errors import MbiError

log = logging.getLogger(__name__)

APP_NAME = "mbi-widgets"
#: Environment variable that moves the secrets file (used when no OS keyring is usable).
SECRETS_ENV = "MBI_WIDGETS_SECRETS"
FILE_MODE = 0o600
DIR_MODE = 0o700
_FORMAT_VERSION = 1


class SecretStoreError(MbiError):
    """A secret could not be read from or written to its store."""


class InsecureStorageWarning(UserWarning):
    """Secrets are kept in a file readable by the user's account instead of the OS keyring."""


@runtime_checkable
class SecretStore(Protocol):
    """Where connection secrets are kept, by reference. A reference is not secret; a secret never leaves here
    except through `get`."""

    def get(self, ref: str) -> str | None: ...

    def set(self, ref: str, secret: str) -> None: ...

    def delete(self, ref: str) -> None: ...


def _check_entry(ref: str, secret: str | None = None) -> None:
    if not isinstance(ref, str) or not ref:
        raise ValueError("a secret reference must be a non-empty string")
    # The message names only the type: the value may be the secret itself.
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ValueError(f"a secret must be a non-empty string, not an empty value or {type(secret).__name__}")


class MemoryStore:
    """Secrets in a dict, for tests and throwaway sessions; thread-safe."""

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, ref: str) -> str | None:
        _check_entry(ref)
        with self._lock:
            return self._secrets.get(ref)

    def set(self, ref: str, secret: str) -> None:
        _check_entry(ref, secret)
        with self._lock:
            self._secrets[ref] = secret

    def delete(self, ref: str) -> None:
        _check_entry(ref)
        with self._lock:
            self._secrets.pop(ref, None)

    def refs(self) -> list[str]:
        """The references held (never the secrets), sorted."""
        with self._lock:
            return sorted(self._secrets)

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._secrets)} secrets)"


class KeyringStore:
    """Secrets in the OS keyring (macOS Keychain, Windows Credential Locker, Secret Service) via `keyring`.

    `backend` is any object with keyring's `get_password`/`set_password`/`delete_password`; by default
    the active keyring backend is used.
    """

    def __init__(self, service: str = APP_NAME, *, backend: Any | None = None) -> None:
        self.service = service
        self._backend = backend

    @staticmethod
    def usable() -> bool:
        """Whether the active keyring backend can store secrets (not keyring's fail or null backend)."""
        try:
            backend = keyring.get_keyring()
        except Exception as exc:  # any failure to find a backend means: do not use the keyring
            log.debug("the OS keyring is not usable: %s", type(exc).__name__)
            return False
        if isinstance(backend, (fail.Keyring, null.Keyring)):
            return False
        # keyring's chainer with nothing to chain behaves like the fail backend.
        return getattr(backend, "backends", None) != []

    def _keyring(self) -> Any:
        return self._backend if self._backend is not None else keyring

    def get(self, ref: str) -> str | None:
        _check_entry(ref)
        with self._wrapped("read", ref):
            return self._keyring().get_password(self.service, ref)

    def set(self, ref: str, secret: str) -> None:
        _check_entry(ref, secret)
        with self._wrapped("write", ref):
            self._keyring().set_password(self.service, ref, secret)

    def delete(self, ref: str) -> None:
        _check_entry(ref)
        with self._wrapped("delete", ref):
            try:
                self._keyring().delete_password(self.service, ref)
            except PasswordDeleteError:
                pass  # already absent: deleting is idempotent

    @contextmanager
    def _wrapped(self, action: str, ref: str) -> Iterator[None]:
        try:
            yield
        except KeyringError as exc:
            raise SecretStoreError(
                f"The OS keyring could not {action} {ref!r} for service {self.service!r} ({type(exc).__name__}). "
                "Unlock the keyring (or run `python -m keyring diagnose` to see which backend is active) and "
                "try again.", code="keyring_error") from exc

    def __repr__(self) -> str:
        return f"KeyringStore(service={self.service!r})"


def default_secrets_path() -> Path:
    """`$MBI_WIDGETS_SECRETS`, else `secrets.json` in the platform's per-user config directory."""
    override = os.environ.get(SECRETS_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME)) / "secrets.json"


def ensure_private_dir(directory: Path) -> None:
    """Creates `directory` with mode 0700 when missing (parents with default modes); never loosens one."""
    if directory.is_dir():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return  # another process created it first
    os.chmod(directory, DIR_MODE)  # mkdir's mode is filtered by the umask


class FileStore:
    """Secrets in a JSON file of mode 0600 inside a 0700 directory: the fallback when no keyring is usable.

    Writes are atomic (a 0600 temporary file in the same directory, then `os.replace`) and serialised by
    a lock file, so processes sharing the file never lose each other's writes. A corrupt file logs a
    warning and reads as empty: the connections whose secrets it held then need re-authorization.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_secrets_path()
        self._thread_lock = threading.Lock()
        self._reported_corrupt: tuple[int, int] | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def get(self, ref: str) -> str | None:
        _check_entry(ref)
        return self._read().get(ref)

    def set(self, ref: str, secret: str) -> None:
        _check_entry(ref, secret)
        with self._locked():
            secrets = self._read(for_update=True)
            secrets[ref] = secret
            self._write(secrets)

    def delete(self, ref: str) -> None:
        _check_entry(ref)
        with self._locked():
            secrets = self._read(for_update=True)
            if secrets.pop(ref, None) is not None:
                self._write(secrets)

    def refs(self) -> list[str]:
        """The references held (never the secrets), sorted."""
        return sorted(self._read())

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r})"

    # --- reading ---------------------------------------------------------------------------------

    def _read(self, *, for_update: bool = False) -> dict[str, str]:
        try:
            self._restrict_mode()
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise self._os_error("read", exc) from exc
        secrets = _parse(raw)
        if secrets is None:
            self._report_corrupt(for_update)
            return {}
        return secrets

    def _restrict_mode(self) -> None:
        """A file others can read is tightened to 0600, with a warning, rather than refused."""
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if os.name == "posix" and mode & 0o077:
            log.warning("The secrets file %s had mode %o (readable by other users); restricting it to 0600. "
                        "If you did not loosen it yourself, consider re-authorizing your connections.",
                        self.path, mode)
            os.chmod(self.path, FILE_MODE)

    def _report_corrupt(self, for_update: bool) -> None:
        if for_update:
            # Kept aside rather than overwritten: whoever can repair it by hand may recover the secrets.
            backup = self.path.with_name(f"{self.path.name}.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
            try:
                os.replace(self.path, backup)
            except OSError as exc:
                raise self._os_error("move aside", exc) from exc
            log.warning("The secrets file %s was not valid JSON; moved it aside to %s and starting a new one. "
                        "Connections whose secrets it held need re-authorization.", self.path, backup)
            return
        st = os.stat(self.path)
        if self._reported_corrupt != (st.st_mtime_ns, st.st_size):  # once per version of the file
            self._reported_corrupt = (st.st_mtime_ns, st.st_size)
            log.warning("The secrets file %s is not valid JSON; treating it as empty. Connections whose secrets "
                        "it held need re-authorization (re-connect them; the file is replaced on the next save).",
                        self.path)

    # --- writing ---------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the cross-process lock file (and a thread lock, for threads of this process)."""
        with self._thread_lock:
            try:
                ensure_private_dir(self.path.parent)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except OSError as exc:
                raise self._os_error("lock", exc) from exc
            try:
                _lock_fd(fd)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def _write(self, secrets: dict[str, str]) -> None:
        payload = json.dumps({"version": _FORMAT_VERSION, "secrets": secrets}, indent=1, sort_keys=True).encode()
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                if hasattr(os, "fchmod"):  # mkstemp's 0600 is still filtered by the umask
                    os.fchmod(handle.fileno(), FILE_MODE)
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            raise self._os_error("write", exc) from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _os_error(self, action: str, exc: OSError) -> SecretStoreError:
        return SecretStoreError(
            f"Could not {action} the secrets file {self.path} ({exc.strerror or type(exc).__name__}). Check that "
            f"its directory exists and is writable by you, or set {SECRETS_ENV} to another file path.",
            code="secrets_file_error")


def _parse(raw: bytes) -> dict[str, str] | None:
    """The secrets in a file's bytes, or None when the file is not ours to read (not JSON, wrong shape)."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("secrets"), dict):
        return None
    return {ref: value for ref, value in document["secrets"].items()
            if isinstance(ref, str) and isinstance(value, str) and value}


def _lock_fd(fd: int) -> None:
    """Blocks until this process holds an exclusive lock on the open lock file."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # itself retries for about 10 s
                return
            except OSError:
                continue
    fcntl.flock(fd, fcntl.LOCK_EX)


def default_store() -> SecretStore:
    """The OS keyring when one is usable; otherwise a 0600 `FileStore`, with an `InsecureStorageWarning`."""
    if KeyringStore.usable():
        return KeyringStore()
    store = FileStore()
    warnings.warn(
        f"No usable OS keyring was found, so mbi-widgets keeps connection secrets in {store.path}, a file only "
        "your user account can read (mode 0600). To use the OS keyring instead, install and unlock one "
        "(macOS Keychain and Windows Credential Locker work out of the box; on Linux run a Secret Service such "
        "as GNOME Keyring or KWallet and `pip install secretstorage`), then restart the kernel and "
        "re-authorize your connections. `python -m keyring diagnose` shows which backend is active.",
        InsecureStorageWarning, stacklevel=2)
    return store


__all__ = ["SecretStore", "MemoryStore", "KeyringStore", "FileStore", "default_store", "default_secrets_path",
           "SecretStoreError", "InsecureStorageWarning", "SECRETS_ENV"]
