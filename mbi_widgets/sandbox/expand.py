"""Stripe's `expand[]` over the sandbox's records: references become objects, includable fields appear.

What may be expanded follows stripe-python 16's classes at the pinned API version: every field
annotated `ExpandableField[...]` (a reference, or a list of references such as `discounts`), and
the includable fields Stripe leaves out unless they are expanded (`charge.refunds`,
`customer.sources`, `customer.subscriptions`, `customer.tax_ids`, `invoice.confirmation_secret`,
`plan.tiers`, `price.tiers`).
Paths reach through nested hashes (`parent.subscription_details.subscription`), embedded objects
(`items.data.price.product`) and expanded ones, at most four levels deep, as in Stripe.

Paths are checked against these tables before any object is read, so a refused expansion is
refused the same way on an empty page. A request without expansions never reaches this module:
lists stay slices of pre-serialised bytes. `data.customer` and `data.refunds` (what StripeSource
sends) are byte splices too; anything else decodes the page's objects, expands and re-encodes.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import orjson

from mbi_widgets.sandbox.render import EMBED_LIMIT

if TYPE_CHECKING:
    from mbi_widgets.sandbox.store import Dataset, Record

#: Stripe refuses expansions of more than this many levels (a list's leading `data.` counts).
MAX_DEPTH = 4

#: object type -> dotted path inside it -> the object type it expands to (a list of ids expands each).
EXPANDABLE: dict[str, dict[str, str]] = {
    "charge": {"customer": "customer", "balance_transaction": "balance_transaction",
               "failure_balance_transaction": "balance_transaction",
               "payment_intent": "payment_intent", "application": "application",
               "application_fee": "application_fee", "on_behalf_of": "account", "review": "review",
               "source_transfer": "transfer", "transfer": "transfer", "transfer_data.destination": "account",
               "outcome.rule": "rule", "payment_method_details.card.mandate": "mandate"},
    "customer": {"default_source": "source", "invoice_settings.default_payment_method": "payment_method",
                 "test_clock": "test_clock"},
    "invoice": {"customer": "customer", "account_tax_ids": "tax_id", "application": "application",
                "default_payment_method": "payment_method", "default_source": "source", "discounts": "discount",
                "latest_revision": "invoice", "on_behalf_of": "account", "test_clock": "test_clock",
                "from_invoice.invoice": "invoice", "issuer.account": "account",
                "automatic_tax.liability.account": "account",
                "parent.subscription_details.subscription": "subscription",
                "shipping_cost.shipping_rate": "shipping_rate", "total_discount_amounts.discount": "discount",
                "total_pretax_credit_amounts.discount": "discount",
                # The sandbox still renders the pre-2025 top-level `subscription`; Stripe expanded it then.
                "subscription": "subscription",
                # Removed from invoices at the pinned version (replaced by `total_taxes`), yet extractors
                # pinned to older versions send it: accepted, and absent here as the field is.
                "total_tax_amounts.tax_rate": "tax_rate"},
    "line_item": {"discounts": "discount", "discount_amounts.discount": "discount",
                  "pretax_credit_amounts.discount": "discount", "pricing.price_details.price": "price",
                  "subscription": "subscription"},
    "subscription": {"customer": "customer", "latest_invoice": "invoice", "default_payment_method": "payment_method",
                     "default_source": "source", "discounts": "discount", "application": "application",
                     "on_behalf_of": "account", "pending_setup_intent": "setup_intent",
                     "schedule": "subscription_schedule", "test_clock": "test_clock",
                     "transfer_data.destination": "account", "automatic_tax.liability.account": "account",
                     "invoice_settings.issuer.account": "account", "invoice_settings.account_tax_ids": "tax_id",
                     "pending_update.discounts": "discount", "billing_schedules.applies_to.price": "price"},
    "subscription_item": {"discounts": "discount"},
    "refund": {"charge": "charge", "customer": "customer", "balance_transaction": "balance_transaction",
               "failure_balance_transaction": "balance_transaction",
               "payment_intent": "payment_intent", "payment_method": "payment_method",
               "source_transfer_reversal": "transfer_reversal", "transfer_reversal": "transfer_reversal"},
    "plan": {"product": "product"},
    "price": {"product": "product"},
    "product": {"default_price": "price", "tax_code": "tax_code"},
    "discount": {"customer": "customer", "promotion_code": "promotion_code", "source.coupon": "coupon"},
    "tax_id": {"customer": "customer", "owner.customer": "customer", "owner.account": "account",
               "owner.application": "application"},
    "payment_intent": {"customer": "customer", "latest_charge": "charge", "payment_method": "payment_method",
                       "on_behalf_of": "account", "application": "application", "review": "review"},
    "payment_method": {"customer": "customer"},
    "account": {"settings.branding.icon": "file", "settings.branding.logo": "file",
                "settings.invoices.default_account_tax_ids": "tax_id"},
}

#: object type -> field left out unless expanded -> the object type of its value (a list object of them).
INCLUDABLE: dict[str, dict[str, str]] = {
    "charge": {"refunds": "refund"},
    "customer": {"sources": "source", "subscriptions": "subscription", "tax_ids": "tax_id"},
    # A hash, not a list object: {client_secret, type} of the PaymentIntent made at finalization.
    "invoice": {"confirmation_secret": "confirmation_secret"},
    "plan": {"tiers": "tier"},
    "price": {"tiers": "tier"},
}

#: Objects always embedded whole: type -> field -> type (list objects are walked through `data`).
EMBEDDED: dict[str, dict[str, str]] = {
    "invoice": {"lines": "line_item"},
    "subscription": {"items": "subscription_item"},
    "subscription_item": {"plan": "plan", "price": "price"},
}

#: Paths an older API version had, which extractors pinned to it still send: accepted, changing nothing.
LEGACY_NOOP: dict[str, frozenset[str]] = {
    # `subscription.plan` (single-item subscriptions) was removed; `data.plan.tiers` is still sent.
    "subscription": frozenset({"plan", "plan.tiers", "plan.product"}),
}


def refusal(expansion: str) -> Exception:
    from mbi_widgets.sandbox.api import StripeHTTPError  # api imports this module

    return StripeHTTPError(400, f"This property cannot be expanded ({expansion}).", param="expand")


def check_path(object_type: str, segments: list[str], expansion: str) -> None:
    """Raises Stripe's 400 unless `segments` is a path Stripe expands on `object_type`."""
    if ".".join(segments) in LEGACY_NOOP.get(object_type, ()):
        return
    kind, prefix, last_expands = object_type, "", False
    index = 0
    while index < len(segments):
        path = prefix + segments[index]
        expandable, includable = EXPANDABLE.get(kind, {}), INCLUDABLE.get(kind, {})
        embedded = EMBEDDED.get(kind, {})
        if path in expandable or path in includable:
            kind, prefix, last_expands = expandable.get(path) or includable[path], "", True
            if path in includable and kind != "tier" and index + 1 < len(segments):
                if segments[index + 1] != "data":  # a list object is walked through its `data`
                    raise refusal(expansion)
                index += 1
        elif path in embedded:  # always there: Stripe accepts expanding it, and it changes nothing
            kind, prefix, last_expands = embedded[path], "", True
            if path in ("lines", "items") and index + 1 < len(segments):
                if segments[index + 1] != "data":  # a list object is walked through its `data`
                    raise refusal(expansion)
                index += 1
        elif any(key.startswith(path + ".") for key in (*expandable, *includable)):
            prefix, last_expands = path + ".", False
        else:
            raise refusal(expansion)
        index += 1
    if not last_expands:
        raise refusal(expansion)


