"""The expected tables' schemas (from stripe-python's typed classes) and flattening Stripe objects into rows.

The example objects come from Stripe's own OpenAPI fixtures (tests/data/stripe_fixtures3_subset.json).
"""
from __future__ import annotations

import copy
import inspect
import json
import typing
from pathlib import Path

import pandas as pd
import pytest
import stripe

from mbi_widgets.tables.schema import (
    ALL_TABLES,
    CHILD_TABLES,
    DTYPES,
    EXPECTED_TABLES,
    SENSITIVE_FIELDS,
    UnknownTableError,
    schema,
)
from mbi_widgets.tables.shape import ShapeError, Shaper, empty_frame

FIXTURES = json.loads((Path(__file__).parent / "data" / "stripe_fixtures3_subset.json").read_text())["resources"]
#: Table -> the fixture resource of one of its objects.
RESOURCE_OF = {"customers": "customer", "charges": "charge", "coupons": "coupon", "invoices": "invoice",
               "plans": "plan", "subscriptions": "subscription", "events": "event",
               "invoices__lines": "line_item", "subscriptions__items": "subscription_item",
               "charges__refunds": "refund"}
STRIPE_CLASSES = {"customers": stripe.Customer, "charges": stripe.Charge, "coupons": stripe.Coupon,
                  "invoices": stripe.Invoice, "plans": stripe.Plan, "subscriptions": stripe.Subscription,
                  "events": stripe.Event, "invoices__lines": stripe.InvoiceLineItem,
                  "subscriptions__items": stripe.SubscriptionItem, "charges__refunds": stripe.Refund}


def fixture(resource: str) -> dict:
    return copy.deepcopy(FIXTURES[resource])


def flatten(table: str, obj: dict, parent_id: str | None = None) -> pd.DataFrame:
    shaper = Shaper(schema(table))
    return shaper.frame([shaper.row(obj, parent_id)])


def ts(seconds: int) -> pd.Timestamp:
    return pd.Timestamp(seconds, unit="s", tz="UTC")


# --- schemas ------------------------------------------------------------------------------------------

def test_table_names():
    assert EXPECTED_TABLES == ("customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events")
    assert CHILD_TABLES == ("invoices__lines", "subscriptions__items", "charges__refunds")
    assert ALL_TABLES == EXPECTED_TABLES + CHILD_TABLES


@pytest.mark.parametrize("table", ALL_TABLES)
def test_every_table_is_keyed_by_a_string_id(table):
    target = schema(table)
    assert target.name == table
    assert target.primary_key == "id"
    assert target.column_names[0] == "id"
    assert target.dtypes["id"] == "string"
    assert len(target.column_names) == len(set(target.column_names)), "duplicated column names"
    assert set(target.dtypes.values()) <= set(DTYPES.values())
    for column in target.columns:
        assert column.name == "__".join(column.path)
        assert column.dtype == DTYPES[column.kind]
        if column.kind == "timestamp":
            assert column.dtype == "datetime64[ns, UTC]"


@pytest.mark.parametrize("child, parent, key, field", [
    ("invoices__lines", "invoices", "invoice_id", "lines"),
    ("subscriptions__items", "subscriptions", "subscription_id", "items"),
    ("charges__refunds", "charges", "charge_id", "refunds"),
])
def test_child_tables_name_their_parent(child, parent, key, field):
    target = schema(child)
    assert (target.parent, target.parent_key, target.embedded_field) == (parent, key, field)
    assert target.column_names[1] == key
    assert target.dtypes[key] == "string"
    assert child in schema(parent).children
    # The embedded list is the child table, not a column of the parent.
    assert not any(c.path[0] == field for c in schema(parent).columns)


@pytest.mark.parametrize("table", ALL_TABLES)
def test_every_field_of_the_stripe_class_has_a_column(table):
    target = schema(table)
    fields = [name for name, annotation in inspect.get_annotations(STRIPE_CLASSES[table]).items()
              if typing.get_origin(annotation) is not typing.ClassVar]
    assert fields
    tops = {c.path[0] for c in target.columns}
    children = {schema(child).embedded_field for child in target.children}
    for name in fields:  # but the secrets (tests/test_sensitive_columns.py)
        assert name in tops or name in children or name in SENSITIVE_FIELDS, f"{table}.{name} has no column"


@pytest.mark.parametrize("table, column, dtype", [
    ("charges", "amount", "Int64"),
    ("charges", "amount_refunded", "Int64"),
    ("charges", "created", "datetime64[ns, UTC]"),
    ("charges", "paid", "boolean"),
    ("charges", "customer", "string"),
    ("charges", "billing_details__address__city", "string"),
    ("charges", "payment_method_details__card__brand", "string"),
    ("charges", "metadata", "string"),
    ("coupons", "percent_off", "Float64"),
    ("coupons", "redeem_by", "datetime64[ns, UTC]"),
    ("coupons", "duration_in_months", "Int64"),
    ("invoices", "status_transitions__paid_at", "datetime64[ns, UTC]"),
    ("invoices", "total", "Int64"),
    ("plans", "amount_decimal", "string"),
    ("subscriptions", "cancel_at_period_end", "boolean"),
    ("subscriptions", "trial_end", "datetime64[ns, UTC]"),
    ("events", "data__object__id", "string"),
    ("events", "data__object", "string"),
    ("subscriptions__items", "quantity", "Int64"),
])
def test_column_dtypes(table, column, dtype):
    assert schema(table).dtypes[column] == dtype


