"""The Preview view: one tab per expected table, the newest rows at once, the whole table on demand.

A table the warehouse has synced is read from there (instantly, the whole table, saying how old it
is); the others are read from Stripe."""
from __future__ import annotations

import html
import json
import logging
import threading
from typing import Any, Callable

import ipywidgets as widgets
import numpy as np
import pandas as pd

from mbi_widgets.connections import StoredTable
from mbi_widgets.errors import MbiError
from mbi_widgets.tables.schema import ALL_TABLES, schema
from mbi_widgets.tables.source import StripeSource
from mbi_widgets.ui.format import muted, relative_time, toned
from mbi_widgets.ui.frame import button, wrapping

log = logging.getLogger("mbi_widgets.ui")

PREVIEW_ROWS = 100
SHOWN_ROWS = 10
#: At most this many columns are drawn (key columns first, then those with a value); the DataFrame has all.
SHOWN_COLUMNS = 40
#: Longer values are cut, the whole value a hover (text) or a click (JSON) away.
MAX_CELL_CHARS = 60
_EMPTY_TEXT = ("", "{}", "[]", "null")
_DASH = "—"


def is_empty(value: Any) -> bool:
    """None, NaN, NaT, pandas' NA, and empty text or JSON (`{}`, `[]`): shown as a quiet dash."""
    if isinstance(value, str):
        return value.strip() in _EMPTY_TEXT
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or an array: a value
        return False


def json_columns(table: str | None, frame: pd.DataFrame) -> set[str]:
    """The columns holding JSON text: the schema says which (metadata, lists, events' data__object)."""
    if table is None:
        return set()
    return {column.name for column in schema(table).columns if column.kind == "json"} & set(frame.columns)


def shown_columns(frame: pd.DataFrame, table: str | None) -> list[str]:
    """The table's key columns first (`TableSchema.key_columns`), then the others that hold a value in the
    rows shown, up to SHOWN_COLUMNS. Only the picture is reordered: the DataFrame keeps its order."""
    keys = [c for c in (schema(table).key_columns if table else ()) if c in frame.columns]
    shown = frame.head(SHOWN_ROWS)
    rest = [c for c in frame.columns if c not in keys and not all(is_empty(value) for value in shown[c])]
    return (keys + rest)[:max(SHOWN_COLUMNS, len(keys))]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS].rstrip() + "…"


def _json_cell(text: str) -> str:
    if len(text) <= MAX_CELL_CHARS:
        return f"<td><code>{html.escape(text)}</code></td>"
    try:
        pretty = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pretty = text
    return (f'<td class="mbi-json"><details><summary title="Show the whole value"><code>{html.escape(_cut(text))}'
            f"</code></summary><pre>{html.escape(pretty)}</pre></details></td>")


def cell_html(value: Any, *, is_json: bool = False) -> str:
    """One escaped cell: a dash when empty, numbers right-aligned, times to the second (UTC), long text cut
    with the whole value in the tooltip, long JSON cut with the whole value (indented) in a `<details>`."""
    if is_empty(value):
        return f'<td class="mbi-na" title="empty">{_DASH}</td>'
    if isinstance(value, pd.Timestamp):
        return f'<td title="{value.isoformat()}">{value.strftime("%Y-%m-%d %H:%M:%S")}</td>'
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{'true' if value else 'false'}</td>"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return f'<td class="mbi-num">{html.escape(str(value))}</td>'
    text = str(value)
    if is_json:
        return _json_cell(text)
    tip = f' title="{html.escape(text)}"' if len(text) > 24 else ""
    return f"<td{tip}>{html.escape(_cut(text))}</td>"


def frame_html(frame: pd.DataFrame, table: str | None = None) -> str:
    """The first rows as a compact HTML table, one line per row, scrolling sideways: key columns first, empty
    values as a dash, long values cut (every value escaped). Columns empty in every row shown are left out
    of the picture (they stay in the DataFrame)."""
    columns = shown_columns(frame, table)
    keys = set(schema(table).key_columns) if table else set()
    is_json = json_columns(table, frame)
    head = "".join(f'<th class="{"mbi-key" if c in keys else "mbi-col"}" title="{html.escape(str(frame[c].dtype))}">'
                   f"{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell_html(row[c], is_json=c in is_json) for c in columns) + "</tr>"
                   for _, row in frame.head(SHOWN_ROWS).iterrows())
    hidden = frame.shape[1] - len(columns)
    note = (f"<p class='mbi-muted' style='margin:2px 0'>{len(columns)} of {frame.shape[1]} columns shown (key "
            f"columns first; the {hidden} others are empty here or past the first {SHOWN_COLUMNS}); the DataFrame "
            "has them all.</p>") if hidden else ""
    return (f"<div class='mbi-frame-scroll'><table class='mbi-frame'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>{note}")


