"""Hardening (issue 9, items 11, 12 and 13b): a keyring backend that fails with a non-keyring error, secrets
folders that others can use, and clients hanging up mid-request, all on real backends, folders and sockets."""
from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import keyring
import pytest
from jaraco.classes import properties
from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError

from mbi_widgets.registry import ERROR, Registry
from mbi_widgets.relay import RelayConfig, create_app
from mbi_widgets.secretstore import (
    SECRETS_ENV,
    FileStore,
    InsecureStorageWarning,
    KeyringStore,
    SecretStoreError,
    default_store,
)
from mbi_widgets.serving import BackgroundServer

SECRET = "rk_test_51Hx9" + "Q" * 20 + "zq7W"
DBUS_DOWN = "org.freedesktop.DBus.Error.ServiceUnknown: The name org.freedesktop.secrets was not provided"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
posix_only = pytest.mark.skipif(os.name != "posix", reason="folder modes and owners are POSIX")


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- 11: a keyring backend that raises something other than a keyring error -----------------------------

class TestBackend(KeyringBackend):
    """A real keyring backend in a dict. Never picked by keyring's discovery (not viable): tests install it
    with `keyring.set_keyring`. `broken` makes every call raise what a Secret Service backend raises without
    a D-Bus session, with the password in the message when there is one (the store must not echo it)."""

    __test__ = False  # not a pytest class

    @properties.classproperty
    def priority(cls) -> float:
        raise RuntimeError("installed explicitly by the tests only")

    def __init__(self, *, broken: bool = False) -> None:
        super().__init__()
        self.items: dict[tuple[str, str], str] = {}
        self.broken = broken

    def _fail_if_broken(self, password: str | None = None) -> None:
        if self.broken:
            raise RuntimeError(DBUS_DOWN + (f" (while storing {password})" if password else ""))

    def get_password(self, service, username):
        self._fail_if_broken()
        return self.items.get((service, username))

    def set_password(self, service, username, password):
        self._fail_if_broken(password)
        self.items[(service, username)] = password

    def delete_password(self, service, username):
        self._fail_if_broken()
        if self.items.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


@pytest.fixture
def active_keyring():
    """Installs a backend as keyring's active one for the test, and puts the previous one back."""
    previous = keyring.get_keyring()

    def install(backend: KeyringBackend) -> KeyringBackend:
        keyring.set_keyring(backend)
        return backend

    yield install
    keyring.set_keyring(previous)


