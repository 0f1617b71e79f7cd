"""Pre-serialised collections of one account's Stripe objects, and Stripe's list semantics over them.

Objects are rendered and serialised once, when the dataset is built; serving a list page only
slices and joins bytes. A record keeps the few attributes lists filter on, and where its
`customer` id sits in the bytes so that `expand[]=data.customer` is a splice, not a re-render.
"""
from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import orjson

from mbi_widgets.sandbox import render
from mbi_widgets.sandbox.generator import DAY, EVENT_WINDOW_DAYS, History

_CUSTOMER_MARK = "\x01customer-reference\x01"
_CUSTOMER_MARK_JSON = orjson.dumps(_CUSTOMER_MARK)


@dataclass(slots=True)
class Record:
    id: str
    created: int
    body: bytes
    attrs: dict[str, object] = field(default_factory=dict)
    #: Byte span of the top-level `customer` value inside `body`, for expansion.
    customer_span: tuple[int, int] | None = None


def serialise(obj: dict, attrs: dict[str, object] | None = None, *, expandable: bool = False) -> Record:
    """A record for a rendered object; `expandable` remembers where its customer id sits."""
    attrs = attrs or {}
    if not expandable or obj.get("customer") is None:
        return Record(obj["id"], obj.get("created", 0), orjson.dumps(obj), attrs)
    customer_id = obj["customer"]
    obj["customer"] = _CUSTOMER_MARK
    raw = orjson.dumps(obj)
    obj["customer"] = customer_id
    start = raw.index(_CUSTOMER_MARK_JSON)
    value = orjson.dumps(customer_id)
    body = raw[:start] + value + raw[start + len(_CUSTOMER_MARK_JSON):]
    return Record(obj["id"], obj.get("created", 0), body, attrs, (start, start + len(value)))


@dataclass(slots=True)
class Page:
    records: list[Record]
    has_more: bool


class Collection:
    """Records in list order (newest first for top-level lists, Stripe's order for sub-lists)."""

    def __init__(self, records: Iterable[Record], *, newest_first: bool = True,
                 hidden: Iterable[Record] = ()) -> None:
        items = list(records)
        if newest_first:
            items.sort(key=lambda r: (r.created, r.id), reverse=True)
        self.records = items
        self.position = {record.id: index for index, record in enumerate(items)}
        self._neg_created = [-record.created for record in items] if newest_first else None
        #: Objects that exist (retrieve finds them) but do not list yet (Stripe's listing lag).
        self.hidden = {record.id: record for record in hidden}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, object_id: str) -> Record | None:
        index = self.position.get(object_id)
        return self.hidden.get(object_id) if index is None else self.records[index]

    def listed(self, object_id: str) -> bool:
        return object_id in self.position

    def created_bounds(self, gt: int | None, gte: int | None, lt: int | None, lte: int | None) -> tuple[int, int]:
        """The index range [lo, hi) of records whose `created` lies in the window."""
        lo, hi = 0, len(self.records)
        if self._neg_created is None:
            return lo, hi
        neg = self._neg_created
        if lte is not None:
            lo = max(lo, bisect.bisect_left(neg, -lte))
        if lt is not None:
            lo = max(lo, bisect.bisect_right(neg, -lt))
        if gte is not None:
            hi = min(hi, bisect.bisect_right(neg, -gte))
        if gt is not None:
            hi = min(hi, bisect.bisect_left(neg, -gt))
        return lo, hi

    def page(self, *, limit: int, lo: int = 0, hi: int | None = None, starting_after: str | None = None,
             ending_before: str | None = None, keep: Callable[[Record], bool] | None = None) -> Page:
        """One list page. Cursors must exist (the caller checks); `keep` filters records."""
        hi = len(self.records) if hi is None else hi
        if starting_after is not None:
            lo = max(lo, self.position[starting_after] + 1)
        if ending_before is not None:
            hi = min(hi, self.position[ending_before])
            return self._page_backward(limit, lo, hi, keep)
        if keep is None:
            return Page(self.records[lo:min(hi, lo + limit)], lo + limit < hi)
        found: list[Record] = []
        for index in range(lo, hi):
            record = self.records[index]
            if keep(record):
                if len(found) == limit:
                    return Page(found, True)
                found.append(record)
        return Page(found, False)

    def _page_backward(self, limit: int, lo: int, hi: int, keep: Callable[[Record], bool] | None) -> Page:
        if keep is None:
            start = max(lo, hi - limit)
            return Page(self.records[start:hi] if hi > lo else [], start > lo)
        found: list[Record] = []
        for index in range(hi - 1, lo - 1, -1):
            record = self.records[index]
            if keep(record):
                if len(found) == limit:
                    found.reverse()
                    return Page(found, True)
                found.append(record)
        found.reverse()
        return Page(found, False)