@dataclass(frozen=True)
class Plan:
    """The expansions of one request, checked: each a list of path segments from the object."""

    paths: tuple[tuple[str, ...], ...]

    @property
    def splices_only(self) -> bool:
        return all(path in (("customer",), ("refunds",)) for path in self.paths)


def plan(object_type: str, expansions: list[str], *, listing: bool) -> Plan | None:
    """The checked expansions for a list (`data.x`) or a retrieve (`x`); None when nothing is expanded."""
    paths: list[tuple[str, ...]] = []
    for expansion in expansions:
        segments = expansion.split(".")
        if len(segments) > MAX_DEPTH:  # counted as Stripe counts: `data.invoice.subscription.customer` is 4
            from mbi_widgets.sandbox.api import StripeHTTPError

            raise StripeHTTPError(400, f"You cannot expand more than {MAX_DEPTH} levels of a property. "
                                  f"Property: {expansion}", param="expand")
        if listing:
            if segments[0] != "data" or len(segments) < 2:
                raise refusal(expansion)
            segments = segments[1:]
        if any(not segment for segment in segments):
            raise refusal(expansion)
        check_path(object_type, segments, expansion)
        if ".".join(segments) not in LEGACY_NOOP.get(object_type, ()):
            paths.append(tuple(segments))
    return Plan(tuple(dict.fromkeys(paths))) if paths else None


