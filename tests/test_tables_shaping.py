"""The fast shaper (rows as slot lists, columns through Arrow) builds exactly the frames the plain one did.

`ReferenceShaper` below is the previous shaper, kept verbatim as the specification (a dict per row,
then each column looked up in every row and built with `pd.array`), but for one fix made with the fast
one: an integer beyond 64 bits is a `ShapeError` like any other misfit in a typed column, and makes an
unknown field's column text (both were a bare OverflowError), and one rule added with it: the fields
named in `SENSITIVE_FIELDS` are dropped at any depth, from JSON text too but for `metadata` (the reference
walks every JSON value; the fast shaper only those whose text holds such a key), so an object where an
event's derived column or an id column (a list, an expanded object's `id` itself an object) wants a scalar
becomes JSON text (it was Python's repr). Random objects are Stripe's own
fixtures (tests/data/stripe_fixtures3_subset.json) with fields removed, nulled, replaced by other JSON
values (wrong types included: both shapers must then refuse alike), turned into nested lists, and
unknown fields added at any depth.
"""
from __future__ import annotations

import copy
import gc
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson
import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import Response

from mbi_widgets.tables.collector import collector_paused
from mbi_widgets.tables.fetch import FetchError
from mbi_widgets.tables.schema import ALL_TABLES, SENSITIVE_FIELDS, Column, TableSchema, schema
from mbi_widgets.tables.schema import schema as schema_of
from mbi_widgets.tables.shape import ShapeError, Shaper
from mbi_widgets.tables.source import StripeSource
from tests.test_adversarial_extraction import FakeStripe, source_for

FIXTURES = json.loads((Path(__file__).parent / "data" / "stripe_fixtures3_subset.json").read_text())["resources"]
RESOURCE_OF = {"customers": "customer", "charges": "charge", "coupons": "coupon", "invoices": "invoice",
               "plans": "plan", "subscriptions": "subscription", "events": "event",
               "invoices__lines": "line_item", "subscriptions__items": "subscription_item",
               "charges__refunds": "refund"}


# --- the reference: the shaper as it was before rows became slot lists ---------------------------------

@dataclass
class _Node:
    prefix: str
    leaves: dict[str, Column] = field(default_factory=dict)
    nested: dict[str, "_Node"] = field(default_factory=dict)
    rest: Column | None = None
    ignored: frozenset[str] = SENSITIVE_FIELDS


def _tree(schema: TableSchema) -> tuple[_Node, list[Column]]:
    children = frozenset(schema_of(child).embedded_field or "" for child in schema.children)
    root = _Node("", ignored=SENSITIVE_FIELDS | children)
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
    return orjson.dumps(_without_secrets(value)).decode()


def _without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v if k == "metadata" else _without_secrets(v) for k, v in value.items()
                if k not in SENSITIVE_FIELDS}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    return value


class ReferenceShaper:
    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self._root, self._derived = _tree(schema)

    def row(self, obj: dict, parent_id: str | None = None) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        self._walk(obj, self._root, flat)
        for column in self._derived:
            flat[column.name] = _leaf(_dig(obj, column.path), column.kind)
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
                flat[column.name] = orjson.dumps(value).decode() if key == "metadata" and value is not None \
                    else _leaf(value, column.kind)  # the user's own data, kept whole
                continue
            child = node.nested.get(key)
            if child is not None:
                if isinstance(value, dict):
                    self._walk(value, child, flat)
                elif value is not None:
                    flat[f"{node.prefix}{key}"] = _json(value)
                continue
            if node.rest is not None:
                rest = rest if rest is not None else {}
                rest[key] = value
                continue
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
            data[column.name] = _typed([row.get(column.name) for row in rows], column, self.schema.name)
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
        value = value.get("id") if isinstance(value, dict) else value
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
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an integer beyond 64 bits
        raise ShapeError(f"{table}.{column.name}: not a {column.kind}") from exc


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


# --- comparing ---------------------------------------------------------------------------------------

def shaped(shaper: Any, objects: list[dict], parent_id: str | None) -> pd.DataFrame | str:
    """The frame, or "refused" when a value fits no column."""
    try:
        return shaper.frame([shaper.row(obj, parent_id) for obj in objects])
    except ShapeError:
        return "refused"


