"""The sandbox's read API: Stripe's list and retrieve endpoints over pre-serialised datasets."""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mbi_widgets.redaction import redact
from mbi_widgets.sandbox import expand, render
from mbi_widgets.sandbox.render import API_VERSION
from mbi_widgets.sandbox.store import Collection, Dataset, Record, list_body

if TYPE_CHECKING:
    from mbi_widgets.sandbox.server import SandboxState


class StripeHTTPError(Exception):
    """An error answered in Stripe's shape: {"error": {"type", "code", "message", "param"}}."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> Response:
        error: dict[str, Any] = {"message": self.message, "type": self.type}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            error["param"] = self.param
        error["request_log_url"] = None
        return stripe_response(orjson.dumps({"error": error}), self.status, self.headers)


def request_id() -> str:
    return "req_" + secrets.token_hex(7)


def stripe_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    merged = {"Request-Id": request_id(), "Stripe-Version": API_VERSION, "Cache-Control": "no-cache, no-store"}
    merged.update(headers or {})
    return Response(body, status_code=status, headers=merged, media_type="application/json")


# --- request parameters ----------------------------------------------------------------------

def parse_params(query: str) -> dict[str, Any]:
    """Stripe's form encoding: `a[b]=1` is a dict, `a[]=1` and `a[0]=1` are lists."""
    params: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        name, bracket, rest = key.partition("[")
        if not bracket:
            params[key] = value
            continue
        if not rest.endswith("]") or "[" in rest[:-1]:
            raise StripeHTTPError(400, f"Invalid parameter name: {key}", param=key)
        inner = rest[:-1]
        if inner == "" or _INDEX.fullmatch(inner):
            slot = params.setdefault(name, [])
            if not isinstance(slot, list):
                raise StripeHTTPError(400, f"Invalid array: {name}", param=name)
            slot.append(value)
        else:
            slot = params.setdefault(name, {})
            if not isinstance(slot, dict):
                raise StripeHTTPError(400, f"Invalid hash: {name}", param=name)
            slot[inner] = value
    return params


#: ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses.
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_INDEX = re.compile(r"[0-9]{1,6}")


def _integer(value: Any, param: str) -> int:
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    raise StripeHTTPError(400, f"Invalid integer: {value}", param=param)


@dataclass(frozen=True)
class ListSpec:
    """What a Stripe list endpoint accepts (expansions: `mbi_widgets.sandbox.expand`)."""

    filters: frozenset[str]
    created: bool = True


_COMMON = {"limit", "starting_after", "ending_before", "expand"}
LISTS: dict[str, ListSpec] = {
    "customers": ListSpec(frozenset({"email", "test_clock"})),
    "charges": ListSpec(frozenset({"customer", "payment_intent", "transfer_group"})),
    "coupons": ListSpec(frozenset()),
    "invoices": ListSpec(frozenset({"customer", "status", "subscription", "collection_method", "due_date"})),
    "plans": ListSpec(frozenset({"active", "product"})),
    "prices": ListSpec(frozenset({"active", "product", "type", "currency", "lookup_keys"})),
    "products": ListSpec(frozenset({"active", "ids", "shippable", "url"})),
    "subscriptions": ListSpec(frozenset({"customer", "price", "plan", "status", "collection_method"})),
    "refunds": ListSpec(frozenset({"charge", "payment_intent"})),
    "events": ListSpec(frozenset({"type", "types", "delivery_success"})),
}
#: Sub-lists served from a parent's embedded list: path kind -> (dataset children key, parent noun).
SUBLISTS = {"lines": ("invoice_lines", "invoice"), "refunds": ("charge_refunds", "charge")}
_NOUNS = {"customers": "customer", "charges": "charge", "coupons": "coupon", "invoices": "invoice",
          "plans": "plan", "prices": "price", "products": "product", "subscriptions": "subscription",
          "refunds": "refund", "events": "event", "subscription_items": "subscription_item", "lines": "line_item", "accounts": "account"}
