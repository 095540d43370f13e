"""The test files split into shards of about equal time, for `./run-tests` (which runs one
pytest process a shard, side by side): `python tests/shards.py INDEX COUNT` prints shard
INDEX's files, one a line.

Whole files go to a shard (module fixtures, and a file's own order, stay as they are); files
that install into the same .cache/ directory go together. The weights are a full run's
seconds a file (clean clone: the installs included), measured on the 2-core CI machine's
twin; a file not listed weighs DEFAULT_S. They only balance the shards: a stale weight costs
some time, never a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_S = 3.0
WEIGHTS = {
    "test_admin": 26, "test_alerts": 2, "test_apps_e2e": 20, "test_burst": 7, "test_cli_errors": 3,
    "test_config": 3, "test_crash": 23, "test_dashboard": 3, "test_dashboard_browser": 19,
    "test_delivery": 8, "test_devmode": 5, "test_dialects_e2e": 5, "test_engine": 7,
    "test_explain": 2, "test_faults": 68, "test_health": 7, "test_history": 2,
    "test_https": 7, "test_isolation": 6, "test_logs": 11, "test_maintain": 16,
    "test_observability": 15, "test_operator_messages": 7, "test_order_e2e": 48,
    "test_ownership": 11, "test_package": 19, "test_pause_e2e": 37, "test_pause_engine": 6,
    "test_producer": 2, "test_producer_matrix": 47, "test_pusher_server": 3,
    "test_pusher_server_apps": 3, "test_ratelimit": 7, "test_readme": 25, "test_redis_acl": 5,
    "test_redis_cluster": 20, "test_redis_cluster_failover": 13,
    "test_redis_secure_topologies": 9, "test_redis_sentinel": 12, "test_redis_tls": 5,
    "test_shedding": 6, "test_soketi": 28, "test_soketi_apps": 4, "test_supervisord": 15,
    "test_tracing": 5, "test_tracing_e2e": 12, "test_upgrade": 11, "test_worker_e2e": 14,
}
# Files sharing an install in .cache/ run in one process: two `npm ci` into one directory at
# once would trip over each other.
TOGETHER = [("test_soketi", "test_soketi_apps")]


def groups() -> list[tuple[float, list[str]]]:
    names = sorted(p.stem for p in HERE.glob("test_*.py"))
    bound = {name: group for group in TOGETHER for name in group}
    out: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        out.setdefault(bound.get(name, (name,)), []).append(name)
    return [(sum(WEIGHTS.get(n, DEFAULT_S) for n in members), members)
            for members in out.values()]


def shards(count: int) -> list[list[str]]:
    """Heaviest group first, each to the lightest shard so far; files in name order within."""
    loads = [0.0] * count
    chosen: list[list[str]] = [[] for _ in range(count)]
    for weight, members in sorted(groups(), key=lambda g: (-g[0], g[1])):
        lightest = loads.index(min(loads))
        loads[lightest] += weight
        chosen[lightest].extend(members)
    return [sorted(files) for files in chosen]


if __name__ == "__main__":
    index, count = int(sys.argv[1]), int(sys.argv[2])
    sys.stdout.write("".join(f"tests/{name}.py\n" for name in shards(count)[index]))
