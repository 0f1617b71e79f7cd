"""The Preview view: one tab per expected table, the newest rows at once, the whole table on demand.

A table the warehouse has synced is read from there (instantly, the whole table, saying how old it
is); the others are read from Stripe."""
from __future__ import annotations

import html
import logging
import threading
from typing import Callable

import ipywidgets as widgets
import pandas as pd

from mbi_widgets.connections import StoredTable
from mbi_widgets.errors import MbiError
from mbi_widgets.tables.schema import ALL_TABLES, schema
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.ui.format import relative_time

log = logging.getLogger("mbi_widgets.ui")

PREVIEW_ROWS = 100
SHOWN_ROWS = 10
SHOWN_COLUMNS = 14


def frame_html(frame: pd.DataFrame) -> str:
    """A compact, escaped HTML table of the first rows (pandas escapes cell values).

    Columns empty in every row are left out of the picture (they stay in the DataFrame)."""
    if len(frame):
        frame = frame.loc[:, frame.notna().any()]
    return frame.head(SHOWN_ROWS).to_html(max_cols=SHOWN_COLUMNS, escape=True, index=False, border=0,
                                           classes="mbi-frame", na_rep="—")


def dtypes_html(frame: pd.DataFrame) -> str:
    rows = "".join(f"<tr><td><code>{html.escape(str(name))}</code></td><td>{html.escape(str(dtype))}</td></tr>"
                   for name, dtype in frame.dtypes.items())
    return f'<table class="mbi-dtypes"><tr><th>column</th><th>dtype</th></tr>{rows}</table>'


class TableTab:
    """One table: its newest rows, row count, columns and dtypes, and a Load full table button."""

    def __init__(self, preview: "PreviewView", table: str) -> None:
        self.preview, self.table = preview, table
        spec = schema(table)
        self.frame: pd.DataFrame | None = None
        self.full = False
        self.status = widgets.HTML(f"<i>Loading the newest {spec.title.lower()}…</i>")
        self.code = widgets.HTML(f"<code>{html.escape(preview.code_for(table))}</code>")
        self.rows = widgets.HTML()
        self.columns = widgets.Accordion(children=[widgets.HTML()], titles=("Columns and dtypes",))
        self.columns.selected_index = None
        self.load_button = widgets.Button(description="Load full table", icon="download", disabled=True,
                                          tooltip=f"Fetch every {spec.resource} of this account")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="240px",
                                                                                         visibility="hidden"))
        self.progress_label = widgets.Label()
        self.load_button.on_click(lambda _: self.load_full())
        description = widgets.HTML(f'<span style="color:#4b5563">{html.escape(spec.description)}</span>')
        self.box = widgets.VBox([description, self.code, self.status, self.rows,
                                 widgets.HBox([self.load_button, self.progress, self.progress_label]), self.columns])
        self.started = False

    def load_preview(self) -> None:
        if self.started:
            return
        self.started = True
        self.preview.run(self._read_newest, self._show_preview, self._show_error)

    def _read_newest(self) -> pd.DataFrame | StoredTable:
        try:
            stored = self.preview.stored(self.table)
        except MbiError as exc:  # a warehouse busy or damaged: Stripe still answers
            log.warning("reading %s from the warehouse failed (%s); reading Stripe instead", self.table, exc)
            stored = None
        return stored if stored is not None else self.preview.source.preview(self.table, rows=PREVIEW_ROWS)

    def _show_preview(self, frame: pd.DataFrame | StoredTable) -> None:
        if isinstance(frame, StoredTable):
            self._show_stored(frame)
            return
        self.frame = frame
        newest = "newest " if len(frame) >= PREVIEW_ROWS else ""
        self.status.value = (f"<b>{len(frame):,}</b> {newest}rows previewed, {frame.shape[1]} columns"
                             + (" (the first rows are shown)" if len(frame) > SHOWN_ROWS else ""))
        self.rows.value = frame_html(frame)
        self.columns.children[0].value = dtypes_html(frame)
        self.load_button.disabled = False

    def _show_stored(self, stored: StoredTable) -> None:
        frame = stored.frame
        self.frame, self.full = frame, True
        self.preview.frames[self.table] = frame
        self.code.value = f"<code>{html.escape(stored.code)}</code>"
        self.status.value = (f"<b>{len(frame):,}</b> rows (the whole table) from the warehouse, <b>synced "
                             f"{relative_time(stored.synced_at)}</b>, {frame.shape[1]} columns"
                             + (" (the first rows are shown)" if len(frame) > SHOWN_ROWS else "")
                             + ". <span style='color:#4b5563'>Manage Data › Sync now brings it up to date.</span>")
        self.rows.value = frame_html(frame)
        self.columns.children[0].value = dtypes_html(frame)
        self.load_button.layout.display = "none"  # the whole table is here already

    def load_full(self) -> None:
        self.load_button.disabled = True
        self.progress.layout.visibility = "visible"
        self.progress.bar_style = "info"
        self.progress_label.value = "Starting…"
        self.preview.run(lambda: self.preview.source.table(self.table, progress=self._progress), self._show_full,
                         self._show_error)

    def _progress(self, done: int, expected: int | None) -> None:
        self.progress.max = max(self.progress.max, expected or int(done * 1.2) + 100)
        self.progress.value = min(done, self.progress.max)
        self.progress_label.value = f"{done:,} rows fetched…"

    def _show_full(self, frame: pd.DataFrame) -> None:
        self.frame, self.full = frame, True
        self.preview.frames[self.table] = frame
        self.progress.max = max(1, len(frame))
        self.progress.value = self.progress.max
        self.progress.bar_style = "success"
        self.progress_label.value = f"All {len(frame):,} rows loaded"
        self.status.value = f"<b>{len(frame):,}</b> rows (the whole table), {frame.shape[1]} columns"
        self.rows.value = frame_html(frame)
        self.columns.children[0].value = dtypes_html(frame)
        self.load_button.disabled = False

    def _show_error(self, error: Exception) -> None:
        self.status.value = f'<span style="color:#b42318">{html.escape(self.preview.explain(error))}</span>'
        self.progress.bar_style = "danger"
        self.progress_label.value = ""
        self.load_button.disabled = False
        self.started = False
        self.preview.on_error(error)


