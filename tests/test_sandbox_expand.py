"""Conformance of the sandbox's `expand[]` with Stripe's (issue 12): what expands, to what, and what is refused.

Guards the regressions third-party extractors hit: expansions Stripe accepts answered 400, and
`charge.refunds` embedded whether or not it was asked for (a client that forgets to expand it
passed against the sandbox and failed against Stripe).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
import stripe

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.expand import EXPANDABLE, INCLUDABLE

#: The seven tables' resources and their children, with the list that serves them and a stripe-python class file.
RESOURCES = {"charge": ("/v1/charges", "_charge.py", "Charge"),
             "customer": ("/v1/customers", "_customer.py", "Customer"),
             "coupon": ("/v1/coupons", "_coupon.py", "Coupon"),
             "invoice": ("/v1/invoices", "_invoice.py", "Invoice"),
             "plan": ("/v1/plans", "_plan.py", "Plan"),
             "subscription": ("/v1/subscriptions?status=all", "_subscription.py", "Subscription"),
             "event": ("/v1/events", "_event.py", "Event"),
             "line_item": (None, "_invoice_line_item.py", "InvoiceLineItem"),
             "subscription_item": (None, "_subscription_item.py", "SubscriptionItem"),
             "refund": ("/v1/refunds", "_refund.py", "Refund"),
             "price": ("/v1/prices", "_price.py", "Price"),
             "product": ("/v1/products", "_product.py", "Product")}
STRIPE_DIR = Path(stripe.__file__).parent


def stripe_expandables(file: str, cls: str) -> dict[str, str]:
    """Top-level `ExpandableField[...]` fields of a stripe-python class -> the object type they name."""
    source = (STRIPE_DIR / file).read_text()
    body = source[source.index(f"\nclass {cls}("):]
    found = {}
    pattern = r'^    (\w+): (?:Optional\[\s*)?(?:List\[\s*)?ExpandableField\[\s*(Union\[)?\s*"?(\w+)"?'
    for name, union, target in re.findall(pattern, body, re.M):
        # A payment source is a union (account, bank account, card, source): the sandbox names it `source`.
        found[name] = "source" if union else re.sub(r"(?<!^)([A-Z])", r"_\1", target).lower()
    return found


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=3, scale=40) as running:
        yield running


@pytest.fixture(scope="module")
def http(sandbox):
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {sandbox.secret_key}"
        session.headers["Stripe-Account"] = sandbox.accounts[0].id

        def get(path: str, **params):
            return session.get(sandbox.api_url + path, params=params, timeout=30)

        yield get


def first_with(http, path: str, field: str, expand: str) -> dict | None:
    """The first listed object whose `field` is set (not null, not empty), listed with `expand`."""
    base, _, query = path.partition("?")
    params = dict(p.split("=") for p in query.split("&") if p)
    page = http(base, limit=100, **params, **{"expand[]": expand}).json()
    assert "error" not in page, page
    return next((o for o in page["data"] if o.get(field) not in (None, [], "")), None)


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_the_sandbox_expands_every_field_stripe_python_marks_expandable(kind):
    """The sandbox's table matches stripe-python 16's classes: same fields, same target types."""
    _, file, cls = RESOURCES[kind]
    legacy = {"subscription"} if kind == "invoice" else set()  # the sandbox still renders invoice.subscription
    top_level = {k: v for k, v in EXPANDABLE.get(kind, {}).items() if "." not in k and k not in legacy}
    assert top_level == stripe_expandables(file, cls)


@pytest.mark.parametrize("kind, field", sorted((k, f) for k in ("charge", "invoice", "subscription", "refund",
                                                                  "plan", "price", "customer")
                                               for f in EXPANDABLE[k] if "." not in f))
def test_each_expandable_field_expands_to_the_type_stripe_python_names(http, kind, field):
    path = RESOURCES[kind][0]
    target = EXPANDABLE[kind][field]
    found = first_with(http, path, field, f"data.{field}")
    if found is None:
        # Null everywhere in the generated data: Stripe still accepts the expansion (and answers null).
        plain = first_with(http, path, "id", f"data.{field}")
        assert plain is None or plain.get(field) in (None, [])
        return
    values = found[field] if isinstance(found[field], list) else [found[field]]
    assert values and all(isinstance(v, dict) and v["object"] == target for v in values), found[field]
    retrieved = http(f"{path.split('?')[0]}/{found['id']}", **{"expand[]": field}).json()
    assert retrieved[field] == found[field]


def test_expanded_references_are_the_objects_the_lists_serve(http):
    """An expansion answers the same object its own list serves (a real object, not an invented one)."""
    sub = first_with(http, "/v1/subscriptions?status=all", "latest_invoice", "data.latest_invoice")
    invoice = http(f"/v1/invoices/{sub['latest_invoice']['id']}").json()
    assert sub["latest_invoice"] == invoice
    charge = first_with(http, "/v1/charges", "payment_intent", "data.payment_intent")
    assert charge["payment_intent"]["latest_charge"] == charge["id"]
    assert charge["payment_intent"]["amount"] == charge["amount"]


def test_a_discount_per_applied_coupon(http, sandbox):
    history = sandbox.history()
    sub = next(s for s in history.subscriptions if s.coupon is not None)
    served = http(f"/v1/subscriptions/{sub.id}", **{"expand[]": "discounts.source.coupon"}).json()
    (discount,) = served["discounts"]
    assert discount["id"] == sub.discount_id and discount["object"] == "discount"
    assert discount["subscription"] == sub.id and discount["customer"] == sub.customer.id
    assert discount["source"]["coupon"]["id"] == sub.coupon.id
    assert discount["source"]["coupon"]["object"] == "coupon"


def test_extractors_expansions_are_accepted(http):
    """What Airbyte's, dlt's and Singer's extractors send: answered 200 with real objects."""
    invoices = http("/v1/invoices", limit=100, **{"expand[]": ["data.discounts", "data.total_tax_amounts.tax_rate",
                                                               "data.customer"]})
    assert invoices.status_code == 200, invoices.text
    assert any(d["object"] == "discount" for inv in invoices.json()["data"] for d in inv["discounts"])
    customers = http("/v1/customers", limit=100,
                     **{"expand[]": ["data.tax_ids", "data.subscriptions", "data.sources"]})
    assert customers.status_code == 200, customers.text
    data = customers.json()["data"]
    assert all(c["sources"]["object"] == "list" and c["subscriptions"]["object"] == "list" for c in data)
    assert any(s["object"] == "subscription" for c in data for s in c["subscriptions"]["data"])
    assert any(t["object"] == "tax_id" and t["customer"] == c["id"] for c in data for t in c["tax_ids"]["data"])
    subs = http("/v1/subscriptions", limit=100, **{"expand[]": ["data.plan.tiers", "data.latest_invoice"]})
    assert subs.status_code == 200, subs.text
    assert any(s["latest_invoice"]["object"] == "invoice" for s in subs.json()["data"] if s["latest_invoice"])
    sub_id = subs.json()["data"][0]["id"]
    items = http("/v1/subscription_items", subscription=sub_id, **{"expand[]": ["data.plan.tiers", "data.price.tiers"]})
    assert items.status_code == 200, items.text
    assert all("tiers" in i["plan"] and "tiers" in i["price"] for i in items.json()["data"])


