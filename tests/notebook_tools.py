"""Executing the onboarding notebooks for commit (`make notebooks`), and reading them back for tests.

The notebooks are committed executed, with their outputs, so that a reader on a code host sees
the results, and `pytest --nbval` (strict) re-runs them and compares every output, through the
sanitizers in notebooks/nbval_sanitize.cfg (ports, codes, keys, timings: what changes per run).

    python -m tests.notebook_tools                 # every notebook in notebooks/
    python -m tests.notebook_tools notebooks/02_expected_stripe_tables.ipynb

Each notebook runs top to bottom in a fresh kernel of this Python (the project's venv), with
its folder as working directory. No widget state is saved: it is large, and a panel's state is
nothing a reader could load without the kernel. A widget output then keeps only its text
(`text/plain`), which every front end shows, instead of a view that can only say "model not found".
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterator

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SANITIZERS = NOTEBOOKS / "nbval_sanitize.cfg"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: Seconds a cell may run while executing for commit (the slowest takes a few).
CELL_TIMEOUT = 300


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def execute(path: Path, *, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """Runs the notebook at `path` in a fresh kernel of this interpreter and returns it with its outputs."""
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name=NATIVE_KERNEL_NAME, timeout=timeout, store_widget_state=False,
                            record_timing=False, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return text_only_widgets(notebook)


def text_only_widgets(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drops the saved widget state and every widget view, keeping the view's `text/plain`: without the
    state, a front end could only show "model not found" (JupyterLab) or an empty box (an HTML export)."""
    notebook.metadata.pop("widgets", None)
    for output in outputs(notebook):
        data = output.get("data", {})
        if WIDGET_VIEW in data and "text/plain" in data:
            del data[WIDGET_VIEW]
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> Iterator[nbformat.NotebookNode]:
    for cell in notebook.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def sanitizers(path: Path = SANITIZERS) -> list[tuple[str, str]]:
    """The (regex, replacement) pairs of an nbval sanitizer file, parsed as nbval parses them."""
    from nbval.plugin import get_sanitize_patterns

    return get_sanitize_patterns(path.read_text())


def sanitize(text: str, patterns: list[tuple[str, str]]) -> str:
    for regex, replacement in patterns:
        text = re.sub(regex, replacement, text)
    return text


def main(argv: list[str]) -> int:
    paths = [Path(arg).resolve() for arg in argv] or notebook_paths()
    for path in paths:
        print(f"executing {path}", flush=True)
        nbformat.write(execute(path), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