# --- rendering -------------------------------------------------------------------------------------

def bodies(dataset: "Dataset", records: list["Record"], expansions: Plan | None) -> list[bytes]:
    """The JSON of each record with `expansions` applied."""
    if expansions is None:
        return [record.body for record in records]
    splices = expansions.splices_only
    resolver = Resolver(dataset)
    out = []
    for record in records:
        if splices and _splicable(record, expansions):
            out.append(_spliced(dataset, record, expansions))
            continue
        obj = orjson.loads(record.body)
        for path in expansions.paths:
            _walk(obj, list(path), obj.get("object", ""), "", resolver)
        out.append(orjson.dumps(obj))
    return out


def _splicable(record: "Record", expansions: Plan) -> bool:
    """Whether the byte splices apply: the record knows where its customer sits, and is a charge for refunds."""
    if ("customer",) in expansions.paths and record.customer_span is None and record.attrs.get("customer", 1):
        return False
    return ("refunds",) not in expansions.paths or record.id.startswith(("ch_", "py_"))


def _spliced(dataset: "Dataset", record: "Record", expansions: Plan) -> bytes:
    from mbi_widgets.sandbox.store import with_customer

    body = record.body
    if ("customer",) in expansions.paths:
        customer_id = record.attrs.get("customer")
        found = dataset.collections["customers"].get(customer_id) if isinstance(customer_id, str) else None
        # A deleted customer expands to its stub ({"id", "object", "deleted": true}), as in Stripe.
        stub = found.body if found else dataset.deleted.get("customers", {}).get(customer_id)  # type: ignore[arg-type]
        body = with_customer(record, stub)
    if ("refunds",) in expansions.paths:
        body = body[:-1] + b',"refunds":' + refunds_list_bytes(dataset, record.id) + b"}"
    return body


def refunds_list_bytes(dataset: "Dataset", charge_id: str) -> bytes:
    """A charge's embedded `refunds` list object (its first 10 refunds, newest first)."""
    collection = dataset.children["charge_refunds"].get(charge_id)
    records = collection.records if collection is not None else []
    return b"".join((b'{"object":"list","data":[', b",".join(r.body for r in records[:EMBED_LIMIT]),
                     b'],"has_more":', b"true" if len(records) > EMBED_LIMIT else b"false",
                     b',"url":"/v1/charges/', charge_id.encode(), b'/refunds"}'))


