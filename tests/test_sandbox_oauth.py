"""Connect OAuth on the sandbox, over real HTTP: the sign-in page, the code exchange, refresh and
deauthorization, driven with `requests`, stripe-python's OAuth service and requests-oauthlib."""
from __future__ import annotations

import base64
import html
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import requests
import stripe
from requests_oauthlib import OAuth2Session

from mbi_widgets import Sandbox
from mbi_widgets.errors import SandboxError
from mbi_widgets.sandbox import parse_redirect

from tests.conftest import make_client

REDIRECT = "http://127.0.0.1:8765/callback"
#: A second registered URI that carries a query of its own, which must survive the redirect.
REDIRECT_WITH_QUERY = "http://127.0.0.1:8765/connected?tenant=acme"
HOSTILE = '"><script>alert(1)</script>'


@pytest.fixture(scope="module")
def sb():
    with Sandbox(seed=7, scale=20, redirect_uris=(REDIRECT, REDIRECT_WITH_QUERY)) as running:
        yield running


@pytest.fixture
def fresh():
    """A sandbox of its own, for tests that disconnect accounts."""
    with Sandbox(seed=11, scale=20, redirect_uris=(REDIRECT,)) as running:
        yield running


# --- helpers ---------------------------------------------------------------------------------------


def authorize_url(sb: Sandbox, *, state: str | None = "st-123", scope: str | None = "read_only",
                  redirect_uri: str | None = REDIRECT, client_id: str | None = "", **extra: str) -> str:
    params = {"response_type": "code", "client_id": sb.client_id if client_id == "" else client_id,
              "scope": scope, "state": state, "redirect_uri": redirect_uri, **extra}
    return f"{sb.connect_url}/oauth/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


def request_id_of(page: str) -> str:
    found = re.findall(r'name="request" value="([^"]*)"', page)
    assert found, "the page has no sign-in form"
    assert len(set(found)) == 1, "the sign-in and deny forms must carry the same request id"
    return found[0]


def open_page(sb: Sandbox, **params) -> tuple[requests.Response, str]:
    page = requests.get(authorize_url(sb, **params), allow_redirects=False, timeout=10)
    assert page.status_code == 200, page.text
    return page, request_id_of(page.text)


def submit(sb: Sandbox, form: dict[str, str]) -> requests.Response:
    return requests.post(f"{sb.connect_url}/oauth/authorize", data=form, allow_redirects=False, timeout=10)


def approve_form(sb: Sandbox, request_id: str, account: int = 0, password: str | None = None) -> dict[str, str]:
    who = sb.accounts[account]
    return {"request": request_id, "action": "approve", "email": who.email,
            "password": who.password if password is None else password}


def base_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def sign_in(sb: Sandbox, account: int = 0, scope: str = "read_only") -> str:
    """A fresh authorization code for a seeded account."""
    location = sb.authorize(authorize_url(sb, scope=scope), account=account)
    return parse_redirect(location)["code"]


def token_request(sb: Sandbox, data: dict[str, str], *, client_secret: str | None = "",
                  headers: dict[str, str] | None = None) -> requests.Response:
    body = dict(data)
    if client_secret is not None:
        body["client_secret"] = sb.secret_key if client_secret == "" else client_secret
    return requests.post(f"{sb.connect_url}/oauth/token", data=body, headers=headers or {}, timeout=10)


def exchange(sb: Sandbox, code: str) -> dict:
    answer = token_request(sb, {"grant_type": "authorization_code", "code": code})
    assert answer.status_code == 200, answer.text
    return answer.json()


def api_get(sb: Sandbox, key: str, path: str = "/v1/charges", account: str | None = None,
            **params) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if account is not None:
        headers["Stripe-Account"] = account
    return requests.get(f"{sb.api_url}{path}", headers=headers, params=params, timeout=30)


def charge_ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return [charge["id"] for charge in body["data"]]


def assert_no_redirect(response: requests.Response) -> None:
    assert not (300 <= response.status_code < 400), response.headers
    assert "location" not in response.headers


def assert_stripe_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    return error


# --- the sign-in page --------------------------------------------------------------------------------


def test_authorize_page_shows_sign_in_and_a_deny_choice(sb):
    page, request_id = open_page(sb)
    assert page.headers["content-type"].startswith("text/html")
    assert "Sign in to your account" in page.text
    assert 'name="action" value="deny"' in page.text
    assert "Deny" in page.text
    assert 'name="password"' in page.text and 'type="password"' in page.text
    assert 'action="/oauth/authorize"' in page.text
    assert request_id
    # Read-only was asked for, and the page says so.
    assert "read-only access" in page.text


