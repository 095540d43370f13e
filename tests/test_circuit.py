"""relay.circuit: the breaker and the 429 pause, on a fake clock (no sleeps)."""

from __future__ import annotations

import logging

import pytest

from relay.circuit import FAILURES_TO_OPEN, PROBE_LEASE_S, Circuit


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def circuit(clock: Clock) -> Circuit:
    return Circuit(clock=clock, first_probe_s=1.0, max_probe_s=8.0)


def logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.circuit"]


def test_closed_lets_everyone_through(circuit: Circuit) -> None:
    assert not circuit.is_open
    assert [circuit.wait_s() for _ in range(5)] == [0.0] * 5
    circuit.succeeded()
    assert circuit.wait_s() == 0.0


def test_systemic_opens_and_holds_everyone_until_probe_time(
        circuit: Circuit, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit.systemic("HTTP 401: bad key")
    assert circuit.is_open
    opened = logs(caplog)
    assert len(opened) == 1 and opened[0].levelno == logging.ERROR
    assert "HTTP 401: bad key" in opened[0].getMessage()

    assert circuit.wait_s() == pytest.approx(1.0)
    clock.now += 0.6
    assert [circuit.wait_s() for _ in range(3)] == pytest.approx([0.4] * 3)

    circuit.systemic("HTTP 401 again")  # more failures while open: no new log line
    assert len(logs(caplog)) == 1


def test_exactly_one_probe_while_others_wait(circuit: Circuit, clock: Clock) -> None:
    circuit.systemic("HTTP 403")
    clock.now += 1.0
    assert circuit.wait_s() == 0.0            # the probe
    waits = [circuit.wait_s() for _ in range(5)]
    assert all(w > 0 for w in waits)          # everyone else waits for its outcome
    clock.now += PROBE_LEASE_S - 2.0
    assert circuit.wait_s() > 0               # still only one probe while it runs


def test_a_probe_that_never_reports_back_is_replaced_after_its_lease(
        circuit: Circuit, clock: Clock) -> None:
    # E.g. its fetch hit a Redis error, or all it fetched was invalid: nothing was sent.
    circuit.systemic("HTTP 401")
    clock.now += 1.0
    assert circuit.wait_s() == 0.0
    clock.now += PROBE_LEASE_S - 0.001
    assert circuit.wait_s() > 0
    clock.now += 0.001
    assert circuit.wait_s() == 0.0            # a new probe
    assert circuit.wait_s() > 0               # and only one
    circuit.succeeded()
    assert not circuit.is_open


def test_probe_failure_doubles_the_interval_up_to_the_cap(circuit: Circuit,
                                                          clock: Clock) -> None:
    circuit.systemic("HTTP 404")
    intervals = []
    for _ in range(6):
        clock.now = circuit.next_probe_at
        assert circuit.wait_s() == 0.0
        circuit.systemic("HTTP 404")  # the probe failed
        intervals.append(circuit.wait_s())
    assert intervals == pytest.approx([2.0, 4.0, 8.0, 8.0, 8.0, 8.0])


def test_probe_transient_failure_also_reopens_for_longer(circuit: Circuit,
                                                         clock: Clock) -> None:
    circuit.systemic("HTTP 401")
    clock.now += 1.0
    assert circuit.wait_s() == 0.0
    circuit.transient("HTTP 503")
    assert circuit.is_open
    assert circuit.wait_s() == pytest.approx(2.0)


def test_probe_success_closes_with_one_log(circuit: Circuit, clock: Clock,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit.systemic("HTTP 401")
    for _ in range(3):
        clock.now = circuit.next_probe_at
        assert circuit.wait_s() == 0.0
        circuit.systemic("HTTP 401")
    clock.now = circuit.next_probe_at
    assert circuit.wait_s() == 0.0
    circuit.succeeded()
    circuit.succeeded()
    assert not circuit.is_open
    assert [circuit.wait_s() for _ in range(3)] == [0.0] * 3
    closed = [r for r in logs(caplog) if r.levelno == logging.WARNING]
    assert len(closed) == 1
    assert "closed" in closed[0].getMessage()
    assert len(logs(caplog)) == 2

    # A new outage starts from the first interval again.
    circuit.systemic("HTTP 401")
    assert circuit.wait_s() == pytest.approx(1.0)


def test_transients_in_a_row_open_it(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit = Circuit(clock=clock)
    for _ in range(FAILURES_TO_OPEN - 1):
        circuit.transient("HTTP 502")
        assert not circuit.is_open
        assert circuit.wait_s() == 0.0
    circuit.transient("HTTP 502")
    assert circuit.is_open
    assert circuit.wait_s() > 0
    opened = logs(caplog)
    assert len(opened) == 1
    assert f"{FAILURES_TO_OPEN} calls in a row" in opened[0].getMessage()


def test_a_success_between_transients_resets_the_count(clock: Clock) -> None:
    circuit = Circuit(clock=clock, failures_to_open=3)
    for _ in range(5):
        circuit.transient("timeout")
        circuit.transient("timeout")
        assert not circuit.is_open
        circuit.succeeded()
    circuit.transient("timeout")
    circuit.transient("timeout")
    circuit.transient("timeout")
    assert circuit.is_open


def test_the_pause_log_names_the_answer(circuit: Circuit,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit.pause(2.0, "HTTP 503")
    assert "slow down (HTTP 503)" in caplog.text and "429" not in caplog.text


def test_pause_blocks_for_the_given_seconds(circuit: Circuit, clock: Clock,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit.pause(2.0)
    assert not circuit.is_open
    assert circuit.wait_s() == pytest.approx(2.0)
    clock.now += 1.5
    assert circuit.wait_s() == pytest.approx(0.5)
    circuit.pause(0.1)                     # a shorter pause never shortens a longer one
    assert circuit.wait_s() == pytest.approx(0.5)
    circuit.pause(1.0)                     # a longer one extends it, without another log
    assert circuit.wait_s() == pytest.approx(1.0)
    assert len(logs(caplog)) == 1
    clock.now += 1.0
    assert circuit.wait_s() == 0.0
    circuit.pause(3.0)                     # a new pause after the last ended logs again
    assert len(logs(caplog)) == 2


def test_pause_applies_on_top_of_an_open_circuit(circuit: Circuit, clock: Clock) -> None:
    circuit.systemic("HTTP 401")
    circuit.pause(5.0)
    clock.now += 1.0                       # probe time, but the pause still holds
    assert circuit.wait_s() == pytest.approx(4.0)
    clock.now += 4.0
    assert circuit.wait_s() == 0.0         # now the probe


def test_abandon_probe_lets_the_next_one_probe(circuit: Circuit, clock: Clock) -> None:
    circuit.systemic("HTTP 401")
    clock.now += 1.0
    assert circuit.wait_s() == 0.0
    assert circuit.wait_s() > 0
    circuit.abandon_probe()                # the probe found nothing to send
    assert circuit.is_open
    assert circuit.wait_s() == 0.0         # the next caller probes at once
    assert circuit.wait_s() > 0


def test_holding_while_open_or_paused(circuit: Circuit, clock: Clock) -> None:
    assert not circuit.holding()
    circuit.pause(1.0)
    assert circuit.holding()
    clock.now += 1.0
    assert not circuit.holding()
    circuit.systemic("HTTP 401")
    assert circuit.holding()
    circuit.succeeded()
    assert not circuit.holding()


def test_with_several_apps_its_lines_name_the_app(circuit: Circuit, clock: Clock,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """relay.routes names the app when several are configured: the others keep going, so the
    lines say whose circuit it is and no longer that fetching stops."""
    caplog.set_level(logging.DEBUG, logger="relay.circuit")
    circuit.app = "tenant-b"
    circuit.pause(2.0, "HTTP 429")
    circuit.systemic("HTTP 401: bad key")
    clock.now += 2.0
    assert circuit.wait_s() == 0.0  # the probe
    circuit.succeeded()
    assert [r.getMessage() for r in logs(caplog)] == [
        "Pusher asked to slow down for app tenant-b (HTTP 429): its notifications wait 2.0 s",
        "circuit open for app tenant-b: HTTP 401: bad key; its notifications wait in the retry "
        "set while the other apps deliver",
        "circuit closed for app tenant-b: Pusher accepts calls again (was open 2.0 s: HTTP 401: "
        "bad key)"]
