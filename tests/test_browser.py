"""The panel in a real browser: Debian's Chromium, driven by Playwright, against JupyterLab and Notebook 7.

One JupyterLab server and one browser serve the module. The first test clicks through MBI's two
steps in the panel of 01_connect_stripe.ipynb, approves in a second page, previews Charges, saves
the notebook and checks that it holds no secret. The next ones open a panel with two connections
(one needing re-authentication) and drive its views (Manage Data, Sync now, the Preview's tabs) at
1,400 and 900 px wide with the file browser open and in the dark theme, measuring what a person
would see: every button inside the visible area with its whole label, readable contrast, and
nothing printed to JupyterLab's log console or the browser console. The last one connects in
Jupyter Notebook 7. Screenshots land in test-artifacts/browser/ (the measurements beside them, in
layout.json and contrast.json); the README's pictures are in its readme/ folder, cropped to the
panel's output at 1,400 px with the file browser open.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
README_SHOTS = ARTIFACTS / "readme"  # copied by hand into docs/ when the panel's look changes
CHROMIUM = os.environ.get("MBI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SECRET_PATTERNS = (r"(sk|rk)_(test|live)_[A-Za-z0-9]{6,}", r'"access_token"', r'"refresh_token"', r"rt_[A-Za-z0-9]{20,}")
WAIT_MS = 90_000  # the machine is shared: be patient, never flaky
WIDE, NARROW, HEIGHT = 1400, 900, 1000
DARK, LIGHT = "JupyterLab Dark", "JupyterLab Light"
NORTHWIND, BRIGHTWAVE = "Northwind Analytics", "Brightwave Studio GmbH"

#: The views' notebook: a demo panel with both sandbox accounts connected, Brightwave's since revoked.
VIEWS_NOTEBOOK = "browser_views.ipynb"
VIEWS_CELL = '''\
from mbi_widgets import ConnectionsPanel
from mbi_widgets.auth import DeviceFlow, RelayClient

panel = ConnectionsPanel.demo(latency_ms=10)  # slow enough that Sync now's progress can be seen


def connect(account):
    """Connects a sandbox account as Connect with Stripe does, printing neither link nor code."""
    flow = DeviceFlow(panel.sandbox.relay_url)
    panel.sandbox.approve(flow.start().user_code, email=account.email)
    return panel.connections.connect_with_token(flow.wait(timeout=60).token).connection


northwind, brightwave = (connect(account) for account in panel.sandbox.accounts)
# Brightwave's admin disconnects the app at Stripe: its row turns Needs re-authentication.
RelayClient(panel.sandbox.relay_url).deauthorize(access_token=panel.registry.secret(brightwave.id),
                                                 stripe_user_id=brightwave.account_id)
panel.connections.test(brightwave.id)
panel.show_data_sources()
panel'''
#: Notebook 7's notebook: an empty demo panel, as in 01_connect_stripe.ipynb, to connect by clicking.
CONNECT_NOTEBOOK = "browser_connect.ipynb"
CONNECT_CELL = "from mbi_widgets import ConnectionsPanel\n\npanel = ConnectionsPanel.demo()\npanel"

# Every visible button under a root, scrolled into view vertically only (a horizontal scroll would hide
# the clipping this measures), with the part of the page that shows it: the viewport, the output area
# and every ancestor that clips its overflow.
BUTTONS_JS = """(root) => {
  const shown = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
  return [...root.querySelectorAll('button')].filter(shown).map((button) => {
    button.scrollIntoView({block: 'center', inline: 'nearest'});
    for (let a = button.parentElement; a; a = a.parentElement) { if (a.scrollLeft) a.scrollLeft = 0; }
    const r = button.getBoundingClientRect();
    const area = button.closest('.jp-OutputArea-output') || root;
    const a0 = area.getBoundingClientRect();
    let left = Math.max(0, a0.left), right = Math.min(window.innerWidth, a0.right);
    let top = Math.max(0, a0.top), bottom = Math.min(window.innerHeight, a0.bottom);
    // The body's overflow is the viewport's (already counted), not a clip of its own.
    for (let a = button.parentElement; a && a !== document.body; a = a.parentElement) {
      const s = getComputedStyle(a), box = a.getBoundingClientRect();
      if (s.display === 'inline' || s.display === 'contents') continue;  // overflow does not apply: no clipping
      if (s.overflowX !== 'visible') {
        left = Math.max(left, box.left + a.clientLeft); right = Math.min(right, box.left + a.clientLeft + a.clientWidth);
      }
      if (s.overflowY !== 'visible') {
        top = Math.max(top, box.top + a.clientTop); bottom = Math.min(bottom, box.top + a.clientTop + a.clientHeight);
      }
    }
    return {label: button.innerText.trim() || button.title || button.getAttribute('aria-label') || '(no label)',
            left: r.left, right: r.right, top: r.top, bottom: r.bottom,
            visible: {left, right, top, bottom}, scrollWidth: button.scrollWidth, clientWidth: button.clientWidth,
            action: !!button.closest('.mbi-actions'), sync: button.matches('.mbi-sync')};
  });
}"""

# The tab titles as shown: a label cut by an ellipsis shows only the characters that fit.
TAB_TITLES_JS = """(root) => [...root.querySelectorAll('.lm-TabBar-tab')].map((tab) => {
  const label = tab.querySelector('.lm-TabBar-tabLabel') || tab;
  const text = label.textContent;
  if (label.scrollWidth <= label.clientWidth || !label.firstChild) return {text, shown: text};
  const range = document.createRange(), limit = label.getBoundingClientRect().left + label.clientWidth;
  let fits = 0;
  for (; fits < text.length; fits++) {
    range.setStart(label.firstChild, 0); range.setEnd(label.firstChild, fits + 1);
    if (range.getBoundingClientRect().right > limit) break;
  }
  return {text, shown: text.slice(0, fits) + '…'};
})"""

# WCAG 2 contrast of every piece of visible text under a root, against its effective background: the
# backgrounds of the element and its ancestors, composited up to the first opaque one.
CONTRAST_JS = """(root) => {
  // Any CSS colour (rgb(), color(srgb ...), oklab(), ...) as [r, g, b, alpha], read back from a 1-pixel canvas.
  const pixel = document.createElement('canvas').getContext('2d', {willReadFrequently: true});
  const parse = (c) => {
    pixel.clearRect(0, 0, 1, 1);
    pixel.fillStyle = '#000';
    pixel.fillStyle = c;
    pixel.fillRect(0, 0, 1, 1);
    const [r, g, b, a] = pixel.getImageData(0, 0, 1, 1).data;
    return [r, g, b, a / 255];
  };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat([1]);
  const background = (el) => {
    const layers = [];
    for (let a = el; a; a = a.parentElement) {
      const c = parse(getComputedStyle(a).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    return layers.reverse().reduce((under, layer) => over(layer, under), [255, 255, 255, 1]);
  };
  const luminance = (c) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
  };
  const kind = (el) => el.closest('.mbi-badge') ? 'badge' : el.closest('a') ? 'link'
    : el.closest('[role=status], [role=alert], .mbi-banner') ? 'banner'
    : el.closest('h1, h2, h3, h4, h5, h6, th, .mbi-head, .lm-TabBar-tab') ? 'header' : 'text';
  const rgb = (c) => `rgb(${c.slice(0, 3).map(Math.round).join(', ')})`;
  const seen = new Set(), found = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const el = walker.currentNode.parentElement;
    if (!walker.currentNode.textContent.trim() || seen.has(el)) continue;
    seen.add(el);
    const s = getComputedStyle(el);
    if (!el.getClientRects().length || s.visibility === 'hidden' || el.closest('style, script')) continue;
    if (el.closest('button:disabled, input:disabled, .mod-disabled')) continue;  // WCAG exempts inactive controls
    const bg = background(el), fg = over(parse(s.color), bg);
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((x, y) => y - x);
    const size = parseFloat(s.fontSize), bold = parseInt(s.fontWeight, 10) >= 700;
    found.push({kind: kind(el), text: walker.currentNode.textContent.trim().slice(0, 60),
                ratio: Math.round(((hi + 0.05) / (lo + 0.05)) * 100) / 100,
                large: size >= 24 || (size >= 18.66 && bold), color: rgb(fg), background: rgb(bg),
                css: s.color});
  }
  return found;
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_notebook(path: Path, title: str, code: str) -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(title), nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(notebook, path)


def _jupyter_home(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """An isolated Jupyter configuration (no news prompt, widget state saved) and a root with the notebooks."""
    home = tmp_path_factory.mktemp(name)
    notebooks = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    _write_notebook(notebooks / VIEWS_NOTEBOOK, "# Browser test: the panel's views", VIEWS_CELL)
    _write_notebook(notebooks / CONNECT_NOTEBOOK, "# Browser test: connect Stripe", CONNECT_CELL)
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # Save widget state into the .ipynb, so the secret check below covers it too.
    widget_settings = home / "config" / "lab" / "user-settings" / "@jupyter-widgets" / "jupyterlab-manager"
    widget_settings.mkdir(parents=True)
    (widget_settings / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))
    return home, notebooks


def _serve(app: str, home: Path, notebooks: Path, expose: str) -> Iterator[dict[str, Any]]:
    """Runs `jupyter lab` or `jupyter notebook` on a free loopback port with a random token, until closed."""
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
    port, token = _free_port(), secrets.token_hex(12)
    command = [sys.executable, "-m", "jupyter", app, "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}", "--allow-root",
               "--ServerApp.port_retries=0", f"--{expose}.expose_app_in_browser=True"]
    log_path = home / f"jupyter-{app}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{base}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"jupyter {app} did not start; log: {log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        try:
            yield {"base": base, "token": token, "notebooks": notebooks}
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    home, notebooks = _jupyter_home(tmp_path_factory, "jupyterlab")
    yield from _serve("lab", home, notebooks, "LabApp")


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory):
    home, notebooks = _jupyter_home(tmp_path_factory, "notebook7")
    yield from _serve("notebook", home, notebooks, "JupyterNotebookApp")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run `make test` (it installs Debian's chromium as root) "
                    "or install it with `apt-get install chromium`.")
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    README_SHOTS.mkdir(parents=True)
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


# --- what a person sees -----------------------------------------------------------------------------

_steps = iter(range(1, 1000))


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{next(_steps):02d}-{name}.png"), full_page=False)


def readme_shot(page, output, name: str) -> None:
    """The panel's output area alone, for the README (docs/<name>.png); the window grows for a tall one."""
    width = page.viewport_size["width"]
    page.mouse.move(0, 0)  # no hover tooltip in the picture
    height = output.evaluate("(e) => e.getBoundingClientRect().height")
    page.set_viewport_size({"width": width, "height": max(HEIGHT, int(height) + 300)})
    try:
        output.screenshot(path=str(README_SHOTS / f"{name}.png"))
    finally:
        page.set_viewport_size({"width": width, "height": HEIGHT})


def record(name: str, where: str, value: Any) -> None:
    """Keeps a measurement beside the screenshots (test-artifacts/browser/<name>.json)."""
    path = ARTIFACTS / f"{name}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[where] = value
    path.write_text(json.dumps(saved, indent=1))


@dataclass
class Console:
    """The browser console of a page: what the widget manager (or anything else) logged."""

    messages: list[tuple[str, str]] = field(default_factory=list)

    def listen(self, page) -> "Console":
        page.on("console", lambda message: self.messages.append((message.type, message.text)))
        page.on("pageerror", lambda error: self.messages.append(("pageerror", str(error))))
        return self

    def mark(self) -> int:
        return len(self.messages)

    def complaints(self, since: int) -> list[tuple[str, str]]:
        return [(kind, text[:300]) for kind, text in self.messages[since:]
                if kind in ("error", "warning", "pageerror")]


def kernel_ready(page) -> None:
    """Waits until the current notebook's kernel is connected and idle (JupyterLab and Notebook 7)."""
    page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                           " const s = w && w.sessionContext;"
                           " return !!(s && s.isReady && s.session && s.session.kernel"
                           " && s.session.kernel.status === 'idle'); }", timeout=WAIT_MS)