#: Filters that compare one stored attribute (list values mean "any of"): list -> param -> attribute.
_EQUALITY_FILTERS = {
    "charges": {"payment_intent": "payment_intent", "transfer_group": "transfer_group"},
    "prices": {"currency": "currency", "type": "type", "lookup_keys": "lookup_key"},
    "products": {"ids": "id", "shippable": "shippable", "url": "url"},
    "invoices": {"collection_method": "collection_method"},
    "subscriptions": {"collection_method": "collection_method"},
    "customers": {"test_clock": "test_clock"},
    "events": {"delivery_success": "delivery_success"},
}
_BOOLEAN_FILTERS = {"shippable", "delivery_success"}
_SUBSCRIPTION_STATUSES = {"active", "all", "canceled", "ended", "incomplete", "incomplete_expired",
                          "past_due", "paused", "trialing", "unpaid"}
_INVOICE_STATUSES = {"draft", "open", "paid", "uncollectible", "void"}


@dataclass
class ListQuery:
    limit: int = 10
    starting_after: str | None = None
    ending_before: str | None = None
    #: The checked `expand[]` paths (None: serve the stored bytes as they are).
    expansions: expand.Plan | None = None
    created: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
    keep: Callable[[Record], bool] | None = None


def _created_window(value: Any, param: str = "created") -> tuple[int | None, int | None, int | None, int | None]:
    if isinstance(value, str):
        exact = _integer(value, param)
        return None, exact, None, exact
    if isinstance(value, dict):
        unknown = set(value) - {"gt", "gte", "lt", "lte"}
        if unknown:
            name = sorted(unknown)[0]
            raise StripeHTTPError(400, f"Received unknown parameter: {param}[{name}]", param=f"{param}[{name}]")
        return tuple(_integer(value[k], f"{param}[{k}]") if k in value else None  # type: ignore[return-value]
                     for k in ("gt", "gte", "lt", "lte"))
    raise StripeHTTPError(400, f"Invalid {param}: expected an integer or a hash of gt, gte, lt, lte", param=param)


def _expansions(params: dict[str, Any]) -> list[str]:
    expand = params.get("expand", [])
    if isinstance(expand, str) or isinstance(expand, dict):
        raise StripeHTTPError(400, "Invalid array", param="expand")
    return expand


def _type_matcher(pattern: str) -> Callable[[str], bool]:
    if pattern.endswith(".*"):
        prefix = pattern[:-1]
        return lambda t: t.startswith(prefix)
    if "*" in pattern:
        raise StripeHTTPError(400, f"Invalid type: {pattern}. Wildcards are only allowed at the end, "
                              "after a dot (e.g. 'invoice.*').", param="type")
    return lambda t: t == pattern