class ColumnList:
    """"Columns and dtypes": a compact list in as many columns as fit, with a filter (name or dtype)."""

    def __init__(self) -> None:
        self.filter = widgets.Text(placeholder="Filter columns by name or dtype…", continuous_update=True,
                                   layout=widgets.Layout(width="auto", flex="0 1 300px", min_width="0"))
        self.count = widgets.HTML()
        self.list = widgets.HTML()
        self.dtypes: list[tuple[str, str]] = []
        self.filter.observe(lambda _: self.draw(), names="value")
        self.box = widgets.VBox([wrapping([self.filter, self.count]), self.list])

    def show(self, frame: pd.DataFrame) -> None:
        self.dtypes = [(str(name), str(dtype)) for name, dtype in frame.dtypes.items()]
        self.draw()

    def matching(self) -> list[tuple[str, str]]:
        words = self.filter.value.strip().lower().split()
        return [(name, dtype) for name, dtype in self.dtypes
                if all(word in name.lower() or word in dtype.lower() for word in words)]

    def draw(self) -> None:
        found = self.matching()
        total = len(self.dtypes)
        self.count.value = muted(f"{len(found)} of {total} columns" if len(found) != total else f"{total} columns")
        items = "".join(f"<div title='{html.escape(name)}: {html.escape(dtype)}'><code>{html.escape(name)}</code> "
                        f"{muted(html.escape(dtype))}</div>" for name, dtype in found)
        self.list.value = f"<div class='mbi-dtypes'>{items}</div>" if found else muted("No column matches.", tag="p")


def _css_text(text: str) -> str:
    """`text` as a CSS string's content (quotes, backslashes and tags escaped)."""
    return "".join(f"\\{ord(c):x} " if c in '"\\<>' or ord(c) < 32 else c for c in text)


def tab_tooltips(tables: tuple[str, ...]) -> str:
    """The tabs' tooltips: ipywidgets' Tab has no per-tab title, so each is drawn on hover by CSS."""
    rules = "".join(f'.mbi-panel .mbi-preview .lm-TabBar-tab:nth-child({index}):hover::after '
                    f'{{ content: "{_css_text(schema(table).title + ": " + schema(table).description)}"; }}'
                    for index, table in enumerate(tables, start=1))
    return f"<style>{rules}</style>"


class TableTab:
    """One table: its newest rows, row count, columns and dtypes, and a Load full table button."""

    def __init__(self, preview: "PreviewView", table: str) -> None:
        self.preview, self.table = preview, table
        spec = schema(table)
        self.frame: pd.DataFrame | None = None
        self.full = False
        self.status = widgets.HTML(f"<i>Loading the newest {spec.title.lower()}…</i>")
        self.code = widgets.HTML(f"<code>{html.escape(preview.code_for(table))}</code>")
        self.code.add_class("mbi-codeline")
        self.rows = widgets.HTML()
        self.column_list = ColumnList()
        self.columns = widgets.Accordion(children=[self.column_list.box], titles=("Columns and dtypes",))
        self.columns.selected_index = None
        self.load_button = button("Load full table", icon="download", disabled=True,
                                  tooltip=f"Fetch every {spec.resource} of this account")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(
            width="auto", flex="0 1 240px", min_width="80px", visibility="hidden"))
        self.progress_label = widgets.Label()
        self.load_button.on_click(lambda _: self.load_full())
        description = widgets.HTML(muted(html.escape(spec.description)))
        self.box = widgets.VBox([description, self.code, self.status, self.rows,
                                 wrapping([self.load_button, self.progress, self.progress_label]), self.columns])
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
        self.rows.value = frame_html(frame, self.table)
        self.column_list.show(frame)
        self.load_button.disabled = False

    def _show_stored(self, stored: StoredTable) -> None:
        frame = stored.frame
        self.frame, self.full = frame, True
        self.preview.frames[self.table] = frame
        self.code.value = f"<code>{html.escape(stored.code)}</code>"
        self.status.value = (f"<b>{len(frame):,}</b> rows (the whole table) from the warehouse, <b>synced "
                             f"{relative_time(stored.synced_at)}</b>, {frame.shape[1]} columns"
                             + (" (the first rows are shown)" if len(frame) > SHOWN_ROWS else "")
                             + ". " + muted("Manage Data › Sync now brings it up to date."))
        self.rows.value = frame_html(frame, self.table)
        self.column_list.show(frame)
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
        self.rows.value = frame_html(frame, self.table)
        self.column_list.show(frame)
        self.load_button.disabled = False

    def _show_error(self, error: Exception) -> None:
        self.status.value = toned(self.preview.explain(error), "error")
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
        title = widgets.HTML(tab_tooltips(ALL_TABLES) + f"<h3 style='margin:8px 0'>Preview · {html.escape(name)}</h3>")
        self.widget = widgets.VBox([title, self.tab], layout=widgets.Layout(margin="12px 0 0 0"))
        self.widget.add_class("mbi-preview")
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