def command(page, name: str, args: dict | None = None) -> None:
    page.evaluate("([name, args]) => window.jupyterapp.commands.execute(name, args)", [name, args or {}])


def show_file_browser(page) -> None:
    command(page, "filebrowser:activate")
    page.locator(".jp-FileBrowser").first.wait_for(state="visible")


def set_theme(page, theme: str) -> None:
    command(page, "apputils:change-theme", {"theme": theme})
    page.wait_for_function("(theme) => document.body.dataset.jpThemeName === theme && "
                           "document.body.dataset.jpThemeLight === String(theme !== 'JupyterLab Dark')", arg=theme)


def log_console_entries(page) -> list[str]:
    """What JupyterLab's log console shows for the current notebook (output the kernel sent outside a
    cell, such as a click handler's print, logged at its default level); the console is closed again."""
    command(page, "logconsole:open", {"insertMode": "split-bottom"})
    console = page.locator(".jp-LogConsolePanel").first
    page.wait_for_function("() => { const panel = document.querySelector('.jp-LogConsolePanel');"
                           " const empty = panel && panel.querySelector('.jp-LogConsoleListPlaceholder');"
                           " return !!(panel && (panel.querySelector('.jp-OutputArea-child')"
                           " || (empty && empty.textContent === 'No log messages.'))); }")
    entries = console.locator(".jp-OutputArea-child").all_inner_texts()
    page.evaluate("() => ['main', 'down'].flatMap((area) => Array.from(window.jupyterapp.shell.widgets(area)))"
                  ".filter((w) => w.hasClass('jp-LogConsole')).forEach((w) => w.close())")
    console.wait_for(state="detached")
    return entries


