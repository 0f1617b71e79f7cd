"""Pausing Python's cyclic garbage collector while a load allocates millions of short-lived, acyclic objects.

Every parsed page is thousands of dicts and lists, alive while the page is shaped: the collector's
young-generation passes see them alive, promote them, and the promoted count soon triggers full
passes over everything the process holds. A live-mode load of all ten bench tables spent a quarter
of its CPU in those passes (about 4 s of 17), while a load makes no garbage cycles of its own (parsed
JSON and shaped rows hold no references back). Reference counting still frees every page as soon
as it is shaped; only cycles made elsewhere in the process wait until the last load ends.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Automatic collection off for the block; back on (if it was on) when the last such block ends.

    Nests and overlaps across threads: loads running at once share one pause.
    """
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