@pytest.fixture
def no_env_file(tmp_path, monkeypatch):
    """No MBI_WIDGETS_SECRETS; the default secrets file (platformdirs) lands under tmp_path."""
    monkeypatch.delenv(SECRETS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "mbi-widgets" / "secrets.json"


def test_a_keyring_raising_a_dbus_runtime_error_is_not_usable_and_the_file_store_is_chosen(
        active_keyring, no_env_file):
    # Protects: a backend that loads but fails every call was reported usable, and secrets then failed raw.
    active_keyring(TestBackend(broken=True))
    assert KeyringStore.usable() is False
    with pytest.warns(InsecureStorageWarning) as caught:
        store = default_store()
    assert isinstance(store, FileStore) and store.path == no_env_file
    message = str(caught[0].message)
    assert "TestBackend" in message and "RuntimeError" in message and "ServiceUnknown" in message
    assert "saved in the keyring" in message  # secrets kept while it worked are not lost: say so
    store.set("conn_a", SECRET)  # and the chosen store works
    assert FileStore(no_env_file).get("conn_a") == SECRET


def test_a_keyring_that_starts_failing_raises_store_errors_never_a_raw_error_or_no_secret(tmp_path):
    # Chosen: no automatic fallback at run time. A failed read is an error, not "no secret" (which would look
    # like a lost credential), and a write elsewhere would split the secrets between two stores.
    backend = TestBackend()
    store = KeyringStore(backend=backend)
    store.set("conn_a", SECRET)
    backend.broken = True
    for action, call in [("read", lambda: store.get("conn_a")), ("write", lambda: store.set("conn_a", SECRET)),
                         ("delete", lambda: store.delete("conn_a"))]:
        with pytest.raises(SecretStoreError) as caught:
            call()
        error = caught.value
        assert error.code == "keyring_error" and isinstance(error.__cause__, RuntimeError)
        assert f"could not {action}" in str(error) and "TestBackend" in str(error)
        assert SECRETS_ENV in str(error) and "try again" in str(error)  # next steps
        assert SECRET not in str(error)  # the backend's message carried it on write
    backend.broken = False
    assert store.get("conn_a") == SECRET  # nothing was moved or lost meanwhile


def test_the_registry_reports_a_failing_keyring_as_an_error_not_a_missing_credential(tmp_path):
    backend = TestBackend()
    registry = Registry(tmp_path / "reg" / "connections.sqlite3", store=KeyringStore(backend=backend))
    connection = registry.add(name="Shop", account_id="acct_1", account_name="Shop", livemode=False,
                              scope="read_only", auth_method="restricted_key", secret=SECRET,
                              api_base="http://127.0.0.1:9")
    backend.broken = True
    with pytest.raises(SecretStoreError):
        registry.secret(connection.id)
    tested = registry.test(connection.id)
    assert tested.status == ERROR and "keyring" in tested.status_message
    assert SECRET not in tested.status_message


def test_the_secrets_env_var_chooses_the_file_even_when_a_keyring_works(active_keyring, no_env_file, tmp_path,
                                                                        monkeypatch):
    # Protects: an explicit MBI_WIDGETS_SECRETS was ignored whenever a keyring was usable.
    backend = active_keyring(TestBackend())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert KeyringStore.usable() is True and isinstance(default_store(), KeyringStore)  # without the variable
    assert backend.items == {}  # probing wrote nothing
    target = tmp_path / "chosen" / "secrets.json"
    monkeypatch.setenv(SECRETS_ENV, str(target))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user chose the file: no warning about it
        store = default_store()
    assert isinstance(store, FileStore) and store.path == target
    store.set("conn_a", SECRET)
    assert mode_of(target) == 0o600 and backend.items == {}


# --- 12: secrets folders others can use ---------------------------------------------------------------

@posix_only
@pytest.mark.parametrize("loose", [0o777, 0o755, 0o750, 0o707], ids=oct)
def test_a_loose_secrets_folder_of_ours_is_tightened_to_0700_with_a_warning(tmp_path, caplog, loose):
    folder = tmp_path / "secrets-folder"
    folder.mkdir()
    os.chmod(folder, loose)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        FileStore(folder / "secrets.json").set("conn_a", SECRET)
    assert mode_of(folder) == 0o700
    assert str(folder) in caplog.text and f"{loose:o}" in caplog.text and "0700" in caplog.text
    assert SECRET not in caplog.text


@posix_only
def test_reading_from_a_loose_folder_tightens_it_too(tmp_path, caplog):
    folder = tmp_path / "secrets-folder"
    FileStore(folder / "secrets.json").set("conn_a", SECRET)
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        assert FileStore(folder / "secrets.json").get("conn_a") == SECRET
    assert mode_of(folder) == 0o700
    assert "re-authoriz" in caplog.text  # others could write there: the secrets are suspect


@posix_only
def test_a_shared_sticky_folder_is_refused_and_left_as_is(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    store = FileStore(shared / "secrets.json")
    for call in (lambda: store.set("conn_a", SECRET), lambda: store.get("conn_a")):
        with pytest.raises(SecretStoreError) as caught:
            call()
        assert caught.value.code == "secrets_dir_unsafe"
        assert "sticky" in str(caught.value) and SECRETS_ENV in str(caught.value)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert list(shared.iterdir()) == []  # no secret, no lock file


@posix_only
def test_the_system_temp_folder_is_refused_without_touching_it():
    temp = tempfile.gettempdir()
    if not os.stat(temp).st_mode & stat.S_ISVTX:
        pytest.skip(f"{temp} is not a shared sticky folder here")
    before = os.stat(temp)
    with pytest.raises(SecretStoreError) as caught:
        FileStore(os.path.join(temp, "mbi-widgets-secrets-never-written.json")).get("conn_a")
    assert caught.value.code == "secrets_dir_unsafe"
    after = os.stat(temp)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)


@posix_only
def test_a_folder_of_another_user_is_refused_and_never_chmodded(tmp_path):
    if IS_ROOT:
        folder = tmp_path / "theirs"
        folder.mkdir()
        os.chmod(folder, 0o777)
        os.chown(folder, 65534, 65534)
        store = FileStore(folder / "secrets.json")
    else:  # the filesystem root belongs to root; only read, so nothing is attempted there
        folder = Path("/")
        store = FileStore(folder / "mbi-widgets-secrets-never-written.json")
    before = os.stat(folder)
    with pytest.raises(SecretStoreError) as caught:
        store.get("conn_a")
    assert caught.value.code == "secrets_dir_unsafe" and "another user" in str(caught.value)
    if IS_ROOT:
        with pytest.raises(SecretStoreError):
            store.set("conn_a", SECRET)
        assert list(folder.iterdir()) == []
    after = os.stat(folder)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)


