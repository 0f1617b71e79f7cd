"""The sandbox's Search API: Stripe's search endpoints, query subset, paging, errors, limits and indexing delay."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.generator import DAY
from tests.conftest import make_client

SEARCHABLE = ("charges", "customers", "invoices", "subscriptions")
#: What each list needs to show every object a search covers (subscriptions list hides canceled ones).
EVERYTHING = {"subscriptions": {"status": "all"}}


def get(sandbox: Sandbox, path: str, key: str | None = None, **params) -> requests.Response:
    return requests.get(sandbox.api_url + path, params=params, timeout=30,
                        headers={"Authorization": f"Bearer {key or sandbox.restricted_key}"})


def search_all(sandbox: Sandbox, resource: str, query: str, *, limit: int = 100, page: str | None = None,
               **params) -> list[dict]:
    """Every object a search returns (from `page`, if given), following `next_page` as Stripe's clients do."""
    found = []
    while True:
        answer = get(sandbox, f"/v1/{resource}/search", query=query, limit=limit, **params,
                     **({"page": page} if page else {}))
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found += body["data"]
        if not body["has_more"]:
            assert body["next_page"] is None
            return found
        page = body["next_page"]
        assert isinstance(page, str) and page


def list_all(sandbox: Sandbox, resource: str, **params) -> list[dict]:
    found, after = [], None
    while True:
        body = get(sandbox, f"/v1/{resource}", limit=100, **EVERYTHING.get(resource, {}), **params,
                   **({"starting_after": after} if after else {})).json()
        found += body["data"]
        if not body["has_more"]:
            return found
        after = body["data"][-1]["id"]


def assert_query_error(answer: requests.Response, fragment: str, param: str = "query") -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"]


@pytest.fixture(scope="module")
def small():
    with Sandbox(seed=1, scale=60) as running:
        yield running


# --- the answer's shape --------------------------------------------------------------------------

@pytest.mark.parametrize("resource", SEARCHABLE)
def test_search_result_object_as_stripe_serves_it(small, resource):
    answer = get(small, f"/v1/{resource}/search", query="created>0", limit=3)
    assert answer.status_code == 200
    body = answer.json()
    assert list(body) == ["object", "data", "has_more", "next_page", "url"]  # total_count only when expanded
    assert body["object"] == "search_result" and body["url"] == f"/v1/{resource}/search"
    assert body["has_more"] is True and len(body["data"]) == 3
    assert {obj["object"] for obj in body["data"]} == {resource.rstrip("s")}


@pytest.mark.parametrize("resource", SEARCHABLE)
def test_search_covers_exactly_what_the_list_shows_newest_first(small, resource):
    """A search result is the same object as the list's, byte for byte, in the lists' order."""
    searched = search_all(small, resource, "created>0", limit=7)
    listed = list_all(small, resource)
    assert [obj["id"] for obj in searched] == [obj["id"] for obj in listed]
    assert searched == listed
    assert len({obj["id"] for obj in searched}) == len(searched)


def test_default_limit_is_ten_and_total_count_is_expandable(small):
    body = get(small, "/v1/charges/search", query="created>0", **{"expand[]": "total_count"}).json()
    assert len(body["data"]) == 10
    assert body["total_count"] == small.dataset().count("charges")


@pytest.mark.parametrize("limit", ["0", "101", "ten"])
def test_limit_is_1_to_100(small, limit):
    assert_query_error(get(small, "/v1/charges/search", query="created>0", limit=limit), "", param="limit")


# --- the query language subset -------------------------------------------------------------------

@pytest.mark.parametrize("op, param", [(">", "gt"), (">=", "gte"), ("<", "lt"), ("<=", "lte")])
def test_created_comparisons_match_the_lists_created_filter(small, op, param):
    middle = list_all(small, "charges")[150]["created"]
    searched = search_all(small, "charges", f"created{op}{middle}")
    listed = list_all(small, "charges", **{f"created[{param}]": middle})
    assert [obj["id"] for obj in searched] == [obj["id"] for obj in listed]
    assert 0 < len(searched) < small.dataset().count("charges")


def test_created_range_with_and_in_any_case_and_with_spaces(small):
    charges = list_all(small, "charges")
    high, low = charges[20]["created"], charges[80]["created"]
    expected = [c["id"] for c in charges if low <= c["created"] < high]
    for query in (f"created>={low} AND created<{high}", f"created>={low} and created<{high}",
                  f"  created>={low}   created<{high} "):
        assert [c["id"] for c in search_all(small, "charges", query)] == expected


