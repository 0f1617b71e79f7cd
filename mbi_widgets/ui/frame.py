"""The panel's frame around its views: the styles and title, the banner, and the update-cycle line."""
from __future__ import annotations

import html
import threading
from typing import Any, Callable

import ipywidgets as widgets

from mbi_widgets.connections import AUTOMATIC, Connections, SyncRun, UpdateCycle
from mbi_widgets.registry import SUCCESS
from mbi_widgets.ui.format import period, time_left, toned

#: Colours come from the front-end's theme (JupyterLab's --jp-* variables, else VS Code's --vscode-*, else a
#: light palette), so that the dark theme stays readable; status colours tint backgrounds and borders and are
#: mixed towards the theme's strongest text colour for text. The layout adapts to the panel's own width
#: (a container query), not the window's: the output area is ~470 px with JupyterLab's file browser open.
STYLE = """<style>
.mbi-panel { container: mbi-panel / inline-size; box-sizing: border-box;
  --mbi-fg: var(--jp-ui-font-color1, var(--vscode-editor-foreground, #1f2937));
  --mbi-strong: var(--jp-ui-font-color0, var(--vscode-editor-foreground, #111827));
  --mbi-bg: var(--jp-layout-color1, var(--vscode-editor-background, #ffffff));
  --mbi-bg-alt: var(--jp-layout-color2, var(--vscode-editorWidget-background, #f3f4f6));
  --mbi-border: var(--jp-border-color1, var(--vscode-panel-border, #c4c9d0));
  --mbi-rule: var(--jp-border-color2, var(--vscode-panel-border, #e5e7eb));
  --mbi-link: var(--jp-content-link-color, var(--vscode-textLink-foreground, #1d4ed8));
  --mbi-muted: var(--jp-ui-font-color2, var(--vscode-descriptionForeground, #4b5563));
  --mbi-error: var(--jp-error-color1, #b42318); --mbi-success: var(--jp-success-color1, #1e7e34);
  --mbi-warning: var(--jp-warn-color1, #a15c00); --mbi-info: var(--jp-brand-color1, #1d4ed8);
  --mbi-neutral: var(--mbi-muted);
  font-family: var(--jp-ui-font-family, -apple-system, "Segoe UI", Roboto, Helvetica, sans-serif);
  color: var(--mbi-fg); }
.mbi-panel .mbi-tone-success { --mbi-tone: var(--mbi-success); }
.mbi-panel .mbi-tone-error { --mbi-tone: var(--mbi-error); }
.mbi-panel .mbi-tone-warning { --mbi-tone: var(--mbi-warning); }
.mbi-panel .mbi-tone-info { --mbi-tone: var(--mbi-info); }
.mbi-panel .mbi-tone-neutral { --mbi-tone: var(--mbi-neutral); }
.mbi-panel [class*="mbi-tone-"] { --mbi-tone-text: var(--mbi-tone); --mbi-tone-bg: transparent;
  --mbi-tone-edge: var(--mbi-tone); }
@supports (color: color-mix(in srgb, red 50%, blue)) {
  .mbi-panel { --mbi-muted: color-mix(in srgb, var(--mbi-strong) 66%, var(--mbi-bg)); }
  .mbi-panel [class*="mbi-tone-"] { --mbi-tone-text: color-mix(in srgb, var(--mbi-tone) 58%, var(--mbi-strong));
    --mbi-tone-bg: color-mix(in srgb, var(--mbi-tone) 14%, var(--mbi-bg));
    --mbi-tone-edge: color-mix(in srgb, var(--mbi-tone) 50%, var(--mbi-bg)); }
}
.mbi-panel .jupyter-widget-html-content, .mbi-panel .widget-html-content { line-height: 1.45; min-width: 0; }
.mbi-panel h2, .mbi-panel h3, .mbi-panel h4 { color: var(--mbi-strong); line-height: 1.3; }
.mbi-panel p { margin: 4px 0; }
.mbi-panel a, .mbi-panel .mbi-link { color: var(--mbi-link); text-decoration: underline; overflow-wrap: anywhere; }
.mbi-panel .mbi-muted { color: var(--mbi-muted); }
.mbi-panel .mbi-text { color: var(--mbi-tone-text); font-weight: 600; }
.mbi-panel code { overflow-wrap: anywhere; }
.mbi-panel .jupyter-button { width: fit-content; max-width: 100%; flex-shrink: 0; padding: 0 8px; }
/* ipywidgets' own greys and orange fall under 4.5:1 (tab labels, collapsed headers, white on orange). */
.mbi-panel .jupyter-button.mod-warning { background-color: #9a4f00; color: #fff; }
@supports (color: color-mix(in srgb, red 50%, blue)) {
  .mbi-panel .jupyter-button.mod-warning {
    background-color: color-mix(in srgb, var(--jp-warn-color1, #f57c00) 62%, #000); }
}
.mbi-panel .jupyter-button.mod-warning:hover:enabled, .mbi-panel .jupyter-button.mod-warning:active:enabled {
  background-color: #7a3e00; }
.mbi-panel .jupyter-widget-tab > .lm-TabBar .lm-TabBar-tab, .mbi-panel .jupyter-widget-Collapse-header {
  color: var(--mbi-fg); }
.mbi-panel .jupyter-widget-tab > .lm-TabBar .lm-TabBar-tab.lm-mod-current { color: var(--mbi-strong); }
.mbi-panel .mbi-banner { border: 1px solid var(--mbi-tone-edge); border-left-width: 4px; background: var(--mbi-tone-bg);
  color: var(--mbi-tone-text); padding: 8px 12px; border-radius: 4px; font-weight: 600; overflow-wrap: anywhere; }
.mbi-panel .mbi-badge { display: inline-block; padding: 0 9px; border-radius: 10px; font-weight: 600; font-size: 12px;
  line-height: 20px; white-space: nowrap; color: var(--mbi-tone-text); background: var(--mbi-tone-bg);
  border: 1px solid var(--mbi-tone-edge); }
.mbi-panel .mbi-head { font-weight: 600; color: var(--mbi-muted); border-bottom: 1px solid var(--mbi-border);
  padding: 4px 0; }
.mbi-panel .mbi-cell { padding: 4px 0; overflow-wrap: anywhere; }
.mbi-panel .mbi-code { font: 600 40px/1.2 ui-monospace, Menlo, Consolas, monospace; letter-spacing: 6px;
  color: var(--mbi-strong); }
.mbi-panel .mbi-wrap { flex-wrap: wrap; gap: 4px 6px; align-items: center; overflow: visible; }
.mbi-panel .mbi-grow { flex: 1 1 200px; min-width: 0; }
.mbi-panel .mbi-box { border: 1px solid var(--mbi-border); border-radius: 4px; padding: 4px 10px; margin: 8px 0; }
/* Tables of rows (Data Sources, the warehouse's tables): cards that wrap when narrow, a grid when wide. */
.mbi-panel .mbi-rows { overflow: visible; }
.mbi-panel .mbi-row { display: flex; flex-wrap: wrap; gap: 2px 12px; align-items: flex-start; overflow: visible;
  padding: 8px 0; border-bottom: 1px solid var(--mbi-rule); }
.mbi-panel .mbi-row > * { flex: 0 1 auto; min-width: 0; margin: 0; }
.mbi-panel .mbi-row .mbi-cell { padding: 0; }
.mbi-panel .mbi-row .mbi-cell[data-label]::before { content: attr(data-label); display: block; font-size: 11px;
  color: var(--mbi-muted); line-height: 1.3; }
.mbi-panel .mbi-row.mbi-head-row { display: none; }
.mbi-panel .mbi-row > .mbi-c-title { flex: 1 1 55%; order: -3; }
.mbi-panel .mbi-row > .mbi-c-badge { order: -2; }
.mbi-panel .mbi-sources .mbi-row::after, .mbi-panel .mbi-tables .mbi-row::after {
  content: ""; flex: 1 1 100%; order: -1; height: 0; } /* the facts start a line */
.mbi-panel .mbi-row > .mbi-c-badge .mbi-cell::before { display: none; }
.mbi-panel .mbi-row > .mbi-c-wide { flex: 1 1 100%; }
.mbi-panel .mbi-actions { display: flex; flex-wrap: wrap; gap: 4px; overflow: visible; }
.mbi-panel .mbi-actions > * { margin: 0; }
@container mbi-panel (min-width: 900px) {
  .mbi-panel .mbi-sources .mbi-row { display: grid; gap: 0 8px; align-items: center; padding: 6px 0;
    grid-template-columns: minmax(140px, 1.2fr) 78px 186px 84px 80px 80px minmax(200px, 1.5fr); }
  .mbi-panel .mbi-sources .mbi-row::after { content: none; }
  .mbi-panel .mbi-sources .mbi-sub { display: block; }
  .mbi-panel .mbi-sources .mbi-row > * { order: 0; }
  .mbi-panel .mbi-sources .mbi-row .mbi-cell[data-label]::before { display: none; }
  .mbi-panel .mbi-sources .mbi-row.mbi-head-row { padding: 0; }
}
@container mbi-panel (min-width: 920px) {
  .mbi-panel .mbi-tables .mbi-row { display: grid; gap: 0 6px; align-items: center; padding: 4px 0;
    grid-template-columns: 34px minmax(120px, 1.5fr) 112px 60px 60px 84px 80px 84px 116px 112px; }
  .mbi-panel .mbi-tables .mbi-row > * { order: 0; }
  .mbi-panel .mbi-tables .mbi-row::after { content: none; }
  .mbi-panel .mbi-tables .mbi-row > .mbi-c-columns { margin-left: 0; }
  .mbi-panel .mbi-tables .mbi-row .mbi-cell[data-label]::before { display: none; }
  .mbi-panel .mbi-tables .mbi-row.mbi-head-row { padding: 0; }
}
.mbi-panel .mbi-sources .mbi-row.mbi-head-row, .mbi-panel .mbi-tables .mbi-row.mbi-head-row { border-bottom: 0; }
@container mbi-panel (max-width: 899.9px) { .mbi-panel .mbi-sources .mbi-row.mbi-head-row { display: none; } }
@container mbi-panel (max-width: 919.9px) { .mbi-panel .mbi-tables .mbi-row.mbi-head-row { display: none; } }
.mbi-panel .mbi-tables .mbi-row > .mbi-c-check { order: -4; }
.mbi-panel .mbi-tables .mbi-row > .mbi-c-columns { order: -2; margin-left: auto; }
.mbi-panel .mbi-progress-cell { min-width: 120px; }
/* The gallery: each source type is one button, its logo drawn by CSS, so the whole tile is one click target. */
.mbi-panel .jupyter-button.mbi-tile { display: inline-flex; flex-direction: column; justify-content: flex-end;
  align-items: center; padding: 8px; line-height: 20px; font-weight: 600; color: var(--mbi-strong);
  background: var(--mbi-bg) var(--mbi-logo, none) no-repeat center 12px / 64px 64px;
  border: 1px solid var(--mbi-border); border-radius: 8px; }
.mbi-panel .jupyter-button.mbi-tile:hover, .mbi-panel .jupyter-button.mbi-tile:focus-visible {
  border-color: var(--mbi-info); box-shadow: 0 0 0 2px var(--mbi-info); }
/* Previews: rows of one line, scrolling sideways; long values cut with the whole value on demand. */
.mbi-panel .mbi-frame-scroll { overflow-x: auto; max-width: 100%; }
.mbi-panel table.mbi-frame { font-size: 12px; border-collapse: collapse; line-height: 1.35; color: var(--mbi-fg); }
.mbi-panel table.mbi-frame td, .mbi-panel table.mbi-frame th { padding: 3px 8px; text-align: left; vertical-align: top;
  border-bottom: 1px solid var(--mbi-rule); white-space: nowrap; max-width: 22em; overflow: hidden;
  text-overflow: ellipsis; }
.mbi-panel table.mbi-frame th { color: var(--mbi-strong); background: var(--mbi-bg-alt); font-weight: 600;
  border-bottom-color: var(--mbi-border); }
.mbi-panel table.mbi-frame td.mbi-num { text-align: right; font-variant-numeric: tabular-nums; }
.mbi-panel table.mbi-frame td.mbi-na { color: var(--mbi-muted); }
.mbi-panel table.mbi-frame details { white-space: nowrap; }
.mbi-panel table.mbi-frame details summary { cursor: pointer; color: var(--mbi-fg); }
.mbi-panel table.mbi-frame details[open] { white-space: normal; }
.mbi-panel table.mbi-frame details pre { margin: 4px 0; max-width: 60ch; max-height: 16em; overflow: auto;
  white-space: pre; font-size: 11px; padding: 6px; background: var(--mbi-bg-alt); color: var(--mbi-fg);
  border-radius: 4px; }
.mbi-panel .mbi-dtypes { columns: 15em auto; column-gap: 20px; font-size: 12px; margin: 4px 0; }
.mbi-panel .mbi-dtypes div { break-inside: avoid; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.mbi-panel .mbi-preview .jupyter-widget-tab > .lm-TabBar .lm-TabBar-content { flex-wrap: wrap; }
.mbi-panel .mbi-preview .jupyter-widget-tab > .lm-TabBar .lm-TabBar-tab { flex: 0 0 auto; min-width: max-content;
  overflow: visible; margin-bottom: 2px; }
.mbi-panel .mbi-preview .jupyter-widget-tab > .widget-tab-contents { padding: 10px 12px; }
.mbi-panel .mbi-preview .lm-TabBar-tab:hover::after { position: absolute; top: calc(100% + 4px); left: 0; z-index: 20;
  width: max-content; max-width: 260px; white-space: normal; padding: 6px 8px; border-radius: 4px; pointer-events: none;
  background: var(--mbi-bg); color: var(--mbi-fg); border: 1px solid var(--mbi-border); font-weight: normal;
  line-height: 1.35; box-shadow: 0 2px 6px rgba(0, 0, 0, 0.25); }
.mbi-panel table.mbi-summary td, .mbi-panel table.mbi-summary th { max-width: 40em; }
</style>"""


