"""Stripe objects (plain dicts) into typed DataFrame columns, cheaply.

One walk over each object's own keys fills a flat row; typed columns are built once per table
with vectorised pandas constructors. No StripeObject per object and no `pd.json_normalize`:
fetching, not parsing, stays the bottleneck.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson
import pandas as pd

from mbi_widgets.errors import MbiError
from mbi_widgets.tables.schema import Column, TableSchema
from mbi_widgets.tables.schema import schema as schema_of


class ShapeError(MbiError):
    """A value did not fit its column's type: the data is kept whole, so we stop rather than guess."""


@dataclass
class _Node:
    """A level of the schema tree: leaves by key, nested levels by key."""

    prefix: str
    leaves: dict[str, Column] = field(default_factory=dict)
    nested: dict[str, "_Node"] = field(default_factory=dict)
    #: Column collecting the keys this level does not name (e.g. payment_method_details__other).
    rest: Column | None = None
    #: Keys that become child tables (invoice.lines, ...): not columns of this table.
    ignored: frozenset[str] = frozenset()


def _tree(schema: TableSchema) -> tuple[_Node, list[Column]]:
    """The schema as a tree, plus the derived columns that read inside a JSON leaf."""
    root = _Node("", ignored=frozenset(schema_of(child).embedded_field or "" for child in schema.children))
    json_paths = {c.path for c in schema.columns if c.kind == "json"}
    derived = []
    for column in schema.columns:
        if any(column.path[:i] in json_paths for i in range(1, len(column.path))):
            derived.append(column)
            continue
        if schema.parent_key and column.name == schema.parent_key:
            continue
        node = root
        for part in column.path[:-1]:
            node = node.nested.setdefault(part, _Node(f"{node.prefix}{part}__"))
        if column.path[-1] == "other" and column.kind == "json" and len(column.path) > 1:
            node.rest = column
        else:
            node.leaves[column.path[-1]] = column
    return root, derived


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class Shaper:
    """Flattens objects of one table into rows; `frame()` turns rows into a typed DataFrame."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self._root, self._derived = _tree(schema)

    def row(self, obj: dict, parent_id: str | None = None) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        self._walk(obj, self._root, flat)
        for column in self._derived:
            flat[column.name] = _dig(obj, column.path)
        if self.schema.parent_key:
            flat[self.schema.parent_key] = parent_id
        return flat

    def _walk(self, obj: dict, node: _Node, flat: dict[str, Any]) -> None:
        rest: dict[str, Any] | None = None
        for key, value in obj.items():
            if key in node.ignored:
                continue
            column = node.leaves.get(key)
            if column is not None:
                flat[column.name] = _leaf(value, column.kind)
                continue
            child = node.nested.get(key)
            if child is not None:
                if isinstance(value, dict):
                    self._walk(value, child, flat)
                elif value is not None:  # a newer API version changed the field's shape: keep it
                    flat[f"{node.prefix}{key}"] = _json(value)
                continue
            if node.rest is not None:
                rest = rest if rest is not None else {}
                rest[key] = value
                continue
            # A field the schema does not know (newer API version): kept as an extra column.
            flat[f"{node.prefix}{key}"] = _json(value) if isinstance(value, (dict, list)) else value
        if rest is not None and node.rest is not None:
            flat[node.rest.name] = _json(rest)

    def frame(self, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
        rows = list(rows)
        known = self.schema.column_names
        known_set = set(known)
        extras: dict[str, None] = {}
        for row in rows:
            for name in row:
                if name not in known_set and name not in extras:
                    extras[name] = None
        data: dict[str, Any] = {}
        for column in self.schema.columns:
            values = [row.get(column.name) for row in rows]
            data[column.name] = _typed(values, column, self.schema.name)
        for name in extras:
            data[name] = _inferred([row.get(name) for row in rows])
        return pd.DataFrame(data, index=pd.RangeIndex(len(rows)), columns=[*known, *extras])


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _leaf(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return _json(value)
    if kind == "id":
        return value.get("id") if isinstance(value, dict) else value
    if isinstance(value, (dict, list)):
        return _json(value)
    return value


def _typed(values: list[Any], column: Column, table: str) -> Any:
    try:
        if column.kind == "timestamp":
            seconds = pd.array(values, dtype="Int64")
            return pd.to_datetime(seconds, unit="s", utc=True).astype(column.dtype)
        if column.kind in ("string", "id", "json"):
            return pd.array([v if v is None or isinstance(v, str) else str(v) for v in values], dtype="string")
        return pd.array(values, dtype=column.dtype)
    except (TypeError, ValueError) as exc:
        bad = next((v for v in values if v is not None and not _fits(v, column.kind)), None)
        raise ShapeError(f"{table}.{column.name}: value {bad!r} is not a {column.kind}; the Stripe API version of "
                         "this account may differ from the pinned one. Report it with the table and column.") from exc


def _fits(value: Any, kind: str) -> bool:
    if kind in ("int", "timestamp"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return True


def _inferred(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pd.array(values, dtype="boolean")
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.array(values, dtype="Int64")
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pd.array(values, dtype="Float64")
    return pd.array([v if v is None or isinstance(v, str) else _json(v) for v in values], dtype="string")


def empty_frame(schema: TableSchema) -> pd.DataFrame:
    """The table with no rows: every expected column, with its dtype."""
    return Shaper(schema).frame([])
