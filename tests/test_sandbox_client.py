"""stripe-python 16's StripeClient against the sandbox: lists, retrieves, expansion, sub-lists, Connect
headers and the mapping of every error status to the right stripe exception class."""
from __future__ import annotations

import pytest
import requests
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from mbi_widgets import Sandbox
from mbi_widgets.sandbox.generator import DAY, EVENT_WINDOW_DAYS, History

from .conftest import make_client

RESOURCES = ("customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events", "products",
             "prices", "refunds")
#: The stripe-python class each list's objects deserialise to.
CLASSES = {"customers": stripe.Customer, "charges": stripe.Charge, "coupons": stripe.Coupon,
           "invoices": stripe.Invoice, "plans": stripe.Plan, "subscriptions": stripe.Subscription,
           "events": stripe.Event, "products": stripe.Product, "prices": stripe.Price, "refunds": stripe.Refund}
ENDED = ("canceled", "incomplete_expired")


def facts(history: History, resource: str) -> list:
    """The generator's objects behind a list endpoint (a price is a plan seen through the Prices API)."""
    return {"customers": history.customers, "charges": history.charges, "coupons": history.coupons,
            "invoices": history.invoices, "plans": history.plans, "prices": history.plans,
            "subscriptions": history.subscriptions, "events": history.events, "products": history.products,
            "refunds": history.refunds}[resource]


def newest_first(objects) -> list[str]:
    return [o.id for o in sorted(objects, key=lambda o: (o.created, o.id), reverse=True)]


def default_list_ids(sandbox: Sandbox, resource: str) -> list[str]:
    """What `GET /v1/<resource>` without filters should serve, in order, from the generated facts."""
    history = sandbox.history()
    objects = facts(history, resource)
    if resource == "subscriptions":
        objects = [s for s in objects if s.status(sandbox.now) not in ENDED]
    if resource == "events":
        objects = [e for e in objects if e.created >= sandbox.now - EVENT_WINDOW_DAYS * DAY]
    return newest_first(objects)


def service(client: stripe.StripeClient, resource: str):
    return getattr(client.v1, resource)


def http_get(sandbox: Sandbox, path: str, key: str | None = None, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {"Authorization": f"Bearer {key or sandbox.restricted_key}"})
    return requests.get(sandbox.api_url + path, headers=headers, timeout=30, **kwargs)


def long_subscription(sandbox: Sandbox):
    return next(s for s in sandbox.history().subscriptions if len(s.items) > 10)


def long_invoice(sandbox: Sandbox):
    return next(i for i in sandbox.history().invoices if len(i.lines) > 10)


def many_refunds_charge(sandbox: Sandbox):
    return next(c for c in sandbox.history().charges if len(c.refunds) > 10)


# --- lists and retrieves ---------------------------------------------------------------------------

@pytest.mark.parametrize("resource", RESOURCES)
def test_first_page_is_newest_first_and_typed(client, sandbox, resource):
    page = service(client, resource).list({"limit": 5})
    expected = default_list_ids(sandbox, resource)
    assert page.object == "list"
    assert page.url == f"/v1/{resource}"
    assert [o.id for o in page.data] == expected[:5]
    assert page.has_more == (len(expected) > 5)
    assert all(isinstance(o, CLASSES[resource]) for o in page.data)


@pytest.mark.parametrize("resource", RESOURCES)
def test_auto_paging_iter_returns_every_object_once(client, sandbox, resource):
    ids = [o.id for o in service(client, resource).list({"limit": 100}).auto_paging_iter()]
    expected = default_list_ids(sandbox, resource)
    assert ids == expected
    assert len(set(ids)) == len(ids)
    if resource not in ("subscriptions", "events"):  # these lists filter by default
        assert len(ids) == sandbox.dataset().count(resource) == len(facts(sandbox.history(), resource))


def test_auto_paging_iter_with_small_pages(client, sandbox):
    ids = [p.id for p in client.v1.plans.list({"limit": 7}).auto_paging_iter()]
    assert ids == default_list_ids(sandbox, "plans")
    assert len(ids) == sandbox.dataset().count("plans") > 7


