"""The notebook-side device flow without a network: the pure `step` and `DeviceFlow` on a scripted relay.

Nothing here sleeps: the scripted relay advertises a zero interval (or an hour, for a thread that
must be woken by `cancel()`), the clock is a counter the test moves, and polls that must be caught
in flight block on events the test releases.
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

import pytest

from mbi_widgets.auth import (
    SLOW_DOWN_STEP,
    AuthError,
    Connected,
    Denied,
    DeviceFlow,
    Expired,
    Failed,
    Idle,
    OAuthAnswer,
    StripeToken,
    TokenIssued,
    Unreachable,
    Waiting,
    step,
)

ACCESS = "sk_test_ACCESSsecretACCESSsecretACCESS42"
REFRESH = "rt_REFRESHsecretREFRESHsecretREFRESH42"
TOKEN_BODY = {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "bearer",
              "stripe_user_id": "acct_1NorthwindXXXXX", "stripe_publishable_key": "pk_test_abc",
              "scope": "read_only", "livemode": False}

PENDING = OAuthAnswer("authorization_pending", "Waiting for the code to be approved in a browser.")
SLOW_DOWN = OAuthAnswer("slow_down", "Polling too fast.")
DENIED = OAuthAnswer("access_denied", "The user denied your request")
EXPIRED = OAuthAnswer("expired_token", "The device code expired; start again.")
TOKEN = TokenIssued(dict(TOKEN_BODY))


def waiting(*, deadline: float = 100.0, interval: float = 5.0, device_code: str = "device-code-secret") -> Waiting:
    return Waiting(user_code="BCDF-GHJK", verification_uri="https://relay.example/device",
                   verification_uri_complete="https://relay.example/device?user_code=BCDF-GHJK",
                   deadline=deadline, expires_at=datetime(2026, 1, 1, tzinfo=timezone.utc), interval=interval,
                   device_code=device_code)


# --- step: the pure state machine ------------------------------------------------------------------

def test_pending_before_the_deadline_keeps_waiting_one_interval():
    state = waiting(deadline=100, interval=5)
    assert step(state, PENDING, now=10) == (state, 5.0)


def test_pending_close_to_the_deadline_polls_once_more_right_at_the_deadline():
    state = waiting(deadline=100, interval=5)
    assert step(state, PENDING, now=98) == (state, 2.0)


@pytest.mark.parametrize("now", [100.0, 100.5, 1_000.0])
def test_pending_at_or_after_the_deadline_expires(now):
    new, wait = step(waiting(deadline=100), PENDING, now=now)
    assert isinstance(new, Expired)
    assert "expired" in new.message
    assert wait is None


def test_slow_down_adds_five_seconds_to_the_interval_and_waits_that_long():
    state = waiting(deadline=100, interval=5)
    slower, wait = step(state, SLOW_DOWN, now=10)
    assert isinstance(slower, Waiting)
    assert slower.interval == 5 + SLOW_DOWN_STEP == 10
    assert wait == 10
    # Everything but the interval is kept, and a second slow_down adds another five seconds.
    assert slower == waiting(deadline=100, interval=10)
    slowest, wait = step(slower, SLOW_DOWN, now=20)
    assert (slowest.interval, wait) == (15, 15)
    # The original state is untouched (states are values).
    assert state.interval == 5


def test_slow_down_near_the_deadline_still_polls_at_the_deadline():
    slower, wait = step(waiting(deadline=100, interval=5), SLOW_DOWN, now=97)
    assert slower.interval == 10
    assert wait == 3


def test_access_denied_ends_denied():
    new, wait = step(waiting(), DENIED, now=10)
    assert isinstance(new, Denied)
    assert "denied" in new.message.lower()
    assert wait is None


def test_expired_token_ends_expired_even_before_the_local_deadline():
    new, wait = step(waiting(deadline=100), EXPIRED, now=10)
    assert isinstance(new, Expired)
    assert wait is None


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client", "unsupported_grant_type", "server_error"])
def test_other_oauth_errors_fail_with_the_error_as_code(error):
    new, wait = step(waiting(), OAuthAnswer(error, "Unknown or already redeemed device code."), now=10)
    assert new == Failed(new.message, error)
    assert "Unknown or already redeemed device code." in new.message
    assert wait is None


def test_an_oauth_error_without_description_still_says_something():
    new, _ = step(waiting(), OAuthAnswer("invalid_grant"), now=10)
    assert isinstance(new, Failed) and new.code == "invalid_grant"
    assert "no details" in new.message


def test_unreachable_is_retried_until_the_deadline():
    state = waiting(deadline=100, interval=5)
    assert step(state, Unreachable("ConnectionError: refused"), now=10) == (state, 5.0)
    assert step(state, Unreachable("ConnectionError: refused"), now=99) == (state, 1.0)


@pytest.mark.parametrize("now", [100.0, 250.0])
def test_unreachable_at_the_deadline_fails_with_relay_unreachable(now):
    new, wait = step(waiting(deadline=100), Unreachable("ConnectTimeout: no route"), now=now)
    assert isinstance(new, Failed)
    assert new.code == "relay_unreachable"
    assert "ConnectTimeout: no route" in new.message
    assert wait is None


def test_token_issued_connects_and_no_repr_shows_the_tokens():
    new, wait = step(waiting(), TOKEN, now=10)
    assert wait is None
    assert isinstance(new, Connected)
    token = new.token
    assert (token.access_token, token.refresh_token) == (ACCESS, REFRESH)
    assert token.stripe_user_id == "acct_1NorthwindXXXXX"
    assert (token.scope, token.livemode, token.token_type) == ("read_only", False, "bearer")
    for text in (repr(new), str(new), repr(token), repr(TOKEN), token.hint):
        assert ACCESS not in text
        assert REFRESH not in text
    assert "acct_1NorthwindXXXXX" in repr(new)


def test_a_token_answer_after_the_deadline_still_connects():
    new, _ = step(waiting(deadline=100), TOKEN, now=500)
    assert isinstance(new, Connected)


def test_a_token_answer_without_the_account_fails_invalid_response():
    body = {k: v for k, v in TOKEN_BODY.items() if k != "stripe_user_id"}
    new, wait = step(waiting(), TokenIssued(body), now=10)
    assert isinstance(new, Failed)
    assert new.code == "invalid_response"
    assert "stripe_user_id" in new.message
    assert ACCESS not in new.message
    assert wait is None


def test_a_scope_list_is_joined():
    new, _ = step(waiting(), TokenIssued(TOKEN_BODY | {"scope": ["read_only", "extra"]}), now=10)
    assert new.token.scope == "read_only extra"


def test_waiting_repr_hides_the_device_code_and_links_the_complete_uri():
    state = waiting(device_code="device-code-secret")
    assert "device-code-secret" not in repr(state)
    assert state.link == "https://relay.example/device?user_code=BCDF-GHJK"
    bare = Waiting("BCDF-GHJK", "https://relay.example/device", None, 100.0,
                   datetime(2026, 1, 1, tzinfo=timezone.utc), 5.0, "x")
    assert bare.link == "https://relay.example/device"


def test_step_refuses_something_that_is_not_a_poll_answer():
    with pytest.raises(TypeError):
        step(waiting(), {"error": "authorization_pending"}, now=10)  # type: ignore[arg-type]


def test_stripe_token_from_response_requires_an_access_token():
    with pytest.raises(AuthError) as caught:
        StripeToken.from_response({"stripe_user_id": "acct_1"})
    assert caught.value.code == "invalid_response"
    assert "access_token" in str(caught.value)


# --- DeviceFlow on a scripted relay -------------------------------------------------------------------

class FakeClock:
    """A monotonic clock the test moves; `hook` runs once at the next reading (to interleave a cancel)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.hook: Callable[[], None] | None = None

    def __call__(self) -> float:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Answer = OAuthAnswer | TokenIssued | Unreachable | Callable[[], "OAuthAnswer | TokenIssued | Unreachable"]


