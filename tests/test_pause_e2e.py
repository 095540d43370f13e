"""Pause, resume and quiet across worker processes, run as an operator would: `python worker.py
pause|resume|quiet|stats` and SIGTSTP, against our redis-server and the local Pusher server."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import pytest
import redis

from relay.redis_server import free_port
from tests.support import (
    WorkerProcess,
    all_delivered,
    delivered,
    events_total,
    pending,
    push,
    wait_for,
)
from tests.test_admin import admin


def stays(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """condition() holds throughout `seconds`: a "never" needs a span of time to be seen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{what} stopped holding"
        time.sleep(0.05)


def worker_id(r: redis.Redis, queue: str, proc: WorkerProcess) -> str:
    return wait_for(lambda: next((w.decode() for w in r.zrange(f"{queue}:workers", 0, -1)
                                  if proc.pid_tag in w.decode()), None),
                    what=f"worker {proc.proc.pid} registered")


def test_a_pause_holds_every_process_and_resume_delivers_everything(
        r, redis_server, pusher, start_worker, queue_name) -> None:
    workers = [start_worker(), start_worker()]
    paused = admin(redis_server, queue_name, "pause", "--reason", "pusher incident")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert paused.stdout.startswith(f"delivery paused on queue {queue_name} by ")
    assert "until `relay resume`: pusher incident" in paused.stdout
    for w in workers:  # each process says so once, with the reason and who
        wait_for(lambda w=w: "delivery paused by" in w.log(), 5, "the pause in each log")
    push(r, queue_name, 500, channels=50)
    stays(lambda: events_total(pusher) == 0, 3.0, "nothing delivered while paused")
    assert pending(r, queue_name) == {"queue": 500, "retry": 0, "inflight": 0,
                                      "parked": 0}  # none lost
    stats = admin(redis_server, queue_name, "stats")
    assert "DELIVERY PAUSED by " in stats.stdout and ": pusher incident" in stats.stdout
    data = json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)
    assert data["paused"]["reason"] == "pusher incident" and data["paused"]["until"] is None

    resumed = admin(redis_server, queue_name, "resume")
    assert resumed.returncode == 0 and "delivery resumed on queue" in resumed.stdout
    wait_for(lambda: all_delivered(pusher, range(500)), 30, "all 500 after the resume")
    assert set(delivered(pusher).values()) == {1}
    for w in workers:
        wait_for(lambda w=w: "delivery resumed (relay resume)" in w.log(), 5, "the resume")
        assert w.log().count("delivery paused by") == 1
    assert json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)[
        "paused"] is None


def test_a_pause_for_2s_resumes_by_itself_across_a_restart(
        r, redis_server, pusher, start_worker, queue_name) -> None:
    first = start_worker()
    out = admin(redis_server, queue_name, "pause", "--for", "2s", "--reason", "deploy")
    assert out.returncode == 0 and "(in 2 s): deploy" in out.stdout, out.stdout
    push(r, queue_name, 50, channels=5)
    wait_for(lambda: "delivery paused by" in first.log(), 5, "the first worker to see it")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    second = start_worker(wait=False)  # the restarted worker finds the pause in Redis
    while r.exists(f"{queue_name}:pause"):  # until Redis ends it (`--for`)
        assert events_total(pusher) == 0, "delivered while paused"
        time.sleep(0.02)
    wait_for(lambda: all_delivered(pusher, range(50)), 15, "delivery after the pause ran out")
    second.wait_started()
    # It started ~0.6 s into the pause here (1.4 s to spare), found it in Redis, and says so.
    assert "delivery paused by" in second.log(), second.log()
    wait_for(lambda: "delivery resumed (its --for ran out)" in second.log(), 5, "the resume")
    assert set(delivered(pusher).values()) == {1}


@pytest.mark.parametrize("how", ["SIGTSTP", "relay quiet"])
def test_quiet_finishes_what_it_holds_while_the_other_process_delivers(
        r, redis_server, pusher, start_worker, queue_name, how: str) -> None:
    pusher.set_mode(delay=0.5)  # 2 x 5 calls of 10 every 0.5 s: 1,000 last ~10 s
    quiet = start_worker(RELAY_POOL_SIZE="5", RELAY_PREFETCH="100")
    other = start_worker(RELAY_POOL_SIZE="5", RELAY_PREFETCH="100")
    wid = worker_id(r, queue_name, quiet)
    inflight = f"{queue_name}:inflight:{wid}:0"
    push(r, queue_name, 1000, channels=100)
    wait_for(lambda: r.llen(inflight) > 0, 10, "the worker to hold some")
    if how == "SIGTSTP":
        quiet.signal(signal.SIGTSTP)
    else:
        out = admin(redis_server, queue_name, "quiet", wid.rsplit(":", 1)[0])  # a unique start
        assert out.returncode == 0 and f"worker {wid} goes quiet" in out.stdout, out.stdout
    wait_for(lambda: f"quiet ({how}," in quiet.log(), 5, "the quiet line")
    # There is more it could take (queued, or parked for the channels' owners).
    assert events_total(pusher) + r.llen(inflight) < 1000
    # Once it is marked quiet in Redis, no fetch of it takes anything (every fetch before
    # the mark has moved its items already): what it holds only shrinks, to nothing.
    wait_for(lambda: r.hexists(f"{queue_name}:quiet", wid), 5, "the quiet mark in Redis")
    held = [r.llen(inflight)]

    def shrinks_to_nothing() -> bool:
        held.append(r.llen(inflight))
        assert held[-1] <= held[-2], f"the quiet worker took more: {held}"
        return held[-1] == 0 and "it may be restarted now" in quiet.log()

    wait_for(shrinks_to_nothing, 30, "the quiet worker to hold nothing")
    wait_for(lambda: all_delivered(pusher, range(1000)), 60, "the other to deliver the rest")
    assert set(delivered(pusher).values()) == {1}
    assert quiet.alive and other.alive
    stats = admin(redis_server, queue_name, "stats")
    assert f"worker {wid}: 0 in flight" in stats.stdout and "QUIET since" in stats.stdout
    assert "may be restarted" in stats.stdout
    started = time.monotonic()
    quiet.signal(signal.SIGTERM)
    assert quiet.wait(timeout=10) == 0
    assert time.monotonic() - started < 3  # nothing in flight to wait for
    assert "stopped; 0 notification(s)" in quiet.log()
    assert other.alive and "quiet" not in other.log()


def test_bad_input_and_an_unreachable_redis_get_one_line_and_exit_2(
        r, redis_server, queue_name) -> None:
    bad = admin(redis_server, queue_name, "pause", "--for", "soon")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == ("relay: pause --for: not a duration: 'soon' (try 30s, 10m, 2h, 7d) "
                          "(nothing was paused)\n")
    assert admin(redis_server, queue_name, "pause", "--for", "0s").returncode == 2
    assert not r.exists(f"{queue_name}:pause")
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["pause"], ["resume"], ["quiet", "w"]):
        out = admin(redis_server, queue_name, *args, REDIS_URL=nowhere)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stdout.count("\n") == 1 and "Connection refused" in out.stdout
        assert out.stdout.endswith("(nothing was changed)\n")
    unknown = admin(redis_server, queue_name, "quiet", "no-such-worker")
    assert unknown.returncode == 1 and "no registered worker is 'no-such-worker'" in \
        unknown.stdout
    not_paused = admin(redis_server, queue_name, "resume")
    assert not_paused.returncode == 0 and "was not paused" in not_paused.stdout
