"""The device-link views: the link and code with a countdown while the admin approves, and the retry view
when the authorization was denied, expired or failed."""
from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Callable

import ipywidgets as widgets

from mbi_widgets.auth import Waiting
from mbi_widgets.ui.format import countdown, muted
from mbi_widgets.ui.frame import button, wrapping

if TYPE_CHECKING:  # pragma: no cover
    from mbi_widgets.ui.panel import ConnectionsPanel


class WaitingView:
    """Open the link, check the code; the countdown ticks on `ticker` until the flow leaves `waiting`."""

    def __init__(self, panel: "ConnectionsPanel", waiting: Waiting, *, still_waiting: Callable[[], bool],
                 heading: str = "Allow access in your browser") -> None:
        link = html.escape(waiting.link)
        self.code_label = widgets.HTML(f"<div class='mbi-code'>{html.escape(waiting.user_code)}</div>")
        self.countdown = widgets.HTML()
        cancel = button("Cancel", icon="times")
        cancel.on_click(lambda _: panel._cancel_flow())
        self.children = [
            widgets.HTML(f"<h3 style='margin:0 0 8px'>{html.escape(heading)}</h3>"
                         f"<p>1. Open <a href='{link}' target='_blank' rel='noopener' class='mbi-link' "
                         f"style='font-weight:600'>{link}</a> "
                         "(it opens in a new tab).</p><p>2. Check that it shows this code, then sign in with "
                         "Stripe:</p>"),
            self.code_label, self.countdown,
            widgets.HTML(muted("This panel notices the approval by itself; the notebook stays usable meanwhile.",
                               tag="p")), cancel]
        self.ticker = threading.Thread(target=self._tick, args=(waiting, still_waiting), name="mbi-countdown",
                                       daemon=True)
        self.ticker.start()

    def _tick(self, waiting: Waiting, still_waiting: Callable[[], bool]) -> None:
        while still_waiting():
            self.countdown.value = f"Code expires in {countdown(waiting.deadline - time.monotonic())}"
            time.sleep(1)


class RetryView:
    """Try again (the same authorization: new, or re-authenticating) or go back to Data Sources."""

    def __init__(self, panel: "ConnectionsPanel") -> None:
        retry = button("Try again", button_style="primary", icon="redo")
        retry.on_click(lambda _: panel.show_authorization(reauth_id=panel._reauth_id))
        back = button("Back to Data Sources", icon="arrow-left")
        back.on_click(lambda _: (panel._set_banner(), panel._leave_authorization()))
        self.children = [wrapping([retry, back])]
