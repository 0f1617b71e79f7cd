"""Property tests of Stripe's list pagination over plain HTTP.

For any page size and any `created` window, paging forward with `starting_after` and backward
with `ending_before` must return every matching object exactly once, newest first, with ties on
`created` broken by id (the order is `(created, id)` descending), and agree with the generator's
facts filtered directly.
"""
from __future__ import annotations

from typing import Any, Callable

import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.generator import DAY, EVENT_WINDOW_DAYS

SETTINGS = settings(max_examples=30, deadline=None, database=None)


def get(sandbox: Sandbox, path: str, params: dict[str, Any] | None = None) -> requests.Response:
    # A fresh connection per request: these tests make thousands of small requests.
    response = requests.get(sandbox.api_url + path, params=params, timeout=30,
                            headers={"Authorization": f"Bearer {sandbox.restricted_key}",
                                     "Connection": "close"})
    assert response.status_code == 200, response.text
    return response


def facts(sandbox: Sandbox, resource: str) -> list[tuple[int, str, Any]]:
    """(created, id, fact) for every object behind a list endpoint, newest first, unfiltered."""
    history = sandbox.history()
    objects = {"charges": history.charges, "events": history.events,
               "subscriptions": history.subscriptions}[resource]
    return sorted(((o.created, o.id, o) for o in objects), key=lambda t: (t[0], t[1]), reverse=True)


def in_window(created: int, window: dict[str, int]) -> bool:
    return (("gt" not in window or created > window["gt"]) and ("gte" not in window or created >= window["gte"])
            and ("lt" not in window or created < window["lt"]) and ("lte" not in window or created <= window["lte"]))


def window_params(window: dict[str, int]) -> dict[str, int]:
    return {f"created[{op}]": value for op, value in window.items()}


def page_forward(sandbox: Sandbox, resource: str, params: dict[str, Any], limit: int,
                 bound: int) -> list[tuple[int, str]]:
    seen: list[tuple[int, str]] = []
    cursor = None
    for _ in range(bound + 2):
        query = dict(params, limit=limit)
        if cursor is not None:
            query["starting_after"] = cursor
        body = get(sandbox, f"/v1/{resource}", query).json()
        assert body["object"] == "list" and body["url"] == f"/v1/{resource}"
        data = body["data"]
        assert len(data) <= limit
        seen += [(o["created"], o["id"]) for o in data]
        if not body["has_more"]:
            return seen
        assert len(data) == limit  # only a full page can have more after it
        cursor = data[-1]["id"]
    raise AssertionError(f"paging forward did not end after {bound + 2} pages")


def page_backward(sandbox: Sandbox, resource: str, params: dict[str, Any], limit: int, start: str,
                  bound: int) -> list[tuple[int, str]]:
    seen: list[tuple[int, str]] = []
    cursor = start
    for _ in range(bound + 2):
        body = get(sandbox, f"/v1/{resource}", dict(params, limit=limit, ending_before=cursor)).json()
        data = body["data"]
        assert len(data) <= limit
        seen = [(o["created"], o["id"]) for o in data] + seen
        if not body["has_more"]:
            return seen
        assert len(data) == limit
        cursor = data[0]["id"]
    raise AssertionError(f"paging backward did not end after {bound + 2} pages")