def test_column_kinds():
    kinds = {c.name: c.kind for c in schema("charges").columns}
    assert kinds["customer"] == "id" and kinds["metadata"] == "json" and kinds["created"] == "timestamp"
    assert {c.name: c.kind for c in schema("plans").columns}["amount_decimal"] == "string"
    events = {c.name: c.kind for c in schema("events").columns}
    assert events["data__object"] == "json" and events["data__object__object"] == "string"


def test_unknown_table():
    with pytest.raises(UnknownTableError) as caught:
        schema("payouts")
    assert isinstance(caught.value, KeyError)
    message = str(caught.value)
    assert "payouts" in message and all(name in message for name in ALL_TABLES)


@pytest.mark.parametrize("table", ALL_TABLES)
def test_empty_frame_has_every_column_typed(table):
    target = schema(table)
    frame = empty_frame(target)
    assert len(frame) == 0
    assert list(frame.columns) == target.column_names
    assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == target.dtypes


# --- flattening Stripe's example objects --------------------------------------------------------------

@pytest.mark.parametrize("table", ALL_TABLES)
def test_every_example_object_flattens(table):
    target = schema(table)
    obj = fixture(RESOURCE_OF[table])
    frame = flatten(table, obj, parent_id="parent_1" if target.parent else None)
    assert len(frame) == 1
    assert frame.loc[0, "id"] == obj["id"]
    assert list(frame.columns[:len(target.columns)]) == target.column_names
    assert {c: str(frame[c].dtype) for c in target.column_names} == target.dtypes
    if target.parent_key:
        assert frame.loc[0, target.parent_key] == "parent_1"
    if "created" in obj:
        assert frame.loc[0, "created"] == ts(obj["created"])
    if "metadata" in obj:
        assert json.loads(frame.loc[0, "metadata"]) == obj["metadata"]


def test_customer():
    obj = fixture("customer")
    obj["address"]["city"] = "Lisbon"
    obj["metadata"] = {"crm_id": "8812", "segment": "smb, \"west\""}
    frame = flatten("customers", obj)
    row = frame.iloc[0]
    assert row["id"] == "cus_QXg1o8vcGmoR32"
    assert row["created"] == ts(1234567890)
    assert row["address__city"] == "Lisbon"
    assert pd.isna(row["address__country"])
    assert row["invoice_prefix"] == "7FE1103"
    assert row["balance"] == 0 and str(frame["balance"].dtype) == "Int64"
    assert bool(row["delinquent"]) is False
    assert json.loads(row["metadata"]) == obj["metadata"]
    assert json.loads(row["preferred_locales"]) == []


def test_charge():
    obj = fixture("charge")
    obj["billing_details"]["address"]["city"] = "Berlin"
    obj["customer"] = "cus_QXg1o8vcGmoR32"
    frame = flatten("charges", obj)
    row = frame.iloc[0]
    assert row["amount"] == 100 and str(frame["amount"].dtype) == "Int64"
    assert row["created"] == ts(1234567890)
    assert str(frame["created"].dtype) == "datetime64[ns, UTC]"
    assert row["billing_details__address__city"] == "Berlin"
    assert row["billing_details__name"] == "Jenny Rosen"
    assert row["customer"] == "cus_QXg1o8vcGmoR32"
    assert bool(row["paid"]) is True and bool(row["captured"]) is False
    assert row["payment_method_details__card__brand"] == "visa"
    assert row["payment_method_details__card__exp_year"] == 2030
    assert row["payment_method_details__type"] == "card"
    assert "refunds" not in frame.columns  # the embedded list is the charges__refunds table


def test_expanded_reference_is_kept_as_its_id():
    obj = fixture("charge")
    obj["customer"] = fixture("customer")
    frame = flatten("charges", obj)
    assert frame.loc[0, "customer"] == "cus_QXg1o8vcGmoR32"
    assert not any(name.startswith("customer__") for name in frame.columns)


def test_coupon():
    frame = flatten("coupons", fixture("coupon"))
    row = frame.iloc[0]
    assert row["percent_off"] == 25.5 and str(frame["percent_off"].dtype) == "Float64"
    assert row["redeem_by"] == ts(1234567890)
    assert row["duration"] == "forever" and row["duration_in_months"] == 3
    assert bool(row["valid"]) is True
    assert pd.isna(row["amount_off"])


