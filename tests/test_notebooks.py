"""The onboarding notebooks as documentation: committed executed, checked strictly, safe to publish.

`pytest --nbval` (pyproject's addopts) re-runs notebooks/ and compares every output; these tests
guard what that run cannot see by itself: that the notebooks are committed executed at all (an
unexecuted cell is never compared), that the committed files hold no secret and no widget state,
that strict mode and the sanitizers catch a changed output but not a new port, that an HTML
export shows the panel as text, and that notebook 01's Python cells add no second row when the
reader has also clicked through.
"""
from __future__ import annotations

import re
import subprocess
import sys

import ipywidgets as widgets
import nbformat
import pytest

from tests.notebook_tools import (
    NOTEBOOKS,
    ROOT,
    WIDGET_STATE,
    WIDGET_VIEW,
    notebook_paths,
    outputs,
    sanitize,
    sanitizers,
)

NAMES = ["01_connect_stripe.ipynb", "02_expected_stripe_tables.ipynb", "03_keep_tables_fresh.ipynb"]
#: What must never be committed: whole keys and tokens (masked forms such as sk_test_ab12****cd34 are
#: fine), token fields, Connect codes, and the relay's device codes and browser ids (43 url-safe chars).
SECRET_PATTERNS = (
    r"\b(sk|rk)_(test|live)_[A-Za-z0-9]{8,}",
    r"\brt_[A-Za-z0-9]{20,}",
    r"\bac_[A-Za-z0-9]{20,}",
    r'"(access_token|refresh_token|device_code)"',
    r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])",
)


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def texts(notebook: nbformat.NotebookNode) -> list[str]:
    """Every text a reader sees in the outputs (images left out)."""
    found = []
    for output in outputs(notebook):
        if "text" in output:
            found.append(output["text"])
        found += [value for mime, value in output.get("data", {}).items()
                  if isinstance(value, str) and not mime.startswith("image/")]
        if output.get("output_type") == "error":
            found.append(f"{output['ename']}: {output['evalue']}")
    return found


def secrets_in(text: str) -> list[str]:
    return [match.group(0) for pattern in SECRET_PATTERNS for match in re.finditer(pattern, text)]


