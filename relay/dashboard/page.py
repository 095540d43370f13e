"""The page's HTML, rendered with the numbers already in it, so it reads without JavaScript.

app.js then refreshes every element marked `data-k` (a path into /api/overview) and
rebuilds the tables and charts every 2 s. Everything from Redis is escaped here, and set
with textContent there: a payload holding `<script>` stays text.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from relay import __version__


def fmt_s(value: float | None) -> str:
    """Seconds as an operator reads them: 850 ms, 12 s, 4 min, 3 h."""
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _get(data: dict[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _k(data: dict[str, Any], path: str, text: str | None = None) -> str:
    shown = text if text is not None else _get(data, path)
    return f'<b data-k="{escape(path)}">{escape(str(shown if shown is not None else "–"))}</b>'


def _cards(o: dict[str, Any]) -> str:
    trend = o["trend"]
    eta = fmt_s(trend["eta_s"]) if trend["eta_s"] is not None else "–"
    due = o["retry"]["next_due_in_s"]
    alive = sum(1 for w in o["workers"] if not w["expired"])
    return f"""
<section id="now" aria-label="the queue now">
  <div class="card"><span>waiting</span>{_k(o, "length")}</div>
  <div class="card"><span>delivering</span>{_k(o, "delivered_per_s")}
    <small>per second, last 10 s</small></div>
  <div class="card"><span>trend</span>{_k(o, "trend.state")}
    <small>{_k(o, "trend.change_per_s")}/s · ETA {_k(o, "trend.eta_s", eta)}</small></div>
  <div class="card"><span>in flight</span>{_k(o, "inflight")}</div>
  <div class="card"><span>retry scheduled</span>{_k(o, "retry.scheduled")}
    <small>next due {_k(o, "retry.next_due_in_s", fmt_s(due) if due is not None else "–")}
    </small></div>
  <div class="card"><span>dead letters</span>{_k(o, "dead")}</div>
  <div class="card"><span>workers alive</span>{_k(o, "workers_alive", str(alive))}</div>
</section>"""


def worker_state(w: dict[str, Any]) -> str:
    """delivering, paused, or quiet (marked in Redis, or said by the process)."""
    return "quiet" if w.get("quiet") else str(w.get("delivery") or "delivering")


def _workers(o: dict[str, Any]) -> str:
    rows = []
    for w in o["workers"]:
        mark = "expired" if w["expired"] else ("late" if w["late"] else "ok")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(w["started_at"] or 0))
        cells = [w["host"], w["pid"], started, f'{w["heartbeat_age_s"]} s ({mark})',
                 f'{w["busy"]} / {w["pool"]}', w["inflight"], worker_state(w)]
        cls = f' class="{mark}"' if mark != "ok" else ""
        rows.append(f'<tr{cls} data-worker="{escape(w["id"])}">'
                    + "".join(f"<td>{escape(str(c))}</td>" for c in cells)
                    + '<td class="actions"></td></tr>')
    body = "".join(rows) or '<tr><td colspan="8">no worker registered</td></tr>'
    return f"""
<section id="workers-panel"><h2>Workers</h2>
<div class="scroll"><table><thead><tr><th>host</th><th>pid</th><th>started (UTC)</th>
<th>heartbeat</th><th>greenlets busy</th><th>in flight</th><th>state</th><th></th></tr>
</thead><tbody id="workers">{body}</tbody></table></div>
<p class="note">Quiet: the process stops fetching, finishes what it holds and stays up
until restarted; restart it once it holds nothing (0 in flight).</p>
</section>"""


def _delivery(o: dict[str, Any]) -> str:
    """The pause banner (reason, since, until, who) and the Pause / Resume control."""
    p = o.get("pause")
    text = p["text"] if p else ""
    return f"""
<section id="delivery" class="{'paused' if p else 'delivering'}" aria-label="delivery">
<div id="pause-banner" role="alert"{'' if p else ' hidden'}><b>Delivery paused</b>
  <span id="pause-text">{escape(text)}</span>
  <button type="button" id="resume-button" class="js-only">Resume delivery</button></div>