def test_four_levels_and_several_at_once(http):
    answer = http("/v1/invoices", limit=20, **{"expand[]": ["data.subscription.latest_invoice.customer",
                                                            "data.parent.subscription_details.subscription",
                                                            "data.lines"]})
    assert answer.status_code == 200, answer.text
    invoice = next(i for i in answer.json()["data"] if i["subscription"])
    assert invoice["subscription"]["latest_invoice"]["customer"]["object"] == "customer"
    assert invoice["parent"]["subscription_details"]["subscription"]["object"] == "subscription"
    refund = http("/v1/refunds", limit=5, **{"expand[]": "data.charge.customer"}).json()["data"][0]
    assert refund["charge"]["customer"]["object"] == "customer"
    lines = http(f"/v1/invoices/{invoice['id']}/lines", **{"expand[]": "data.pricing.price_details.price"}).json()
    assert lines["data"][0]["pricing"]["price_details"]["price"]["object"] == "price"


@pytest.mark.parametrize("path, field, expansion", [
    ("/v1/charges", "refunds", "data.refunds"),
    ("/v1/customers", "sources", "data.sources"),
    ("/v1/customers", "subscriptions", "data.subscriptions"),
    ("/v1/customers", "tax_ids", "data.tax_ids"),
    ("/v1/plans", "tiers", "data.tiers"),
    ("/v1/prices", "tiers", "data.tiers"),
])
def test_includable_fields_are_absent_unless_expanded(http, path, field, expansion):
    plain = http(path, limit=10).json()["data"]
    assert plain and all(field not in obj for obj in plain)
    expanded = http(path, limit=10, **{"expand[]": expansion}).json()["data"]
    assert all(field in obj for obj in expanded)
    retrieved = http(f"{path}/{plain[0]['id']}").json()
    assert field not in retrieved
    assert field in http(f"{path}/{plain[0]['id']}", **{"expand[]": field}).json()


