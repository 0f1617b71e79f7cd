"""Client secrets never become columns, cells, previews or warehouse columns (`schema.SENSITIVE_FIELDS`).

A client secret (a PaymentIntent's, wrapped in an invoice's includable `confirmation_secret`; a
Source's, a SetupIntent's, ...) lets whoever holds it confirm a payment from a browser. The sandbox
plays Stripe and hands them out when asked (`expand[]=data.confirmation_secret`); our tables drop
them wherever an answer carries them, also inside Stripe objects kept as JSON text (an event's
`data.object`, a customer's `sources`), but not inside `metadata`, the user's own data.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbi_widgets import Sandbox, StripeSource
from mbi_widgets.tables.schema import ALL_TABLES, SENSITIVE_FIELDS, _class_info, _resource_class, schema
from mbi_widgets.tables.shape import ShapeError, Shaper
from mbi_widgets.warehouse import Warehouse

FIXTURES = json.loads((Path(__file__).parent / "data" / "stripe_fixtures3_subset.json").read_text())["resources"]
RESOURCE_OF = {"customers": "customer", "charges": "charge", "coupons": "coupon", "invoices": "invoice",
               "plans": "plan", "subscriptions": "subscription", "events": "event",
               "invoices__lines": "line_item", "subscriptions__items": "subscription_item",
               "charges__refunds": "refund"}
FAST = {"per_account": 500, "per_endpoint": 500}
CONFIRMATION = ["data.confirmation_secret"]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(seed=5, scale=40) as running:
        yield running


def make_source(sandbox: Sandbox) -> StripeSource:
    return StripeSource(sandbox.restricted_key, api_base=sandbox.api_url, rate_limits=FAST)


def strings_of(frame: pd.DataFrame) -> str:
    """Every cell and column name of `frame` as one text, to search for a secret's value."""
    cells = [str(value) for column in frame.columns for value in frame[column].tolist() if not pd.isna(value)]
    return "\n".join([*map(str, frame.columns), *cells])


def served_secrets(sandbox: Sandbox) -> set[str]:
    """The client secrets of every invoice, as the sandbox answers `expand[]=data.confirmation_secret`."""
    found: set[str] = set()
    after = None
    with requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {sandbox.restricted_key}"
        while True:
            params = {"limit": 100, "expand[]": CONFIRMATION, **({"starting_after": after} if after else {})}
            page = http.get(f"{sandbox.api_url}/v1/invoices", params=params, timeout=30).json()
            found |= {inv["confirmation_secret"]["client_secret"] for inv in page["data"]
                      if inv["confirmation_secret"]}
            if not page["has_more"]:
                return found
            after = page["data"][-1]["id"]


# --- the schema ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ALL_TABLES)
def test_no_column_of_any_table_names_a_secret(table):
    """Protects: `confirmation_secret__client_secret` (and `__type`) left invoices; no other table has one."""
    for column in schema(table).columns:
        assert "secret" not in column.name, (table, column.name)
        assert not set(column.path) & SENSITIVE_FIELDS, (table, column.name)


def test_stripe_python_documents_the_invoice_confirmation_secret_the_rule_leaves_out():
    """The rule is not idle: the pinned Invoice class has the field, documented as a client secret."""
    fields = {f.name: f.doc for f in _class_info(_resource_class("stripe._invoice", "Invoice")).fields}
    assert "client_secret" in fields["confirmation_secret"]


def test_every_sensitive_name_ends_in_secret():
    """The shaper finds secrets in JSON text by the key's ending (`secret":`): a name ending otherwise
    would be dropped from columns but kept inside JSON text."""
    assert SENSITIVE_FIELDS and all(name.endswith("secret") for name in SENSITIVE_FIELDS)


# --- a load over HTTP ------------------------------------------------------------------------------------

def test_the_sandbox_answers_confirmation_secrets_only_when_expanded(sandbox):
    with requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {sandbox.restricted_key}"
        plain = http.get(f"{sandbox.api_url}/v1/invoices", params={"limit": 100}, timeout=30).json()["data"]
        assert plain and all("confirmation_secret" not in inv for inv in plain)
        expanded = http.get(f"{sandbox.api_url}/v1/invoices", timeout=30,
                            params={"limit": 100, "expand[]": CONFIRMATION}).json()["data"]
        for inv in expanded:
            secret = inv["confirmation_secret"]
            assert (secret is None) == (inv["status"] == "draft"), inv["id"]
            if secret:
                assert secret["type"] == "payment_intent" and "_secret_" in secret["client_secret"]
        finalized = next(inv for inv in expanded if inv["confirmation_secret"])
        again = http.get(f"{sandbox.api_url}/v1/invoices/{finalized['id']}", timeout=30,
                         params={"expand[]": "confirmation_secret"}).json()
        assert again["confirmation_secret"] == finalized["confirmation_secret"]  # the same on every request