def test_authorize_page_may_not_be_framed_or_cached(sb):
    page, _ = open_page(sb)
    assert page.headers["x-frame-options"] == "DENY"
    assert "no-store" in page.headers["cache-control"]


def test_authorize_page_escapes_a_hostile_state_and_returns_it_intact(sb):
    page, request_id = open_page(sb, state=HOSTILE)
    assert "<script>" not in page.text
    assert HOSTILE not in page.text
    answer = submit(sb, approve_form(sb, request_id))
    assert answer.status_code == 302
    # The state comes back byte for byte, properly URL-encoded.
    assert "<script>" not in answer.headers["location"]
    assert parse_redirect(answer.headers["location"])["state"] == HOSTILE


def test_error_page_escapes_a_hostile_redirect_uri(sb):
    hostile_uri = f"http://127.0.0.1:8765/x{HOSTILE}"
    page = requests.get(authorize_url(sb, redirect_uri=hostile_uri), allow_redirects=False, timeout=10)
    assert page.status_code == 400
    assert "<script>" not in page.text
    assert html.escape(hostile_uri) in page.text


def test_wrong_password_page_escapes_the_echoed_email(sb):
    _, request_id = open_page(sb)
    answer = submit(sb, {"request": request_id, "action": "approve", "email": HOSTILE, "password": "x"})
    assert_no_redirect(answer)
    assert "<script>" not in answer.text
    assert html.escape(HOSTILE) in answer.text


# --- approve and deny ---------------------------------------------------------------------------------


def test_approve_redirects_to_the_exact_registered_uri_with_code_scope_and_state(sb):
    _, request_id = open_page(sb, state="opaque-state-42")
    answer = submit(sb, approve_form(sb, request_id))
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert base_of(location) == REDIRECT
    query = parse_redirect(location)
    assert set(query) == {"code", "scope", "state"}
    assert query["code"].startswith("ac_") and len(query["code"]) > 10
    assert query["scope"] == "read_only"
    assert query["state"] == "opaque-state-42"


def test_sandbox_authorize_helper_returns_the_same_kind_of_redirect(sb):
    location = sb.authorize(authorize_url(sb, state="helper"))
    assert base_of(location) == REDIRECT
    query = parse_redirect(location)
    assert query["code"].startswith("ac_") and query["state"] == "helper" and query["scope"] == "read_only"


def test_codes_are_unique_per_sign_in(sb):
    codes = {sign_in(sb) for _ in range(3)}
    assert len(codes) == 3


def test_a_registered_uri_keeps_its_own_query(sb):
    location = sb.authorize(authorize_url(sb, redirect_uri=REDIRECT_WITH_QUERY, state="q"))
    assert base_of(location) == base_of(REDIRECT_WITH_QUERY)
    query = dict(parse_qsl(urlsplit(location).query))
    assert query["tenant"] == "acme"
    assert query["code"].startswith("ac_") and query["state"] == "q"


def test_read_write_scope_is_echoed(sb):
    page, request_id = open_page(sb, scope="read_write")
    assert "read and write access" in page.text
    answer = submit(sb, approve_form(sb, request_id))
    assert parse_redirect(answer.headers["location"])["scope"] == "read_write"


def test_deny_redirects_with_access_denied_and_the_state(sb):
    _, request_id = open_page(sb, state="deny-state")
    answer = submit(sb, {"request": request_id, "action": "deny"})
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert base_of(location) == REDIRECT
    query = parse_redirect(location)
    assert query["error"] == "access_denied"
    assert query["state"] == "deny-state"
    assert "code" not in query


def test_sandbox_authorize_helper_can_deny(sb):
    query = parse_redirect(sb.authorize(authorize_url(sb, state="d2"), deny=True))
    assert query["error"] == "access_denied" and query["state"] == "d2" and "code" not in query


