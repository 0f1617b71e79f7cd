"""The expected Stripe tables: names, columns, dtypes and keys, derived from stripe-python's typed classes.

stripe-python's resource modules are generated from Stripe's OpenAPI spec for the pinned API
version: each field is a class annotation followed by its documentation string. Reading them
with `ast` gives every expected field with its type, so an empty account yields the same
columns and dtypes as a busy one, without a hand-typed list.

Shaping rules: nested objects are flattened with `__`; references (expandable, or another
resource embedded whole, like a subscription item's `plan`) are kept as the id; lists (other than those turned into child tables), `metadata` and free-form hashes are JSON
text; Unix timestamps are timezone-aware UTC datetimes; integers are nullable Int64 (amounts are
in the currency's minor unit); booleans are nullable booleans; ids and enums are strings.
Secrets are never columns: a field named in `SENSITIVE_FIELDS` (`client_secret`, an invoice's
`confirmation_secret`, ...) is left out at any depth, and the shaper drops it from answers.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field
from functools import lru_cache

from mbi_widgets.errors import MbiError

#: pandas dtypes per column kind.
DTYPES = {
    "string": "string",
    "id": "string",
    "int": "Int64",
    "float": "Float64",
    "bool": "boolean",
    "timestamp": "datetime64[ns, UTC]",
    "json": "string",
}

#: A nested object whose flattened form would exceed this many columns is kept as JSON text
#: (e.g. `payment_method_details`, one sub-object per payment method type), except the
#: sub-objects named in `_ALWAYS_FLATTEN`, which analysts query column by column.
_MAX_FLAT_COLUMNS = 40
_ALWAYS_FLATTEN = {("payment_method_details", "card"), ("payment_method_details", "type")}

#: Fields holding a secret, by name, at any depth: never a column, and dropped by the shaper wherever an
#: answer carries them (also inside Stripe objects kept as JSON text). A client secret lets whoever holds it
#: confirm a payment or open a session from a browser (PaymentIntent, SetupIntent, Source, Checkout and
#: Customer sessions; an invoice's includable `confirmation_secret` wraps its PaymentIntent's); `secret` and
#: `signing_secret` are webhook signing secrets and Terminal connection tokens. Every name ends in "secret":
#: the shaper's test for JSON text relies on it.
SENSITIVE_FIELDS: frozenset[str] = frozenset({"client_secret", "confirmation_secret", "secret", "signing_secret"})

_TIMESTAMP_WORDS = ("unix epoch", "seconds since the epoch", "unix timestamp", "measured in seconds since")


class UnknownTableError(MbiError, KeyError):
    def __str__(self) -> str:  # KeyError would repr the message
        return str(self.args[0])


@dataclass(frozen=True)
class Column:
    name: str
    path: tuple[str, ...]
    kind: str

    @property
    def dtype(self) -> str:
        return DTYPES[self.kind]


@dataclass(frozen=True)
class TableSchema:
    """One expected table: where its rows come from and what columns they have."""

    name: str
    title: str
    resource: str
    columns: tuple[Column, ...]
    primary_key: str = "id"
    #: For child tables: the parent table, the parent's embedded list field, the id column added.
    parent: str | None = None
    embedded_field: str | None = None
    parent_key: str | None = None
    #: Extra parameters every list request sends (e.g. status=all for subscriptions).
    list_params: dict[str, str] = field(default_factory=dict)
    #: Embedded lists of this table's objects that become child tables.
    children: tuple[str, ...] = ()
    description: str = ""
    #: The columns an analyst reads first (what the description names), in that order: previews show them
    #: first. The DataFrame keeps the schema's order (`id` first).
    key_columns: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def dtypes(self) -> dict[str, str]:
        return {column.name: column.dtype for column in self.columns}

    @property
    def endpoint(self) -> str:
        return f"/v1/{self.name}"

    def child_endpoint(self, parent_id: str) -> str:
        parent = self.parent or ""
        if self.embedded_field == "items":
            return "/v1/subscription_items"
        return f"/v1/{parent}/{parent_id}/{self.embedded_field}"


# --- reading stripe-python's generated classes -------------------------------------------------

@dataclass
class _Field:
    name: str
    annotation: ast.expr
    doc: str


@dataclass
class _ClassInfo:
    fields: list[_Field]
    nested: dict[str, ast.ClassDef]


def _class_info(node: ast.ClassDef) -> _ClassInfo:
    fields: list[_Field] = []
    nested: dict[str, ast.ClassDef] = {}
    body = node.body
    for index, item in enumerate(body):
        if isinstance(item, ast.ClassDef):
            nested[item.name] = item
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            if _is_classvar(item.annotation):
                continue
            doc = ""
            following = body[index + 1] if index + 1 < len(body) else None
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str):
                doc = following.value.value
            fields.append(_Field(item.target.id, item.annotation, doc))
    return _ClassInfo(fields, nested)


def _is_classvar(annotation: ast.expr) -> bool:
    return isinstance(annotation, ast.Subscript) and _name(annotation.value) == "ClassVar"


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ""


def _args(node: ast.Subscript) -> list[ast.expr]:
    inner = node.slice
    return list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]


@lru_cache(maxsize=None)
def _resource_class(module: str, class_name: str) -> ast.ClassDef:
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node
    raise LookupError(f"{class_name} not found in {module}")


class _Flattener:
    """Turns a class's annotations into columns, resolving nested classes by lexical scope."""

    def __init__(self) -> None:
        self.columns: list[Column] = []

    def walk(self, node: ast.ClassDef, scopes: list[ast.ClassDef], prefix: tuple[str, ...],
             skip: frozenset[str] = frozenset()) -> None:
        info = _class_info(node)
        scopes = [*scopes, node]
        for fld in info.fields:
            if fld.name in skip or fld.name in SENSITIVE_FIELDS:
                continue
            path = (*prefix, fld.name)
            nested = self._nested_class(fld.annotation, scopes)
            if nested is not None:
                width = _flat_width(nested, scopes)
                if width <= _MAX_FLAT_COLUMNS or path in _ALWAYS_FLATTEN:
                    self.walk(nested, scopes, path)
                    continue
                if prefix == () and path[0] == "payment_method_details":
                    self._walk_partial(nested, scopes, path)
                    continue
                self.columns.append(Column("__".join(path), path, "json"))
                continue
            self.columns.append(Column("__".join(path), path, _kind(fld.name, fld.annotation, fld.doc)))

    def _walk_partial(self, node: ast.ClassDef, scopes: list[ast.ClassDef], prefix: tuple[str, ...]) -> None:
        """Flattens only the sub-objects named in _ALWAYS_FLATTEN; the rest stays as one JSON column."""
        info = _class_info(node)
        inner_scopes = [*scopes, node]
        kept = set()
        for fld in info.fields:
            path = (*prefix, fld.name)
            if path not in _ALWAYS_FLATTEN:
                continue
            kept.add(fld.name)
            nested = self._nested_class(fld.annotation, inner_scopes)
            if nested is not None:
                self.walk(nested, inner_scopes, path)
            else:
                self.columns.append(Column("__".join(path), path, _kind(fld.name, fld.annotation, fld.doc)))
        rest = (*prefix, "other")
        self.columns.append(Column("__".join(rest), rest, "json"))

    @staticmethod
    def _nested_class(annotation: ast.expr, scopes: list[ast.ClassDef]) -> ast.ClassDef | None:
        inner = _unwrap_optional(annotation)
        name = _name(inner)
        if not name:
            return None
        for scope in reversed(scopes):
            nested = _class_info(scope).nested.get(name)
            if nested is not None:
                return nested
        return None


