"""What an operator reads when something is wrong (issue 13): each message is read from a
real worker's output (a subprocess's log) or from the summary line's records, for the
address and the reason, with the secret masked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from relay.housekeeping import Summary
from relay.message import payload_of, retry_wrapper
from relay.metrics import Metrics
from relay.redis_server import free_port
from tests.support import ROOT, healthz, metrics, pending, wait_for

SECRET = "test-secret"  # the local server's (conftest's LocalPusher defaults)


def push_unbatchable(r, queue: str, count: int, apart: bool = False) -> None:
    """Two channels each: every notification is its own call (no /batch_events). `apart`:
    two channels of its own each, so the calls need not wait for each other's turn."""
    r.rpush(queue, *[json.dumps({"relay": 1, "event": "ev", "data": json.dumps({"n": i}),
                                 "channels": [f"a{i}", f"b{i}"] if apart else ["a", "b"]})
                     for i in range(count)])


# -- 1. network failure lines ----------------------------------------------------------------

def test_nothing_listening_names_host_port_and_connection_refused(r, start_worker,
                                                                   queue_name):
    port = free_port()  # nothing listens there
    worker = start_worker(PUSHER_URL=f"http://test-key:{SECRET}@127.0.0.1:{port}/apps/1")
    push_unbatchable(r, queue_name, 6)
    where = f"127.0.0.1:{port}"
    # From the start line: the first failed call is said at once, not after the circuit's
    # five failures (the issue saw ten silent seconds).
    wait_for(lambda: f"calling {where}: connection refused" in worker.log(), 10,
             "a line naming host:port and 'connection refused'")
    wait_for(lambda: "circuit open" in worker.log(), 30, "the circuit to open")
    text = worker.log()
    [circuit] = [line for line in text.splitlines() if "circuit open" in line]
    assert f"calling {where}: connection refused" in circuit
    assert "NewConnectionError" not in text and "PUSHER_SSL" not in text  # not a TLS mix-up
    assert text.count("Pusher call failed") == 1  # once per outage, not once per call
    assert SECRET not in text
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert sum(pending(r, queue_name).values()) == 6  # nothing lost: queued or retrying


@pytest.mark.parametrize("how", ["https-url", "pusher-ssl"])
def test_tls_spoken_to_a_plain_http_server_names_pusher_ssl(r, pusher, start_worker,
                                                            queue_name, how):
    if how == "https-url":
        settings = {"PUSHER_URL": pusher.url.replace("http://", "https://", 1)}
    else:  # the split settings, PUSHER_SSL left at its default (true)
        settings = {"PUSHER_URL": "", "PUSHER_APP_ID": pusher.app_id,
                    "PUSHER_KEY": pusher.key, "PUSHER_SECRET": SECRET,
                    "PUSHER_HOST": pusher.host, "PUSHER_PORT": str(pusher.port)}
    # A TLS hello sent to a plain-HTTP server gets no answer: each call ends at the timeout,
    # and the circuit opens after five in a row. Calls on channels of their own, each ending
    # at a short timeout, get there in seconds, not 20 (2 s timeouts in turn, retries between).
    worker = start_worker(PUSHER_TIMEOUT="0.5", **settings)
    push_unbatchable(r, queue_name, 6, apart=True)
    wait_for(lambda: "PUSHER_SSL=false" in worker.log(), 30, "the PUSHER_SSL hint")
    wait_for(lambda: "circuit open" in worker.log(), 30, "the circuit to open")
    text = worker.log()
    [hint] = [line for line in text.splitlines() if "PUSHER_SSL" in line]  # said once
    assert f"{pusher.host}:{pusher.port} answers plain HTTP" in hint and "ERROR" in hint
    assert f"calling {pusher.host}:{pusher.port}: " in text
    assert SECRET not in text
    assert pusher.events() == []
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


# -- 2. the start line comes first -----------------------------------------------------------

def test_start_line_first_then_one_outage_line_naming_redis(start_worker):
    port = free_port()  # no Redis there
    worker = start_worker(wait=False, REDIS_URL=f"redis://:sekrit-pw@127.0.0.1:{port}/0")
    wait_for(lambda: "Redis unreachable" in worker.log(), 15, "the outage line")
    assert worker.alive  # it waits for Redis; start order must not matter
    lines = worker.log().splitlines()
    starting = next(i for i, line in enumerate(lines) if "starting:" in line)
    [outage] = [i for i, line in enumerate(lines) if "Redis unreachable" in line]
    assert starting < outage
    assert f"redis=redis://***@127.0.0.1:{port}/0" in lines[starting]  # the configuration
    assert "secret=***" in lines[starting]
    assert f"REDIS_URL=redis://***@127.0.0.1:{port}/0" in lines[outage]
    assert "connection refused" in lines[outage].lower()
    assert "sekrit-pw" not in worker.log() and SECRET not in worker.log()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert "started:" not in worker.log()  # never registered


# -- 3. the summary line ---------------------------------------------------------------------

class Lengths:
    def __init__(self) -> None:
        self.queue = 0

    def lengths(self) -> dict[str, int]:
        return {"queue": self.queue, "retry": 0, "dead": 0}