def test_wrong_password_rerenders_the_page_with_an_error_and_no_redirect(sb):
    _, request_id = open_page(sb)
    answer = submit(sb, approve_form(sb, request_id, password="not-the-password"))
    assert_no_redirect(answer)
    assert answer.status_code in (200, 401)
    assert "Sign in to your account" in answer.text
    assert "Incorrect email or password" in answer.text
    # The email field keeps what was typed.
    assert re.search(r'<input[^>]*name="email"[^>]*value="' + re.escape(sb.accounts[0].email) + '"', answer.text)
    assert 'value="not-the-password"' not in answer.text  # a typed password is never echoed
    # The same page still works with the right password.
    assert request_id_of(answer.text) == request_id
    retry = submit(sb, approve_form(sb, request_id))
    assert retry.status_code == 302
    assert parse_redirect(retry.headers["location"])["code"].startswith("ac_")


def test_one_accounts_password_does_not_sign_in_another(sb):
    _, request_id = open_page(sb)
    form = approve_form(sb, request_id)
    form["password"] = sb.accounts[1].password
    answer = submit(sb, form)
    assert_no_redirect(answer)
    assert "Incorrect email or password" in answer.text


def test_sandbox_authorize_helper_fails_on_a_wrong_password(sb):
    with pytest.raises(SandboxError, match="Incorrect email or password"):
        sb.authorize(authorize_url(sb), password="wrong")


@pytest.mark.parametrize("client_id", ["ca_UNKNOWN0000000000000000000", "", None], ids=["unknown", "empty", "missing"])
def test_unknown_or_missing_client_id_shows_an_error_page_and_never_redirects(sb, client_id):
    params = {"response_type": "code", "scope": "read_only", "state": "s", "redirect_uri": REDIRECT}
    if client_id is not None:
        params["client_id"] = client_id
    url = f"{sb.connect_url}/oauth/authorize?" + urlencode(params)
    page = requests.get(url, allow_redirects=False, timeout=10)
    assert page.status_code == 400
    assert_no_redirect(page)
    assert page.headers["content-type"].startswith("text/html")
    assert "client_id" in page.text
    assert 'name="request"' not in page.text


@pytest.mark.parametrize("redirect_uri", [
    REDIRECT + "/",                                   # trailing slash
    "http://127.0.0.1:8766/callback",                 # other port
    "https://127.0.0.1:8765/callback",                # other scheme
    "http://localhost:8765/callback",                 # other host
    "http://127.0.0.1:8765/callback/evil",            # longer path
    "http://127.0.0.1:8765/callback?next=evil",       # extra query
    "http://127.0.0.1:8765/CALLBACK",                 # other case
    "http://evil.example/",                           # elsewhere
])
def test_unregistered_redirect_uri_shows_an_error_page_and_never_redirects(sb, redirect_uri):
    page = requests.get(authorize_url(sb, redirect_uri=redirect_uri), allow_redirects=False, timeout=10)
    assert page.status_code == 400
    assert_no_redirect(page)
    assert page.headers["content-type"].startswith("text/html")
    assert "Invalid redirect URI" in page.text
    assert 'name="request"' not in page.text


def test_bad_response_type_and_scope_are_reported_to_the_registered_uri(sb):
    answer = requests.get(authorize_url(sb, response_type="token", state="s1"), allow_redirects=False,
                          timeout=10)
    assert answer.status_code == 302 and base_of(answer.headers["location"]) == REDIRECT
    query = parse_redirect(answer.headers["location"])
    assert query["error"] == "unsupported_response_type" and query["state"] == "s1"

    answer = requests.get(authorize_url(sb, scope="admin", state="s2"), allow_redirects=False, timeout=10)
    assert answer.status_code == 302 and base_of(answer.headers["location"]) == REDIRECT
    query = parse_redirect(answer.headers["location"])
    assert query["error"] == "invalid_scope" and query["state"] == "s2"


def test_a_completed_sign_in_page_cannot_be_reused(sb):
    _, request_id = open_page(sb)
    first = submit(sb, approve_form(sb, request_id))
    assert first.status_code == 302
    for form in (approve_form(sb, request_id), {"request": request_id, "action": "deny"}):
        again = submit(sb, form)
        assert again.status_code == 400
        assert_no_redirect(again)
        assert "expired" in again.text


def test_a_denied_sign_in_page_cannot_be_approved_afterwards(sb):
    _, request_id = open_page(sb)
    assert submit(sb, {"request": request_id, "action": "deny"}).status_code == 302
    again = submit(sb, approve_form(sb, request_id))
    assert again.status_code == 400
    assert_no_redirect(again)


