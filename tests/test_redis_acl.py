"""ACL users: the README's exact rules, applied with ACL SETUSER. The worker, the admin
commands and the producer run as those users; a worker user missing a right stops the
worker at start (exit 2, the refused command named) and nothing is taken from the queue."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from relay import producer
from tests.support import ROOT, wait_for

WORKER_PW, PRODUCER_PW = "w0rker-secret", "pr0ducer-secret"


def readme_rules(queue: str, cluster: bool = False) -> dict[str, list[str]]:
    """The `ACL SETUSER relay-...` lines of the README (those for a cluster, or the others),
    for this queue, as arguments."""
    text = (ROOT / "README.md").read_text()
    rules = {}
    for line in re.findall(r"^ACL SETUSER relay-\S+ .*$", text, re.MULTILINE):
        if ("+cluster|slots" in line) != cluster:
            continue
        line = line.replace("WORKER_PASSWORD", WORKER_PW).replace("PRODUCER_PASSWORD",
                                                                  PRODUCER_PW)
        words = [w.replace("notifications", queue) if w.startswith("~") else w
                 for w in line.split()]
        rules[words[2]] = words[3:]
    assert set(rules) == {"relay-worker", "relay-producer"}, rules
    return rules


@pytest.fixture
def users(r: redis.Redis, queue_name: str) -> Iterator[dict[str, list[str]]]:
    rules = readme_rules(queue_name)
    for name, args in rules.items():
        r.execute_command("ACL", "SETUSER", name, *args)
    yield rules
    for name in rules:
        r.execute_command("ACL", "DELUSER", name)


def _url(redis_server, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0"


def _admin(url: str, queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"REDIS_URL": url, "RELAY_QUEUE": queue, "RELAY_METRICS_ADDR": "off",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_worker_admin_and_producer_run_as_the_readme_users(
        users, r, redis_server, pusher, start_worker, queue_name, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", _url(redis_server, "relay-producer", PRODUCER_PW))
    client = producer.client_from_env()
    p = producer.Producer(client, queue_name)
    for i in range(20):
        p.notify("c", {"n": i})
    client.rpush(queue_name, "not json")  # an app's bug: the worker dead-letters it
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.llen(queue_name)  # push, nothing else
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.rpush("another-list", "x")
    p.close()
    url = _url(redis_server, "relay-worker", WORKER_PW)
    worker = start_worker(REDIS_URL=url, RELAY_RATE_LIMIT="1000")
    wait_for(lambda: len(pusher.events()) == 20 and r.llen(f"{queue_name}:dead") == 1,
             timeout=30, what="delivery and the dead letter, as the worker user")
    stats = _admin(url, queue_name, "stats", "--json")
    assert stats.returncode == 0, stats.stdout + stats.stderr
    assert json.loads(stats.stdout)["dead"] == 1
    for args in (["dead", "list"], ["dead", "purge"], ["enqueue", "c", '{"n": 99}'],
                 ["check"]):
        done = _admin(url, queue_name, *args)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    wait_for(lambda: len(pusher.events()) == 21, what="the enqueued notification")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    log = worker.log()
    assert "NOPERM" not in log and "NoPermission" not in log and "Traceback" not in log, log
    assert WORKER_PW not in log


def test_a_worker_user_missing_a_right_exits_2_naming_it(
        users, r, redis_server, start_worker, queue_name) -> None:
    rules = [w for w in users["relay-worker"] if w != "+blmove"]
    r.execute_command("ACL", "SETUSER", "relay-worker", "reset", *rules)
    r.rpush(queue_name, *[json.dumps({"channel": "c", "n": i}) for i in range(5)])
    worker = start_worker(wait=False, REDIS_URL=_url(redis_server, "relay-worker", WORKER_PW))
    assert worker.wait() == 2
    log = worker.log()
    refused = [line for line in log.splitlines() if "refused a command" in line]
    assert len(refused) == 1 and "'blmove'" in refused[0], log
    assert WORKER_PW not in log and "Traceback" not in log, log
    assert r.llen(queue_name) == 5
    assert not r.keys(f"{queue_name}:inflight:*")
