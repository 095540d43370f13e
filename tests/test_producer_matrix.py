"""relay.producer inside legacy apps: under every Python that pyenv has (2.7, 3.6 ... 3.13),
with the newest redis-py that Python can install and nothing else, the producer pushes to
the suite's real Redis, refuses bad input, and the worker delivers what each one wrote.

Each interpreter gets redis-py in `.cache/producer-envs/<version>` (a `pip install
--target`, made once, all interpreters in parallel); an absent interpreter is a skip that
names it. The script each one runs is tests/legacy_producer.py.
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

from relay.message import parse
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer
from tests.support import ROOT, WorkerProcess, wait_for

VERSIONS = ["2.7", "3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
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
    env = {**os.environ, "PIP_NO_INPUT": "1", "PYTHONWARNINGS": "ignore"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-warn-script-location", "--target", str(target), spec],
        capture_output=True, text=True, env=env, cwd=target, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {spec} failed:\n{done.stdout}{done.stderr}")


def install(python: Path, target: Path) -> None:
    """redis-py for `python` in `target` (cached: done once, published by a rename)."""
    if (target / ".installed").exists():
        return
    version = ".".join(target.name.split(".")[:2])
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        newer_pip = None
        if version in BOOTSTRAP_PIP:
            newer_pip = tmp / ".pip"
            newer_pip.mkdir()
            _pip(python, newer_pip, BOOTSTRAP_PIP[version])
        _pip(python, tmp, "redis", newer_pip)
        (tmp / ".installed").write_text("redis\n")
        if not (target / ".installed").exists():  # a concurrent run may have won the race
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def interpreters() -> dict[str, tuple[Path, Path] | str]:
    """version -> (python, redis-py directory), or the reason it cannot run."""
    CACHE.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[Path, Path] | str] = {}
    for version in VERSIONS:
        python = find_interpreter(version)
        if python is None:
            result[version] = f"Python {version} is not installed under {pyenv_root()}"
        else:
            result[version] = (python, CACHE / python.parent.parent.name)
    found = {v: pair for v, pair in result.items() if not isinstance(pair, str)}
    with ThreadPoolExecutor(max_workers=len(found) or 1) as pool:
        futures = {v: pool.submit(install, *pair) for v, pair in found.items()}
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


def _run_producer(python: Path, deps: Path, tag: str, redis_url: str, app: Path
                  ) -> dict[str, Any]:
    """Copy the producer's files into `app` as the README says, then run the script there."""
    (app / "relay").mkdir(parents=True)
    for name in PRODUCER_FILES:
        shutil.copyfile(ROOT / "relay" / name, app / "relay" / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RELAY_", "PUSHER_", "REDIS_", "PYTHON"))}
    env.update({"REDIS_URL": redis_url, "RELAY_QUEUE": QUEUE})
    done = subprocess.run([str(python), str(ROOT / "tests" / "legacy_producer.py"), str(app),
                           str(deps), tag], capture_output=True, text=True, env=env,
                          cwd=deps, timeout=120)
    assert done.returncode == 0, f"{python} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _data(data: str) -> Any:
    """Event data as a value: Python 2 and 3.5- order a dict's keys their own way."""
    return json.loads(data) if data.startswith("{") else data


def _canon(data: str) -> str:
    return json.dumps(_data(data), sort_keys=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_legacy_producer_then_worker_delivers(
        version: str, interpreters: dict[str, tuple[Path, Path] | str],
        matrix_worker: WorkerProcess, redis_server: RedisServer,
        pusher_server: LocalPusher, record_property: Any, tmp_path: Path) -> None:
    found = interpreters[version]
    if isinstance(found, str):
        if found.startswith("FAIL "):
            pytest.fail(found[5:])
        pytest.skip(found)
    python, deps = found
    tag = "legacy-py" + version.replace(".", "")
    report = _run_producer(python, deps, tag, redis_server.url, tmp_path / "app")
    assert report["python"].startswith(version + ".")
    record_property("redis-py", report["redis"])

    # What each Python wrote reads exactly as the worker reads it.
    parsed = [parse(text.encode("utf-8"), "hit") for text in report["pushed"]]
    assert [(n.channels, n.event, _data(n.data), n.socket_id) for n in parsed] == [
        ((tag,), "hit", {"n": 1, "text": "h\u00e9llo"}, None),
        ((tag + "-a", tag + "-b"), "legacy-event", {"n": 2}, "123.456"),
        ((tag,), "one-off", "plain \u2713 text", None),
    ]
    named = [parse(text.encode("utf-8"), "hit") for text in report["apps_pushed"]]
    assert [(n.app, n.channels, n.event, _data(n.data)) for n in named] == [
        ("tenant-b", (tag,), "hit", {"n": 4}),
        ("tenant_C-9", (tag,), "one-off", "\u2713"),
    ]

    def delivered() -> list[tuple[str, str, Any, Any]]:
        mine = [e for e in pusher_server.events() if e["channel"].startswith(tag)]
        return sorted((e["channel"], e["name"], _canon(e["data"]), e["socket_id"])
                      for e in mine)

    wait_for(lambda: len(delivered()) >= 4, timeout=20, what=f"{tag}'s 4 events")
    assert delivered() == sorted([
        (tag, "hit", _canon(json.dumps({"n": 1, "text": "h\u00e9llo"})), None),
        (tag + "-a", "legacy-event", _canon(json.dumps({"n": 2})), "123.456"),
        (tag + "-b", "legacy-event", _canon(json.dumps({"n": 2})), "123.456"),
        (tag, "one-off", _canon("plain \u2713 text"), None),
    ])
    assert matrix_worker.alive, matrix_worker.log()
