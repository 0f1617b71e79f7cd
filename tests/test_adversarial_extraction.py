"""Extraction never hangs and wrong-shape answers are clear errors (issue 9, items 8 and 9), over real HTTP.

Two kinds of misbehaving server run on loopback: a socket that accepts connections and never
answers, and a small Starlette app (`FakeStripe`) whose answer each test sets. Every error must be
a `StripeSourceError` (an `AuthError` for the key check) that says what came back, promptly, and
never shows the key.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mbi_widgets import StripeSource
from mbi_widgets.auth import KEY_CHECK_TIMEOUT, AuthError, account_of, validate_key
from mbi_widgets.serving import BackgroundServer
from mbi_widgets.tables.fetch import (
    BadAnswer,
    FetchError,
    RequestRejected,
    RetryPolicy,
    StripeSourceError,
    Timeouts,
)

KEY = "rk_test_" + "AdversarialExtraction0123456789"
FAST = {"per_account": 1000, "per_endpoint": 1000}
#: `created` of the newest object the fake serves; objects are 10 s apart going back.
NEWEST = 1_700_000_000


def quick(**overrides: Any) -> RetryPolicy:
    return RetryPolicy(**{"max_transient": 2, "max_rate_limited": 2, "base_delay": 0.005, "max_delay": 0.01,
                          **overrides})


# --- servers -------------------------------------------------------------------------------------

class SilentServer:
    """Accepts every connection and never sends a byte (a hung proxy, a stuck load balancer)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(connection)

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._listener.close()
        for connection in self._held:
            connection.close()


class FakeStripe:
    """A Starlette app whose answer to every request is `handler(request)`; `/v1/account` is a plain account
    unless `account` says otherwise."""

    def __init__(self) -> None:
        self.handler: Callable[[Request], Response] = lambda request: json_answer({})
        self.account: Callable[[Request], Response] | None = None
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server = BackgroundServer(Starlette(routes=[Route("/{path:path}", self._route)]), name="fake-stripe")

    async def _route(self, request: Request) -> Response:
        self.requests.append((request.url.path, dict(request.query_params)))
        if request.url.path == "/v1/account":
            if self.account is not None:
                return self.account(request)
            return json_answer({"id": "acct_fake", "object": "account", "created": NEWEST - 1_000_000})
        return self.handler(request)

    def start(self) -> "FakeStripe":
        self._server.start()
        return self

    @property
    def url(self) -> str:
        return self._server.url

    def stop(self) -> None:
        self._server.stop()