def _filters(resource: str, params: dict[str, Any]) -> list[Callable[[Record], bool]]:
    """Record predicates for the resource-specific filters present in `params`."""
    checks: list[Callable[[Record], bool]] = []
    for name in ("status", "type", "price", "plan", "payment_intent", "transfer_group", "currency", "shippable",
                 "url", "collection_method", "test_clock", "delivery_success"):
        if name in params and not isinstance(params[name], str):
            raise StripeHTTPError(400, f"Invalid string: {name}", param=name)
    for name in ("customer", "subscription", "charge", "product", "email"):
        if name in params:
            wanted = params[name]
            if not isinstance(wanted, str):
                raise StripeHTTPError(400, f"Invalid string: {name}", param=name)
            checks.append(lambda r, n=name, w=wanted: r.attrs.get(n) == w)
    for name, attr in _EQUALITY_FILTERS.get(resource, {}).items():
        if name in params:
            wanted = params[name]
            if isinstance(wanted, list):  # lookup_keys[], ids[]: membership
                wanted_set = set(wanted)
                checks.append(lambda r, a=attr, w=wanted_set: r.attrs.get(a) in w)
            elif wanted in ("true", "false") and name in _BOOLEAN_FILTERS:
                checks.append(lambda r, a=attr, w=wanted == "true": r.attrs.get(a) is w)
            else:
                checks.append(lambda r, a=attr, w=wanted: r.attrs.get(a) == w)
    if "active" in params:
        if params["active"] not in ("true", "false"):
            raise StripeHTTPError(400, f"Invalid boolean: {params['active']}", param="active")
        want_active = params["active"] == "true"
        checks.append(lambda r: r.attrs.get("active") == want_active)
    if resource == "subscriptions":
        status = params.get("status")
        if status is not None and status not in _SUBSCRIPTION_STATUSES:
            raise StripeHTTPError(400, f"Invalid status: must be one of {', '.join(sorted(_SUBSCRIPTION_STATUSES))}",
                                  param="status")
        if status is None:
            checks.append(lambda r: r.attrs["status"] not in ("canceled", "incomplete_expired"))
        elif status == "ended":
            checks.append(lambda r: r.attrs["status"] in ("canceled", "incomplete_expired"))
        elif status != "all":
            checks.append(lambda r: r.attrs["status"] == status)
        price = params.get("price") or params.get("plan")
        if price is not None:
            checks.append(lambda r: price in r.attrs["prices"])
    if resource == "invoices" and "due_date" in params:
        gt, gte, lt, lte = _created_window(params["due_date"], "due_date")
        checks.append(lambda r: (d := r.attrs.get("due_date")) is not None
                      and (gt is None or d > gt) and (gte is None or d >= gte)
                      and (lt is None or d < lt) and (lte is None or d <= lte))
    if resource == "invoices" and "status" in params:
        status = params["status"]
        if status not in _INVOICE_STATUSES:
            raise StripeHTTPError(400, f"Invalid status: must be one of {', '.join(sorted(_INVOICE_STATUSES))}",
                                  param="status")
        checks.append(lambda r: r.attrs["status"] == status)
    if resource == "events":
        if "type" in params and "types" in params:
            raise StripeHTTPError(400, "You may only specify one of these parameters: type, types.", param="types")
        if "type" in params:
            match = _type_matcher(params["type"])
            checks.append(lambda r: match(r.attrs["type"]))
        if "types" in params:
            types = params["types"]
            if not isinstance(types, list) or not 0 < len(types) <= 20:
                raise StripeHTTPError(400, "types must be an array of 1 to 20 event types", param="types")
            wanted_types = set(types)
            checks.append(lambda r: r.attrs["type"] in wanted_types)
    return checks


def parse_list_query(resource: str, spec: ListSpec, params: dict[str, Any], collection: Collection) -> ListQuery:
    allowed = _COMMON | spec.filters | ({"created"} if spec.created else set())
    for name in params:
        if name not in allowed:
            raise StripeHTTPError(400, f"Received unknown parameter: {name}", param=name)
    query = ListQuery()
    if "limit" in params:
        query.limit = _integer(params["limit"], "limit")
        if not 1 <= query.limit <= 100:
            raise StripeHTTPError(400, f"Invalid limit: must be between 1 and 100 (got {query.limit})", param="limit")
    if "starting_after" in params and "ending_before" in params:
        raise StripeHTTPError(400, "You may only specify one of these parameters: ending_before, starting_after.",
                              param="ending_before")
    for cursor in ("starting_after", "ending_before"):
        if cursor in params:
            value = params[cursor]
            if not isinstance(value, str) or not collection.listed(value):
                raise StripeHTTPError(400, f"No such {_NOUNS.get(resource, 'object')}: '{value}'",
                                      code="resource_missing", param=cursor)
            setattr(query, cursor, value)
    query.expansions = expand.plan(_NOUNS.get(resource, resource), _expansions(params), listing=True)
    if "created" in params:
        query.created = _created_window(params["created"])
    checks = _filters(resource, params)
    if checks:
        query.keep = checks[0] if len(checks) == 1 else (lambda r: all(check(r) for check in checks))
    return query


# --- handlers ----------------------------------------------------------------------------------

