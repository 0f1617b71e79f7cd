"""Adding a data source: the gallery of source types, Stripe's authorization view (Connect with Stripe or a
restricted key, for a new connection or to re-authenticate one), and the offer to re-authenticate an
account that is already connected."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

import ipywidgets as widgets

from mbi_widgets.auth import AuthError
from mbi_widgets.connections import ConnectOutcome, auth_label
from mbi_widgets.registry import Connection
from mbi_widgets.ui.format import badge

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


class GalleryView:
    """Add a Data Source: one tile per source type (`tiles`)."""

    def __init__(self, panel: "ConnectionsPanel") -> None:
        self.tiles = []
        for source_type in SOURCE_TYPES:
            tile = widgets.Button(description=source_type.name, tooltip=source_type.description,
                                  layout=widgets.Layout(width="120px", height="36px"))
            tile.on_click(lambda _, kind=source_type: panel.show_authorization(kind.name))
            logo = widgets.HTML(f"<img src='{source_type.logo_data_uri()}' width='72' height='72' "
                                f"alt='{html.escape(source_type.name)} logo'>")
            self.tiles.append(widgets.VBox([logo, tile], layout=widgets.Layout(align_items="center", padding="8px",
                                                                                border="1px solid #e5e7eb")))
        back = widgets.Button(description="Back to Data Sources", icon="arrow-left")
        back.on_click(lambda _: panel.show_data_sources())
        self.children = [widgets.HTML("<h3 style='margin:0 0 8px'>Add a Data Source</h3>"), widgets.HBox(self.tiles),
                         back]


def _for_connection(connection: Connection) -> str:
    return (f"<b>{html.escape(connection.name)}</b> ({html.escape(connection.account_id)}, connected with "
            f"{html.escape(auth_label(connection))})")


class AuthorizationView:
    """Stripe authorization: Connect with Stripe, or a restricted key; `reauth` names the connection that
    the new credential is for."""

    def __init__(self, panel: "ConnectionsPanel", reauth: Connection | None = None) -> None:
        self.panel, self.reauth = panel, reauth
        self.connect_button = widgets.Button(description="Connect with Stripe", button_style="primary",
                                             disabled=panel.relay_url is None, layout=widgets.Layout(width="200px"))
        self.connect_button.on_click(lambda _: panel.connect_with_stripe())
        no_relay = ("" if panel.relay_url else "<p style='color:#b42318'>No relay is configured (set MBI_RELAY_URL), "
                    "so Connect with Stripe is unavailable: use a restricted API key below.</p>")
        self.key_input = widgets.Password(placeholder="rk_live_…", layout=widgets.Layout(width="360px"))
        self.key_button = widgets.Button(description="Save key")
        self.key_button.on_click(lambda _: self._save_clicked())
        self.key_message = widgets.HTML()
        key_form = widgets.VBox([
            widgets.HTML("<p>Create a <b>restricted key</b> with Read access in Stripe (Developers › API keys › "
                         "Create restricted key) and paste it here. It is checked with Stripe, then kept in your "
                         "OS keyring, never in the notebook.</p>"),
            widgets.HBox([self.key_input, self.key_button]), self.key_message])
        self.key_form = widgets.Accordion(children=[key_form], titles=("Use a restricted API key instead",))
        self.key_form.selected_index = None
        back = widgets.Button(description="Back", icon="arrow-left")
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
        key = self.key_input.value
        self.key_input.value = ""  # never leave a secret in widget state
        self.key_button.disabled = True
        self.key_message.value = "<i>Checking the key with Stripe…</i>"

        def work() -> None:
            try:
                self.panel.connect_with_key(key)
            except AuthError as exc:
                self.key_message.value = f"<span style='color:#b42318'>{html.escape(str(exc))}</span>"
            finally:
                self.key_button.disabled = False

        self.panel._in_background(work)


class AlreadyConnectedView:
    """The account just authorized is already a data source: offer to re-authenticate that row instead of
    adding a copy. The new credential stays in the outcome (Python memory), never in a widget."""

    def __init__(self, panel: "ConnectionsPanel", outcome: ConnectOutcome) -> None:
        existing = outcome.connection
        self.reauth_button = widgets.Button(description=f"Re-authenticate {existing.name}"[:60], button_style="primary",
                                            icon="refresh", layout=widgets.Layout(width="auto"))
        self.reauth_button.on_click(lambda _: self._accept(panel, outcome))
        cancel = widgets.Button(description="Cancel", layout=widgets.Layout(width="90px"))
        cancel.on_click(lambda _: panel._leave_authorization())
        self.children = [
            widgets.HTML(f"<h3 style='margin:0 0 8px'>{html.escape(existing.name)} is already connected</h3>"
                         f"<p>This Stripe account is already a data source: {_for_connection(existing)}, "
                         f"{badge(existing.status, existing.status_message)}.</p><p>Re-authenticate it with the "
                         "access you just gave, instead of adding a second copy of the same account?</p>"),
            widgets.HBox([self.reauth_button, cancel])]

    def _accept(self, panel: "ConnectionsPanel", outcome: ConnectOutcome) -> None:
        self.reauth_button.disabled = True
        panel._in_background(lambda: panel._finish(panel.connections.reauthenticate_existing(outcome)))
