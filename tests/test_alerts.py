"""The alert rules (deploy/prometheus/relay-alerts.yml), tested by Prometheus's own promtool:
`check rules` and `test rules` over tests/prometheus/relay-alerts.test.yml, where each alert
fires in one case and stays quiet in another. Also: every rule reads metrics relay exports,
and every runbook_url points at a section of docs/operations.md.

promtool comes from Debian's `prometheus` package: the one on PATH, else the package fetched
with `apt-get download` and unpacked into .cache/prometheus/ (once), which needs no root and
starts nothing (`apt-get install prometheus` would also start a Prometheus server on :9090).
Where it cannot be had, the promtool tests skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from relay.metrics import Metrics
from tests.support import ROOT

RULES = ROOT / "deploy" / "prometheus" / "relay-alerts.yml"
CASES = ROOT / "tests" / "prometheus" / "relay-alerts.test.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
CACHE = ROOT / ".cache" / "prometheus"
INSTALL_TIMEOUT_S = 900


def _download_promtool() -> Path:
    """Debian's prometheus package, unpacked under CACHE; only its promtool is used."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp,
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0 and os.geteuid() == 0:  # the package lists may be missing
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True,
                           timeout=INSTALL_TIMEOUT_S)
            done = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp,
                                  capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if done.returncode != 0 or not debs:
            pytest.skip(f"could not fetch Debian's prometheus package (apt-get download "
                        f"prometheus): {done.stderr.strip()[-300:]}")
        unpacked = CACHE.with_name("prometheus.partial")
        shutil.rmtree(unpacked, ignore_errors=True)
        unpacked.mkdir(parents=True)  # a clean clone has no .cache yet
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True,
                       timeout=INSTALL_TIMEOUT_S)
        shutil.rmtree(CACHE, ignore_errors=True)
        unpacked.rename(CACHE)  # complete or absent: an interrupted unpack is not reused
    return CACHE / "usr" / "bin" / "promtool"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    cached = CACHE / "usr" / "bin" / "promtool"
    if cached.exists():
        return str(cached)
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("no promtool, and no apt-get/dpkg-deb to fetch Debian's prometheus package "
                    "(apt-get install prometheus, or put promtool on PATH)")
    return str(_download_promtool())


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_promtool_checks_the_rules_and_passes_every_case(promtool: str) -> None:
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout, checked.stdout
    tested = run(promtool, "test", "rules", str(CASES))  # every case in one run
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# -- what the files say (read with regular expressions: PyYAML is not a dependency) -----------

def alerts() -> dict[str, str]:
    """{alert name: its block of the rules file}."""
    blocks = re.split(r"^      - alert: ", RULES.read_text(), flags=re.M)[1:]
    return {block.split("\n", 1)[0].strip(): block for block in blocks}


def cases() -> dict[str, set[str]]:
    """{alert name: {"fires", "quiet"}}: which kinds of case the unit tests hold for it."""
    found: dict[str, set[str]] = {}
    for name, rest in re.findall(r"alertname: (\w+)\n(\s+exp_alerts:.*)", CASES.read_text()):
        found.setdefault(name, set()).add("quiet" if rest.strip().endswith("[]") else "fires")
    return found


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a file's headings (lowercase, punctuation dropped)."""
    heads = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_the_required_alerts_are_there_each_with_a_firing_and_a_quiet_case() -> None:
    required = {"RelayNotDelivering", "RelayBacklogGrowing", "RelayCircuitOpen",
                "RelayDeadLettersGrowing", "RelayEventLoopBlocked", "RelayRedisErrors",
                "RelayWorkerDown"}
    assert required <= set(alerts())
    found = cases()
    missing = {name: {"fires", "quiet"} - found.get(name, set()) for name in alerts()}
    assert not {k: v for k, v in missing.items() if v}, missing


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    for name, block in alerts().items():
        assert re.search(r"severity: (critical|warning)\n", block), name
        for key in ("summary", "description", "runbook_url"):
            assert f"\n          {key}: " in block, f"{name} has no {key}"
        url = re.search(r'runbook_url: "(\S+)"', block).group(1)
        assert url == ("https://github.com/OWNER/relay/blob/main/docs/operations.md#"
                       + name.lower()), url
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"


def test_the_rules_read_only_metrics_relay_exports_all_present_from_the_start() -> None:
    """A renamed metric would leave an alert silently watching nothing. Labelled counters
    are exported at 0 from the start, or a process's first dead letter has no increase."""
    used = set(re.findall(r"\brelay_[a-z_]+\b", "".join(
        re.findall(r"expr: (\|[\s\S]+?|.+)\n\s+(?:for|labels):", RULES.read_text()))))
    exported = generate_latest(Metrics().registry).decode()
    names = set(re.findall(r"^(relay_[a-z_]+)", exported, flags=re.M))
    assert "relay_paused" in used  # RelayNotDelivering is silenced while paused
    assert used <= names, used - names
    for reason in ("invalid", "rejected", "exhausted"):
        assert (f'relay_notifications_dead_lettered_total{{app="default",reason="{reason}"}} 0.0'
                in exported)