def check_both_directions(sandbox: Sandbox, resource: str, params: dict[str, Any], limit: int,
                          matches: Callable[[int, Any], bool]) -> None:
    everything = facts(sandbox, resource)
    expected = [(created, oid) for created, oid, fact in everything if matches(created, fact)]
    assert expected == sorted(expected, reverse=True)

    forward = page_forward(sandbox, resource, params, limit, len(expected) // limit + 1)
    assert forward == expected
    assert len(set(forward)) == len(forward)

    if not expected:
        return
    # Backward: from the object just after the window's last match, or from that match itself.
    ordered_ids = [oid for _, oid, _ in everything]
    last = ordered_ids.index(expected[-1][1])
    if last + 1 < len(ordered_ids):
        backward = page_backward(sandbox, resource, params, limit, ordered_ids[last + 1], len(expected) // limit + 1)
    else:
        backward = page_backward(sandbox, resource, params, limit, expected[-1][1], len(expected) // limit + 1)
        backward.append(expected[-1])
    assert backward == expected


@st.composite
def windows(draw, created_values: list[int]) -> dict[str, int]:
    """A `created` filter: any of gt/gte and lt/lte, at existing timestamps (to hit ties) or anywhere."""
    low, high = min(created_values) - 10, max(created_values) + 10
    bound = st.one_of(st.sampled_from(created_values), st.integers(low, high))
    window: dict[str, int] = {}
    lower = draw(st.sampled_from([None, "gt", "gte"]))
    upper = draw(st.sampled_from([None, "lt", "lte"]))
    if lower:
        window[lower] = draw(bound)
    if upper:
        window[upper] = draw(bound)
    return window


def times(sandbox: Sandbox, resource: str) -> list[int]:
    return sorted({created for created, _, _ in facts(sandbox, resource)})


@SETTINGS
@given(limit=st.integers(1, 100), data=st.data())
def test_charges_pages_cover_the_window_exactly_once(sandbox, limit, data):
    window = data.draw(windows(times(sandbox, "charges")), label="window")
    check_both_directions(sandbox, "charges", window_params(window), limit,
                          lambda created, fact: in_window(created, window))


def type_filters(event_types: list[str]) -> st.SearchStrategy:
    """No filter, `type` exact or with a wildcard, or `types[]`."""
    prefixes = sorted({t.rsplit(".", 1)[0] + ".*" for t in event_types} | {"customer.*"})
    return st.one_of(
        st.none(),
        st.tuples(st.just("type"), st.sampled_from(event_types)),
        st.tuples(st.just("type"), st.sampled_from(prefixes)),
        st.tuples(st.just("types"), st.lists(st.sampled_from(event_types), min_size=1, max_size=4, unique=True)),
    )


def _type_matches(type_filter, event_type: str) -> bool:
    if type_filter is None:
        return True
    kind, value = type_filter
    if kind == "types":
        return event_type in value
    if value.endswith(".*"):
        return event_type.startswith(value[:-1])
    return event_type == value


@SETTINGS
@given(limit=st.integers(1, 100), data=st.data())
def test_events_pages_cover_the_window_exactly_once(sandbox, limit, data):
    window = data.draw(windows(times(sandbox, "events")), label="window")
    type_filter = data.draw(type_filters(sorted({e.type for e in sandbox.history().events})), label="type filter")
    params: dict[str, Any] = window_params(window)
    if type_filter is not None:
        kind, value = type_filter
        params["type" if kind == "type" else "types[]"] = value
    start = sandbox.now - EVENT_WINDOW_DAYS * DAY
    check_both_directions(sandbox, "events", params, limit,
                          lambda created, fact: created >= start and in_window(created, window)
                          and _type_matches(type_filter, fact.type))


def test_events_have_ties_on_created_broken_by_id(sandbox):
    """The property above is only meaningful if some events share a second; and ties come id-descending."""
    times = [e.created for e in sandbox.history().events]
    tied = {t for t in times if times.count(t) > 1}
    assert tied
    body = get(sandbox, "/v1/events", {"limit": 100, "created": min(tied)}).json()
    ids = [e["id"] for e in body["data"]]
    assert len(ids) == times.count(min(tied)) > 1
    assert ids == sorted(ids, reverse=True)


@SETTINGS
@given(limit=st.integers(1, 100), data=st.data(),
       status=st.sampled_from(["all", "active", "canceled", "past_due", "trialing", "ended"]))
def test_subscriptions_pages_cover_the_window_exactly_once(sandbox, limit, data, status):
    window = data.draw(windows(times(sandbox, "subscriptions")), label="window")
    now = sandbox.now

    def matches(created: int, sub) -> bool:
        current = sub.status(now)
        wanted = (status == "all" or current == status
                  or (status == "ended" and current in ("canceled", "incomplete_expired")))
        return wanted and in_window(created, window)

    check_both_directions(sandbox, "subscriptions", dict(window_params(window), status=status), limit, matches)


@SETTINGS
@given(limit=st.integers(1, 100), data=st.data())
def test_pages_agree_with_the_dataset(sandbox, limit, data):
    """The first page equals the stored collection filtered directly, and the has_more flag is exact."""
    window = data.draw(windows(times(sandbox, "charges")), label="window")
    records = [r for r in sandbox.dataset().collections["charges"].records if in_window(r.created, window)]
    body = get(sandbox, "/v1/charges", dict(window_params(window), limit=limit)).json()
    assert [o["id"] for o in body["data"]] == [r.id for r in records[:limit]]
    assert body["has_more"] == (len(records) > limit)


# --- determinism -----------------------------------------------------------------------------------

_PAGES = ("/v1/account", "/v1/charges?limit=100", "/v1/events?limit=100", "/v1/invoices?limit=20",
          "/v1/customers?limit=100", "/v1/subscriptions?status=all&limit=100", "/v1/coupons", "/v1/prices?limit=100")


def _pages(sandbox: Sandbox) -> dict[str, bytes]:
    return {path: get(sandbox, path).content for path in _PAGES}


def test_same_seed_serves_byte_identical_data():
    with Sandbox(seed=7, scale=20) as first:
        one = _pages(first)
        charge = first.history().charges[5].id
        one["charge"] = get(first, f"/v1/charges/{charge}").content
    with Sandbox(seed=7, scale=20) as second:
        two = _pages(second)
        two["charge"] = get(second, f"/v1/charges/{charge}").content
    assert one == two
    assert all(len(body) > 100 for body in one.values())


def test_different_seed_gives_different_ids():
    with Sandbox(seed=7, scale=20) as first, Sandbox(seed=8, scale=20) as second:
        assert first.accounts[0].id != second.accounts[0].id
        for resource in ("charges", "customers", "events", "invoices", "subscriptions"):
            params = {"limit": 100, "status": "all"} if resource == "subscriptions" else {"limit": 100}
            ids_one = {o["id"] for o in get(first, f"/v1/{resource}", params).json()["data"]}
            ids_two = {o["id"] for o in get(second, f"/v1/{resource}", params).json()["data"]}
            assert ids_one and ids_two
            assert not ids_one & ids_two, resource
