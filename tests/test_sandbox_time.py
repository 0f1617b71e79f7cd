"""The sandbox's clock over real HTTP: advancing it makes the business go on, every change is announced
by an event (the invariant the warehouse's incremental sync relies on), deletions, the 30-day event
window, listing lag, the horizon, the loopback control endpoint and determinism."""
from __future__ import annotations

import math
from email.utils import parsedate_to_datetime
from typing import Any, Callable

import pytest
import requests
import stripe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mbi_widgets import Sandbox
from mbi_widgets.errors import SandboxError
from mbi_widgets.sandbox.generator import DAY, EVENT_WINDOW_DAYS, HOUR, History

#: Small enough to build in a tenth of a second, big enough for renewals, refunds and deletions.
SCALE = 60
#: The resources whose changes the warehouse follows through events.
TRACKED = ("customers", "subscriptions", "invoices", "charges")


# --- helpers ----------------------------------------------------------------------------------------

def client_for(sandbox: Sandbox) -> stripe.StripeClient:
    return stripe.StripeClient(sandbox.restricted_key, base_addresses={"api": sandbox.api_url},
                               max_network_retries=0)


def get(sandbox: Sandbox, path: str, key: str | None = None, **params: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key or sandbox.restricted_key}"} if key != "" else {}
    return requests.get(sandbox.api_url + path, params=params, headers=headers, timeout=30)


def list_all(sandbox: Sandbox, resource: str, **params: Any) -> list[dict]:
    """Every object of a list endpoint, following `starting_after` pages of 100."""
    found: list[dict] = []
    while True:
        cursor = {"starting_after": found[-1]["id"]} if found else {}
        answer = get(sandbox, f"/v1/{resource}", limit=100, **params, **cursor)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found += body["data"]
        if not body["has_more"]:
            return found


def listed_ids(sandbox: Sandbox, resource: str, **params: Any) -> set[str]:
    return {obj["id"] for obj in list_all(sandbox, resource, **params)}


