"""The ipywidgets user interface: the top layer, importing the rest; nothing imports it."""
from mbi_widgets.ui.panel import ConnectionsPanel, SOURCE_TYPES, SourceType

__all__ = ["ConnectionsPanel", "SOURCE_TYPES", "SourceType"]