<p id="delivering"{' hidden' if p else ''}>Delivering. A pause holds every worker process
of the queue within a second: calls in flight finish, the rest waits in Redis.</p>
<form id="pause-form" class="js-only">
  <input name="reason" size="40" maxlength="500" placeholder="reason (shown in logs and here)"
  aria-label="reason">
  <input name="for" size="12" placeholder="for, e.g. 30m" aria-label="for how long (empty:
  until resumed)">
  <button type="submit" id="pause-button">{'Update the pause' if p else 'Pause delivery'}
  </button></form>
<p id="control-result" role="status"></p>
</section>"""


def _gates(o: dict[str, Any]) -> str:
    g = o["gates"]
    circuit = "open" if g["circuit"]["open"] else "closed"
    why = "; ".join(f'{x["worker"]}: {"app " + x["app"] + ": " if x.get("app") else ""}'
                    f'{x["reason"]} (next probe in {x["next_probe_in_s"]} s)'
                    for x in g["circuit"]["open_in"])
    rl = g["rate_limit"]
    rate = f'{rl["per_s"]:g}/s, burst {rl["burst"]:g}' if rl["per_s"] else "off"
    shedding = ", ".join(p for p, on in g["shedding"].items() if on) or "none"
    return f"""
<section id="gates-panel"><h2>Gates</h2><dl>
  <dt>circuit</dt><dd>{_k(o, "gates.circuit.state", circuit)} <span id="circuit-why">
  {escape(why)}</span></dd>
  <dt>429 pause</dt><dd>{_k(o, "gates.paused_for_s")} s left</dd>
  <dt>rate limit</dt><dd>{_k(o, "gates.rate_limit.text", rate)}; in use
  {_k(o, "gates.rate_limit.in_use")} events of the burst</dd>
  <dt>shedding now</dt><dd>{_k(o, "gates.shedding.text", shedding)};
  shed so far: backlog {_k(o, "totals.shed_backlog", str(o["totals"].get("shed_backlog", 0)))},
  max age {_k(o, "totals.shed_max_age", str(o["totals"].get("shed_max_age", 0)))}</dd>
</dl>{_apps(o)}</section>"""


def _app_cells(name: str, app: dict[str, Any]) -> list[str]:
    """One app's row: as `relay stats` says it (admin.collect_apps)."""
    t, c, rl = app["totals"], app["circuit"], app["rate_limit"]
    circuit = (f'open in {len(c["open_in"])} worker(s): {c["reason"]}' if c["open_in"]
               else "closed")
    rate = f'{rl["limit_per_s"]:g}/s, burst {rl["burst"]}' if rl["limit_per_s"] else "off"
    return [name, f'{t.get("delivered", 0):,}', f'{t.get("retried", 0):,}',
            f'{t.get("dead", 0):,}', circuit, rate]


def _apps(o: dict[str, Any]) -> str:
    """A line per Pusher app (several apps only; app.js keeps it in step)."""
    lines = o.get("app_lines") or {}
    rows = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in _app_cells(n, a))
                   + "</tr>" for n, a in lines.items())
    return f"""
<div class="scroll" id="apps-panel"{'' if lines else ' hidden'}><table><thead><tr><th>app</th>
<th>delivered</th><th>retried</th><th>dead-lettered</th><th>circuit</th><th>rate limit</th>
</tr></thead><tbody id="apps">{rows}</tbody></table></div>"""


def _app_filter(apps: list[str]) -> str:
    """The chart's app selector, hidden with one app (app.js shows it if a reload adds one)."""
    options = "".join(f"<option>{escape(a)}</option>" for a in apps)
    return f"""
<p id="series-app-filter"{'' if len(apps) > 1 else ' hidden'}><label>app
  <select id="series-app"><option value="">every app</option>{options}</select></label>
  <small>one app's charts count its notifications; calls and their latency are the whole
  queue's</small></p>"""


