"""`ConnectionsPanel`: MBI's Connections page as ipywidgets, over the registry, the relay and the tables.

Views: Data Sources (the table of connections), Add a Data Source (a gallery of source types),
Stripe authorization (Connect with Stripe, or a restricted key), the device-link waiting view,
and a Preview of the connection's tables. All network work runs on background threads; secrets
never enter a widget trait or the cell output.
"""
from __future__ import annotations

import base64
import html
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

import ipywidgets as widgets

from mbi_widgets.auth import (
    AuthError,
    Connected,
    DeviceFlow,
    Denied,
    Expired,
    Failed,
    FlowState,
    Idle,
    RelayClient,
    StripeToken,
    Waiting,
    account_of,
    validate_key,
)
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import NEEDS_REAUTH, SUCCESS, Connection, Registry
from mbi_widgets.secretstore import MemoryStore
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.ui.format import badge, countdown, duration, relative_time
from mbi_widgets.ui.preview import PreviewView

log = logging.getLogger("mbi_widgets.ui")

COLUMNS = ("Name", "Connection", "Status", "Last Connection Started", "Last Connection Duration", "Action")
_GRID = "minmax(150px, 2fr) 90px 180px 140px 150px minmax(300px, auto)"
_STYLE = """<style>
.mbi-panel { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, sans-serif; }
.mbi-panel .mbi-head { font-weight: 600; color: #4b5563; border-bottom: 1px solid #d1d5db; padding: 4px 0; }
.mbi-panel .mbi-cell { padding: 6px 0; border-bottom: 1px solid #eef0f3; }
.mbi-panel .mbi-code { font: 600 40px/1.2 ui-monospace, Menlo, Consolas, monospace; letter-spacing: 6px; }
.mbi-panel table.mbi-frame { font-size: 12px; border-collapse: collapse; }
.mbi-panel table.mbi-frame td, .mbi-panel table.mbi-frame th { padding: 2px 8px; border-bottom: 1px solid #eef0f3; }
.mbi-panel table.mbi-dtypes td, .mbi-panel table.mbi-dtypes th { padding: 1px 10px 1px 0; font-size: 12px; }
</style>"""


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


def _banner(text: str, kind: str) -> str:
    colours = {"success": ("#e6f4ea", "#1e7e34"), "error": ("#fdecea", "#b42318"), "info": ("#eef4ff", "#1d4ed8"),
               "warning": ("#fff4e5", "#a15c00")}
    background, colour = colours[kind]
    return (f'<div role="status" style="background:{background};color:{colour};padding:10px 14px;border-radius:4px;'
            f'font-weight:600">{html.escape(text)}</div>')