def test_a_load_of_invoices_answered_with_client_secrets_keeps_none(sandbox, monkeypatch):
    """Protects: with `expand[]=data.confirmation_secret` sent (list and search lanes alike), the
    secrets reach the shaper and no column, cell, child table or preview holds one."""
    monkeypatch.setitem(schema("invoices").list_params, "expand", CONFIRMATION)
    carried: list[str] = []
    row = Shaper.row

    def recording_row(self: Shaper, obj: dict, parent_id: str | None = None) -> tuple:
        if self.schema.name == "invoices" and obj.get("confirmation_secret"):
            carried.append(obj["confirmation_secret"]["client_secret"])
        return row(self, obj, parent_id)

    monkeypatch.setattr(Shaper, "row", recording_row)
    source = make_source(sandbox)
    frames = source.tables(["invoices", "invoices__lines"])
    preview = source.preview("invoices", rows=50)

    secrets = served_secrets(sandbox)
    assert secrets and set(carried) == secrets  # every secret came in, once per invoice
    assert len(frames["invoices"]) == len(sandbox.history().invoices)
    for name, frame in [*frames.items(), ("preview", preview)]:
        text = strings_of(frame)
        assert "secret" not in " ".join(frame.columns), name
        assert not [secret for secret in secrets if secret in text], name


# --- Stripe objects embedded as JSON text ------------------------------------------------------------------

PAYMENT_INTENT = {"id": "pi_1", "object": "payment_intent", "amount": 2000, "status": "succeeded",
                  "client_secret": "pi_1_secret_EMBEDDED", "metadata": {"client_secret": "users-own-value"}}


def test_embedded_stripe_objects_lose_their_client_secret_and_metadata_stays_whole():
    """Protects: an event about a PaymentIntent (Stripe sends its client secret in `data.object`) and a
    customer's includable `sources` keep no secret; the user's `metadata` is kept as it is."""
    event = copy.deepcopy(FIXTURES["event"])
    event["data"] = {"object": PAYMENT_INTENT, "previous_attributes": {"client_secret": "pi_1_secret_PREVIOUS"}}
    event["type"] = "payment_intent.succeeded"
    events = Shaper(schema("events")).frame([Shaper(schema("events")).row(event)])
    assert "_secret_" not in strings_of(events)
    assert json.loads(events.loc[0, "data__object"])["metadata"] == {"client_secret": "users-own-value"}
    assert events.loc[0, "data__object__id"] == "pi_1"

    customer = copy.deepcopy(FIXTURES["customer"])
    source = FIXTURES["charge"]["source"]  # Stripe's Source fixture, with its client_secret
    assert source["client_secret"]
    customer["sources"] = {"object": "list", "data": [source], "has_more": False, "url": "/v1/customers/x/sources"}
    customer["metadata"] = {"client_secret": "users-own-value"}
    shaper = Shaper(schema("customers"))
    customers = shaper.frame([shaper.row(customer)])
    assert json.loads(customers.loc[0, "sources"])["data"][0]["id"] == source["id"]
    assert "client_secret" not in customers.loc[0, "sources"]
    assert json.loads(customers.loc[0, "metadata"]) == {"client_secret": "users-own-value"}


def test_a_secret_the_schema_does_not_know_is_no_extra_column():
    """Protects: unknown fields become extra columns, secrets do not (at the top, nested, in `..__other`)."""
    charge = copy.deepcopy(FIXTURES["charge"])
    charge["client_secret"] = "pi_2_secret_TOP"
    charge["outcome"]["client_secret"] = "pi_2_secret_NESTED"
    charge["payment_method_details"]["link"] = {"client_secret": "pi_2_secret_REST", "country": "FR"}
    charge["zz_new_field"] = 1
    shaper = Shaper(schema("charges"))
    frame = shaper.frame([shaper.row(charge)])
    assert "zz_new_field" in frame.columns  # the extra-column path still works
    assert "_secret_" not in strings_of(frame)
    assert json.loads(frame.loc[0, "payment_method_details__other"])["link"] == {"country": "FR"}


