"""supervisord.conf as shipped, with only paths and settings rewritten for the test:
two workers start, deliver, stop cleanly on `supervisorctl stop`, and come back after kill -9
without losing anything."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer, free_port
from tests import support
from tests.support import ROOT, pending, port_is_free, wait_for, worker_ids

PROGRAMS = ("relay:relay_00", "relay:relay_01")


def rewrite(text: str, overrides: dict[str, dict[str, str]]) -> str:
    """Replace the values of keys the file already has; fail on any key it lacks, so the
    test keeps exercising the shipped file rather than a copy of our own."""
    section, seen, out = "", set(), []
    for line in text.splitlines():
        header = re.fullmatch(r"\[(.+)\]\s*", line)
        key = line.partition("=")[0].strip()
        if header:
            section = header.group(1)
        elif "=" in line and not line.startswith(";") and key in overrides.get(section, {}):
            line = f"{key}={overrides[section][key]}"
            seen.add((section, key))
        out.append(line)
    missing = {(s, k) for s, keys in overrides.items() for k in keys} - seen
    assert not missing, f"supervisord.conf lacks {sorted(missing)}"
    return "\n".join(out) + "\n"


def environment(values: dict[str, str]) -> str:
    """supervisord's environment= value; %(process_num)02d is left for supervisord."""
    def quote(v: str) -> str:
        return v if "%(process_num)" in v else v.replace("%", "%%")
    return ",".join(f'{k}="{quote(v)}"' for k, v in values.items())


def metrics_ports() -> tuple[str, list[int]]:
    """A RELAY_METRICS_ADDR giving each process its own port, as the shipped file does."""
    for _ in range(50):
        prefix = free_port() // 100
        ports = [prefix * 100, prefix * 100 + 1]
        if 1024 < ports[0] and all(port_is_free(p) for p in ports):
            return f"127.0.0.1:{prefix}%(process_num)02d", ports
    raise RuntimeError("no two free consecutive ports")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


class Supervisor:
    """supervisord in the foreground (nodaemon) with supervisorctl on the same config;
    `exported`: settings in supervisord's own environment, as an operator exports them."""

    def __init__(self, conf: Path, log: Path, exported: dict[str, str] | None = None) -> None:
        self.conf = conf
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAY_", "PUSHER_", "REDIS_"))}
        env.update(exported or {})
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ctl(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c",
                               str(self.conf), *args], capture_output=True, text=True,
                              timeout=60)
        return done.stdout + done.stderr

    def status(self) -> dict[str, str]:
        """{'relay:relay_00': 'RUNNING', ...}; empty while supervisord is not answering."""
        found = re.findall(r"^(\S+)\s+([A-Z]+)\b", self.ctl("status"), re.MULTILINE)
        return {name: state for name, state in found if name in PROGRAMS}

    def all_in(self, state: str) -> bool:
        status = self.status()
        return all(status.get(name) == state for name in PROGRAMS)

    def pid(self, name: str) -> int:
        text = self.ctl("pid", name).strip()
        return int(text) if text.isdigit() else 0

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.ctl("shutdown")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # supervisord stops its children on SIGTERM too
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


@pytest.fixture
def supervisor(tmp_path: Path, redis_server: RedisServer, pusher: LocalPusher,
               queue_name: str) -> Iterator[Callable[..., Supervisor]]:
    """Start supervisord on the shipped file rewritten for this test; always shut down."""
    sock_dir = tempfile.mkdtemp(prefix="sv-")  # unix socket paths must stay short
    started: list[Supervisor] = []

    def start(program: dict[str, str] | None = None, exported: dict[str, str] | None = None,
              **settings: str) -> Supervisor:
        """settings: the program's environment= line; program: other [program:relay] keys;
        exported: supervisord's own environment."""
        env = {"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
               "PUSHER_URL": pusher.url, "RELAY_METRICS_ADDR": "off",
               "RELAY_HEARTBEAT_TTL": "2", "PUSHER_TIMEOUT": "2", **settings}
        sock = f"{sock_dir}/supervisor.sock"
        conf = tmp_path / "supervisord.conf"
        conf.write_text(rewrite((ROOT / "supervisord.conf").read_text(), {
            "unix_http_server": {"file": sock},
            "supervisorctl": {"serverurl": f"unix://{sock}"},
            "supervisord": {"logfile": str(tmp_path / "supervisord.log"),
                            "pidfile": str(tmp_path / "supervisord.pid")},
            "program:relay": {
                "command": f"{sys.executable} {ROOT / 'worker.py'}",
                "directory": str(ROOT),
                "stdout_logfile": str(tmp_path / "%(process_num)02d.log"),
                "environment": environment(env),
                **(program or {}),
            },
        }))
        started.append(Supervisor(conf, tmp_path / "supervisord.out", exported))
        return started[-1]

    yield start
    for sup in started:
        sup.shutdown()
    shutil.rmtree(sock_dir, ignore_errors=True)