def test_the_includable_fields_are_the_ones_stripe_python_makes_optional():
    """Stripe's includable fields are typed Optional although Stripe always has a value for them."""
    for kind, fields in INCLUDABLE.items():
        _, file, cls = RESOURCES[kind]
        source = (STRIPE_DIR / file).read_text()
        for field in fields:
            assert re.search(rf"^    {field}: Optional\[", source, re.M), (kind, field)


def test_events_carry_no_includable_fields(http):
    events = http("/v1/events", limit=100, type="charge.*").json()["data"]
    assert events and all("refunds" not in e["data"]["object"] for e in events)


@pytest.mark.parametrize("path, expansion", [
    ("/v1/charges", "data.amount"),
    ("/v1/charges", "data.invoice"),  # removed from charges at the pinned version
    ("/v1/charges", "customer"),  # a list takes `data.` paths
    ("/v1/invoices", "data.lines.data.price"),
    ("/v1/events", "data.data"),
    ("/v1/customers", "data.subscriptions.plan"),
    ("/v1/subscriptions", "data.items.data.quantity"),
    ("/v1/charges/{charge}", "data.customer"),  # a retrieve takes paths without `data.`
])
def test_refusals_use_stripes_wording_and_param(http, path, expansion):
    charge = http("/v1/charges", limit=1).json()["data"][0]["id"]
    answer = http(path.format(charge=charge), **{"expand[]": expansion})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == f"This property cannot be expanded ({expansion})."
    assert error["param"] == "expand" and error["type"] == "invalid_request_error"


def test_more_than_four_levels_are_refused(http):
    answer = http("/v1/invoices", **{"expand[]": "data.subscription.latest_invoice.subscription.customer"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "expand"
    assert "more than 4 levels" in answer.json()["error"]["message"]


def test_search_expands_as_the_list_does(http):
    listed = http("/v1/charges", limit=5, **{"expand[]": ["data.refunds", "data.balance_transaction"]}).json()
    found = http("/v1/charges/search", query="created>0", limit=5,
                 **{"expand[]": ["data.refunds", "data.balance_transaction"]}).json()
    assert [c["id"] for c in found["data"]] == [c["id"] for c in listed["data"]]
    assert found["data"] == listed["data"]
    assert all("refunds" not in c for c in http("/v1/charges/search", query="created>0", limit=5).json()["data"])