def test_subscriptions_list_hides_ended_ones_unless_status_all(client, sandbox):
    history = sandbox.history()
    default = list(client.v1.subscriptions.list({"limit": 100}).auto_paging_iter())
    assert default and all(s.status not in ENDED for s in default)
    everything = list(client.v1.subscriptions.list({"limit": 100, "status": "all"}).auto_paging_iter())
    assert [s.id for s in everything] == newest_first(history.subscriptions)
    assert len(everything) == sandbox.dataset().count("subscriptions") > len(default)
    canceled = list(client.v1.subscriptions.list({"limit": 100, "status": "canceled"}).auto_paging_iter())
    assert canceled and all(s.status == "canceled" for s in canceled)
    assert {s.id for s in canceled} == {s.id for s in history.subscriptions if s.status(sandbox.now) == "canceled"}


def test_events_type_wildcard_and_types_array(client, sandbox):
    history = sandbox.history()
    invoice_events = [e.id for e in client.v1.events.list({"limit": 100, "type": "invoice.*"}).auto_paging_iter()]
    assert invoice_events == newest_first(e for e in history.events if e.type.startswith("invoice."))
    assert invoice_events
    exact = [e.id for e in client.v1.events.list({"limit": 100, "type": "invoice.paid"}).auto_paging_iter()]
    assert exact == newest_first(e for e in history.events if e.type == "invoice.paid")
    assert 0 < len(exact) < len(invoice_events)
    wanted = {"charge.succeeded", "charge.failed"}
    several = list(client.v1.events.list({"limit": 100, "types": sorted(wanted)}).auto_paging_iter())
    assert [e.id for e in several] == newest_first(e for e in history.events if e.type in wanted)
    assert {e.type for e in several} == wanted


def test_events_only_within_30_days(client, sandbox):
    events = list(client.v1.events.list({"limit": 100}).auto_paging_iter())
    assert events
    assert all(sandbox.now - EVENT_WINDOW_DAYS * DAY <= e.created <= sandbox.now for e in events)
    assert min(e.created for e in events) < sandbox.now - (EVENT_WINDOW_DAYS - 5) * DAY  # the window is used


