"""The package: `pip install .` in a fresh venv gives a working `relay` command, the lock
files pin every listed requirement, and every package relay imports is declared.

The fresh venv is made once per requirements.lock (cached under .cache/install-venv/) from
the lock file with hashes checked, as the README's production steps do; the package itself
is reinstalled on every run, so the test always sees the current code.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import redis

import relay
from relay.pusher_server import LocalPusher
from relay.redis_server import RedisServer, free_port
from tests.support import ROOT, wait_for

LISTS = ["requirements.txt", "requirements-otel.txt", "requirements-test.txt"]
LOCKS = {"requirements.lock": ["requirements.txt"],
         "requirements-otel.lock": ["requirements.txt", "requirements-otel.txt"],
         "requirements-dev.lock": LISTS}
INSTALL_TIMEOUT_S = 900


def _names(path: Path) -> set[str]:
    """Normalised project names of the requirement lines in a list or a lock file."""
    names = set()
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if match and not line.startswith((" ", "#", "-")):
            names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return names


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_listed_requirement_with_hashes(lock: str) -> None:
    text = (ROOT / lock).read_text()
    pinned = _names(ROOT / lock)
    for listed in LOCKS[lock]:
        missing = _names(ROOT / listed) - pinned
        assert not missing, f"{lock} lacks {sorted(missing)}: run ./lock"
    pins = re.findall(r"^([A-Za-z0-9][^ ;\\]*)", text, re.M)
    assert pins and all("==" in pin for pin in pins), pins
    assert text.count("--hash=sha256:") >= len(pins)


def test_extras_come_from_the_lists() -> None:
    """`pip install pusher-relay[otel]` installs requirements-otel.txt (checked by hand with
    `pip install --dry-run '.[otel]'`; here, that pyproject.toml still says so)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    assert "optional-dependencies" in project["project"]["dynamic"]
    extras = project["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
    assert extras == {"test": {"file": ["requirements-test.txt"]},
                      "otel": {"file": ["requirements-otel.txt"]}}


# What the Python 2.7-readable modules (relay/redis_url.py...) import when Python 3's name
# is missing: the standard library there, not a package to declare.
PYTHON2_STDLIB = frozenset({"urlparse", "urllib2", "httplib", "Queue"})


def _third_party_imports() -> set[str]:
    """Top-level modules that relay's own code imports, outside the standard library."""
    found = set()
    for path in (ROOT / "relay").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names
            and name not in ("relay", "__future__") and name not in PYTHON2_STDLIB}


def test_every_imported_package_is_declared() -> None:
    declared = set().union(*(_names(ROOT / listed) for listed in LISTS))
    owners = packages_distributions()
    undeclared = {}
    for module in sorted(_third_party_imports()):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not in requirements*.txt: {undeclared}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with requirements.lock (hashes checked) and this checkout's package."""
    key = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:12]
    venv = ROOT / ".cache" / "install-venv" / key
    python = venv / "bin" / "python"

    def pip(*args: str) -> None:
        done = subprocess.run([str(python), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert done.returncode == 0, f"pip install {' '.join(args)}:\n{done.stderr}"

    if not (venv / ".locked").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip("--require-hashes", "-r", "requirements.lock")
        (venv / ".locked").write_text(key + "\n")
    pip("--no-deps", "--force-reinstall", ".")
    return venv / "bin"


def run_relay(bin_dir: Path, cwd: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / "relay"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_relay_command_is_the_worker_program(installed: Path, tmp_path: Path) -> None:
    version = run_relay(installed, tmp_path, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"relay {relay.__version__}"
    helped = run_relay(installed, tmp_path, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: relay "), helped.stdout
    assert "stats" in helped.stdout and "--redis-url" in helped.stdout
    bad = run_relay(installed, tmp_path, env={"PATH": "/usr/bin:/bin"})  # no credentials
    assert bad.returncode == 2, bad.stderr


@pytest.fixture
def relay_env(redis_server: RedisServer, pusher_server: LocalPusher) -> Iterator[dict[str, str]]:
    pusher_server.reset()
    yield {"PATH": "/usr/bin:/bin", "REDIS_URL": redis_server.url,
           "PUSHER_URL": pusher_server.url, "RELAY_QUEUE": "package-test",
           "RELAY_METRICS_ADDR": "off", "PUSHER_TIMEOUT": "2"}


def test_installed_relay_delivers_and_administers(
        installed: Path, tmp_path: Path, relay_env: dict[str, str],
        pusher_server: LocalPusher, redis_server: RedisServer) -> None:
    """From a directory outside the checkout, so only the installed copy can be imported."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete("package-test")
    client.rpush("package-test", json.dumps({"channel": "installed", "n": 1}))
    log = (tmp_path / "relay.log").open("wb")
    worker = subprocess.Popen([str(installed / "relay")], cwd=tmp_path, env=relay_env,
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        events = pusher_server.wait_for_events(1, timeout=20)
        assert [(e["channel"], json.loads(e["data"])) for e in events] == [
            ("installed", {"n": 1})]
        stats = run_relay(installed, tmp_path, "stats", env=relay_env)
        assert stats.returncode == 0, stats.stderr
        assert "package-test" in stats.stdout, stats.stdout
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
        client.close()
    where = subprocess.run([str(installed / "python"), "-c", "import relay; print(relay.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(installed.parent)), where.stdout


def test_production_install_starts_without_gevents_monitor_warning(
        installed: Path, tmp_path: Path, relay_env: dict[str, str]) -> None:
    """With metrics on (the default), the watchdog starts gevent's monitor thread, which
    without psutil prints a MonitorWarning, in a format of its own, on every start (issue 21,
    stumble 3): requirements.lock carries psutil for it."""
    env = {**relay_env, "RELAY_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    log_path = tmp_path / "relay.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen([str(installed / "relay")], cwd=tmp_path, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "metrics and health on" in log_path.read_text()
                 and "started:" in log_path.read_text(), 30, "the worker's start lines")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log_path.read_text()
    assert "MonitorWarning" not in text and "psutil" not in text, text
    assert "psutil" in _names(ROOT / "requirements.lock")


def test_installed_relay_burst_drains_and_exits_0(
        installed: Path, tmp_path: Path, relay_env: dict[str, str],
        pusher_server: LocalPusher, redis_server: RedisServer) -> None:
    """`relay --burst` from a fresh venv: what is queued goes out, then it exits 0 by itself."""
    client = redis.Redis.from_url(redis_server.url)
    client.delete("package-test")
    client.rpush("package-test", *[json.dumps({"channel": "burst", "n": n}) for n in range(25)])
    try:
        done = run_relay(installed, tmp_path, "--burst", env=relay_env)
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(e["data"])["n"] for e in pusher_server.events()) == list(
            range(25))
        assert client.llen("package-test") == 0
    finally:
        client.close()


def test_installed_package_ships_the_dashboard_files(installed: Path, tmp_path: Path) -> None:
    """The page's JavaScript and CSS are package data: an install without them has a page
    that cannot draw."""
    listed = subprocess.run(
        [str(installed / "python"), "-c",
         "import importlib.resources as r, json; print(json.dumps([p.name for p in "
         "r.files('relay.dashboard').joinpath('static').iterdir()]))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    shipped = set(json.loads(listed.stdout))
    assert {p.name for p in (ROOT / "relay" / "dashboard" / "static").iterdir()} <= shipped