class ScriptedRelay:
    """Stands in for RelayClient: `request_code` gives a Waiting, each `poll` the next scripted answer."""

    def __init__(self, answers: list[Answer] = (), *, clock: FakeClock, interval: float = 0.0,
                 expires_in: float = 600.0, refuse: AuthError | None = None) -> None:
        self.answers = list(answers)
        self.clock = clock
        self.interval = interval
        self.expires_in = expires_in
        self.refuse = refuse
        self.codes_issued: list[str] = []
        self.polls: list[str] = []

    def request_code(self, *, scope: str = "read_only", clock: Callable[[], float]) -> Waiting:
        assert clock is self.clock, "DeviceFlow must hand its clock to the relay client"
        if self.refuse is not None:
            raise self.refuse
        device_code = f"device-code-{len(self.codes_issued) + 1}"
        self.codes_issued.append(device_code)
        return Waiting(user_code=f"BCDF-GHJ{len(self.codes_issued)}", verification_uri="https://relay.example/device",
                       verification_uri_complete=None, deadline=clock() + self.expires_in,
                       expires_at=datetime.now(timezone.utc) + timedelta(seconds=self.expires_in),
                       interval=self.interval, device_code=device_code)

    def poll(self, device_code: str):
        self.polls.append(device_code)
        if not self.answers:
            raise AssertionError(f"poll #{len(self.polls)} was not scripted")
        answer = self.answers.pop(0)
        return answer() if callable(answer) else answer