def test_created_colon_is_an_exact_second(small):
    charge = list_all(small, "charges")[42]
    found = search_all(small, "charges", f"created:{charge['created']}")
    assert charge["id"] in [c["id"] for c in found] and {c["created"] for c in found} == {charge["created"]}


@pytest.mark.parametrize("resource, field, quote", [("charges", "status", "'"), ("invoices", "status", '"'),
                                                    ("subscriptions", "status", "'"), ("charges", "customer", '"'),
                                                    ("invoices", "customer", "'"), ("customers", "email", '"')])
def test_exact_match_fields(small, resource, field, quote):
    objects = list_all(small, resource)
    wanted = objects[len(objects) // 3][field]
    found = search_all(small, resource, f"{field}:{quote}{wanted}{quote} AND created>0")
    assert [o["id"] for o in found] == [o["id"] for o in objects if o[field] == wanted]
    assert found


def test_subscription_search_covers_canceled_ones_without_a_status(small):
    found = search_all(small, "subscriptions", "created>0")
    assert "canceled" in {s["status"] for s in found}
    assert len(found) == len(list_all(small, "subscriptions"))  # the list with status=all


@pytest.mark.parametrize("query, fragment", [
    ("status:succeeded", "We were unable to parse your search query."),
    ("created>", "We were unable to parse your search query."),
    ("created>5 AND", "We were unable to parse your search query."),
    ("hello world", "We were unable to parse your search query."),
    ("amount>1000", "Field `amount` is an unsupported search field for resource `charges`."),
    ("metadata['order']:'1'", "unsupported search field"),
    ("email:'a@b.example'", "Field `email` is an unsupported search field for resource `charges`."),
    ("status:'failed' OR created>5", "AND only"),
    ("status:'failed' AND created>5 OR created<9", "cannot be combined"),
    ("-status:'failed'", "exact matches"),
    ("status~'fail'", "exact matches"),
    ("status>'failed'", "string field"),
    ("created>'2024'", "takes a number"),
    (" AND ".join(["created>1"] * 11), "at most 10"),
])
def test_malformed_queries_answer_400_on_query(small, query, fragment):
    assert_query_error(get(small, "/v1/charges/search", query=query), fragment)


def test_missing_query_is_stripes_missing_param(small):
    for params in ({}, {"query": ""}, {"query": "   "}):
        assert_query_error(get(small, "/v1/charges/search", **params), "Missing required param: query.")


def test_unknown_parameters_and_expansions_are_refused(small):
    assert_query_error(get(small, "/v1/charges/search", query="created>0", starting_after="ch_x"), "unknown",
                       param="starting_after")
    assert_query_error(get(small, "/v1/charges/search", query="created>0", **{"expand[]": "data.invoice"}),
                       "cannot be expanded", param="expand")


def test_expansions_are_those_of_the_list(small):
    expanded = get(small, "/v1/charges/search", query="created>0", limit=5,
                   **{"expand[]": ["data.customer", "data.refunds"]}).json()
    listed = get(small, "/v1/charges", limit=5, **{"expand[]": ["data.customer", "data.refunds"]}).json()
    assert expanded["data"] == listed["data"]
    assert isinstance(expanded["data"][0]["customer"], dict)


def test_only_the_four_resources_are_searchable(small):
    """`/v1/coupons/search` is a retrieve of coupon "search", as on Stripe, not a search."""
    answer = get(small, "/v1/coupons/search")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "resource_missing"


# --- page tokens ---------------------------------------------------------------------------------

def test_a_page_token_belongs_to_its_query(small):
    first = get(small, "/v1/charges/search", query="created>0", limit=2).json()
    assert_query_error(get(small, "/v1/charges/search", query="created>1", page=first["next_page"]),
                       "Invalid page", param="page")
    assert_query_error(get(small, "/v1/invoices/search", query="created>0", page=first["next_page"]),
                       "Invalid page", param="page")
    for token in ("nonsense", "W10", "x" * 500):
        assert_query_error(get(small, "/v1/charges/search", query="created>0", page=token), "Invalid page",
                           param="page")


def test_paging_continues_after_the_last_object_while_the_clock_moves():
    """A token says where to continue, not a position: objects created meanwhile do not shift pages."""
    with Sandbox(seed=2, scale=40, horizon_days=10) as sandbox:
        before = search_all(sandbox, "charges", "created>0")
        first = get(sandbox, "/v1/charges/search", query="created>0", limit=30).json()
        sandbox.advance(days=5)
        rest = search_all(sandbox, "charges", "created>0", page=first["next_page"])
        ids = [c["id"] for c in first["data"] + rest]
        assert ids == [c["id"] for c in before]
        assert len(search_all(sandbox, "charges", "created>0")) > len(before)  # the new ones are on top


# --- indexing delay, availability, permissions, limits ---------------------------------------------

def test_objects_newer_than_the_indexing_delay_are_not_searchable_yet():
    delay = 100 * DAY
    with Sandbox(seed=1, scale=60, search_delay=delay, horizon_days=30) as sandbox:
        listed = list_all(sandbox, "charges")
        searched = search_all(sandbox, "charges", "created>0")
        assert [c["id"] for c in searched] == [c["id"] for c in listed if c["created"] <= sandbox.now - delay]
        assert 0 < len(searched) < len(listed)
        sandbox.advance(days=30)  # the index catches up with the clock
        searched = search_all(sandbox, "charges", "created>0")
        assert [c["id"] for c in searched] == [c["id"] for c in list_all(sandbox, "charges")
                                               if c["created"] <= sandbox.now - delay]


def test_search_delay_must_be_whole_seconds():
    for bad in (-1, 1.5, True, "60"):
        with pytest.raises(Exception, match="search_delay"):
            Sandbox(scale=1, search_delay=bad)


def test_a_region_without_search_answers_404_and_lists_still_work():
    with Sandbox(seed=1, scale=20, search=False) as sandbox:
        for resource in SEARCHABLE:
            answer = get(sandbox, f"/v1/{resource}/search", query="created>0")
            assert answer.status_code == 404
            assert "not available" in answer.json()["error"]["message"]
        assert get(sandbox, "/v1/charges").status_code == 200


def test_search_needs_the_resources_read_permission(small):
    charges_only = small.create_restricted_key({"charges"})
    assert get(small, "/v1/charges/search", charges_only, query="created>0").status_code == 200
    refused = get(small, "/v1/invoices/search", charges_only, query="created>0")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_error"
    assert charges_only not in refused.text


def test_search_endpoints_share_one_limit():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 1000, "per_endpoint": 1000, "per_search": 4}) as sb:
        paths = ["/v1/charges/search", "/v1/invoices/search", "/v1/customers/search"] * 5
        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(lambda path: get(sb, path, query="created>0", limit=1), paths))
        limited = [a for a in answers if a.status_code == 429]
        assert limited and len(limited) <= len(paths) - 4
        assert {a.headers["Stripe-Rate-Limited-Reason"] for a in limited} == {"endpoint-rate"}
        assert {a.json()["error"]["code"] for a in limited} == {"rate_limit"}
        assert get(sb, "/v1/charges", limit=1).status_code == 200  # the list endpoints have their own buckets


