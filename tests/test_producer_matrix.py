"""relay.producer inside legacy apps: under every Python that pyenv has (2.7, 3.6 ... 3.13),
with the newest redis-py that Python can install and nothing else, the producer pushes to
the suite's real Redis, refuses bad input, and the worker delivers what each one wrote.
Every 3.x runs twice: without OpenTelemetry (nothing of it may be loaded, no envelope
carries a trace context), and with the newest `opentelemetry-api` it can install (the
current API needs 3.10+; 3.6 to 3.9 get older ones), where an envelope pushed inside an
active span carries its traceparent and tracestate and a classic message stays unchanged.

Each interpreter gets redis-py in `.cache/producer-envs/<version>` and the API in
`.cache/producer-envs/<version>+otel` (`pip install --target`, made once, all interpreters
in parallel); an absent interpreter is a skip that names it. The script each one runs is
tests/legacy_producer.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay.apps import App, Apps
from relay.config import parse_pusher_url
from relay.message import parse
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer
from tests.support import ROOT, WorkerProcess, wait_for

VERSIONS = ["2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
# OpenTelemetry never supported Python 2; opentelemetry-api 1.45 needs 3.10+, and pip gives
# each older 3.x the newest release it supports (3.6: 1.12, 3.7: 1.22, 3.8: 1.33, 3.9: 1.41).
OTEL_VERSIONS = [v for v in VERSIONS if v.startswith("3.")]
OTEL = "+otel"
# pip 18.1 (Python 3.6's) ignores Requires-Python on this index: the newest pip for 3.6
# (21.3.1) installs there instead, and picks redis-py and its dependencies correctly.
BOOTSTRAP_PIP = {"3.6": "pip<22"}
CACHE = ROOT / ".cache" / "producer-envs"
QUEUE = "legacy-matrix"
# What a legacy app copies (README, "In legacy apps"): nothing else may be imported.
PRODUCER_FILES = ["__init__.py", "errors.py", "rules.py", "wire.py", "redis_url.py", "producer.py"]
INSTALL_TIMEOUT_S = 600


def pyenv_root() -> Path:
    if shutil.which("pyenv"):
        done = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip())
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def _release(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in path.parent.parent.name.split(".") if p.isdigit())


def find_interpreter(version: str) -> Path | None:
    """The newest `<pyenv root>/versions/<version>.N/bin/python`, or None."""
    found = [p for p in (pyenv_root() / "versions").glob(f"{version}.*/bin/python")
             if p.parent.parent.name.count(".") == 2 and p.parent.parent.name[-1].isdigit()]
    return max(found, key=_release) if found else None


def _pip(python: Path, target: Path, spec: str, pythonpath: Path | None = None) -> None:
    # --no-compile: byte-compiling every module of 17 installs was a third of their CPU on a
    # clean clone; the few modules a producer imports are compiled (and cached) as it runs.
    env = {**os.environ, "PIP_NO_INPUT": "1", "PYTHONWARNINGS": "ignore"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-warn-script-location", "--no-compile", "--target", str(target), spec],
        capture_output=True, text=True, env=env, cwd=target, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {spec} failed:\n{done.stdout}{done.stderr}")


def install(python: Path, target: Path, spec: str = "redis") -> None:
    """`spec` (redis-py, or the OpenTelemetry API) for `python` in `target` (cached: done
    once, published by a rename)."""
    if (target / ".installed").exists():
        return
    version = ".".join(target.name.split(OTEL)[0].split(".")[:2])
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        newer_pip = None
        if version in BOOTSTRAP_PIP:
            newer_pip = tmp / ".pip"
            newer_pip.mkdir()
            _pip(python, newer_pip, BOOTSTRAP_PIP[version])
        _pip(python, tmp, spec, newer_pip)
        (tmp / ".installed").write_text(spec + "\n")
        if not (target / ".installed").exists():  # a concurrent run may have won the race
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def interpreters() -> dict[str, tuple[Path, Path] | str]:
    """version (and version+otel) -> (python, directory of its packages), or the reason it
    cannot run."""
    CACHE.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[Path, Path] | str] = {}
    for version in VERSIONS:
        python = find_interpreter(version)
        if python is None:
            result[version] = f"Python {version} is not installed under {pyenv_root()}"
        else:
            result[version] = (python, CACHE / python.parent.parent.name)
        if version in OTEL_VERSIONS:
            found = result[version]
            result[version + OTEL] = (found if isinstance(found, str)
                                      else (python, CACHE / (python.parent.parent.name + OTEL)))
    found = {v: pair for v, pair in result.items() if not isinstance(pair, str)}
    with ThreadPoolExecutor(max_workers=min(len(found), 8) or 1) as pool:
        futures = {v: pool.submit(install, *pair, "opentelemetry-api" if OTEL in v else "redis")
                   for v, pair in found.items()}
    for version, future in futures.items():
        if future.exception() is not None:
            result[version] = f"FAIL {future.exception()}"
    return result


@pytest.fixture(scope="module")
def matrix_worker(redis_server: RedisServer, pusher_server: LocalPusher,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker for the whole matrix, on a queue of its own."""
    env = {"REDIS_URL": redis_server.url, "PUSHER_URL": pusher_server.url,
           "RELAY_QUEUE": QUEUE, "RELAY_METRICS_ADDR": "off", "RELAY_HEARTBEAT_TTL": "2",
           "PUSHER_TIMEOUT": "2", "RELAY_POOL_SIZE": "10"}
    proc = WorkerProcess(env, tmp_path_factory.mktemp("matrix") / "worker.log")
    proc.wait_started()
    yield proc
    proc.kill()


