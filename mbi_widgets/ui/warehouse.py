"""The Data Warehouse Manager view (MBI's Manage Data): per connection, every table with its sync checkbox
and column picker, what the last sync left, Sync now / Force a full refresh with a progress bar per
table, and the summary of the last sync. It draws `Connections.table_states` and follows `SyncRun`s."""
from __future__ import annotations

import html
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import ipywidgets as widgets

from mbi_widgets.connections import NeedsReauthentication, SyncInProgress, SyncRun, TableState, auth_label
from mbi_widgets.errors import MbiError
from mbi_widgets.registry import NEEDS_REAUTH
from mbi_widgets.ui.format import badge, count, duration, muted, period, relative_time, timestamp, toned
from mbi_widgets.ui.frame import button, wrapping

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.connections import UpdateCycle
    from mbi_widgets.ui.panel import ConnectionsPanel
    from mbi_widgets.warehouse import SyncReport, TableSync

HEAD = ("Sync", "Table", "Columns", "Rows", "Deleted rows", "Last sync", "Duration", "Mode",
        "Last data point received", "Progress")
#: What each fact is called when a narrow panel shows the tables as cards (no header row then).
LABELS = ("", "", "", "Rows", "Deleted rows", "Last sync", "Duration", "Mode", "Last data point received", "")
ALL_TABLES_FILTER, SYNCED_TABLES_FILTER = "All Tables", "Synced Tables"
#: The update cycles offered (seconds; 0 is off). A period set from Python is added when shown.
CYCLES = ((0, "Off"), (900, "every 15 minutes"), (3_600, "every hour"), (21_600, "every 6 hours"), (86_400, "every day"))


def _cell(content: str, title: str | None = None, label: str = "") -> str:
    tip = f' title="{html.escape(title)}"' if title else ""
    named = f" data-label='{html.escape(label)}'" if label else ""
    return f"<div class='mbi-cell'{tip}{named}>{content}</div>"


class TableRow:
    """One table's cells; `progress` fills as its rows arrive during a sync."""

    def __init__(self, view: "WarehouseView", state: TableState) -> None:
        self.table, self.title = state.table, state.title
        self.checkbox = widgets.Checkbox(value=state.synced, indent=False, description="",
                                         tooltip=f"Sync {state.title}", layout=widgets.Layout(width="24px"))
        self.checkbox.add_class("mbi-c-check")
        self.checkbox.observe(lambda change: view._synced_changed(self.table, change["new"]), names="value")
        child = "&nbsp;&nbsp;↳ " if state.parent else ""
        self.label = widgets.HTML(_cell(f"{child}<b>{html.escape(state.title)}</b><br>"
                                        + muted(f"<code>{html.escape(state.table)}</code>", tag="small")))
        self.label.add_class("mbi-c-title")
        self.columns_button = button("", icon="columns", tooltip=f"Choose the columns of {state.title} to sync",
                                     classes=("mbi-c-columns",))
        self.columns_button.on_click(lambda _: view.open_picker(self.table))
        self.rows, self.deleted, self.last_sync, self.duration, self.mode, self.last_point = (
            widgets.HTML() for _ in range(6))
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(
            width="100%", max_width="160px", visibility="hidden"))
        self.progress_label = widgets.HTML()
        self.expected: int | None = None
        # Shown only while a sync writes this table (the last cell: hiding it moves no other column).
        self.progress_cell = widgets.VBox([self.progress, self.progress_label], layout=widgets.Layout(display="none"))
        self.progress_cell.add_class("mbi-progress-cell")
        self.cells: list[widgets.Widget] = [
            self.checkbox, self.label, self.columns_button, self.rows, self.deleted, self.last_sync, self.duration,
            self.mode, self.last_point, self.progress_cell]
        self.box = widgets.Box(self.cells)
        self.box.add_class("mbi-row")
        self.show(state)

    def show(self, state: TableState) -> None:
        self.columns_button.description = f"{len(state.columns)} of {len(state.all_columns)}"
        self.rows.value = _cell(count(state.rows), label=LABELS[3])
        self.deleted.value = _cell(count(state.deleted_rows), label=LABELS[4])
        self.last_sync.value = _cell(relative_time(state.last_sync), label=LABELS[5])
        self.duration.value = _cell(duration(state.duration) if state.last_sync else "—", label=LABELS[6])
        self.mode.value = _cell(html.escape(state.mode or "—"), state.why, label=LABELS[7])
        self.last_point.value = _cell(timestamp(state.last_data_point), label=LABELS[8])

    def _label(self, text: str) -> None:
        self.progress_label.value = muted(html.escape(text), tag="small")

    def start(self, in_sync: bool, expected: int | None) -> None:
        self.expected = expected
        self.progress.layout.visibility = "visible" if in_sync else "hidden"
        self.progress_cell.layout.display = "" if in_sync else "none"
        self.progress.bar_style = "info"
        self.progress.max, self.progress.value = max(1, expected or 1), 0
        self._label("Waiting…" if in_sync else "")

    def fetched(self, rows: int) -> None:
        # Without an expected size the bar grows ahead of the rows, like the preview's Load full table.
        self.progress.max = max(self.progress.max, self.expected or int(rows * 1.2) + 100)
        self.progress.value = min(rows, self.progress.max)
        self._label(f"{rows:,} rows fetched…")

    def written(self, result: "TableSync") -> None:
        self.progress.max = self.progress.value = max(1, self.progress.max)
        self.progress.bar_style = "success"
        self._label(f"+{result.added:,} ~{result.updated:,} −{result.deleted:,}")

    def stopped(self, why: str, style: str = "danger") -> None:
        if self.progress.layout.visibility == "visible" and self.progress.bar_style != "success":
            self.progress.bar_style = style
            self._label(why)


