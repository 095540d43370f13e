"""The README's ACL rules for the worker name every command relay's scripts run, and the probe
at start runs each of them, so a user missing a right is refused at start, not mid-delivery."""

from __future__ import annotations

import re

from tests.support import ROOT

SCRIPTS = ("relay/queue.py", "relay/ownership.py", "relay/ratelimit.py")


def commands_in_scripts() -> set[str]:
    source = "".join((ROOT / path).read_text() for path in SCRIPTS)
    return {c.lower() for c in re.findall(r"redis\.call\(\s*'([A-Z]+)'", source)}


def test_the_readme_worker_rules_allow_every_command_the_scripts_run() -> None:
    for line in re.findall(r"^ACL SETUSER relay-worker .*$", (ROOT / "README.md").read_text(),
                           re.MULTILINE):
        allowed = {w[1:] for w in line.split() if w.startswith("+")}
        assert commands_in_scripts() <= allowed, commands_in_scripts() - allowed


def test_the_probe_runs_every_command_the_scripts_run() -> None:
    source = (ROOT / "relay/queue.py").read_text()
    probe = source[source.index("PROBE = "):]
    probe = probe[:probe.index('"""', probe.index('"""') + 3)]
    probed = {c.lower() for c in re.findall(r"redis\.call\('([A-Z]+)'", probe)}
    if probe.startswith("PROBE = _NOW +"):
        probed.add("time")  # the Redis-clock snippet it begins with
    assert commands_in_scripts() <= probed, commands_in_scripts() - probed
