"""Shared fixtures: one demo-scale sandbox per test session, and clients pointed at it."""
from __future__ import annotations

import pytest
import stripe

from mbi_widgets import Sandbox


@pytest.fixture(scope="session")
def sandbox():
    with Sandbox(seed=0, scale="demo") as running:
        yield running


def make_client(sandbox: Sandbox, key: str, **options) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": sandbox.api_url, "connect": sandbox.connect_url},
                               **options)


@pytest.fixture
def client(sandbox):
    """stripe-python 16 on the restricted key of the first seeded account."""
    return make_client(sandbox, sandbox.restricted_key)


def pytest_collection_finish(session):
    """Builds matplotlib's font cache before a notebook's kernel imports matplotlib: on a fresh machine,
    a build slower than 5 s logs a warning into the cell's output, which strict nbval would report."""
    if any(".ipynb::" in item.nodeid for item in session.items):
        try:
            import matplotlib.font_manager  # noqa: F401 - importing builds (and saves) the cache
        except ImportError:  # the notebooks' own import says what is missing
            pass


def pytest_terminal_summary(terminalreporter):
    """Says where the browser test left its screenshots (one per step of the flow)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
    shots = sorted(folder.glob("*.png")) if folder.exists() else []
    if shots:
        terminalreporter.write_line(f"Browser screenshots ({len(shots)} steps): {folder}")
