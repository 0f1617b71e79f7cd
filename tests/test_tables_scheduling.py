"""Which window a worker takes next: the table furthest behind its share, within each lane's room.

These exercise `Job`'s choice directly (no server: the choice is arithmetic on windows, rates and
the measured answer time); `tests/test_search_lane.py` and `tests/test_tables_source.py` show the
loads it drives stay complete and equal whatever happens.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbi_widgets.ratelimits import SEARCH_ENDPOINT, RateLimits
from mbi_widgets.tables.fetch import (
    IN_FLIGHT_HEADROOM,
    STRIPE_EPOCH,
    Fetcher,
    Job,
    RateBudget,
    RetryPolicy,
    TablePlan,
    Window,
    workers_for,
)

NOW = STRIPE_EPOCH + 400_000_000
ANSWER = 0.3


class NoTransport:
    """Nothing here sends a request."""

    secret = ""

    def get(self, path, params):  # pragma: no cover - would mean the test sent a request
        raise AssertionError(f"unexpected request to {path}")


def job_for(tables: dict[str, int], *, limits: RateLimits = RateLimits.live_mode(), searchable=()) -> Job:
    """A job over tables with the given pages left each, one window each (100 objects a page, known
    density), answers taking `ANSWER` s, and search allowed for `searchable` tables."""
    fetcher = Fetcher(NoTransport(), RateBudget(limits), RetryPolicy())
    fetcher.answer_time = ANSWER
    fetcher.server_time = NOW
    plans = [TablePlan(name, f"/v1/{name}", None, {}, search_path=f"/v1/{name}/search" if name in searchable else None)
             for name in tables]
    job = Job(fetcher=fetcher, plans=plans, workers=64, floor=lambda: STRIPE_EPOCH, progress=None,
              search_delay=3600 if searchable else None, known_floor=STRIPE_EPOCH)
    job._probes.clear()  # every table's first page has come back: its window continues after it
    for name, pages in tables.items():
        window = Window(name, None, None, after="x", lane="list", top=NOW - 7200, pages=1)
        window.density = pages * 100 / (window.top - STRIPE_EPOCH)
        job._windows.append(window)
    return job


def take(job: Job, count: int) -> list[str]:
    """The tables of the next `count` windows workers would take (each stays in flight)."""
    taken = []
    for _ in range(count):
        task = job._next_task()
        if task is None:
            break
        taken.append(task.table)
    return taken


def test_workers_fill_the_accounts_rate_at_usual_answer_times():
    assert workers_for(RateLimits.test_mode()) == 16
    assert workers_for(RateLimits.live_mode()) == 60
    assert workers_for(RateLimits(per_account=1000, per_endpoint=100)) == 600


def test_the_longest_table_is_served_first_up_to_its_lanes_room():
    job = job_for({"events": 300, "coupons_like": 5, "customers": 60})
    room = math.ceil(25 * ANSWER * IN_FLIGHT_HEADROOM)  # requests in flight a 25/s lane needs, with headroom
    first = take(job, room)
    assert first[0] == "events"
    assert first.count("events") >= room - 2, first  # the others only as far as their share asks
    # Its lane is full now: the next windows go to the other tables.
    later = take(job, 6)
    assert later and "events" not in later, later


def test_no_table_is_left_for_last():
    """A small table gets windows while the large ones run, as its share of the time left asks."""
    job = job_for({"events": 300, "charges": 290, "invoices": 280, "customers": 60})
    taken = take(job, 40)
    assert "customers" in taken, taken


def test_in_flight_never_exceeds_what_the_accounts_rate_needs():
    job = job_for({f"table{i}": 300 for i in range(8)})
    taken = take(job, 500)
    assert len(taken) <= math.ceil(100 * ANSWER * IN_FLIGHT_HEADROOM)
    assert sum(job._lane_busy.values()) == len(taken)


@settings(max_examples=60, deadline=None)
@given(pages=st.dictionaries(st.sampled_from(["events", "charges", "invoices", "customers", "plans"]),
                             st.integers(1, 2_000), min_size=1),
       answer=st.floats(0.005, 2.0), per_account=st.sampled_from([25, 100, 400]))
def test_lanes_stay_within_their_room_and_an_idle_job_always_hands_out_work(pages, answer, per_account):
    limits = RateLimits(per_account=per_account, per_endpoint=25)
    job = job_for(pages, limits=limits, searchable={"charges", "invoices", "customers"} & set(pages))
    job.fetcher.answer_time = answer
    taken = take(job, 1_000)
    assert taken, "an idle job with windows left must hand one out"
    cap = max(1.0, per_account * answer * IN_FLIGHT_HEADROOM)
    assert len(taken) <= math.ceil(cap) + 1
    for lane, busy in job._lane_busy.items():
        rate = limits.per_search if lane == SEARCH_ENDPOINT else limits.per_endpoint
        assert busy <= math.ceil(max(1.0, rate * answer * IN_FLIGHT_HEADROOM)) + 1, (lane, busy)


def test_a_search_window_under_way_is_taken_even_when_search_was_turned_off():
    """Its `page` token holds its query: it finishes on search (a stalled window would stall the load)."""
    job = job_for({"charges": 50}, searchable={"charges"})
    window = job._windows[0]
    window.lane, window.page = "search", "token"
    job._search_off.add("charges")
    task = job._next_task()
    assert task is window and task.lane == "search"


@pytest.mark.parametrize("answer", [0.001, 0.3, 3.0])
def test_one_window_goes_whatever_the_answer_time_when_nothing_is_in_flight(answer):
    job = job_for({"plans": 1}, limits=RateLimits(per_account=1, per_endpoint=1))
    job.fetcher.answer_time = answer
    assert take(job, 1) == ["plans"]