def quiet_problems(page, console: Console, since: int, where: str) -> list[str]:
    """What the clicks since `since` left in the browser console and JupyterLab's log console (every
    console message is kept in console.json)."""
    record("console", where, console.messages[since:])
    problems = [f"browser console {kind}: {text}" for kind, text in console.complaints(since)]
    problems += [f"log console: {entry.strip()[:300]}" for entry in log_console_entries(page)]
    return problems


def approve_in_browser(context, link, code: str) -> str:
    """Approves the device code as the admin would in a new tab; returns the password typed (to look for)."""
    from playwright.sync_api import expect

    approval = context.new_page()
    approval.goto(link.get_attribute("href"))
    expect(approval.locator(".code")).to_have_text(code)
    shot(approval, "relay-confirm-code")
    approval.get_by_role("button", name="The codes match: continue").click()
    sign_in = approval.get_by_role("link", name="Sign in with Stripe to Continue")
    expect(sign_in).to_be_visible()  # the next page has loaded: a screenshot mid-navigation fails
    shot(approval, "relay-access-request")
    sign_in.click()
    expect(approval.get_by_role("heading", name="Sign in to your account")).to_be_visible()
    hint = approval.locator(".hint li").first
    email, password = hint.locator("code").nth(0).inner_text(), hint.locator("code").nth(1).inner_text()
    approval.fill("#email", email)
    approval.fill("#password", password)
    shot(approval, "stripe-sign-in")
    approval.get_by_role("button", name="Sign in to your account").click()
    expect(approval.locator("h1")).to_have_text("Connection successful!")
    shot(approval, "relay-connection-successful")
    approval.close()
    return password


