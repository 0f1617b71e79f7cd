"""Benchmarks: scripts that print their figures (`python -m benchmarks.sandbox`, `python -m benchmarks.tables`)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Iterator


@contextlib.contextmanager
def sandbox_process(*options: str) -> Iterator[dict]:
    """`mbi-widgets sandbox` in its own process (its own core); yields its JSON connection line."""
    process = subprocess.Popen([sys.executable, "-m", "mbi_widgets.cli", "sandbox", *options],
                               stdout=subprocess.PIPE, text=True)
    try:
        yield json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=10)