# --- a property over Stripe's fixtures --------------------------------------------------------------------

def dict_nodes(value: Any) -> list[dict]:
    """Every dict inside `value` (through lists), but none inside `metadata` (the user's own data, kept)."""
    if isinstance(value, list):
        return [node for item in value for node in dict_nodes(item)]
    if not isinstance(value, dict):
        return []
    return [value, *(node for key, inner in value.items() if key != "metadata" for node in dict_nodes(inner))]


@st.composite
def planted(draw: Any) -> tuple[str, dict, list[str]]:
    """A fixture object of a random table with secrets planted at random depths: under a secret's
    name (as text, a hash or a list of objects), or as a Stripe object replacing any field."""
    table = draw(st.sampled_from(ALL_TABLES))
    obj = copy.deepcopy(FIXTURES[RESOURCE_OF[table]])
    tokens = []
    for index in range(draw(st.integers(1, 4))):
        nodes = dict_nodes(obj)
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        token = f"pi_{index}_secret_PLANTED{index}"
        tokens.append(token)
        carrier = draw(st.sampled_from(["text", "hash", "list", "object"]))
        if carrier == "object" and node:
            key = draw(st.sampled_from(sorted(k for k in node if k != "metadata") or ["zz"]))
            node[key] = {"id": f"pi_{index}", "object": "payment_intent", "client_secret": token}
            continue
        name = draw(st.sampled_from(sorted(SENSITIVE_FIELDS)))
        node[name] = {"text": token, "object": token, "hash": {"client_secret": token, "type": "payment_intent"},
                      "list": [{"object": "source", "client_secret": token}]}[carrier]
    return table, obj, tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planted())
def test_planted_secrets_never_reach_a_row_a_frame_or_an_error(case):
    """Protects: a secret anywhere in an answer (outside `metadata`) is in no row, column name, cell or
    ShapeError message (a Stripe object where a number belongs is refused, without its secret)."""
    table, obj, tokens = case
    shaper = Shaper(schema(table))
    parent_id = "par_1" if schema(table).parent_key else None
    row = shaper.row(obj, parent_id)
    try:
        text = repr(row) + strings_of(shaper.frame([row]))
    except ShapeError as exc:
        text = repr(row) + str(exc)
    assert not [token for token in tokens if token in text]


# --- the warehouse -----------------------------------------------------------------------------------------

OLD_COLUMN = "confirmation_secret__client_secret"


def stored_columns(path: Path, table: str) -> list[str]:
    with duckdb.connect(str(path)) as con:
        return [row[0] for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]).fetchall()]


@pytest.mark.parametrize("saved_selection", [False, True], ids=["all columns", "a saved column selection"])
def test_a_secret_column_an_older_version_stored_is_dropped_by_the_next_sync(sandbox, tmp_path, saved_selection):
    """Protects: a warehouse written when invoices had `confirmation_secret__client_secret` loses the
    column (and its values) on the next sync, also when a saved selection names it."""
    source = make_source(sandbox)
    wh = Warehouse(tmp_path / "wh.duckdb")
    wh.sync(source, ["invoices"])
    account = source.account_id()
    with duckdb.connect(str(wh.path)) as con:  # what an older version left behind
        where = con.execute("SELECT table_schema FROM information_schema.tables WHERE table_name = 'invoices'"
                            ).fetchall()[0][0]
        con.execute(f'ALTER TABLE "{where}".invoices ADD COLUMN {OLD_COLUMN} VARCHAR')
        con.execute(f"UPDATE \"{where}\".invoices SET {OLD_COLUMN} = id || '_secret_OLD'")
        if saved_selection:
            con.execute("INSERT OR REPLACE INTO mbi_meta.selection VALUES (?, ?, ?, ?)",
                        [account, "invoices", True, json.dumps([*schema("invoices").column_names, OLD_COLUMN])])
    assert OLD_COLUMN in stored_columns(wh.path, "invoices")

    report = wh.sync(source, ["invoices"])

    assert report["invoices"].rows == len(sandbox.history().invoices)
    assert OLD_COLUMN not in stored_columns(wh.path, "invoices")
    assert "_secret_OLD" not in strings_of(wh.sql("SELECT * FROM invoices"))
    assert OLD_COLUMN not in wh.selection("invoices")[1]
