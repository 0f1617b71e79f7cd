"""The ipywidgets user interface: the top layer, importing the rest; nothing imports it."""
from mbi_widgets.ui.authorization import SOURCE_TYPES, SourceType
from mbi_widgets.ui.panel import ConnectionsPanel

__all__ = ["ConnectionsPanel", "SOURCE_TYPES", "SourceType"]
