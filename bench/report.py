"""Turning the results (the same dict that goes to results/latest.json) into tables and bars.

1. `run_rows` lists every drain-like run with its figures.
2. `ratios` compares relay with the naive loop where both ran, and relay's two transports.
3. `verdicts` checks the bars set in issues 2, 4 and 5; a bar whose inputs were not measured
   (scenario skipped or failed) is reported as n/a, never as a pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Results = dict[str, Any]

RUN_HEADER = ("scenario", "who", "events", "drain s", "events/s", "CPU s", "CPU s/10k",
              "peak RSS MB", "server CPU/s")


# PUSHER_HTTP_CLIENT values the transport scenario compares; the first is the reference.
TRANSPORTS = ("urllib3", "requests", "geventhttpclient")


def _get(results: Results, *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _drain_runs(results: Results) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for scenario in ("drain0", "drain50"):
        for who in ("naive", "relay"):
            run = _get(results, scenario, who)
            if run:
                yield scenario, who, run
    if _get(results, "rss100k", "relay"):
        yield "rss100k", "relay", results["rss100k"]["relay"]
    for scenario, labels in (("transport", TRANSPORTS), ("metrics", ("off", "on"))):
        for label in labels:
            for i, run in enumerate(_get(results, scenario, label) or []):
                yield f"{scenario} #{i + 1}", f"relay {label}", run


def run_rows(results: Results) -> list[tuple[str, ...]]:
    rows = [RUN_HEADER]
    for scenario, who, run in _drain_runs(results):
        rows.append((scenario, who, f"{run['delivered']:,}", f"{run['drain_s']:.2f}",
                     f"{run['events_per_s']:,.0f}", f"{run['cpu_s']:.2f}",
                     f"{run['cpu_per_10k']:.2f}", f"{run['peak_rss_mb']:.1f}",
                     f"{run['server_core_share']:.2f}"))
    return rows


def _ratio(results: Results, scenario: str, field: str) -> float | None:
    relay, naive = _get(results, scenario, "relay", field), _get(results, scenario, "naive", field)
    if relay is None or not naive:
        return None
    return relay / naive


def ratios(results: Results) -> list[tuple[str, str]]:
    lines = []
    for scenario in ("drain0", "drain50"):
        for field, label in (("events_per_s", "throughput"), ("cpu_per_10k", "CPU per 10k")):
            value = _ratio(results, scenario, field)
            if value is not None:
                lines.append((f"{scenario} {label} relay/naive", f"{value:.2f}x"))
    for field, label, fmt in (("events_per_s", "throughput", "{:,.0f} events/s"),
                              ("cpu_per_10k", "CPU per 10k", "{:.2f} CPU s/10k")):
        for other in TRANSPORTS[1:]:
            fast, slow = (_get(results, "transport", f"{t}_{field}") for t in ("urllib3", other))
            if fast is not None and slow:
                lines.append((f"transport {label} urllib3/{other} (medians)",
                              f"{fast / slow:.2f}x ({fmt.format(fast)} vs {fmt.format(slow)})"))
    for who in ("naive", "relay"):
        run = _get(results, "steady", who)
        if run:
            lines.append((f"steady {who} latency p50 / p99 / max",
                          f"{run['p50_ms']:.1f} / {run['p99_ms']:.1f} / {run['max_ms']:.1f} ms"))
    return lines


Bar = tuple[int, str, Callable[[Results], tuple[str, bool] | None]]


def _at_most(value: float | None, limit: float, fmt: str) -> tuple[str, bool] | None:
    return None if value is None else (fmt.format(value), value <= limit)


def _at_least(value: float | None, limit: float, fmt: str) -> tuple[str, bool] | None:
    return None if value is None else (fmt.format(value), value >= limit)


def _steady_bar(results: Results) -> tuple[str, bool] | None:
    relay, naive = _get(results, "steady", "relay", "p99_ms"), _get(results, "steady", "naive",
                                                                     "p99_ms")
    if relay is None or naive is None:
        return None
    note = " (naive saturated)" if _get(results, "steady", "naive", "saturated") else ""
    return f"relay {relay:.1f} ms vs naive {naive:.1f} ms{note}", relay <= naive + 5.0


def _rate_bar(results: Results) -> tuple[str, bool] | None:
    run = _get(results, "ratelimit")
    if not run or "average_per_s" not in run:
        return None
    ceiling = run["limit"] + run["burst"]
    ok = 180 <= run["average_per_s"] <= 210 and run["busiest_second"] <= ceiling
    return (f"avg {run['average_per_s']:.1f}/s over {run['window_s']:.0f} s from the first event "
            f"(steady {run['average_after_first_s_per_s']:.1f}/s), busiest 1 s "
            f"{run['busiest_second']}"), ok


def _metrics_bar(results: Results) -> tuple[str, bool] | None:
    on, off = _get(results, "metrics", "on_cpu_per_10k"), _get(results, "metrics",
                                                                "off_cpu_per_10k")
    if on is None or not off:
        return None
    return (f"on/off = {on / off:.3f} (medians {on:.2f} vs {off:.2f} CPU s/10k)",
            on / off <= 1.05)


BARS: tuple[Bar, ...] = (
    (2, "relay CPU per event <= 115% of naive's (drain0)",
     lambda r: _at_most(_ratio(r, "drain0", "cpu_per_10k"), 1.15, "{:.0%} of naive")),
    (2, "relay throughput at 50 ms >= 90% of naive's",
     lambda r: _at_least(_ratio(r, "drain50", "events_per_s"), 0.90, "{:.0%} of naive")),
    (4, "drain throughput >= 8x naive at 0 ms",
     lambda r: _at_least(_ratio(r, "drain0", "events_per_s"), 8.0, "{:.1f}x")),
    (4, "drain throughput >= 8x naive at 50 ms",
     lambda r: _at_least(_ratio(r, "drain50", "events_per_s"), 8.0, "{:.1f}x")),
    (4, "CPU per 10k <= 1/5 of naive's (drain0)",
     lambda r: _at_most(_ratio(r, "drain0", "cpu_per_10k"), 0.2, "{:.2f}x")),
    (4, "steady p99 <= naive p99 + 5 ms", _steady_bar),
    (4, "rate limit: avg 180-210/s, busiest 1 s <= limit + burst", _rate_bar),
    (4, "peak RSS draining 100k < 80 MB",
     lambda r: _at_most(_get(r, "rss100k", "relay", "peak_rss_mb"), 79.999, "{:.1f} MB")),
    (5, "metrics on costs <= 5% more CPU than off", _metrics_bar),
)


def verdicts(results: Results) -> list[dict[str, Any]]:
    out = []
    for issue, bar, check in BARS:
        outcome = check(results)
        value, passed = outcome if outcome is not None else ("not measured", None)
        out.append({"issue": issue, "bar": bar, "value": value, "pass": passed})
    return out


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def render(results: Results, checked: list[dict[str, Any]]) -> str:
    parts = ["", "== runs", table(run_rows(results)), "",
             "== ratios (relay vs the naive loop; relay's transports)"]
    parts += [f"{label:<48} {value}" for label, value in ratios(results)]
    parts += ["", "== bars"]
    for v in checked:
        mark = "n/a " if v["pass"] is None else ("PASS" if v["pass"] else "FAIL")
        parts.append(f"{mark}  issue {v['issue']}: {v['bar']:<58} {v['value']}")
    return "\n".join(parts)