def assert_same(table: str, objects: list[dict], parent_id: str | None = None) -> pd.DataFrame | str:
    target = schema(table)
    expected = shaped(ReferenceShaper(target), copy.deepcopy(objects), parent_id)
    actual = shaped(Shaper(target), objects, parent_id)
    if isinstance(expected, str) or isinstance(actual, str):
        assert actual == expected
        return actual
    assert list(actual.columns) == list(expected.columns)
    assert list(actual.dtypes) == list(expected.dtypes)
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)
    return actual


# --- random objects from Stripe's fixtures ------------------------------------------------------------

#: What orjson parses: integers within 64 bits (signed, or unsigned above 2**63), finite floats.
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(-2**63, 2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
                         st.integers(0, 4_000_000_000))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["id", "object", "x", "amount", "other"]),
                                                 inner, max_size=3)), max_leaves=6)


def mutated(value: Any, draw: Any, depth: int = 0) -> Any:
    """The value with random fields removed, nulled, replaced, wrapped in a list, or added."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            action = draw(st.sampled_from(["keep"] * 12 + ["drop", "null", "replace", "retype", "list", "same_type"]))
            if action == "drop":
                continue
            if action == "null":
                out[key] = None
            elif action == "replace":
                out[key] = draw(JSON_VALUES)
            elif action == "retype":  # a scalar, most often of another type than the column's
                out[key] = draw(JSON_SCALARS)
            elif action == "list":
                out[key] = [mutated(inner, draw, depth + 1)]
            elif action == "same_type":  # another value of the field's own type: stays shapeable
                out[key] = draw(_same_type(inner))
            else:
                out[key] = mutated(inner, draw, depth + 1)
        # Unknown fields, some named like a column this level does not hold (a child's parent key).
        names = ["zz_new_field", "other", "object", "card", "extra__x", "invoice_id", "charge_id", "subscription_id",
                 "client_secret"]
        for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
            out[name] = draw(JSON_VALUES)
        return out
    if isinstance(value, list) and depth < 4:
        return [mutated(item, draw, depth + 1) for item in value]
    return value


def _same_type(value: Any) -> st.SearchStrategy:
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(0, 4_000_000_000)
    if isinstance(value, float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(value, str):
        return st.text(max_size=12)
    return st.just(value)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # pandas, refusing a float
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(table=st.sampled_from(ALL_TABLES), data=st.data())
def test_fast_shaping_equals_the_reference_on_mutated_fixtures(table, data):
    """Protects: every frame (columns, order, dtypes, values, extra columns) or refusal stays the same."""
    base = FIXTURES[RESOURCE_OF[table]]
    count = data.draw(st.integers(1, 6))
    objects = [mutated(copy.deepcopy(base), data.draw) if data.draw(st.booleans()) else copy.deepcopy(base)
               for _ in range(count)]
    parent_id = "par_1" if schema(table).parent_key else None
    assert_same(table, objects, parent_id)


@pytest.mark.parametrize("table", ALL_TABLES)
def test_fixture_and_empty_frames_equal_the_reference(table):
    parent_id = "par_1" if schema(table).parent_key else None
    frame = assert_same(table, [copy.deepcopy(FIXTURES[RESOURCE_OF[table]])] * 3, parent_id)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3
    assert isinstance(assert_same(table, [], parent_id), pd.DataFrame)


def test_values_of_another_type_take_the_reference_path():
    """Text in a number column, a float in an integer one, a number in a text one, a date past 2262:
    decided (converted or refused) exactly as before."""
    charge = FIXTURES["charge"]
    for field_name, value in [("amount", 2.0), ("amount", 2.5), ("amount", "12"), ("amount", True),
                              ("amount", 2**64 - 1), ("description", 12), ("description", True),
                              ("description", 1.5), ("paid", 1), ("paid", "yes"), ("created", 10**12),
                              ("created", -5), ("created", 1.0), ("zz_unknown", 2**64 - 1), ("zz_unknown", 2**63 - 1)]:
        other = dict(copy.deepcopy(charge), **{field_name: value})
        assert_same("charges", [copy.deepcopy(charge), other])
    unknown = assert_same("charges", [dict(copy.deepcopy(charge), zz_unknown=2**64 - 1)])  # orjson parses up to it
    assert unknown["zz_unknown"].tolist() == [str(2**64 - 1)]  # text, not a crash: it fits no 64-bit column


def test_python_string_storage_takes_the_reference_path():
    """With pandas' "string" dtype set to Python storage, frames still match what pandas builds for it."""
    with pd.option_context("mode.string_storage", "python"):
        frame = assert_same("customers", [copy.deepcopy(FIXTURES["customer"])] * 2)
        assert isinstance(frame, pd.DataFrame) and frame["id"].dtype.storage == "python"