def _flat_width(node: ast.ClassDef, scopes: list[ast.ClassDef]) -> int:
    flattener = _Flattener()
    flattener.walk(node, scopes, ())
    return len(flattener.columns)


def _unwrap_optional(annotation: ast.expr) -> ast.expr:
    if isinstance(annotation, ast.Subscript) and _name(annotation.value) == "Optional":
        return _args(annotation)[0]
    return annotation


def _kind(name: str, annotation: ast.expr, doc: str) -> str:
    inner = _unwrap_optional(annotation)
    if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
        return "id"  # another resource embedded whole: kept as its id, to join with its own table
    if isinstance(inner, ast.Name):
        if inner.id == "int":
            return "timestamp" if _is_timestamp(name, doc) else "int"
        if inner.id == "float":
            return "float"
        if inner.id == "bool":
            return "bool"
        if inner.id in ("str", "Decimal"):  # Stripe sends decimals as strings ("2000.5")
            return "string"
        if inner.id == "Any":
            return "json"
        return "json"
    if isinstance(inner, ast.Subscript):
        outer = _name(inner.value)
        if outer == "ExpandableField":
            return "id"
        if outer == "Literal":
            values = [a.value for a in _args(inner) if isinstance(a, ast.Constant)]
            return "bool" if values and all(isinstance(v, bool) for v in values) else "string"
        if outer == "Union":
            kinds = {_kind(name, arg, doc) for arg in _args(inner)}
            if kinds <= {"string"}:
                return "string"
            if kinds <= {"id", "string"}:
                return "id"
            return "json"
    return "json"


