"""`ConnectionsPanel`: MBI's Connections page as ipywidgets, a small router over one view per screen.

The decisions (check a key, add or re-authenticate, spot an account already connected, test,
sync) belong to `mbi_widgets.connections.Connections`; the views draw its answers and forward
clicks: Data Sources (`ui.sources`), Add a Data Source and Stripe authorization
(`ui.authorization`), the device link (`ui.waiting`), the Data Warehouse Manager
(`ui.warehouse`) and the Preview (`ui.preview`). Network work runs on background threads;
secrets never enter a widget trait or the cell output.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable

import ipywidgets as widgets

from mbi_widgets.auth import (
    AuthError,
    Connected,
    Denied,
    DeviceFlow,
    Expired,
    Failed,
    FlowState,
    Idle,
    StripeToken,
    Waiting,
)
from mbi_widgets.connections import (
    ALREADY_CONNECTED,
    REPLACED,
    ConnectOutcome,
    Connections,
    SyncInProgress,
    SyncRun,
    UpdateCycle,
    auth_label,
)
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import Connection, Registry
from mbi_widgets.secretstore import MemoryStore
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.ui.authorization import SOURCE_TYPES, AlreadyConnectedView, AuthorizationView, GalleryView, SourceType
from mbi_widgets.ui.format import relative_time, toned
from mbi_widgets.ui.frame import Banner, CycleLine, title
from mbi_widgets.ui.preview import PreviewView
from mbi_widgets.ui.sources import COLUMNS, DataSourcesView
from mbi_widgets.ui.waiting import RetryView, WaitingView
from mbi_widgets.ui.warehouse import WarehouseView

log = logging.getLogger("mbi_widgets.ui")

__all__ = ["ConnectionsPanel", "COLUMNS", "SOURCE_TYPES", "SourceType"]


def _view_widget(view: str, name: str) -> property:
    """A widget of a view, under the name the panel always gave it (`panel.connect_button`)."""
    return property(lambda self: getattr(getattr(self, view), name), doc=f"The {name} of the current {view[1:]} view.")


class ConnectionsPanel:
    """The Connections page. Display the object to show it; every action is also a method.

        panel = ConnectionsPanel.demo()     # a sandbox Stripe, wired up
        panel                               # shows the panel
        panel.source("Northwind Analytics").table("charges")
        panel.sync("Northwind Analytics")   # into panel.warehouse; panel.show_warehouse(...) to manage it
    """

    #: Seconds between re-wordings of relative times ('just now' becoming 'a minute ago').
    CLOCK_SECONDS = 30.0
    #: Seconds between ticks of the "Next update in ..." countdown.
    TICK_SECONDS = 1.0

    def __init__(self, registry: Registry | None = None, relay_url: str | None = None, sandbox: Any = None,
                 warehouse: Any = None) -> None:
        """`warehouse` is a `Warehouse` or a path; by default the one beside the registry (`Warehouse()`'s
        file for the default registry), opened only when first needed."""
        self.sandbox = sandbox
        self.registry = registry if registry is not None else Registry()
        self.relay_url = relay_url or os.environ.get("MBI_RELAY_URL") or (sandbox.relay_url if sandbox else None)
        self.api_base = sandbox.api_url if sandbox is not None else None
        self.connections = Connections(self.registry, api_base=self.api_base, relay_url=self.relay_url,
                                       warehouse=warehouse)
        self.connections.on_run(self._run_started)
        self.flow: DeviceFlow | None = None
        self.preview: PreviewView | None = None
        self.cycle: UpdateCycle | None = None
        self.view: Any = None
        self._sources_view: DataSourcesView | None = None
        self._gallery: GalleryView | None = None
        self._authorization: AuthorizationView | None = None
        self._waiting: WaitingView | None = None
        self._reauth_id: str | None = None
        self._owned: list[Callable[[], None]] = []
        self._clock_stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_thread: threading.Thread | None = None

        self._banner = Banner()
        self.banner = self._banner.widget
        self._cycle_line = CycleLine(self.connections, on_stop=lambda: self.auto_sync(None))
        self.cycle_status, self.cycle_stop, self.cycle_bar = (self._cycle_line.status, self._cycle_line.stop_button,
                                                              self._cycle_line.widget)
        self.body = widgets.VBox()
        self.preview_box = widgets.VBox()
        self.widget = widgets.VBox([title(), self.banner, self.cycle_bar, self.body, self.preview_box],
                                   layout=widgets.Layout(padding="8px 12px", max_width="1280px"))
        self.widget.add_class("mbi-panel")
        self.show_data_sources()
        self._start_clock()

    @classmethod
    def demo(cls, **sandbox_options: Any) -> "ConnectionsPanel":
        """A panel on a fresh sandbox, with a throw-away registry and warehouse: nothing touches your real
        connections or data."""
        from mbi_widgets.sandbox import Sandbox

        sandbox = Sandbox(**sandbox_options).start()
        folder = tempfile.TemporaryDirectory(prefix="mbi-demo-")
        panel = cls(Registry(f"{folder.name}/connections.sqlite3", store=MemoryStore()), sandbox=sandbox,
                    warehouse=f"{folder.name}/warehouse.duckdb")
        panel._owned += [sandbox.stop, folder.cleanup]
        return panel

    def close(self, timeout: float = 30) -> None:
        """Stops background work (the update cycle, an authorization) and what the panel started (the demo
        sandbox), after letting a sync under way finish."""
        self._clock_stop.set()
        if self.cycle is not None:
            self.cycle.stop()
        if self.flow is not None:
            self.flow.cancel()
        if self._owned:  # the demo's sandbox and folder go next: let the work using them end first
            self.wait(timeout)
            if self.cycle is not None:
                self.cycle.join(timeout)
        for stop in reversed(self._owned):
            stop()
        self._owned.clear()

    # --- what the views expose (kept for scripts and tests) ---------------------------------------

    @property
    def warehouse(self) -> Any:
        """The `Warehouse` the panel syncs into (opened, and created, on first use)."""
        return self.connections.warehouse

    @property
    def rows(self) -> dict[str, list[widgets.Widget]]:
        return self._sources_view.rows if self._sources_view is not None else {}

    @property
    def gallery_tiles(self) -> list[widgets.VBox]:
        return self._gallery.tiles if self._gallery is not None else []

    @property
    def _ticker(self) -> threading.Thread | None:
        return self._waiting.ticker if self._waiting is not None else None

    add_button = _view_widget("_sources_view", "add_button")
    connect_button = _view_widget("_authorization", "connect_button")
    key_form = _view_widget("_authorization", "key_form")
    key_input = _view_widget("_authorization", "key_input")
    key_button = _view_widget("_authorization", "key_button")
    key_message = _view_widget("_authorization", "key_message")
    code_label = _view_widget("_waiting", "code_label")
    countdown = _view_widget("_waiting", "countdown")

    # --- display -----------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = self.plain_text()
        return bundle

    def __str__(self) -> str:
        return self.plain_text()

    def plain_text(self) -> str:
        """What front-ends without widgets show (and `print(panel)`): the connections, the link and code
        while waiting, and the update cycle."""
        lines = ["Connections (widgets are not rendered here; use the methods, e.g. panel.connect_with_stripe())"]
        updated = self._last_updated()
        connections = self.connections.list()
        for connection in connections:
            lines.append(f"- {connection.name} · Stripe · {connection.status} · {auth_label(connection)} · data "
                         f"updated {relative_time(updated.get(connection.id))}")
        if not connections:  # an export of a fresh notebook says so, like the table does
            lines.append("No data sources yet.")
        if self.flow is not None and isinstance(self.flow.state, Waiting):
            lines.append(f"Open {self.flow.state.link} and enter the code {self.flow.state.user_code}")
        if self.cycle is not None and self.cycle.active:
            lines.append(self._cycle_line.text(self.cycle) + " (panel.auto_sync(None) stops them)")
        return "\n".join(lines)

    def _set_banner(self, text: str = "", kind: str = "info", *, about: str | None = None) -> None:
        self._banner.show(text, kind, about=about)

    def _guard_banner(self) -> None:
        self._banner.check(self.connections)

    def _show(self, view: Any) -> None:
        self.view = view
        self.body.children = view.children

    def _showing_data_sources(self) -> bool:
        return isinstance(self.view, DataSourcesView)

    def _last_updated(self) -> dict[str, datetime | None]:
        try:
            return self.connections.last_updated()
        except MbiError as exc:  # a warehouse another kernel holds: the table still shows
            log.warning("could not read when the data was last updated: %s", exc)
            return {}

    # --- Data Sources ------------------------------------------------------------------------------

    def show_data_sources(self) -> None:
        self._sources_view = DataSourcesView(self)
        self._show(self._sources_view)
        self._guard_banner()

    def refresh_times(self) -> None:
        """Re-words the relative times ('just now' becomes 'a minute ago') without redrawing rows."""
        if self._sources_view is not None:
            self._sources_view.refresh_times(self.connections.list(), self._last_updated())
        if isinstance(self.view, WarehouseView):
            self.view.show_title()

    def _start_clock(self) -> None:
        def tick() -> None:
            while not self._clock_stop.wait(self.CLOCK_SECONDS):
                try:
                    self.refresh_times()
                except MbiError:  # the registry went away (a closed demo): stop quietly
                    return

        threading.Thread(target=tick, name="mbi-panel-clock", daemon=True).start()

    # --- adding a data source ----------------------------------------------------------------------

    def show_gallery(self) -> None:
        self._set_banner()
        self._gallery = GalleryView(self)
        self._show(self._gallery)

    def show_authorization(self, source_type: str = "Stripe", *, reauth_id: str | None = None) -> None:
        self._reauth_id = reauth_id
        reauth = self.registry.get(reauth_id) if reauth_id is not None else None
        self._authorization = AuthorizationView(self, reauth)
        self._show(self._authorization)

    def _leave_authorization(self) -> None:
        """The user gave up (Back, Cancel): a later connect adds a connection, it re-authenticates none."""
        self._reauth_id = None
        self.show_data_sources()

    def connect_with_stripe(self) -> FlowState:
        """Starts a device-style authorization; shows (and prints, for non-widget front-ends) link and code."""
        state = self._start_flow()
        if isinstance(state, Waiting):
            print(f"To connect Stripe, open {state.link} and confirm the code {state.user_code}")
        return state

    def _connect_clicked(self) -> None:
        """Connect with Stripe, clicked: the view shows link and code; nothing is printed (a click's output would
        land in JupyterLab's log console), and an error goes to the banner."""
        self._safely(self._start_flow)

    def _start_flow(self) -> FlowState:
        if self.relay_url is None:
            raise MbiError("no relay is configured: set MBI_RELAY_URL or pass relay_url=, or use a restricted key",
                           code="no_relay")
        if self.flow is not None:
            self.flow.cancel()
        self.flow = DeviceFlow(self.relay_url)
        self.flow.observe(self._flow_changed)
        return self.flow.start()

    def _flow_changed(self, state: FlowState) -> None:
        match state:
            case Waiting():
                self._show_waiting(state)
            case Connected(token=token):
                self._in_background(lambda: self._connected(token))
            case Denied(message=message) | Expired(message=message) | Failed(message=message):
                self._set_banner(message, "error")
                self._show(RetryView(self))
            case Idle():
                self.show_data_sources()

    def _show_waiting(self, waiting: Waiting) -> None:
        flow = self.flow
        reauth = self.registry.get(self._reauth_id).name if self._reauth_id else None
        heading = f"Allow access in your browser to re-authenticate {reauth}" if reauth else \
            "Allow access in your browser"
        self._waiting = WaitingView(self, waiting, heading=heading,
                                    still_waiting=lambda: self.flow is flow and flow.state == waiting)
        self._show(self._waiting)

    def _cancel_flow(self) -> None:
        if self.flow is not None:
            self.flow.cancel()
        self._leave_authorization()

    def _connected(self, token: StripeToken) -> None:
        try:
            outcome = self.connections.connect_with_token(token, reauth_id=self._reauth_id)
        except AuthError as exc:  # Stripe unreachable, or the wrong account for a re-authentication
            self._set_banner(str(exc), "error")
            self._show(RetryView(self))
            return
        self._finish(outcome)

    def connect_with_key(self, key: str) -> Connection:
        """Checks a restricted (or secret) key with Stripe, then saves the connection (or, for an account
        already connected, offers to re-authenticate it with the key)."""
        outcome = self.connections.connect_with_key(key, reauth_id=self._reauth_id)
        if outcome.warning and self._authorization is not None:
            self._authorization.key_message.value = toned(outcome.warning, "warning")
        self._finish(outcome)
        return self.registry.get(outcome.connection.id)

    def _finish(self, outcome: ConnectOutcome) -> None:
        """Shows what a connect did: the offer to re-authenticate, or the table and the new preview."""
        self._reauth_id = None
        connection = outcome.connection
        if outcome.kind == ALREADY_CONNECTED:
            self._set_banner(f"{connection.name} is already connected.", "info")
            self._show(AlreadyConnectedView(self, outcome))
            return
        done = "Connection successful!" + (f" {connection.name} was re-authenticated." if outcome.kind == REPLACED
                                           else "")
        if outcome.ok:
            # The key form is about to be replaced by Data Sources: a warning goes where the user looks.
            self._set_banner(f"{done} {outcome.warning}" if outcome.warning else done,
                             "warning" if outcome.warning else "success", about=connection.id)
        else:
            self._set_banner(f"{connection.name}: {connection.status}. {connection.status_message}", "error")
        self.show_data_sources()
        if outcome.ok:
            self.open_preview(connection.id)

    # --- row actions -------------------------------------------------------------------------------

    def reauthenticate(self, name_or_id: str) -> None:
        """Shows the authorization view for a new credential of this connection."""
        self._set_banner()
        self.show_authorization(reauth_id=self.connections.find(name_or_id).id)

    def delete(self, name_or_id: str) -> None:
        """Deletes a connection (disconnecting it at Stripe first when it was authorized with OAuth)."""
        connection = self.connections.delete(name_or_id)
        if self.preview is not None and self.preview.name == connection.name:
            self.preview_box.children, self.preview = [], None
        self._set_banner(f"{connection.name} was deleted.", "info")
        self.show_data_sources()

    def _preview_clicked(self, connection_id: str) -> None:
        """Opens the preview and re-tests the connection meanwhile, so its row shows this connection."""
        self.open_preview(connection_id)

        def retest() -> None:
            self.connections.test(connection_id)
            if self._showing_data_sources():
                self.show_data_sources()
            self._guard_banner()

        self._in_background(retest)

    def open_preview(self, name_or_id: str) -> PreviewView:
        connection = self.connections.find(name_or_id)
        self.preview = PreviewView(self.source(connection.id), name=connection.name, code_name=connection.name,
                                   on_error=self._preview_error,
                                   stored=lambda table: self.connections.stored_table(connection.id, table),
                                   explain=lambda error: self.connections.explain(connection.id, error))
        self.preview_box.children = [self.preview.widget]
        return self.preview

    def _preview_error(self, error: Exception) -> None:
        if getattr(error, "code", None) == "authentication_failed":
            for connection in self.connections.list():
                self.connections.test(connection.id)
            if self._showing_data_sources():  # never pull the admin off the view they are using
                self.show_data_sources()
            self._guard_banner()

    # --- the warehouse -----------------------------------------------------------------------------

    def show_warehouse(self, name_or_id: str) -> WarehouseView:
        """The Data Warehouse Manager of a connection: tables, columns, Sync now, the last sync's summary."""
        connection = self.connections.find(name_or_id)
        self._set_banner()
        view = WarehouseView(self, connection.id)
        self._show(view)
        current = self.connections.current
        if current is not None and current.running and current.connection_id == connection.id:
            view.follow(current)
        return view

    def sync(self, name_or_id: str, tables: list[str] | None = None, *, full: bool = False) -> Any:
        """Syncs a connection's tables (the selected ones, or `tables`) into `panel.warehouse`, waiting for a
        sync already running; returns the SyncReport. The views follow it as a click's sync."""
        return self._sync(name_or_id, tables, full=full, wait=True)

    def _sync(self, name_or_id: str, tables: list[str] | None = None, *, full: bool = False, wait: bool) -> Any:
        return self.connections.sync(name_or_id, tables, full=full, wait=wait)

    def _run_started(self, run: SyncRun) -> None:
        view = self.view
        if isinstance(view, WarehouseView) and view.connection_id == run.connection_id:
            view.follow(run)
        run.observe(self._run_changed)
        self._show_cycle()

    def _run_changed(self, run: SyncRun) -> None:
        if run.running:
            return
        if run.error is not None:
            self._set_banner(f"{run.name}: {run.error}", "error")
        if self._showing_data_sources():
            self.show_data_sources()
        else:
            self._guard_banner()
        self._show_cycle()

    def auto_sync(self, every: float | timedelta | None) -> UpdateCycle | None:
        """Syncs every connection every `every` (a timedelta or seconds) while the kernel lives; off by default.

        Shown as "Next update in ..." with a Stop button; `auto_sync(None)` (or the returned cycle's
        `.stop()`, or `close()`) stops it. A round due while a sync runs is skipped, not queued.
        """
        if self.cycle is not None:
            self.cycle.stop()
        self.cycle = UpdateCycle(self.connections, every).start() if every is not None else None
        if self.cycle is not None:
            self._start_cycle_ticker(self.cycle)
        self._show_cycle()
        if isinstance(self.view, WarehouseView):
            self.view.show_cycle(self.cycle)
        return self.cycle

    def _show_cycle(self) -> None:
        self._cycle_line.show(self.cycle)

    def _start_cycle_ticker(self, cycle: UpdateCycle) -> None:
        def stopped() -> None:  # through its handle: say so everywhere
            self.cycle = None
            self._show_cycle()
            if isinstance(self.view, WarehouseView):
                self.view.show_cycle(None)

        self._cycle_line.tick(cycle, every=self.TICK_SECONDS, closed=self._clock_stop, current=lambda: self.cycle,
                              stopped=stopped)

    # --- Python access -------------------------------------------------------------------------------

    def source(self, name_or_id: str) -> StripeSource:
        """The StripeSource behind a connection, by name or id: every DataFrame shown comes from it."""
        return self.connections.source(name_or_id)

    def wait(self, timeout: float = 60) -> "ConnectionsPanel":
        """Waits for the authorization under way and the work it triggers (scripts, notebooks, tests)."""
        deadline = time.monotonic() + timeout
        if self.flow is not None:
            self.flow.wait(timeout)
        while time.monotonic() < deadline:
            alive = [thread for thread in self._threads if thread.is_alive()]
            if not alive:
                break
            alive[0].join(0.1)
        if self.preview is not None:
            self.preview.wait(max(0.0, deadline - time.monotonic()))
        return self

    def _safely(self, action: Callable[[], Any]) -> None:
        """Runs a click's action; its error goes to the banner (a click handler's exception is seen by no one)."""
        try:
            action()
        except MbiError as exc:
            self._set_banner(str(exc), "error")

    def _in_background(self, work: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                work()
            except SyncInProgress as exc:
                self._set_banner(str(exc), "info")
            except MbiError as exc:
                self._set_banner(str(exc), "error")
            except Exception as exc:  # noqa: BLE001 - shown to the user, and logged with its traceback
                log.exception("unexpected error in the Connections panel")
                self._set_banner(f"Unexpected error: {exc}", "error")

        thread = threading.Thread(target=target, name="mbi-panel", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        self._last_thread = thread
        thread.start()
        return thread