def title() -> widgets.HTML:
    return widgets.HTML(STYLE + "<h2 style='margin:4px 0 8px'>Connections</h2>")


def button(description: str, *, classes: tuple[str, ...] = (), **options: Any) -> widgets.Button:
    """A button as wide as its label (the styles give every button of the panel `width: fit-content`)."""
    made = widgets.Button(description=description, **options)
    for name in classes:
        made.add_class(name)
    return made


def wrapping(children: list[widgets.Widget], *classes: str, **layout: str) -> widgets.HBox:
    """A row that wraps onto the next line when the panel is narrow (buttons, toolbars)."""
    box = widgets.HBox(children, layout=widgets.Layout(**layout))
    for name in ("mbi-wrap", *classes):
        box.add_class(name)
    return box


class Banner:
    """One message above the views (`widget`). A success remembers the connection it speaks of, so that it
    does not stay above that connection's row once the row stops working."""

    def __init__(self) -> None:
        self.widget = widgets.HTML()
        self.about: str | None = None
        self._lock = threading.RLock()  # background threads (a preview's error, a re-test) check at once

    def show(self, text: str = "", kind: str = "info", *, about: str | None = None) -> None:
        with self._lock:
            self.widget.value = (f'<div role="status" class="mbi-banner mbi-tone-{kind}">{html.escape(text)}</div>'
                                 if text else "")
            self.about = about if text else None

    def check(self, connections: Connections) -> None:
        """Replaces a success about a connection that has since stopped working (or is gone)."""
        with self._lock:
            about = self.about  # read once: another thread's check may have replaced the message meanwhile
            if about is None:
                return
            current = next((c for c in connections.list() if c.id == about), None)
            if current is None:
                self.show()
            elif current.status != SUCCESS:
                self.show(f"{current.name}: {current.status}. {current.status_message}", "error")


class CycleLine:
    """"Automatic updates every hour · Next update in 42 min" and a Stop button, while a cycle runs."""

    def __init__(self, connections: Connections, on_stop: Callable[[], None]) -> None:
        self.connections = connections
        self.status = widgets.HTML()
        self.stop_button = button("Stop automatic updates", icon="stop")
        self.stop_button.on_click(lambda _: on_stop())
        self.widget = wrapping([self.status, self.stop_button], display="none")

    def text(self, cycle: UpdateCycle | None) -> str:
        if cycle is None or not cycle.active:
            return ""
        current: SyncRun | None = self.connections.current
        if current is not None and current.running and current.trigger == AUTOMATIC:
            return f"Automatic updates {period(cycle.every)} · updating {current.name}…"
        return f"Automatic updates {period(cycle.every)} · Next update in {time_left(cycle.seconds_left())}"

    def show(self, cycle: UpdateCycle | None) -> None:
        text = self.text(cycle)
        self.status.value = toned(text, "info") if text else ""
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