def summary_lines(caplog, steps) -> list[str]:
    """Run the summary with an injected clock: each step is (seconds, delivered, backlog)."""
    metrics, queue, now = Metrics(), Lengths(), [0.0]
    summary = Summary(metrics, queue, inflight=lambda: 0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="relay.housekeeping"):
        for seconds, delivered, backlog in steps:
            now[0] += seconds
            metrics.delivered.labels("default").inc(delivered)
            queue.queue = backlog
            summary.tick()
    return [rec.getMessage() for rec in caplog.records]


def test_summary_says_counts_at_low_traffic_and_never_negative_zero(caplog):
    lines = summary_lines(caplog, [(10, 0, 5), (10, 2, 5), (10, 0, 8), (10, 3, 5)])
    assert lines == [
        "delivered 0 (0 in 10 s), dead-lettered 0, retried 0, shed 0, failed Pusher calls 0, "
        "redis errors 0; backlog 5",
        "delivered 2 (2 in 10 s), dead-lettered 0, retried 0, shed 0, failed Pusher calls 0, "
        "redis errors 0; backlog 5, unchanged",
        "delivered 0 (0 in 10 s), dead-lettered 0, retried 0, shed 0, failed Pusher calls 0, "
        "redis errors 0; backlog 8, growing 3 in 10 s",
        "delivered 3 (3 in 10 s), dead-lettered 0, retried 0, shed 0, failed Pusher calls 0, "
        "redis errors 0; backlog 5, draining 3 in 10 s, ETA 17 s",
    ]
    assert not any("-0" in line or "(0/s)" in line for line in lines)


def test_summary_gives_rates_and_eta_at_high_traffic(caplog):
    lines = summary_lines(caplog, [(10, 0, 3000), (10, 2000, 1000), (10, 0, 1500)])
    assert "delivered 2000 (200/s)" in lines[1]
    assert lines[1].endswith("backlog 1,000, draining 200/s, ETA 5 s")
    assert lines[2].endswith("backlog 1,500, growing 50/s")


# -- 4. metrics by outcome, 5. clock skew in /healthz ----------------------------------------

def failed_calls(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items()
               if k.startswith("relay_pusher_calls_total{") and 'status="2xx"' not in k)


def test_an_error_inside_a_200_is_a_failed_call_everywhere(r, pusher, start_worker,
                                                            queue_name):
    pusher.set_mode(dialect="soketi", status=401)  # soketi: 200 {"error": ..., "code": 401}
    port = free_port()
    worker = start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    push_unbatchable(r, queue_name, 1)
    refused = 'relay_pusher_calls_total{app="default",status="4xx"}'
    wait_for(lambda: metrics(port).get(refused, 0) >= 1, 15,
             "the refused call counted as 4xx")
    samples = metrics(port)
    assert samples.get('relay_pusher_calls_total{app="default",status="2xx"}', 0) == 0
    assert pusher.stats()["requests"]  # the server did answer (with a 200)

    def agree() -> bool:
        status, body = healthz(port)
        return status == 503 and body["pusher_calls"]["failed"] == failed_calls(metrics(port))

    wait_for(agree, 15, "/healthz's failed calls to agree with /metrics")
    status, body = healthz(port)
    assert "circuit" in body["problems"] and "HTTP 401" in body["circuit"]
    assert SECRET not in worker.log()


def test_healthz_names_the_clock_skew(r, pusher, start_worker, queue_name):
    pusher.set_mode(skew_s=1000)  # a server clock 1000 s ahead: Pusher's 401, timestamp expired
    port = free_port()
    worker = start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    push_unbatchable(r, queue_name, 1)

    def skew_problem() -> str | None:
        status, body = healthz(port)
        found = [p for p in body["problems"] if p.startswith("clock skew")]
        return status == 503 and found and found[0]

    problem = wait_for(skew_problem, 15, "/healthz naming the clock skew")
    assert re.fullmatch(r"clock skew: server clock off by \+(999|1000|1001) s", problem)
    pusher.clear_mode()  # the clocks agree again: the next success clears it
    wait_for(lambda: r.llen(queue_name) == 0 and pusher.events(), 60, "delivery after the fix")
    wait_for(lambda: not any(p.startswith("clock skew") for p in healthz(port)[1]["problems"]),
             15, "the skew problem to clear")
    assert SECRET not in worker.log()


# -- 6. what the README shows is what a user gets ---------------------------------------------

README = (ROOT / "README.md").read_text()


def test_readme_shows_the_real_no_credentials_message():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PUSHER_"))}
    done = subprocess.run([sys.executable, "worker.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    shown = README.split("$ .venv/bin/python worker.py\n", 1)[1].split("\n$ echo $?\n2\n")[0]
    assert done.stderr == shown + "\n"


def test_readme_retry_wrapper_has_the_real_shape():
    [line] = re.findall(r'^  (\{"relay":1,"payload".*)$', README, re.MULTILINE)
    shown = json.loads(line)
    real = json.loads(retry_wrapper('{"channel":"orders"}', 2, 1.5, "why"))
    assert set(shown) == set(real) and set(shown["retry"]) == set(real["retry"])
    assert isinstance(shown["payload"], str) and len(shown["nonce"]) == len(real["nonce"])
    assert payload_of(json.dumps(shown).encode()) == shown["payload"]
