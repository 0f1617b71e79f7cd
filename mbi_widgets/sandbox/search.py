"""The sandbox's Search API: Stripe's search query language (the subset loads use) over the list collections.

Served: `GET /v1/{charges,customers,invoices,subscriptions}/search` with `query`, `limit` (1-100,
default 10), `page` (the `next_page` of the previous answer) and `expand[]` (`total_count`, and
what the resource's list accepts). The query language subset: `created` compared with `>`, `>=`,
`<`, `<=` or `:` to Unix seconds; `field:'value'` (or "value") for `status` (charges, invoices,
subscriptions), `customer` (charges, invoices) and `email` (customers); clauses joined by `AND`
or by spaces. Anything else answers 400 `invalid_request_error` with `param: "query"`, worded as
Stripe words it.

Semantics chosen where Stripe's docs are silent, and kept stable so that tests can rely on them:
- results come newest first (`created` descending, then id descending), the lists' order;
- a search covers every object of the resource, whatever its status (subscriptions too: no
  `status=all` needed), and only objects the list shows (the index never runs ahead of lists);
- Stripe's indexing delay: objects created within the last `search_delay` seconds of the
  sandbox clock are not searchable yet;
- `next_page` is an opaque token tied to its query; it continues after the last object
  returned, so pages stay consistent while the clock moves.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mbi_widgets.ratelimits import SEARCH_ENDPOINT
from mbi_widgets.sandbox.api import (
    StripeHTTPError,
    _expansions,
    _integer,
    parse_params,
    stripe_response,
)
from mbi_widgets.sandbox import expand
from mbi_widgets.sandbox.store import Collection, Dataset, Record

if TYPE_CHECKING:
    from mbi_widgets.sandbox.server import SandboxState

#: Searchable resources -> the string fields the sandbox matches exactly -> the record attribute.
SEARCH_FIELDS: dict[str, dict[str, str]] = {
    "charges": {"status": "status", "customer": "customer"},
    "invoices": {"status": "status", "customer": "customer"},
    "customers": {"email": "email"},
    "subscriptions": {"status": "status"},
}
#: Stripe allows at most this many clauses in one query.
MAX_CLAUSES = 10
_PARAMS = frozenset({"query", "limit", "page", "expand"})
_UNPARSABLE = ("We were unable to parse your search query. Try using the format `metadata[\"key\"]:\"value\"` to "
               "query for metadata or key:\"value\" to query for other fields.")

_CLAUSE = re.compile(r"""(?P<negate>-)?(?P<field>[A-Za-z_][A-Za-z0-9_.]*(?:\[(?:'[^']*'|"[^"]*")\])?)"""
                     r"""(?P<op>>=|<=|>|<|:|~)"""
                     r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)""")
_JOINER = re.compile(r"\s+(?:(?P<word>[Aa][Nn][Dd]|[Oo][Rr])\s+)?")


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    #: The value as written: quoted strings keep their quotes until `text()`.
    raw: str
    negated: bool = False

    @property
    def quoted(self) -> bool:
        return self.raw[:1] in ("'", '"')

    def text(self) -> str:
        """The quoted value without its quotes and escapes."""
        return re.sub(r"\\(.)", r"\1", self.raw[1:-1])


@dataclass
class SearchQuery:
    """A parsed query: a `created` range (gt, gte, lt, lte) and exact matches on record attributes."""

    created: list[int | None] = field(default_factory=lambda: [None, None, None, None])
    equals: list[tuple[str, str]] = field(default_factory=list)

    def keep(self) -> Callable[[Record], bool] | None:
        if not self.equals:
            return None
        wanted = tuple(self.equals)
        return lambda record: all(record.attrs.get(attr) == value for attr, value in wanted)

    def narrow(self, op: str, value: int) -> None:
        gt, gte, lt, lte = self.created
        if op == ">":
            gt = value if gt is None else max(gt, value)
        if op in (">=", ":"):
            gte = value if gte is None else max(gte, value)
        if op == "<":
            lt = value if lt is None else min(lt, value)
        if op in ("<=", ":"):
            lte = value if lte is None else min(lte, value)
        self.created = [gt, gte, lt, lte]


def _query_error(message: str) -> StripeHTTPError:
    return StripeHTTPError(400, message, param="query")


def split_clauses(text: str) -> list[Clause]:
    """The clauses of a query joined by AND (or spaces); a syntax error or OR is a 400 on `query`."""
    text = text.strip()
    clauses: list[Clause] = []
    joiners: set[str] = set()
    position = 0
    while True:
        match = _CLAUSE.match(text, position)
        if match is None:
            raise _query_error(_UNPARSABLE)
        clauses.append(Clause(match["field"], match["op"], match["value"], bool(match["negate"])))
        position = match.end()
        if position == len(text):
            break
        joiner = _JOINER.match(text, position)
        if joiner is None:
            raise _query_error(_UNPARSABLE)
        joiners.add((joiner["word"] or "AND").upper())
        position = joiner.end()
    if joiners == {"AND", "OR"}:
        raise _query_error("AND and OR cannot be combined in one search query.")
    if "OR" in joiners:
        raise _query_error("The sandbox's search supports clauses joined by AND only (Stripe also accepts OR): "
                           "run one query per alternative.")
    if len(clauses) > MAX_CLAUSES:
        raise _query_error(f"Your search query has {len(clauses)} clauses; a query may have at most {MAX_CLAUSES}.")
    return clauses


def parse_query(resource: str, text: Any) -> SearchQuery:
    """`query` checked against the resource's fields, as Stripe checks it (400 with `param: "query"`)."""
    if not isinstance(text, str) or not text.strip():
        raise StripeHTTPError(400, "Missing required param: query.", param="query")
    fields = SEARCH_FIELDS[resource]
    query = SearchQuery()
    for clause in split_clauses(text):
        if clause.negated or clause.op == "~":
            raise _query_error(f"The sandbox's search supports exact matches and `created` comparisons only, not "
                               f"`{'-' if clause.negated else ''}{clause.field}{clause.op}`: see the fields it "
                               "supports in mbi_widgets/sandbox/search.py.")
        if clause.field == "created":
            if clause.quoted or not re.fullmatch(r"-?[0-9]{1,18}", clause.raw):
                raise _query_error(f"`created` takes a number (Unix seconds), not {clause.raw}.")
            query.narrow(clause.op, _integer(clause.raw, "query"))
        elif clause.field in fields:
            if clause.op != ":":
                raise _query_error(f"Field `{clause.field}` is a string field: use `{clause.field}:'value'`, "
                                   f"not `{clause.op}`.")
            if not clause.quoted:
                raise _query_error(_UNPARSABLE)
            query.equals.append((fields[clause.field], clause.text()))
        else:
            supported = ", ".join(["created", *sorted(fields)])
            raise _query_error(f"Field `{clause.field}` is an unsupported search field for resource `{resource}`. "
                               f"See http://stripe.com/docs/search#query-fields-for-{resource} for a list of "
                               f"supported fields. (The sandbox supports {supported}.)")
    return query


# --- page tokens ---------------------------------------------------------------------------------

def _digest(resource: str, text: str) -> str:
    return hashlib.sha256(f"{resource}\0{text}".encode()).hexdigest()[:12]


def page_token(resource: str, text: str, record: Record) -> str:
    """An opaque `next_page`: continue after `record`, for this query only."""
    raw = orjson.dumps([1, _digest(resource, text), record.created, record.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_token(resource: str, text: str, token: Any) -> tuple[int, str]:
    """The (created, id) a `page` token continues after; 400 on `page` for a token of another query."""
    invalid = StripeHTTPError(400, "Invalid page: use the next_page value of the previous answer to the same "
                              "query.", param="page")
    if not isinstance(token, str) or not token or len(token) > 400:
        raise invalid
    try:
        value = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise invalid from None
    if (not isinstance(value, list) or len(value) != 4 or value[0] != 1 or value[1] != _digest(resource, text)
            or not isinstance(value[2], int) or not isinstance(value[3], str)):
        raise invalid
    return value[2], value[3]


def _index_after(collection: Collection, created: int, object_id: str) -> int:
    """The index of the first record after (created, id) in newest-first order."""
    found = collection.position.get(object_id)
    if found is not None:
        return found + 1
    index, _ = collection.created_bounds(None, None, None, created)  # first record created <= `created`
    records = collection.records
    while index < len(records) and records[index].created == created and records[index].id >= object_id:
        index += 1
    return index


# --- the answer ----------------------------------------------------------------------------------

def search_body(dataset: Dataset, resource: str, params: dict[str, Any], *, indexed_until: int) -> bytes:
    """One `search_result` page; objects created after `indexed_until` are not searchable yet."""
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise StripeHTTPError(400, f"Received unknown parameter: {unknown[0]}", param=unknown[0])
    text = params.get("query")
    query = parse_query(resource, text)
    limit = 10
    if "limit" in params:
        limit = _integer(params["limit"], "limit")
        if not 1 <= limit <= 100:
            raise StripeHTTPError(400, f"Invalid limit: must be between 1 and 100 (got {limit})", param="limit")
    requested = _expansions(params)
    total_count = "total_count" in requested
    # What the resource's list expands, a search expands too (the sandbox's one expansion hook).
    expansions = expand.plan(resource[:-1], [e for e in requested if e != "total_count"], listing=True)
    collection = dataset.collections[resource]
    gt, gte, lt, lte = query.created
    lte = indexed_until if lte is None else min(lte, indexed_until)
    lo, hi = collection.created_bounds(gt, gte, lt, lte)
    if "page" in params:
        lo = max(lo, _index_after(collection, *read_token(resource, text, params["page"])))
    keep = query.keep()
    page = collection.page(limit=limit, lo=lo, hi=max(lo, hi), keep=keep)
    bodies = expand.bodies(dataset, page.records, expansions)
    next_page = orjson.dumps(page_token(resource, text, page.records[-1])) if page.has_more else b"null"
    parts = [b'{"object":"search_result","data":[', b",".join(bodies), b'],"has_more":',
             b"true" if page.has_more else b"false", b',"next_page":', next_page,
             b',"url":', orjson.dumps(f"/v1/{resource}/search")]
    if total_count:
        first, last = collection.created_bounds(gt, gte, lt, lte)
        matches = (last - first if keep is None
                   else sum(1 for index in range(first, last) if keep(collection.records[index])))
        parts.append(b',"total_count":' + str(max(0, matches)).encode())
    parts.append(b"}")
    return b"".join(parts)


def routes(state: "SandboxState") -> list[Route]:
    """`GET /v1/{resource}/search` for the searchable resources; other `/search` paths stay retrieves."""

    async def search(request: Request) -> Response:
        resource = request.url.path.split("/")[2]
        # Search needs the resource's read permission, like its list, and counts against the one
        # search limit shared by every search endpoint (and against the account's).
        _, dataset = await state.authorize(request, resource, SEARCH_ENDPOINT)
        if not state.search:
            raise StripeHTTPError(404, "Search is not available for this account (Stripe does not offer it in "
                                  "every region): use the list endpoint.")
        params = parse_params(request.url.query)
        return stripe_response(search_body(dataset, resource, params,
                                           indexed_until=dataset.now - state.search_delay))

    return [Route(f"/v1/{resource}/search", search, methods=["GET"]) for resource in SEARCH_FIELDS]