def click_through_to_waiting(page, panel) -> tuple[Any, str]:
    """Add a Data Source › Stripe › Connect with Stripe; returns the link and the code shown."""
    from playwright.sync_api import expect

    panel.locator("button.jupyter-button", has_text="Add a Data Source").click()
    panel.locator("button.jupyter-button", has_text="Stripe").first.click()
    expect(panel).to_contain_text("read-only access")
    shot(page, "stripe-authorization")
    panel.locator("button.jupyter-button", has_text="Connect with Stripe").click()
    link = panel.locator("a[href*='/relay/device']").first
    expect(link).to_be_visible()
    code = panel.locator(".mbi-code").inner_text().strip()
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", code), code
    assert link.get_attribute("target") == "_blank"
    return link, code


# --- layout and contrast ----------------------------------------------------------------------------

def clipping(page, scope, where: str) -> list[str]:
    """Each visible button under `scope` that is cut off (outside the visible part of the output area or
    the window) or whose label is truncated, with the numbers; the measurements go to layout.json."""
    found = scope.evaluate(BUTTONS_JS)
    record("layout", where, found)
    assert found, f"{where}: no button is visible"
    problems = []
    for button in found:
        box, seen = button, button["visible"]
        if box["left"] < seen["left"] - 1 or box["right"] > seen["right"] + 1:
            problems.append(f"{where}: '{button['label']}' spans x {box['left']:.0f}-{box['right']:.0f} px, but only "
                            f"x {seen['left']:.0f}-{seen['right']:.0f} is visible")
        elif box["top"] < seen["top"] - 1 or box["bottom"] > seen["bottom"] + 1:
            problems.append(f"{where}: '{button['label']}' spans y {box['top']:.0f}-{box['bottom']:.0f} px, but only "
                            f"y {seen['top']:.0f}-{seen['bottom']:.0f} is visible")
        if button["scrollWidth"] > button["clientWidth"]:
            problems.append(f"{where}: the label '{button['label']}' is truncated (needs {button['scrollWidth']} px, "
                            f"has {button['clientWidth']})")
    return problems