def test_frames_are_independent_and_writable():
    """Empty text columns share one immutable Arrow array: writing one cell changes only that cell."""
    shaper = Shaper(schema("charges"))
    first = shaper.frame([shaper.row(copy.deepcopy(FIXTURES["charge"]))] * 2)
    second = shaper.frame([shaper.row(copy.deepcopy(FIXTURES["charge"]))] * 2)
    empty = [name for name in first.columns if first[name].dtype == "string" and first[name].isna().all()]
    assert len(empty) >= 2
    first.loc[0, empty[0]] = "written"
    first.loc[0, "amount"] = 7
    first["amount_refunded"] += 1
    assert first.loc[0, empty[0]] == "written" and first.loc[0, "amount"] == 7
    assert first[empty[1]].isna().all() and second[empty[0]].isna().all()
    assert second.loc[0, "amount"] == FIXTURES["charge"]["amount"]
    assert second.loc[0, "amount_refunded"] == FIXTURES["charge"]["amount_refunded"]


@pytest.mark.parametrize("table", ["customers", "charges", "invoices", "subscriptions", "events", "plans"])
def test_sandbox_pages_equal_the_reference(sandbox, table):
    """Whole pages as the sandbox serves them over HTTP, shaped both ways."""
    answer = requests.get(f"{sandbox.api_url}/v1/{table}", params={"limit": 100},
                          auth=(sandbox.restricted_key, ""), timeout=30)
    objects = orjson.loads(answer.content)["data"]
    assert len(objects) > 5
    frame = assert_same(table, objects)
    assert isinstance(frame, pd.DataFrame) and frame["id"].tolist() == [obj["id"] for obj in objects]


# --- CPU: the collector's passes, and one table's frame -------------------------------------------------

def test_a_load_pauses_automatic_collection_and_restores_it(sandbox):
    """Protects the CPU of a load: a third of a live-mode load went to collector passes over live pages."""
    seen: list[bool] = []
    source = StripeSource(sandbox.restricted_key, api_base=sandbox.api_url,
                          rate_limits={"per_account": 1000, "per_endpoint": 1000})
    assert gc.isenabled()
    frame = source.table("customers", progress=lambda done, total: seen.append(gc.isenabled()))
    assert len(frame) > 0 and seen and not any(seen)
    assert gc.isenabled()
    gc.disable()  # a caller's own choice is kept
    try:
        source.table("coupons")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_end_with_the_last():
    first_in, release = threading.Event(), threading.Event()

    def hold() -> None:
        with collector_paused():
            first_in.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    first_in.wait(5)
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other pause still holds
    release.set()
    holder.join(5)
    assert gc.isenabled()


def test_a_field_the_schema_lacks_costs_one_pass_per_table():
    """Protects against the quadratic frame: every row with an unknown field allocated a column's worth."""
    shaper = Shaper(schema("coupons"))
    row = shaper.row(dict(copy.deepcopy(FIXTURES["coupon"]), zz_new_field=1))
    started = time.perf_counter()
    frame = shaper.frame([row] * 80_000)
    assert time.perf_counter() - started < 1.5  # 80,000 x 80,000 slots before: over 4 s
    assert frame["zz_new_field"].dtype == "Int64" and frame["zz_new_field"].eq(1).all()


def test_an_answer_that_is_not_utf8_is_said_so():
    """Answers are read without stripe-python's debug line (it decoded and repr'd every body): a body
    that is not UTF-8 text is still named as such, after the retries, never parsed into a table."""
    fake = FakeStripe().start()
    try:
        fake.handler = lambda request: Response(b'{"object": "list", "data": ["\xff\xfe"]}', status_code=200,
                                                media_type="application/json")
        with pytest.raises(FetchError) as caught:
            source_for(fake.url).table("coupons")
        assert caught.value.code == "unavailable" and "not UTF-8 text" in str(caught.value), str(caught.value)
    finally:
        fake.stop()
