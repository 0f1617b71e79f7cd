"""A second kernel, for the cross-process tests: adds connections to a shared registry and FileStore.

    python tests/registry_writer.py REGISTRY SECRETS WRITER COUNT

Prints "ready", waits for a line on stdin (so both writers start together), adds COUNT
connections named "WRITER-i" whose secret is `secret_for(WRITER, i)`, then prints "done".
"""
from __future__ import annotations

import sys

from mbi_widgets.registry import Registry
from mbi_widgets.secretstore import FileStore


def secret_for(writer: str, index: int) -> str:
    return f"rk_test_{writer}x{index:04d}" + "s" * 24


def main(registry_path: str, secrets_path: str, writer: str, count: int) -> None:
    registry = Registry(registry_path, store=FileStore(secrets_path))
    print("ready", flush=True)
    sys.stdin.readline()
    for index in range(count):
        registry.add(name=f"{writer}-{index}", account_id=f"acct_{writer}{index}", account_name=writer,
                     livemode=False, scope="read_only", auth_method="restricted_key",
                     secret=secret_for(writer, index), api_base="http://127.0.0.1:9")
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
