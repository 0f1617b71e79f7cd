"""How the panel words times, durations and statuses (pure functions, tested without widgets)."""
from __future__ import annotations

import html
import math
from datetime import datetime, timezone

#: The tone of each connection status's badge, as on MBI's Data Sources table. A tone is a CSS class
#: (`mbi-tone-error`) whose colours come from the front-end's theme (see `ui.frame.STYLE`).
BADGES = {
    "Success": "success",
    "Pending": "warning",
    "Needs re-authentication": "error",
    "Error": "error",
}
TONES = ("success", "warning", "error", "info", "neutral")


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
    """A status badge in its tone's colours; the message (server-provided) is escaped into the tooltip."""
    title = f' title="{html.escape(message)}"' if message else ""
    return f'<span class="mbi-badge mbi-tone-{BADGES.get(status, "neutral")}"{title}>{html.escape(status)}</span>'


def toned(text: str, tone: str, *, tag: str = "span") -> str:
    """`text`, escaped, in a tone's text colour (errors, warnings and notes inside a view)."""
    if tone not in TONES:
        raise ValueError(f"unknown tone {tone!r}: one of {', '.join(TONES)}")
    return f'<{tag} class="mbi-text mbi-tone-{tone}">{html.escape(text)}</{tag}>'


def muted(markup: str, *, tag: str = "span") -> str:
    """Secondary text (already escaped markup) in the theme's quieter colour."""
    return f'<{tag} class="mbi-muted">{markup}</{tag}>'


def time_left(seconds: float) -> str:
    """'45 s', '4 min', '1 h 05 min': how long until something (an update), rounded up."""
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    if minutes <= 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def period(seconds: float) -> str:
    """'every 30 seconds', 'every minute', 'every 15 minutes', 'every hour', 'every 6 hours', 'every day'."""
    for size, one, many in ((86_400, "day", "days"), (3_600, "hour", "hours"), (60, "minute", "minutes")):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"every {one}" if count == 1 else f"every {count} {many}"
    return "every second" if seconds == 1 else f"every {seconds:g} seconds"


def timestamp(moment: datetime | None) -> str:
    """'Nov 01, 2026 14:03 UTC' (data points carry Stripe's clock, which may run ahead of this one)."""
    if moment is None:
        return "—"
    return moment.astimezone(timezone.utc).strftime("%b %d, %Y %H:%M UTC")


def count(value: int | None) -> str:
    return "—" if value is None else f"{int(value):,}"