def sources_problems(page, panel, where: str) -> list[str]:
    """Data Sources: every row's actions box (`.mbi-actions`) holds Preview, Manage Data, Re-authenticate and
    Delete, and every button of the view is whole and in sight."""
    sources = panel.locator(".mbi-sources")
    if sources.count() == 0:
        return [f"{where}: the Data Sources table has no .mbi-sources class"] + clipping(page, panel, where)
    problems = clipping(page, sources.first, where)
    actions = sources.first.locator(".mbi-actions")
    labels = [[text.strip() for text in box.locator("button").all_inner_texts()] for box in actions.all()]
    record("layout", f"{where} actions", labels)
    if len(labels) != 2:
        problems.append(f"{where}: {len(labels)} .mbi-actions boxes, expected one per row (2)")
    for row in labels:
        if not {"Preview", "Manage Data", "Re-authenticate", "Delete"} <= set(row):
            problems.append(f"{where}: a row's actions are {row}")
    return problems


def warehouse_problems(page, panel, where: str) -> list[str]:
    """The Data Warehouse Manager (`.mbi-warehouse`): Sync now (`.mbi-sync`) and every other button in sight."""
    manager = panel.locator(".mbi-warehouse")
    problems = [] if manager.count() else [f"{where}: the manager has no .mbi-warehouse class"]
    scope = manager.first if manager.count() else panel
    found_sync = scope.locator("button.mbi-sync").count()
    if found_sync != 1:
        problems.append(f"{where}: {found_sync} Sync now buttons with the .mbi-sync class, expected 1")
    return problems + clipping(page, scope, where)


def tab_title_problems(panel, where: str) -> list[str]:
    """The Preview's tab titles, as shown, can be told apart (a cut title is no use if two look alike)."""
    preview = panel.locator(".mbi-preview")
    scope = preview.first if preview.count() else panel
    titles = scope.evaluate(TAB_TITLES_JS)
    record("layout", f"{where} tab titles", titles)
    shown = [title["shown"] for title in titles]
    alike = sorted({text for text in shown if shown.count(text) > 1})
    return [f"{where}: tabs look alike: {alike} (titles {[t['text'] for t in titles]})"] if alike else []


