"""mbi-widgets: a Business Intelligence Connections page for Jupyter, with Stripe as a data source.

Public names are imported lazily so that `import mbi_widgets` stays cheap in a kernel.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Sandbox": "mbi_widgets.sandbox",
    "RateLimits": "mbi_widgets.sandbox",
    "Faults": "mbi_widgets.sandbox",
    "MbiError": "mbi_widgets.errors",
    "StripeSource": "mbi_widgets.tables.source",
    "Warehouse": "mbi_widgets.warehouse",
    "SyncReport": "mbi_widgets.warehouse",
    "ConnectionsPanel": "mbi_widgets.ui",
    "EXPECTED_TABLES": "mbi_widgets.tables.schema",
    "CHILD_TABLES": "mbi_widgets.tables.schema",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.errors import MbiError
    from mbi_widgets.sandbox import Faults, RateLimits, Sandbox
    from mbi_widgets.tables.schema import CHILD_TABLES, EXPECTED_TABLES
    from mbi_widgets.tables.source import StripeSource
    from mbi_widgets.ui import ConnectionsPanel
    from mbi_widgets.warehouse import SyncReport, Warehouse


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mbi_widgets' has no attribute {name!r}")
    return getattr(import_module(module), name)