def _walk(node: Any, segments: list[str], kind: str, prefix: str, resolver: "Resolver") -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, segments, kind, prefix, resolver)
        return
    if not isinstance(node, dict) or not segments:
        return
    if node.get("object") == "list":
        for item in node.get("data", []):
            _walk(item, segments[1:], item.get("object", kind) if isinstance(item, dict) else kind, "", resolver)
        return
    if isinstance(node.get("object"), str):  # an embedded object (a nested hash has no `object`)
        kind, prefix = node["object"], ""
    segment, rest = segments[0], segments[1:]
    path = prefix + segment
    if path in INCLUDABLE.get(kind, {}):
        node[segment] = resolver.include(kind, segment, node)
    elif path in EXPANDABLE.get(kind, {}):
        target = EXPANDABLE[kind][path]
        value = node.get(segment)
        if isinstance(value, str):
            node[segment] = resolver.fetch(target, value)
        elif isinstance(value, list):
            node[segment] = [resolver.fetch(target, v) if isinstance(v, str) else v for v in value]
    elif segment not in node:
        return
    else:  # a nested hash or an embedded object: go on inside it
        _walk(node[segment], rest, kind, path + ".", resolver)
        return
    if rest:
        _walk(node[segment], rest, EXPANDABLE.get(kind, {}).get(path) or INCLUDABLE[kind][path], "", resolver)


class Resolver:
    """Finds objects by type and id in a dataset (and the objects the sandbox derives on demand)."""

    def __init__(self, dataset: "Dataset") -> None:
        self.dataset = dataset

    def fetch(self, kind: str, object_id: str) -> Any:
        """The object `object_id` of type `kind`, or the id itself when the sandbox has no such object."""
        collection = _COLLECTIONS.get(kind)
        if collection is not None:
            record = self.dataset.collections[collection].get(object_id)
            if record is not None:
                return orjson.loads(record.body)
            stub = self.dataset.deleted.get(collection, {}).get(object_id)
            return orjson.loads(stub) if stub else object_id
        derive = _DERIVED.get(kind)
        found = derive(self.dataset).get(object_id) if derive is not None else None
        return found if found is not None else object_id

    def include(self, kind: str, field: str, obj: dict) -> Any:
        if kind == "charge":
            return orjson.loads(refunds_list_bytes(self.dataset, obj["id"]))
        if kind in ("plan", "price"):
            return None  # every sandbox price is per_unit: Stripe answers `tiers: null`
        if kind == "invoice":
            return confirmation_secret(obj)
        object_id = obj["id"]
        url = f"/v1/customers/{object_id}/{field}"
        if field == "subscriptions":  # Stripe embeds the customer's subscriptions that have not ended
            found = [orjson.loads(r.body) for r in _cached("subscriptions_by_customer", _subscriptions_by_customer)(
                self.dataset).get(object_id, []) if r.attrs["status"] not in ("canceled", "incomplete_expired")]
        elif field == "tax_ids":
            found = [tax_id for tax_id in tax_ids(self.dataset).values() if tax_id["customer"] == object_id]
        else:  # sources: sandbox customers pay with PaymentMethods, as current integrations do
            found = []
        return {"object": "list", "data": found[:EMBED_LIMIT], "has_more": len(found) > EMBED_LIMIT, "url": url}


_COLLECTIONS = {"customer": "customers", "charge": "charges", "invoice": "invoices", "subscription": "subscriptions",
                "plan": "plans", "price": "prices", "product": "products", "coupon": "coupons", "refund": "refunds"}


# --- objects derived from the generated facts --------------------------------------------------------

def _cached(name: str, build: Callable[["Dataset"], dict[str, dict]]) -> Callable[["Dataset"], dict[str, dict]]:
    def get(dataset: "Dataset") -> dict[str, dict]:
        found = dataset.derived.get(name)
        if found is None:
            found = dataset.derived[name] = build(dataset)
        return found
    return get


def _objects(dataset: "Dataset", name: str) -> list[dict]:
    return [orjson.loads(record.body) for record in dataset.collections[name].records]


