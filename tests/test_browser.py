"""The whole flow in a real browser: Debian's Chromium, driven by Playwright, against JupyterLab.

Clicks through MBI's two steps in the panel of 01_connect_stripe.ipynb, approves in a second
page, previews Charges, saves the notebook and checks that it holds no secret. Screenshots of
each step land in test-artifacts/browser/ (reported at the end of `make test`).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("MBI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SECRET_PATTERNS = (r"(sk|rk)_(test|live)_[A-Za-z0-9]{6,}", r'"access_token"', r'"refresh_token"', r"rt_[A-Za-z0-9]{20,}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run `make test` (it installs Debian's chromium as root) "
                    "or install it with `apt-get install chromium`.")
    home = tmp_path_factory.mktemp("jupyter")
    notebooks = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # Save widget state into the .ipynb, so the secret check below covers it too.
    widget_settings = home / "config" / "lab" / "user-settings" / "@jupyter-widgets" / "jupyterlab-manager"
    widget_settings.mkdir(parents=True)
    (widget_settings / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
    port, token = _free_port(), secrets.token_hex(12)
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}", "--allow-root",
               "--ServerApp.port_retries=0", "--LabApp.expose_app_in_browser=True"]
    log = open(home / "jupyterlab.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"JupyterLab did not start; log: {(home / 'jupyterlab.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield {"base": base, "token": token, "notebooks": notebooks}
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_connect_stripe_and_preview_charges_in_jupyterlab(jupyterlab):
    from playwright.sync_api import expect, sync_playwright

    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    step = iter(range(1, 100))

    def shot(page, name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{next(step):02d}-{name}.png"), full_page=False)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 1000})
        context.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)  # the machine is shared: be patient, never flaky
        lab = context.new_page()
        lab.goto(f"{jupyterlab['base']}/lab/tree/01_connect_stripe.ipynb?token={jupyterlab['token']}")
        expect(lab.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=90_000)
        lab.evaluate("window.jupyterapp.commands.execute('application:toggle-left-area')")
        shot(lab, "notebook-open")

        # Run only the cell that displays the panel (the second cell; the first is markdown).
        lab.locator(".jp-Notebook .jp-CodeCell").first.locator(".jp-InputArea-editor").click()
        lab.keyboard.press("Shift+Enter")
        add = lab.locator("button.jupyter-button", has_text="Add a Data Source")
        expect(add).to_be_visible(timeout=90_000)
        panel = lab.locator(".mbi-panel").first
        expect(panel).to_contain_text("No data sources yet")
        shot(lab, "data-sources-empty")

        add.click()
        lab.locator("button.jupyter-button", has_text="Stripe").first.click()
        expect(panel).to_contain_text("read-only access")
        shot(lab, "stripe-authorization")
        lab.locator("button.jupyter-button", has_text="Connect with Stripe").click()
        link = panel.locator("a[href*='/relay/device']").first
        expect(link).to_be_visible()
        code = lab.locator(".mbi-code").inner_text().strip()
        assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", code), code
        assert link.get_attribute("target") == "_blank"
        shot(lab, "waiting-for-approval")

        approval = context.new_page()
        approval.goto(link.get_attribute("href"))
        expect(approval.locator(".code")).to_have_text(code)
        shot(approval, "relay-confirm-code")
        approval.get_by_role("button", name="The codes match: continue").click()
        shot(approval, "relay-access-request")
        approval.get_by_role("link", name="Sign in with Stripe to Continue").click()
        expect(approval.get_by_role("heading", name="Sign in to your account")).to_be_visible()
        hint = approval.locator(".hint li").first
        email, password = hint.locator("code").nth(0).inner_text(), hint.locator("code").nth(1).inner_text()
        approval.fill("#email", email)
        approval.fill("#password", password)
        shot(approval, "stripe-sign-in")
        approval.get_by_role("button", name="Sign in to your account").click()
        expect(approval.locator("h1")).to_have_text("Connection successful!")
        shot(approval, "relay-connection-successful")

        output = panel
        expect(output).to_contain_text("Connection successful!")
        expect(output.locator(".mbi-badge", has_text="Success")).to_be_visible()
        expect(output).to_contain_text("Northwind Analytics")
        shot(lab, "connection-successful")

        lab.locator(".lm-TabBar-tab, .p-TabBar-tab", has_text="Charges").first.click()
        rows = output.locator("table.mbi-frame:visible tbody tr")
        expect(rows.first).to_be_visible()
        expect(output).to_contain_text("panel.source('Northwind Analytics').table('charges')")
        expect(output).to_contain_text("ch_")
        shot(lab, "preview-charges")

        lab.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
        expect(lab.locator(".jp-mod-dirty")).to_have_count(0)
        browser.close()

    saved = (jupyterlab["notebooks"] / "01_connect_stripe.ipynb").read_text()
    assert "application/vnd.jupyter.widget-view+json" in saved  # the panel's output was saved...
    assert "application/vnd.jupyter.widget-state+json" in saved  # ...and so was the widget state
    assert "Northwind Analytics" in saved
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, saved), f"the saved notebook contains a secret matching {pattern}"
    assert password not in saved
