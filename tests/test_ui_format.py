"""The panel's wording of times, durations, countdowns and status badges (pure functions, no widgets)."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from mbi_widgets.registry import STATUSES
from mbi_widgets.ui.format import BADGES, TONES, badge, countdown, duration, relative_time
from mbi_widgets.ui.frame import STYLE

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


@pytest.mark.parametrize(("moment", "expected"), [
    (ago(seconds=0), "just now"),
    (ago(seconds=44), "just now"),
    (ago(seconds=45), "a minute ago"),
    (ago(seconds=89), "a minute ago"),
    (ago(seconds=90), "2 minutes ago"),
    (ago(minutes=44), "44 minutes ago"),
    (ago(minutes=45), "an hour ago"),
    (ago(minutes=89), "an hour ago"),
    (ago(minutes=90), "2 hours ago"),
    (ago(hours=21), "21 hours ago"),
    (ago(hours=22), "yesterday"),
    (ago(hours=35), "yesterday"),
    (ago(hours=36), "2 days ago"),
    (ago(days=25), "25 days ago"),
    (ago(days=26), "Oct 06, 2026"),
    (ago(days=400), "Sep 27, 2025"),
])
def test_relative_time_words_each_range(moment, expected):
    assert relative_time(moment, now=NOW) == expected


def test_relative_time_of_never_and_of_the_wall_clock():
    assert relative_time(None) == "never"
    assert relative_time(None, now=NOW) == "never"
    # Without `now`, the wall clock (UTC) is used: a moment taken just now reads "just now".
    assert relative_time(datetime.now(UTC)) == "just now"
    assert relative_time(datetime.now(UTC) - timedelta(hours=3)) == "3 hours ago"


def test_relative_time_compares_instants_across_time_zones():
    from datetime import timezone

    paris = timezone(timedelta(hours=1))
    # 12:55 in UTC+1 is 11:55 UTC: five minutes before NOW, not an hour in the future.
    assert relative_time(datetime(2026, 11, 1, 12, 55, tzinfo=paris), now=NOW) == "5 minutes ago"


@pytest.mark.parametrize(("seconds", "expected"), [
    (None, "—"),
    (0, "less than a second"),
    (0.25, "less than a second"),
    (0.999, "less than a second"),
    (1, "a second"),
    (1.49, "a second"),
    (1.5, "2 seconds"),
    (12.2, "12 seconds"),
    (44.4, "44 seconds"),
    (45, "a minute"),
    (89.9, "a minute"),
    (90, "2 minutes"),
    (600, "10 minutes"),
    (3 * 3600, "180 minutes"),
])
def test_duration_words(seconds, expected):
    assert duration(seconds) == expected


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "0:00"),
    (-5, "0:00"),
    (0.9, "0:00"),
    (9, "0:09"),
    (59.9, "0:59"),
    (60, "1:00"),
    (61, "1:01"),
    (599, "9:59"),
    (600, "10:00"),
    (3725, "62:05"),
])
def test_countdown_is_minutes_and_two_digit_seconds(seconds, expected):
    assert countdown(seconds) == expected


def test_countdown_never_goes_up_as_time_passes():
    shown = [countdown(600 - t / 4) for t in range(0, 2400 + 40)]
    as_seconds = [int(m) * 60 + int(s) for m, s in (value.split(":") for value in shown)]
    assert as_seconds == sorted(as_seconds, reverse=True)
    assert shown[0] == "10:00" and shown[-1] == "0:00"


@pytest.mark.parametrize("status", STATUSES)
def test_every_registry_status_has_its_own_badge_colours(status):
    # Changed on purpose (issue 10): a tone class whose colours come from the front-end's theme.
    tone = BADGES[status]
    html_badge = badge(status)
    assert tone in TONES
    assert f'class="mbi-badge mbi-tone-{tone}"' in html_badge
    assert f".mbi-tone-{tone} {{ --mbi-tone: var(--mbi-" in STYLE  # the tone is styled
    assert re.search(rf">{re.escape(status)}</span>$", html_badge)
    assert "style=" not in html_badge  # no colour fixed for a background it cannot know


def test_success_and_failure_badges_look_different():
    assert BADGES["Success"] != BADGES["Needs re-authentication"]
    assert BADGES["Success"] != BADGES["Error"]
    assert BADGES["Pending"] not in (BADGES["Success"], BADGES["Error"])


def test_unknown_status_gets_a_neutral_badge():
    html_badge = badge("Paused")
    assert "mbi-tone-neutral" in html_badge
    assert ">Paused</span>" in html_badge


def test_badge_message_becomes_an_escaped_tooltip():
    message = 'Stripe said "no" <script>alert(1)</script> & more'
    html_badge = badge("Error", message)
    assert ' title="Stripe said &quot;no&quot; &lt;script&gt;alert(1)&lt;/script&gt; &amp; more"' in html_badge
    assert "<script>" not in html_badge


def test_badge_without_message_has_no_tooltip():
    assert "title=" not in badge("Success")
    assert "title=" not in badge("Success", "")
    assert "title=" not in badge("Success", None)


def test_badge_escapes_the_status_text():
    html_badge = badge("<b>bold</b>")
    assert "<b>" not in html_badge
    assert "&lt;b&gt;bold&lt;/b&gt;" in html_badge