@pytest.mark.parametrize("resource", RESOURCES)
def test_retrieve_each(client, sandbox, resource):
    objects = sorted(facts(sandbox.history(), resource), key=lambda o: (o.created, o.id))
    for fact in (objects[0], objects[len(objects) // 2], objects[-1]):
        found = service(client, resource).retrieve(fact.id)
        assert isinstance(found, CLASSES[resource])
        assert found.id == fact.id
        assert found.created == fact.created


def test_retrieve_subscription_item(client, sandbox):
    sub = long_subscription(sandbox)
    item = sub.items[-1]
    found = client.v1.subscription_items.retrieve(item.id)
    assert isinstance(found, stripe.SubscriptionItem)
    assert found.id == item.id and found.subscription == sub.id and found.price.id == item.plan.id


def test_raw_request_and_deserialize(client, sandbox):
    response = client.raw_request("get", "/v1/charges", limit=2)
    assert response.code == 200
    page = client.deserialize(response, api_mode="V1")
    assert isinstance(page, stripe.ListObject)
    assert [c.id for c in page.data] == default_list_ids(sandbox, "charges")[:2]
    assert all(isinstance(c, stripe.Charge) for c in page.data)
    assert page.has_more is True


def test_get_account(client, sandbox):
    account = client.v1.accounts.retrieve_current()
    assert isinstance(account, stripe.Account)
    assert account.id == sandbox.accounts[0].id
    assert account.email == sandbox.accounts[0].email


# --- expansion -------------------------------------------------------------------------------------

@pytest.mark.parametrize("resource", ("charges", "invoices", "subscriptions"))
def test_expand_data_customer(client, sandbox, resource):
    owner = {o.id: o.customer for o in facts(sandbox.history(), resource)}
    params = {"limit": 25, "expand": ["data.customer"]}
    if resource == "subscriptions":
        params["status"] = "all"
    page = service(client, resource).list(params)
    plain = service(client, resource).list({k: v for k, v in params.items() if k != "expand"})
    assert [o.id for o in page.data] == [o.id for o in plain.data]
    for obj in page.data:
        assert isinstance(obj.customer, stripe.Customer)
        assert obj.customer.id == owner[obj.id].id
        if owner[obj.id].deleted_at is not None and owner[obj.id].deleted_at <= sandbox.now:
            assert obj.customer.to_dict().get("deleted") is True  # a deleted customer expands to its stub
        else:
            assert obj.customer.email == owner[obj.id].attrs(sandbox.now)["email"]
    assert all(isinstance(o.customer, str) for o in plain.data)


@pytest.mark.parametrize("resource", ("charges", "invoices", "subscriptions"))
def test_retrieve_expand_customer(client, sandbox, resource):
    fact = next(f for f in facts(sandbox.history(), resource)[3:] if f.customer.deleted_at is None)
    found = service(client, resource).retrieve(fact.id, {"expand": ["customer"]})
    assert isinstance(found.customer, stripe.Customer)
    assert found.customer.id == fact.customer.id
    assert found.customer.name == fact.customer.attrs(sandbox.now)["name"]
    assert service(client, resource).retrieve(fact.id).customer == fact.customer.id


# --- sub-lists -------------------------------------------------------------------------------------

def test_invoice_lines_embedded_then_full(client, sandbox):
    invoice = long_invoice(sandbox)
    expected = [line.id for line in invoice.lines]
    served = client.v1.invoices.retrieve(invoice.id)
    assert served.lines.url == f"/v1/invoices/{invoice.id}/lines"
    assert [line.id for line in served.lines.data] == expected[:10]
    assert served.lines.has_more is True
    full = client.v1.invoices.line_items.list(invoice.id, {"limit": 100})
    assert [line.id for line in full.data] == expected and full.has_more is False
    assert all(isinstance(line, stripe.InvoiceLineItem) and line.invoice == invoice.id for line in full.data)
    paged = [line.id for line in client.v1.invoices.line_items.list(invoice.id, {"limit": 4}).auto_paging_iter()]
    assert paged == expected
    raw = client.deserialize(client.raw_request("get", f"/v1/invoices/{invoice.id}/lines", limit=100), api_mode="V1")
    assert [line.id for line in raw.data] == expected


def test_short_invoice_lines_are_complete(client, sandbox):
    invoice = next(i for i in sandbox.history().invoices if 1 < len(i.lines) <= 10)
    served = client.v1.invoices.retrieve(invoice.id)
    assert [line.id for line in served.lines.data] == [line.id for line in invoice.lines]
    assert served.lines.has_more is False


def test_subscription_items_embedded_then_full(client, sandbox):
    sub = long_subscription(sandbox)
    expected = [item.id for item in sub.items]
    served = client.v1.subscriptions.retrieve(sub.id)
    items = served["items"]
    assert items.url == f"/v1/subscription_items?subscription={sub.id}"
    assert [i.id for i in items.data] == expected[:10] and items.has_more is True
    full = client.v1.subscription_items.list({"subscription": sub.id, "limit": 100})
    assert [i.id for i in full.data] == expected and full.has_more is False
    paged = [i.id for i in client.v1.subscription_items.list({"subscription": sub.id, "limit": 3}).auto_paging_iter()]
    assert paged == expected


def test_charge_refunds_embedded_then_full(client, sandbox):
    charge = many_refunds_charge(sandbox)
    expected = [refund.id for refund in reversed(charge.refunds)]  # newest first, as Stripe embeds them
    assert len(expected) == 12
    assert "refunds" not in client.v1.charges.retrieve(charge.id)  # includable since API version 2022-11-15
    served = client.v1.charges.retrieve(charge.id, {"expand": ["refunds"]})
    assert served.refunds.url == f"/v1/charges/{charge.id}/refunds"
    assert [r.id for r in served.refunds.data] == expected[:10] and served.refunds.has_more is True
    raw = client.deserialize(client.raw_request("get", f"/v1/charges/{charge.id}/refunds", limit=100), api_mode="V1")
    assert [r.id for r in raw.data] == expected and raw.has_more is False
    by_filter = list(client.v1.refunds.list({"charge": charge.id, "limit": 100}).auto_paging_iter())
    assert {r.id for r in by_filter} == set(expected)
    assert all(r.charge == charge.id for r in by_filter)


def _filter_cases():
    """Filters the sandbox accepts for a list, with what Stripe would answer (ids, from the generated facts)."""
    return [
        ("charges", lambda h: {"payment_intent": h.charges[0].payment_intent}, lambda h: [h.charges[0].id]),
        ("charges", lambda h: {"transfer_group": "group_none"}, lambda h: []),
        ("prices", lambda h: {"currency": "jpy"}, lambda h: []),
        ("prices", lambda h: {"type": "one_time"}, lambda h: []),
        ("prices", lambda h: {"lookup_keys": ["starter_monthly"]},
         lambda h: [p.id for p in h.plans if p.lookup_key == "starter_monthly"]),
        ("products", lambda h: {"ids": [h.products[0].id]}, lambda h: [h.products[0].id]),
        ("invoices", lambda h: {"collection_method": "send_invoice"}, lambda h: []),
        ("subscriptions", lambda h: {"collection_method": "send_invoice"}, lambda h: []),
        ("customers", lambda h: {"test_clock": "clock_none"}, lambda h: []),
    ]


# Guards: every filter a list accepts really filters (none is silently ignored).
@pytest.mark.parametrize("resource, params, expected", _filter_cases(),
                         ids=["charges-payment_intent", "charges-transfer_group", "prices-currency", "prices-type",
                              "prices-lookup_keys", "products-ids", "invoices-collection_method",
                              "subscriptions-collection_method", "customers-test_clock"])
def test_accepted_filters_filter(client, sandbox, resource, params, expected):
    history = sandbox.history()
    page = service(client, resource).list({**params(history), "limit": 100})
    assert ([o.id for o in page.data], page.has_more) == (expected(history), False)


# --- Connect -------------------------------------------------------------------------------------

def test_stripe_account_header_reaches_connected_account(sandbox):
    other = sandbox.accounts[1]
    platform = make_client(sandbox, sandbox.secret_key)
    assert platform.v1.accounts.retrieve_current().id == sandbox.platform_account_id
    connected = make_client(sandbox, sandbox.secret_key, stripe_account=other.id)
    assert connected.v1.accounts.retrieve_current().id == other.id
    customers = [c.id for c in connected.v1.customers.list({"limit": 100}).auto_paging_iter()]
    assert customers == newest_first(sandbox.history(1).customers)
    assert not set(customers) & {c.id for c in sandbox.history(0).customers}
    per_request = platform.v1.charges.list({"limit": 3}, {"stripe_account": other.id})
    assert [c.id for c in per_request.data] == newest_first(sandbox.history(1).charges)[:3]


def test_stripe_account_header_for_unknown_account_is_403(sandbox):
    client = make_client(sandbox, sandbox.secret_key, stripe_account="acct_1DoesNotExist00")
    with pytest.raises(stripe.PermissionError) as caught:
        client.v1.customers.list()
    assert caught.value.http_status == 403
    assert caught.value.json_body["error"]["code"] == "account_invalid"


def test_restricted_key_cannot_act_for_another_account(sandbox):
    client = make_client(sandbox, sandbox.restricted_key, stripe_account=sandbox.accounts[1].id)
    with pytest.raises(stripe.PermissionError):
        client.v1.customers.list()


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, param", [
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"limit": "abc"}, "limit"),
    ({"no_such_param": "x"}, "no_such_param"),
    ({"starting_after": "ch_DoesNotExist0000000000"}, "starting_after"),
    ({"ending_before": "ch_DoesNotExist0000000000"}, "ending_before"),
    ({"created": {"gte": "soon"}}, "created[gte]"),
    ({"expand": ["data.invoice"]}, "expand"),
])
def test_bad_list_parameters_are_invalid_request_errors(client, params, param):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.charges.list(params)
    assert caught.value.http_status == 400
    assert caught.value.param == param
    assert caught.value.error.type == "invalid_request_error"


