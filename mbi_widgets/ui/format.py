"""How the panel words times, durations and statuses (pure functions, tested without widgets)."""
from __future__ import annotations

import html
from datetime import datetime, timezone

#: Badge colours per connection status, as on MBI's Data Sources table.
BADGES = {
    "Success": ("#e6f4ea", "#1e7e34"),
    "Pending": ("#fff4e5", "#a15c00"),
    "Needs re-authentication": ("#fdecea", "#b42318"),
    "Error": ("#fdecea", "#b42318"),
}


def relative_time(moment: datetime | None, now: datetime | None = None) -> str:
    """'just now', 'a minute ago', '2 hours ago', 'yesterday', '3 days ago', or a date."""
    if moment is None:
        return "never"
    now = now or datetime.now(timezone.utc)
    seconds = (now - moment).total_seconds()
    if seconds < 45:
        return "just now"
    minutes = seconds / 60
    if minutes < 1.5:
        return "a minute ago"
    if minutes < 45:
        return f"{round(minutes)} minutes ago"
    hours = minutes / 60
    if hours < 1.5:
        return "an hour ago"
    if hours < 22:
        return f"{round(hours)} hours ago"
    days = hours / 24
    if days < 1.5:
        return "yesterday"
    if days < 26:
        return f"{round(days)} days ago"
    return moment.strftime("%b %d, %Y")


def duration(seconds: float | None) -> str:
    """'less than a second', 'a second', '12 seconds', 'a minute', '3 minutes'."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return "less than a second"
    if seconds < 1.5:
        return "a second"
    if seconds < 45:
        return f"{round(seconds)} seconds"
    if seconds < 90:
        return "a minute"
    return f"{round(seconds / 60)} minutes"


def countdown(seconds_left: float) -> str:
    seconds_left = max(0, int(seconds_left))
    return f"{seconds_left // 60}:{seconds_left % 60:02d}"


def badge(status: str, message: str | None = None) -> str:
    """A coloured status badge; the message (server-provided) is escaped into the tooltip."""
    background, colour = BADGES.get(status, ("#eef2f6", "#374151"))
    title = f' title="{html.escape(message)}"' if message else ""
    return (f'<span class="mbi-badge"{title} style="background:{background};color:{colour};padding:2px 10px;'
            f'border-radius:10px;font-weight:600;font-size:12px;white-space:nowrap">{html.escape(status)}</span>')