def _discounts(dataset: "Dataset") -> dict[str, dict]:
    """A discount per subscription with a coupon (its `discounts` entry), as Stripe creates one."""
    found: dict[str, dict] = {}
    for sub in _objects(dataset, "subscriptions"):
        for discount_id in sub["discounts"]:
            found[discount_id] = {
                "id": discount_id, "object": "discount", "checkout_session": None, "customer": sub["customer"],
                "customer_account": None, "end": None, "invoice": None, "invoice_item": None,
                "promotion_code": None, "source": {"coupon": dataset.discount_coupons.get(discount_id),
                                                   "type": "coupon"},
                "start": sub["start_date"], "subscription": sub["id"], "subscription_item": None}
    return found


def _subscriptions_by_customer(dataset: "Dataset") -> dict[str, list["Record"]]:
    found: dict[str, list] = {}
    for record in dataset.collections["subscriptions"].records:
        found.setdefault(record.attrs["customer"], []).append(record)  # type: ignore[arg-type]
    return found


_EU_VAT = {"DE": "DE", "FR": "FR"}
_TAX_TYPES = {"GB": "gb_vat", "AU": "au_abn", "CA": "ca_bn", "US": "us_ein", "DE": "eu_vat", "FR": "eu_vat"}


def _tax_ids(dataset: "Dataset") -> dict[str, dict]:
    """A tax ID for about one customer in four (business customers), derived from the customer's id."""
    found: dict[str, dict] = {}
    for record in dataset.collections["customers"].records:
        digest = zlib.crc32(record.id.encode())
        if digest % 4:
            continue
        customer = orjson.loads(record.body)
        country = (customer.get("address") or {}).get("country") or "US"
        number = f"{digest % 1_000_000_000:09d}"
        tax_id = "txi_" + f"{zlib.crc32(b'txi' + record.id.encode()):010d}{record.id[-14:]}"
        found[tax_id] = {
            "id": tax_id, "object": "tax_id", "country": country, "created": customer["created"],
            "customer": record.id, "customer_account": None, "livemode": False,
            "owner": {"customer": record.id, "customer_account": None, "type": "customer"},
            "type": _TAX_TYPES.get(country, "eu_vat"), "value": f"{_EU_VAT.get(country, '')}{number}",
            "verification": {"status": "verified", "verified_address": None, "verified_name": customer["name"]}}
    return found


