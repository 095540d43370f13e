"""Crash safety: a worker killed with SIGKILL mid-drain loses nothing."""

from __future__ import annotations

import json

from tests.support import delivered as _delivered
from tests.support import inflight, inflight_lists, wait_for, wait_settled


def test_sigkill_mid_drain_then_restart_delivers_everything(r, pusher, start_worker,
                                                            queue_name):
    total = 2000  # one channel, 10 a call: ~4 s of drain at 20 ms a call, killed at 500
    pusher.set_mode(delay=0.02)
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(total)])
    first = start_worker()
    wait_for(lambda: len(pusher.events()) >= 500, what="the drain to be under way")
    first.kill()
    # Frozen by the kill: what it held in flight is exactly what may be sent twice.
    held = inflight(r, queue_name)
    assert held > 0, "the kill should have caught notifications in flight"
    start_worker()
    wait_for(lambda: len(_delivered(pusher)) == total, timeout=60,
             what="every notification delivered at least once")
    # "All delivered" turns true while the dead worker's lists may still hold what it had
    # already sent: only after its reap, with everything empty at once, is the drain over.
    wait_settled(r, queue_name, gone=[first])
    counts = _delivered(pusher)
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= held
    assert r.llen(f"{queue_name}:dead") == 0


def test_two_workers_one_killed_the_other_recovers_its_items(r, pusher, start_worker,
                                                             queue_name):
    total = 600
    pusher.set_mode(delay=0.05)
    a = start_worker()
    start_worker()
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(total)])
    wait_for(lambda: len(r.zrange(f"{queue_name}:workers", 0, -1)) == 2, what="two heartbeats")
    wait_for(lambda: any(n for k, n in inflight_lists(r, queue_name).items()
                         if a.pid_tag in k), what="the first worker to hold notifications")
    a.kill()
    held = sum(n for k, n in inflight_lists(r, queue_name).items() if a.pid_tag in k)
    assert held > 0
    wait_for(lambda: len(_delivered(pusher)) == total, timeout=60,
             what="the survivor to deliver everything, the dead one's in-flight items too")
    wait_settled(r, queue_name, gone=[a])
    assert len(r.zrange(f"{queue_name}:workers", 0, -1)) == 1
    assert sum(c - 1 for c in _delivered(pusher).values()) <= held


def test_a_frozen_worker_is_recovered_and_rejoins_when_it_thaws(r, pusher, start_worker,
                                                                queue_name):
    import signal

    total = 400
    pusher.set_mode(delay=0.05)
    a = start_worker()
    b = start_worker()
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(total)])
    wait_for(lambda: any(n for k, n in inflight_lists(r, queue_name).items()
                         if a.pid_tag in k), what="the first worker to hold notifications")
    a.signal(signal.SIGSTOP)  # frozen: no heartbeat, calls stall
    held = sum(n for k, n in inflight_lists(r, queue_name).items() if a.pid_tag in k)
    wait_for(lambda: "missed its heartbeat" in b.log(), timeout=15,
             what="the other worker to recover the frozen one's notifications")
    a.signal(signal.SIGCONT)
    wait_for(lambda: "declared dead" in a.log(), timeout=15, what="the thawed worker to notice")
    wait_for(lambda: len(_delivered(pusher)) == total, timeout=60, what="everything delivered")
    assert sum(c - 1 for c in _delivered(pusher).values()) <= held
    assert len(r.zrange(f"{queue_name}:workers", 0, -1)) == 2  # both registered again
    wait_settled(r, queue_name)
    assert r.llen(f"{queue_name}:dead") == 0