def _is_timestamp(name: str, doc: str) -> bool:
    """Stripe's timestamps are ints named like `created`, `*_at`, `*_date`, `*_start`/`*_end`,
    or documented as Unix timestamps; the generated classes type them as plain `int`."""
    text = doc.lower()
    if "number of" in text or "seconds after" in text or "expires_after" in name:
        return False
    if any(word in text for word in _TIMESTAMP_WORDS):
        return True
    return name in _TIMESTAMP_NAMES or name.endswith(_TIMESTAMP_SUFFIXES)


_TIMESTAMP_NAMES = {"created", "start", "end", "redeem_by", "billing_cycle_anchor", "next_payment_attempt",
                    "next_pending_invoice_item_invoice", "updated", "billed_until"}
_TIMESTAMP_SUFFIXES = ("_at", "_date", "_start", "_end", "_before")


# --- the expected tables ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    module: str
    class_name: str
    resource: str
    description: str
    list_params: tuple[tuple[str, str], ...] = ()
    children: tuple[str, ...] = ()
    parent: str | None = None
    embedded_field: str | None = None
    parent_key: str | None = None


_SPECS = (
    _Spec("customers", "Customers", "stripe._customer", "Customer", "customer",
          "Customers, to which recurring and one-off charges attach."),
    _Spec("charges", "Charges", "stripe._charge", "Charge", "charge",
          "Card charges: amount, currency, status, customer, refunds.", children=("charges__refunds",)),
    _Spec("coupons", "Coupons", "stripe._coupon", "Coupon", "coupon",
          "Percent-off or amount-off discounts applied to invoices."),
    _Spec("invoices", "Invoices", "stripe._invoice", "Invoice", "invoice",
          "Amounts owed, by subscription and billing period, in every status.", children=("invoices__lines",)),
    _Spec("plans", "Plans", "stripe._plan", "Plan", "plan",
          "Pricing of products and feature levels (e.g. $19/month Starter)."),
    _Spec("subscriptions", "Subscriptions", "stripe._subscription", "Subscription", "subscription",
          "Which plan each customer is on, including canceled subscriptions.",
          list_params=(("status", "all"),), children=("subscriptions__items",)),
    _Spec("events", "Events", "stripe._event", "Event", "event",
          "Account activity of the last 30 days (charge.succeeded, invoice.payment_failed, ...)."),
    _Spec("invoices__lines", "Invoice lines", "stripe._invoice_line_item", "InvoiceLineItem", "line_item",
          "The line items of each invoice.", parent="invoices", embedded_field="lines",
          parent_key="invoice_id"),
    _Spec("subscriptions__items", "Subscription items", "stripe._subscription_item", "SubscriptionItem",
          "subscription_item", "The prices (plans) and quantities of each subscription.",
          parent="subscriptions", embedded_field="items", parent_key="subscription_id"),
    _Spec("charges__refunds", "Refunds", "stripe._refund", "Refund", "refund",
          "Refunds of each charge.", parent="charges", embedded_field="refunds", parent_key="charge_id"),
)