def contrast_problems(scope, where: str) -> list[str]:
    """Text below WCAG AA against its effective background: 4.5 for body text, 3 for large text."""
    found = scope.evaluate(CONTRAST_JS)
    record("contrast", where, found)
    assert found, f"{where}: no text found"
    weakest: dict[str, dict] = {}
    for item in found:
        if item["ratio"] < weakest.get(item["kind"], {"ratio": 99})["ratio"]:
            weakest[item["kind"]] = item
    record("contrast", f"{where} weakest", weakest)
    return [f"{where}: {item['kind']} '{item['text']}' has contrast {item['ratio']} ({item['color']} on "
            f"{item['background']}), needs {3 if item['large'] else 4.5}"
            for item in found if item["ratio"] < (3 if item["large"] else 4.5)]


def listing(problems: list[str]) -> str:
    """The problems found, each once: the same text measured in several views is one finding."""
    views: dict[str, list[str]] = {}
    for problem in problems:
        where, _, what = problem.partition(": ")
        views.setdefault(what, []).append(where)
    return "\n".join(f"{wheres[0]}: {what}" + (f" (also {'; '.join(wheres[1:])})" if len(wheres) > 1 else "")
                     for what, wheres in views.items())


# --- JupyterLab: connecting, as in the onboarding notebook --------------------------------------------

def test_connect_stripe_and_preview_charges_in_jupyterlab(jupyterlab, browser):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT})
    context.set_default_timeout(WAIT_MS)
    lab = context.new_page()
    console = Console().listen(lab)
    lab.goto(f"{jupyterlab['base']}/lab/workspaces/connect/tree/01_connect_stripe.ipynb?token={jupyterlab['token']}")
    kernel_ready(lab)
    show_file_browser(lab)
    shot(lab, "notebook-open")

    # Run only the cell that displays the panel (the first code cell).
    lab.locator(".jp-Notebook .jp-CodeCell").first.locator(".jp-InputArea-editor").click()
    lab.keyboard.press("Shift+Enter")
    add = lab.locator("button.jupyter-button", has_text="Add a Data Source")
    expect(add).to_be_visible()
    panel = lab.locator(".mbi-panel").first
    output = lab.locator(".jp-OutputArea-output", has=panel).first
    expect(panel).to_contain_text("No data sources yet")
    shot(lab, "data-sources-empty")
    clicks = console.mark()

    link, code = click_through_to_waiting(lab, panel)
    shot(lab, "waiting-for-approval")
    readme_shot(lab, output, "panel-waiting")
    password = approve_in_browser(context, link, code)

    expect(panel).to_contain_text("Connection successful!")
    expect(panel.locator(".mbi-badge", has_text="Success")).to_be_visible()
    expect(panel).to_contain_text(NORTHWIND)
    shot(lab, "connection-successful")

    lab.locator(".lm-TabBar-tab, .p-TabBar-tab", has_text="Charges").first.click()
    rows = panel.locator("table.mbi-frame:visible tbody tr")
    expect(rows.first).to_be_visible()
    expect(panel).to_contain_text(f"panel.source('{NORTHWIND}').table('charges')")
    expect(panel).to_contain_text("ch_")
    shot(lab, "preview-charges")
    noise = quiet_problems(lab, console, clicks, "connecting in JupyterLab")

    command(lab, "docmanager:save")
    expect(lab.locator(".jp-mod-dirty")).to_have_count(0)
    context.close()

    saved = (jupyterlab["notebooks"] / "01_connect_stripe.ipynb").read_text()
    assert "application/vnd.jupyter.widget-view+json" in saved  # the panel's output was saved...
    assert "application/vnd.jupyter.widget-state+json" in saved  # ...and so was the widget state
    assert NORTHWIND in saved
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, saved), f"the saved notebook contains a secret matching {pattern}"
    assert password not in saved
    assert noise == [], "clicking through the panel logged:\n" + listing(noise)


# --- JupyterLab: the views at two widths and in the dark theme ------------------------------------------