class ColumnPicker:
    """The columns of one table as checkboxes; the required ones cannot be unticked."""

    def __init__(self, view: "WarehouseView", state: TableState) -> None:
        self.table = state.table
        self.checkboxes: dict[str, widgets.Checkbox] = {}
        for column in state.all_columns:
            box = widgets.Checkbox(value=column in state.columns, description=column, indent=False,
                                   disabled=column in state.required, tooltip=column,
                                   layout=widgets.Layout(width="auto"))
            box.observe(lambda _: view._columns_changed(self.table), names="value")
            self.checkboxes[column] = box
        self.required = state.required
        self.all_button = button("Select all")
        self.required_button = button("Only required", tooltip=f"Only {', '.join(state.required)}")
        done = button("Done")
        self.all_button.on_click(lambda _: view._set_all_columns(self.table, everything=True))
        self.required_button.on_click(lambda _: view._set_all_columns(self.table, everything=False))
        done.on_click(lambda _: view.close_picker())
        required = ", ".join(f"<code>{html.escape(c)}</code>" for c in state.required)
        self.box = widgets.VBox([
            widgets.HTML(f"<h4 style='margin:8px 0 4px'>Columns of {html.escape(state.title)}</h4>"
                         + muted(f"{required} are always synced. Unticked columns leave the warehouse now; ticked ones "
                                 "arrive with the next sync, which re-reads the table whole.", tag="p")),
            wrapping([self.all_button, self.required_button, done]),
            widgets.GridBox(list(self.checkboxes.values()),
                            layout=widgets.Layout(grid_template_columns="repeat(auto-fill, minmax(200px, 1fr))"))])
        self.box.add_class("mbi-box")

    def chosen(self) -> list[str]:
        return [column for column, box in self.checkboxes.items() if box.value]

    def set_disabled(self, disabled: bool) -> None:
        for column, box in self.checkboxes.items():
            box.disabled = disabled or column in self.required
        self.all_button.disabled = self.required_button.disabled = disabled