def test_an_unknown_sign_in_request_is_refused(sb):
    answer = submit(sb, approve_form(sb, "not-a-request-id"))
    assert answer.status_code == 400
    assert_no_redirect(answer)


# --- the code exchange ----------------------------------------------------------------------------------


def test_token_exchange_answers_stripes_fields(sb):
    body = exchange(sb, sign_in(sb))
    assert set(body) >= {"access_token", "refresh_token", "token_type", "stripe_user_id",
                         "stripe_publishable_key", "scope", "livemode"}
    assert body["token_type"] == "bearer"
    assert body["stripe_user_id"] == sb.accounts[0].id
    assert body["stripe_publishable_key"].startswith("pk_")
    assert body["scope"] == "read_only"
    assert body["livemode"] is False
    assert body["access_token"] and body["refresh_token"]
    assert body["access_token"] not in (sb.secret_key, sb.restricted_key)
    assert body["access_token"] != body["refresh_token"]


def test_token_exchange_with_stripe_python(sb):
    client = make_client(sb, sb.secret_key)
    token = client.oauth.token({"grant_type": "authorization_code", "code": sign_in(sb)})
    assert token["stripe_user_id"] == sb.accounts[0].id
    assert token["token_type"] == "bearer"
    # The access token works as an API key in stripe-python too.
    charges = make_client(sb, token["access_token"]).v1.charges.list({"limit": 3})
    assert len(charges.data) == 3
    assert all(charge.id.startswith("ch_") for charge in charges.data)


def test_the_access_token_reads_the_signed_in_accounts_data(sb):
    body = exchange(sb, sign_in(sb))
    via_token = charge_ids(api_get(sb, body["access_token"], limit=10))
    via_restricted_key = charge_ids(api_get(sb, sb.restricted_key, limit=10))
    via_platform = charge_ids(api_get(sb, sb.secret_key, account=sb.accounts[0].id, limit=10))
    assert via_token, "account 0 has charges"
    assert via_token == via_restricted_key == via_platform
    account = api_get(sb, body["access_token"], "/v1/account")
    assert account.status_code == 200, account.text
    assert account.json()["id"] == sb.accounts[0].id


def test_signing_in_as_the_second_account_yields_its_id_and_its_data(sb):
    body = exchange(sb, sign_in(sb, account=1))
    assert body["stripe_user_id"] == sb.accounts[1].id
    assert body["stripe_user_id"] != sb.accounts[0].id
    assert body["stripe_publishable_key"] != exchange(sb, sign_in(sb, account=0))["stripe_publishable_key"]
    theirs = charge_ids(api_get(sb, body["access_token"], limit=10))
    assert theirs == charge_ids(api_get(sb, sb.secret_key, account=sb.accounts[1].id, limit=10))
    assert set(theirs).isdisjoint(charge_ids(api_get(sb, sb.restricted_key, limit=10)))