def list_page(dataset: Dataset, resource: str, params: dict[str, Any], *, window_start: int | None = None) -> bytes:
    spec = LISTS[resource]
    collection = dataset.collections[resource]
    query = parse_list_query(resource, spec, params, collection)
    gt, gte, lt, lte = query.created
    if window_start is not None:
        gte = window_start if gte is None else max(gte, window_start)
    lo, hi = collection.created_bounds(gt, gte, lt, lte)
    page = collection.page(limit=query.limit, lo=lo, hi=hi, starting_after=query.starting_after,
                           ending_before=query.ending_before, keep=query.keep)
    return list_body(f"/v1/{resource}", page.records, page.has_more,
                     bodies=expand.bodies(dataset, page.records, query.expansions))


def sublist_page(dataset: Dataset, collection: Collection, url: str, noun: str, params: dict[str, Any]) -> bytes:
    spec = ListSpec(frozenset(), created=False)
    query = parse_list_query(noun, spec, params, collection)
    page = collection.page(limit=query.limit, starting_after=query.starting_after,
                           ending_before=query.ending_before)
    return list_body(url, page.records, page.has_more, bodies=expand.bodies(dataset, page.records, query.expansions))


def retrieve(dataset: Dataset, resource: str, object_id: str, params: dict[str, Any], *,
             window_start: int | None = None) -> bytes:
    unknown = set(params) - {"expand"}
    if unknown:
        name = sorted(unknown)[0]
        raise StripeHTTPError(400, f"Received unknown parameter: {name}", param=name)
    if resource == "subscription_items":  # no top-level collection: look in each subscription's items
        record = next((r for items in dataset.children["subscription_items"].values()
                       if (r := items.get(object_id)) is not None), None)
    else:
        record = dataset.collections[resource].get(object_id)
    if record is None and object_id in dataset.deleted.get(resource, {}):
        stub = dataset.deleted[resource][object_id]
        if stub is not None:  # a deleted customer answers 200 {"deleted": true}; others answer 404
            return stub
    if record is None or (window_start is not None and record.created < window_start):
        raise StripeHTTPError(404, f"No such {_NOUNS[resource]}: '{object_id}'", code="resource_missing", param="id")
    expansions = expand.plan(_NOUNS[resource], _expansions(params), listing=False)
    return expand.bodies(dataset, [record], expansions)[0]


RESOURCE_PERMISSIONS = {name: name for name in LISTS} | {"subscription_items": "subscriptions",
                                                         "lines": "invoices", "account": "account"}


