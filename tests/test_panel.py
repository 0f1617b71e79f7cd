"""The Connections panel driven as a user drives it, without a browser: clicks, values, widget state.

Every test runs against a real sandbox (Stripe API, Connect OAuth and the device-flow relay on
loopback). Background work is awaited with `panel.wait`, thread joins or generous polling loops;
nothing asserts that something was fast.
"""
from __future__ import annotations

import base64
import html
import json
import re
import time
import warnings
from typing import Callable, Iterator

import ipywidgets as widgets
import pandas as pd
import pytest
import requests
from ipywidgets.widgets.widget import _instances as ALL_WIDGETS

from mbi_widgets.auth import Connected, Idle, RelayClient, Waiting
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import NEEDS_REAUTH, SUCCESS, Registry
from mbi_widgets.relay import RelayConfig, create_app
from mbi_widgets.sandbox import Sandbox
from mbi_widgets.secretstore import MemoryStore
from mbi_widgets.serving import BackgroundServer
from mbi_widgets.ui.panel import COLUMNS, SOURCE_TYPES, ConnectionsPanel

USER_CODE = re.compile(r"^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$")
MBI_TITLES = ["Customers", "Charges", "Coupons", "Invoices", "Plans", "Subscriptions", "Events",
              "Invoice lines", "Subscription items", "Refunds"]
MBI_TABLES = ["customers", "charges", "coupons", "invoices", "plans", "subscriptions", "events",
              "invoices__lines", "subscriptions__items", "charges__refunds"]
NORTHWIND = "Northwind Analytics"
ALL_RESOURCES = {"account", "customers", "charges", "coupons", "invoices", "plans", "prices", "products",
                 "subscriptions", "refunds", "events"}


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_relay_from_environment(monkeypatch):
    """A relay URL in the developer's environment would win over the sandbox's relay."""
    monkeypatch.delenv("MBI_RELAY_URL", raising=False)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(seed=7, scale=40) as running:
        yield running


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "r.sqlite3", store=MemoryStore())


@pytest.fixture
def panel(registry, sandbox) -> Iterator[ConnectionsPanel]:
    made = ConnectionsPanel(registry, sandbox=sandbox)
    yield made
    made.close()
    made.wait(30)


