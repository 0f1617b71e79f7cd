"""Shape conformance against Stripe's own example objects, embedded lists, and relationships between tables."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.expand import INCLUDABLE

FIXTURES = json.loads((Path(__file__).parent / "data" / "stripe_fixtures3_subset.json").read_text())["resources"]
#: List endpoint -> the fixture resource its objects must look like.
TABLES = {"customers": "customer", "charges": "charge", "coupons": "coupon", "invoices": "invoice", "plans": "plan",
          "subscriptions": "subscription", "events": "event", "refunds": "refund", "products": "product",
          "prices": "price"}
#: Object type -> the list it is served from (for the ids inside events).
LISTED = {noun: resource for resource, noun in TABLES.items()}
SAMPLE = 120  # parents whose full sub-lists are fetched, besides every long one


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def shape_problems(obj: dict, resource: str) -> list[str]:
    """Fields of the fixture missing from `obj`, or present with another JSON type (null is always allowed)."""
    problems = []
    for field, example in FIXTURES[resource].items():
        if field not in obj and field in INCLUDABLE.get(resource, {}):
            continue  # left out unless expanded, as Stripe does (checked in test_sandbox_expand.py)
        if field not in obj:
            problems.append(f"{resource}.{field} missing")
        elif example is not None and obj[field] is not None and json_kind(obj[field]) != json_kind(example):
            problems.append(f"{resource}.{field} is {json_kind(obj[field])}, Stripe's is {json_kind(example)}")
    if obj.get("object") != FIXTURES[resource]["object"]:
        problems.append(f"{resource}.object is {obj.get('object')!r}")
    return problems


class Served:
    """Everything one account serves, fetched over HTTP once per module."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {sandbox.restricted_key}", "Connection": "close"})
        extra = {"subscriptions": {"status": "all"}, "charges": {"expand[]": "data.refunds"}}
        self.lists = {resource: self.all(f"/v1/{resource}", extra.get(resource, {})) for resource in TABLES}
        self.by_id = {resource: {o["id"]: o for o in objects} for resource, objects in self.lists.items()}
        history = sandbox.history()
        rng = random.Random(0)
        self.long_invoices = [i.id for i in history.invoices if len(i.lines) > 10]
        self.long_subscriptions = [s.id for s in history.subscriptions if len(s.items) > 10]
        self.long_charges = [c.id for c in history.charges if len(c.refunds) > 10]
        invoices = sorted(set(rng.sample([i.id for i in history.invoices], SAMPLE)) | set(self.long_invoices))
        subscriptions = sorted(set(rng.sample([s.id for s in history.subscriptions], SAMPLE))
                               | set(self.long_subscriptions))
        charges = sorted({c.id for c in history.charges if c.refunds})
        self.lines = {i: self.all(f"/v1/invoices/{i}/lines") for i in invoices}
        self.items = {s: self.all("/v1/subscription_items", {"subscription": s}) for s in subscriptions}
        self.refunds = {c: self.all(f"/v1/charges/{c}/refunds") for c in charges}

    def get(self, path: str, params: dict | None = None) -> dict:
        response = self.session.get(self.sandbox.api_url + path, params=params, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def all(self, path: str, params: dict | None = None) -> list[dict]:
        objects: list[dict] = []
        query = dict(params or {}, limit=100)
        while True:
            page = self.get(path, query)
            objects += page["data"]
            if not page["has_more"]:
                return objects
            query["starting_after"] = page["data"][-1]["id"]


@pytest.fixture(scope="module")
def served(sandbox) -> Served:
    found = Served(sandbox)
    yield found
    found.session.close()


# --- shapes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("resource", sorted(TABLES))
def test_every_served_object_has_stripes_fields_and_types(served, sandbox, resource):
    objects = served.lists[resource]
    assert len(objects) == sandbox.dataset().count(resource) > 0
    problems = Counter(p for obj in objects for p in shape_problems(obj, TABLES[resource]))
    assert not problems, problems.most_common(10)


def test_fixture_subset_covers_the_tables():
    assert set(TABLES.values()) | {"subscription_item", "line_item"} <= set(FIXTURES)


@pytest.mark.parametrize("kind, resource", [("lines", "line_item"), ("items", "subscription_item"),
                                            ("refunds", "refund")])
def test_sub_list_entries_have_stripes_fields_and_types(served, kind, resource):
    objects = [o for children in getattr(served, kind).values() for o in children]
    assert len(objects) > 50
    problems = Counter(p for obj in objects for p in shape_problems(obj, resource))
    assert not problems, problems.most_common(10)


@pytest.mark.parametrize("resource, kind", [("invoices", "lines"), ("subscriptions", "items"),
                                            ("charges", "refunds")])
def test_embedded_entries_have_stripes_fields_and_types(served, resource, kind):
    noun = {"lines": "line_item", "items": "subscription_item", "refunds": "refund"}[kind]
    objects = [entry for parent in served.lists[resource] for entry in parent[kind]["data"]]
    assert objects
    problems = Counter(p for obj in objects for p in shape_problems(obj, noun))
    assert not problems, problems.most_common(10)


def test_event_objects_have_the_shape_of_their_type(served):
    problems: Counter = Counter()
    for event in served.lists["events"]:
        obj = event["data"]["object"]
        assert obj["object"] in LISTED, obj["object"]
        problems.update(shape_problems(obj, obj["object"]))
    assert not problems, problems.most_common(10)


# --- embedded lists --------------------------------------------------------------------------------

@pytest.mark.parametrize("resource, kind, url", [
    ("invoices", "lines", "/v1/invoices/{id}/lines"),
    ("subscriptions", "items", "/v1/subscription_items?subscription={id}"),
    ("charges", "refunds", "/v1/charges/{id}/refunds"),
])
def test_embedded_lists_are_truncated_at_10_with_has_more(served, sandbox, resource, kind, url):
    history = sandbox.history()
    full_counts = {"lines": {i.id: len(i.lines) for i in history.invoices},
                   "items": {s.id: len(s.items) for s in history.subscriptions},
                   "refunds": {c.id: len(c.refunds_at(sandbox.now)) for c in history.charges}}[kind]
    for parent in served.lists[resource]:
        embedded = parent[kind]
        assert embedded["object"] == "list"
        assert embedded["url"] == url.format(id=parent["id"])
        assert len(embedded["data"]) == min(10, full_counts[parent["id"]])
        assert embedded["has_more"] == (full_counts[parent["id"]] > 10)
    assert any(parent[kind]["has_more"] for parent in served.lists[resource])


@pytest.mark.parametrize("resource, kind", [("invoices", "lines"), ("subscriptions", "items"),
                                            ("charges", "refunds")])
def test_full_sub_list_matches_the_generated_facts_and_starts_with_the_embedded_one(served, sandbox, resource, kind):
    history = sandbox.history()
    truth = {"lines": {i.id: [line.id for line in i.lines] for i in history.invoices},
             "items": {s.id: [item.id for item in s.items] for s in history.subscriptions},
             "refunds": {c.id: [r.id for r in reversed(c.refunds_at(sandbox.now))] for c in history.charges}}[kind]
    fetched = getattr(served, kind)
    for parent_id, children in fetched.items():
        ids = [child["id"] for child in children]
        assert ids == truth[parent_id]
        embedded = [entry["id"] for entry in served.by_id[resource][parent_id][kind]["data"]]
        assert embedded == ids[:10]
    assert any(len(children) > 10 for children in fetched.values())


def test_generator_guarantees_long_sub_lists(served):
    assert served.long_subscriptions and served.long_invoices
    assert any(len(served.refunds[c]) == 12 for c in served.long_charges)
    long_sub = served.long_subscriptions[0]
    assert any(served.by_id["invoices"][i]["subscription"] == long_sub for i in served.long_invoices)


def test_sub_list_children_point_at_their_parent(served):
    for invoice_id, lines in served.lines.items():
        assert all(line["invoice"] == invoice_id for line in lines)
    for sub_id, items in served.items.items():
        assert all(item["subscription"] == sub_id for item in items)
    for charge_id, refunds in served.refunds.items():
        assert all(refund["charge"] == charge_id for refund in refunds)


# --- relationships ---------------------------------------------------------------------------------

def existing_or_deleted_customers(served, sandbox) -> set[str]:
    """Customers that list, and those deleted (their charges, invoices and subscriptions stay, as in Stripe)."""
    deleted = set(sandbox.dataset().deleted["customers"])
    assert deleted, "the demo data deletes some customers"
    return set(served.by_id["customers"]) | deleted


def test_every_charge_customer_exists(served, sandbox):
    customers = existing_or_deleted_customers(served, sandbox)
    assert all(charge["customer"] in customers for charge in served.lists["charges"])


def test_every_invoice_customer_and_subscription_exists(served, sandbox):
    customers, subscriptions = existing_or_deleted_customers(served, sandbox), served.by_id["subscriptions"]
    invoices = served.lists["invoices"]
    assert all(invoice["customer"] in customers for invoice in invoices)
    assert all(invoice["subscription"] in subscriptions for invoice in invoices if invoice["subscription"])
    assert any(invoice["subscription"] for invoice in invoices)
    for invoice in invoices:
        if invoice["subscription"]:
            assert subscriptions[invoice["subscription"]]["customer"] == invoice["customer"]


def test_every_subscription_and_refund_points_at_existing_objects(served, sandbox):
    customers, charges = existing_or_deleted_customers(served, sandbox), served.by_id["charges"]
    assert all(sub["customer"] in customers for sub in served.lists["subscriptions"])
    assert all(refund["charge"] in charges for refund in served.lists["refunds"])
    products, prices = served.by_id["products"], served.by_id["prices"]
    assert all(price["product"] in products for price in served.lists["prices"])
    assert all(plan["product"] in products for plan in served.lists["plans"])
    assert all(p["default_price"] in prices for p in served.lists["products"] if p["default_price"])
    for sub in served.lists["subscriptions"]:
        for item in sub["items"]["data"]:
            assert item["price"]["id"] in prices


def test_paid_invoices_have_a_succeeded_charge(served, sandbox):
    invoices = {i.id: i for i in sandbox.history().invoices}
    charges = served.by_id["charges"]
    paid = [inv for inv in served.lists["invoices"] if inv["status"] == "paid" and inv["amount_due"] > 0]
    assert paid
    for served_invoice in paid:
        attempts = invoices[served_invoice["id"]].charges
        succeeded = [c for c in attempts if charges[c.id]["status"] == "succeeded"]
        assert succeeded, served_invoice["id"]
        assert charges[succeeded[-1].id]["amount"] == served_invoice["amount_paid"] == served_invoice["total"]
        assert charges[succeeded[-1].id]["customer"] == served_invoice["customer"]


def test_canceled_subscriptions_have_canceled_at_and_ended_at(served, sandbox):
    canceled = [s for s in served.lists["subscriptions"] if s["status"] == "canceled"]
    assert canceled
    for sub in canceled:
        assert sub["canceled_at"] is not None and sub["ended_at"] is not None
        assert sub["canceled_at"] <= sub["ended_at"] <= sandbox.now
        assert sub["cancel_at_period_end"] is False
    live = [s for s in served.lists["subscriptions"] if s["status"] != "canceled"]
    assert all(s["ended_at"] is None for s in live)


def test_statuses_cover_the_lifecycle(served):
    subscription_statuses = {s["status"] for s in served.lists["subscriptions"]}
    assert {"trialing", "active", "past_due", "canceled"} <= subscription_statuses
    invoice_statuses = {i["status"] for i in served.lists["invoices"]}
    assert {"paid", "open"} <= invoice_statuses
    charge_statuses = {c["status"] for c in served.lists["charges"]}
    assert {"succeeded", "failed"} <= charge_statuses


def test_event_objects_exist_in_their_tables(served, sandbox):
    events = served.lists["events"]
    assert {e["data"]["object"]["object"] for e in events} >= {"customer", "charge", "invoice", "subscription"}
    deleted = {obj_id for ids in sandbox.dataset().deleted.values() for obj_id in ids}
    for event in events:
        obj = event["data"]["object"]
        assert obj["id"] in served.by_id[LISTED[obj["object"]]] or obj["id"] in deleted, (event["type"], obj["id"])
        assert event["type"].split(".")[0] in (obj["object"], "customer")


def test_subscription_deleted_events_carry_canceled_subscriptions(served):
    deleted = [e for e in served.lists["events"] if e["type"] == "customer.subscription.deleted"]
    assert deleted
    for event in deleted:
        obj = event["data"]["object"]
        assert obj["object"] == "subscription" and obj["status"] == "canceled"
        assert obj["ended_at"] is not None
        assert served.by_id["subscriptions"][obj["id"]]["status"] == "canceled"


def test_catalog_variety(served):
    assert {p["interval"] for p in served.lists["plans"]} >= {"month", "year"}
    assert {p["recurring"]["interval"] for p in served.lists["prices"]} >= {"month", "year"}
    coupons = served.lists["coupons"]
    assert any(c["percent_off"] is not None and c["amount_off"] is None for c in coupons)
    assert any(c["amount_off"] is not None and c["percent_off"] is None and c["currency"] for c in coupons)
    assert {p["id"] for p in served.lists["plans"]} == {p["id"] for p in served.lists["prices"]}