def routes(state: "SandboxState") -> list[Route]:
    """The /v1 routes; authentication, rate limits and the dataset come from `state`."""

    async def account(request: Request) -> Response:
        _, dataset = await state.authorize(request, "account", "account")
        return stripe_response(dataset.account)

    def visible_accounts(principal: Any) -> list[str]:
        """The accounts a key may read: its own, and a platform's connected accounts."""
        own = [principal.account_id]
        return own + sorted(state.credentials.connected - set(own)) if principal.platform else own

    def account_record(account_id: str) -> Record:
        body = render.account(state.profile(account_id))
        return Record(account_id, body["created"], orjson.dumps(body))

    async def list_accounts(request: Request) -> Response:
        # Stripe lists the platform's connected accounts (never the platform itself); others have none.
        principal, dataset = await state.authorize(request, "account", "accounts.list")
        connected = [a for a in visible_accounts(principal) if a != principal.account_id]
        collection = Collection([account_record(a) for a in connected])
        params = parse_params(request.url.query)
        query = parse_list_query("accounts", ListSpec(frozenset()), params, collection)
        lo, hi = collection.created_bounds(*query.created)
        page = collection.page(limit=query.limit, lo=lo, hi=hi, starting_after=query.starting_after,
                               ending_before=query.ending_before)
        return stripe_response(list_body("/v1/accounts", page.records, page.has_more,
                                         bodies=expand.bodies(dataset, page.records, query.expansions)))

    async def retrieve_account(request: Request) -> Response:
        principal, dataset = await state.authorize(request, "account", "accounts.retrieve")
        account_id = request.path_params["account_id"]
        params = parse_params(request.url.query)
        unknown = sorted(set(params) - {"expand"})
        if unknown:
            raise StripeHTTPError(400, f"Received unknown parameter: {unknown[0]}", param=unknown[0])
        wanted = request.headers.get("stripe-account") or principal.account_id
        if account_id != wanted and account_id not in visible_accounts(principal):
            raise StripeHTTPError(
                403, f"The provided key '{redact(principal.key)}' does not have access to account "
                f"'{account_id}' (or that account does not exist). Application access may have been revoked.",
                code="account_invalid")
        record = account_record(account_id)
        expansions = expand.plan("account", _expansions(params), listing=False)
        return stripe_response(expand.bodies(dataset, [record], expansions)[0])

    async def list_resource(request: Request) -> Response:
        resource = request.path_params["resource"]
        params = parse_params(request.url.query)
        if resource == "subscription_items":
            principal, dataset = await state.authorize(request, "subscriptions", "subscription_items")
            subscription = params.pop("subscription", None)
            if not isinstance(subscription, str):
                raise StripeHTTPError(400, "Missing required param: subscription.", param="subscription")
            items = dataset.children["subscription_items"].get(subscription)
            if items is None:
                raise StripeHTTPError(404, f"No such subscription: '{subscription}'", code="resource_missing",
                                      param="subscription")
            return stripe_response(sublist_page(dataset, items, "/v1/subscription_items", "subscription_items", params))
        if resource not in LISTS:
            raise _unrecognised(request)
        principal, dataset = await state.authorize(request, resource, f"{resource}.list")
        window = state.event_window_start(dataset) if resource == "events" else None
        return stripe_response(list_page(dataset, resource, params, window_start=window))

    async def retrieve_resource(request: Request) -> Response:
        resource, object_id = request.path_params["resource"], request.path_params["object_id"]
        if resource not in LISTS and resource != "subscription_items":
            raise _unrecognised(request)
        permission = "subscriptions" if resource == "subscription_items" else resource
        _, dataset = await state.authorize(request, permission, f"{resource}.retrieve")
        params = parse_params(request.url.query)
        window = state.event_window_start(dataset) if resource == "events" else None
        return stripe_response(retrieve(dataset, resource, object_id, params, window_start=window))

    async def sublist(request: Request) -> Response:
        parent, object_id, kind = (request.path_params[k] for k in ("parent", "object_id", "kind"))
        if (parent, kind) not in (("invoices", "lines"), ("charges", "refunds")):
            raise _unrecognised(request)
        children_key, noun = SUBLISTS[kind]
        _, dataset = await state.authorize(request, parent, f"{parent}.{kind}")
        collection = dataset.children[children_key].get(object_id)
        if collection is None:
            if dataset.collections[parent].get(object_id) is None:
                raise StripeHTTPError(404, f"No such {noun}: '{object_id}'", code="resource_missing", param="id")
            collection = Collection([], newest_first=False)
        url = f"/v1/{parent}/{object_id}/{kind}"
        return stripe_response(sublist_page(dataset, collection, url, kind, parse_params(request.url.query)))

    return [
        Route("/v1/account", account, methods=["GET"]),
        Route("/v1/accounts", list_accounts, methods=["GET"]),
        Route("/v1/accounts/{account_id}", retrieve_account, methods=["GET"]),
        Route("/v1/{resource}", list_resource, methods=["GET"]),
        Route("/v1/{resource}/{object_id}", retrieve_resource, methods=["GET"]),
        Route("/v1/{parent}/{object_id}/{kind}", sublist, methods=["GET"]),
    ]


def _unrecognised(request: Request) -> StripeHTTPError:
    return StripeHTTPError(404, f"Unrecognized request URL ({request.method}: {request.url.path}). "
                           "The sandbox serves Stripe's read API: see https://docs.stripe.com/api.",
                           code="resource_missing")