@posix_only
def test_a_symlinked_folder_is_judged_by_its_target(tmp_path, caplog):
    target = tmp_path / "real"
    target.mkdir()
    os.chmod(target, 0o777)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        FileStore(link / "secrets.json").set("conn_a", SECRET)
    assert mode_of(target) == 0o700 and link.is_symlink()
    assert FileStore(target / "secrets.json").get("conn_a") == SECRET
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    (tmp_path / "to-shared").symlink_to(shared, target_is_directory=True)
    with pytest.raises(SecretStoreError):
        FileStore(tmp_path / "to-shared" / "secrets.json").set("conn_a", SECRET)


@posix_only
def test_a_loose_lock_file_is_tightened_to_0600(tmp_path):
    folder = tmp_path / "secrets-folder"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    store = FileStore(folder / "secrets.json")
    store.lock_path.write_text("")
    os.chmod(store.lock_path, 0o666)
    store.set("conn_a", SECRET)
    assert mode_of(store.lock_path) == 0o600 and mode_of(store.path) == 0o600


@posix_only
@pytest.mark.skipif(not IS_ROOT, reason="giving a file to another user needs root")
def test_a_secrets_file_of_another_user_is_refused(tmp_path):
    folder = tmp_path / "secrets-folder"
    store = FileStore(folder / "secrets.json")
    store.set("conn_a", SECRET)
    os.chown(store.path, 65534, 65534)
    with pytest.raises(SecretStoreError) as caught:
        store.get("conn_a")
    assert caught.value.code == "secrets_file_unsafe" and SECRET not in str(caught.value)
    assert os.stat(store.path).st_uid == 65534 and mode_of(store.path) == 0o600


# --- 13b: clients hanging up mid-request ----------------------------------------------------------------

def hang_up_mid_body(base_url: str, path: str, headers: dict[str, str] | None = None) -> None:
    """Sends a POST announcing 1000 bytes of form body, sends 10 and closes the connection."""
    parts = urlsplit(base_url)
    lines = [f"POST {parts.path.rstrip('/')}{path} HTTP/1.1", f"Host: {parts.netloc}",
             "Content-Type: application/x-www-form-urlencoded", "Content-Length: 1000",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"a=12345678")
        time.sleep(0.05)  # let the server start reading the body


def hang_up_mid_response(base_url: str, path: str, key: str) -> None:
    parts = urlsplit(base_url)
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request.encode())
        sock.recv(64)  # the status line has come; the rest of a long listing has not


def wait_for_went_away(caplog, path: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("went away" in r.getMessage() and path in r.getMessage() for r in caplog.records):
            return
        time.sleep(0.02)
    pytest.fail(f"no 'went away' line for {path}; got {[r.getMessage() for r in caplog.records]}")


def assert_quiet(caplog) -> None:
    loud = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    went_away = [r for r in caplog.records if "went away" in r.getMessage()]
    assert went_away and all(r.levelno == logging.DEBUG for r in went_away)


@pytest.mark.parametrize("path", ["/oauth/token", "/oauth/authorize", "/oauth/deauthorize", "/_sandbox/advance",
                                  "/relay/device/code", "/relay/device/token", "/relay/device"])
def test_a_client_hanging_up_mid_body_is_one_debug_line_not_an_error_traceback(sandbox, caplog, path):
    # Protects: starlette's ClientDisconnect from request.form() was logged twice at ERROR with tracebacks.
    headers = {"Authorization": f"Bearer {sandbox.secret_key}"} if path == "/_sandbox/advance" else None
    with caplog.at_level(logging.DEBUG):
        hang_up_mid_body(sandbox.api_url, path, headers)
        wait_for_went_away(caplog, path)
        if path == "/oauth/token":  # and hanging up mid-response stays quiet as well
            hang_up_mid_response(sandbox.api_url, "/v1/customers?limit=100", sandbox.restricted_key)
            time.sleep(0.2)
    assert_quiet(caplog)
    assert sandbox.secret_key not in caplog.text
    # The server still answers normally afterwards.
    import requests
    assert requests.post(f"{sandbox.connect_url}/oauth/token", data={"grant_type": "x"}, timeout=5).status_code == 401


def test_a_standalone_relay_logs_a_client_hanging_up_quietly(sandbox, tmp_path, caplog):
    # The relay served alone (as `mbi-widgets relay` does), not mounted in the sandbox.
    def make_app(url: str):
        return create_app(RelayConfig(client_id=sandbox.client_id, secret_key=sandbox.secret_key, public_url=url,
                                      connect_url=sandbox.connect_url, api_url=sandbox.api_url,
                                      db_path=str(tmp_path / "relay.sqlite3")))

    server = BackgroundServer(make_app=make_app, name="test-relay").start()
    try:
        with caplog.at_level(logging.DEBUG):
            for path in ("/device/code", "/device/token", "/device"):
                hang_up_mid_body(server.url, path)
                wait_for_went_away(caplog, path)
    finally:
        server.stop()
    assert_quiet(caplog)
