"""The secret stores on real files: modes 0600/0700, atomic locked writes, corrupt files, the keyring
fallback and its warning, and no secret in any repr or log line."""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import warnings

import keyring
import pytest
from keyring.backends import fail, null
from keyring.errors import KeyringLocked, PasswordDeleteError

from mbi_widgets.errors import MbiError
from mbi_widgets.secretstore import (
    SECRETS_ENV,
    FileStore,
    InsecureStorageWarning,
    KeyringStore,
    MemoryStore,
    SecretStore,
    SecretStoreError,
    default_store,
)

SECRET = "rk_test_51Hx9" + "Q" * 20 + "zq7W"
OTHER = "sk_test_" + "v" * 30 + "Ab12"


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class DictBackend:
    """A keyring backend held in a dict, shaped like keyring's (raises PasswordDeleteError when absent)."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], str] = {}

    def get_password(self, service, username):
        return self.items.get((service, username))

    def set_password(self, service, username, password):
        self.items[(service, username)] = password

    def delete_password(self, service, username):
        if self.items.pop((service, username), None) is None:
            raise PasswordDeleteError("not found")


class LockedBackend(DictBackend):
    def set_password(self, service, username, password):
        raise KeyringLocked("the collection is locked")


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "config" / "mbi-widgets" / "secrets.json"


@pytest.mark.parametrize("make", [MemoryStore, lambda: KeyringStore(backend=DictBackend()),
                                  lambda: FileStore(os.environ["TEST_STORE_PATH"])],
                         ids=["memory", "keyring", "file"])
def test_every_store_keeps_gets_and_deletes_by_reference(make, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_STORE_PATH", str(tmp_path / "s" / "secrets.json"))
    store = make()
    assert isinstance(store, SecretStore)
    assert store.get("conn_a") is None
    store.set("conn_a", SECRET)
    store.set("conn_b", OTHER)
    assert (store.get("conn_a"), store.get("conn_b")) == (SECRET, OTHER)
    store.set("conn_a", OTHER)  # overwrite
    store.delete("conn_b")
    store.delete("conn_b")  # deleting what is gone is not an error
    assert (store.get("conn_a"), store.get("conn_b")) == (OTHER, None)
    assert SECRET not in repr(store) and OTHER not in repr(store)


def test_an_empty_secret_is_refused_without_echoing_it():
    store = MemoryStore()
    with pytest.raises(ValueError):
        store.set("conn_a", "")
    assert store.get("conn_a") is None
    with pytest.raises(ValueError) as caught:
        store.set("conn_a", 42)  # type: ignore[arg-type]
    assert "42" not in str(caught.value)


# --- FileStore on disk ---------------------------------------------------------------------------

def test_file_store_creates_a_0700_directory_and_0600_files(store_path):
    store = FileStore(store_path)
    assert not store_path.parent.exists()  # nothing is created until the first write
    store.set("conn_a", SECRET)
    assert mode_of(store_path.parent) == 0o700
    assert mode_of(store_path) == 0o600
    assert mode_of(store.lock_path) == 0o600
    assert json.loads(store_path.read_text())["secrets"] == {"conn_a": SECRET}
    assert FileStore(store_path).get("conn_a") == SECRET  # another instance (another kernel) reads it


def test_file_store_modes_hold_under_a_permissive_umask(store_path):
    # Regression guard: mkdir/mkstemp modes are filtered by the umask; the store must chmod explicitly.
    previous = os.umask(0o000)
    try:
        FileStore(store_path).set("conn_a", SECRET)
    finally:
        os.umask(previous)
    assert (mode_of(store_path.parent), mode_of(store_path)) == (0o700, 0o600)


def test_file_store_leaves_no_temporary_files(store_path):
    store = FileStore(store_path)
    for index in range(5):
        store.set(f"conn_{index}", SECRET)
    store.delete("conn_0")
    assert sorted(p.name for p in store_path.parent.iterdir()) == ["secrets.json", "secrets.json.lock"]
    assert store.refs() == ["conn_1", "conn_2", "conn_3", "conn_4"]


def test_a_world_readable_file_is_tightened_to_0600_with_a_warning(store_path, caplog):
    FileStore(store_path).set("conn_a", SECRET)
    os.chmod(store_path, 0o644)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        assert FileStore(store_path).get("conn_a") == SECRET
    assert mode_of(store_path) == 0o600
    assert "0600" in caplog.text and str(store_path) in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b"[1, 2]", b'{"conn_a": "x"}'],
                         ids=["broken-json", "not-utf8", "a-list", "wrong-shape"])
def test_a_corrupt_file_reads_as_empty_and_logs_a_warning(store_path, caplog, content):
    store_path.parent.mkdir(parents=True, mode=0o700)
    store_path.write_bytes(content)
    os.chmod(store_path, 0o600)
    store = FileStore(store_path)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        assert store.get("conn_a") is None
        assert store.get("conn_b") is None
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1  # once per version of the file, not once per read
    assert "re-authoriz" in warnings_logged[0].getMessage()


def test_writing_over_a_corrupt_file_keeps_the_old_one_aside(store_path, caplog):
    store_path.parent.mkdir(parents=True, mode=0o700)
    store_path.write_bytes(b"{truncated")
    os.chmod(store_path, 0o600)
    store = FileStore(store_path)
    with caplog.at_level(logging.WARNING, logger="mbi_widgets.secretstore"):
        store.set("conn_a", SECRET)
    assert store.get("conn_a") == SECRET
    backups = list(store_path.parent.glob("secrets.json.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == b"{truncated"
    assert "moved it aside" in caplog.text


def test_file_store_path_comes_from_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "s.json"
    monkeypatch.setenv(SECRETS_ENV, str(target))
    store = FileStore()
    assert store.path == target
    store.set("conn_a", SECRET)
    assert mode_of(target) == 0o600


def test_threads_sharing_a_file_store_lose_no_write(store_path):
    stores = [FileStore(store_path) for _ in range(4)]  # separate instances: only the file lock protects them

    def write(worker: int) -> None:
        for index in range(15):
            stores[worker].set(f"conn_{worker}_{index}", f"{SECRET}{worker}{index}")

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(FileStore(store_path).refs()) == 60
    assert FileStore(store_path).get("conn_3_14") == f"{SECRET}314"


def test_an_unusable_directory_raises_a_store_error_with_a_next_step(tmp_path):
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    with pytest.raises(SecretStoreError) as caught:
        FileStore(not_a_dir / "secrets.json").set("conn_a", SECRET)
    assert SECRETS_ENV in str(caught.value) and SECRET not in str(caught.value)


def test_a_file_path_that_is_a_directory_raises_a_store_error(store_path):
    store_path.mkdir(parents=True)
    with pytest.raises(SecretStoreError) as caught:
        FileStore(store_path).get("conn_a")
    assert isinstance(caught.value, MbiError)
    assert SECRETS_ENV in str(caught.value)


def test_file_store_logs_no_secret_at_debug(store_path, caplog):
    with caplog.at_level(logging.DEBUG):
        store = FileStore(store_path)
        store.set("conn_a", SECRET)
        os.chmod(store_path, 0o666)
        store.get("conn_a")
        store_path.write_text(json.dumps({"secrets": {"conn_a": SECRET}})[:-3])  # corrupt, secret inside
        store.get("conn_a")
        store.set("conn_b", OTHER)
    assert caplog.records  # the mode fix and the corruption were reported...
    assert SECRET not in caplog.text and OTHER not in caplog.text  # ...without the secrets


# --- the keyring -----------------------------------------------------------------------------------

def test_keyring_store_uses_the_service_name_and_maps_errors():
    backend = DictBackend()
    store = KeyringStore(service="mbi-test", backend=backend)
    store.set("conn_a", SECRET)
    assert backend.items == {("mbi-test", "conn_a"): SECRET}
    assert repr(store) == "KeyringStore(service='mbi-test')"
    locked = KeyringStore(backend=LockedBackend())
    with pytest.raises(SecretStoreError) as caught:
        locked.set("conn_a", SECRET)
    assert "Unlock the keyring" in str(caught.value) and SECRET not in str(caught.value)


@pytest.mark.parametrize(("backend", "usable"), [(fail.Keyring(), False), (null.Keyring(), False),
                                                 (DictBackend(), True)], ids=["fail", "null", "real"])
def test_keyring_usable_rejects_the_fail_and_null_backends(monkeypatch, backend, usable):
    monkeypatch.setattr(keyring, "get_keyring", lambda: backend)
    assert KeyringStore.usable() is usable


def test_keyring_usable_is_false_when_looking_up_the_backend_raises(monkeypatch):
    def broken():
        raise RuntimeError("dbus is gone")

    monkeypatch.setattr(keyring, "get_keyring", broken)
    assert KeyringStore.usable() is False


# --- default_store -----------------------------------------------------------------------------------

@pytest.mark.skipif(KeyringStore.usable(), reason="this machine has a usable OS keyring")
def test_default_store_falls_back_to_a_file_with_a_visible_warning(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRETS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "s"))  # where platformdirs puts the default file
    with pytest.warns(InsecureStorageWarning) as caught:
        store = default_store()
    assert isinstance(store, FileStore) and store.path == tmp_path / "s" / "mbi-widgets" / "secrets.json"
    message = str(caught[0].message)
    assert "0600" in message and "keyring" in message and str(store.path) in message


def test_default_store_picks_the_keyring_when_usable_and_warns_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(SECRETS_ENV, raising=False)
    monkeypatch.setattr(KeyringStore, "unusable_reason", staticmethod(lambda: None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = default_store()
    assert isinstance(store, KeyringStore) and store.service == "mbi-widgets"


def test_default_store_picks_the_file_when_the_keyring_is_unusable(monkeypatch, tmp_path):
    monkeypatch.delenv(SECRETS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setattr(KeyringStore, "unusable_reason", staticmethod(lambda: "no OS keyring backend is installed"))
    with pytest.warns(InsecureStorageWarning):
        store = default_store()
    assert isinstance(store, FileStore)
    assert not (tmp_path / "mbi-widgets").exists()  # choosing a store writes nothing
