"""The Data Sources view: MBI's table of connections, each row with its status, times and actions."""
from __future__ import annotations

import html
from datetime import datetime
from typing import TYPE_CHECKING

import ipywidgets as widgets

from mbi_widgets.connections import auth_label
from mbi_widgets.registry import NEEDS_REAUTH, Connection
from mbi_widgets.ui.format import badge, duration, muted, relative_time
from mbi_widgets.ui.frame import button, wrapping

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.ui.panel import ConnectionsPanel

COLUMNS = ("Name", "Connection", "Status", "Last Connection Started", "Last Connection Duration", "Last Updated",
           "Action")
#: What each fact is called when a narrow panel shows the rows as cards (no header row then).
LABELS = ("", "Connection", "", "Last connection", "Duration", "Last updated", "")
STARTED, UPDATED = 3, 5  # the cells `refresh_times` re-words


def _cell_html(content: str, label: str = "") -> str:
    tip = f" data-label='{html.escape(label)}'" if label else ""
    return f"<div class='mbi-cell'{tip}>{content}</div>"


def _cell(content: str, label: str = "", *classes: str) -> widgets.HTML:
    cell = widgets.HTML(_cell_html(content, label))
    for name in classes:
        cell.add_class(name)
    return cell


class DataSourcesView:
    """The header with Add a Data Source, and one row per connection (`rows`, its cells by connection id;
    `row_boxes`, the row itself). Rows are a grid under a header when the panel is wide, cards when narrow."""

    def __init__(self, panel: "ConnectionsPanel") -> None:
        self.panel = panel
        self.add_button = button("Add a Data Source", button_style="primary", icon="plus")
        self.add_button.on_click(lambda _: panel.show_gallery())
        header = wrapping([widgets.HTML("<h3 style='margin:0'>Data Sources</h3>"), self.add_button],
                          justify_content="space-between")
        self.rows: dict[str, list[widgets.Widget]] = {}  # the rows shown now (none is stale after a delete)
        self.row_boxes: dict[str, widgets.Box] = {}
        self.children: list[widgets.Widget] = [header, self._table()]

    def _table(self) -> widgets.Widget:
        connections = self.panel.connections.list()
        if not connections:
            return widgets.HTML(muted("No data sources yet. Click <b>Add a Data Source</b> to connect Stripe.",
                                      tag="p"))
        updated = self.panel._last_updated()
        head = widgets.Box([widgets.HTML(f"<div class='mbi-head'>{c}</div>") for c in COLUMNS])
        head.add_class("mbi-row")
        head.add_class("mbi-head-row")
        boxes: list[widgets.Widget] = [head]
        for connection in connections:
            row = self._row(connection, updated.get(connection.id))
            self.rows[connection.id] = row
            box = widgets.Box(row)
            box.add_class("mbi-row")
            self.row_boxes[connection.id] = box
            boxes.append(box)
        table = widgets.VBox(boxes)
        table.add_class("mbi-rows")
        table.add_class("mbi-sources")
        return table

    def _row(self, connection: Connection, last_updated: datetime | None) -> list[widgets.Widget]:
        name, account = html.escape(connection.name), html.escape(connection.account_id)
        how = html.escape(auth_label(connection))
        actions = widgets.HBox(self._actions(connection))
        actions.add_class("mbi-actions")
        actions.add_class("mbi-c-wide")
        return [_cell(f"<b>{name}</b><br>{muted(account, tag='small')}", "", "mbi-c-title"),
                _cell(f"{html.escape(connection.connection_type)} <small class='mbi-muted mbi-sub'>{how}</small>",
                      LABELS[1]),
                _cell(badge(connection.status, connection.status_message), "", "mbi-c-badge"),
                _cell(relative_time(connection.last_started), LABELS[STARTED]),
                _cell(duration(connection.last_duration), LABELS[4]),
                _cell(relative_time(last_updated), LABELS[UPDATED]),
                actions]

    def _actions(self, connection: Connection) -> list[widgets.Widget]:
        panel = self.panel
        preview = button("Preview", icon="table", tooltip=f"Preview the tables of {connection.name}")
        manage = button("Manage Data", icon="database",
                        tooltip="Choose the tables and columns to sync, and sync them (Data Warehouse Manager)")
        needs_reauth = connection.status == NEEDS_REAUTH
        reauth = button("Re-authenticate", button_style="warning" if needs_reauth else "",
                        tooltip=f"Give {connection.name} a new credential (Connect with Stripe or a restricted key)")
        delete = button("Delete", button_style="danger", tooltip=f"Delete {connection.name}")
        preview.on_click(lambda _: panel._safely(lambda: panel._preview_clicked(connection.id)))
        manage.on_click(lambda _: panel._safely(lambda: panel.show_warehouse(connection.id)))
        reauth.on_click(lambda _: panel._safely(lambda: panel.reauthenticate(connection.id)))
        delete.on_click(lambda _: self.confirm_delete(connection))
        return [preview, manage, reauth, delete]

    def confirm_delete(self, connection: Connection) -> None:
        sure = button("Yes, delete", button_style="danger")
        keep = button("Cancel")
        question = widgets.HTML(f"Delete <b>{html.escape(connection.name)}</b>?")
        self.rows[connection.id][-1].children = [question, sure, keep]
        sure.on_click(lambda _: self.panel._in_background(lambda: self.panel.delete(connection.id)))
        keep.on_click(lambda _: self.panel.show_data_sources())

    def refresh_times(self, connections: list[Connection], updated: dict[str, datetime | None]) -> None:
        """Re-words the relative times ('just now' becomes 'a minute ago') without redrawing rows."""
        for connection in connections:
            row = self.rows.get(connection.id)
            if row is not None:
                row[STARTED].value = _cell_html(relative_time(connection.last_started), LABELS[STARTED])
                row[UPDATED].value = _cell_html(relative_time(updated.get(connection.id)), LABELS[UPDATED])