def _payment_methods(dataset: "Dataset") -> dict[str, dict]:
    """Each customer's card, as the PaymentMethod its charges and subscriptions name."""
    found: dict[str, dict] = {}
    for charge in _objects(dataset, "charges"):
        card = charge["payment_method_details"]["card"]
        found[charge["payment_method"]] = {
            "id": charge["payment_method"], "object": "payment_method", "allow_redisplay": "unspecified",
            "billing_details": charge["billing_details"],
            "card": {"brand": card["brand"], "checks": card["checks"], "country": card["country"],
                     "display_brand": card["brand"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
                     "fingerprint": card["fingerprint"], "funding": card["funding"], "generated_from": None,
                     "last4": card["last4"], "networks": {"available": [card["brand"]], "preferred": None},
                     "regulated_status": "unregulated", "three_d_secure_usage": {"supported": True},
                     "wallet": None},
            "created": charge["created"] if charge["payment_method"] not in found
            else found[charge["payment_method"]]["created"],
            "customer": charge["customer"], "customer_account": None, "livemode": False, "metadata": {},
            "type": "card"}
    return found


def _fee(amount: int) -> int:
    return round(amount * 0.029) + 30


def _balance_transactions(dataset: "Dataset") -> dict[str, dict]:
    """The balance transaction of each successful charge (Stripe's 2.9% + 30 fee) and of each refund."""
    found: dict[str, dict] = {}
    for charge in _objects(dataset, "charges"):
        txn = charge["balance_transaction"]
        if txn:
            fee = _fee(charge["amount"])
            found[txn] = _transaction(txn, charge["amount"], fee, charge["created"], charge["currency"],
                                      charge["description"], charge["id"], "charge")
    for refund in _objects(dataset, "refunds"):
        txn = refund["balance_transaction"]
        if txn:
            found[txn] = _transaction(txn, -refund["amount"], 0, refund["created"], refund["currency"],
                                      "REFUND FOR CHARGE", refund["id"], "refund")
    return found


def _transaction(txn: str, amount: int, fee: int, created: int, currency: str, description: str | None,
                 source: str, type_: str) -> dict:
    return {"id": txn, "object": "balance_transaction", "amount": amount, "available_on": created + 2 * 86_400,
            "balance_type": "payments", "created": created, "currency": currency, "description": description,
            "exchange_rate": None, "fee": fee,
            "fee_details": [{"amount": fee, "application": None, "currency": currency,
                             "description": "Stripe processing fees", "type": "stripe_fee"}] if fee else [],
            "net": amount - fee, "reporting_category": type_, "source": source, "status": "available",
            "type": type_}


def _payment_intents(dataset: "Dataset") -> dict[str, dict]:
    """The PaymentIntent behind each charge (the charge is its latest)."""
    found: dict[str, dict] = {}
    for charge in reversed(_objects(dataset, "charges")):  # oldest first: the newest charge wins
        paid = charge["paid"]
        found[charge["payment_intent"]] = {
            "id": charge["payment_intent"], "object": "payment_intent", "amount": charge["amount"],
            "amount_capturable": 0, "amount_details": {"tip": {}}, "amount_received": charge["amount"] if paid else 0,
            "application": None, "application_fee_amount": None,
            "automatic_payment_methods": None, "canceled_at": None, "cancellation_reason": None,
            "capture_method": "automatic", "client_secret": None, "confirmation_method": "automatic",
            "created": charge["created"], "currency": charge["currency"], "customer": charge["customer"],
            "customer_account": None, "description": charge["description"], "excluded_payment_method_types": None,
            "last_payment_error": None if paid else {"code": charge["failure_code"],
                                                     "message": charge["failure_message"], "type": "card_error"},
            "latest_charge": charge["id"], "livemode": False, "metadata": {}, "next_action": None,
            "on_behalf_of": None, "payment_method": charge["payment_method"],
            "payment_method_configuration_details": None, "payment_method_options": {},
            "payment_method_types": ["card"], "processing": None, "receipt_email": charge["receipt_email"],
            "review": None, "setup_future_usage": None, "shipping": None, "source": None,
            "statement_descriptor": None, "statement_descriptor_suffix": None,
            "status": "succeeded" if paid else "requires_payment_method", "transfer_data": None,
            "transfer_group": None}
    return found


def confirmation_secret(invoice: dict) -> dict | None:
    """An invoice's `confirmation_secret`: its PaymentIntent's client secret once finalized (null for a draft),
    derived from the invoice's id as Stripe's is random: the same answer on every request."""
    if invoice.get("status") in (None, "draft"):
        return None
    digest = hashlib.sha256(b"confirmation_secret:" + invoice["id"].encode()).hexdigest()
    return {"client_secret": f"pi_{digest[:24]}_secret_{digest[24:49]}", "type": "payment_intent"}


def _accounts(dataset: "Dataset") -> dict[str, dict]:
    account = orjson.loads(dataset.account)
    return {account["id"]: account}


tax_ids = _cached("tax_ids", _tax_ids)
_DERIVED: dict[str, Callable[["Dataset"], dict[str, dict]]] = {
    "discount": _cached("discounts", _discounts), "tax_id": tax_ids,
    "payment_method": _cached("payment_methods", _payment_methods),
    "balance_transaction": _cached("balance_transactions", _balance_transactions),
    "payment_intent": _cached("payment_intents", _payment_intents), "account": _accounts,
}
