"""Stripe objects (plain dicts) into typed DataFrame columns, cheaply.

One walk over each object's own keys fills a row: a tuple with a slot per column. Once per table,
rows are transposed into columns in one step and each column becomes a pandas array through one
Arrow conversion (in C); a column holding anything but its kind's own JSON type takes the plain
per-value path (`_typed`), so the frame is the same either way. No StripeObject per object and no
`pd.json_normalize` (slower, and untyped): at 100 pages/s a page has 10 ms of CPU for everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
from pandas.arrays import ArrowStringArray, BooleanArray, FloatingArray, IntegerArray

from mbi_widgets.errors import MbiError
from mbi_widgets.tables.collector import collector_paused
from mbi_widgets.tables.schema import SENSITIVE_FIELDS, Column, TableSchema
from mbi_widgets.tables.schema import schema as schema_of


class ShapeError(MbiError):
    """A value did not fit its column's type: the data is kept whole, so we stop rather than guess."""


@dataclass
class _Node:
    """A level of the schema tree: leaves by key (their slot in a row), nested levels by key."""

    prefix: str
    #: Slots of the leaves read as they are (a dict or list in them is reduced by `_leaf`).
    leaves: dict[str, int] = field(default_factory=dict)
    #: Slots of the `json` leaves (any value but null becomes JSON text).
    json_leaves: dict[str, int] = field(default_factory=dict)
    nested: dict[str, "_Node"] = field(default_factory=dict)
    #: Slot of the column collecting the keys this level does not name (e.g. payment_method_details__other).
    rest: int | None = None
    #: Keys dropped here: the secrets (`SENSITIVE_FIELDS`), at every level; at the top, the keys that become
    #: child tables (invoice.lines, ...). Looked up only for keys the schema does not name.
    ignored: frozenset[str] = SENSITIVE_FIELDS


def _tree(schema: TableSchema) -> tuple[_Node, list[tuple[int, tuple[str, ...]]]]:
    """The schema as a tree of row slots, plus the derived columns (slot, path) that read inside a JSON leaf."""
    children = frozenset(schema_of(child).embedded_field or "" for child in schema.children)
    root = _Node("", ignored=SENSITIVE_FIELDS | children)
    json_paths = {c.path for c in schema.columns if c.kind == "json"}
    derived = []
    for slot, column in enumerate(schema.columns):
        if any(column.path[:i] in json_paths for i in range(1, len(column.path))):
            derived.append((slot, column.path))
            continue
        if schema.parent_key and column.name == schema.parent_key:
            continue
        node = root
        for part in column.path[:-1]:
            node = node.nested.setdefault(part, _Node(f"{node.prefix}{part}__"))
        if column.path[-1] == "other" and column.kind == "json" and len(column.path) > 1:
            node.rest = slot
        elif column.kind == "json":
            node.json_leaves[column.path[-1]] = slot
        else:
            node.leaves[column.path[-1]] = slot
    for key in root.ignored:  # never a column, whatever the schema says
        root.leaves.pop(key, None), root.json_leaves.pop(key, None), root.nested.pop(key, None)
    return root, derived


#: Types a leaf keeps as they are (the test is one set lookup: most leaves hold one of these).
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


#: How the end of a key named in `SENSITIVE_FIELDS` looks in orjson's compact text (every such name ends in
#: "secret": tests/test_sensitive_columns.py checks it).
_SECRET_KEY = 'secret":'
#: Keys whose values are the user's own data (Stripe's `metadata`): kept as they are, even a key named like a secret.
_USER_DATA = frozenset({"metadata"})


def _stripe_json(value: Any) -> str:
    """JSON text of Stripe data without its secrets. One substring search (in C) per value: only text that
    holds a key ending in "secret" (rare) is walked and written again."""
    text = orjson.dumps(value).decode()
    return _json(_without_secrets(value)) if _SECRET_KEY in text else text


def _without_secrets(value: Any) -> Any:
    """`value` without the keys named in `SENSITIVE_FIELDS`, at any depth but inside `metadata`."""
    if isinstance(value, dict):
        return {key: inner if key in _USER_DATA else _without_secrets(inner)
                for key, inner in value.items() if key not in SENSITIVE_FIELDS}
    if isinstance(value, list):
        return [_without_secrets(inner) for inner in value]
    return value