def test_invoice():
    obj = fixture("invoice")
    obj["status_transitions"]["paid_at"] = 1_700_000_123
    frame = flatten("invoices", obj)
    row = frame.iloc[0]
    assert row["status_transitions__paid_at"] == ts(1_700_000_123)
    assert pd.isna(row["status_transitions__voided_at"])
    assert row["customer"] == "cus_QXg1o8vcGmoR32"
    assert row["amount_due"] == 1000 and row["total"] == 1000
    assert row["period_end"] == ts(obj["period_end"])
    assert row["parent__subscription_details__subscription"] == "subscription"
    assert "lines" not in frame.columns and not any(c.startswith("lines__") for c in frame.columns)


def test_invoice_lines_get_the_invoice_id():
    line = fixture("invoice")["lines"]["data"][0]
    frame = flatten("invoices__lines", line, parent_id="in_1Pgc6tB7WZ01zgkWu9fdqL6I")
    assert frame.loc[0, "invoice_id"] == "in_1Pgc6tB7WZ01zgkWu9fdqL6I"
    assert frame.loc[0, "id"] == line["id"]
    assert frame.loc[0, "amount"] == 1000


def test_plan():
    frame = flatten("plans", fixture("plan"))
    row = frame.iloc[0]
    assert row["amount"] == 2000
    assert row["amount_decimal"] == "2000"  # the decimal string itself, not JSON '"2000"'
    assert row["interval"] == "month" and row["interval_count"] == 1
    assert row["product"] == "prod_QXg1hqf4jFNsqG"
    assert row["transform_usage__round"] == "down"


def test_subscription():
    obj = fixture("subscription")
    frame = flatten("subscriptions", obj)
    row = frame.iloc[0]
    assert row["customer"] == "cus_QXg1o8vcGmoR32"
    assert bool(row["cancel_at_period_end"]) is True
    assert row["canceled_at"] == ts(1234567890)
    assert row["status"] == obj["status"]
    assert json.loads(row["billing_schedules"]) == obj["billing_schedules"]
    assert "items" not in frame.columns  # the embedded list is the subscriptions__items table


def test_event():
    obj = fixture("event")
    frame = flatten("events", obj)
    row = frame.iloc[0]
    assert row["type"] == "plan.created"
    assert row["data__object__id"] == "price_1PgafmB7WZ01zgkW6dKueIc5"
    assert row["data__object__object"] == "plan"
    assert json.loads(row["data__object"]) == obj["data"]["object"]
    assert json.loads(row["data__object"])["id"] == row["data__object__id"]
    assert pd.isna(row["data__previous_attributes"])
    assert pd.isna(row["request__id"])


def test_unknown_fields_become_extra_columns():
    obj = fixture("charge")
    obj["brand_new_flag"] = True
    obj["brand_new_count"] = 7
    obj["brand_new_object"] = {"a": [1, 2]}
    obj["billing_details"]["brand_new_nested"] = "x"
    frame = flatten("charges", obj)
    known = schema("charges").column_names
    assert list(frame.columns[:len(known)]) == known
    extras = list(frame.columns[len(known):])
    assert set(extras) == {"brand_new_flag", "brand_new_count", "brand_new_object", "billing_details__brand_new_nested"}
    row = frame.iloc[0]
    assert bool(row["brand_new_flag"]) is True and str(frame["brand_new_flag"].dtype) == "boolean"
    assert row["brand_new_count"] == 7 and str(frame["brand_new_count"].dtype) == "Int64"
    assert json.loads(row["brand_new_object"]) == {"a": [1, 2]}
    assert row["billing_details__brand_new_nested"] == "x"


def test_fields_the_pinned_api_version_does_not_know_are_kept():
    # Stripe's fixtures carry fields stripe-python's pinned version lacks (the old top-level
    # `subscription`, payment method options it does not type): extra columns, not dropped.
    obj = fixture("invoice")
    frame = flatten("invoices", obj)
    known = set(schema("invoices").column_names)
    extras = [c for c in frame.columns if c not in known]
    assert "subscription" in extras and pd.isna(frame.loc[0, "subscription"])
    options = "payment_settings__payment_method_options__konbini"
    assert options in extras
    assert json.loads(frame.loc[0, options]) == obj["payment_settings"]["payment_method_options"]["konbini"]


def test_a_field_whose_shape_changed_is_kept_not_crashing():
    obj = fixture("charge")
    obj["outcome"] = "now a string"
    frame = flatten("charges", obj)
    assert json.loads(frame.loc[0, "outcome"]) == "now a string"
    assert pd.isna(frame.loc[0, "outcome__type"])


def test_rows_with_different_extras_share_one_frame():
    shaper = Shaper(schema("coupons"))
    first, second = fixture("coupon"), fixture("coupon")
    second["id"], second["new_field"] = "OTHER", "hello"
    frame = shaper.frame([shaper.row(first), shaper.row(second)])
    assert frame["id"].tolist() == ["Z4OV52SU", "OTHER"]
    assert pd.isna(frame.loc[0, "new_field"]) and frame.loc[1, "new_field"] == "hello"


def test_a_value_of_the_wrong_type_raises_shape_error():
    obj = fixture("charge")
    obj["amount"] = "a lot"
    with pytest.raises(ShapeError) as caught:
        flatten("charges", obj)
    assert "charges.amount" in str(caught.value)