def served(sandbox: Sandbox, seen_before: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """What the API serves now for each tracked resource: id -> JSON (None when retrieve answers 404).

    Lists give the live objects; objects seen before that no longer list are retrieved, so a
    deleted customer shows as its stub and anything else that vanished as None.
    """
    snapshot: dict[str, dict[str, Any]] = {}
    for resource in TRACKED:
        extra = {"status": "all"} if resource == "subscriptions" else {}  # ended ones list only with status=all
        objects = {obj["id"]: obj for obj in list_all(sandbox, resource, **extra)}
        for object_id in set((seen_before or {}).get(resource, {})) - set(objects):
            answer = get(sandbox, f"/v1/{resource}/{object_id}")
            assert answer.status_code in (200, 404), answer.text
            objects[object_id] = answer.json() if answer.status_code == 200 else None
        snapshot[resource] = objects
    return snapshot


def event_subject(event: dict) -> str:
    """The id of the object an event is about (a refund's event tells of its charge)."""
    obj = event["data"]["object"]
    return obj["charge"] if obj["object"] == "refund" else obj["id"]


def seed_where(wanted: Callable[[History, int], bool], tries: int = 60, **options: Any) -> int:
    """The first seed whose whole simulation (given it and the start) has what a test needs.

    Tests name the situation they need instead of a seed, so they keep their subject when the
    generator changes.
    """
    options.setdefault("scale", SCALE)
    for seed in range(tries):
        sandbox = Sandbox(seed=seed, **options)
        if wanted(sandbox.history(whole=True), sandbox.started_at):
            return seed
    pytest.fail(f"none of the first {tries} seeds simulates what this test needs")


def clock_of(answer: requests.Response) -> int:
    when = parsedate_to_datetime(answer.headers["Date"])
    assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0
    return int(when.timestamp())


def post_advance(sandbox: Sandbox, key: str | None, **form: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{sandbox.api_url}/_sandbox/advance", data=form, headers=headers, timeout=30)


def assert_stripe_error(answer: requests.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


# --- the business goes on ----------------------------------------------------------------------------

def test_advance_brings_new_customers_charges_and_invoices_created_in_the_elapsed_time():
    seed = seed_where(lambda h, start: any(start < c.created <= start + 14 * DAY for c in h.customers))
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        client = client_for(sandbox)
        t0 = sandbox.now
        assert sandbox.started_at == t0
        # Nothing from the sandbox's future is served before the clock gets there.
        assert not client.v1.charges.list({"created": {"gt": t0}, "limit": 100}).data
        before = {resource: listed_ids(sandbox, resource) for resource in ("customers", "charges", "invoices")}

        t1 = sandbox.advance(days=14)
        assert t1 == t0 + 14 * DAY == sandbox.now
        assert sandbox.started_at == t0
        history = sandbox.history()
        expected = {"customers": history.customers, "charges": history.charges, "invoices": history.invoices}
        for resource in ("customers", "charges", "invoices"):
            objects = list_all(sandbox, resource)
            assert all(obj["created"] <= t1 for obj in objects), resource
            new = [obj for obj in objects if obj["id"] not in before[resource]]
            assert new, f"two weeks of business brought no new {resource}"
            assert all(t0 < obj["created"] <= t1 for obj in new), resource
            # Exactly the generated objects of the elapsed time appeared (none missing, none extra).
            assert {obj["id"] for obj in new} == {o.id for o in expected[resource] if t0 < o.created <= t1}
        # stripe-python sees the same new charges through a created window.
        window = client.v1.charges.list({"created": {"gt": t0, "lte": t1}, "limit": 100})
        assert {charge.id for charge in window.data} == {o.id for o in history.charges if t0 < o.created <= t1}


def test_every_answer_carries_the_sandbox_clock_in_its_date_header():
    with Sandbox(seed=3, scale=SCALE) as sandbox:
        def answers() -> list[requests.Response]:
            return [get(sandbox, "/v1/charges", limit=1), get(sandbox, "/v1/charges/ch_nothing"),
                    get(sandbox, "/v1/nowhere"), get(sandbox, "/v1/charges", key="")]

        assert [a.status_code for a in answers()] == [200, 404, 404, 401]
        for answer in answers():
            assert clock_of(answer) == sandbox.now == sandbox.started_at
        moved = sandbox.advance(days=2, hours=7, minutes=3, seconds=9)
        assert moved == sandbox.started_at + 2 * DAY + 7 * HOUR + 3 * 60 + 9
        for answer in answers():
            assert clock_of(answer) == moved


def test_events_list_only_the_last_30_days_of_the_sandbox_clock():
    with Sandbox(seed=4, scale=SCALE) as sandbox:
        client = client_for(sandbox)
        at_start = list_all(sandbox, "events")
        oldest = min(at_start, key=lambda e: e["created"])
        assert oldest["created"] < sandbox.now - 10 * DAY  # so that 40 days later it is out of the window
        assert client.v1.events.retrieve(oldest["id"]).id == oldest["id"]

        now = sandbox.advance(days=40)
        events = list_all(sandbox, "events")
        window_start = now - EVENT_WINDOW_DAYS * DAY
        assert events and all(window_start <= e["created"] <= now for e in events)
        expected = {e.id for e in sandbox.history().events if window_start <= e.created <= now}
        assert {e["id"] for e in events} == expected
        # Asking for older events explicitly gives nothing either.
        assert not list_all(sandbox, "events", **{"created[lt]": window_start})
        with pytest.raises(stripe.InvalidRequestError) as missing:
            client.v1.events.retrieve(oldest["id"])
        assert missing.value.http_status == 404
        assert missing.value.code == "resource_missing"
        newest = max(events, key=lambda e: e["created"])
        assert client.v1.events.retrieve(newest["id"]).id == newest["id"]


# --- every change is announced by an event ----------------------------------------------------------

#: A move of the clock: minutes, hours or days (at most 20, so events of the whole step stay
#: listable), or onto the moment of the n-th next event, or the second before it: the instants
#: where the served state changes, which random durations would almost never hit.
DURATIONS = st.one_of(st.integers(60, HOUR), st.integers(HOUR, 2 * DAY), st.integers(2 * DAY, 20 * DAY))
MOVES = st.one_of(DURATIONS, st.tuples(st.integers(0, 12), st.sampled_from([0, -1])))


def next_moment(sandbox: Sandbox, move: int | tuple[int, int], end: int) -> int:
    if isinstance(move, int):
        return min(sandbox.now + move, end)
    index, offset = move
    upcoming = sorted({e.created for e in sandbox.history(whole=True).events if sandbox.now < e.created <= end})
    if not upcoming:
        return sandbox.now
    return max(sandbox.now, upcoming[min(index, len(upcoming) - 1)] + offset)


def assert_changes_announced(sandbox: Sandbox, before: dict, after: dict, t0: int, t1: int) -> int:
    """Every tracked object whose served JSON differs between t0 and t1 is named by an event in
    (t0, t1]; returns how many objects changed."""
    events = list_all(sandbox, "events", **{"created[gt]": t0, "created[lte]": t1})
    assert all(t0 < e["created"] <= t1 for e in events)
    announced = {event_subject(e) for e in events}
    changed = 0
    for resource in TRACKED:
        for object_id in set(before[resource]) | set(after[resource]):
            old, new = before[resource].get(object_id), after[resource].get(object_id)
            if old == new:
                continue
            changed += 1
            fields = (sorted(k for k in {*old, *new} if old.get(k) != new.get(k)) if old and new
                      else "appeared" if new else "vanished")
            assert object_id in announced, (
                f"{resource} {object_id} changed ({fields}) between {t0} and {t1} "
                f"(+{(t0 - sandbox.started_at) / DAY:.5f}d to +{(t1 - sandbox.started_at) / DAY:.5f}d) "
                "but no event in that window names it")
    return changed


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1_000), moves=st.lists(MOVES, min_size=1, max_size=5))
@example(seed=1, moves=[3 * DAY, 11 * DAY, 20 * DAY])
@example(seed=2, moves=[(0, -1), (0, 0), (5, 0), 5 * DAY])
def test_every_change_between_two_moments_is_announced_by_an_event(seed, moves):
    """The warehouse's incremental sync re-fetches what events name: if an object's served JSON
    changed between two syncs and no event in between names it, the warehouse keeps a stale row."""
    with Sandbox(seed=seed, scale=SCALE, horizon_days=60) as sandbox:
        end = sandbox.started_at + 60 * DAY
        t0, before = sandbox.now, served(sandbox)
        changed = 0
        for move in moves:
            t1 = sandbox.advance(seconds=next_moment(sandbox, move, end) - sandbox.now)
            after = served(sandbox, before)
            changed += assert_changes_announced(sandbox, before, after, t0, t1)
            before, t0 = after, t1
        if sandbox.now - sandbox.started_at >= 3 * DAY:  # three days of a subscription business change something
            assert changed


def test_stopping_at_every_moment_something_happens_no_change_goes_unannounced():
    """Random moves rarely stop between a change and a later event that names it by chance (a
    payment attempt changes its invoice a second before `invoice.paid`); stop at every one."""
    span = 5 * DAY  # with a customer deleted in it: the seed is chosen for that
    seed = seed_where(lambda h, start: any(c.deleted_at is not None and start < c.deleted_at <= start + span
                                           for c in h.customers))
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        start = sandbox.now
        moments = sorted({e.created for e in sandbox.history(whole=True).events if start < e.created <= start + span})
        assert len(moments) >= 10
        t0, before, changed = start, served(sandbox), 0
        for moment in moments:
            t1 = sandbox.advance(seconds=moment - t0)
            after = served(sandbox, before)
            changed += assert_changes_announced(sandbox, before, after, t0, t1)
            before, t0 = after, t1
        assert changed >= len(moments) // 2


# --- deletions --------------------------------------------------------------------------------------

def test_a_customer_deleted_while_the_clock_runs_leaves_lists_retrieves_as_a_stub_and_has_an_event():
    seed = seed_where(lambda h, start: any(c.deleted_at is not None and c.deleted_at > start for c in h.customers))
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        client = client_for(sandbox)
        victim = min((c for c in sandbox.history(whole=True).customers
                      if c.deleted_at is not None and c.deleted_at > sandbox.now), key=lambda c: c.deleted_at)
        sandbox.advance(seconds=victim.deleted_at - 1 - sandbox.now)
        assert victim.id in listed_ids(sandbox, "customers")
        assert client.v1.customers.retrieve(victim.id).email

        sandbox.advance(seconds=1)
        assert victim.id not in listed_ids(sandbox, "customers")
        answer = get(sandbox, f"/v1/customers/{victim.id}")
        assert answer.status_code == 200
        assert answer.json() == {"id": victim.id, "object": "customer", "deleted": True}
        assert client.v1.customers.retrieve(victim.id).deleted is True
        events = list_all(sandbox, "events", type="customer.deleted")
        mine = [e for e in events if e["data"]["object"]["id"] == victim.id]
        assert len(mine) == 1 and mine[0]["created"] == victim.deleted_at


@pytest.mark.parametrize("resource, noun", [("coupons", "coupon"), ("plans", "plan")])
def test_a_deleted_coupon_or_plan_answers_404_resource_missing(resource, noun):
    with Sandbox(seed=0, scale=SCALE) as sandbox:
        whole = sandbox.history(whole=True)
        facts = whole.coupons if resource == "coupons" else whole.plans
        doomed = min((o for o in facts if o.deleted_at is not None and o.deleted_at > sandbox.now),
                     key=lambda o: o.deleted_at)
        assert get(sandbox, f"/v1/{resource}/{doomed.id}").status_code == 200
        assert doomed.id in listed_ids(sandbox, resource)

        sandbox.advance(seconds=doomed.deleted_at - sandbox.now)
        error = assert_stripe_error(get(sandbox, f"/v1/{resource}/{doomed.id}"), 404)
        assert error["code"] == "resource_missing"
        assert doomed.id not in listed_ids(sandbox, resource)
        with pytest.raises(stripe.InvalidRequestError) as missing:
            getattr(client_for(sandbox).v1, resource).retrieve(doomed.id)
        assert missing.value.code == "resource_missing"
        deleted_events = list_all(sandbox, "events", type=f"{noun}.deleted")
        assert doomed.id in {e["data"]["object"]["id"] for e in deleted_events}


# --- long invoices ----------------------------------------------------------------------------------

def test_an_invoice_with_more_than_ten_lines_appears_and_its_lines_page_beyond_ten():
    seed = seed_where(lambda h, start: any(len(i.lines) > 10 and start < i.created <= start + 30 * DAY
                                           for i in h.invoices))
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        t0 = sandbox.now
        t1 = sandbox.advance(days=30)
        new = [inv for inv in list_all(sandbox, "invoices") if t0 < inv["created"] <= t1]
        long = [inv for inv in new if inv["lines"]["has_more"]]
        assert long, "no invoice with more than 10 lines listed, though one was issued in these 30 days"
        invoice = long[0]
        assert len(invoice["lines"]["data"]) == 10
        url = f"/v1/invoices/{invoice['id']}/lines"
        first = get(sandbox, url, limit=10).json()
        assert first["has_more"] is True and len(first["data"]) == 10
        rest = get(sandbox, url, limit=100, starting_after=first["data"][-1]["id"]).json()
        lines = first["data"] + rest["data"]
        assert rest["has_more"] is False and len(lines) > 10
        assert len({line["id"] for line in lines}) == len(lines)
        assert sum(line["amount"] for line in lines) == invoice["subtotal"]
        assert [line["id"] for line in lines[:10]] == [line["id"] for line in invoice["lines"]["data"]]
        # Its invoice.created event embeds at most 10 lines too: the sync must page the child endpoint.
        created = [e for e in list_all(sandbox, "events", type="invoice.created")
                   if e["data"]["object"]["id"] == invoice["id"]]
        assert len(created) == 1
        assert created[0]["data"]["object"]["lines"]["has_more"] is True
        assert len(created[0]["data"]["object"]["lines"]["data"]) == 10


# --- listing lag ------------------------------------------------------------------------------------

def test_listing_lag_hides_fresh_objects_from_lists_but_not_from_retrieve():
    lag = 900
    with Sandbox(seed=5, scale=SCALE, listing_lag=lag) as sandbox:
        whole = sandbox.history(whole=True)
        target = min(c.created for c in whole.charges if c.created > sandbox.now + lag)
        now = sandbox.advance(seconds=target - sandbox.now)
        history = sandbox.history()
        facts = {"customers": history.customers, "charges": history.charges, "invoices": history.invoices}
        hidden_somewhere = False
        for resource, objects in facts.items():
            listed = listed_ids(sandbox, resource)
            fresh = [o.id for o in objects if o.created > now - lag]
            settled = {o.id for o in objects if o.created <= now - lag}
            assert settled <= listed, f"{resource} older than the lag must list"
            for object_id in fresh:
                answer = get(sandbox, f"/v1/{resource}/{object_id}")
                assert answer.status_code == 200 and answer.json()["id"] == object_id
            hidden_somewhere |= bool(set(fresh) - listed)
        assert target in {c.created for c in history.charges}
        assert hidden_somewhere, "a charge created this very second already lists despite a 900 s lag"

        later = sandbox.advance(seconds=lag)
        for resource, objects in facts.items():
            assert {o.id for o in objects} <= listed_ids(sandbox, resource), resource
        assert later == now + lag


# --- the horizon and going backwards -------------------------------------------------------------------

def test_the_clock_stops_at_the_horizon_and_never_goes_back():
    with Sandbox(seed=1, scale=20, horizon_days=3) as sandbox:
        start = sandbox.now
        assert sandbox.advance(days=2) == start + 2 * DAY
        with pytest.raises(SandboxError, match="horizon_days"):
            sandbox.advance(days=1, seconds=1)
        for backwards in ({"days": -1}, {"seconds": -1}, {"hours": 1, "minutes": -61}):
            with pytest.raises(SandboxError):
                sandbox.advance(**backwards)
        assert sandbox.now == start + 2 * DAY  # a refused advance leaves the clock alone
        assert clock_of(get(sandbox, "/v1/charges", limit=1)) == start + 2 * DAY
        assert sandbox.advance(days=1) == start + 3 * DAY  # the horizon itself is reachable
        with pytest.raises(SandboxError):
            sandbox.advance(seconds=1)
        assert sandbox.now == start + 3 * DAY
    with Sandbox(seed=1, scale=20) as sandbox:  # 60 days by default
        with pytest.raises(SandboxError):
            sandbox.advance(days=61)
        assert sandbox.advance(days=60) == sandbox.started_at + 60 * DAY


@pytest.mark.parametrize("duration", [{"days": math.inf}, {"hours": math.nan}, {"seconds": 1e400}])
def test_non_finite_durations_raise_sandbox_error(duration):
    """`advance` documents SandboxError for moves beyond the horizon: infinity is one, NaN no duration."""
    with Sandbox(seed=1, scale=20, horizon_days=3) as sandbox:
        with pytest.raises(SandboxError):
            sandbox.advance(**duration)
        assert sandbox.now == sandbox.started_at


# --- the control endpoint ----------------------------------------------------------------------------

def test_control_endpoint_moves_the_clock_with_the_platform_secret_key():
    with Sandbox(seed=3, scale=SCALE) as sandbox:
        start = sandbox.now
        answer = post_advance(sandbox, sandbox.secret_key, days="1.5", hours="2", minutes="3", seconds="4")
        assert answer.status_code == 200, answer.text
        expected = start + DAY * 3 // 2 + 2 * HOUR + 3 * 60 + 4
        assert answer.json() == {"object": "sandbox_clock", "now": expected}
        assert sandbox.now == expected
        assert clock_of(answer) == expected
        assert clock_of(get(sandbox, "/v1/charges", limit=1)) == expected
        # The data moved with the clock: what was created meanwhile now lists.
        charges = list_all(sandbox, "charges", **{"created[gt]": start})
        assert charges and {c["id"] for c in charges} == {
            c.id for c in sandbox.history().charges if c.created > start}
        again = post_advance(sandbox, sandbox.secret_key, minutes="30")
        assert again.json()["now"] == expected + 1_800 == sandbox.now


KEYS = {
    "restricted key": lambda sandbox: sandbox.restricted_key,
    "another account's restricted key": lambda sandbox: sandbox.create_restricted_key({"charges"}, account=1),
    "no key": lambda sandbox: None,
    "unknown secret key": lambda sandbox: "sk_test_" + "x" * 24,
}


@pytest.mark.parametrize("who", list(KEYS))
def test_control_endpoint_refuses_any_key_but_the_platform_secret_key(who):
    with Sandbox(seed=3, scale=20) as sandbox:
        answer = post_advance(sandbox, KEYS[who](sandbox), days="1")
        assert_stripe_error(answer, 403 if "restricted" in who else 401)
        assert sandbox.now == sandbox.started_at


@pytest.mark.parametrize("form", [{"days": "-1"}, {"hours": "-0.5"}, {"days": "abc"}, {"days": "1", "seconds": "x"},
                                  {"days": "nan"}, {"days": "inf"}, {"seconds": "1e400"}, {"days": "61"}])
def test_control_endpoint_answers_400_to_a_negative_garbage_or_too_far_duration(form):
    with Sandbox(seed=3, scale=20) as sandbox:
        answer = post_advance(sandbox, sandbox.secret_key, **form)
        error = assert_stripe_error(answer, 400)
        assert error.get("param") == "days"
        assert sandbox.now == sandbox.started_at
        assert clock_of(answer) == sandbox.started_at


# --- determinism ------------------------------------------------------------------------------------

def _advanced_charges(seed: int) -> list[dict]:
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        sandbox.advance(days=3, hours=5)
        sandbox.advance(days=12, minutes=17)
        return list_all(sandbox, "charges")


def test_the_same_seed_advanced_the_same_way_serves_identical_charges():
    first, second = _advanced_charges(7), _advanced_charges(7)
    assert first and first == second
    # The comparison has teeth: another seed serves other charges.
    assert [c["id"] for c in _advanced_charges(8)] != [c["id"] for c in first]


# --- a subscription that ended reads canceled ---------------------------------------------------------

def _ended_while_an_invoice_was_unpaid(history: History, start: int) -> list:
    """Subscriptions ending in the event window or later, before one of their invoices is paid on a retry."""
    return [s for s in history.subscriptions
            if s.ended_at is not None and s.ended_at > start - (EVENT_WINDOW_DAYS - 1) * DAY
            and any(i.paid_at is not None and i.paid_at > s.ended_at for i in s.invoices)]


def test_a_subscription_that_ended_reads_canceled_and_so_does_its_deleted_event():
    """Stripe: `customer.subscription.deleted` means the subscription ended, status `canceled`.

    Guards the generator's churn after a late-paid invoice: the cancellation is drawn anywhere in
    the period, so it can come before a retry pays the period's invoice. The test looks for a seed
    where that happens (rare at this scale) and otherwise checks seed 0.
    """
    seed, subject = 0, None
    for candidate in range(60):
        sandbox = Sandbox(seed=candidate, scale=SCALE)
        found = _ended_while_an_invoice_was_unpaid(sandbox.history(whole=True), sandbox.started_at)
        if found:
            seed, subject = candidate, found[0]
            break
    with Sandbox(seed=seed, scale=SCALE) as sandbox:
        sandbox.advance(seconds=max(0, subject.ended_at - sandbox.now) if subject else 10 * DAY)
        deleted = list_all(sandbox, "events", type="customer.subscription.deleted")
        assert deleted
        if subject is not None:
            assert subject.id in {e["data"]["object"]["id"] for e in deleted}
        wrong_events = {e["data"]["object"]["id"]: e["data"]["object"]["status"] for e in deleted
                        if e["data"]["object"]["status"] != "canceled"}
        listed = list_all(sandbox, "subscriptions", status="all")
        wrong = {s["id"]: s["status"] for s in listed if s["ended_at"] is not None and s["status"] != "canceled"}
        assert (wrong_events, wrong) == ({}, {}), "ended subscriptions that do not read canceled"