#: The tables MBI expects from Stripe, in MBI's order.
EXPECTED_TABLES: tuple[str, ...] = ("customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events")
#: Child tables built from embedded lists, after the expected tables.
CHILD_TABLES: tuple[str, ...] = ("invoices__lines", "subscriptions__items", "charges__refunds")
ALL_TABLES: tuple[str, ...] = EXPECTED_TABLES + CHILD_TABLES

#: Per table, the columns an analyst reads first (see `TableSchema.key_columns`).
KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("id", "created", "email", "name", "description", "phone", "currency", "balance", "delinquent",
                  "address__country"),
    "charges": ("id", "created", "amount", "currency", "status", "customer", "description", "paid", "refunded",
                "amount_refunded", "failure_code", "failure_message", "payment_intent", "receipt_email"),
    "coupons": ("id", "created", "name", "percent_off", "amount_off", "currency", "duration", "duration_in_months",
                "valid", "times_redeemed", "max_redemptions", "redeem_by"),
    "invoices": ("id", "created", "customer", "customer_email", "status", "currency", "total", "amount_due",
                 "amount_paid", "amount_remaining", "period_start", "period_end",
                 "parent__subscription_details__subscription", "number", "billing_reason", "due_date"),
    "plans": ("id", "created", "product", "nickname", "amount", "currency", "interval", "interval_count", "active",
              "usage_type", "trial_period_days"),
    "subscriptions": ("id", "created", "customer", "status", "start_date", "currency", "cancel_at_period_end",
                      "cancel_at", "canceled_at", "ended_at", "trial_start", "trial_end", "latest_invoice"),
    "events": ("id", "created", "type", "data__object__object", "data__object__id", "request__id",
               "pending_webhooks", "api_version"),
    "invoices__lines": ("invoice_id", "id", "amount", "currency", "description", "quantity", "period__start",
                        "period__end", "pricing__price_details__price", "pricing__price_details__product",
                        "subscription"),
    "subscriptions__items": ("subscription_id", "id", "created", "price", "plan", "quantity", "current_period_start",
                             "current_period_end"),
    "charges__refunds": ("charge_id", "id", "created", "amount", "currency", "status", "reason", "payment_intent"),
}

#: Derived event columns: what the event is about, beside the object itself as JSON text.
_EVENT_EXTRA = (Column("data__object__id", ("data", "object", "id"), "string"),
                Column("data__object__object", ("data", "object", "object"), "string"))


def _build(spec: _Spec) -> TableSchema:
    node = _resource_class(spec.module, spec.class_name)
    flattener = _Flattener()
    skip = frozenset(_SPECS_BY_NAME[child].embedded_field for child in spec.children)  # type: ignore[misc]
    flattener.walk(node, [], (), skip=skip)
    columns = flattener.columns
    if spec.name == "events":
        columns = [c for c in columns if c.path[0] != "data"] + [
            *_EVENT_EXTRA, Column("data__object", ("data", "object"), "json"),
            Column("data__previous_attributes", ("data", "previous_attributes"), "json")]
    if spec.parent_key:
        columns = [Column(spec.parent_key, (spec.parent_key,), "string"), *columns]
    key_first = sorted(columns, key=lambda c: (c.name != "id", c.name != spec.parent_key))
    names = {column.name for column in columns}  # a field a newer stripe-python dropped is left out
    return TableSchema(spec.name, spec.title, spec.resource, tuple(key_first), "id", spec.parent,
                       spec.embedded_field, spec.parent_key, dict(spec.list_params), spec.children,
                       spec.description, tuple(c for c in KEY_COLUMNS.get(spec.name, ()) if c in names))


_SPECS_BY_NAME = {spec.name: spec for spec in _SPECS}


@lru_cache(maxsize=None)
def schema(table: str) -> TableSchema:
    """The schema of an expected table or child table."""
    spec = _SPECS_BY_NAME.get(table)
    if spec is None:
        raise UnknownTableError(f"unknown table {table!r}: choose one of {', '.join(ALL_TABLES)}")
    return _build(spec)
