"""Log lines an operator reads with several workers on one stdout (issue 21, stumble 9):
each line names the process that wrote it, and a recovery line says what recovery means."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator

import pytest
import redis

from relay import config, logs
from relay.housekeeping import Housekeeper
from relay.metrics import Metrics
from relay.queue import RedisQueue
from relay.retry import Outage
from tests.support import WorkerProcess, push, wait_for

STAMPED = re.compile(r"\A\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture
def root_logging() -> Iterator[None]:
    """logs.setup replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


def test_text_lines_name_the_pid_then_the_worker_id(root_logging: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "text")
    log = logging.getLogger("relay.test")
    log.info("before the worker id is known")
    logs.set_worker("web1:4242:a1b2c3")
    log.info("after")
    before, after = capsys.readouterr().err.splitlines()
    assert f"[pid {os.getpid()}] INFO relay.test: before the worker id is known" in before
    assert after.endswith("[web1:4242:a1b2c3] INFO relay.test: after")
    assert "relay_worker" not in after and "relay_who" not in after  # not shown as fields


def test_json_lines_carry_the_pid_and_the_worker_id(root_logging: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("info", "json")
    log = logging.getLogger("relay.test")
    log.warning("one", extra={"attempts": 3})
    logs.set_worker("web1:4242:a1b2c3")
    log.warning("two")
    one, two = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert one["pid"] == os.getpid() and "worker" not in one and one["attempts"] == 3
    assert two["worker"] == "web1:4242:a1b2c3"
    assert "relay_worker" not in one and "relay_worker" not in two


def test_every_line_of_a_real_worker_names_its_process(
        start_worker: Callable[..., WorkerProcess], r: redis.Redis, queue_name: str,
        pusher: object) -> None:
    worker = start_worker()
    push(r, queue_name, 5)
    wait_for(lambda: "delivered 5" in worker.log(), 20, "the summary line")
    lines = [line for line in worker.log().splitlines() if STAMPED.match(line)]
    assert len(lines) >= 3, worker.log()
    # Every line names the worker id (host:pid:random) that Redis and the page know it by.
    [wid] = re.findall(rf"worker (\S+:{worker.proc.pid}:\w+) starting", worker.log())
    tag = f"[{wid}] "
    assert all(tag in line for line in lines), "\n".join(x for x in lines if tag not in x)


def test_a_recovery_line_says_some_may_be_sent_again(
        r: redis.Redis, queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = RedisQueue(r, queue_name, worker_id="host-b:7:dead01")
    dead.heartbeat(1)
    r.rpush(dead.keys.inflight("host-b:7:dead01", 0), b'{"channel": "c", "n": 1}')
    r.zincrby(dead.keys.workers, -60, "host-b:7:dead01")  # its deadline passed a minute ago
    cfg = config.load(env={"RELAY_QUEUE": queue_name}, need_pusher=False)
    keeper = Housekeeper(cfg, RedisQueue(r, queue_name), Metrics(), Outage("redis"),
                         circuits=lambda: [], inflight=lambda: 0)
    with caplog.at_level("WARNING", logger="relay.housekeeping"):
        keeper.maintain()
    [line] = [rec.getMessage() for rec in caplog.records if "missed its heartbeat" in
              rec.getMessage()]
    assert line == ("worker host-b:7:dead01 missed its heartbeat: 1 in-flight notification(s) "
                    "recovered, to be sent again in their channels' order; some may already "
                    "have been delivered")
    assert r.llen(queue_name) == 1