class ConnectionsPanel:
    """The Connections page. Display the object to show it; every action is also a method.

        panel = ConnectionsPanel.demo()     # a sandbox Stripe, wired up
        panel                               # shows the panel
        panel.source("Northwind Analytics").table("charges")
    """

    def __init__(self, registry: Registry | None = None, relay_url: str | None = None, sandbox: Any = None) -> None:
        self.sandbox = sandbox
        self.registry = registry if registry is not None else Registry()
        self.relay_url = relay_url or os.environ.get("MBI_RELAY_URL") or (sandbox.relay_url if sandbox else None)
        self.api_base = sandbox.api_url if sandbox is not None else None
        self.flow: DeviceFlow | None = None
        self.preview: PreviewView | None = None
        self._reauth_id: str | None = None
        self._sources: dict[str, StripeSource] = {}
        self._owned: list[Callable[[], None]] = []
        self._clock_stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._last_thread: threading.Thread | None = None

        self.banner = widgets.HTML()
        self.body = widgets.VBox()
        self.preview_box = widgets.VBox()
        title = widgets.HTML(_STYLE + "<h2 style='margin:4px 0 8px'>Connections</h2>")
        self.widget = widgets.VBox([title, self.banner, self.body, self.preview_box],
                                   layout=widgets.Layout(padding="8px 12px", max_width="1280px"))
        self.widget.add_class("mbi-panel")
        self.show_data_sources()
        self._start_clock()

    @classmethod
    def demo(cls, **sandbox_options: Any) -> "ConnectionsPanel":
        """A panel on a fresh sandbox, with a throw-away registry: nothing touches your real connections."""
        from mbi_widgets.sandbox import Sandbox

        sandbox = Sandbox(**sandbox_options).start()
        folder = tempfile.TemporaryDirectory(prefix="mbi-demo-")
        panel = cls(Registry(f"{folder.name}/connections.sqlite3", store=MemoryStore()), sandbox=sandbox)
        panel._owned += [sandbox.stop, folder.cleanup]
        return panel

    def close(self) -> None:
        """Stops background work and anything the panel started (the demo sandbox)."""
        self._clock_stop.set()
        if self.flow is not None:
            self.flow.cancel()
        for stop in reversed(self._owned):
            stop()
        self._owned.clear()

    # --- display -----------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = self.plain_text()
        return bundle

    def plain_text(self) -> str:
        """What front-ends without widgets show: the sources, and the link and code while waiting."""
        lines = ["Connections (widgets are not rendered here; use the methods, e.g. panel.connect_with_stripe())"]
        for connection in self.registry.list():
            lines.append(f"- {connection.name} · Stripe · {connection.status}")
        if self.flow is not None and isinstance(self.flow.state, Waiting):
            lines.append(f"Open {self.flow.state.link} and enter the code {self.flow.state.user_code}")
        return "\n".join(lines)

    def _set_banner(self, text: str = "", kind: str = "info") -> None:
        self.banner.value = _banner(text, kind) if text else ""

    # --- Data Sources --------------------------------------------------------------------------

    def show_data_sources(self) -> None:
        add = widgets.Button(description="Add a Data Source", button_style="primary", icon="plus",
                             layout=widgets.Layout(width="170px"))
        add.on_click(lambda _: self.show_gallery())
        self.add_button = add
        header = widgets.HBox([widgets.HTML("<h3 style='margin:0'>Data Sources</h3>"), add],
                              layout=widgets.Layout(justify_content="space-between", align_items="center"))
        self.body.children = [header, self._sources_table()]

    def _sources_table(self) -> widgets.Widget:
        connections = self.registry.list()
        self.rows: dict[str, list[widgets.Widget]] = {}  # the rows shown now (none is stale after a delete)
        if not connections:
            return widgets.HTML("<p style='color:#4b5563'>No data sources yet. Click <b>Add a Data Source</b> to "
                                "connect Stripe.</p>")
        cells: list[widgets.Widget] = [widgets.HTML(f"<div class='mbi-head'>{c}</div>") for c in COLUMNS]
        for connection in connections:
            row = self._row(connection)
            self.rows[connection.id] = row
            cells += row
        return widgets.GridBox(cells, layout=widgets.Layout(grid_template_columns=_GRID, grid_gap="0 12px",
                                                            align_items="center"))

    def _row(self, connection: Connection) -> list[widgets.Widget]:
        def cell(content: str) -> widgets.HTML:
            return widgets.HTML(f"<div class='mbi-cell'>{content}</div>")

        name = html.escape(connection.name)
        account = html.escape(connection.account_id)
        actions = widgets.HBox(self._actions(connection))
        return [cell(f"<b>{name}</b><br><small style='color:#6b7280'>{account}</small>"),
                cell(html.escape(connection.connection_type)),
                cell(badge(connection.status, connection.status_message)),
                cell(relative_time(connection.last_started)),
                cell(duration(connection.last_duration)),
                actions]

    def refresh_times(self) -> None:
        """Re-words 'Last Connection Started' ('just now' becomes 'a minute ago') without redrawing rows."""
        for connection in self.registry.list():
            row = getattr(self, "rows", {}).get(connection.id)
            if row is not None:
                row[3].value = f"<div class='mbi-cell'>{relative_time(connection.last_started)}</div>"

    def _start_clock(self) -> None:
        def tick() -> None:
            while not self._clock_stop.wait(30):
                try:
                    self.refresh_times()
                except MbiError:  # the registry went away (a closed demo): stop quietly
                    return

        threading.Thread(target=tick, name="mbi-panel-clock", daemon=True).start()

    def _actions(self, connection: Connection) -> list[widgets.Widget]:
        preview = widgets.Button(description="Preview", icon="table", layout=widgets.Layout(width="96px"))
        reauth = widgets.Button(description="Re-authenticate", layout=widgets.Layout(width="126px"),
                                button_style="warning" if connection.status == NEEDS_REAUTH else "")
        delete = widgets.Button(description="Delete", button_style="danger", layout=widgets.Layout(width="66px"))
        preview.on_click(lambda _: self._preview_clicked(connection.id))
        reauth.on_click(lambda _: self.reauthenticate(connection.id))
        delete.on_click(lambda _: self._confirm_delete(connection))
        return [preview, reauth, delete]

    def _confirm_delete(self, connection: Connection) -> None:
        sure = widgets.Button(description="Yes, delete", button_style="danger", layout=widgets.Layout(width="100px"))
        keep = widgets.Button(description="Cancel", layout=widgets.Layout(width="70px"))
        question = widgets.HTML(f"Delete <b>{html.escape(connection.name)}</b>?")
        box = self.rows[connection.id][-1]
        box.children = [question, sure, keep]
        sure.on_click(lambda _: self._in_background(lambda: self.delete(connection.id)))
        keep.on_click(lambda _: self.show_data_sources())

    # --- gallery and Stripe authorization ------------------------------------------------------

    def show_gallery(self) -> None:
        self._set_banner()
        tiles = []
        for source_type in SOURCE_TYPES:
            tile = widgets.Button(description=source_type.name, tooltip=source_type.description,
                                  layout=widgets.Layout(width="120px", height="36px"))
            tile.on_click(lambda _, kind=source_type: self.show_authorization(kind.name))
            logo = widgets.HTML(f"<img src='{source_type.logo_data_uri()}' width='72' height='72' "
                                f"alt='{html.escape(source_type.name)} logo'>")
            tiles.append(widgets.VBox([logo, tile], layout=widgets.Layout(align_items="center", padding="8px",
                                                                           border="1px solid #e5e7eb")))
        self.gallery_tiles = tiles
        back = widgets.Button(description="Back to Data Sources", icon="arrow-left")
        back.on_click(lambda _: self.show_data_sources())
        self.body.children = [widgets.HTML("<h3 style='margin:0 0 8px'>Add a Data Source</h3>"),
                              widgets.HBox(tiles), back]

    def show_authorization(self, source_type: str = "Stripe", *, reauth_id: str | None = None) -> None:
        self._reauth_id = reauth_id
        self.connect_button = widgets.Button(description="Connect with Stripe", button_style="primary",
                                             disabled=self.relay_url is None)
        self.connect_button.on_click(lambda _: self.connect_with_stripe())
        no_relay = ("" if self.relay_url else "<p style='color:#b42318'>No relay is configured (set MBI_RELAY_URL), so "
                    "Connect with Stripe is unavailable: use a restricted API key below.</p>")
        self.key_input = widgets.Password(placeholder="rk_live_…", layout=widgets.Layout(width="360px"))
        self.key_button = widgets.Button(description="Save key")
        self.key_button.on_click(lambda _: self._save_key_clicked())
        self.key_message = widgets.HTML()
        key_form = widgets.VBox([
            widgets.HTML("<p>Create a <b>restricted key</b> with Read access in Stripe (Developers › API keys › "
                         "Create restricted key) and paste it here. It is checked with Stripe, then kept in your "
                         "OS keyring, never in the notebook.</p>"),
            widgets.HBox([self.key_input, self.key_button]), self.key_message])
        self.key_form = widgets.Accordion(children=[key_form], titles=("Use a restricted API key instead",))
        self.key_form.selected_index = None
        back = widgets.Button(description="Back", icon="arrow-left")
        back.on_click(lambda _: self._leave_authorization())
        verb = "Re-authenticate" if reauth_id else "Stripe authorization"
        self.body.children = [
            widgets.HTML(f"<h3 style='margin:0 0 8px'>{verb}</h3><p>mbi-widgets will get <b>read-only access</b> "
                         "to your Stripe account's data: customers, charges, coupons, invoices, plans, subscriptions "
                         "and events. It cannot move money or change anything.</p>" + no_relay),
            self.connect_button, self.key_form, back]

    def _leave_authorization(self) -> None:
        """The user gave up (Back, Cancel): a later connect adds a connection, it re-authenticates none."""
        self._reauth_id = None
        self.show_data_sources()

    # --- device-style link ----------------------------------------------------------------------

    def connect_with_stripe(self) -> FlowState:
        """Starts a device-style authorization; shows (and prints, for non-widget front-ends) link and code."""
        if self.relay_url is None:
            raise MbiError("no relay is configured: set MBI_RELAY_URL or pass relay_url=, or use a restricted key",
                           code="no_relay")
        if self.flow is not None:
            self.flow.cancel()
        self.flow = DeviceFlow(self.relay_url)
        self.flow.observe(self._flow_changed)
        state = self.flow.start()
        if isinstance(state, Waiting):
            print(f"To connect Stripe, open {state.link} and confirm the code {state.user_code}")
        return state

    def _flow_changed(self, state: FlowState) -> None:
        match state:
            case Waiting():
                self._show_waiting(state)
            case Connected(token=token):
                self._in_background(lambda: self._connected(token))
            case Denied(message=message) | Expired(message=message) | Failed(message=message):
                self._show_retry(message)
            case Idle():
                self.show_data_sources()

    def _show_waiting(self, waiting: Waiting) -> None:
        link = html.escape(waiting.link)
        self.code_label = widgets.HTML(f"<div class='mbi-code'>{html.escape(waiting.user_code)}</div>")
        self.countdown = widgets.HTML()
        cancel = widgets.Button(description="Cancel", icon="times")
        cancel.on_click(lambda _: (self.flow.cancel() if self.flow else None, self._leave_authorization()))
        self.body.children = [
            widgets.HTML("<h3 style='margin:0 0 8px'>Allow access in your browser</h3>"
                         f"<p>1. Open <a href='{link}' target='_blank' rel='noopener' "
                         f"style='color:#1d4ed8;text-decoration:underline;font-weight:600'>{link}</a> "
                         "(it opens in a new tab).</p><p>2. Check that it shows this code, then sign in with "
                         "Stripe:</p>"),
            self.code_label, self.countdown,
            widgets.HTML("<p style='color:#4b5563'>This panel notices the approval by itself; the notebook stays "
                         "usable meanwhile.</p>"), cancel]
        self._start_ticker(waiting)

    def _start_ticker(self, waiting: Waiting) -> None:
        def tick() -> None:
            while self.flow is not None and self.flow.state == waiting:
                self.countdown.value = f"Code expires in {countdown(waiting.deadline - time.monotonic())}"
                time.sleep(1)

        self._ticker = threading.Thread(target=tick, name="mbi-countdown", daemon=True)
        self._ticker.start()

    def _show_retry(self, message: str) -> None:
        self._set_banner(message, "error")
        retry = widgets.Button(description="Try again", button_style="primary", icon="redo")
        retry.on_click(lambda _: self.show_authorization(reauth_id=self._reauth_id))
        back = widgets.Button(description="Back to Data Sources")
        back.on_click(lambda _: (self._set_banner(), self._leave_authorization()))
        self.body.children = [widgets.HBox([retry, back])]

    def _connected(self, token: StripeToken) -> None:
        account_id, name = account_of(token.access_token, api_base=self.api_base)
        if self._reauth_id is not None:
            connection = self.registry.replace_secret(self._reauth_id, token.access_token, auth_method="oauth",
                                                      refresh_token=token.refresh_token)
        else:
            connection = self.registry.add(name=self._unique_name(name), account_id=token.stripe_user_id or account_id,
                                           account_name=name, livemode=token.livemode, scope=token.scope,
                                           auth_method="oauth", secret=token.access_token,
                                           refresh_token=token.refresh_token, api_base=self._api_base(),
                                           relay_url=self.relay_url)
        self._finish_connection(connection)

    def _finish_connection(self, connection: Connection, warning: str | None = None) -> None:
        self._reauth_id = None
        tested = self.registry.test(connection.id)
        self._sources.pop(connection.id, None)
        if tested.status == SUCCESS and warning:
            # The key form is about to be replaced by Data Sources: the warning goes where the user looks.
            self._set_banner(f"Connection successful! {warning}", "warning")
        elif tested.status == SUCCESS:
            self._set_banner("Connection successful!", "success")
        else:
            self._set_banner(f"{tested.name}: {tested.status}. {tested.status_message}", "error")
        self.show_data_sources()
        if tested.status == SUCCESS:
            self.open_preview(tested.id)

    def _unique_name(self, name: str) -> str:
        """The account's name, numbered when another connection already uses it (names select sources)."""
        taken = {connection.name for connection in self.registry.list()}
        candidate, number = name, 2
        while candidate in taken:
            candidate, number = f"{name} ({number})", number + 1
        return candidate

    def _api_base(self) -> str:
        return self.api_base or "https://api.stripe.com"

    # --- restricted key ----------------------------------------------------------------------------

    def _save_key_clicked(self) -> None:
        key = self.key_input.value
        self.key_input.value = ""  # never leave a secret in widget state
        self.key_button.disabled = True
        self.key_message.value = "<i>Checking the key with Stripe…</i>"

        def work() -> None:
            try:
                self.connect_with_key(key)
            except AuthError as exc:
                self.key_message.value = f"<span style='color:#b42318'>{html.escape(str(exc))}</span>"
            finally:
                self.key_button.disabled = False

        self._in_background(work)

    def connect_with_key(self, key: str) -> Connection:
        """Validates a restricted (or secret) key with Stripe, then saves the connection."""
        check = validate_key(key, api_base=self.api_base)
        if self._reauth_id is not None:
            connection = self.registry.replace_secret(self._reauth_id, key.strip(), auth_method=check.auth_method)
        else:
            connection = self.registry.add(name=self._unique_name(check.account_name), account_id=check.account_id,
                                           account_name=check.account_name, livemode=check.livemode,
                                           scope="read_only" if check.auth_method == "restricted_key" else "full",
                                           auth_method=check.auth_method, secret=key.strip(),
                                           api_base=self._api_base())
        if check.warning:
            self.key_message.value = f"<span style='color:#a15c00'>{html.escape(check.warning)}</span>"
        self._finish_connection(connection, warning=check.warning)
        return self.registry.get(connection.id)

    # --- row actions --------------------------------------------------------------------------------

    def reauthenticate(self, connection_id: str) -> None:
        self._set_banner()
        self.show_authorization(reauth_id=connection_id)

    def delete(self, connection_id: str) -> None:
        """Deletes a connection (disconnecting it at Stripe first when it was authorized with OAuth)."""
        def deauthorize(connection: Connection, token: str) -> None:
            if connection.relay_url:
                RelayClient(connection.relay_url).deauthorize(access_token=token, stripe_user_id=connection.account_id)

        name = self.registry.get(connection_id).name
        self.registry.delete(connection_id, deauthorize=deauthorize)
        self._sources.pop(connection_id, None)
        if self.preview is not None and self.preview.name == name:
            self.preview_box.children, self.preview = [], None
        self._set_banner(f"{name} was deleted.", "info")
        self.show_data_sources()

    def _preview_clicked(self, connection_id: str) -> None:
        """Opens the preview and re-tests the connection meanwhile, so its row shows this connection."""
        self.open_preview(connection_id)

        def retest() -> None:
            self.registry.test(connection_id)
            if self._showing_data_sources():
                self.show_data_sources()

        self._in_background(retest)

    def open_preview(self, connection_id: str) -> PreviewView:
        connection = self.registry.get(connection_id)
        self.preview = PreviewView(self.source(connection_id), name=connection.name, code_name=connection.name,
                                   on_error=self._preview_error)
        self.preview_box.children = [self.preview.widget]
        return self.preview

    def _preview_error(self, error: Exception) -> None:
        if getattr(error, "code", None) == "authentication_failed":
            for connection in self.registry.list():
                self.registry.test(connection.id)
            if self._showing_data_sources():  # never pull the admin off the view they are using
                self.show_data_sources()

    def _showing_data_sources(self) -> bool:
        header = self.body.children[0] if self.body.children else None
        return header is not None and self.add_button in getattr(header, "children", ())

    # --- Python access -------------------------------------------------------------------------------

    def source(self, name_or_id: str) -> StripeSource:
        """The StripeSource behind a connection, by name or id: every DataFrame shown comes from it."""
        connection = self._find(name_or_id)
        if connection.id not in self._sources:
            self._sources[connection.id] = self.registry.source(connection.id)
        return self._sources[connection.id]

    def _find(self, name_or_id: str) -> Connection:
        for connection in self.registry.list():
            if name_or_id in (connection.id, connection.name):
                return connection
        names = ", ".join(repr(c.name) for c in self.registry.list()) or "none yet"
        raise MbiError(f"no connection named {name_or_id!r}; connections: {names}", code="unknown_connection")

    def wait(self, timeout: float = 60) -> "ConnectionsPanel":
        """Waits for the authorization under way and the work it triggers (scripts, notebooks, tests)."""
        deadline = time.monotonic() + timeout
        if self.flow is not None:
            self.flow.wait(timeout)
        while self._last_thread is not None and self._last_thread.is_alive() and time.monotonic() < deadline:
            self._last_thread.join(0.1)
        if self.preview is not None:
            self.preview.wait(max(0.0, deadline - time.monotonic()))
        return self

    def _in_background(self, work: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                work()
            except MbiError as exc:
                self._set_banner(str(exc), "error")
            except Exception as exc:  # noqa: BLE001 - shown to the user, and logged with its traceback
                log.exception("unexpected error in the Connections panel")
                self._set_banner(f"Unexpected error: {exc}", "error")

        thread = threading.Thread(target=target, name="mbi-panel", daemon=True)
        thread.start()
        self._last_thread = thread
        return thread
