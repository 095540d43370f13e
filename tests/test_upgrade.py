"""Rolling deploys between 1.0 and this version: old and new worker processes on one queue, the
old ones stopped or killed as a deploy does, and nothing lost.

The 1.0 code is release 1.0.0's commit in this repository's history (the commit, not the tag
v1.0.0: a clone need not carry tags), unpacked with `git archive` and run with the same
interpreter and dependencies (1.0 needs nothing this venv lacks). In a shallow clone that lacks
the commit the tests skip and say so.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
import redis

from relay.pusher_server import LocalPusher
from tests.support import (
    ROOT,
    WorkerProcess,
    all_delivered,
    dead,
    delivered,
    events_total,
    wait_for,
    wait_settled,
    worker_processes,
)

OLD = "c4fb7f7cba7e2e29bfeeef14d1c86a3bdd73d57b"  # release 1.0.0 (tagged v1.0.0)
# 1,000: a rollback's busy channel (one call of 10 at a time, 50 ms each) still parks for ~5 s,
# and a drain over 40 channels is still under way at the SIGTERM or the kill.
COUNT = 1000
CHANNELS = 40


@pytest.fixture(scope="module")
def old_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", OLD], cwd=ROOT,
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the 1.0 code (commit {OLD}) is not in this clone: {exc}")
    where = tmp_path_factory.mktemp("relay-1.0")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    assert "1.0.0" in (where / "relay" / "__init__.py").read_text()
    return where


@pytest.fixture
def start_old(worker_env: dict[str, str], tmp_path: Path, old_checkout: Path
              ) -> Iterator[Callable[..., WorkerProcess]]:
    with worker_processes(worker_env, tmp_path, "old", old_checkout / "worker.py") as start:
        yield start


def push(r: redis.Redis, queue: str) -> None:
    r.rpush(queue, *[json.dumps({"channel": f"c{n % CHANNELS}", "n": n})
                     for n in range(COUNT)])


def test_a_deploy_from_1_0_stops_the_old_workers_and_loses_nothing(
        r, pusher: LocalPusher, start_worker, start_old, queue_name) -> None:
    """1.0 drains; a 1.1 worker starts beside it; the 1.0 worker gets SIGTERM (supervisord's
    stop) and exits 0. Every notification arrives, exactly once: a graceful stop on either
    side sends nothing twice."""
    pusher.set_mode(delay=0.02)
    old = start_old()
    push(r, queue_name)
    wait_for(lambda: events_total(pusher) >= 300, 30, "the 1.0 worker draining")
    new = start_worker()
    old.signal(signal.SIGTERM)
    assert old.wait() == 0, old.log()
    wait_for(lambda: all_delivered(pusher, range(COUNT)), 90, "every notification delivered")
    wait_settled(r, queue_name)
    counts = delivered(pusher)
    assert [n for n, c in counts.items() if c > 1] == []
    assert dead(r, queue_name) == []
    assert new.alive


def test_a_1_0_worker_killed_mid_drain_is_recovered_by_a_1_1_worker(
        r, pusher: LocalPusher, start_worker, start_old, queue_name) -> None:
    """kill -9 on the old worker: the new one reaps its in-flight lists (1.0 keeps one per
    greenlet) and delivers them; duplicates only of what the old one had in flight."""
    pusher.set_mode(delay=0.05)
    old = start_old()
    push(r, queue_name)
    new = start_worker()
    wait_for(lambda: events_total(pusher) >= 300, 30, "both draining")
    held = sum(r.llen(k) for k in r.keys(f"{queue_name}:inflight:*{old.pid_tag}*"))
    old.kill()
    wait_for(lambda: all_delivered(pusher, range(COUNT)), 90, "every notification delivered")
    wait_settled(r, queue_name, gone=[old])
    duplicates = sum(c - 1 for c in delivered(pusher).values())
    assert duplicates <= max(held, 200)  # at most what was in flight at the kill (+ a call)
    assert dead(r, queue_name) == [] and new.alive


def test_a_rollback_to_1_0_hands_nothing_to_a_worker_that_cannot_send_it(
        r, pusher: LocalPusher, start_worker, start_old, queue_name) -> None:
    """1.1 parks a busy channel's overflow in lane lists 1.0 never reads. Stopping the 1.1
    worker while only a 1.0 worker runs gives those back to the queue (no 1.1 heir), so the
    1.0 worker delivers them all."""
    pusher.set_mode(delay=0.05)
    new = start_worker()
    r.rpush(queue_name, *[json.dumps({"channel": "busy", "n": n}) for n in range(COUNT)])
    wait_for(lambda: r.llen(f"{queue_name}:lane:busy") > 0, 30, "the busy channel parked")
    start_old()
    new.signal(signal.SIGTERM)
    assert new.wait() == 0, new.log()
    wait_for(lambda: all_delivered(pusher, range(COUNT)), 120, "every notification delivered")
    wait_settled(r, queue_name)
    assert dead(r, queue_name) == []
