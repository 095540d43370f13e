"""Many Pusher apps end to end (RELAY_APPS, issue 23): a real redis-server, the local Pusher
server serving three apps with their own credentials (it checks each request's signature
against the app its path names), and the engine in-process where it can be; worker processes
where a process is needed (two processes sharing a rate limit, SIGHUP).

Every notification carries `{"n": number, "for": app}` in its data, so what each app's server
received says where it was meant to go.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from relay import producer
from relay.health import HealthServer
from relay.pusher_server import AppCredentials, LocalPusher
from relay.redis_server import RedisServer, free_port
from tests.support import (
    Running,
    WorkerProcess,
    dead,
    healthz,
    metrics,
    pending,
    serving,
    wait_for,
    worker_processes,
)

pytestmark = pytest.mark.timeout(60)

DEFAULT_ID, TENANT_ID, ADDED_ID = "1", "2", "3"
CREDENTIALS = [AppCredentials(DEFAULT_ID, "key-1", "secret-1"),
               AppCredentials(TENANT_ID, "key-2", "secret-2"),
               AppCredentials(ADDED_ID, "key-3", "secret-3")]


@pytest.fixture(scope="module")
def server() -> Iterator[LocalPusher]:
    first, *others = CREDENTIALS
    with LocalPusher(first.app_id, first.key, first.secret, extra_apps=others) as local:
        yield local


@pytest.fixture
def local(server: LocalPusher) -> LocalPusher:
    server.reset()
    return server


def write_apps(path: Path, local: LocalPusher, names: dict[str, str], extra: str = "") -> str:
    """A RELAY_APPS file: {relay's app name: the local server's app id}; `extra` is appended
    (more keys for the last table)."""
    path.write_text(local.apps_toml(names) + extra)
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def env(redis_server: RedisServer, local: LocalPusher, queue_name: str, tmp_path: Path
        ) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
            "RELAY_APPS": write_apps(tmp_path / "apps.toml", local,
                                     {"default": DEFAULT_ID, "tenant-b": TENANT_ID}),
            "RELAY_METRICS_ADDR": "off", "RELAY_HEARTBEAT_TTL": "2", "PUSHER_TIMEOUT": "2",
            "RELAY_POOL_SIZE": "10"}


@pytest.fixture
def serve(env: dict[str, str]) -> Iterator[Callable[..., Running]]:
    """serve(burst=..., **settings): the worker the launcher builds, in a greenlet here."""
    with serving(env) as start:
        yield start


@pytest.fixture
def processes(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    with worker_processes(env, tmp_path) as start:
        yield start


def push(r: redis.Redis, queue: str, app: str | None, numbers: range | list[int],
         channels: int = 10) -> None:
    """Envelopes for `app` (None: the default app, named by no field), numbered."""
    texts = [producer.encode(f"c{n % channels}", {"n": n, "for": app or "default"}, "e",
                             app=app) for n in numbers]
    r.rpush(queue, *texts)


def push_interleaved(r: redis.Redis, queue: str, count: int) -> None:
    """Even numbers for the default app (classic messages and envelopes naming no app), odd
    ones for tenant-b, in one list in number order."""
    texts = []
    for n in range(count):
        if n % 2:
            texts.append(producer.encode(f"c{n % 20}", {"n": n, "for": "tenant-b"}, "e",
                                         app="tenant-b"))
        elif n % 4:
            texts.append(producer.encode(f"c{n % 20}", {"n": n, "for": "default"}, "e"))
        else:
            texts.append(json.dumps({"channel": f"c{n % 20}", "n": n, "for": "default"}))
    r.rpush(queue, *texts)


def received(local: LocalPusher, app_id: str) -> list[dict[str, Any]]:
    """The data of every event one app of the local server accepted."""
    return [json.loads(e["data"]) for e in local.events(app_id)]


def numbers(local: LocalPusher, app_id: str) -> Counter[int]:
    return Counter(d["n"] for d in received(local, app_id))


def count(local: LocalPusher, app_id: str) -> int:
    return int(local.count(app_id)["events_total"])


# -- routing ---------------------------------------------------------------------------------


def test_interleaved_notifications_each_reach_their_own_app_signed_with_its_secret(
        r: redis.Redis, local: LocalPusher, serve: Callable[..., Running],
        queue_name: str) -> None:
    push_interleaved(r, queue_name, 1000)
    assert serve(burst=True).greenlet.get(timeout=40) == 0
    # Each app's server took only its own (a call signed with the other app's secret, or a
    # batch holding the other app's notification, would be a 401 or land at the wrong app).
    assert numbers(local, DEFAULT_ID) == Counter(range(0, 1000, 2))
    assert numbers(local, TENANT_ID) == Counter(range(1, 1000, 2))
    assert {d["for"] for d in received(local, DEFAULT_ID)} == {"default"}
    assert {d["for"] for d in received(local, TENANT_ID)} == {"tenant-b"}
    by_app = local.stats(requests=False)["apps"]
    assert by_app[DEFAULT_ID]["by_status"] == {"200": by_app[DEFAULT_ID]["requests_total"]}
    assert by_app[TENANT_ID]["by_status"] == {"200": by_app[TENANT_ID]["requests_total"]}
    # batched: far fewer calls than notifications, for each app
    assert by_app[DEFAULT_ID]["requests_total"] < 250 and by_app[TENANT_ID]["requests_total"] < 250
    assert by_app[ADDED_ID]["requests_total"] == 0
    assert r.llen(f"{queue_name}:dead") == 0 and not any(pending(r, queue_name).values())
    stats = {k.decode(): int(v) for k, v in r.hgetall(f"{queue_name}:stats").items()}
    assert (stats["delivered"], stats["app:default:delivered"],
            stats["app:tenant-b:delivered"]) == (1000, 500, 500)


def test_a_notification_naming_an_unknown_app_is_dead_lettered_naming_it(
        r: redis.Redis, local: LocalPusher, serve: Callable[..., Running],
        queue_name: str) -> None:
    push(r, queue_name, "tenant-x", [1])
    push(r, queue_name, None, [2])
    assert serve(burst=True).greenlet.get(timeout=30) == 0
    [letter] = dead(r, queue_name)
    assert letter["error"] == "unknown app 'tenant-x' (known apps: default, tenant-b)"
    assert letter["error_class"] == "invalid" and letter["app"] == "tenant-x"
    assert json.loads(letter["payload"])["app"] == "tenant-x"
    assert numbers(local, DEFAULT_ID) == Counter([2])


# -- isolation -------------------------------------------------------------------------------


def test_one_apps_401_neither_stops_the_other_nor_loses_its_own(
        r: redis.Redis, local: LocalPusher, serve: Callable[..., Running],
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    local.set_mode(app_id=TENANT_ID, status=401)  # tenant-b's credentials revoked
    running = serve()
    health = HealthServer("127.0.0.1:0", running.worker.metrics.registry,
                          running.worker.health, None)
    health.start()
    try:
        push(r, queue_name, "tenant-b", range(100, 150))
        wait_for(lambda: running.worker.routes.get("tenant-b").circuit.is_open, 15,
                 "tenant-b's circuit to open")
        # The other app drains at full speed while tenant-b's circuit is open: three rounds
        # of 200, each delivered in full before the next is pushed.
        started = time.monotonic()
        for round_ in range(3):
            push(r, queue_name, None, range(round_ * 200, (round_ + 1) * 200))
            wait_for(lambda n=(round_ + 1) * 200: count(local, DEFAULT_ID) >= n, 15,
                     f"round {round_} of the default app")
        took = time.monotonic() - started
        assert took < 4.5, f"the default app drained 600 in {took:.1f} s beside an outage"
        assert count(local, TENANT_ID) == 0
        status, body = healthz(health.port)
        assert status == 200, body  # one app's outage is not the worker's
        assert body["circuit"]["default"] == "closed"
        assert body["circuit"]["tenant-b"].startswith("open: ")
        samples = metrics(health.port)
        assert samples['relay_circuit_open{app="tenant-b"}'] == 1
        assert samples['relay_circuit_open{app="default"}'] == 0
        assert samples['relay_notifications_delivered_total{app="default"}'] == 600
        assert samples['relay_pusher_calls_total{app="tenant-b",status="4xx"}'] >= 1
        wait_for(lambda: started + 5 <= time.monotonic(), 10, "5 s of 401")
        local.clear_mode(TENANT_ID)  # the credentials work again
        wait_for(lambda: count(local, TENANT_ID) >= 50, 25, "tenant-b's 50 after recovery")
        assert numbers(local, TENANT_ID) == Counter(range(100, 150))
        assert numbers(local, DEFAULT_ID) == Counter(range(600))
        assert dead(r, queue_name) == []
        wait_for(lambda: not running.worker.routes.get("tenant-b").circuit.is_open, 10,
                 "tenant-b's circuit to close")
    finally:
        health.stop()
    assert running.stop() == 0
    assert not any(pending(r, queue_name).values())
    # the failure lines name the app (several apps are configured)
    assert "circuit open for app tenant-b: HTTP 401" in caplog.text
    assert "circuit closed for app tenant-b: Pusher accepts calls again" in caplog.text
    assert "circuit open: " not in caplog.text and "secret-" not in caplog.text


def test_each_apps_rate_limit_is_shared_by_two_processes(
        r: redis.Redis, local: LocalPusher, processes: Callable[..., WorkerProcess],
        queue_name: str, env: dict[str, str], tmp_path: Path) -> None:
    rate = 20
    path = write_apps(tmp_path / "limited.toml", local,
                      {"default": DEFAULT_ID, "tenant-b": TENANT_ID}, f"rate_limit = {rate}\n")
    ports = [free_port(), free_port()]
    # Windows of 200: the first process to fetch does not take everything.
    workers = [processes(RELAY_APPS=path, RELAY_METRICS_ADDR=f"127.0.0.1:{port}",
                         RELAY_PREFETCH="200") for port in ports]
    push_one_in_seven(r, queue_name)
    wait_for(lambda: count(local, DEFAULT_ID) >= 600, 20, "the default app's 600")
    default_done = max(e["received_at"] for e in local.events(DEFAULT_ID))
    wait_for(lambda: count(local, TENANT_ID) >= 100, 25, "tenant-b's 100")
    tenant = sorted(e["received_at"] for e in local.events(TENANT_ID))
    # GCRA: a burst of at most a second's worth, then the rate; both processes together.
    measured = (len(tenant) - rate) / (tenant[-1] - tenant[0])
    assert measured <= rate * 1.1, f"tenant-b at {measured:.1f}/s, limit {rate}/s"
    # The default app has no limit: far above tenant-b's rate, never waiting for budget.
    first = min(e["received_at"] for e in local.events(DEFAULT_ID))
    assert 600 / (default_done - first) > 3 * rate, default_done - first
    assert numbers(local, TENANT_ID) == Counter(range(0, 700, 7))
    per_process = [metrics(port) for port in ports]
    shares = [m['relay_notifications_delivered_total{app="tenant-b"}'] for m in per_process]
    assert sum(shares) == 100 and all(shares), shares  # both processes sent tenant-b's
    assert sum(m['relay_notifications_delivered_total{app="default"}']
               for m in per_process) == 600
    assert any(m['relay_rate_limit_waits_total{app="tenant-b"}'] for m in per_process)
    assert all(m['relay_rate_limit_waits_total{app="default"}'] == 0 for m in per_process)
    assert healthz(ports[0])[1]["circuit"] == {"default": "closed", "tenant-b": "closed"}
    for proc in workers:
        proc.signal(signal.SIGTERM)
    assert [proc.wait() for proc in workers] == [0, 0]


def push_one_in_seven(r: redis.Redis, queue: str) -> None:
    """700 notifications: tenant-b's 100 (multiples of 7) among the default app's 600."""
    texts = []
    for n in range(700):
        app = "tenant-b" if n % 7 == 0 else None
        texts.append(producer.encode(f"c{n % 40}", {"n": n, "for": app or "default"}, "e",
                                     app=app))
    r.rpush(queue, *texts)


def test_a_rate_limited_app_does_not_hold_back_the_others(
        r: redis.Redis, local: LocalPusher, serve: Callable[..., Running], queue_name: str,
        tmp_path: Path) -> None:
    """The greenlets do not queue up behind one app's limiter: while one waits for tenant-b's
    budget, the others send the default app's calls."""
    rate = 40
    path = write_apps(tmp_path / "limited.toml", local,
                      {"default": DEFAULT_ID, "tenant-b": TENANT_ID}, f"rate_limit = {rate}\n")
    running = serve(RELAY_APPS=path)
    started = time.time()
    push(r, queue_name, "tenant-b", range(400), channels=40)  # 10 s of budget, all ahead
    push(r, queue_name, None, range(400, 1000), channels=40)
    wait_for(lambda: count(local, DEFAULT_ID) >= 600, 20, "the default app's 600")
    default_done = max(e["received_at"] for e in local.events(DEFAULT_ID))
    assert default_done - started < 2.5, default_done - started
    tenant = sorted(e["received_at"] for e in local.events(TENANT_ID))
    assert len(tenant) < 200, len(tenant)  # tenant-b is still far from done
    assert running.stop() == 0
    tenant = sorted(e["received_at"] for e in local.events(TENANT_ID))
    assert (len(tenant) - rate) / (tenant[-1] - tenant[0]) <= rate * 1.1
    assert not dead(r, queue_name)


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_adds_and_removes_apps_and_a_bad_file_keeps_the_old_ones(
        r: redis.Redis, local: LocalPusher, processes: Callable[..., WorkerProcess],
        queue_name: str, env: dict[str, str]) -> None:
    path = Path(env["RELAY_APPS"])
    worker = processes()
    push(r, queue_name, "tenant-b", [1])
    wait_for(lambda: count(local, TENANT_ID) >= 1, 15, "tenant-b's first")

    def reload(text: str, line: str) -> None:
        path.write_text(text)
        worker.signal(signal.SIGHUP)
        wait_for(lambda: line in worker.log(), 15, f"the log line {line!r}")

    # tenant-c added, tenant-b removed
    reload(local.apps_toml({"default": DEFAULT_ID, "tenant-c": ADDED_ID}),
           "(added tenant-c; removed tenant-b)")
    push(r, queue_name, "tenant-c", [2])
    push(r, queue_name, "tenant-b", [3])
    wait_for(lambda: count(local, ADDED_ID) >= 1 and dead(r, queue_name), 15,
             "tenant-c's first and tenant-b's dead letter")
    assert numbers(local, ADDED_ID) == Counter([2])
    [letter] = dead(r, queue_name)
    assert letter["error"] == "unknown app 'tenant-b' (known apps: default, tenant-c)"
    assert letter["app"] == "tenant-b"
    assert numbers(local, TENANT_ID) == Counter([1])

    # a bad file: refused in one line, the apps loaded before keep working
    reload(local.apps_toml({"default": DEFAULT_ID}) + "[apps.broken]\nrate_limit = 1\n",
           "RELAY_APPS not reloaded, keeping the 2 app(s) loaded before:")
    refused = [line for line in worker.log().splitlines() if "not reloaded" in line]
    assert len(refused) == 1 and "[apps.broken] url: missing" in refused[0], refused
    assert "secret-" not in worker.log()
    push(r, queue_name, "tenant-c", [4])
    push(r, queue_name, None, [5])
    wait_for(lambda: count(local, ADDED_ID) >= 2 and count(local, DEFAULT_ID) >= 1, 15,
             "tenant-c's and the default app's after the refused reload")
    assert numbers(local, ADDED_ID) == Counter([2, 4])
    assert numbers(local, DEFAULT_ID) == Counter([5])
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_what_cannot_be_sent_is_dead_lettered_while_the_default_app_is_held(
        r: redis.Redis, local: LocalPusher, serve: Callable[..., Running],
        queue_name: str) -> None:
    """An unreadable item goes with the `default` app's calls. While that app's circuit is
    open it is dead-lettered at once, not set aside: set aside, it went back to the queue's
    head and was fetched again, round and round, until the circuit's first probe."""
    local.set_mode(app_id=DEFAULT_ID, status=401)
    running = serve()
    push(r, queue_name, None, range(3))
    wait_for(lambda: running.worker.routes.get("default").circuit.is_open, 15,
             "the default app's circuit to open")
    r.rpush(queue_name, "not json")
    # The circuit's first probe comes a second after it opened: well before that.
    wait_for(lambda: dead(r, queue_name), 0.6, "the unreadable item dead-lettered")
    assert running.worker.routes.get("default").circuit.is_open
    assert [d["error_class"] for d in dead(r, queue_name)] == ["invalid"]
    local.clear_mode(DEFAULT_ID)
    assert running.stop() == 0