class PreviewView:
    """Tabs over `ALL_TABLES` for one connection; tabs load when first opened."""

    def __init__(self, source: StripeSource, *, name: str, code_name: str,
                 on_error: Callable[[Exception], None] = lambda exc: None,
                 stored: Callable[[str], StoredTable | None] = lambda table: None,
                 explain: Callable[[Exception], str] = str) -> None:
        """`stored(table)` is the table as the warehouse synced it (None: read Stripe); `explain(error)` the
        words for a failure (an OAuth connection's revoked token is not a mistyped key)."""
        self.source, self.name, self.code_name, self.on_error = source, name, code_name, on_error
        self.stored, self.explain = stored, explain
        self.frames: dict[str, pd.DataFrame] = {}
        self.tabs = {table: TableTab(self, table) for table in ALL_TABLES}
        self.tab = widgets.Tab(children=[t.box for t in self.tabs.values()],
                               titles=[schema(t).title for t in ALL_TABLES])
        self.tab.observe(self._opened, names="selected_index")
        title = widgets.HTML(f"<h3 style='margin:8px 0'>Preview · {html.escape(name)}</h3>")
        self.widget = widgets.VBox([title, self.tab], layout=widgets.Layout(margin="12px 0 0 0"))
        self.threads: list[threading.Thread] = []
        self.tab.selected_index = 0
        self.tabs[ALL_TABLES[0]].load_preview()

    def code_for(self, table: str) -> str:
        return f"panel.source({self.code_name!r}).table({table!r})"

    def _opened(self, change: dict) -> None:
        if change["new"] is not None:
            self.tabs[ALL_TABLES[change["new"]]].load_preview()

    def run(self, work: Callable[[], pd.DataFrame], done: Callable[[pd.DataFrame], None],
            failed: Callable[[Exception], None]) -> None:
        """Runs `work` on a thread so the kernel stays free; `done`/`failed` update the widgets."""
        def target() -> None:
            try:
                result = work()
            except Exception as exc:  # noqa: BLE001 - any failure is shown in the tab, never lost in a thread
                failed(exc)
                return
            done(result)

        thread = threading.Thread(target=target, name="mbi-preview", daemon=True)
        self.threads.append(thread)
        thread.start()

    def wait(self, timeout: float = 60) -> None:
        """Waits for the background loads started so far (tests and scripts)."""
        for thread in list(self.threads):
            thread.join(timeout)