def test_a_reused_code_gives_invalid_grant_and_revokes_its_tokens(sb):
    code = sign_in(sb)
    body = exchange(sb, code)
    assert api_get(sb, body["access_token"], limit=1).status_code == 200
    again = token_request(sb, {"grant_type": "authorization_code", "code": code})
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    assert again.json()["error_description"]
    assert_stripe_error(api_get(sb, body["access_token"], limit=1), 401)
    refresh = token_request(sb, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"


def test_a_reused_code_raises_invalid_grant_in_stripe_python(sb):
    client = make_client(sb, sb.secret_key)
    code = sign_in(sb)
    client.oauth.token({"grant_type": "authorization_code", "code": code})
    with pytest.raises(stripe.oauth_error.InvalidGrantError):
        client.oauth.token({"grant_type": "authorization_code", "code": code})


@pytest.mark.parametrize("code", ["ac_doesnotexist0000000000000000", "", "sk_test_x"])
def test_an_unknown_code_gives_invalid_grant(sb, code):
    answer = token_request(sb, {"grant_type": "authorization_code", "code": code})
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"


def test_a_denied_sign_in_yields_no_usable_code(sb):
    query = parse_redirect(sb.authorize(authorize_url(sb), deny=True))
    assert "code" not in query


@pytest.mark.parametrize("which", ["missing", "bogus", "restricted", "oauth token", "client id"])
def test_the_platform_key_is_required(sb, which):
    code = sign_in(sb)
    other_token = exchange(sb, sign_in(sb))["access_token"]
    secret = {"missing": None, "bogus": "sk_test_" + "x" * 40, "restricted": sb.restricted_key,
              "oauth token": other_token, "client id": sb.client_id}[which]
    answer = token_request(sb, {"grant_type": "authorization_code", "code": code, "client_id": sb.client_id},
                           client_secret=secret)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"
    # A refused attempt does not burn the code: the platform can still exchange it.
    assert exchange(sb, code)["stripe_user_id"] == sb.accounts[0].id


def test_stripe_python_with_a_wrong_key_raises_invalid_client(sb):
    client = make_client(sb, sb.restricted_key)
    with pytest.raises(stripe.oauth_error.InvalidClientError):
        client.oauth.token({"grant_type": "authorization_code", "code": sign_in(sb)})


@pytest.mark.parametrize("scheme", ["Bearer", "Basic"])
def test_the_platform_key_may_come_in_the_authorization_header(sb, scheme):
    value = sb.secret_key if scheme == "Bearer" else base64.b64encode(f"{sb.secret_key}:".encode()).decode()
    answer = token_request(sb, {"grant_type": "authorization_code", "code": sign_in(sb)}, client_secret=None,
                           headers={"Authorization": f"{scheme} {value}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["stripe_user_id"] == sb.accounts[0].id


def test_the_refresh_grant_returns_a_new_working_access_token(sb):
    body = exchange(sb, sign_in(sb, account=1))
    answer = token_request(sb, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert answer.status_code == 200, answer.text
    refreshed = answer.json()
    assert refreshed["access_token"] != body["access_token"]
    assert refreshed["token_type"] == "bearer"
    assert refreshed["stripe_user_id"] == sb.accounts[1].id
    assert refreshed["stripe_publishable_key"] == body["stripe_publishable_key"]
    assert refreshed["livemode"] is False
    assert refreshed["refresh_token"]
    assert charge_ids(api_get(sb, refreshed["access_token"], limit=5)) == \
        charge_ids(api_get(sb, body["access_token"], limit=5))


def test_the_refresh_grant_keeps_the_granted_scope(sb):
    body = exchange(sb, sign_in(sb, scope="read_write"))
    assert body["scope"] == "read_write"
    answer = token_request(sb, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["scope"] == "read_write"


def test_the_refresh_grant_with_stripe_python(sb):
    body = exchange(sb, sign_in(sb))
    client = make_client(sb, sb.secret_key)
    refreshed = client.oauth.token({"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refreshed["stripe_user_id"] == sb.accounts[0].id
    assert api_get(sb, refreshed["access_token"], limit=1).status_code == 200


def test_an_unknown_refresh_token_gives_invalid_grant(sb):
    answer = token_request(sb, {"grant_type": "refresh_token", "refresh_token": "rt_unknown"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"


def test_the_refresh_grant_also_requires_the_platform_key(sb):
    body = exchange(sb, sign_in(sb))
    answer = token_request(sb, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
                           client_secret=None)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"


@pytest.mark.parametrize("grant_type", ["client_credentials", "password", None])
def test_an_unsupported_grant_type_is_refused(sb, grant_type):
    data = {"code": sign_in(sb)}
    if grant_type is not None:
        data["grant_type"] = grant_type
    answer = token_request(sb, data)
    assert answer.status_code == 400
    assert answer.json()["error"] == "unsupported_grant_type"


# --- deauthorization --------------------------------------------------------------------------------------


def test_deauthorize_revokes_the_token_and_the_platforms_access(fresh):
    account_id = fresh.accounts[0].id
    body = exchange(fresh, sign_in(fresh))
    assert api_get(fresh, body["access_token"], limit=1).status_code == 200
    assert api_get(fresh, fresh.secret_key, account=account_id, limit=1).status_code == 200

    answer = requests.post(f"{fresh.connect_url}/oauth/deauthorize", timeout=10,
                           data={"client_secret": fresh.secret_key, "client_id": fresh.client_id,
                                 "stripe_user_id": account_id})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stripe_user_id": account_id}

    assert_stripe_error(api_get(fresh, body["access_token"], limit=1), 401)
    error = assert_stripe_error(api_get(fresh, fresh.secret_key, account=account_id, limit=1), 403)
    assert account_id in error["message"]
    refresh = token_request(fresh, {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"
    # The other account is untouched.
    assert api_get(fresh, fresh.secret_key, account=fresh.accounts[1].id, limit=1).status_code == 200
    # Disconnecting twice is an error, as on Stripe.
    twice = requests.post(f"{fresh.connect_url}/oauth/deauthorize", timeout=10,
                          data={"client_secret": fresh.secret_key, "client_id": fresh.client_id,
                                "stripe_user_id": account_id})
    assert twice.status_code == 400 and twice.json()["error"] == "invalid_client"


def test_deauthorize_with_stripe_python(fresh):
    account_id = fresh.accounts[1].id
    body = exchange(fresh, sign_in(fresh, account=1))
    client = make_client(fresh, fresh.secret_key, client_id=fresh.client_id)
    answer = client.oauth.deauthorize({"stripe_user_id": account_id})
    assert answer["stripe_user_id"] == account_id
    assert_stripe_error(api_get(fresh, body["access_token"], limit=1), 401)
    assert_stripe_error(api_get(fresh, fresh.secret_key, account=account_id, limit=1), 403)


def test_deauthorize_requires_the_platform_key_and_client_id(fresh):
    account_id = fresh.accounts[0].id
    url = f"{fresh.connect_url}/oauth/deauthorize"
    no_key = requests.post(url, data={"client_id": fresh.client_id, "stripe_user_id": account_id}, timeout=10)
    assert no_key.status_code == 401 and no_key.json()["error"] == "invalid_client"
    wrong_key = requests.post(url, data={"client_secret": fresh.restricted_key, "client_id": fresh.client_id,
                                         "stripe_user_id": account_id}, timeout=10)
    assert wrong_key.status_code == 401 and wrong_key.json()["error"] == "invalid_client"
    wrong_client = requests.post(url, data={"client_secret": fresh.secret_key, "client_id": "ca_other",
                                            "stripe_user_id": account_id}, timeout=10)
    assert wrong_client.status_code == 400 and wrong_client.json()["error"] == "invalid_client"
    # None of these disconnected anything.
    assert api_get(fresh, fresh.secret_key, account=account_id, limit=1).status_code == 200


def test_connecting_again_after_deauthorize_works(fresh):
    account_id = fresh.accounts[0].id
    old = exchange(fresh, sign_in(fresh))
    make_client(fresh, fresh.secret_key, client_id=fresh.client_id).oauth.deauthorize(
        {"stripe_user_id": account_id})
    new = exchange(fresh, sign_in(fresh))
    assert new["stripe_user_id"] == account_id
    assert api_get(fresh, new["access_token"], limit=1).status_code == 200
    assert api_get(fresh, old["access_token"], limit=1).status_code == 401


# --- a standard OAuth client, end to end -------------------------------------------------------------------


def test_requests_oauthlib_runs_the_whole_flow(sb, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the sandbox speaks plain HTTP on loopback
    session = OAuth2Session(sb.client_id, redirect_uri=REDIRECT, scope=["read_only"], state="oauthlib-state")
    url, state = session.authorization_url(f"{sb.connect_url}/oauth/authorize")
    assert state == "oauthlib-state"
    location = sb.authorize(url, account=1)
    assert base_of(location) == REDIRECT
    query = parse_redirect(location)
    assert query["state"] == state

    token = session.fetch_token(f"{sb.connect_url}/oauth/token", code=query["code"], include_client_id=True,
                                client_secret=sb.secret_key)
    assert token["stripe_user_id"] == sb.accounts[1].id
    assert token["token_type"] == "bearer"
    assert token["scope"] == ["read_only"]
    # The session now sends the token as a Bearer key.
    charges = session.get(f"{sb.api_url}/v1/charges", params={"limit": 3}, timeout=10)
    assert charges.status_code == 200, charges.text
    assert charge_ids(charges) == charge_ids(api_get(sb, sb.secret_key, account=sb.accounts[1].id, limit=3))


def test_requests_oauthlib_sees_the_denial(sb, monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    session = OAuth2Session(sb.client_id, redirect_uri=REDIRECT, scope=["read_only"], state="denied-state")
    url, _ = session.authorization_url(f"{sb.connect_url}/oauth/authorize")
    location = sb.authorize(url, deny=True)
    from oauthlib.oauth2.rfc6749.errors import AccessDeniedError

    with pytest.raises(AccessDeniedError):
        session.fetch_token(f"{sb.connect_url}/oauth/token", authorization_response=location,
                            include_client_id=True, client_secret=sb.secret_key)
