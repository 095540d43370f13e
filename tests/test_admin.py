"""Admin subcommands of `python worker.py`, run as a user would, against our redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from relay.queue import RedisQueue
from relay.redis_server import free_port
from tests.support import ROOT, wait_for


def admin(redis_server, queue_name, *args, timeout=30, **env):
    full_env = {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
                "RELAY_METRICS_ADDR": "off", "PATH": "/usr/bin:/bin", **env}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def _dead_entry(payload, error="HTTP 400: bad", failed_at=None, attempts=1):
    return json.dumps({"payload": payload, "error": error, "attempts": attempts,
                       "failed_at": time.time() if failed_at is None else failed_at})


def test_stats_text_and_json(r, redis_server, queue_name):
    r.rpush(queue_name, "a", "b", "c")
    r.rpush(f"{queue_name}:dead", _dead_entry("x"))
    r.zadd(f"{queue_name}:retry", {"w": time.time() + 60})
    r.hset(f"{queue_name}:stats", mapping={"delivered": 12})
    out = admin(redis_server, queue_name, "stats")
    assert out.returncode == 0, out.stderr
    assert "3 waiting" in out.stdout and "1 dead" in out.stdout
    assert "1 scheduled for retry" in out.stdout and "delivered 12" in out.stdout
    data = json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)
    assert (data["length"], data["dead"], data["retry_scheduled"]) == (3, 1, 1)
    assert data["totals"]["delivered"] == 12


def test_stats_has_a_line_per_app_when_several_are_configured(r, redis_server, queue_name):
    """What the settle scripts keep per app, and what workers publish of each app's circuit
    and rate limit; read from Redis alone (this command has no RELAY_APPS)."""
    r.hset(f"{queue_name}:stats", mapping={
        "delivered": 15, "dead": 1, "app:default:delivered": 12, "app:tenant-b:delivered": 3,
        "app:tenant-b:dead": 1})
    info = {"circuits": [{"app": "default", "open": False, "reason": None},
                         {"app": "tenant-b", "open": True, "reason": "HTTP 401: Unauthorized"}],
            "rate_limits": {"default": {"per_s": 0, "burst": 0},
                            "tenant-b": {"per_s": 20, "burst": 20}}}
    r.hset(f"{queue_name}:workers:info", "host:1:abc", json.dumps(info))
    out = admin(redis_server, queue_name, "stats")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "  app default: delivered 12; circuit closed; no rate limit" in lines
    assert ("  app tenant-b: dead 1, delivered 3; circuit OPEN in 1 worker(s): HTTP 401: "
            "Unauthorized; rate limit 20/s burst 20: 0 of the burst in use") in lines
    assert "totals: dead 1, delivered 15" in lines
    data = json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)
    assert data["apps"]["tenant-b"] == {
        "totals": {"delivered": 3, "dead": 1},
        "circuit": {"open_in": ["host:1:abc"], "reason": "HTTP 401: Unauthorized"},
        "rate_limit": {"limit_per_s": 20.0, "burst": 20, "budget_used_events": 0.0}}
    assert data["apps"]["default"]["totals"] == {"delivered": 12}
    assert data["totals"] == {"delivered": 15, "dead": 1}


def test_stats_with_one_app_has_no_app_lines(r, redis_server, queue_name):
    r.hset(f"{queue_name}:stats", mapping={"delivered": 2})
    out = admin(redis_server, queue_name, "stats")
    assert " app " not in out.stdout
    assert json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)["apps"] is None


def test_stats_shows_each_worker_with_its_inflight_and_heartbeat_age(r, redis_server,
                                                                     pusher, start_worker,
                                                                     queue_name):
    pusher.set_mode(hang=True)
    # A long heartbeat TTL: a loaded machine may starve the worker for seconds, and the age
    # must then still read as fresh (the bound is the TTL, not how fast this machine is).
    start_worker(PUSHER_TIMEOUT="30", RELAY_HEARTBEAT_TTL="60")
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(5)])

    def stats() -> dict | None:
        data = json.loads(admin(redis_server, queue_name, "stats", "--json").stdout)
        return data if data["inflight"] == 5 else None

    data = wait_for(stats, 30, "stats to show 5 in flight", interval=0.2)
    [worker] = data["workers"]
    assert worker["inflight"] == 5 and 0 <= worker["heartbeat_age_s"] < 60
    assert worker["expired"] is False
    pusher.clear_mode()


def test_dead_list_shows_reason_attempts_and_payload(r, redis_server, queue_name):
    r.rpush(f"{queue_name}:dead", _dead_entry('{"channel":"c","title":"boom"}',
                                              error="HTTP 413: too big", attempts=3))
    out = admin(redis_server, queue_name, "dead", "list", "--limit", "5")
    assert out.returncode == 0
    assert "HTTP 413: too big" in out.stdout and "attempts=3" in out.stdout
    assert '"title":"boom"' in out.stdout and "1 of 1" in out.stdout


def test_dead_requeue_match_moves_only_matching_entries(r, redis_server, queue_name):
    r.rpush(f"{queue_name}:dead", _dead_entry('{"channel":"a"}'), _dead_entry('{"channel":"b"}'))
    out = admin(redis_server, queue_name, "dead", "requeue", "--match", '"a"')
    assert out.returncode == 0 and "requeued 1" in out.stdout
    assert r.lrange(queue_name, 0, -1) == [b'{"channel":"a"}']
    assert r.llen(f"{queue_name}:dead") == 1


def test_dead_requeue_needs_all_or_match_said_in_one_line(r, redis_server, queue_name):
    r.rpush(f"{queue_name}:dead", _dead_entry('{"channel":"a"}'))
    out = admin(redis_server, queue_name, "dead", "requeue")
    assert out.returncode == 2
    assert out.stderr == ("relay: dead requeue: say which dead letters: --all, or --match TEXT "
                          "(nothing was moved)\n")
    assert out.stdout == "" and r.llen(f"{queue_name}:dead") == 1


def _classed(payload, error_class, error):
    return json.dumps({"payload": payload, "error": error, "error_class": error_class,
                       "attempts": 1, "failed_at": time.time()})


def test_dead_requeue_skips_invalid_ones_unless_asked(r, redis_server, queue_name):
    r.rpush(f"{queue_name}:dead", _classed("not json", "invalid", "not JSON"),
            _classed('{"channel":"a"}', "exhausted", "HTTP 503"))
    out = admin(redis_server, queue_name, "dead", "requeue", "--all")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first == f"requeued 1 dead letter(s) to {queue_name}"
    assert second.startswith("skipped 1 invalid dead letter(s) (e.g. 'not JSON'): the worker "
                             "would dead-letter them again at once")
    assert "--include-invalid" in second
    assert r.lrange(queue_name, 0, -1) == [b'{"channel":"a"}']
    # Only invalid ones left: nothing moved (exit 1), and the line says why.
    out = admin(redis_server, queue_name, "dead", "requeue", "--match", "not")
    assert out.returncode == 1 and "skipped 1 invalid" in out.stdout
    out = admin(redis_server, queue_name, "dead", "requeue", "--all", "--include-invalid")
    assert out.returncode == 0 and out.stdout == f"requeued 1 dead letter(s) to {queue_name}\n"
    assert r.lrange(queue_name, 0, -1) == [b'{"channel":"a"}', b"not json"]
    assert r.llen(f"{queue_name}:dead") == 0


def test_two_operators_requeue_all_at_once_every_entry_back_exactly_once(r, redis_server,
                                                                         queue_name):
    payloads = [json.dumps({"channel": "c", "n": i}) for i in range(300)]
    r.rpush(f"{queue_name}:dead", *[_dead_entry(p) for p in payloads])
    env = {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
           "RELAY_METRICS_ADDR": "off"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "dead", "requeue",
                               "--all"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode in (0, 1) for p in procs)
    counts = Counter(x.decode() for x in r.lrange(queue_name, 0, -1))
    assert counts == Counter(payloads)  # each once: none lost, none doubled
    assert r.llen(f"{queue_name}:dead") == 0
    moved = sum(int(o.split()[1]) for o in outputs)
    assert moved == 300


def test_dead_purge_older_than(r, redis_server, queue_name):
    now = time.time()
    r.rpush(f"{queue_name}:dead", _dead_entry("old", failed_at=now - 3 * 86400),
            _dead_entry("new", failed_at=now - 60))
    out = admin(redis_server, queue_name, "dead", "purge", "--older-than", "2d")
    assert out.returncode == 0 and "purged 1" in out.stdout
    [left] = r.lrange(f"{queue_name}:dead", 0, -1)
    assert json.loads(left)["payload"] == "new"
    assert admin(redis_server, queue_name, "dead", "purge", "--older-than", "soon"
                 ).returncode == 2
    assert "purged 1" in admin(redis_server, queue_name, "dead", "purge").stdout


def test_enqueue_pushes_through_the_producer(r, redis_server, queue_name):
    out = admin(redis_server, queue_name, "enqueue", "site-1", '{"title": "hi"}')
    assert out.returncode == 0, out.stdout + out.stderr
    pushed = json.loads(r.lpop(queue_name))
    assert pushed["channels"] == ["site-1"] and pushed["data"] == {"title": "hi"}
    assert "event" not in pushed and pushed["enqueued_at"] > 0  # the worker's RELAY_EVENT
    out = admin(redis_server, queue_name, "enqueue", "site-1", '{"title": "hi"}',
                "--event", "update")
    assert out.returncode == 0
    pushed = json.loads(r.lpop(queue_name))
    assert pushed["event"] == "update" and pushed["channels"] == ["site-1"]


def test_enqueue_takes_the_data_limit_from_relay_max_data_bytes(r, redis_server, queue_name):
    data = json.dumps({"body": "y" * 15000})
    out = admin(redis_server, queue_name, "enqueue", "c", data)
    assert out.returncode == 2 and "over the limit of 10240" in out.stdout
    out = admin(redis_server, queue_name, "enqueue", "c", data, RELAY_MAX_DATA_BYTES="20000")
    assert out.returncode == 0, out.stdout
    assert r.llen(queue_name) == 1


@pytest.mark.parametrize("args", [("bad channel", "{}"), ("c", "{not json")])
def test_enqueue_refuses_bad_input_and_pushes_nothing(r, redis_server, queue_name, args):
    out = admin(redis_server, queue_name, "enqueue", *args)
    assert out.returncode == 2
    assert r.llen(queue_name) == 0


def test_check_without_metrics_needs_a_live_worker(r, redis_server, pusher, start_worker,
                                                   queue_name):
    assert admin(redis_server, queue_name, "check").returncode == 1
    start_worker()
    out = admin(redis_server, queue_name, "check")
    assert out.returncode == 0 and "1 live worker" in out.stdout


def advertise(r, queue_name, worker_id, ttl=30, **info):
    """A registered worker whose heartbeat info carries `info` (metrics_addr, host...)."""
    RedisQueue(r, queue_name, worker_id=worker_id).heartbeat(ttl)
    found = json.loads(r.hget(f"{queue_name}:workers:info", worker_id))
    r.hset(f"{queue_name}:workers:info", worker_id, json.dumps({**found, **info}))


def test_check_asks_every_live_worker_at_the_address_it_publishes(
        r, redis_server, pusher, start_worker, queue_name):
    """Issue 21, stumble 13: the second process's /healthz is found without --metrics-addr.
    One real worker answers (and publishes its own address); fabricated entries stand for
    its siblings."""
    port = free_port()
    real = start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    advertise(r, queue_name, "here:1:aa", metrics_addr=f"127.0.0.1:{port}")
    advertise(r, queue_name, "here:2:bb", metrics_addr=f"0.0.0.0:{port}")  # a wildcard bind
    advertise(r, queue_name, "here:3:cc", metrics_addr="off")
    advertise(r, queue_name, "far:4:dd", metrics_addr="127.0.0.1:9300", host="elsewhere")
    advertise(r, queue_name, "gone:5:ee", metrics_addr=f"127.0.0.1:{free_port()}")
    advertise(r, queue_name, "dead:6:ff", metrics_addr=f"127.0.0.1:{free_port()}")
    r.zincrby(f"{queue_name}:workers", -3600, "dead:6:ff")  # expired: not asked
    out = admin(redis_server, queue_name, "check", RELAY_METRICS_ADDR="off")
    assert out.returncode == 1, out.stdout  # gone:5 does not answer
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines()[:-1])
    assert lines[f"worker here:1:aa at 127.0.0.1:{port}"].startswith('{"status": "ok"')
    assert lines[f"worker here:2:bb at 127.0.0.1:{port}"].startswith('{"status": "ok"')
    assert "no /healthz to ask" in lines["worker here:3:cc"]
    assert "loopback on host elsewhere: run check there" in lines["worker far:4:dd"]
    [gone] = [v for k, v in lines.items() if k.startswith("worker gone:5:ee at ")]
    assert gone.startswith("unhealthy: no answer from http://127.0.0.1:")
    assert not any("dead:6:ff" in line for line in out.stdout.splitlines())
    [own] = [v for k, v in lines.items() if f":{real.proc.pid}:" in k]
    assert own.startswith('{"status": "ok"')
    assert out.stdout.splitlines()[-1] == f"5 of 6 live worker(s) on {queue_name} healthy"
    r.zrem(f"{queue_name}:workers", "gone:5:ee")
    out = admin(redis_server, queue_name, "check", RELAY_METRICS_ADDR="off")
    assert out.returncode == 0, out.stdout
    assert out.stdout.splitlines()[-1] == f"5 of 5 live worker(s) on {queue_name} healthy"


def test_check_falls_back_to_relay_metrics_addr_when_no_worker_publishes_one(
        r, redis_server, pusher, start_worker, queue_name):
    """Workers of 1.0 publish no address: the check asks RELAY_METRICS_ADDR instead. One such
    worker registered here; the /healthz at that address is a real worker of another queue."""
    port = free_port()
    advertise(r, queue_name, "old:1:aa")
    info = json.loads(r.hget(f"{queue_name}:workers:info", "old:1:aa"))
    info.pop("metrics_addr", None)
    r.hset(f"{queue_name}:workers:info", "old:1:aa", json.dumps(info))
    start_worker(RELAY_METRICS_ADDR=f"127.0.0.1:{port}", RELAY_QUEUE=f"{queue_name}-other")
    out = admin(redis_server, queue_name, "check", RELAY_METRICS_ADDR=f"127.0.0.1:{port}")
    assert out.returncode == 0 and out.stdout.startswith('{"status": "ok"'), out.stdout
    out = admin(redis_server, queue_name, "check", RELAY_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and out.stdout.startswith("unhealthy: no answer"), out.stdout


def test_admin_commands_need_no_pusher_credentials_and_fail_cleanly_without_redis(
        queue_name, redis_server):
    out = subprocess.run([sys.executable, str(ROOT / "worker.py"), "stats"], cwd=ROOT,
                         env={"REDIS_URL": "redis://127.0.0.1:1/0", "RELAY_QUEUE": queue_name},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stdout.startswith("stats failed: Redis at redis://127.0.0.1:1/0: ConnectionError")
    assert "refused" in out.stdout.lower()


def test_admin_redis_failure_masks_the_password(queue_name):
    out = subprocess.run([sys.executable, str(ROOT / "worker.py"), "dead", "list"], cwd=ROOT,
                         env={"REDIS_URL": "redis://u:hunter2-secret@127.0.0.1:1/0",
                              "RELAY_QUEUE": queue_name}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1
    assert "dead failed: Redis at redis://***@127.0.0.1:1/0" in out.stdout
    assert "hunter2" not in out.stdout + out.stderr


@pytest.mark.parametrize("verb", [("requeue", "--match", "nomatch"), ("requeue", "--all"),
                                  ("purge", "--older-than", "7d"), ("purge",)])
def test_requeue_or_purge_that_moves_nothing_exits_1(r, redis_server, queue_name, verb):
    if verb[0] != "purge" or len(verb) > 1:  # leave one entry that matches no filter
        r.rpush(f"{queue_name}:dead", _dead_entry('{"channel":"a"}', failed_at=time.time()))
    if verb == ("requeue", "--all"):
        r.delete(f"{queue_name}:dead")
    out = admin(redis_server, queue_name, "dead", *verb)
    assert out.returncode == 1, out.stdout + out.stderr
    assert " 0 dead letter(s)" in out.stdout


def test_stats_watch_refreshes_in_place_until_interrupted(r, redis_server, queue_name,
                                                          tmp_path):
    import signal

    from tests.support import wait_for

    out = tmp_path / "watch.out"
    env = {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name, "RELAY_METRICS_ADDR": "off"}
    with open(out, "wb") as sink:
        # A suite started in the background by a script runs with SIGINT ignored, and the
        # child would inherit that (Python then installs no KeyboardInterrupt): reset it.
        proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), "stats", "--watch"],
                                cwd=ROOT, env=env, stdout=sink,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(lambda: out.read_bytes().count(b"\x1b[H\x1b[2J") >= 1, 20, "a frame")
            r.rpush(queue_name, "x", "y")
            wait_for(lambda: b"2 waiting" in out.read_bytes(), 20, "a refreshed frame")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert out.read_bytes().count(b"\x1b[H\x1b[2J") >= 2