def _run_producer(python: Path, deps: Path, tag: str, redis_url: str, app: Path,
                  otel: Path | None = None) -> dict[str, Any]:
    """Copy the producer's files into `app` as the README says, then run the script there
    (with the OpenTelemetry API's directory on its path when `otel` is given)."""
    (app / "relay").mkdir(parents=True)
    for name in PRODUCER_FILES:
        shutil.copyfile(ROOT / "relay" / name, app / "relay" / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "PUSHER_", "REDIS_", "PYTHON"))}
    env.update({"REDIS_URL": redis_url, "RELAY_QUEUE": QUEUE})
    args = [str(python), str(ROOT / "tests" / "legacy_producer.py"), str(app), str(deps), tag]
    done = subprocess.run(args + ([str(otel)] if otel is not None else []),
                          capture_output=True, text=True, env=env, cwd=deps, timeout=120)
    assert done.returncode == 0, f"{python} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _data(data: str) -> Any:
    """Event data as a value: Python 2 and 3.5- order a dict's keys their own way."""
    return json.loads(data) if data.startswith("{") else data


def _canon(data: str) -> str:
    return json.dumps(_data(data), sort_keys=True)


def _found(interpreters: dict[str, tuple[Path, Path] | str], version: str
           ) -> tuple[Path, Path]:
    found = interpreters[version]
    if isinstance(found, str):
        if found.startswith("FAIL "):
            pytest.fail(found[5:])
        pytest.skip(found)
    return found


@pytest.mark.parametrize("version", VERSIONS + [v + OTEL for v in OTEL_VERSIONS])
def test_legacy_producer_then_worker_delivers(
        version: str, interpreters: dict[str, tuple[Path, Path] | str],
        matrix_worker: WorkerProcess, redis_server: RedisServer,
        pusher_server: LocalPusher, record_property: Any, tmp_path: Path) -> None:
    python, deps = _found(interpreters, version.split(OTEL)[0])
    otel = _found(interpreters, version)[1] if OTEL in version else None
    tag = "legacy-py" + version.replace(".", "").replace(OTEL, "otel")
    report = _run_producer(python, deps, tag, redis_url=redis_server.url, app=tmp_path / "app",
                           otel=otel)
    assert report["python"].startswith(version.split(OTEL)[0] + ".")
    record_property("redis-py", report["redis"])
    record_property("opentelemetry-api", report["opentelemetry"])
    assert (report["opentelemetry"] is None) == (otel is None), report

    # What each Python wrote reads exactly as the worker reads it.
    parsed = [parse(text.encode("utf-8"), "hit") for text in report["pushed"]]
    expected = [
        ((tag,), "hit", {"n": 1, "text": "h\u00e9llo"}, None),
        ((tag + "-a", tag + "-b"), "legacy-event", {"n": 2}, "123.456"),
        ((tag,), "one-off", "plain \u2713 text", None),
    ]
    # ...and names apps a RELAY_APPS file can hold, whose routing a worker would find
    target = parse_pusher_url("https://k:s@api.example.com/apps/1", 5)
    apps = Apps({name: App(name, target) for name in ("default", "tenant-b", "tenant_C-9")})
    named = [parse(text.encode("utf-8"), "hit", apps.limits_for)
             for text in report["apps_pushed"]]
    assert [(n.app, n.channels, n.event, _data(n.data)) for n in named] == [
        ("tenant-b", (tag,), "hit", {"n": 4}),
        ("tenant_C-9", (tag,), "one-off", "\u2713"),
    ]
    if otel is not None:  # pushed inside the span: a classic message and an envelope
        expected += [((tag,), "hit", {"n": 4}, None), ((tag + "-t",), "traced", {"n": 5}, None)]
    assert [(n.channels, n.event, _data(n.data), n.socket_id) for n in parsed] == expected
    assert [(n.traceparent, n.tracestate) for n in parsed[:3]] == [(None, None)] * 3
    if otel is not None:
        assert report["pushed"][3] == json.dumps({"channel": tag, "n": 4}, separators=(",", ":"))
        assert (parsed[4].traceparent, parsed[4].tracestate) == (
            report["traceparent"], report["tracestate"])
        assert parsed[4].traceparent.split("-")[1:3] == [report["trace_id"], report["span_id"]]

    def delivered() -> list[tuple[str, str, Any, Any]]:
        mine = [e for e in pusher_server.events() if e["channel"].startswith(tag)]
        return sorted((e["channel"], e["name"], _canon(e["data"]), e["socket_id"])
                      for e in mine)

    events = [(channel, event, data, socket_id) for channels, event, data, socket_id in expected
              for channel in channels]
    wait_for(lambda: len(delivered()) >= len(events), timeout=20,
             what=f"{tag}'s {len(events)} events")
    assert delivered() == sorted(
        (channel, event, _canon(data if isinstance(data, str) else json.dumps(data)), socket_id)
        for channel, event, data, socket_id in events)
    assert matrix_worker.alive, matrix_worker.log()
