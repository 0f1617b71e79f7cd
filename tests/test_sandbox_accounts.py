"""Connect accounts in the sandbox (`GET /v1/accounts`, `/v1/accounts/{id}`) and one budget per child-list endpoint.

Guards issue 12: extractors' connection checks got 404 on `/v1/accounts/{id}`, and StripeSource
paced each `/v1/invoices/{id}/lines` as its own endpoint, drawing 429s where Stripe counts one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from mbi_widgets import Sandbox
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.tables.fetch import RetryPolicy, endpoint_pattern

FIXTURE = json.loads((Path("/work/shared/stripe/fixtures3.json")).read_text())["resources"]["account"] \
    if Path("/work/shared/stripe/fixtures3.json").exists() else None


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=5, scale=20) as running:
        yield running


def get(sandbox: Sandbox, path: str, key: str, **params) -> requests.Response:
    return requests.get(sandbox.api_url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_the_platform_lists_its_connected_accounts_newest_first(sandbox):
    answer = get(sandbox, "/v1/accounts", sandbox.secret_key)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["url"] == "/v1/accounts" and body["has_more"] is False
    ids = [a["id"] for a in body["data"]]
    assert set(ids) == {a.id for a in sandbox.accounts} and sandbox.platform_account_id not in ids
    assert [a["created"] for a in body["data"]] == sorted((a["created"] for a in body["data"]), reverse=True)
    first = get(sandbox, "/v1/accounts", sandbox.secret_key, limit=1).json()
    assert first["has_more"] is True and first["data"][0]["id"] == ids[0]
    rest = get(sandbox, "/v1/accounts", sandbox.secret_key, starting_after=ids[0]).json()
    assert [a["id"] for a in rest["data"]] == ids[1:]


def test_an_account_retrieves_itself_and_the_platform_its_connected_accounts(sandbox):
    own = sandbox.accounts[0].id
    mine = get(sandbox, f"/v1/accounts/{own}", sandbox.restricted_key)
    assert mine.status_code == 200, mine.text
    assert mine.json()["id"] == own and mine.json()["object"] == "account"
    assert mine.json()["email"] == sandbox.accounts[0].email
    other = sandbox.accounts[1].id
    assert get(sandbox, f"/v1/accounts/{other}", sandbox.secret_key).json()["id"] == other
    refused = get(sandbox, f"/v1/accounts/{other}", sandbox.restricted_key)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "account_invalid"
    assert sandbox.restricted_key not in refused.text  # the key is redacted in the message
    assert get(sandbox, "/v1/accounts", sandbox.restricted_key).json()["data"] == []  # not a platform


@pytest.mark.skipif(FIXTURE is None, reason="Stripe's fixtures are not available here")
def test_accounts_have_stripes_fields(sandbox):
    served = get(sandbox, "/v1/accounts", sandbox.secret_key).json()["data"][0]
    assert set(FIXTURE) - set(served) == set()


def test_child_list_paths_count_as_one_endpoint():
    assert endpoint_pattern("/v1/invoices/in_1/lines") == endpoint_pattern("/v1/invoices/in_2/lines") \
        == "/v1/invoices/*/lines"
    assert endpoint_pattern("/v1/charges/ch_1/refunds") == "/v1/charges/*/refunds"
    assert endpoint_pattern("/v1/subscription_items?subscription=sub_1") == "/v1/subscription_items"


def test_a_load_of_many_long_invoices_gets_no_429():
    """Over a dozen invoices with more than 10 lines, at a low per-endpoint limit: the budget keeps under it."""
    limits = {"per_account": 100, "per_endpoint": 6}
    with Sandbox(seed=1, scale=30, rate_limits=limits) as limited:
        long_invoices = [i for i in limited.history().invoices if len(i.lines) > 10]
        assert len(long_invoices) >= 15
        source = StripeSource(limited.restricted_key, api_base=limited.api_url, rate_limits=limits, workers=8,
                              retry=RetryPolicy(base_delay=0.01, max_delay=0.05, max_rate_limited=50))
        frames = source.tables(["invoices__lines"])
        stats = source.last_stats
    assert stats.by_endpoint.get("/v1/invoices/*/lines", 0) >= len(long_invoices)
    assert stats.rate_limited == 0
    assert len(frames["invoices__lines"]) == sum(len(i.lines) for i in limited.history().invoices)