@dataclass
class Lab:
    """The views' notebook open in JupyterLab, its panel displayed."""

    page: Any
    panel: Any
    output: Any
    console: Console

    def resize(self, width: int) -> None:
        self.page.set_viewport_size({"width": width, "height": HEIGHT})
        show_file_browser(self.page)

    def row_button(self, text: str, name: str):
        """A Data Sources row's action button, by its label and the row's connection."""
        return self.panel.locator("button.jupyter-button", has_text=text).nth(self.row_index(name))

    def data_sources(self) -> None:
        from playwright.sync_api import expect

        back = self.panel.locator("button.jupyter-button", has_text="Back to Data Sources")
        if back.count():
            back.first.click()
        expect(self.panel.locator("button.jupyter-button", has_text="Manage Data")).to_have_count(2)

    def manager(self, name: str = NORTHWIND) -> None:
        from playwright.sync_api import expect

        self.data_sources()
        self.row_button("Manage Data", name).click()
        expect(self.panel).to_contain_text(f"Data Warehouse Manager · {name}")

    def preview(self, name: str = NORTHWIND) -> None:
        from playwright.sync_api import expect

        self.data_sources()
        self.row_button("Preview", name).click()
        expect(self.panel).to_contain_text(f"Preview · {name}")

    def row_index(self, name: str) -> int:
        return [NORTHWIND, BRIGHTWAVE].index(name)  # the order they were connected in

    def tab(self, title: str) -> None:
        from playwright.sync_api import expect

        self.panel.locator(".lm-TabBar-tab", has_text=title).first.click()
        expect(self.panel.locator("table.mbi-frame:visible tbody tr").first).to_be_visible()


@pytest.fixture(scope="module")
def views(jupyterlab, browser):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    console = Console().listen(page)
    page.goto(f"{jupyterlab['base']}/lab/workspaces/views/tree/{VIEWS_NOTEBOOK}?token={jupyterlab['token']}")
    kernel_ready(page)
    command(page, "notebook:run-all-cells")
    panel = page.locator(".mbi-panel").first
    expect(panel.locator("button.jupyter-button", has_text="Manage Data")).to_have_count(2)
    output = page.locator(".jp-OutputArea-output", has=panel).first
    yield Lab(page, panel, output, console)
    context.close()


def test_views_at_1400_px_with_the_file_browser_open(views):
    """Manage Data opens the manager, Sync now shows progress then the report, the Preview's tabs load; every
    button stays whole and in sight. Also takes the README's pictures."""
    from playwright.sync_api import expect

    page, panel = views.page, views.panel
    views.resize(WIDE)
    set_theme(page, LIGHT)
    clicks = views.console.mark()
    views.data_sources()
    expect(panel.locator(".mbi-badge", has_text="Needs re-authentication")).to_be_visible()
    problems = sources_problems(page, panel, "1400 px, Data Sources")
    shot(page, "1400-data-sources")
    readme_shot(page, views.output, "panel-data-sources")

    views.manager()
    problems += warehouse_problems(page, panel, "1400 px, Data Warehouse Manager")
    sync = panel.locator("button.jupyter-button", has_text="Sync now").first
    sync.click()
    expect(sync).to_be_disabled()  # busy: a second click cannot start a second sync
    expect(panel.locator(".widget-hprogress:visible").first).to_be_visible()  # a bar per table being synced
    shot(page, "1400-sync-in-progress")
    expect(sync).to_be_enabled()
    summary = panel.locator("table.mbi-summary")
    expect(summary).to_be_visible()
    expect(summary.locator("td", has_text=re.compile(r"^charges$"))).to_have_count(1)
    assert panel.locator(".progress-bar-success:visible").count() >= 5, "the synced tables' bars are not complete"
    problems += warehouse_problems(page, panel, "1400 px, Data Warehouse Manager after Sync now")
    shot(page, "1400-sync-report")
    readme_shot(page, views.output, "panel-warehouse")

    views.preview()
    views.tab("Charges")
    expect(panel).to_contain_text("ch_")
    views.tab("Subscriptions")
    expect(panel).to_contain_text("sub_")
    problems += tab_title_problems(panel, "1400 px, Preview")
    problems += clipping(page, panel, "1400 px, Preview")
    shot(page, "1400-preview-subscriptions")
    views.tab("Charges")
    readme_shot(page, views.output, "panel-preview")

    problems += quiet_problems(page, views.console, clicks, "1400 px")
    assert problems == [], listing(problems)