class WarehouseView:
    """The Data Warehouse Manager of one connection (`rows` by table, `picker` while choosing columns)."""

    def __init__(self, panel: "ConnectionsPanel", connection_id: str) -> None:
        self.panel, self.connection_id = panel, connection_id
        self._muted = False
        self.run: SyncRun | None = None
        self._finished_run: SyncRun | None = None
        self.title = widgets.HTML()
        self.reauth_button = button("Re-authenticate", button_style="warning", layout=widgets.Layout(display="none"))
        self.reauth_button.on_click(lambda _: panel._safely(lambda: panel.reauthenticate(self.connection_id)))
        self.sync_button = button("Sync now", button_style="primary", icon="refresh", classes=("mbi-sync",),
                                  tooltip="Bring the synced tables up to date (incrementally where possible)")
        self.full_button = button("Force a full refresh", icon="repeat",
                                  tooltip="Re-read every synced table whole from Stripe")
        self.sync_button.on_click(lambda _: self._sync_clicked(full=False))
        self.full_button.on_click(lambda _: self._sync_clicked(full=True))
        self.cycle = widgets.Dropdown(options=[(label, seconds) for seconds, label in CYCLES], value=0,
                                      description="Update cycle", layout=widgets.Layout(width="auto"),
                                      style={"description_width": "initial"},
                                      tooltip="Sync every connection on a schedule while this kernel runs")
        self.cycle.observe(self._cycle_changed, names="value")
        self.filter = widgets.ToggleButtons(options=(ALL_TABLES_FILTER, SYNCED_TABLES_FILTER), value=ALL_TABLES_FILTER,
                                            style={"button_width": "auto"})
        self.filter.observe(lambda _: self._apply_filter(), names="value")
        self.message = widgets.HTML()
        self.summary = widgets.HTML()
        self.picker: ColumnPicker | None = None
        self.picker_box = widgets.VBox()
        self.states = {state.table: state for state in panel.connections.table_states(connection_id)}
        self.rows = {table: TableRow(self, state) for table, state in self.states.items()}
        self.header = widgets.Box([widgets.HTML(f"<div class='mbi-head'>{name}</div>") for name in HEAD])
        self.header.add_class("mbi-row")
        self.header.add_class("mbi-head-row")
        self.grid = widgets.VBox([self.header] + [row.box for row in self.rows.values()])
        self.grid.add_class("mbi-rows")
        self.grid.add_class("mbi-tables")
        back = button("Back to Data Sources", icon="arrow-left")
        back.on_click(lambda _: panel.show_data_sources())
        toolbar = wrapping([self.sync_button, self.full_button, self.cycle])
        heading = wrapping([self.title, self.reauth_button])
        self.title.add_class("mbi-grow")
        self.widget = widgets.VBox([heading, toolbar, self.filter, self.grid, self.picker_box, self.message,
                                    self.summary, back])
        self.widget.add_class("mbi-warehouse")
        self.children = [self.widget]
        self.show_title()
        self.show_cycle(panel.cycle)

    # --- drawing -----------------------------------------------------------------------------------

    def show_title(self) -> None:
        connection = self.panel.connections.registry.get(self.connection_id)
        updated = self.panel._last_updated().get(self.connection_id)
        self.name = connection.name
        self.title.value = (f"<h3 style='margin:0 0 4px'>Data Warehouse Manager · {html.escape(connection.name)}</h3>"
                            f"<p class='mbi-muted' style='margin:0 0 8px'>{html.escape(connection.account_id)} · "
                            f"{html.escape(auth_label(connection))} · {badge(connection.status, connection.status_message)}"
                            f" · Last updated {relative_time(updated)}</p>")
        self.reauth_button.layout.display = "" if connection.status == NEEDS_REAUTH else "none"

    def refresh(self) -> None:
        """Redraws what the warehouse holds now (after a sync, or a change elsewhere)."""
        self.states = {state.table: state for state in self.panel.connections.table_states(self.connection_id)}
        with self._quiet():
            for table, row in self.rows.items():
                row.checkbox.value = self.states[table].synced
                row.show(self.states[table])
        self.show_title()
        self._apply_filter()

    def show_cycle(self, cycle: "UpdateCycle | None") -> None:
        seconds = round(cycle.every, 3) if cycle is not None and cycle.active else 0
        with self._quiet():
            if seconds not in [value for _, value in self.cycle.options]:
                self.cycle.options = [*self.cycle.options, (period(seconds), seconds)]
            self.cycle.value = seconds

    def _apply_filter(self) -> None:
        only_synced = self.filter.value == SYNCED_TABLES_FILTER
        for row in self.rows.values():
            row.box.layout.display = "" if row.checkbox.value or not only_synced else "none"

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """Values set by the view itself are not user choices to save."""
        muted, self._muted = self._muted, True
        try:
            yield
        finally:
            self._muted = muted

    def _say(self, text: str, kind: str = "error") -> None:
        self.message.value = toned(text, kind, tag="p") if text else ""

    # --- choosing tables and columns -----------------------------------------------------------------

    def _synced_changed(self, table: str, synced: bool) -> None:
        if self._muted:
            return
        try:
            changed = self.panel.connections.set_synced(self.connection_id, table, synced)
        except MbiError as exc:
            with self._quiet():
                self.rows[table].checkbox.value = not synced
            self._say(str(exc))
            return
        with self._quiet():
            for name, value in changed.items():
                self.rows[name].checkbox.value = value
        self._say("")
        self._apply_filter()

    def open_picker(self, table: str) -> ColumnPicker:
        self.picker = ColumnPicker(self, self.states[table])
        self.picker.set_disabled(self.run is not None and self.run.running)
        self.picker_box.children = [self.picker.box]
        return self.picker

    def close_picker(self) -> None:
        self.picker, self.picker_box.children = None, []

    def _columns_changed(self, table: str) -> None:
        if self._muted or self.picker is None or self.picker.table != table:
            return
        self._save_columns(table, self.picker.chosen())

    def _set_all_columns(self, table: str, *, everything: bool) -> None:
        picker = self.picker
        if picker is None:
            return
        with self._quiet():
            for column, box in picker.checkboxes.items():
                box.value = everything or column in picker.required
        self._save_columns(table, picker.chosen())

    def _save_columns(self, table: str, columns: list[str]) -> None:
        try:
            self.panel.connections.set_columns(self.connection_id, table, columns)
        except MbiError as exc:
            self._say(str(exc))
        self.refresh()
        if self.picker is not None and self.picker.table == table:
            with self._quiet():  # what the warehouse kept (a failed save puts the boxes back)
                for column, box in self.picker.checkboxes.items():
                    box.value = column in self.states[table].columns

    def _cycle_changed(self, change: dict) -> None:
        if not self._muted:
            self.panel.auto_sync(change["new"] or None)

    # --- syncing -----------------------------------------------------------------------------------

    def _sync_clicked(self, *, full: bool) -> None:
        self._set_busy(True)  # at once: a second click must not start a second sync
        self._say("")

        def work() -> None:
            try:
                self.panel._sync(self.connection_id, full=full, wait=False)
            except SyncInProgress as exc:  # another connection's sync (the update cycle): not an error
                self._say(str(exc), "info")
            except MbiError as exc:
                if self.run is None or self.run.error is not exc:  # a run's error is shown by the run
                    self.panel._set_banner(str(exc), "error")
            finally:
                if self.run is None or not self.run.running:
                    self._set_busy(False)

        self.panel._in_background(work)

    def _set_busy(self, busy: bool) -> None:
        self.sync_button.disabled = self.full_button.disabled = busy
        for row in self.rows.values():
            row.checkbox.disabled = busy
            row.columns_button.disabled = busy
        if self.picker is not None:
            self.picker.set_disabled(busy)

    def follow(self, run: SyncRun) -> None:
        """Draws `run` as it goes: progress per table, then the summary or the error."""
        self.run = run
        self._set_busy(True)
        for table, row in self.rows.items():
            row.start(table in run.tables, run.expected.get(table))
        kind = "a full refresh" if run.full else "incremental where possible"
        self._say(f"Syncing {len(run.tables)} table(s) of {run.name} ({kind})…", "info")
        self.summary.value = ""
        run.observe(self._on_run)
        self._on_run(run)

    def _on_run(self, run: SyncRun) -> None:
        if run is not self.run:
            return
        for table, rows in list(run.fetched.items()):
            if table in self.rows and table not in run.written:
                self.rows[table].fetched(rows)
        for table, result in list(run.written.items()):
            if table in self.rows:
                self.rows[table].written(result)
        if not run.running and self._finished_run is not run:
            self._finished_run = run
            self._finished(run)

    def _finished(self, run: SyncRun) -> None:
        if run.error is not None:
            for row in self.rows.values():
                row.stopped("Not synced: keeps its last state")
            self._say(str(run.error))
        elif run.report is not None:
            for table, why in run.report.skipped.items():
                self.rows[table].stopped(f"Skipped: {why}", style="warning")
            self._say("")
            self.summary.value = summary_html(run.report, run.name)
        self._set_busy(False)
        self.refresh()
        if isinstance(run.error, NeedsReauthentication):
            self.reauth_button.layout.display = ""