def json_answer(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json")


def page(ids: list[str], *, has_more: bool, created: list[int] | None = None, **extra: Any) -> dict:
    created = created or [NEWEST - 10 * i for i in range(len(ids))]
    return {"object": "list", "url": "/v1/coupons", "has_more": has_more,
            "data": [{"id": i, "object": "coupon", "created": c, "duration": "once", **extra}
                     for i, c in zip(ids, created)]}


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fake():
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
def stripe_fake(fake):
    fake.requests.clear()
    yield fake
    fake.handler, fake.account = (lambda request: json_answer({})), None


def source_for(url: str, **options: Any) -> StripeSource:
    options.setdefault("rate_limits", FAST)
    options.setdefault("retry", quick())
    return StripeSource(KEY, api_base=url, **options)


# --- item 8: no hangs ------------------------------------------------------------------------------

def test_default_timeouts_are_seconds_not_stripe_pythons_80():
    source = StripeSource(KEY)
    assert source.timeouts == Timeouts(connect=5.0, read=30.0, deadline=None)
    assert source._client._requestor._client._timeout == (5.0, 30.0)  # what requests is actually given
    assert RetryPolicy().max_timeouts == 2  # a silent server: 3 attempts of 30 s, not 7 of 80 s
    assert KEY_CHECK_TIMEOUT == (5.0, 15.0)
    assert StripeSource(KEY, timeout=2, deadline=60).timeouts == Timeouts(2, 2, 60)


@pytest.mark.parametrize("options", [{"timeout": 0}, {"timeout": (1, -1)}, {"timeout": (1, 2, 3)},
                                     {"deadline": 0}, {"timeout": "5"}, {"deadline": float("inf")}])
def test_nonsense_timeouts_are_refused(options):
    with pytest.raises(ValueError, match="seconds|pair"):
        StripeSource(KEY, **options)


@pytest.mark.parametrize("call", ["table", "preview"])
def test_a_server_that_never_answers_fails_within_the_timeouts(silent, call):
    source = source_for(silent.url, timeout=(0.5, 0.3), retry=quick(max_transient=6))
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        getattr(source, call)("coupons")
    elapsed = time.monotonic() - started
    # max_timeouts=2: three attempts of 0.3 s, whatever max_transient says (before: 7 x 80 s).
    assert elapsed < 3 * 0.3 + 2.0, elapsed
    assert silent.connections == 3
    error = caught.value
    assert error.code == "unavailable" and error.table == "coupons"
    assert "no answer within 0.3 s" in str(error) and "coupons" in str(error)
    assert KEY not in str(error)


def test_the_deadline_ends_a_call_stuck_on_a_request_that_never_returns(silent):
    """A request still waiting (here on a 30 s read timeout) must not hold table() past the deadline."""
    source = source_for(silent.url, timeout=(5, 30), deadline=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        source.table("coupons")
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.0 + 1.0, elapsed  # the deadline, the grace for requests in flight, slack
    error = caught.value
    assert error.code == "deadline_exceeded" and error.table == "coupons"
    assert error.cursor["limit"] == 100
    assert "0.5 s" in str(error) and "/v1/coupons" in str(error) and "deadline=" in str(error)


def test_the_deadline_ends_a_list_that_never_ends(stripe_fake):
    """Pages that keep advancing forever (new ids every time): only a deadline can tell."""
    counter = iter(range(10**9))

    def endless(request: Request) -> Response:  # within the requested window, as Stripe would
        start = next(counter) * 2
        low = int(request.query_params.get("created[gte]", 0))
        high = int(request.query_params.get("created[lt]", NEWEST + 1)) - 1
        return json_answer(page([f"cpn_{start}", f"cpn_{start + 1}"], has_more=True,
                                created=[max(low, high - start), max(low, high - start - 1)]))

    stripe_fake.handler = endless
    source = source_for(stripe_fake.url, deadline=0.6, rate_limits={"per_account": 40, "per_endpoint": 40})
    for call in (lambda: source.preview("coupons", rows=10**6), lambda: source.table("coupons")):
        started = time.monotonic()
        with pytest.raises(FetchError) as caught:
            call()
        assert time.monotonic() - started < 0.6 + 1.5
        assert caught.value.code == "deadline_exceeded" and caught.value.table == "coupons"


def test_validate_key_against_a_server_that_never_answers(silent):
    started = time.monotonic()
    with pytest.raises(AuthError) as caught:
        validate_key(KEY, api_base=silent.url, timeout=(0.5, 0.3))
    elapsed = time.monotonic() - started
    assert elapsed < 2 * 0.3 + 0.5 + 1.5, elapsed  # two attempts and stripe-python's one short pause
    assert silent.connections == 2
    assert caught.value.code == "unreachable" and "no answer within 0.3 s" in str(caught.value)
    assert KEY not in str(caught.value)


# --- item 8: a cursor that does not advance --------------------------------------------------------

@pytest.mark.parametrize("call", ["table", "preview"])
def test_the_same_page_forever_is_a_stuck_cursor(stripe_fake, call):
    def same_page(request):
        # Inside whatever `created` window was asked for (else the window check calls it a bad answer first).
        high = int(request.query_params.get("created[lt]", NEWEST + 1)) - 1
        low = int(request.query_params.get("created[gte]", 0))
        return json_answer(page(["cpn_b", "cpn_a"], has_more=True, created=[high, max(low, high - 1)]))

    stripe_fake.handler = same_page
    source = source_for(stripe_fake.url)
    with pytest.raises(FetchError) as caught:
        getattr(source, call)("coupons", **({"rows": 1000} if call == "preview" else {}))
    error = caught.value
    assert error.code == "stuck_cursor" and error.table == "coupons"
    assert error.cursor["starting_after"] == "cpn_a"
    assert "'cpn_a'" in str(error) and "coupons" in str(error)
    assert len(stripe_fake.requests) < 40  # the first page, the account, a few windows: then it stops


@pytest.mark.parametrize("call", ["table", "preview"])
def test_an_empty_page_that_says_has_more_is_a_stuck_cursor(stripe_fake, call):
    stripe_fake.handler = lambda request: json_answer(page([], has_more=True))
    with pytest.raises(FetchError, match="empty page of coupons") as caught:
        getattr(source_for(stripe_fake.url), call)("coupons")
    assert caught.value.code == "stuck_cursor"


def test_a_cursor_that_goes_back_to_an_earlier_page_is_a_stuck_cursor(stripe_fake):
    pages = {None: page(["cpn_4", "cpn_3"], has_more=True),
             "cpn_3": page(["cpn_2", "cpn_1"], has_more=True, created=[NEWEST - 20, NEWEST - 30]),
             "cpn_1": page(["cpn_4", "cpn_3"], has_more=True)}  # back to the first page
    stripe_fake.handler = lambda request: json_answer(pages[request.query_params.get("starting_after")])
    with pytest.raises(FetchError) as caught:
        source_for(stripe_fake.url, workers=1).table("coupons")
    assert caught.value.code == "stuck_cursor" and caught.value.cursor["starting_after"] == "cpn_1"
    assert "'cpn_3'" in str(caught.value)


def test_a_child_list_that_does_not_advance_is_a_stuck_cursor(stripe_fake):
    invoice = {"id": "in_1", "object": "invoice", "created": NEWEST,
               "lines": {"object": "list", "has_more": True, "data": [{"id": "il_1", "object": "line_item"}]}}

    def answer(request: Request) -> Response:
        if request.url.path == "/v1/invoices/in_1/lines":
            return json_answer({"object": "list", "has_more": True,
                                "data": [{"id": "il_2", "object": "line_item"}]})  # il_2 forever
        return json_answer({"object": "list", "has_more": False, "data": [invoice]})

    stripe_fake.handler = answer
    for call in (lambda s: s.table("invoices__lines"), lambda s: s.preview("invoices__lines")):
        with pytest.raises(FetchError) as caught:
            call(source_for(stripe_fake.url))
        assert caught.value.code == "stuck_cursor" and caught.value.table == "invoices__lines"
        assert caught.value.cursor == {"limit": 100, "starting_after": "il_2"}


class Pager:
    """A correct Stripe list of `count` coupons (created filter, starting_after, limit); with
    `sticky`, a page holding one of every 37th object is answered again for its own last id."""

    def __init__(self, count: int, *, sticky: bool) -> None:
        self.objects = [{"id": f"cpn_{i:05d}", "object": "coupon", "created": NEWEST - 10 * i, "duration": "once"}
                        for i in range(count)]
        self.position = {obj["id"]: index for index, obj in enumerate(self.objects)}
        self.sticky, self.repeat = sticky, {}

    def __call__(self, request: Request) -> Response:
        query = request.query_params
        after = query.get("starting_after")
        if after in self.repeat:
            return json_answer(self.repeat[after])
        low, high = query.get("created[gte]"), query.get("created[lt]")
        start = self.position[after] + 1 if after else 0
        matching = [obj for obj in self.objects[start:]
                    if (low is None or obj["created"] >= int(low)) and (high is None or obj["created"] < int(high))]
        limit = int(query.get("limit", 10))
        body = {"object": "list", "has_more": len(matching) > limit, "data": matching[:limit]}
        if self.sticky and body["has_more"] and any(self.position[o["id"]] % 37 == 0 for o in body["data"]):
            self.repeat[body["data"][-1]["id"]] = body
        return json_answer(body)


def test_windowed_fetch_is_complete_against_a_correct_pager(stripe_fake):
    """The range and cursor checks never fire on a list that behaves (the control for the next test)."""
    stripe_fake.handler = Pager(1500, sticky=False)
    source = source_for(stripe_fake.url)
    coupons = source.table("coupons")
    assert coupons["id"].tolist() == [f"cpn_{i:05d}" for i in range(1500)]
    assert source.last_stats.windows > 1


def test_a_window_whose_cursor_does_not_advance_is_a_stuck_cursor(stripe_fake):
    stripe_fake.handler = Pager(1500, sticky=True)
    source = source_for(stripe_fake.url)
    started = time.monotonic()
    with pytest.raises(FetchError) as caught:
        source.table("coupons")
    assert time.monotonic() - started < 10
    assert caught.value.code == "stuck_cursor" and caught.value.table == "coupons"
    assert "starting_after" in caught.value.cursor
    assert len(stripe_fake.requests) < 200  # 1500 objects are 15 pages; a loop would never stop


def test_a_server_that_ignores_the_created_filter_is_a_bad_answer(stripe_fake):
    pager = Pager(1500, sticky=False)

    def ignoring_created(request: Request) -> Response:
        query = {k: v for k, v in request.query_params.items() if not k.startswith("created")}
        request.scope["query_string"] = "&".join(f"{k}={v}" for k, v in query.items()).encode()
        return pager(Request(request.scope))

    stripe_fake.handler = ignoring_created
    with pytest.raises(BadAnswer, match="outside the requested range") as caught:
        source_for(stripe_fake.url).table("coupons")
    assert "created" in caught.value.cursor


# --- item 9: wrong-shape answers -------------------------------------------------------------------

WRONG_SHAPES = [
    ({}, "no `data` list"),
    ({"data": None, "has_more": False}, "no `data` list"),
    ({"data": "x", "has_more": False}, "`data` is a JSON string, not an array"),
    ([], "JSON array, not a list object"),
    ("ok", "JSON string, not a list object"),
    ({"data": [1, 2], "has_more": False}, "data[0] is a JSON number, not an object"),
    ({"data": [{"created": NEWEST}], "has_more": False}, "data[0] has no `id`"),
    ({"data": [{"id": 7, "created": NEWEST}], "has_more": False}, "data[0] has no `id`"),
    ({"data": [{"id": "cpn_1"}], "has_more": False}, "data[0] has no `created` time"),
    ({"data": [{"id": "cpn_1", "created": "yesterday"}], "has_more": False}, "data[0] has no `created` time"),
    ({"data": [{"id": "cpn_1", "created": 10**20}], "has_more": False}, "data[0] has no `created` time"),
    ({"data": [{"id": "cpn_1", "created": NEWEST}]}, "no `has_more` flag"),
    ({"data": [], "has_more": "yes"}, "`has_more` is a JSON string"),
]


@pytest.mark.parametrize("payload, problem", WRONG_SHAPES)
@pytest.mark.parametrize("call", ["table", "preview"])
def test_a_list_of_the_wrong_shape_is_a_bad_answer(stripe_fake, payload, problem, call):
    stripe_fake.handler = lambda request: json_answer(payload)
    with pytest.raises(BadAnswer) as caught:
        getattr(source_for(stripe_fake.url), call)("coupons")
    message = str(caught.value)
    assert caught.value.code == "bad_answer" and caught.value.table == "coupons"
    assert problem in message and "/v1/coupons" in message and "api_base" in message


def test_an_embedded_list_of_the_wrong_shape_is_a_bad_answer(stripe_fake):
    invoice = {"id": "in_1", "object": "invoice", "created": NEWEST, "lines": {"object": "list", "data": "x"}}
    stripe_fake.handler = lambda request: json_answer({"object": "list", "has_more": False, "data": [invoice]})
    with pytest.raises(BadAnswer, match=r"data\[0\], the embedded `lines` list: its `data` is a JSON string"):
        source_for(stripe_fake.url).table("invoices__lines")


def test_a_value_that_fits_no_column_is_a_bad_answer(stripe_fake):
    stripe_fake.handler = lambda request: json_answer(page(["cpn_1"], has_more=False, amount_off="lots"))
    with pytest.raises(BadAnswer, match="coupons.amount_off") as caught:
        source_for(stripe_fake.url).table("coupons")
    assert caught.value.code == "bad_answer"


HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
CUT = b'{"object": "list", "data": [{"id": "cpn_1", "cre'


@pytest.mark.parametrize("status, body, media, said", [
    (502, HTML, "text/html", "HTTP 502: the server answered an HTML page, not JSON"),
    (503, b"", "text/plain", "HTTP 503: the server answered an empty answer"),
    (200, CUT, "application/json", f"HTTP 200: the server answered JSON cut off after {len(CUT)} bytes"),
    (200, b"", "application/json", "HTTP 200: the server answered an empty answer"),
    (502, b"{}", "application/json", "without Stripe's `error` object"),
])
def test_html_truncated_or_empty_answers_are_retried_then_said(stripe_fake, status, body, media, said):
    stripe_fake.handler = lambda request: Response(body, status_code=status, media_type=media)
    with pytest.raises(FetchError) as caught:
        source_for(stripe_fake.url).table("coupons")
    message = str(caught.value)
    assert caught.value.code == "unavailable" and said in message, message
    assert "no error message" not in message
    assert len(stripe_fake.requests) == 3  # retried as transient: the first attempt and max_transient=2


def test_an_html_404_says_html_not_just_404(stripe_fake):
    stripe_fake.handler = lambda request: Response(HTML, status_code=404, media_type="text/html")
    with pytest.raises(RequestRejected, match="an HTML page, not JSON .*check api_base"):
        source_for(stripe_fake.url).preview("coupons")
    assert len(stripe_fake.requests) == 1


def test_a_server_echoing_the_key_never_gets_it_into_the_message(stripe_fake):
    def echo(request: Request) -> Response:
        return json_answer({"error": {"type": "invalid_request_error",
                                      "message": f"bad header {request.headers['authorization']}"}}, status=400)

    stripe_fake.handler = echo
    with pytest.raises(RequestRejected) as caught:
        source_for(stripe_fake.url).table("coupons")
    assert KEY not in str(caught.value) and "rk_test_Adve****6789" in str(caught.value)


def test_a_deleted_or_broken_object_on_retrieve_is_a_bad_answer(stripe_fake):
    from mbi_widgets.tables.source import TableRequest

    stripe_fake.handler = lambda request: json_answer({"object": "coupon", "created": NEWEST})  # no id
    with pytest.raises(BadAnswer, match="the object has no `id`"):
        source_for(stripe_fake.url).fetch({"coupons": TableRequest(listed=False, ids=frozenset({"cpn_1"}))})


# --- item 9: keys for validate_key / account_of ---------------------------------------------------

@pytest.mark.parametrize("key", [12345, None, b"rk_test_abc", 3.5])
@pytest.mark.parametrize("check", [validate_key, account_of])
def test_a_key_that_is_not_text_is_refused_by_the_key_check(stripe_fake, check, key):
    with pytest.raises(AuthError, match="must be text") as caught:
        check(key, api_base=stripe_fake.url)
    assert caught.value.code == "invalid_key"
    assert stripe_fake.requests == []


@pytest.mark.parametrize("inside", ["\r\nX-Injected: 1", "\n", " ", "\t", "\u00a0", "\x00"])
@pytest.mark.parametrize("check", [validate_key, account_of])
def test_a_key_with_line_breaks_inside_is_refused_before_any_request(stripe_fake, check, inside):
    key = KEY[:12] + inside + KEY[12:]
    with pytest.raises(AuthError, match="line breaks") as caught:
        check(key, api_base=stripe_fake.url)
    assert caught.value.code == "invalid_key" and KEY[12:] not in str(caught.value)
    assert stripe_fake.requests == []


@pytest.mark.parametrize("status, body, media, said", [
    (502, HTML, "text/html", "HTTP 502 with an HTML page, not JSON"),
    (200, b'{"id": "acct_', "application/json", "HTTP 200 with an answer that is not JSON"),
    (200, b"[]", "application/json", "not a Stripe account"),
    (200, b"{}", "application/json", "not a Stripe account"),
])
def test_the_key_check_says_what_came_back(stripe_fake, status, body, media, said):
    stripe_fake.account = lambda request: Response(body, status_code=status, media_type=media)
    with pytest.raises(AuthError, match=said) as caught:
        validate_key(KEY, api_base=stripe_fake.url, timeout=(1, 1))
    assert KEY not in str(caught.value) and "<html" not in str(caught.value).lower()


# --- item 9: whatever the answer, only StripeSourceError escapes ----------------------------------

def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # the standard library writes integers of any size


JSON_LEAVES = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = st.sampled_from(["amount_due", "status", "customer", "metadata", "period_start", "lines", "paid",
                          "total", "description", "discounts", "object"])
OBJECT = st.fixed_dictionaries({}, optional={
    "id": st.sampled_from(["in_1", "in_2", "in_3", ""]) | JSON,
    "created": st.integers(NEWEST - 100, NEWEST) | JSON,
    "lines": st.fixed_dictionaries({}, optional={
        "data": st.lists(st.fixed_dictionaries({}, optional={"id": st.sampled_from(["il_1", "il_2"]) | JSON,
                                                              "amount": JSON}), max_size=3) | JSON,
        "has_more": st.booleans() | JSON}) | JSON,
}).flatmap(lambda base: st.dictionaries(FIELDS, JSON, max_size=3).map(lambda extra: {**extra, **base}))
ENVELOPE = st.fixed_dictionaries({}, optional={"object": st.just("list"), "has_more": st.booleans() | JSON,
                                               "data": st.lists(OBJECT | JSON, max_size=4) | JSON})
#: Well-formed lists of well-formed objects whose other fields are anything: these reach the shaping.
LINE = st.builds(lambda number, fields: {**fields, "id": f"il_{number}"}, st.integers(0, 3),
                 st.dictionaries(st.sampled_from(["amount", "currency", "period", "metadata", "discountable"]), JSON,
                                 max_size=3))
LINES = st.builds(lambda data, has_more: {"object": "list", "data": data, "has_more": has_more},
                  st.lists(LINE, max_size=3), st.booleans())
INVOICE = st.builds(lambda number, age, fields, lines: {**fields, "id": f"in_{number}", "created": NEWEST - age,
                                                        **({"lines": lines} if lines else {})},
                    st.integers(0, 3), st.integers(0, 100), st.dictionaries(FIELDS, JSON, max_size=3),
                    st.none() | LINES)
WELL_FORMED = st.builds(lambda data, has_more: {"object": "list", "data": data, "has_more": has_more},
                        st.lists(INVOICE, max_size=4), st.booleans())
BODY = (ENVELOPE.map(dumps) | WELL_FORMED.map(dumps) | WELL_FORMED.map(dumps) | JSON.map(dumps)
        | st.binary(max_size=40) | st.just(HTML)
        | ENVELOPE.map(dumps).flatmap(lambda body: st.integers(0, len(body)).map(lambda cut: body[:cut])))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([200, 200, 200, 400, 404, 429, 500, 502]), body=BODY,
       echo=st.booleans(), call=st.sampled_from(["table", "preview"]))
def test_only_stripe_source_errors_escape_whatever_the_answer(stripe_fake, status, body, echo, call):
    def answer(request: Request) -> Response:
        if echo and status >= 400:  # a server that echoes the Authorization header in its error message
            return json_answer({"error": {"message": request.headers.get("authorization", "")}}, status=status)
        return Response(body, status_code=status, media_type="application/json")

    stripe_fake.handler = answer
    source = source_for(stripe_fake.url, retry=quick(max_transient=1, max_rate_limited=1), workers=2)
    try:
        if call == "table":
            source.tables(["invoices", "invoices__lines"])
        else:
            source.preview("invoices__lines", rows=150)
    except StripeSourceError as exc:
        assert KEY not in str(exc) and KEY not in repr(exc)
