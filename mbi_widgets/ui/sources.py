"""The Data Sources view: MBI's table of connections, each row with its status, times and actions."""
from __future__ import annotations

import html
from datetime import datetime
from typing import TYPE_CHECKING

import ipywidgets as widgets

from mbi_widgets.connections import auth_label
from mbi_widgets.registry import NEEDS_REAUTH, Connection
from mbi_widgets.ui.format import badge, duration, relative_time

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.ui.panel import ConnectionsPanel

COLUMNS = ("Name", "Connection", "Status", "Last Connection Started", "Last Connection Duration", "Last Updated",
           "Action")
#: About 1,000 px at the narrowest, no wider than before the Last Updated column: the action buttons wrap.
_GRID = "minmax(130px, 2fr) 80px 180px 110px 100px 100px minmax(260px, auto)"
STARTED, UPDATED = 3, 5  # the cells `refresh_times` re-words


def _cell(content: str) -> widgets.HTML:
    return widgets.HTML(f"<div class='mbi-cell'>{content}</div>")


class DataSourcesView:
    """The header with Add a Data Source, and one row per connection (`rows`, by connection id)."""

    def __init__(self, panel: "ConnectionsPanel") -> None:
        self.panel = panel
        self.add_button = widgets.Button(description="Add a Data Source", button_style="primary", icon="plus",
                                         layout=widgets.Layout(width="170px"))
        self.add_button.on_click(lambda _: panel.show_gallery())
        header = widgets.HBox([widgets.HTML("<h3 style='margin:0'>Data Sources</h3>"), self.add_button],
                              layout=widgets.Layout(justify_content="space-between", align_items="center"))
        self.rows: dict[str, list[widgets.Widget]] = {}  # the rows shown now (none is stale after a delete)
        self.children: list[widgets.Widget] = [header, self._table()]

    def _table(self) -> widgets.Widget:
        connections = self.panel.connections.list()
        if not connections:
            return widgets.HTML("<p style='color:#4b5563'>No data sources yet. Click <b>Add a Data Source</b> to "
                                "connect Stripe.</p>")
        updated = self.panel._last_updated()
        cells: list[widgets.Widget] = [widgets.HTML(f"<div class='mbi-head'>{c}</div>") for c in COLUMNS]
        for connection in connections:
            row = self._row(connection, updated.get(connection.id))
            self.rows[connection.id] = row
            cells += row
        return widgets.GridBox(cells, layout=widgets.Layout(grid_template_columns=_GRID, grid_gap="0 10px",
                                                            align_items="center"))

    def _row(self, connection: Connection, last_updated: datetime | None) -> list[widgets.Widget]:
        name, account = html.escape(connection.name), html.escape(connection.account_id)
        how = html.escape(auth_label(connection))
        return [_cell(f"<b>{name}</b><br><small style='color:#6b7280'>{account}</small>"),
                _cell(f"{html.escape(connection.connection_type)}<br><small style='color:#6b7280'>{how}</small>"),
                _cell(badge(connection.status, connection.status_message)),
                _cell(relative_time(connection.last_started)),
                _cell(duration(connection.last_duration)),
                _cell(relative_time(last_updated)),
                widgets.HBox(self._actions(connection), layout=widgets.Layout(flex_flow="row wrap"))]

    def _actions(self, connection: Connection) -> list[widgets.Widget]:
        panel = self.panel
        preview = widgets.Button(description="Preview", icon="table", layout=widgets.Layout(width="96px"))
        manage = widgets.Button(description="Manage Data", icon="database", layout=widgets.Layout(width="132px"),
                                tooltip="Choose the tables and columns to sync, and sync them (Data Warehouse "
                                        "Manager)")
        reauth = widgets.Button(description="Re-authenticate", layout=widgets.Layout(width="126px"),
                                button_style="warning" if connection.status == NEEDS_REAUTH else "")
        delete = widgets.Button(description="Delete", button_style="danger", layout=widgets.Layout(width="66px"))
        preview.on_click(lambda _: panel._safely(lambda: panel._preview_clicked(connection.id)))
        manage.on_click(lambda _: panel._safely(lambda: panel.show_warehouse(connection.id)))
        reauth.on_click(lambda _: panel._safely(lambda: panel.reauthenticate(connection.id)))
        delete.on_click(lambda _: self.confirm_delete(connection))
        return [preview, manage, reauth, delete]

    def confirm_delete(self, connection: Connection) -> None:
        sure = widgets.Button(description="Yes, delete", button_style="danger", layout=widgets.Layout(width="100px"))
        keep = widgets.Button(description="Cancel", layout=widgets.Layout(width="70px"))
        question = widgets.HTML(f"Delete <b>{html.escape(connection.name)}</b>?")
        self.rows[connection.id][-1].children = [question, sure, keep]
        sure.on_click(lambda _: self.panel._in_background(lambda: self.panel.delete(connection.id)))
        keep.on_click(lambda _: self.panel.show_data_sources())

    def refresh_times(self, connections: list[Connection], updated: dict[str, datetime | None]) -> None:
        """Re-words the relative times ('just now' becomes 'a minute ago') without redrawing rows."""
        for connection in connections:
            row = self.rows.get(connection.id)
            if row is not None:
                row[STARTED].value = f"<div class='mbi-cell'>{relative_time(connection.last_started)}</div>"
                row[UPDATED].value = f"<div class='mbi-cell'>{relative_time(updated.get(connection.id))}</div>"
