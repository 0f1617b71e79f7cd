"""The panel's frame around its views: the styles and title, the banner, and the update-cycle line."""
from __future__ import annotations

import html
import threading
from typing import Callable

import ipywidgets as widgets

from mbi_widgets.connections import AUTOMATIC, Connections, SyncRun, UpdateCycle
from mbi_widgets.registry import SUCCESS
from mbi_widgets.ui.format import period, time_left

STYLE = """<style>
.mbi-panel { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, sans-serif; }
.mbi-panel .mbi-head { font-weight: 600; color: #4b5563; border-bottom: 1px solid #d1d5db; padding: 4px 0; }
.mbi-panel .mbi-cell { padding: 6px 0; border-bottom: 1px solid #eef0f3; }
.mbi-panel .mbi-code { font: 600 40px/1.2 ui-monospace, Menlo, Consolas, monospace; letter-spacing: 6px; }
.mbi-panel table.mbi-frame { font-size: 12px; border-collapse: collapse; }
.mbi-panel table.mbi-frame td, .mbi-panel table.mbi-frame th { padding: 2px 8px; border-bottom: 1px solid #eef0f3; }
.mbi-panel table.mbi-dtypes td, .mbi-panel table.mbi-dtypes th { padding: 1px 10px 1px 0; font-size: 12px; }
</style>"""
_COLOURS = {"success": ("#e6f4ea", "#1e7e34"), "error": ("#fdecea", "#b42318"), "info": ("#eef4ff", "#1d4ed8"),
            "warning": ("#fff4e5", "#a15c00")}


def title() -> widgets.HTML:
    return widgets.HTML(STYLE + "<h2 style='margin:4px 0 8px'>Connections</h2>")


class Banner:
    """One message above the views (`widget`). A success remembers the connection it speaks of, so that it
    does not stay above that connection's row once the row stops working."""

    def __init__(self) -> None:
        self.widget = widgets.HTML()
        self.about: str | None = None

    def show(self, text: str = "", kind: str = "info", *, about: str | None = None) -> None:
        background, colour = _COLOURS[kind]
        self.widget.value = (f'<div role="status" style="background:{background};color:{colour};padding:10px 14px;'
                             f'border-radius:4px;font-weight:600">{html.escape(text)}</div>') if text else ""
        self.about = about if text else None

    def check(self, connections: Connections) -> None:
        """Replaces a success about a connection that has since stopped working (or is gone)."""
        if self.about is None:
            return
        current = next((c for c in connections.list() if c.id == self.about), None)
        if current is None:
            self.show()
        elif current.status != SUCCESS:
            self.show(f"{current.name}: {current.status}. {current.status_message}", "error")


class CycleLine:
    """"Automatic updates every hour · Next update in 42 min" and a Stop button, while a cycle runs."""

    def __init__(self, connections: Connections, on_stop: Callable[[], None]) -> None:
        self.connections = connections
        self.status = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop automatic updates", icon="stop",
                                          layout=widgets.Layout(width="210px"))
        self.stop_button.on_click(lambda _: on_stop())
        self.widget = widgets.HBox([self.status, self.stop_button],
                                   layout=widgets.Layout(align_items="center", display="none"))

    def text(self, cycle: UpdateCycle | None) -> str:
        if cycle is None or not cycle.active:
            return ""
        current: SyncRun | None = self.connections.current
        if current is not None and current.running and current.trigger == AUTOMATIC:
            return f"Automatic updates {period(cycle.every)} · updating {current.name}…"
        return f"Automatic updates {period(cycle.every)} · Next update in {time_left(cycle.seconds_left())}"

    def show(self, cycle: UpdateCycle | None) -> None:
        text = self.text(cycle)
        self.status.value = f"<span style='color:#1d4ed8'>{html.escape(text)}</span>" if text else ""
        self.widget.layout.display = "" if text else "none"

    def tick(self, cycle: UpdateCycle, *, every: float, closed: threading.Event,
             current: Callable[[], UpdateCycle | None], stopped: Callable[[], None]) -> None:
        """Re-words the countdown every `every` seconds while `cycle` runs (on a daemon thread); `stopped` is
        called when it ended some other way than the panel (its handle's `stop()`)."""
        def loop() -> None:
            while cycle.active and not closed.wait(every):
                if current() is cycle:
                    self.show(cycle)
            if current() is cycle:
                stopped()

        threading.Thread(target=loop, name="mbi-update-countdown", daemon=True).start()