def summary_html(report: "SyncReport", name: str) -> str:
    """The sync's summary: totals, then per table its mode (and why), rows added, updated and deleted."""
    head = (f"<p style='margin:8px 0 4px'><b>Synced {len(report.tables)} table(s) of {html.escape(name)}</b> in "
            f"{duration(report.seconds)}, {report.requests:,} requests: {report.added:,} added, "
            f"{report.updated:,} updated, {report.deleted:,} deleted.</p>")
    rows = "".join(
        f"<tr><td>{html.escape(t.table)}</td><td title=\"{html.escape(t.reason)}\">{html.escape(t.mode)}</td>"
        f"<td>{t.added:,}</td><td>{t.updated:,}</td><td>{t.deleted:,}</td><td>{t.rows:,}</td><td>{t.requests:,}</td>"
        f"<td>{muted(html.escape(t.reason))}</td></tr>" for t in report.tables.values())
    rows += "".join(f"<tr><td>{html.escape(table)}</td><td>skipped</td><td colspan='5'></td>"
                    f"<td>{toned(why, 'warning')}</td></tr>" for table, why in report.skipped.items())
    return (head + "<div class='mbi-frame-scroll'><table class='mbi-frame mbi-summary'><tr><th>table</th><th>mode</th>"
            "<th>added</th><th>updated</th><th>deleted</th><th>rows</th><th>requests</th><th>why</th></tr>" + rows
            + "</table></div>")