def _series(s: dict[str, Any], apps: list[str]) -> str:
    t, sm = s["totals"], s["summary"]
    cells = "".join(f'<td data-t="{k}">{t[k]:,}</td>' for k in
                    ("delivered", "failed", "retried", "dead", "shed"))
    lat = "".join(f'<td data-t="{k}">{escape(fmt_s(sm[k]))}</td>' for k in
                  ("age_p50", "age_p99", "call_p50", "call_p99"))
    return f"""
<section id="charts"><h2>Throughput and latency
  <span class="tabs"><button type="button" data-window="15m" class="on">15 min</button>
  <button type="button" data-window="24h">24 h</button></span></h2>{_app_filter(apps)}
<h3>delivered per second <small>a spike above the usual scale is clipped and marked
▲ with its value</small></h3>
<div class="chart" id="chart-rate" role="img" aria-label="delivered per second"></div>
<h3>failed calls, retries, dead letters and shed per second <small>on a scale of their
own</small></h3>
<div class="chart small" id="chart-problems" role="img" aria-label="failures per second"></div>
<h3>latency <small>log scale</small></h3>
<div class="chart" id="chart-latency" role="img" aria-label="latency"></div>
<div class="scroll"><table id="window-totals"><thead><tr><th>in the window</th><th>delivered</th>
<th>failed calls</th><th>retried</th><th>dead-lettered</th><th>shed</th><th>age p50</th>
<th>age p99</th><th>call p50</th><th>call p99</th></tr></thead>
<tbody><tr><th id="window-name">last {escape(s["window"])}</th>{cells}{lat}</tr></tbody>
</table></div></section>"""


def _dead(d: dict[str, Any]) -> str:
    rows = []
    for e in d["entries"]:
        cells = [(e["error_class"], "nowrap"), (e["error"], "reason"), (e["attempts"], "num"),
                 (fmt_s(e["age_s"]), "nowrap"), (e["head"], "payload")]
        rows.append("<tr>" + "".join(f'<td class="{cls}">{escape(str(c))}</td>'
                                     for c, cls in cells) + '<td class="actions"></td></tr>')
    body = "".join(rows) or '<tr><td colspan="6">no dead letters</td></tr>'
    return f"""
<section id="dead-panel"><h2>Dead letters <small id="dead-count">{d["matched"]} of
{d["total"]}</small></h2>
<form id="dead-filter" class="js-only">
  <select name="class"><option value="">every reason</option><option>invalid</option>
  <option>rejected</option><option>exhausted</option></select>
  <input name="q" type="search" placeholder="text in payload or error">
  <button type="button" id="requeue-filtered">requeue the filtered</button>
  <input name="older" size="5" value="7d" aria-label="older than">
  <button type="button" id="purge-older">purge older than</button>
</form>
<p id="action-result" role="status"></p>
<div class="scroll"><table id="dead-table"><thead><tr><th>reason class</th><th>reason</th>
<th class="num">attempts</th><th>age</th><th>payload (head)</th><th></th></tr></thead>
<tbody id="dead">{body}</tbody></table></div>
<p class="js-only"><button type="button" id="dead-prev">newer…</button>
<span id="dead-range"></span><button type="button" id="dead-next">…older</button></p>
<pre id="dead-full" hidden></pre>
</section>"""


def render(overview: dict[str, Any], series: dict[str, Any], dead: dict[str, Any],
           csrf: str) -> bytes:
    q = escape(overview["queue"])
    charts = _series(series, overview.get("apps") or [])
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{escape(csrf)}">
<title>relay · {q}</title>
<link rel="icon" href="/static/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script>
</head><body>
<header><h1>relay <small>queue <code>{q}</code> · v{escape(__version__)}</small></h1>
<span id="updated">as of {time.strftime("%H:%M:%S", time.gmtime(overview["now"]))} UTC
(reload for news; with JavaScript it refreshes every 2 s)</span></header>
<main>{_delivery(overview)}{_cards(overview)}{charts}{_workers(overview)}{_gates(overview)}{_dead(dead)}
</main></body></html>
"""
    return html.encode()