@dataclass
class Dataset:
    """Everything one account serves at one moment: top-level collections and per-parent sub-lists."""

    account: bytes
    collections: dict[str, Collection]
    #: kind -> parent id -> sub-list, e.g. children["invoice_lines"]["in_..."].
    children: dict[str, dict[str, Collection]]
    now: int
    #: resource -> id -> what retrieving a deleted object answers: a body (customers) or None (404).
    deleted: dict[str, dict[str, bytes | None]] = field(default_factory=dict)
    #: Discount id -> the coupon it applies (discount objects are derived when expanded).
    discount_coupons: dict[str, str] = field(default_factory=dict)
    #: Objects derived on first expansion (payment methods, balance transactions...): kind -> id -> object.
    derived: dict[str, dict] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return len(self.collections[name])


def listing_lag(object_id: str, lag: int) -> int:
    """Seconds after `created` at which an object starts to appear in lists (0 to `lag`, per object)."""
    return zlib.crc32(object_id.encode()) % (lag + 1) if lag > 0 else 0


def build_dataset(history: History, at: int | None = None, *, lag: int = 0,
                  events: dict[str, Record] | None = None) -> Dataset:
    """Renders a history as of `at` (default: its start) and serialises every object once.

    Objects created later do not exist yet; deleted ones vanish from lists; events older than
    Stripe's 30 days are gone. With `lag`, an object lists only some seconds after its `created`.
    `events` caches serialised events across moments (an event never changes).
    """
    now = history.now if at is None else at
    events = {} if events is None else events
    lines: dict[str, Collection] = {}
    items: dict[str, Collection] = {}
    refunds_by_charge: dict[str, Collection] = {}
    deleted: dict[str, dict[str, bytes | None]] = {"customers": {}, "coupons": {}, "plans": {}, "prices": {},
                                                   "products": {}}

    def exists(subject: object, name: str) -> bool:
        created = subject.created  # type: ignore[attr-defined]
        if created > now:
            return False
        gone = getattr(subject, "deleted_at", None)
        if gone is not None and gone <= now:
            deleted[name][subject.id] = (orjson.dumps(render.deleted(subject))  # type: ignore[attr-defined,arg-type]
                                         if name == "customers" else None)
            return False
        return True

    def collection(records: Iterable[Record]) -> Collection:
        shown, hidden = [], []
        for record in records:
            (shown if record.created + listing_lag(record.id, lag) <= now else hidden).append(record)
        return Collection(shown, hidden=hidden)

    customers = [serialise(render.customer(c, now), {"email": c.attrs(now)["email"], "test_clock": None})
                 for c in history.customers if exists(c, "customers")]
    charges = []
    all_refunds = []
    for ch in history.charges:
        if ch.created > now:
            continue
        body = render.charge(ch, now)
        del body["refunds"]  # includable: left out unless `expand[]=refunds` (API version 2022-11-15 on)
        charges.append(serialise(body, {"customer": ch.customer.id, "payment_intent": ch.payment_intent,
                                        "transfer_group": None, "status": body["status"]}, expandable=True))
        refunds = ch.refunds_at(now)
        if refunds:
            refunds_by_charge[ch.id] = Collection(
                [serialise(render.refund(r)) for r in reversed(refunds)], newest_first=False)
            all_refunds += refunds
    invoices = []
    for inv in history.invoices:
        if inv.created > now:
            continue
        sub_id = inv.subscription.id if inv.subscription else None
        body = render.invoice(inv, now)
        invoices.append(serialise(body, {"customer": inv.customer.id, "status": body["status"],
                                         "subscription": sub_id, "collection_method": body["collection_method"],
                                         "due_date": body["due_date"]}, expandable=True))
        lines[inv.id] = Collection([serialise(render.invoice_line(line, inv)) for line in inv.lines],
                                   newest_first=False)
    subscriptions = []
    for sub in history.subscriptions:
        if sub.created > now:
            continue
        body = render.subscription(sub, now)
        prices = {item.plan.id for item in sub.items}
        subscriptions.append(serialise(body, {"customer": sub.customer.id, "status": body["status"],
                                              "prices": prices, "collection_method": body["collection_method"]},
                                       expandable=True))
        items[sub.id] = Collection([serialise(render.subscription_item(item, sub, now)) for item in sub.items],
                                   newest_first=False)
    window_start = now - EVENT_WINDOW_DAYS * DAY
    event_records = []
    for e in history.events:
        if window_start <= e.created <= now:
            record = events.get(e.id)
            if record is None:
                # Sandbox events have no webhook endpoints, so no delivery ever failed.
                record = events[e.id] = serialise(render.event(e), {"type": e.type, "delivery_success": True})
            event_records.append(record)
    plans = [p for p in history.plans if exists(p, "plans")]
    for p in history.plans:
        exists(p, "prices")
    collections = {
        "customers": collection(customers),
        "charges": collection(charges),
        "coupons": collection(serialise(render.coupon(c, now)) for c in history.coupons if exists(c, "coupons")),
        "invoices": collection(invoices),
        "plans": collection(serialise(render.plan(p), {"product": p.product.id, "active": p.active}) for p in plans),
        "prices": collection(serialise(render.price(p), {"product": p.product.id, "active": p.active,
                                                         "currency": p.currency, "type": "recurring",
                                                         "lookup_key": p.lookup_key})
                             for p in plans),
        "products": collection(serialise(render.product(p, now), {"active": p.active, "id": p.id, "shippable": None,
                                                                  "url": None})
                               for p in history.products if exists(p, "products")),
        "subscriptions": collection(subscriptions),
        "refunds": collection(serialise(render.refund(r), {"charge": r.charge.id}) for r in all_refunds),
        "events": collection(event_records),
    }
    return Dataset(
        account=orjson.dumps(render.account(history.account)),
        collections=collections,
        children={"invoice_lines": lines, "subscription_items": items, "charge_refunds": refunds_by_charge},
        now=now,
        deleted=deleted,
        discount_coupons={sub.discount_id: sub.coupon.id for sub in history.subscriptions
                          if sub.discount_id and sub.coupon and sub.created <= now},
    )


def list_body(url: str, records: list[Record], has_more: bool,
              expand_customer: Callable[[Record], bytes] | None = None, *, bodies: list[bytes] | None = None) -> bytes:
    """The bytes of a Stripe list object over `records` (or over `bodies`, their expanded JSON)."""
    if bodies is None:
        bodies = [record.body for record in records] if expand_customer is None else [expand_customer(r) for r in records]
    return b"".join((b'{"object":"list","data":[', b",".join(bodies), b'],"has_more":',
                     b"true" if has_more else b"false", b',"url":', orjson.dumps(url), b"}"))


def with_customer(record: Record, customer_body: bytes | None) -> bytes:
    """`record.body` with its customer id replaced by the customer object."""
    if record.customer_span is None or customer_body is None:
        return record.body
    start, end = record.customer_span
    return record.body[:start] + customer_body + record.body[end:]
