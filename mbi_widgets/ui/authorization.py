"""Adding a data source: the gallery of source types, Stripe's authorization view (Connect with Stripe or a
restricted key, for a new connection or to re-authenticate one), and the offer to re-authenticate an
account that is already connected."""
from __future__ import annotations

import base64
import hashlib
import html
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import ipywidgets as widgets

from mbi_widgets.auth import AuthError
from mbi_widgets.connections import ConnectOutcome, auth_label
from mbi_widgets.registry import Connection
from mbi_widgets.ui.format import badge, toned
from mbi_widgets.ui.frame import button, wrapping

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.ui.panel import ConnectionsPanel


@dataclass(frozen=True)
class SourceType:
    """A kind of data source offered in the gallery."""

    name: str
    logo: str  # an SVG file shipped in mbi_widgets/assets
    description: str

    def logo_data_uri(self) -> str:
        data = resources.files("mbi_widgets.assets").joinpath(self.logo).read_bytes()
        return "data:image/svg+xml;base64," + base64.b64encode(data).decode()


SOURCE_TYPES = (SourceType("Stripe", "stripe.svg", "Payments, subscriptions and invoices"),)


def _tile_style() -> str:
    """The logos, as CSS: each tile is a button whose background is its source type's logo."""
    rules = "".join(f".mbi-panel .mbi-tile-{_slug(t.name)} {{ --mbi-logo: url('{t.logo_data_uri()}'); }}"
                    for t in SOURCE_TYPES)
    return f"<style>{rules}</style>"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


class GalleryView:
    """Add a Data Source: one tile per source type (`tiles`), each one button (logo and name) that opens
    the source type's authorization."""

    def __init__(self, panel: "ConnectionsPanel") -> None:
        self.tiles: list[widgets.Button] = []
        for source_type in SOURCE_TYPES:
            tile = button(source_type.name, tooltip=f"Connect {source_type.name}: {source_type.description}",
                          classes=("mbi-tile", f"mbi-tile-{_slug(source_type.name)}"),
                          layout=widgets.Layout(width="150px", height="118px"))
            tile.on_click(lambda _, kind=source_type: panel.show_authorization(kind.name))
            self.tiles.append(tile)
        back = button("Back to Data Sources", icon="arrow-left")
        back.on_click(lambda _: panel.show_data_sources())
        self.children = [widgets.HTML(_tile_style() + "<h3 style='margin:0 0 8px'>Add a Data Source</h3>"),
                         wrapping(list(self.tiles)), back]


def _for_connection(connection: Connection) -> str:
    return (f"<b>{html.escape(connection.name)}</b> ({html.escape(connection.account_id)}, connected with "
            f"{html.escape(auth_label(connection))})")