def test_unknown_cursor_is_resource_missing(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.customers.list({"starting_after": "cus_Nobody"})
    assert caught.value.code == "resource_missing" and caught.value.param == "starting_after"


@pytest.mark.parametrize("key", ["sk_test_NotARealKey0000000000000000", "rk_test_wrong", ""])
def test_wrong_or_missing_key_is_authentication_error(sandbox, key):
    with pytest.raises(stripe.AuthenticationError) as caught:
        make_client(sandbox, key).v1.charges.list()
    assert caught.value.http_status == 401


def test_restricted_key_without_permission_is_permission_error(sandbox):
    only_customers = make_client(sandbox, sandbox.create_restricted_key({"customers"}))
    assert only_customers.v1.customers.list({"limit": 1}).data
    with pytest.raises(stripe.PermissionError) as caught:
        only_customers.v1.charges.list()
    assert caught.value.http_status == 403
    with pytest.raises(stripe.PermissionError):
        only_customers.v1.invoices.retrieve(sandbox.history().invoices[0].id)
    with pytest.raises(stripe.PermissionError):
        only_customers.v1.subscription_items.list({"subscription": sandbox.history().subscriptions[0].id})
    with pytest.raises(stripe.PermissionError):
        only_customers.v1.accounts.retrieve_current()


@pytest.mark.parametrize("resource, object_id", [("charges", "ch_Missing"), ("customers", "cus_Missing"),
                                                 ("events", "evt_Missing"), ("coupons", "NOSUCHCOUPON")])
def test_unknown_id_is_resource_missing(client, resource, object_id):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        service(client, resource).retrieve(object_id)
    assert caught.value.http_status == 404
    assert caught.value.code == "resource_missing"


def test_unknown_parent_of_sub_list_is_resource_missing(client):
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.invoices.line_items.list("in_Missing")
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.subscription_items.list({"subscription": "sub_Missing"})
    assert caught.value.http_status == 404 and caught.value.param == "subscription"


def test_rate_limit_is_rate_limit_error():
    with Sandbox(seed=1, scale=20, rate_limits={"per_account": 1, "per_endpoint": 1}) as limited:
        client = make_client(limited, limited.restricted_key, max_network_retries=0)
        with pytest.raises(stripe.RateLimitError) as caught:
            for _ in range(50):
                client.v1.customers.list({"limit": 1})
        assert caught.value.http_status == 429
        assert caught.value.error.code == "rate_limit"
        assert caught.value.headers["Stripe-Rate-Limited-Reason"] in ("endpoint-rate", "global-rate")


def test_server_error_is_api_error():
    with Sandbox(seed=1, scale=20) as faulty:
        client = make_client(faulty, faulty.restricted_key, max_network_retries=0)
        faulty.inject_fault("500", path="/v1/charges")
        assert client.v1.customers.list({"limit": 1}).data  # the fault waits for a /v1/charges request
        with pytest.raises(stripe.APIError) as caught:
            client.v1.charges.list({"limit": 1})
        assert caught.value.http_status == 500
        assert client.v1.charges.list({"limit": 1}).data  # one fault, then normal service


# --- malformed requests over plain HTTP -----------------------------------------------------------

def _assert_stripe_error(response: requests.Response, status: int | None = None, param: str | None = None) -> dict:
    assert 400 <= response.status_code < 500, response.text
    if status is not None:
        assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error.get("param") == param
    return error


@pytest.mark.parametrize("path, status, param", [
    ("/v1/charges?created[foo]=1", 400, "created[foo]"),
    ("/v1/charges?created[gt][x]=1", 400, "created[gt][x]"),
    ("/v1/charges?created=yesterday", 400, "created"),
    ("/v1/charges?created[gt]=1.5", 400, "created[gt]"),
    ("/v1/charges?limit=abc", 400, "limit"),
    ("/v1/charges?limit=", 400, "limit"),
    ("/v1/charges?limit=-1", 400, "limit"),
    ("/v1/charges?limit[]=5", 400, "limit"),
    ("/v1/charges?expand=notalist", 400, "expand"),
    ("/v1/charges?expand[a]=data.customer", 400, "expand"),
    ("/v1/charges?expand[]=customer", 400, "expand"),
    ("/v1/charges?a[b=1", 400, "a[b"),
    ("/v1/charges?customer[]=cus_x", 400, "customer"),
    ("/v1/charges?starting_after[]=ch_x", 400, "starting_after"),
    ("/v1/events?type[]=invoice.paid", 400, "type"),
    ("/v1/events?type=inv*ice", 400, "type"),
    ("/v1/events?types=invoice.paid", 400, "types"),
    ("/v1/events?type=invoice.paid&types[]=charge.failed", 400, None),
    ("/v1/subscriptions?status=bogus", 400, "status"),
    ("/v1/subscriptions?status[]=active", 400, "status"),
    ("/v1/subscriptions?price[]=price_x", 400, "price"),
    ("/v1/subscriptions?plan[a]=price_x", 400, "plan"),
    ("/v1/invoices?status[]=paid", 400, "status"),
    ("/v1/invoices?status=unpaid", 400, "status"),
    ("/v1/products?active=yes", 400, "active"),
    ("/v1/subscription_items", 400, "subscription"),
    ("/v1/subscription_items?subscription=sub_Missing", 404, "subscription"),
    ("/v1/subscription_items/si_Missing", 404, "id"),
    ("/v1/charges/ch_Missing", 404, None),
    ("/v1/charges/{charge}?expand=customer", 400, "expand"),
    ("/v1/charges/{charge}?expand[]=amount", 400, "expand"),  # not a reference (balance_transaction is)
    ("/v1/charges/{charge}?limit=1", 400, "limit"),
    ("/v1/charges/ch_Missing/refunds", 404, None),
    ("/v1/invoices/in_Missing/lines", 404, None),
    ("/v1/no_such_resource", 404, None),
    ("/v1/no_such_resource/x", 404, None),
    ("/v1/customers/cus_x/refunds", 404, None),
    ("/v1/charges/a/b/c", 404, None),
    ("/no/such/url", 404, None),
])
def test_malformed_requests_get_stripe_errors(sandbox, path, status, param):
    path = path.format(charge=sandbox.history().charges[0].id)
    _assert_stripe_error(http_get(sandbox, path), status, param)


def test_both_cursors_at_once(sandbox):
    first, second = default_list_ids(sandbox, "charges")[:2]
    response = http_get(sandbox, "/v1/charges", params={"starting_after": first, "ending_before": second})
    _assert_stripe_error(response, 400)


@pytest.mark.parametrize("authorization", [None, "", "garbage", "Bearer", "Bearer ", "Basic !!!notbase64",
                                           "Bearer pk_test_123456789012345678", "Bearer sk_test_wrong",
                                           "Token sk_test_wrong"])
def test_bad_authorization_headers_are_401(sandbox, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    error = _assert_stripe_error(http_get(sandbox, "/v1/charges", headers=headers), 401)
    assert "sk_test_wrong" not in error["message"]  # keys are redacted


def test_basic_auth_like_curl_u_is_accepted(sandbox):
    response = requests.get(sandbox.api_url + "/v1/charges", params={"limit": 1},
                            auth=(sandbox.restricted_key, ""), timeout=30)
    assert response.status_code == 200 and len(response.json()["data"]) == 1


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_writes_are_refused_with_stripe_errors(sandbox, method):
    charge = sandbox.history().charges[0].id
    for path in ("/v1/charges", f"/v1/charges/{charge}"):
        response = requests.request(method, sandbox.api_url + path, data={"amount": 100},
                                    headers={"Authorization": f"Bearer {sandbox.restricted_key}"}, timeout=30)
        _assert_stripe_error(response)
    assert http_get(sandbox, f"/v1/charges/{charge}").json()["amount"] == sandbox.history().charges[0].amount


_NAMES = ("limit", "starting_after", "ending_before", "expand", "created", "customer", "status", "type", "types",
          "price", "plan", "email", "active", "product", "charge", "subscription", "ids", "lookup_keys",
          "currency", "bogus")
_VALUES = ("", "1", "abc", "-1", "100", "101", "true", "all", "active", "invoice.*", "*", "a.*.b", "data.customer",
           "customer", "ch_x", "\x00", "é", "9" * 30, "1e3")
_SHAPES = ("{n}={v}", "{n}[]={v}", "{n}[gt]={v}", "{n}[0]={v}", "{n}[a][b]={v}", "{n}[={v}", "{n}]={v}", "{n}")
_PATHS = ("customers", "charges", "coupons", "invoices", "plans", "prices", "products", "subscriptions", "refunds",
          "events", "subscription_items", "account", "invoices/{invoice}/lines", "charges/{charge}/refunds",
          "charges/{charge}", "subscriptions/{subscription}")


@settings(max_examples=40, deadline=None)
@given(path=st.sampled_from(_PATHS),
       pairs=st.lists(st.tuples(st.sampled_from(_SHAPES), st.sampled_from(_NAMES), st.sampled_from(_VALUES)),
                      max_size=3))
def test_arbitrary_queries_never_crash_the_server(sandbox, path, pairs):
    from urllib.parse import quote

    history = sandbox.history()
    path = path.format(invoice=history.invoices[0].id, charge=history.charges[0].id,
                       subscription=history.subscriptions[0].id)
    query = "&".join(shape.format(n=name, v=quote(value)) for shape, name, value in pairs)
    response = http_get(sandbox, f"/v1/{path}?{query}")
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        assert body["object"] in ("list", "account") or body["id"]
    else:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