def make_flow(answers: list[Answer] = (), **options) -> tuple[DeviceFlow, ScriptedRelay, FakeClock, list]:
    clock = FakeClock()
    relay = ScriptedRelay(answers, clock=clock, **options)
    flow = DeviceFlow("https://relay.example", client=relay, clock=clock)  # type: ignore[arg-type]
    seen: list = []
    flow.observe(seen.append)
    return flow, relay, clock, seen


def finish(flow: DeviceFlow) -> None:
    """Waits for the polling thread to end (pytest-timeout guards a hang)."""
    if flow._thread is not None:  # noqa: SLF001 - the test checks the thread really stops
        flow._thread.join()  # noqa: SLF001
        assert not flow._thread.is_alive()  # noqa: SLF001


class Gate:
    """A poll answer that blocks in flight until released, so a test can act during the request."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self):
        self.entered.set()
        self.release.wait()
        return self.answer


def test_flow_polls_until_the_token_and_observers_see_waiting_then_connected():
    flow, relay, _, seen = make_flow([PENDING, PENDING, TOKEN])
    started = flow.start()
    assert isinstance(started, Waiting)
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Connected)
    assert state.token.access_token == ACCESS
    assert flow.state == state
    assert relay.polls == ["device-code-1"] * 3
    # Unchanged states are not announced again: Waiting once, then Connected.
    assert seen == [started, state]


def test_flow_announces_the_slower_interval_after_slow_down():
    flow, relay, clock, seen = make_flow()

    def slow_down_at_the_deadline():
        clock.advance(600)  # so the next poll (at the deadline) comes at once instead of 5 s later
        return SLOW_DOWN

    relay.answers = [PENDING, slow_down_at_the_deadline, EXPIRED]
    started = flow.start()
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Expired)
    assert len(relay.polls) == 3
    assert [type(s) for s in seen] == [Waiting, Waiting, Expired]
    assert seen[0] == started and seen[0].interval == 0
    assert seen[1].interval == SLOW_DOWN_STEP
    assert seen[1].user_code == started.user_code


def test_flow_ends_denied():
    flow, relay, _, seen = make_flow([PENDING, DENIED])
    flow.start()
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Denied)
    assert [type(s) for s in seen] == [Waiting, Denied]
    assert len(relay.polls) == 2


def test_flow_keeps_polling_while_pending_and_expires_after_the_deadline():
    flow, relay, clock, seen = make_flow()
    relay.answers = [PENDING, PENDING, lambda: (clock.advance(601), PENDING)[1]]
    flow.start()
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Expired)
    assert len(relay.polls) == 3
    assert [type(s) for s in seen] == [Waiting, Expired]


def test_flow_retries_an_unreachable_relay_then_fails_at_the_deadline():
    flow, relay, clock, seen = make_flow()
    refused = Unreachable("ConnectionError: connection refused")
    relay.answers = [refused, refused, lambda: (clock.advance(601), refused)[1]]
    flow.start()
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Failed)
    assert state.code == "relay_unreachable"
    assert len(relay.polls) == 3
    assert [type(s) for s in seen] == [Waiting, Failed]


def test_flow_recovers_when_the_relay_comes_back_before_the_deadline():
    flow, relay, _, seen = make_flow([Unreachable("ConnectionError: refused"), PENDING, TOKEN])
    flow.start()
    state = flow.wait()
    finish(flow)
    assert isinstance(state, Connected)
    assert [type(s) for s in seen] == [Waiting, Connected]


def test_start_against_an_unreachable_relay_fails_at_once_without_polling():
    flow, relay, _, seen = make_flow(refuse=AuthError("The relay could not be reached.", code="relay_unreachable"))
    state = flow.start()
    assert isinstance(state, Failed)
    assert state.code == "relay_unreachable"
    assert flow.wait() == state
    assert seen == [state]
    assert relay.polls == []
    assert flow._thread is None  # noqa: SLF001 - nothing polls


def test_cancel_before_start_leaves_the_flow_idle():
    flow, relay, _, seen = make_flow()
    flow.cancel()
    assert flow.state == Idle()
    assert flow.wait() == Idle()
    assert seen == []
    assert relay.polls == []


def test_cancel_while_waiting_between_polls_returns_to_idle_and_stops_the_thread():
    flow, relay, _, seen = make_flow([TOKEN], interval=3_600)  # the thread sits in an hour-long wait
    started = flow.start()
    flow.cancel()
    assert flow.state == Idle()
    finish(flow)
    assert relay.polls == []
    assert flow.wait() == Idle()
    assert seen == [started, Idle()]


def test_cancel_during_a_poll_discards_its_answer():
    gate = Gate(TOKEN)
    flow, relay, _, seen = make_flow([PENDING, gate])
    started = flow.start()
    gate.entered.wait()
    flow.cancel()
    assert flow.state == Idle()
    gate.release.set()  # the relay answers with a token after all: too late
    finish(flow)
    assert flow.state == Idle()
    assert flow.wait() == Idle()
    assert len(relay.polls) == 2
    assert seen == [started, Idle()]


def test_cancel_after_a_slow_down_returns_to_idle():
    flow, relay, _, seen = make_flow([SLOW_DOWN, TOKEN])  # after slow_down the thread waits 5 s: cancel wakes it
    slowed = threading.Event()
    flow.observe(lambda state: slowed.set() if isinstance(state, Waiting) and state.interval > 0 else None)
    flow.start()
    slowed.wait()  # the slower Waiting is announced from the polling thread
    flow.cancel()
    finish(flow)
    assert flow.state == Idle()
    assert len(relay.polls) == 1
    assert [type(s) for s in seen] == [Waiting, Waiting, Idle]


@pytest.mark.parametrize("answer", [PENDING, SLOW_DOWN, TOKEN, DENIED, EXPIRED, Unreachable("refused")],
                         ids=["pending", "slow_down", "token", "denied", "expired", "unreachable"])
def test_cancel_between_a_poll_answer_and_the_state_change_still_ends_idle(answer):
    """cancel() may land after the thread checked for cancellation but before it stores the next state
    (here: while it reads the clock to step); the flow must still end Idle, and observers last see Idle."""
    flow, relay, clock, seen = make_flow()

    def answer_then_cancel_during_step():
        clock.hook = flow.cancel  # runs inside step's clock reading, after the thread's cancel check
        return answer

    relay.answers = [answer_then_cancel_during_step, TOKEN, TOKEN]
    flow.start()
    finish(flow)
    assert flow.state == Idle()
    assert flow.wait() == Idle()
    assert seen[-1] == Idle()
    assert len(relay.polls) == 1


def test_start_again_after_cancel_is_not_disturbed_by_the_old_poll():
    gate = Gate(TOKEN)
    flow, relay, _, seen = make_flow([gate])
    first = flow.start()
    old_thread = flow._thread  # noqa: SLF001
    gate.entered.wait()
    relay.interval = 3_600  # the second flow sits waiting
    second = flow.start()  # start() cancels the first flow itself
    assert second.device_code == "device-code-2"
    gate.release.set()  # the first flow's poll returns a token for the abandoned code
    old_thread.join()
    assert flow.state == second
    assert seen == [first, Idle(), second]
    flow.cancel()
    finish(flow)
    assert flow.state == Idle()
    assert relay.polls == ["device-code-1"]


def test_every_observer_is_told():
    flow, _, _, seen = make_flow([TOKEN])
    also: list = []
    flow.observe(also.append)
    flow.start()
    flow.wait()
    finish(flow)
    assert [type(s) for s in seen] == [Waiting, Connected]
    assert also == seen
