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
from keyring.errors import PasswordDeleteError

from mbi_widgets.errors import MbiError

log = logging.getLogger(__name__)

APP_NAME = "mbi-widgets"
#: Environment variable naming the secrets file; when set, `default_store()` keeps secrets there, not in the keyring.
SECRETS_ENV = "MBI_WIDGETS_SECRETS"
FILE_MODE = 0o600
DIR_MODE = 0o700
#: The keyring entry read to probe a backend; it is never written.
_PROBE_REF = "mbi-widgets:probe"
_NO_BACKEND = "no OS keyring backend is installed"
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
        """Whether the active keyring backend can store secrets: see `unusable_reason`."""
        return KeyringStore.unusable_reason() is None

    @staticmethod
    def unusable_reason(backend: Any | None = None) -> str | None:
        """Why `backend` (default: the active keyring backend) cannot keep secrets, or None when it can.

        keyring's fail and null backends and an empty chainer cannot; any other backend is probed with
        one read of an entry that never exists, because a backend can load fine and still fail every call
        (a Secret Service backend without a D-Bus session raises RuntimeError, not a KeyringError).
        """
        if backend is None:
            try:
                backend = keyring.get_keyring()
            except Exception as exc:  # any failure to find a backend means: do not use the keyring
                return f"no keyring backend could be loaded ({_describe(exc)})"
        if isinstance(backend, (fail.Keyring, null.Keyring)) or getattr(backend, "backends", None) == []:
            return _NO_BACKEND
        try:
            backend.get_password(APP_NAME, _PROBE_REF)
        except Exception as exc:
            return f"the keyring backend {_backend_name(backend)} failed a test read ({_describe(exc)})"
        return None

    def _keyring(self) -> Any:
        return self._backend if self._backend is not None else keyring

    def get(self, ref: str) -> str | None:
        _check_entry(ref)
        with self._wrapped("read", ref):
            return self._keyring().get_password(self.service, ref)

    def set(self, ref: str, secret: str) -> None:
        _check_entry(ref, secret)
        with self._wrapped("write", ref, secret):
            self._keyring().set_password(self.service, ref, secret)

    def delete(self, ref: str) -> None:
        _check_entry(ref)
        with self._wrapped("delete", ref):
            try:
                self._keyring().delete_password(self.service, ref)
            except PasswordDeleteError:
                pass  # already absent: deleting is idempotent

    @contextmanager
    def _wrapped(self, action: str, ref: str, secret: str | None = None) -> Iterator[None]:
        """Any backend failure becomes a SecretStoreError: a read that fails must never look like "no secret"."""
        try:
            yield
        except Exception as exc:  # backends raise more than KeyringError (RuntimeError from D-Bus, OSError)
            raise SecretStoreError(
                f"The OS keyring ({self._backend_name()}) could not {action} {ref!r} for service {self.service!r} "
                f"({_describe(exc, secret)}). Unlock the keyring or start its service (`python -m keyring "
                f"diagnose` shows which backend is active) and try again; or set {SECRETS_ENV} to a file path to "
                "keep secrets in a 0600 file instead (connections saved in the keyring then need re-authorization).",
                code="keyring_error") from exc

    def _backend_name(self) -> str:
        if self._backend is not None:
            return _backend_name(self._backend)
        try:
            return _backend_name(keyring.get_keyring())
        except Exception:
            return "unknown backend"

    def __repr__(self) -> str:
        return f"KeyringStore(service={self.service!r})"


def _backend_name(backend: Any) -> str:
    """A keyring backend's display name (keyring's `name`, else its class)."""
    name = getattr(backend, "name", None)
    return name if isinstance(name, str) and name else type(backend).__name__


def _describe(exc: BaseException, secret: str | None = None) -> str:
    """`RuntimeError: first line of the message`, short; the message is left out if it contains `secret`."""
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if not message or (secret and secret in str(exc)):
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}"


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