def worker_log(tmp_path: Path, num: int) -> str:
    path = tmp_path / f"{num:02d}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# RUNNING after 1 s up instead of the shipped 5 s: where a test only waits for the workers to
# be up (twice, across a restart, in the kill -9 test). The shipped startsecs is what the
# bad-configuration test (an exit quicker than it: FATAL) runs with.
QUICK_START = {"startsecs": "1"}


def push(r: redis.Redis, queue: str, count: int, channels: int = 1) -> None:
    support.push(r, queue, count, channel="site-1", key="id", channels=channels)


def delivered_ids(pusher: LocalPusher) -> set[int]:
    return set(support.delivered(pusher, key="id"))


def test_two_workers_deliver_and_stop_cleanly(
        supervisor: Callable[..., Supervisor], r: redis.Redis, pusher: LocalPusher,
        queue_name: str, tmp_path: Path) -> None:
    addr, ports = metrics_ports()
    sup = supervisor(QUICK_START, RELAY_METRICS_ADDR=addr)
    wait_for(lambda: sup.all_in("RUNNING"), 30, "both workers RUNNING")
    assert sup.pid(PROGRAMS[0]) != sup.pid(PROGRAMS[1])
    for num in (0, 1):
        wait_for(lambda num=num: "started:" in worker_log(tmp_path, num), 15,
                 f"worker {num}'s start line in its own log file")
    push(r, queue_name, 20)
    wait_for(lambda: delivered_ids(pusher) == set(range(20)), 15, "all 20 delivered")
    # Each process serves its own metrics port; together they count every delivery.
    def delivered_total() -> float:
        texts = [get(f"http://127.0.0.1:{port}/metrics") for port in ports]
        return sum(float(line.split()[-1]) for t in texts for line in t.splitlines()
                   if line.startswith('relay_notifications_delivered_total{app="default"} '))
    wait_for(lambda: delivered_total() == 20, 15, "the two metrics endpoints to count 20")
    assert all('"status": "ok"' in get(f"http://127.0.0.1:{p}/healthz") for p in ports)

    assert "relay:relay_00: stopped" in sup.ctl("stop", "all")
    assert sup.all_in("STOPPED"), sup.ctl("status")
    out = (tmp_path / "supervisord.out").read_text()
    for num in (0, 1):
        assert "stopped; 0 notification(s)" in worker_log(tmp_path, num)
        assert f"stopped: relay_{num:02d} (exit status 0)" in out, out
    assert pending(r, queue_name) == {"queue": 0, "retry": 0, "inflight": 0, "parked": 0}
    assert r.zcard(queue_name + ":workers") == 0  # both unregistered on the way out
    sup.ctl("shutdown")
    assert sup.proc.wait(30) == 0


def worker_id_of(r: redis.Redis, queue: str, pid: int) -> str | None:
    for wid, info in r.hgetall(queue + ":workers:info").items():
        if json.loads(info).get("pid") == pid:
            return wid.decode()
    return None


def holds_inflight(r: redis.Redis, queue: str, wid: str) -> bool:
    return any(r.llen(key) for key in r.keys(f"{queue}:inflight:{wid}:*"))