def test_views_at_900_px_with_the_file_browser_open(views):
    """At 900 px with the file browser open, the Data Sources actions, Sync now and the tabs all stay usable."""
    page, panel = views.page, views.panel
    views.resize(NARROW)
    set_theme(page, LIGHT)
    clicks = views.console.mark()
    views.data_sources()
    problems = sources_problems(page, panel, "900 px, Data Sources")
    shot(page, "900-data-sources")
    views.manager(BRIGHTWAVE)
    problems += warehouse_problems(page, panel, "900 px, Data Warehouse Manager")
    shot(page, "900-data-warehouse-manager")
    views.preview()
    views.tab("Charges")
    problems += tab_title_problems(panel, "900 px, Preview")
    problems += clipping(page, panel, "900 px, Preview")
    shot(page, "900-preview-charges")
    problems += quiet_problems(page, views.console, clicks, "900 px")
    views.resize(WIDE)
    assert problems == [], listing(problems)


def test_dark_theme_has_readable_contrast(views):
    """In JupyterLab Dark, the text of every view (headers, badges, links, banners) reads at WCAG AA."""
    from playwright.sync_api import expect

    page, panel = views.page, views.panel
    views.resize(WIDE)
    set_theme(page, DARK)
    try:
        clicks = views.console.mark()
        views.data_sources()
        problems = contrast_problems(panel, "dark, Data Sources")
        shot(page, "dark-data-sources")

        views.manager()
        sync = panel.locator("button.jupyter-button", has_text="Sync now").first
        sync.click()
        expect(panel.locator("table.mbi-summary")).to_be_visible()
        expect(sync).to_be_enabled()
        problems += contrast_problems(panel, "dark, Data Warehouse Manager after Sync now")
        shot(page, "dark-sync-report")

        views.preview()
        views.tab("Charges")
        problems += contrast_problems(panel, "dark, Preview")
        shot(page, "dark-preview-charges")

        views.data_sources()
        views.row_button("Delete", BRIGHTWAVE).click()
        panel.locator("button.jupyter-button", has_text="Yes, delete").click()
        expect(panel).to_contain_text(f"{BRIGHTWAVE} was deleted.")
        problems += contrast_problems(panel, "dark, banner")
        shot(page, "dark-banner")

        click_through_to_waiting(page, panel)
        problems += contrast_problems(panel, "dark, waiting for approval")
        shot(page, "dark-waiting-for-approval")
        panel.locator("button.jupyter-button", has_text="Cancel").click()
        problems += quiet_problems(page, views.console, clicks, "dark theme")
    finally:
        set_theme(page, LIGHT)
    assert problems == [], listing(problems)


# --- Jupyter Notebook 7 ---------------------------------------------------------------------------------

def test_the_panel_opens_and_connects_in_jupyter_notebook_7(notebook7, browser):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": WIDE, "height": HEIGHT})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    console = Console().listen(page)
    page.goto(f"{notebook7['base']}/notebooks/{CONNECT_NOTEBOOK}?token={notebook7['token']}")
    kernel_ready(page)
    command(page, "notebook:run-all-cells")
    panel = page.locator(".mbi-panel").first
    expect(panel).to_contain_text("No data sources yet")
    shot(page, "notebook7-data-sources-empty")
    clicks = console.mark()

    link, code = click_through_to_waiting(page, panel)
    shot(page, "notebook7-waiting-for-approval")
    approve_in_browser(context, link, code)
    expect(panel).to_contain_text("Connection successful!")
    expect(panel.locator(".mbi-badge", has_text="Success")).to_be_visible()
    expect(panel).to_contain_text(NORTHWIND)
    shot(page, "notebook7-connection-successful")
    complaints = console.complaints(clicks)
    context.close()
    assert complaints == [], f"clicking through the panel in Notebook 7 logged {complaints}"