def check_secrets_dir(directory: Path) -> None:
    """Makes sure an existing secrets folder is private: one of ours open to others is tightened to 0700 (with a
    warning naming it and its old mode); a shared one (sticky bit, like /tmp) or another user's is refused.

    A folder others can write to lets them replace or remove the secrets file, so it is never used as is.
    POSIX only; a missing folder is left alone (the caller creates it 0700).
    """
    if os.name != "posix":
        return
    try:
        st = os.stat(directory)  # follows a symlinked folder: the target is what must be private
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return  # not a folder: opening the file inside it fails with its own message
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_ISVTX and mode & 0o022:
        _refuse_dir(directory, f"is a shared folder (mode {mode:o}, sticky bit set, like /tmp)")
    if st.st_uid != os.geteuid():
        _refuse_dir(directory, f"belongs to another user (uid {st.st_uid}, you are {os.geteuid()})")
    if mode & 0o077:
        # Writable by others: they could have replaced the file, so the credentials in it are suspect.
        advice = (" If you did not loosen it yourself, consider re-authorizing your connections."
                  if mode & 0o022 else "")
        log.warning("The secrets folder %s had mode %o (open to other users); restricting it to 0700.%s",
                    directory, mode, advice)
        os.chmod(directory, DIR_MODE)


def _refuse_dir(directory: Path, reason: str) -> None:
    raise SecretStoreError(
        f"The secrets folder {directory} {reason}, so other users could replace or remove the secrets kept in it; "
        f"mbi-widgets keeps no secret there. Set {SECRETS_ENV} to a file path in a private folder of yours (for "
        f"example {Path(platformdirs.user_config_dir(APP_NAME)) / 'secrets.json'}) and try again.",
        code="secrets_dir_unsafe")


class FileStore:
    """Secrets in a JSON file of mode 0600 inside a 0700 directory: the fallback when no keyring is usable,
    or the user's choice through `$MBI_WIDGETS_SECRETS`. A folder or file others can use is tightened (or
    refused when it is shared or not the user's: see `check_secrets_dir`) before any secret is read or written.

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
            check_secrets_dir(self.path.parent)
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
        """A file others can read is tightened to 0600, with a warning, rather than refused; another user's
        file is refused (it could hold anything, and tightening it would make it theirs alone)."""
        st = os.stat(self.path)  # raises FileNotFoundError for a store not written yet, on every platform
        if os.name != "posix":
            return
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            raise SecretStoreError(
                f"The secrets file {self.path} belongs to another user (uid {st.st_uid}, you are {os.geteuid()}), "
                f"so mbi-widgets does not trust it. Move it away (and re-authorize your connections), or set "
                f"{SECRETS_ENV} to a file path in a private folder of yours.", code="secrets_file_unsafe")
        if mode & 0o077:
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
                check_secrets_dir(self.path.parent)
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except OSError as exc:
                raise self._os_error("lock", exc) from exc
            try:
                _restrict_fd(fd)  # an existing lock file keeps the mode it was made with
            except OSError as exc:
                os.close(fd)
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


def _restrict_fd(fd: int) -> None:
    """Tightens an open file of ours to 0600 when others can read or write it (POSIX)."""
    if os.name == "posix" and stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)


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
    """A `FileStore` at `$MBI_WIDGETS_SECRETS` when that is set (the user chose the file); else the OS keyring
    when one is usable; else a 0600 `FileStore`, with an `InsecureStorageWarning` saying why."""
    if os.environ.get(SECRETS_ENV):
        store = FileStore()
        log.info("Keeping connection secrets in %s, as %s says.", store.path, SECRETS_ENV)
        return store
    reason = KeyringStore.unusable_reason()
    if reason is None:
        return KeyringStore()
    store = FileStore()
    # A backend that exists but fails may hold secrets saved while it worked: say they are not lost.
    earlier = ("" if reason == _NO_BACKEND else " Connections saved in the keyring while it worked are not in "
               "this file: fix the keyring and restart the kernel to use them again, or re-authorize them.")
    warnings.warn(
        f"The OS keyring cannot be used ({reason}), so mbi-widgets keeps connection secrets in {store.path}, a "
        f"file only your user account can read (mode 0600).{earlier} To use the OS keyring instead, install and "
        "unlock one (macOS Keychain and Windows Credential Locker work out of the box; on Linux run a Secret "
        "Service such as GNOME Keyring or KWallet and `pip install secretstorage`), then restart the kernel and "
        f"re-authorize your connections. `python -m keyring diagnose` shows which backend is active. To choose "
        f"the file yourself (and silence this warning), set {SECRETS_ENV} to its path.",
        InsecureStorageWarning, stacklevel=2)
    return store


__all__ = ["SecretStore", "MemoryStore", "KeyringStore", "FileStore", "default_store", "default_secrets_path",
           "check_secrets_dir", "SecretStoreError", "InsecureStorageWarning", "SECRETS_ENV"]