def test_kill_9_is_restarted_and_nothing_is_lost(
        supervisor: Callable[..., Supervisor], r: redis.Redis, pusher: LocalPusher,
        queue_name: str, tmp_path: Path) -> None:
    count = 1000
    # A backlog longer than a window (RELAY_PREFETCH) is shared out between the processes by
    # channel; a shorter one would all go to whichever process popped first.
    sup = supervisor(QUICK_START, RELAY_POOL_SIZE="2", RELAY_PREFETCH="100")
    wait_for(lambda: sup.all_in("RUNNING"), 30, "both workers RUNNING")
    pusher.set_mode(delay=0.05)  # slow enough that the victim has work in flight
    victim = sup.pid(PROGRAMS[0])
    wid = wait_for(lambda: worker_id_of(r, queue_name, victim), 15, "the victim's worker id")
    push(r, queue_name, count, channels=50)  # one channel would have one owner, not two
    wait_for(lambda: holds_inflight(r, queue_name, wid), 15, "the victim holding work")

    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: sup.pid(PROGRAMS[0]) not in (0, victim), 30, "a restarted relay_00")
    wait_for(lambda: sup.all_in("RUNNING"), 30, "both workers RUNNING again")
    pusher.set_mode()
    wait_for(lambda: delivered_ids(pusher) == set(range(count)), 60,
             f"all {count} delivered at least once", interval=0.2)
    # The victim's lists are reaped (it leaves the registry), then queue, retry set and every
    # in-flight list must be empty at one instant: separate reads race the greenlets.
    wait_for(lambda: wid not in worker_ids(r, queue_name), 30, "the victim reaped")
    support.wait_settled(r, queue_name)
    assert r.llen(queue_name + ":dead") == 0
    recovered = re.findall(rf"worker {re.escape(wid)} missed its heartbeat: (\d+) in-flight",
                           worker_log(tmp_path, 0) + worker_log(tmp_path, 1))
    assert recovered and int(recovered[0]) > 0, "the victim's in-flight work was not recovered"
    out = (tmp_path / "supervisord.out").read_text()
    assert "exited: relay_00 (terminated by SIGKILL" in out, out


def test_bad_configuration_ends_fatal_not_in_a_restart_loop(
        supervisor: Callable[..., Supervisor], tmp_path: Path) -> None:
    # The placeholder the shipped file carries: the worker exits 2 faster than startsecs,
    # so supervisord gives up after startretries instead of restarting it forever
    # (fewer retries here only to keep the test short).
    sup = supervisor({"startretries": "1"},
                     PUSHER_URL="https://KEY:SECRET@api-mt1.pusher.com/apps/APP_ID")
    wait_for(lambda: sup.all_in("FATAL"), 60, "both workers FATAL", interval=0.5)
    for num in (0, 1):
        assert "relay: bad configuration: PUSHER_URL" in worker_log(tmp_path, num)


def shipped_environment() -> dict[str, str]:
    """The [program:relay] environment= of the shipped file, as {NAME: value}."""
    text = (ROOT / "supervisord.conf").read_text()
    program = text.split("[program:relay]", 1)[1]
    line = next(li for li in program.splitlines() if li.startswith("environment="))
    value = line.partition("=")[2].split(" ;", 1)[0].strip()
    return dict(re.findall(r'([A-Z_][A-Z0-9_]*)="([^"]*)"', value))


def test_settings_exported_to_supervisord_reach_the_workers(
        supervisor: Callable[..., Supervisor], r: redis.Redis, pusher: LocalPusher,
        redis_server: RedisServer, queue_name: str, tmp_path: Path) -> None:
    """The shipped environment= sets only the per-process metrics address: a REDIS_URL or
    RELAY_QUEUE there would silently beat what the operator exported (issue 21, stumble 1)."""
    shipped = shipped_environment()
    assert set(shipped) == {"RELAY_METRICS_ADDR"}, shipped  # checked before anything starts
    addr, ports = metrics_ports()
    sup = supervisor(
        {**QUICK_START, "environment": environment({**shipped, "RELAY_METRICS_ADDR": addr})},
        exported={"REDIS_URL": redis_server.url, "RELAY_QUEUE": queue_name,
                  "PUSHER_URL": pusher.url, "RELAY_HEARTBEAT_TTL": "2", "PUSHER_TIMEOUT": "2"})
    wait_for(lambda: sup.all_in("RUNNING"), 30, "both workers RUNNING")
    # Both registered on the exported queue of the exported Redis, and both deliver from it.
    wait_for(lambda: len(worker_ids(r, queue_name)) == 2, 15, "two workers on the queue")
    push(r, queue_name, 20)
    wait_for(lambda: delivered_ids(pusher) == set(range(20)), 15, "all 20 delivered")
    for port in ports:
        assert '"status": "ok"' in get(f"http://127.0.0.1:{port}/healthz")