def test_searches_count_against_the_account_limit():
    with Sandbox(seed=2, scale=20, rate_limits={"per_account": 3, "per_endpoint": 1000, "per_search": 1000}) as sb:
        paths = ["/v1/charges/search"] * 10
        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(lambda path: get(sb, path, query="created>0", limit=1), paths))
        limited = [a for a in answers if a.status_code == 429]
        assert limited and {a.headers["Stripe-Rate-Limited-Reason"] for a in limited} == {"global-rate"}


def test_live_mode_search_limit_is_20_per_second():
    from mbi_widgets.ratelimits import RateLimits

    assert RateLimits.live_mode().per_search == RateLimits.test_mode().per_search == 20
    assert RateLimits.coerce({"per_account": 5, "per_endpoint": 5}).per_search == 20


def test_injected_429_is_stripes_rate_limit_answer(small):
    small.inject_fault("429", 1, "/v1/charges/search")
    answer = get(small, "/v1/charges/search", query="created>0")
    assert answer.status_code == 429
    assert answer.json()["error"] == {**answer.json()["error"], "type": "invalid_request_error", "code": "rate_limit"}
    assert get(small, "/v1/charges/search", query="created>0").status_code == 200


def test_stripe_python_searches_and_auto_pages(small):
    client = make_client(small, small.restricted_key)
    result = client.v1.charges.search({"query": "status:'failed'", "limit": 7})
    assert result.object == "search_result"
    ids = [charge.id for charge in result.auto_paging_iter()]
    assert ids == [c["id"] for c in list_all(small, "charges") if c["status"] == "failed"]
    assert len(ids) > 7


def test_search_bodies_are_json_with_the_list_bytes(small):
    """The data objects are the list's pre-serialised bytes (no re-rendering on the search path)."""
    raw = get(small, "/v1/customers/search", query="created>0", limit=4).content
    listed = get(small, "/v1/customers", limit=4).content
    assert orjson.loads(raw)["data"] == orjson.loads(listed)["data"]
    assert raw.split(b'"data":[', 1)[1].split(b'],"has_more"')[0] == listed.split(b'"data":[', 1)[1].split(
        b'],"has_more"')[0]