def test_the_notebooks_folder_holds_the_three_onboarding_notebooks():
    assert [path.name for path in notebook_paths()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_code_cell_is_committed_executed_in_order(name):
    # nbval compares nothing for a cell without an execution count: a notebook committed cleared
    # would pass strict mode while showing readers no results.
    notebook = read(name)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
        f"{name} is not committed executed top to bottom: run `make notebooks`"
    assert sum(1 for cell in code if cell.outputs) >= len(code) - 1  # only a closing cell may print nothing
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_show_no_warning_and_no_error(name):
    notebook = read(name)
    streams = [output for output in outputs(notebook) if output.output_type == "stream"]
    assert [output.text for output in streams if output.name == "stderr"] == []
    assert not [output for output in outputs(notebook) if output.output_type == "error"]
    for text in texts(notebook):
        assert not re.search(r"\w*Warning\b|Traceback", text), text[:500]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_hold_no_secret_and_no_widget_state(name):
    raw = (NOTEBOOKS / name).read_text()
    notebook = nbformat.reads(raw, as_version=4)
    assert WIDGET_STATE not in raw and "widgets" not in notebook.metadata
    assert WIDGET_VIEW not in raw  # a view with no state can only say "model not found": its text stays
    sources = "\n".join(cell.source for cell in notebook.cells)
    assert secrets_in(sources + "\n".join(texts(notebook))) == []
    assert secrets_in(re.sub(r'"image/png": "[^"]*"', "", raw)) == []


def test_the_secret_scan_would_catch_what_it_looks_for():
    # The scan above passing means something only if it would fail on a leak.
    leaks = ["sk_test_" + "A1b2C3d4E5f6G7h8", "rk_live_" + "Zz9Yy8Xx7Ww6", "rt_" + "q" * 40, "ac_" + "Q1" * 12,
             '{"access_token": 1}', "device code " + "aB3-_x" * 7 + "z"]
    assert [bool(secrets_in(leak)) for leak in leaks] == [True] * len(leaks)
    assert secrets_in("StripeSource(key=sk_test_m6cs****zzsy, api=http://127.0.0.1:PORT) cus_obTXBxZgx9bnVH") == []


def test_sanitizers_hide_what_changes_per_run_and_keep_what_the_sandbox_fixes():
    patterns = sanitizers()
    runs = [("To connect Stripe, open http://127.0.0.1:42025/relay/device?user_code=TJJZ-TCSD and confirm the "
             "code TJJZ-TCSD", "To connect Stripe, open http://127.0.0.1:40373/relay/device?user_code=GXSL-BSWW and "
             "confirm the code GXSL-BSWW"),
            ("StripeSource(key=sk_test_m6cs****zzsy, api=http://127.0.0.1:1)",
             "StripeSource(key=sk_test_wFea****NZ4L, api=http://127.0.0.1:2)"),
            ("stripe_publishable_key='pk_test_53dde3a03db2da7affc88089cbb2b35a'",
             "stripe_publishable_key='pk_test_8c6da6567056d95fbeeed2c7d450796f'"),
            ("Synced 10 table(s) of acct_1P48y3Tt3qdGal47 in 5.7 s, 83 requests: 7,380 added",
             "Synced 10 table(s) of acct_1P48y3Tt3qdGal47 in 4.9 s, 1,082 requests: 7,380 added"),
            ("<td>2026-11-30 00:46:45.072742+00:00</td>", "<td>2027-01-02 10:00:01.000001+00:00</td>"),
            ("this notebook's warehouse: /tmp/mbi-notebook-6ajveozv/warehouse.duckdb",
             "this notebook's warehouse: /var/folders/x/T/mbi-notebook-k2_9/warehouse.duckdb"),
            ("Warehouse() would use:    /root/.local/share/mbi-widgets/warehouse.duckdb",
             "Warehouse() would use:    /home/ana/.local/share/mbi-widgets/warehouse.duckdb")]
    for one, other in runs:
        assert sanitize(one, patterns) == sanitize(other, patterns), (one, other)
    # What the seed fixes must still be compared: ids, amounts, the sandbox's clock, row counts.
    kept = ["acct_1P48y3Tt3qdGal47 in 5.7 s, 83 requests: 7,380 added", "<td>24201.5</td>",
            "2026-10-31 17:27:02+00:00", "cus_obTXBxZgx9bnVH", "'customers': (273, 55)",
            "+1,692 ~0 -0, 1,692 rows"]
    for text in kept:
        changed = re.sub(r"\d", lambda digit: str((int(digit.group(0)) + 1) % 10), text, count=1)
        assert sanitize(text, patterns) != sanitize(changed, patterns), text


def test_strict_nbval_fails_a_changed_output_and_passes_a_new_port(tmp_path):
    # The project's own pytest configuration, on two one-cell notebooks whose committed output
    # differs from what the cell prints: by a port and a code (sanitized), and by a number (not).
    cell = 'print("open http://127.0.0.1:" + str(40000 + 1) + "/relay/device?user_code=BCDF-GHJK, 7,380 rows")'

    def notebook(name: str, committed: str) -> None:
        code = nbformat.v4.new_code_cell(cell, execution_count=1,
                                         outputs=[nbformat.v4.new_output("stream", name="stdout", text=committed)])
        made = nbformat.v4.new_notebook(cells=[code], metadata={"kernelspec": {
            "name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(made, tmp_path / name)

    notebook("new_port.ipynb", "open http://127.0.0.1:51234/relay/device?user_code=ZZZZ-XXXX, 7,380 rows\n")
    notebook("changed_count.ipynb", "open http://127.0.0.1:40001/relay/device?user_code=BCDF-GHJK, 7,381 rows\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
                          "-p", "no:cacheprovider", "-q", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    report = run.stdout + run.stderr
    assert re.search(r"FAILED .*changed_count\.ipynb::Cell 0", report), report[-3000:]
    assert "new_port.ipynb::Cell 0" not in report.split("short test summary")[-1], report[-3000:]
    assert re.search(r"\b1 failed, 1 passed\b", report), report[-3000:]
    assert "7,381 rows" in report and "mismatch 'stdout'" in report


def test_html_export_shows_the_panel_as_text():
    # Where no widget manager runs (no saved state, or no JavaScript), nbconvert shows the panel's
    # text/plain: its connections, not an empty box.
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(read("01_connect_stripe.ipynb"))
    blocks = [re.sub(r"<[^>]+>", "", block) for block in re.findall(r"<pre>(.*?)</pre>", body, flags=re.S)]
    panel = [block for block in blocks if block.startswith("Connections (widgets are not rendered here")]
    assert panel and panel[0].endswith("No data sources yet.")  # the panel cell, before connecting
    assert any("- Northwind Analytics · Stripe · Success · OAuth · data updated never" in block for block in panel)
    assert WIDGET_VIEW not in body and "jupyter-widgets" not in body


def test_html_export_of_a_widget_view_without_state_shows_the_text():
    # As nbclient writes an output of the panel when it saves no widget state: the view and its text.
    from nbconvert import HTMLExporter

    notebook = read("01_connect_stripe.ipynb")
    shown = next(output for output in outputs(notebook)
                 if output.get("data", {}).get("text/plain", "").startswith("Connections"))
    shown.data[WIDGET_VIEW] = {"model_id": "0f3c2a", "version_major": 2, "version_minor": 0}
    body, _ = HTMLExporter().from_notebook_node(notebook)
    assert "No data sources yet.</pre>" in body and '"model_id"' not in body


def stripe_button(panel) -> widgets.Button:
    """The Stripe tile of Add a Data Source, however the gallery lays it out."""
    def descendants(widget):
        yield widget
        for child in getattr(widget, "children", ()) or ():
            yield from descendants(child)

    (tile,) = [w for w in descendants(panel.widget) if isinstance(w, widgets.Button) and w.description == "Stripe"]
    return tile


def test_python_cells_of_notebook_01_add_no_second_row_after_a_click_through(monkeypatch, capsys):
    # A reader clicks through the panel, then runs the cells below it: the same account connected
    # again from Python must reuse the row, not add "Northwind Analytics (2)".
    monkeypatch.delenv("MBI_RELAY_URL", raising=False)
    cells = [cell.source for cell in read("01_connect_stripe.ipynb").cells if cell.cell_type == "code"]
    namespace: dict = {}
    exec(compile(cells[0], "01 cell 1", "exec"), namespace)
    panel = namespace["panel"]
    try:
        panel.add_button.click()
        stripe_button(panel).click()
        panel.connect_button.click()
        panel.sandbox.approve(panel.flow.state.user_code)
        panel.wait(60)
        (clicked,) = panel.registry.list()
        assert clicked.name == "Northwind Analytics" and clicked.status == "Success"

        # The walk-through on the panel, down to print(panel); the cells after it use no panel.
        walk_through = cells[1:next(i for i, source in enumerate(cells) if "print(panel)" in source) + 1]
        for number, source in enumerate(walk_through, start=2):
            exec(compile(source, f"01 code cell {number}", "exec"), namespace)

        assert [(c.id, c.name) for c in panel.registry.list()] == [(clicked.id, "Northwind Analytics")]
        printed = capsys.readouterr().out
        assert printed.count("- Northwind Analytics · Stripe · Success") == 1 and "(2)" not in printed
    finally:
        panel.close()


def test_notebook_02_shows_failed_payments_and_money_in_dollars():
    notebook = read("02_expected_stripe_tables.ipynb")
    headings = [i for i, cell in enumerate(notebook.cells) if cell.source.startswith("## Failed payments")]
    (start,) = headings
    following = [cell for cell in notebook.cells[start:] if cell.cell_type == "code" and cell.outputs]
    summary = following[0].outputs[0].data["text/plain"]
    assert "card_declined" in summary and "failed_payments" in summary
    counts = [int(n) for n in re.findall(r"^\S*(?:\s+\S+){1,2}\s+(\d+)\s+[\d.]+$", summary, flags=re.M)]
    assert counts and sum(counts) > 0, summary
    shown = "\n".join(texts(notebook))
    assert "($)" in shown and "MRR (USD)" not in shown and "Converting to PeriodArray" not in shown