#: How long a Save key click waits for a key the browser has not sent yet: its update of the field can
#: arrive after the click (a widget's state update waits behind a pending message; a click does not).
KEY_GRACE_SECONDS = 5.0


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AuthorizationView:
    """Stripe authorization: Connect with Stripe, or a restricted key; `reauth` names the connection that
    the new credential is for. With a sandbox (the demo), its restricted key can be used without showing it."""

    def __init__(self, panel: "ConnectionsPanel", reauth: Connection | None = None) -> None:
        self.panel, self.reauth = panel, reauth
        self.connect_button = button("Connect with Stripe", button_style="primary", disabled=panel.relay_url is None,
                                     tooltip="Open a link in your browser, sign in to Stripe, allow read-only access")
        self.connect_button.on_click(lambda _: panel._connect_clicked())
        no_relay = ("" if panel.relay_url else toned("No relay is configured (set MBI_RELAY_URL), so Connect with "
                                                     "Stripe is unavailable: use a restricted API key below.", "error",
                                                     tag="p"))
        # continuous_update=False: the key crosses to the kernel once (Enter, or leaving the field), not per
        # keystroke, so fewer late copies of it can trail behind the click that clears it.
        self.key_input = widgets.Password(placeholder="rk_live_…", continuous_update=False,
                                          layout=widgets.Layout(width="auto", flex="1 1 220px", min_width="0"))
        self.key_input.observe(self._key_arrived, names="value")
        self.key_button = button("Save key", icon="key")
        self.key_button.on_click(lambda _: self._save_clicked())
        self.sandbox_button: widgets.Button | None = None
        if panel.sandbox is not None:
            self.sandbox_button = button("Use the sandbox's restricted key", icon="flask",
                                         tooltip="The demo sandbox's read-only key, handed to the panel in Python: "
                                                 "it is never shown, nor put in the field")
            self.sandbox_button.on_click(lambda _: self._check(panel.sandbox.restricted_key,
                                                               "Checking the sandbox's restricted key…"))
        self.key_message = widgets.HTML()
        self._taken: set[str] = set()  # digests of the keys taken from the field (their late copies are cleared)
        self._awaiting_until = 0.0  # a Save key click that came before its key
        sandbox_row = [wrapping([self.sandbox_button])] if self.sandbox_button is not None else []
        key_form = widgets.VBox([
            widgets.HTML("<p>Create a <b>restricted key</b> with Read access in Stripe (Developers › API keys › "
                         "Create restricted key) and paste it here. It is checked with Stripe, then kept in your "
                         "OS keyring, never in the notebook.</p>"),
            wrapping([self.key_input, self.key_button]), *sandbox_row, self.key_message])
        self.key_form = widgets.Accordion(children=[key_form], titles=("Use a restricted API key instead",))
        self.key_form.selected_index = None
        back = button("Back", icon="arrow-left")
        back.on_click(lambda _: panel._leave_authorization())
        if reauth is None:
            heading = "<h3 style='margin:0 0 8px'>Stripe authorization</h3>"
        else:
            heading = (f"<h3 style='margin:0 0 8px'>Re-authenticate {html.escape(reauth.name)}</h3><p>A new "
                       f"credential for {_for_connection(reauth)} replaces the current one; its tables and "
                       "settings stay.</p>")
        self.children = [
            widgets.HTML(heading + "<p>mbi-widgets will get <b>read-only access</b> to your Stripe account's data: "
                         "customers, charges, coupons, invoices, plans, subscriptions and events. It cannot move "
                         "money or change anything.</p>" + no_relay),
            self.connect_button, self.key_form, back]

    def _save_clicked(self) -> None:
        key = self._take_key()
        if not key:
            # The browser may still be sending the key (see KEY_GRACE_SECONDS): `_key_arrived` saves it then.
            self._awaiting_until = time.monotonic() + KEY_GRACE_SECONDS
            self.key_message.value = toned("Paste a restricted key (rk_live_… or rk_test_…), then click Save key.",
                                           "error")
            return
        self._check(key, "Checking the key with Stripe…")

    def _take_key(self) -> str:
        """The key typed in the field, which is emptied: never leave a secret in widget state."""
        key = self.key_input.value
        if key:
            self._taken.add(_digest(key))
        self.key_input.value = ""
        return key.strip()

    def _key_arrived(self, change: dict) -> None:
        key = change["new"]
        if not key:
            return
        if _digest(key) in self._taken:  # a late copy of a key already taken (the front end re-sent it)
            self.key_input.value = ""
        elif time.monotonic() < self._awaiting_until:  # the click came before the key
            self._awaiting_until = 0.0
            self._save_clicked()

    def _check(self, key: str, checking: str) -> None:
        """Checks `key` with Stripe on a thread, then saves the connection (the panel shows what it did)."""
        self._set_busy(True)
        self.key_message.value = f"<i>{html.escape(checking)}</i>"

        def work() -> None:
            try:
                self.panel.connect_with_key(key)
            except AuthError as exc:
                self.key_message.value = toned(str(exc), "error")
            finally:
                self._set_busy(False)
                if self.key_input.value and _digest(self.key_input.value) in self._taken:
                    self.key_input.value = ""

        self.panel._in_background(work)

    def _set_busy(self, busy: bool) -> None:
        self.key_button.disabled = busy
        if self.sandbox_button is not None:
            self.sandbox_button.disabled = busy


class AlreadyConnectedView:
    """The account just authorized is already a data source: offer to re-authenticate that row instead of
    adding a copy. The new credential stays in the outcome (Python memory), never in a widget."""

    def __init__(self, panel: "ConnectionsPanel", outcome: ConnectOutcome) -> None:
        existing = outcome.connection
        self.reauth_button = button(f"Re-authenticate {existing.name}"[:60], button_style="primary", icon="refresh")
        self.reauth_button.on_click(lambda _: self._accept(panel, outcome))
        cancel = button("Cancel")
        cancel.on_click(lambda _: panel._leave_authorization())
        self.children = [
            widgets.HTML(f"<h3 style='margin:0 0 8px'>{html.escape(existing.name)} is already connected</h3>"
                         f"<p>This Stripe account is already a data source: {_for_connection(existing)}, "
                         f"{badge(existing.status, existing.status_message)}.</p><p>Re-authenticate it with the "
                         "access you just gave, instead of adding a second copy of the same account?</p>"),
            wrapping([self.reauth_button, cancel])]

    def _accept(self, panel: "ConnectionsPanel", outcome: ConnectOutcome) -> None:
        self.reauth_button.disabled = True
        panel._in_background(lambda: panel._finish(panel.connections.reauthenticate_existing(outcome)))
