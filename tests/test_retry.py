"""relay.retry: the backoff policy, the give-up rule, and the outage tracker's logging."""

from __future__ import annotations

import logging

import pytest

from relay.retry import MAX_DELAY_S, Outage, compute_backoff, should_give_up

NEARLY_ONE = 0.999999


def test_backoff_upper_bound_doubles_per_attempt() -> None:
    highs = [compute_backoff(n, base_s=1.0, cap_s=1000.0, rand=lambda: NEARLY_ONE)
             for n in range(1, 8)]
    for n, high in enumerate(highs, start=1):
        assert high == pytest.approx(2 ** (n - 1), rel=1e-5)


def test_backoff_is_full_jitter() -> None:
    assert compute_backoff(4, base_s=1.0, cap_s=100.0, rand=lambda: 0.5) == pytest.approx(4.0)
    assert compute_backoff(4, base_s=1.0, cap_s=100.0, rand=lambda: 0.25) == pytest.approx(2.0)


def test_backoff_never_below_the_floor() -> None:
    for n in (0, 1, 5, 50):
        assert compute_backoff(n, rand=lambda: 0.0) == 0.05
    assert compute_backoff(1, base_s=0.01, rand=lambda: NEARLY_ONE) == 0.05


def test_backoff_is_capped() -> None:
    assert compute_backoff(10, base_s=1.0, cap_s=30.0, rand=lambda: NEARLY_ONE) == (
        pytest.approx(30.0, rel=1e-5))
    for n in (7, 8, 20, 33, 1_000, 10**9):  # huge attempt counts neither overflow nor pass the cap
        assert compute_backoff(n, rand=lambda: NEARLY_ONE) <= MAX_DELAY_S
    assert compute_backoff(10**9, rand=lambda: NEARLY_ONE) == pytest.approx(MAX_DELAY_S, rel=1e-5)


def test_backoff_zero_or_negative_attempts_count_as_first() -> None:
    for n in (0, -3):
        assert compute_backoff(n, base_s=2.0, cap_s=100.0, rand=lambda: NEARLY_ONE) == (
            pytest.approx(2.0, rel=1e-5))


def test_backoff_default_rand_stays_in_bounds() -> None:
    for _ in range(200):
        assert 0.05 <= compute_backoff(3, base_s=1.0, cap_s=60.0) <= 4.0


@pytest.mark.parametrize("attempts,first,now,expected", [
    (1, 100.0, 100.0, False),
    (9, 100.0, 100.0, False),
    (10, 100.0, 100.0, True),    # attempts reached
    (11, 100.0, 100.0, True),
    (1, 100.0, 3699.9, False),
    (1, 100.0, 3700.0, True),    # time reached
    (1, 100.0, 9999.0, True),
])
def test_should_give_up(attempts: int, first: float, now: float, expected: bool) -> None:
    assert should_give_up(attempts, first, now, max_attempts=10, retry_for_s=3600) is expected


def test_should_give_up_with_retry_for_zero_gives_up_at_once() -> None:
    assert should_give_up(1, 5.0, 5.0, max_attempts=10, retry_for_s=0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.retry"]


def test_outage_logs_once_down_and_once_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.retry")
    clock = Clock()
    outage = Outage("Redis", base_s=0.1, cap_s=1.0, clock=clock)
    assert outage.since is None
    outage.succeeded()
    assert records(caplog) == []  # success while up says nothing

    delays = []
    for _ in range(8):
        delays.append(outage.failed(ConnectionError("refused")))
        clock.now += 0.5
    assert outage.since is not None
    down = records(caplog)
    assert len(down) == 1
    assert down[0].levelno == logging.ERROR
    assert "Redis" in down[0].getMessage() and "ConnectionError" in down[0].getMessage()
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])

    outage.succeeded()
    outage.succeeded()
    assert outage.since is None
    logged = records(caplog)
    assert len(logged) == 2
    assert logged[1].levelno == logging.WARNING
    assert "Redis" in logged[1].getMessage() and "4.0 s" in logged[1].getMessage()

    # A later outage starts again from the base delay and logs again, once.
    clock.now += Outage.FLAP_S + 1
    assert outage.failed(TimeoutError()) == pytest.approx(0.1)
    assert outage.failed(TimeoutError()) == pytest.approx(0.2)
    assert len(records(caplog)) == 3


def test_outage_flap_right_after_recovery_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.retry")
    clock = Clock()
    outage = Outage("Redis", clock=clock)
    outage.failed(ConnectionError())
    clock.now += 2
    outage.succeeded()
    recovered = clock.now
    assert len(records(caplog)) == 2

    # Stale pooled connections fail once each just after a restart: the same outage.
    clock.now = recovered + 1
    assert outage.failed(ConnectionError()) == pytest.approx(0.1)  # the delay still backs off
    assert outage.since is not None
    outage.succeeded()
    assert outage.since is None
    assert len(records(caplog)) == 2  # neither a new outage nor a second recovery

    # Failures that go on past the flap window are a real outage after all: logged once.
    clock.now = recovered + 2
    outage.failed(ConnectionError())
    clock.now = recovered + Outage.FLAP_S - 0.1
    outage.failed(ConnectionError())
    assert len(records(caplog)) == 2
    clock.now = recovered + Outage.FLAP_S + 0.1
    outage.failed(ConnectionError())
    outage.failed(ConnectionError())
    logged = records(caplog)
    assert len(logged) == 3 and logged[2].levelno == logging.ERROR
    outage.succeeded()
    assert len(records(caplog)) == 4


def test_outage_delay_does_not_overflow() -> None:
    outage = Outage("Redis", base_s=0.1, cap_s=5.0, clock=Clock())
    for _ in range(2_000):
        delay = outage.failed(OSError())
    assert delay == 5.0