def wait_until(condition: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def descendants(root: widgets.Widget) -> Iterator[widgets.Widget]:
    yield root
    for child in getattr(root, "children", ()) or ():
        yield from descendants(child)


def shown_text(panel: ConnectionsPanel) -> str:
    """Every text a user can see in the panel right now (HTML, labels, button captions, tab titles)."""
    parts = []
    for widget in descendants(panel.widget):
        if isinstance(widget, (widgets.HTML, widgets.Label)):
            parts.append(strip_tags(widget.value))
        elif isinstance(widget, widgets.Button):
            parts.append(widget.description)
        elif isinstance(widget, (widgets.Accordion, widgets.Tab)):
            parts.extend(widget.titles)
    return re.sub(r"\s+", " ", " ".join(parts))


def buttons(root: widgets.Widget, description: str) -> list[widgets.Button]:
    return [w for w in descendants(root) if isinstance(w, widgets.Button) and w.description == description]


def button(root: widgets.Widget, description: str) -> widgets.Button:
    found = buttons(root, description)
    assert len(found) == 1, f"expected one {description!r} button, found {len(found)}"
    return found[0]


def on_screen(panel: ConnectionsPanel, widget: widgets.Widget) -> bool:
    return any(w is widget for w in descendants(panel.widget))


def is_data_sources_view(panel: ConnectionsPanel) -> bool:
    return on_screen(panel, panel.add_button) and "Data Sources" in panel.body.children[0].children[0].value


def strip_tags(markup: str) -> str:
    """Text as read: block ends and line breaks separate words, inline tags (<b>, <a>) do not."""
    spaced = re.sub(r"<br\s*/?>|</(?:p|div|h\d|li|tr|td|th)>", " ", markup)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", spaced))).strip()


def text_of(widget: widgets.HTML) -> str:
    return strip_tags(widget.value)


def open_stripe_authorization(panel: ConnectionsPanel) -> None:
    panel.add_button.click()
    panel.gallery_tiles[0].click()  # the tile (logo and name) is one button


def start_connect(panel: ConnectionsPanel, *, from_data_sources: bool = True) -> Waiting:
    if from_data_sources:
        open_stripe_authorization(panel)
    panel.connect_button.click()
    state = panel.flow.state
    assert isinstance(state, Waiting), state
    return state


def connect_oauth(panel: ConnectionsPanel, *, from_data_sources: bool = True) -> str:
    """Connect with Stripe, approved at the sandbox; returns the new (or re-authenticated) connection's id."""
    waiting = start_connect(panel, from_data_sources=from_data_sources)
    panel.sandbox.approve(waiting.user_code)
    panel.wait(60)
    assert isinstance(panel.flow.state, Connected), panel.flow.state
    return panel.registry.list()[-1].id


def save_key(panel: ConnectionsPanel, key: str) -> None:
    panel.key_input.value = key
    panel.key_button.click()
    panel.wait(60)


def row_status(panel: ConnectionsPanel, connection_id: str) -> str:
    return text_of(panel.rows[connection_id][2])


def row_action(panel: ConnectionsPanel, connection_id: str, description: str) -> widgets.Button:
    return button(panel.rows[connection_id][-1], description)


def code_line(tab) -> str:
    return html.unescape(re.fullmatch(r"<code>(.*)</code>", tab.code.value).group(1))


def api_status(sandbox: Sandbox, key: str) -> int:
    return requests.get(f"{sandbox.api_url}/v1/account", auth=(key, ""), timeout=10).status_code


# --- Data Sources and the gallery ----------------------------------------------------------------

def test_empty_registry_invites_to_add_a_data_source(panel):
    header, table = panel.body.children
    assert header.children[0].value.endswith("Data Sources</h3>")
    assert header.children[1] is panel.add_button
    assert panel.add_button.description == "Add a Data Source"
    assert panel.add_button.get_state()["button_style"] == "primary"
    assert "No data sources yet. Click Add a Data Source to connect Stripe." in text_of(table)
    assert not any("mbi-sources" in w._dom_classes for w in descendants(panel.widget))
    assert panel.banner.value == ""
    assert panel.preview is None and panel.preview_box.children == ()
    assert panel.rows == {}


def test_table_header_columns_and_one_row_per_connection(panel, sandbox):
    panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    # Changed on purpose (issue 10): a header row and one row box per connection (a grid when the panel is
    # wide, cards when narrow: tests/test_ui_layout.py), Last Updated and the Manage Data action.
    tables = [w for w in descendants(panel.body) if "mbi-sources" in w._dom_classes]
    assert len(tables) == 1
    header, *boxes = tables[0].children
    head = [text_of(cell) for cell in header.children]
    assert head == ["Name", "Connection", "Status", "Last Connection Started", "Last Connection Duration",
                    "Last Updated", "Action"]
    assert list(COLUMNS) == head
    (connection,) = panel.registry.list()
    row = panel.rows[connection.id]
    assert len(boxes) == 1 and list(boxes[0].children) == row and len(row) == len(COLUMNS)
    assert NORTHWIND in text_of(row[0]) and connection.account_id in text_of(row[0])
    assert text_of(row[1]) == "Stripe API key"  # the Connection column tells a key from OAuth
    assert text_of(row[2]) == "Success"
    assert text_of(row[3]) == "just now"
    assert re.fullmatch(r"less than a second|a second|\d+ seconds", text_of(row[4]))
    assert text_of(row[5]) == "never"  # nothing synced yet
    assert [b.description for b in row[6].children] == ["Preview", "Manage Data", "Re-authenticate", "Delete"]
    assert not (panel.registry.path.parent / "warehouse.duckdb").exists()  # showing the table creates no file


def test_gallery_lists_source_types_with_their_logos(panel):
    panel.add_button.click()
    assert "Add a Data Source" in text_of(panel.body.children[0])
    assert len(panel.gallery_tiles) == len(SOURCE_TYPES) >= 1
    # Changed on purpose (issue 10): each tile is one button, its logo drawn by the view's CSS.
    style = panel.body.children[0].value
    for tile, source_type in zip(panel.gallery_tiles, SOURCE_TYPES):
        assert isinstance(tile, widgets.Button) and "mbi-tile" in tile._dom_classes
        assert tile.description == source_type.name
        assert source_type.description in tile.tooltip
        (logo_class,) = [c for c in tile._dom_classes if c.startswith("mbi-tile-")]
        logo = rf"\.{logo_class} {{ --mbi-logo: url\('data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)'\)"
        match = re.search(logo, style)
        assert match, style
        assert "<svg" in base64.b64decode(match.group(1)).decode()
    assert panel.gallery_tiles[0].description == "Stripe"
    button(panel.body, "Back to Data Sources").click()
    assert is_data_sources_view(panel)


def test_stripe_tile_opens_the_authorization_view(panel):
    open_stripe_authorization(panel)
    assert "Stripe authorization" in text_of(panel.body.children[0])
    assert "read-only access" in text_of(panel.body.children[0])
    assert "No relay is configured" not in shown_text(panel)
    assert panel.connect_button.description == "Connect with Stripe"
    assert panel.connect_button.disabled is False
    assert on_screen(panel, panel.connect_button) and on_screen(panel, panel.key_form)
    assert panel.key_form.get_state()["titles"] == ("Use a restricted API key instead",)
    assert panel.key_form.selected_index is None  # folded until asked for
    assert isinstance(panel.key_input, widgets.Password)
    assert panel.key_button.description == "Save key"
    assert on_screen(panel, panel.key_input) and on_screen(panel, panel.key_button)
    button(panel.body, "Back").click()
    assert is_data_sources_view(panel)


# --- Connect with Stripe (device-style link) -----------------------------------------------------

def test_connect_with_stripe_waiting_view_then_approval(capsys):
    panel = ConnectionsPanel.demo(scale=40)
    try:
        sandbox = panel.sandbox
        waiting = start_connect(panel)
        link = waiting.link
        assert link.startswith(f"{sandbox.relay_url}/device")
        assert USER_CODE.fullmatch(waiting.user_code)

        intro = panel.body.children[0].value
        anchor = re.search(r"<a href='([^']+)' target='_blank'[^>]*>([^<]+)</a>", intro)
        assert anchor, intro
        assert html.unescape(anchor.group(1)) == link and html.unescape(anchor.group(2)) == link
        assert "rel='noopener'" in anchor.group(0)
        assert panel.code_label.value == f"<div class='mbi-code'>{waiting.user_code}</div>"
        assert on_screen(panel, panel.code_label) and on_screen(panel, panel.countdown)
        large = re.search(r"\.mbi-code \{ font: 600 (\d+)px", panel.widget.children[0].value)
        assert large and int(large.group(1)) >= 32
        first = wait_until(lambda: panel.countdown.value, what="the countdown")
        assert re.fullmatch(r"Code expires in (\d+):(\d\d)", first)
        minutes, seconds = map(int, re.fullmatch(r"Code expires in (\d+):(\d\d)", first).groups())
        assert 0 < minutes * 60 + seconds <= 600
        wait_until(lambda: panel.countdown.value != first, timeout=10, what="the countdown to tick")

        # Changed on purpose (issue 10): a click prints nothing (its output would land in JupyterLab's log
        # console); the view shows link and code, and connect_with_stripe() called from code prints them.
        assert capsys.readouterr().out == ""
        plain = panel.plain_text()
        assert link in plain and waiting.user_code in plain
        assert panel.registry.list() == []

        sandbox.approve(waiting.user_code)
        panel.wait(60)
        assert isinstance(panel.flow.state, Connected)
        assert "Connection successful!" in text_of(panel.banner)
        assert is_data_sources_view(panel)
        (connection,) = panel.registry.list()
        assert connection.name == NORTHWIND
        assert connection.auth_method == "oauth"
        assert connection.account_id == sandbox.accounts[0].id
        assert connection.relay_url == sandbox.relay_url
        assert list(panel.rows) == [connection.id]
        assert row_status(panel, connection.id) == "Success"
        assert waiting.user_code not in panel.plain_text()
        assert f"- {NORTHWIND} · Stripe · Success" in panel.plain_text()

        preview = panel.preview
        assert preview is not None and preview.name == NORTHWIND
        assert panel.preview_box.children == (preview.widget,)
        assert preview.tab.selected_index == 0
        customers = preview.tabs["customers"]
        assert customers.frame is not None and len(customers.frame) == sandbox.dataset(0).count("customers") > 30
        assert str(len(customers.frame)) in text_of(customers.status) and "rows previewed" in text_of(customers.status)
        assert "<table" in customers.rows.value
        assert customers.load_button.disabled is False
    finally:
        panel.close()
    assert not panel.sandbox.running


def test_denied_in_the_browser_offers_to_try_again(panel, sandbox):
    waiting = start_connect(panel)
    sandbox.deny(waiting.user_code)
    panel.wait(60)
    assert "Access was denied in the browser" in text_of(panel.banner)
    assert "mbi-tone-error" in panel.banner.value  # the error colours (the theme's, issue 10)
    assert panel.registry.list() == []
    assert not on_screen(panel, panel.code_label)
    assert buttons(panel.body, "Back to Data Sources")
    button(panel.body, "Try again").click()
    assert on_screen(panel, panel.connect_button)
    assert "Stripe authorization" in text_of(panel.body.children[0])
    assert panel.connect_button.disabled is False


def test_try_again_after_denial_can_still_connect(panel, sandbox):
    waiting = start_connect(panel)
    sandbox.deny(waiting.user_code)
    panel.wait(60)
    button(panel.body, "Try again").click()
    panel.connect_button.click()
    second = panel.flow.state
    assert isinstance(second, Waiting) and second.user_code != waiting.user_code
    sandbox.approve(second.user_code)
    panel.wait(60)
    assert "Connection successful!" in text_of(panel.banner)
    assert [c.status for c in panel.registry.list()] == [SUCCESS]


@pytest.fixture
def short_relay(sandbox, tmp_path) -> Iterator[str]:
    """A relay on the sandbox's Connect whose codes live two seconds."""
    def make_app(url: str):
        return create_app(RelayConfig(client_id=sandbox.client_id, secret_key=sandbox.secret_key,
                                      public_url=f"{url}", connect_url=sandbox.connect_url, api_url=sandbox.api_url,
                                      db_path=str(tmp_path / "relay.sqlite3"), session_ttl=2, interval=1))

    server = BackgroundServer(make_app=make_app, name="short-relay").start()
    yield server.url
    server.stop()


def test_code_expiry_is_shown_and_offers_to_try_again(registry, sandbox, short_relay):
    panel = ConnectionsPanel(registry, relay_url=short_relay, sandbox=sandbox)
    try:
        waiting = start_connect(panel)
        assert waiting.link.startswith(short_relay)
        panel.wait(60)
        assert "The code expired before it was approved" in text_of(panel.banner)
        assert panel.registry.list() == []
        assert buttons(panel.body, "Try again") and buttons(panel.body, "Back to Data Sources")
        assert not on_screen(panel, panel.countdown)
        panel._ticker.join(10)
        assert not panel._ticker.is_alive()
        button(panel.body, "Back to Data Sources").click()
        assert is_data_sources_view(panel)
        assert panel.banner.value == ""
    finally:
        panel.close()


def test_unreachable_relay_shows_an_error_and_a_retry(registry, capsys):
    panel = ConnectionsPanel(registry, relay_url="http://127.0.0.1:9")
    try:
        open_stripe_authorization(panel)
        assert panel.connect_button.disabled is False
        panel.connect_button.click()
        panel.wait(30)
        assert "could not be reached" in text_of(panel.banner)
        assert "http://127.0.0.1:9" in text_of(panel.banner)
        assert "mbi-tone-error" in panel.banner.value
        assert "enter the code" not in panel.plain_text()
        assert "confirm the code" not in capsys.readouterr().out
        button(panel.body, "Try again").click()
        assert on_screen(panel, panel.connect_button)
        assert panel.registry.list() == []
    finally:
        panel.close()


def test_cancel_returns_to_data_sources_and_stops_polling(panel, sandbox):
    waiting = start_connect(panel)
    flow = panel.flow
    poller = flow._thread
    assert poller is not None and poller.is_alive()  # the click returned; polling goes on behind
    button(panel.body, "Cancel").click()
    assert isinstance(flow.state, Idle)
    assert is_data_sources_view(panel)
    poller.join(15)
    assert not poller.is_alive()
    assert waiting.user_code not in panel.plain_text()
    panel._ticker.join(10)
    assert not panel._ticker.is_alive()
    assert panel.registry.list() == []


def test_without_a_relay_connect_with_stripe_is_disabled_and_says_why(registry, monkeypatch):
    monkeypatch.delenv("MBI_RELAY_URL", raising=False)
    panel = ConnectionsPanel(registry)
    assert panel.relay_url is None
    open_stripe_authorization(panel)
    assert panel.connect_button.disabled is True
    assert panel.connect_button.get_state()["disabled"] is True
    assert "No relay is configured (set MBI_RELAY_URL)" in shown_text(panel)
    assert "use a restricted API key below" in shown_text(panel)
    assert on_screen(panel, panel.key_form)
    with pytest.raises(MbiError) as raised:
        panel.connect_with_stripe()
    assert raised.value.code == "no_relay"


def test_relay_url_from_the_environment_enables_connect(registry, monkeypatch, sandbox):
    monkeypatch.setenv("MBI_RELAY_URL", sandbox.relay_url)
    panel = ConnectionsPanel(registry)
    open_stripe_authorization(panel)
    assert panel.connect_button.disabled is False
    assert "No relay is configured" not in shown_text(panel)


# --- the restricted key form ----------------------------------------------------------------------

def test_good_restricted_key_adds_a_success_row_and_clears_the_password(panel, sandbox):
    open_stripe_authorization(panel)
    key_input = panel.key_input
    key_input.value = sandbox.restricted_key
    panel.key_button.click()
    assert key_input.value == ""
    assert key_input.get_state()["value"] == ""
    panel.wait(60)
    (connection,) = panel.registry.list()
    assert connection.auth_method == "restricted_key" and connection.scope == "read_only"
    assert connection.name == NORTHWIND
    assert row_status(panel, connection.id) == "Success"
    assert "Connection successful!" in text_of(panel.banner)
    assert is_data_sources_view(panel)
    assert panel.preview is not None and panel.preview.name == NORTHWIND
    assert panel.registry.secret(connection.id) == sandbox.restricted_key


def test_publishable_key_is_refused_with_advice_on_restricted_keys(panel):
    open_stripe_authorization(panel)
    save_key(panel, "pk_test_51NotARealKeyAtAll0123456789")
    message = text_of(panel.key_message)
    assert "publishable key" in message and "Create restricted key" in message
    assert "mbi-tone-error" in panel.key_message.value
    assert panel.registry.list() == []
    assert on_screen(panel, panel.key_message)  # still on the authorization view, message visible
    assert panel.key_button.disabled is False
    assert panel.key_input.value == ""


def test_wrong_restricted_key_is_reported_invalid_without_echoing_it(panel):
    wrong = "rk_test_" + "Q" * 40
    open_stripe_authorization(panel)
    save_key(panel, wrong)
    message = text_of(panel.key_message)
    assert "Stripe rejected the key" in message and "mistyped" in message
    assert wrong not in panel.key_message.value
    assert panel.registry.list() == []
    assert on_screen(panel, panel.key_message)
    assert panel.key_button.disabled is False


def test_something_that_is_not_a_key_is_refused(panel):
    open_stripe_authorization(panel)
    save_key(panel, "hello")
    assert "does not look like a Stripe API key" in text_of(panel.key_message)
    assert panel.registry.list() == []


def test_secret_key_is_accepted_with_a_visible_warning(panel, sandbox):
    """Shown in the panel, and not also issued as a Python warning (JupyterLab's log console would show it)."""
    open_stripe_authorization(panel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_key(panel, sandbox.secret_key)
    (connection,) = panel.registry.list()
    assert connection.auth_method == "secret_key"
    assert connection.account_id == sandbox.platform_account_id
    assert row_status(panel, connection.id) == "Success"
    # The warning must be where the user looks after saving, not on a view that is gone.
    assert "This is a full secret key: it can also move money" in shown_text(panel)
    assert "Connection successful!" in text_of(panel.banner)
    assert "full secret key" in text_of(panel.banner)
    assert "mbi-tone-error" not in panel.banner.value  # a warning, not a failure


def test_restricted_key_without_account_access_still_connects(panel, sandbox):
    """Guards: a key that reads the tables but not the account's details is a working connection."""
    key = sandbox.create_restricted_key({"customers", "charges"})
    open_stripe_authorization(panel)
    save_key(panel, key)
    (connection,) = panel.registry.list()
    assert connection.status == "Success"
    assert row_status(panel, connection.id) == "Success"
    assert "Connection successful!" in text_of(panel.banner)
    assert panel.preview is not None


def test_restricted_key_reading_nothing_shows_an_error(panel, sandbox):
    key = sandbox.create_restricted_key(set())
    open_stripe_authorization(panel)
    save_key(panel, key)
    assert "rak_customer_read" in text_of(panel.key_message) or "rak_customer_read" in text_of(panel.banner)
    assert panel.preview is None and panel.registry.list() == []


def test_restricted_key_reading_some_tables_is_named_after_what_it_reads(panel, sandbox):
    """Issue 10: not "Stripe account / unknown" with a plain Success badge."""
    key = sandbox.create_restricted_key({"customers", "charges"})
    open_stripe_authorization(panel)
    save_key(panel, key)
    (connection,) = panel.registry.list()
    assert connection.name == f"{sandbox.accounts[0].id} · Customers, Charges"
    assert "cannot read Coupons" in text_of(panel.banner)
    assert "reads only Customers, Charges" in connection.status_message


def test_an_account_already_connected_is_offered_for_reauthentication_not_added_again(panel, sandbox):
    """Changed on purpose (issue 10): connecting the same account twice used to add "Northwind Analytics (2)"."""
    first = panel.connect_with_key(sandbox.create_restricted_key({"account", "customers"}))
    panel.wait(60)
    open_stripe_authorization(panel)
    save_key(panel, sandbox.restricted_key)
    assert [c.id for c in panel.registry.list()] == [first.id]  # nothing added
    assert f"{NORTHWIND} is already connected" in shown_text(panel)
    assert "Connection successful" not in text_of(panel.banner)
    offer = button(panel.body, f"Re-authenticate {NORTHWIND}")
    assert panel.key_input.value == ""  # the pending key is in Python memory only
    offer.click()
    panel.wait(60)
    assert [c.id for c in panel.registry.list()] == [first.id]
    assert panel.registry.secret(first.id) == sandbox.restricted_key
    assert is_data_sources_view(panel) and row_status(panel, first.id) == "Success"
    assert f"{NORTHWIND} was re-authenticated" in text_of(panel.banner)


def test_cancelling_the_offer_keeps_the_connection_as_it_was(panel, sandbox):
    first_key = sandbox.create_restricted_key({"account", "customers"})
    first = panel.connect_with_key(first_key)
    panel.wait(60)
    open_stripe_authorization(panel)
    save_key(panel, sandbox.restricted_key)
    button(panel.body, "Cancel").click()
    assert is_data_sources_view(panel)
    assert panel.registry.secret(first.id) == first_key
    assert [c.name for c in panel.registry.list()] == [NORTHWIND]


# --- row actions ----------------------------------------------------------------------------------

def test_preview_button_opens_that_connections_preview(panel, sandbox):
    panel.connect_with_key(sandbox.restricted_key)
    second_key = sandbox.create_restricted_key(
        {"account", "customers", "charges", "coupons", "invoices", "plans", "prices", "products", "subscriptions",
         "refunds", "events"}, account=1)
    panel.connect_with_key(second_key)
    panel.wait(60)
    first, second = panel.registry.list()
    assert second.name == "Brightwave Studio GmbH"
    assert panel.preview.name == second.name

    row_action(panel, first.id, "Preview").click()
    panel.wait(60)
    assert panel.preview.name == NORTHWIND
    assert panel.preview_box.children == (panel.preview.widget,)
    assert "Preview · Northwind Analytics" in shown_text(panel)
    ids = set(panel.preview.tabs["customers"].frame["id"])
    assert ids == {record.id for record in sandbox.dataset(0).collections["customers"].records}

    row_action(panel, second.id, "Preview").click()
    panel.wait(60)
    assert panel.preview.name == second.name
    assert "Preview · Brightwave Studio GmbH" in shown_text(panel)
    ids = set(panel.preview.tabs["customers"].frame["id"])
    assert ids == {record.id for record in sandbox.dataset(1).collections["customers"].records}


def test_preview_click_retests_the_connection_and_refreshes_its_row(panel, sandbox):
    """Guards: Last Connection Started/Duration describe the latest use, not only the first test."""
    panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    before = panel.registry.list()[0]
    assert before.last_started is not None
    time.sleep(0.05)  # a lower bound only: the next test must start strictly later
    row_action(panel, before.id, "Preview").click()
    panel.wait(60)
    after = panel.registry.get(before.id)
    assert after.last_started > before.last_started
    assert after.status == "Success"
    assert before.id in panel.rows  # the table was redrawn with the fresh row


def test_relative_times_are_reworded_as_time_passes(panel, sandbox):
    """Guards: 'just now' does not stay 'just now' on a panel left open."""
    from datetime import datetime, timedelta, timezone

    from mbi_widgets.registry import _iso

    panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    (connection,) = panel.registry.list()
    assert "just now" in panel.rows[connection.id][3].value
    panel.registry._update(connection.id, last_started=_iso(datetime.now(timezone.utc) - timedelta(hours=2)))
    panel.refresh_times()
    assert "2 hours ago" in panel.rows[connection.id][3].value


def test_reauthenticate_replaces_the_secret_and_keeps_one_row(panel, sandbox):
    connection_id = connect_oauth(panel)
    old_token = panel.registry.secret(connection_id)
    row_action(panel, connection_id, "Re-authenticate").click()
    assert "Re-authenticate" in text_of(panel.body.children[0])
    assert on_screen(panel, panel.connect_button)
    again = connect_oauth(panel, from_data_sources=False)  # Connect with Stripe on the Re-authenticate view
    assert again == connection_id
    (connection,) = panel.registry.list()
    assert connection.id == connection_id
    new_token = panel.registry.secret(connection_id)
    assert new_token != old_token
    assert connection.status == SUCCESS
    assert list(panel.rows) == [connection_id]
    assert row_status(panel, connection_id) == "Success"
    assert api_status(sandbox, new_token) == 200


def test_reauthenticate_with_a_key_replaces_the_secret(panel, sandbox):
    connection = panel.connect_with_key(sandbox.create_restricted_key({"account", "customers"}))
    panel.wait(60)
    row_action(panel, connection.id, "Re-authenticate").click()
    panel.key_form.selected_index = 0
    save_key(panel, sandbox.restricted_key)
    assert [c.id for c in panel.registry.list()] == [connection.id]
    assert panel.registry.secret(connection.id) == sandbox.restricted_key
    assert row_status(panel, connection.id) == "Success"


@pytest.mark.parametrize("leave_by", ["Back", "Cancel"])
def test_leaving_a_reauthentication_forgets_it(panel, sandbox, leave_by):
    """After Back (or Cancel on the waiting view), the next connection is a new one, not a re-authentication."""
    first = panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    row_action(panel, first.id, "Re-authenticate").click()
    if leave_by == "Cancel":
        start_connect(panel, from_data_sources=False)
    button(panel.body, leave_by).click()
    assert is_data_sources_view(panel)
    other_account = sandbox.create_restricted_key({"account", "customers"}, account=1)
    second = panel.connect_with_key(other_account)
    panel.wait(60)
    assert second.id != first.id
    assert [c.id for c in panel.registry.list()] == [first.id, second.id]
    assert panel.registry.secret(first.id) == sandbox.restricted_key
    assert panel.registry.get(first.id).status == SUCCESS
    assert second.name == "Brightwave Studio GmbH" and second.status == SUCCESS


def test_delete_asks_for_confirmation_and_cancel_keeps_the_row(panel, sandbox):
    connection = panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    row_action(panel, connection.id, "Delete").click()
    actions = panel.rows[connection.id][-1]
    question, sure, keep = actions.children
    assert text_of(question) == f"Delete {NORTHWIND}?"
    assert (sure.description, keep.description) == ("Yes, delete", "Cancel")
    assert sure.button_style == "danger"
    keep.click()
    assert [c.id for c in panel.registry.list()] == [connection.id]
    assert [b.description for b in panel.rows[connection.id][-1].children] == ["Preview", "Manage Data",
                                                                               "Re-authenticate", "Delete"]
    assert row_status(panel, connection.id) == "Success"


def test_delete_yes_removes_an_oauth_connection_and_revokes_its_token(panel, sandbox):
    connection_id = connect_oauth(panel)
    token = panel.registry.secret(connection_id)
    secret_ref = panel.registry.get(connection_id).secret_ref
    assert panel.registry.store.get(secret_ref) == token
    assert api_status(sandbox, token) == 200
    assert panel.preview is not None
    row_action(panel, connection_id, "Delete").click()
    button(panel.rows[connection_id][-1], "Yes, delete").click()
    panel.wait(60)
    assert panel.registry.list() == []
    assert panel.registry.store.get(secret_ref) is None
    assert f"{NORTHWIND} was deleted." in text_of(panel.banner)
    assert "No data sources yet" in shown_text(panel)
    assert panel.preview is None and panel.preview_box.children == ()
    assert panel.rows == {}  # no stale row widgets for a connection that is gone
    assert api_status(sandbox, token) == 401


@pytest.mark.parametrize("where", ["relay", "connect"])
def test_revoked_token_shows_needs_reauthentication(panel, sandbox, where):
    connection_id = connect_oauth(panel)
    token = panel.registry.secret(connection_id)
    account_id = panel.registry.get(connection_id).account_id
    if where == "relay":
        RelayClient(sandbox.relay_url).deauthorize(access_token=token, stripe_user_id=account_id)
    else:
        answer = requests.post(f"{sandbox.connect_url}/oauth/deauthorize",
                               data={"client_id": sandbox.client_id, "stripe_user_id": account_id},
                               auth=(sandbox.secret_key, ""), timeout=10)
        assert answer.status_code == 200
    assert api_status(sandbox, token) == 401
    assert row_status(panel, connection_id) == "Success"  # nothing has noticed yet

    row_action(panel, connection_id, "Preview").click()  # reading the tables now fails with 401
    panel.wait(60)
    assert panel.registry.get(connection_id).status == NEEDS_REAUTH
    assert row_status(panel, connection_id) == "Needs re-authentication"
    assert "re-authenticate the connection" in panel.rows[connection_id][2].value  # the badge's tooltip
    assert row_action(panel, connection_id, "Re-authenticate").button_style == "warning"
    assert "mbi-tone-error" in panel.preview.tabs["customers"].status.value


# --- the preview ----------------------------------------------------------------------------------

@pytest.fixture
def previewing(panel, sandbox) -> ConnectionsPanel:
    open_stripe_authorization(panel)
    save_key(panel, sandbox.restricted_key)
    assert panel.preview is not None
    return panel


def test_preview_has_one_tab_per_table_in_mbi_order(previewing):
    preview = previewing.preview
    assert list(preview.tabs) == MBI_TABLES
    assert list(preview.tab.get_state()["titles"]) == MBI_TITLES
    assert len(preview.tab.children) == len(MBI_TABLES)
    assert [tab.box for tab in preview.tabs.values()] == list(preview.tab.children)
    for table, tab in preview.tabs.items():
        assert code_line(tab) == f"panel.source({NORTHWIND!r}).table({table!r})"


def test_each_tab_code_line_returns_the_tabs_dataframe(previewing):
    panel, preview = previewing, previewing.preview
    for index, (table, tab) in enumerate(preview.tabs.items()):
        preview.tab.selected_index = index
        panel.wait(60)
        assert tab.frame is not None, table
        frame = eval(code_line(tab), {"panel": panel})  # noqa: S307 - the line the user is told to run
        assert isinstance(frame, pd.DataFrame)
        assert list(frame.columns) == list(tab.frame.columns), table
        assert dict(frame.dtypes.astype(str)) == dict(tab.frame.dtypes.astype(str)), table
        assert len(frame) >= len(tab.frame)


def test_switching_tabs_loads_only_that_tab(previewing):
    panel, preview = previewing, previewing.preview
    invoices = preview.tabs["invoices"]
    assert not invoices.started and invoices.frame is None
    assert invoices.load_button.disabled is True
    preview.tab.selected_index = MBI_TABLES.index("invoices")
    assert invoices.started
    panel.wait(60)
    assert invoices.frame is not None and len(invoices.frame) > 0
    assert "rows previewed" in text_of(invoices.status)
    assert invoices.load_button.disabled is False
    assert "<table" in invoices.rows.value
    for table in ("coupons", "plans", "events", "charges__refunds"):
        assert not preview.tabs[table].started and preview.tabs[table].frame is None
    assert "Loading the newest events" in text_of(preview.tabs["events"].status)


@pytest.mark.parametrize(("table", "dataset_name"), [("charges", "charges"), ("customers", "customers")])
def test_load_full_table_fills_the_progress_bar(previewing, sandbox, table, dataset_name):
    panel, preview = previewing, previewing.preview
    tab = preview.tabs[table]
    preview.tab.selected_index = MBI_TABLES.index(table)
    panel.wait(60)
    assert tab.progress.layout.visibility == "hidden"
    tab.load_button.click()
    assert tab.progress.layout.visibility == "visible"
    panel.wait(60)
    expected = sandbox.dataset(0).count(dataset_name)
    assert tab.progress.bar_style == "success"
    assert tab.progress_label.value == f"All {expected:,} rows loaded"
    assert tab.progress.value == tab.progress.max == expected
    assert tab.progress.get_state()["value"] == expected
    assert tab.full and len(tab.frame) == expected
    assert preview.frames[table] is tab.frame
    assert f"{expected:,} rows (the whole table)" in text_of(tab.status)
    assert tab.load_button.disabled is False


def test_clicks_return_while_loading_continues_in_the_background(tmp_path):
    slow = Sandbox(seed=11, scale=40, latency_ms=200).start()
    panel = ConnectionsPanel(Registry(tmp_path / "slow.sqlite3", store=MemoryStore()), sandbox=slow)
    try:
        open_stripe_authorization(panel)
        panel.key_input.value = slow.restricted_key
        panel.key_button.click()
        checking = panel._last_thread
        assert checking is not None and checking.is_alive()  # the click returned; the key is checked behind
        assert "Checking the key" in text_of(panel.key_message)
        panel.wait(120)
        assert not checking.is_alive()
        preview = panel.preview
        assert preview is not None

        charges = preview.tabs["charges"]
        preview.tab.selected_index = 1
        switching = preview.threads[-1]
        assert switching.is_alive() and charges.frame is None
        panel.wait(120)
        assert charges.frame is not None

        charges.load_button.click()
        loading = preview.threads[-1]
        assert loading.is_alive()
        assert charges.full is False and charges.load_button.disabled is True
        assert charges.progress.bar_style == "info"
        loading.join(120)
        assert not loading.is_alive()
        assert charges.progress.bar_style == "success"
        assert charges.progress_label.value == f"All {slow.dataset(0).count('charges'):,} rows loaded"
    finally:
        panel.close()
        panel.wait(30)
        slow.stop()


# --- secrets and display --------------------------------------------------------------------------

def test_no_secret_reaches_widget_state_output_or_reprs(panel, sandbox, capsys):
    waiting = start_connect(panel)
    device_code = waiting.device_code
    sandbox.approve(waiting.user_code)
    panel.wait(60)
    oauth_id = panel.registry.list()[0].id
    charges = panel.preview.tabs["charges"]
    panel.preview.tab.selected_index = 1
    panel.wait(60)
    charges.load_button.click()
    panel.wait(60)
    assert charges.progress.bar_style == "success"
    open_stripe_authorization(panel)
    save_key(panel, sandbox.restricted_key)  # the OAuth account again: offered, held in Python only
    assert buttons(panel.body, f"Re-authenticate {NORTHWIND}")
    open_stripe_authorization(panel)
    save_key(panel, sandbox.create_restricted_key(ALL_RESOURCES, account=1))
    key_id = panel.registry.list()[1].id
    panel.preview.tabs["customers"].load_button.click()
    panel.wait(60)
    # The new views too: the Data Warehouse Manager during and after a sync, its column picker, the
    # update cycle, and a preview read from the warehouse.
    view = panel.show_warehouse(oauth_id)
    view.sync_button.click()
    panel.wait(60)
    assert "Synced" in text_of(view.summary)
    view.open_picker("charges")
    panel.auto_sync(3600)
    panel.open_preview(oauth_id)
    panel.wait(60)
    assert "from the warehouse" in text_of(panel.preview.tabs["customers"].status)
    print(panel)

    secrets = {
        "oauth access token": panel.registry.secret(oauth_id),
        "oauth refresh token": panel.registry.refresh_token(oauth_id),
        "restricted key": panel.registry.secret(key_id),
        "sandbox secret key": sandbox.secret_key,
        "sandbox restricted key": sandbox.restricted_key,
        "device code": device_code,
    }
    assert all(secrets.values()), [name for name, value in secrets.items() if not value]

    states = [json.dumps(w.get_state(), default=str) for w in list(ALL_WIDGETS.values())]
    assert len(states) > 50
    outputs = capsys.readouterr()
    texts = {
        "widget state": "\n".join(states),
        "stdout": outputs.out,
        "stderr": outputs.err,
        "sources": repr(panel.source(NORTHWIND)) + repr(panel.source("Brightwave Studio GmbH")),
        "connections": repr(panel.connections) + repr(panel.connections.current) + repr(panel.cycle),
        "plain text": panel.plain_text(),
        "mimebundle": json.dumps(panel._repr_mimebundle_(), default=str),
        "registry": repr(panel.registry),
    }
    for where, text in texts.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} appears in the {where}"


def test_repr_mimebundle_has_the_widget_view_and_plain_text(panel, sandbox):
    panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    bundle = panel._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    view = data["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == panel.widget.model_id
    assert view["version_major"] == 2
    assert data["text/plain"] == panel.plain_text()
    assert data["text/plain"].startswith("Connections")
    assert f"- {NORTHWIND} · Stripe · Success" in data["text/plain"]


def test_source_by_name_or_id_and_unknown_names(panel, sandbox):
    connection = panel.connect_with_key(sandbox.restricted_key)
    panel.wait(60)
    assert panel.source(NORTHWIND) is panel.source(connection.id)
    with pytest.raises(MbiError) as raised:
        panel.source("Nobody")
    assert raised.value.code == "unknown_connection"
    assert repr(NORTHWIND) in str(raised.value)
