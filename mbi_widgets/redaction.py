"""Showing secrets safely: the one place that decides how much of a key may be seen."""
from __future__ import annotations


def redact(key: str) -> str:
    """`rk_live_1234****abcd`: enough to recognise a key, never enough to use it."""
    prefix, _, rest = key.rpartition("_")
    if len(rest) < 12:
        return f"{prefix}_****" if prefix else "****"
    return f"{prefix}_{rest[:4]}****{rest[-4:]}"