#: A row is a tuple with one slot per schema column, in the schema's order, then one last slot: a dict
#: of the fields the schema does not know (a newer API version), or None. `frame()` transposes rows
#: into columns in one step (`zip`) instead of looking every column up in every row. A tuple of text
#: and numbers is dropped from the garbage collector's watch after its first pass, so a load holding a
#: million rows does not make every collection walk them (lists would stay watched: a live-mode load
#: spent a third of its CPU in collections).
Row = tuple


class Shaper:
    """Flattens objects of one table into rows; `frame()` turns rows into a typed DataFrame."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self._root, self._derived = _tree(schema)
        self._width = len(schema.columns)
        self._slots = {column.name: slot for slot, column in enumerate(schema.columns)}
        self._kinds = [column.kind for column in schema.columns]
        self._parent_slot = self._slots.get(schema.parent_key) if schema.parent_key else None

    def row(self, obj: dict, parent_id: str | None = None) -> Row:
        values: list[Any] = [None] * (self._width + 1)
        self._walk(obj, self._root, values)
        for slot, path in self._derived:
            value = _dig(obj, path)  # an object where a scalar belongs becomes JSON text, without its secrets
            values[slot] = value if value.__class__ in _SCALARS else _leaf(value, self._kinds[slot])
        if self._parent_slot is not None:
            values[self._parent_slot] = parent_id
        return tuple(values)

    def _walk(self, obj: dict, node: _Node, values: list[Any]) -> None:
        leaves, json_leaves, nested, ignored = node.leaves, node.json_leaves, node.nested, node.ignored
        rest: dict[str, Any] | None = None
        for key, value in obj.items():
            slot = leaves.get(key)
            if slot is not None:
                values[slot] = value if value.__class__ in _SCALARS else _leaf(value, self._kinds[slot])
                continue
            slot = json_leaves.get(key)
            if slot is not None:
                if value is None:
                    values[slot] = None
                    continue
                text = _json(value)  # an embedded Stripe object loses its secrets; `metadata` is the user's own
                values[slot] = text if _SECRET_KEY not in text or key in _USER_DATA else _json(_without_secrets(value))
                continue
            child = nested.get(key)
            if child is not None:
                if isinstance(value, dict):
                    self._walk(value, child, values)
                elif value is not None:  # a newer API version changed the field's shape: keep it
                    self._extra(values, f"{node.prefix}{key}", _stripe_json(value))
                continue
            if key in ignored:
                continue
            if node.rest is not None:
                rest = rest if rest is not None else {}
                rest[key] = value
                continue
            # A field the schema does not know (newer API version): kept as an extra column.
            self._extra(values, f"{node.prefix}{key}",
                        _stripe_json(value) if isinstance(value, (dict, list)) else value)
        if rest is not None and node.rest is not None:
            values[node.rest] = _stripe_json(rest)

    def _extra(self, values: list[Any], name: str, value: Any) -> None:
        """Sets a column the schema does not place here (a schema column of that name takes it)."""
        slot = self._slots.get(name)
        if slot is not None:
            values[slot] = value
            return
        extras = values[-1]
        if extras is None:
            extras = values[-1] = {}
        extras[name] = value

    def frame(self, rows: Iterable[Row]) -> pd.DataFrame:
        with collector_paused():  # a table's columns are millions of acyclic objects
            return self.joined([self.part(rows if isinstance(rows, list) else list(rows))])

    def part(self, rows: list[Row]) -> "FramePart":
        """A batch of rows as typed columns: a load builds its frame part by part while it fetches."""
        with collector_paused():
            count = len(rows)
            columns = list(zip(*rows)) if rows else [()] * (self._width + 1)
            fast = _arrow_strings()
            arrays = [_typed_fast(values, column, self.schema.name) if fast
                      else _typed(list(values), column, self.schema.name)
                      for column, values in zip(self.schema.columns, columns)]
            extras = None if columns[-1].count(None) == count else list(columns[-1])
            return FramePart([_as_array(array) for array in arrays], extras, count)

    def joined(self, parts: list["FramePart"], order: np.ndarray | None = None) -> pd.DataFrame:
        """The frame of `parts` end to end, or of the rows at the positions `order` gives (in that order).

        Columns join and reorder in C (Arrow chunks, numpy); the fields the schema does not know
        become columns only here, typed by every row that has them, as if built in one go.
        """
        count = sum(part.length for part in parts) if order is None else len(order)
        data: dict[str, Any] = {}
        for index, column in enumerate(self.schema.columns):
            array = _concat([part.arrays[index] for part in parts])
            data[column.name] = array if order is None else array.take(order)
        if any(part.extras is not None for part in parts):
            found = [row for part in parts for row in (part.extras or [None] * part.length)]
            if order is not None:
                found = [found[position] for position in order]
            extras: dict[str, list[Any]] = {}
            for index, fields in enumerate(found):
                for name, value in (fields or {}).items():
                    if name not in extras:
                        extras[name] = [None] * count
                    extras[name][index] = value
            for name, values in extras.items():
                data[name] = _inferred(values)
        return _frame_of(data, count)


@dataclass
class FramePart:
    """Typed columns of a batch of rows (one pandas array per schema column), and each row's fields the
    schema does not know (None when no row has any)."""

    arrays: list[Any]
    extras: list[dict[str, Any] | None] | None
    length: int


def _as_array(values: Any) -> Any:
    """A column as a pandas array (a DatetimeIndex from `_typed` becomes its array)."""
    return values.array if isinstance(values, pd.Index) else values


def _concat(arrays: list[Any]) -> Any:
    """Pandas arrays of one dtype end to end."""
    if len(arrays) == 1:
        return arrays[0]
    kind = type(arrays[0])
    if kind is ArrowStringArray and all(type(array) is kind for array in arrays):
        # One contiguous Arrow array: taking rows from many chunks resolves the chunk of every row, ten
        # times slower than copying the chunks together first (pyarrow 26: 0.4 s against 0.03 s for 80 MB).
        chunks = [chunk for array in arrays for chunk in array.__arrow_array__().chunks]
        return ArrowStringArray(pa.chunked_array([pa.concat_arrays(chunks)], type=_STRINGS))
    if all(type(array) is kind for array in arrays):
        return kind._concat_same_type(arrays)  # noqa: SLF001 - pandas' own extension-array protocol
    return pd.concat([pd.Series(array, copy=False) for array in arrays], ignore_index=True).array


def _frame_of(data: dict[str, Any], count: int) -> pd.DataFrame:
    """A DataFrame of ready-made typed columns, in `data`'s order, without pandas re-checking each one.

    `DataFrame._from_arrays` is what pandas' own readers use; it skips the constructor's per-column
    sanitizing (half of a page's frame). Should a pandas version drop it, the public constructor does.
    """
    names, index = pd.Index(list(data)), pd.RangeIndex(count)
    from_arrays = getattr(pd.DataFrame, "_from_arrays", None)
    if from_arrays is not None:
        try:
            return from_arrays(list(data.values()), columns=names, index=index, verify_integrity=False)
        except TypeError:  # a changed private signature
            pass
    return pd.DataFrame(data, index=index, columns=names, copy=False)


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
        return _stripe_json(value)
    if kind == "id":  # an expanded object is kept as its id; anything but a scalar there becomes JSON text
        found = value.get("id") if isinstance(value, dict) else value
        return found if found.__class__ in _SCALARS else _stripe_json(found)
    if isinstance(value, (dict, list)):  # a newer API version made an object of a scalar field
        return _stripe_json(value)
    return value


def _typed(values: list[Any], column: Column, table: str) -> Any:
    try:
        if column.kind == "timestamp":
            seconds = pd.array(values, dtype="Int64")
            return pd.to_datetime(seconds, unit="s", utc=True).astype(column.dtype)
        if column.kind in ("string", "id", "json"):
            return pd.array([v if v is None or isinstance(v, str) else str(v) for v in values], dtype="string")
        return pd.array(values, dtype=column.dtype)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an integer beyond 64 bits
        bad = next((v for v in values if v is not None and not _fits(v, column.kind)), None)
        raise ShapeError(f"{table}.{column.name}: value {bad!r} is not a {column.kind}; the Stripe API version of "
                         "this account may differ from the pinned one. Report it with the table and column.") from exc


def _arrow_strings() -> bool:
    """Whether pandas' "string" dtype is Arrow-backed with NA (the fast path builds exactly that)."""
    dtype = pd.api.types.pandas_dtype("string")
    return dtype.storage == "pyarrow" and dtype.na_value is pd.NA


_STRINGS = pa.large_string()
_SECONDS = pa.timestamp("s")
_NANOSECONDS = pa.timestamp("ns")


def _typed_fast(values: tuple[Any, ...], column: Column, table: str) -> Any:
    """`_typed` through one Arrow conversion: Arrow infers the column's type in C, and only a column
    whose values are all of the kind's own JSON type (or null) is built here; anything else (a number
    in a text column, a float in an integer one, ...) goes through `_typed`, which decides as before.
    """
    kind = column.kind
    if values.count(None) == len(values):
        return _all_null(kind, len(values))
    try:
        if kind in ("string", "id", "json"):
            # Text straight to Arrow's large strings (pandas' storage); a number or a boolean raises and goes
            # through `_typed`, which writes it as text. (Bytes would pass, but JSON never holds bytes.)
            return ArrowStringArray(pa.chunked_array([pa.array(values, type=_STRINGS)]))
        array = pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return _typed(list(values), column, table)
    inferred = array.type
    if kind == "int":
        if inferred == pa.int64():
            return IntegerArray(*_values_and_mask(array, 0))
    elif kind == "float":
        if inferred == pa.float64():
            return FloatingArray(*_values_and_mask(array, 0.0))
    elif kind == "bool":
        if inferred == pa.bool_():
            return BooleanArray(*_values_and_mask(array, False))
    elif kind == "timestamp" and inferred == pa.int64():
        try:  # seconds to nanoseconds, refusing what overflows (as pandas does, in `_typed`)
            moments = array.cast(_SECONDS).cast(_NANOSECONDS)
        except pa.ArrowException:
            return _typed(list(values), column, table)
        return pd.DatetimeIndex(moments.to_numpy(zero_copy_only=False, writable=True)).tz_localize("UTC").array
    return _typed(list(values), column, table)


def _values_and_mask(array: pa.Array, filler: Any) -> tuple[np.ndarray, np.ndarray]:
    """A nullable Arrow array as pandas' masked arrays hold it: writable values, and True where null."""
    if array.null_count:
        mask = array.is_null().to_numpy(zero_copy_only=False, writable=True)
        array = array.fill_null(filler)
    else:
        mask = np.zeros(len(array), dtype=bool)
    return array.to_numpy(zero_copy_only=False, writable=True), mask


@lru_cache(maxsize=8)
def _null_strings(count: int) -> pa.ChunkedArray:
    """`count` null strings (Arrow arrays are immutable: one serves every empty text column of a frame)."""
    return pa.chunked_array([pa.nulls(count, _STRINGS)])


def _all_null(kind: str, count: int) -> Any:
    """A column of `count` nulls of `kind`'s dtype."""
    if kind in ("string", "id", "json"):
        return ArrowStringArray(_null_strings(count))
    mask = np.ones(count, dtype=bool)
    if kind == "int":
        return IntegerArray(np.zeros(count, dtype="int64"), mask)
    if kind == "float":
        return FloatingArray(np.zeros(count, dtype="float64"), mask)
    if kind == "bool":
        return BooleanArray(np.zeros(count, dtype=bool), mask)
    return pd.DatetimeIndex(np.full(count, np.datetime64("NaT", "ns"))).tz_localize("UTC").array


def _fits(value: Any, kind: str) -> bool:
    if kind in ("int", "timestamp"):
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return True


def _inferred(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pd.array(values, dtype="boolean")
    # An integer beyond 64 bits fits neither Int64 nor, exactly, Float64: the column stays text.
    if present and all(isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 for v in present):
        return pd.array(values, dtype="Int64")
    if present and all(isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)
                                               and -2**63 <= v < 2**63) for v in present):
        return pd.array(values, dtype="Float64")
    return pd.array([v if v is None or isinstance(v, str) else _json(v) for v in values], dtype="string")


def empty_frame(schema: TableSchema) -> pd.DataFrame:
    """The table with no rows: every expected column, with its dtype."""
    return Shaper(schema).frame([])
