// relay's operator page: refreshes itself every 2 s from the JSON endpoints, draws the charts
// as SVG, and sends actions as POSTs with the page's CSRF token. Everything from Redis goes
// into the page through textContent, never innerHTML: a payload holding <script> is text.
(function () {
  "use strict";

  var REFRESH_MS = 2000;
  var SVG = "http://www.w3.org/2000/svg";
  var DELIVERED = [["delivered", "delivered"]];
  // On a chart of their own, so a few failures do not lie flat under the delivery rate.
  var PROBLEMS = [["failed", "failed calls"], ["retried", "retried"], ["dead", "dead-lettered"],
                  ["shed", "shed"]];
  var RATES = DELIVERED.concat(PROBLEMS);
  var LATENCIES = [["age_p50", "age p50"], ["age_p99", "age p99"],
                   ["call_p50", "call p50"], ["call_p99", "call p99"]];
  var csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  var state = { window: "15m", app: "", offset: 0, limit: 20, q: "", cls: "" };
  var lastOverview = null;

  document.documentElement.className += " js";

  function $(id) { return document.getElementById(id); }

  function fmtS(v) {
    if (v === null || v === undefined) { return "–"; }
    if (v < 1) { return Math.round(v * 1000) + " ms"; }
    if (v < 120) { return Math.round(v) + " s"; }
    if (v < 7200) { return Math.round(v / 60) + " min"; }
    return (v / 3600).toFixed(1) + " h";
  }

  function fmtN(v) {
    if (typeof v !== "number") { return v === null || v === undefined ? "–" : String(v); }
    return Number.isInteger(v) ? v.toLocaleString("en-US") : v.toFixed(1);
  }

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (cls) { node.className = cls; }
    return node;
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) { throw new Error(url.split("?")[0] + " answered " + r.status); }
      return r.json();
    });
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error(data.error || ("answered " + r.status)); }
        return data;
      });
    });
  }

  function lookup(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  // -- the queue now, workers, gates --------------------------------------------------------

  function derive(o) {
    var g = o.gates;
    o.workers_alive = o.workers.filter(function (w) { return !w.expired; }).length;
    g.circuit.state = g.circuit.open ? "open" : "closed";
    g.rate_limit.text = g.rate_limit.per_s ?
      g.rate_limit.per_s + "/s, burst " + g.rate_limit.burst : "off";
    g.shedding.text = Object.keys(g.shedding).filter(function (p) {
      return g.shedding[p] === true; }).join(", ") || "none";
    o.totals.shed_backlog = o.totals.shed_backlog || 0;
    o.totals.shed_max_age = o.totals.shed_max_age || 0;
  }

  var SECONDS = { "trend.eta_s": 1, "retry.next_due_in_s": 1 };

  function renderOverview(o) {
    derive(o);
    lastOverview = o;
    document.querySelectorAll("[data-k]").forEach(function (node) {
      var path = node.getAttribute("data-k");
      var v = lookup(o, path);
      node.textContent = SECONDS[path] ? fmtS(v) : fmtN(v);
    });
    $("circuit-why").textContent = o.gates.circuit.open_in.map(function (x) {
      return x.worker + ": " + (x.app ? "app " + x.app + ": " : "") + x.reason +
        " (next probe in " + x.next_probe_in_s + " s)";
    }).join("; ");
    renderDelivery(o.pause);
    var body = $("workers");
    body.textContent = "";
    o.workers.forEach(function (w) {
      var mark = w.expired ? "expired" : (w.late ? "late" : "ok");
      var tr = el("tr", null, mark === "ok" ? "" : mark);
      tr.setAttribute("data-worker", w.id);
      var started = new Date((w.started_at || 0) * 1000).toISOString().slice(0, 19)
        .replace("T", " ");
      var state = w.quiet ? "quiet" : (w.delivery || "delivering");
      if (w.quiet) { state += " " + fmtS(o.now - w.quiet.since) + " (" + w.quiet.how + ")"; }
      [w.host, w.pid, started, w.heartbeat_age_s + " s (" + mark + ")",
       w.busy + " / " + w.pool, w.inflight, state].forEach(function (c) {
        tr.appendChild(el("td", c));
      });
      var actions = el("td", null, "actions");
      if (!w.quiet && !w.expired) {
        actions.appendChild(button("quiet", "quiet", function () {
          if (!window.confirm("Quiet worker " + w.id + "? It stops fetching, finishes what " +
                              "it holds and stays up until restarted.")) { return; }
          control(post("/api/quiet", { worker: w.id }), "worker " + w.id + " told to go quiet");
        }));
      }
      tr.appendChild(actions);
      body.appendChild(tr);
    });
    if (!o.workers.length) {
      var none = el("td", "no worker registered");
      none.setAttribute("colspan", "8");
      body.appendChild(el("tr")).appendChild(none);
    }
  }

  // -- delivery: the pause banner and the Pause / Resume control ----------------------------

  function renderDelivery(p) {
    $("pause-banner").hidden = !p;
    $("delivering").hidden = !!p;
    $("delivery").className = p ? "paused" : "delivering";
    $("pause-text").textContent = p ? p.text : "";
    $("pause-button").textContent = p ? "Update the pause" : "Pause delivery";
  }

  function control(promise, what) {
    promise.then(function () {
      $("control-result").textContent = what;
      refresh();
    }).catch(function (e) { $("control-result").textContent = "failed: " + e.message; });
  }

  // -- charts ------------------------------------------------------------------------------

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  // Time-axis label steps (seconds): the first that puts at most `fit` labels on the axis.
  var TICK_STEPS_S = [30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];

  function timeLabel(t, step) {
    var d = new Date(t * 1000).toISOString();
    return step >= 60 ? d.slice(11, 16) : d.slice(11, 19);
  }

  function timeTicks(t0, t1, fit) {
    var step = TICK_STEPS_S[TICK_STEPS_S.length - 1];
    for (var i = 0; i < TICK_STEPS_S.length; i++) {
      if ((t1 - t0) / TICK_STEPS_S[i] <= fit) { step = TICK_STEPS_S[i]; break; }
    }
    var ticks = [];
    for (var t = Math.ceil(t0 / step) * step; t <= t1; t += step) { ticks.push(t); }
    return { step: step, ticks: ticks };
  }

  function niceCeil(v) {
    if (!(v > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log(v) / Math.LN10));
    var steps = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10];
    for (var i = 0; i < steps.length; i++) { if (steps[i] * p >= v * 0.999999) { return steps[i] * p; } }
    return 10 * p;
  }

  // A linear axis whose top is the largest value, unless a few points tower over the rest
  // (the drain after an outage): then the usual range sets the top, and those points are
  // drawn clipped at it and marked with their value, so one spike cannot flatten the chart.
  function linearAxis(values) {
    var seen = values.filter(function (v) { return v > 0; }).sort(function (a, b) { return a - b; });
    var max = seen.length ? seen[seen.length - 1] : 0;
    var usual = seen.length ? seen[Math.floor(0.95 * (seen.length - 1))] : 0;
    var top = seen.length >= 20 && max > 3 * usual ? niceCeil(usual * 1.5) : niceCeil(max * 1.05);
    var ticks = Math.round(top * 5) === top * 5 ? [0, top / 2, top] : [0, top];  // mid: 1 decimal
    return { top: top, ticks: ticks, at: function (v) { return Math.min(v, top) / top; } };
  }

  // Latencies span milliseconds to an hour: one decade per label.
  function logAxis(values) {
    var lo = 0.001, hi = 1;
    values.forEach(function (v) { if (v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    var ticks = [];
    for (var d = Math.pow(10, Math.ceil(Math.log(lo) / Math.LN10 - 1e-9)); d <= hi * 1.0001; d *= 10) {
      ticks.push(d);
    }
    return { top: hi, ticks: ticks, at: function (v) {
      return (Math.log(Math.max(v, lo)) - Math.log(lo)) / (Math.log(hi) - Math.log(lo));
    } };
  }

  function label(root, x, y, text, anchor, cls) {
    var node = svg("text", { x: x, y: y, "text-anchor": anchor, class: cls || "tick" });
    node.textContent = text;
    root.appendChild(node);
  }

  // One chart: a line per series over time, grid lines and labels on both axes, and a
  // marker with its value above each run of points clipped at the top.
  function chart(box, series, points, opts) {
    var w = Math.max(box.clientWidth || 600, 300), h = opts.height;
    var pad = { l: 60, r: 12, t: 16, b: 20 };
    var values = [];
    series.forEach(function (s) {
      points.forEach(function (p) { if (p[s[0]] !== null && p[s[0]] !== undefined) { values.push(p[s[0]]); } });
    });
    var axis = opts.log ? logAxis(values) : linearAxis(values);
    var t0 = points.length ? points[0].t : 0, t1 = points.length ? points[points.length - 1].t : 1;
    var x = function (t) { return pad.l + (w - pad.l - pad.r) * (t - t0) / Math.max(t1 - t0, 1); };
    var y = function (v) { return h - pad.b - (h - pad.t - pad.b) * axis.at(v); };
    var root = svg("svg", { viewBox: "0 0 " + w + " " + h, width: w, height: h,
                            "data-top": axis.top });
    axis.ticks.forEach(function (v) {
      root.appendChild(svg("line", { x1: pad.l, y1: y(v), x2: w - pad.r, y2: y(v),
                                     class: v ? "grid" : "axis" }));
      label(root, pad.l - 6, y(v) + 4, opts.log ? fmtS(v) : fmtN(v) + opts.unit, "end");
    });
    var time = timeTicks(t0, t1, Math.max(2, Math.floor((w - pad.l - pad.r) / 90)));
    time.ticks.forEach(function (t) {
      root.appendChild(svg("line", { x1: x(t), y1: pad.t, x2: x(t), y2: h - pad.b, class: "grid" }));
      label(root, x(t), h - 5, timeLabel(t, time.step), "middle");
    });
    root.setAttribute("data-time-labels", time.ticks.length);
    var clipped = 0, lastMark = -Infinity;
    series.forEach(function (s) {
      var d = "", drawn = 0, pen = "M", run = null;
      var mark = function () {
        if (run === null) { return; }
        clipped += 1;
        var mx = x(run.t);
        root.appendChild(svg("path", { d: "M" + (mx - 5) + " " + (pad.t + 1) + " L" + mx + " " +
                                          (pad.t - 7) + " L" + (mx + 5) + " " + (pad.t + 1) + " Z",
                                       class: "clip k-" + s[0] }));
        if (mx - lastMark > 70) {  // one value per crowded stretch
          label(root, mx + 8, pad.t - 2, fmtN(Math.round(run.v)) + opts.unit, "start", "clip-label");
          lastMark = mx;
        }
        run = null;
      };
      points.forEach(function (p) {
        var v = p[s[0]];
        if (v === null || v === undefined) { pen = "M"; mark(); return; }
        d += pen + x(p.t).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
        if (v > 0) { drawn += 1; }
        if (!opts.log && v > axis.top) {
          if (run === null || v > run.v) { run = { t: p.t, v: v }; }
        } else { mark(); }
      });
      mark();
      root.appendChild(svg("path", { d: d, class: "line k-" + s[0], "data-series": s[0],
                                     "data-points": drawn }));
    });
    root.setAttribute("data-clipped", clipped);
    var legend = el("p", null, "legend");
    series.forEach(function (s) { legend.appendChild(el("span", s[1], "k-" + s[0])); });
    if (clipped) { legend.appendChild(el("span", "▲ above " + fmtN(axis.top) + opts.unit, "note")); }
    box.textContent = "";
    box.appendChild(root);
    box.appendChild(legend);
  }

  // The app selector follows the apps the overview names (a reload may add or remove one).
  function renderApps(apps) {
    var select = $("series-app");
    var wanted = [""].concat(apps || []);
    var have = Array.prototype.map.call(select.options, function (o) { return o.value; });
    if (have.join("\n") !== wanted.join("\n")) {
      select.textContent = "";
      wanted.forEach(function (name) {
        var option = el("option", name || "every app");
        option.value = name;
        select.appendChild(option);
      });
      if (wanted.indexOf(state.app) < 0) { state.app = ""; }
      select.value = state.app;
    }
    $("series-app-filter").hidden = wanted.length < 3;
  }

  // A line per app (several apps only), as the page rendered it.
  function renderAppLines(lines) {
    var body = $("apps");
    body.textContent = "";
    Object.keys(lines || {}).forEach(function (name) {
      var a = lines[name], t = a.totals, c = a.circuit, rl = a.rate_limit;
      var circuit = c.open_in.length ? "open in " + c.open_in.length + " worker(s): " + c.reason
        : "closed";
      var rate = rl.limit_per_s ? rl.limit_per_s + "/s, burst " + rl.burst : "off";
      var tr = el("tr");
      [name, fmtN(t.delivered || 0), fmtN(t.retried || 0), fmtN(t.dead || 0), circuit, rate]
        .forEach(function (cell) { tr.appendChild(el("td", cell)); });
      body.appendChild(tr);
    });
    $("apps-panel").hidden = !lines;
  }

  function seriesQuery() {
    return "/api/series?window=" + state.window +
      (state.app ? "&app=" + encodeURIComponent(state.app) : "");
  }

  function renderSeries(s) {
    chart($("chart-rate"), DELIVERED, s.points, { height: 170, unit: "/s" });
    chart($("chart-problems"), PROBLEMS, s.points, { height: 120, unit: "/s" });
    chart($("chart-latency"), LATENCIES, s.points, { height: 170, log: true, unit: "" });
    $("window-name").textContent = "last " + s.window;
    RATES.forEach(function (r) {
      document.querySelector('[data-t="' + r[0] + '"]').textContent = fmtN(s.totals[r[0]]);
    });
    LATENCIES.forEach(function (l) {
      document.querySelector('[data-t="' + l[0] + '"]').textContent = fmtS(s.summary[l[0]]);
    });
  }

  // -- dead letters -------------------------------------------------------------------------

  function say(text) { $("action-result").textContent = text; }

  function act(promise, what) {
    promise.then(function (r) {
      var skipped = r.skipped_invalid ? "; " + r.skipped_invalid + " invalid skipped: the " +
        "worker would refuse them again (pick the reason \u201cinvalid\u201d to requeue them)" : "";
      say(what + ": " + r.moved + " dead letter(s) moved" + skipped);
      refresh();
    }).catch(function (e) { say(what + " failed: " + e.message); });
  }

  function button(text, cls, onclick) {
    var b = el("button", text, cls);
    b.type = "button";
    b.addEventListener("click", onclick);
    return b;
  }

  function showFull(id) {
    getJSON("/api/dead/entry?id=" + encodeURIComponent(id)).then(function (e) {
      var pre = $("dead-full");
      pre.textContent = e.payload;
      pre.hidden = false;
    }).catch(function (e) { say(e.message); });
  }

  function renderDead(d) {
    $("dead-count").textContent = d.matched + " of " + d.total +
      (d.scanned < d.total ? " (first " + d.scanned + " searched)" : "");
    var body = $("dead");
    body.textContent = "";
    d.entries.forEach(function (e) {
      var tr = el("tr");
      tr.setAttribute("data-id", e.id);
      [[e.error_class, "nowrap"], [e.error, "reason"], [e.attempts, "num"],
       [fmtS(e.age_s), "nowrap"]].forEach(function (c) { tr.appendChild(el("td", c[0], c[1])); });
      tr.appendChild(el("td", e.head + (e.size > e.head.length ? "…" : ""), "payload"));
      var actions = el("td", null, "actions");
      actions.appendChild(button("requeue", "requeue", function () {
        act(post("/api/dead/requeue", { id: e.id }), "requeue");
      }));
      actions.appendChild(button("full", "full", function () { showFull(e.id); }));
      tr.appendChild(actions);
      body.appendChild(tr);
    });
    if (!d.entries.length) {
      var none = el("td", "no dead letters" + (state.q || state.cls ? " match" : ""));
      none.setAttribute("colspan", "6");
      body.appendChild(el("tr")).appendChild(none);
    }
    var last = Math.min(d.offset + d.entries.length, d.matched);
    $("dead-range").textContent = d.matched ? (d.offset + 1) + "–" + last : "";
    $("dead-prev").disabled = d.offset === 0;
    $("dead-next").disabled = last >= d.matched;
  }

  function deadQuery() {
    return "/api/dead?offset=" + state.offset + "&limit=" + state.limit +
      "&q=" + encodeURIComponent(state.q) + "&class=" + encodeURIComponent(state.cls);
  }

  function wireDelivery() {
    var form = $("pause-form");
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      control(post("/api/pause", { reason: form.elements.reason.value,
                                   "for": form.elements["for"].value }), "paused");
    });
    $("resume-button").addEventListener("click", function () {
      control(post("/api/resume", {}), "resumed");
    });
  }

  function wire() {
    wireDelivery();
    var form = $("dead-filter");
    form.addEventListener("submit", function (ev) { ev.preventDefault(); });
    form.addEventListener("input", function () {
      state.q = form.elements.q.value;
      state.cls = form.elements["class"].value;
      state.offset = 0;
      refresh();
    });
    $("requeue-filtered").addEventListener("click", function () {
      act(post("/api/dead/requeue", { q: state.q, "class": state.cls }), "requeue filtered");
    });
    $("purge-older").addEventListener("click", function () {
      var older = form.elements.older.value;
      if (!window.confirm("Delete the dead letters older than " + older + " that match?")) { return; }
      act(post("/api/dead/purge", { older_than: older, q: state.q, "class": state.cls }), "purge");
    });
    $("dead-prev").addEventListener("click", function () {
      state.offset = Math.max(0, state.offset - state.limit); refresh();
    });
    $("dead-next").addEventListener("click", function () {
      state.offset += state.limit; refresh();
    });
    $("series-app").addEventListener("change", function () {
      state.app = $("series-app").value;
      refresh();
    });
    document.querySelectorAll("[data-window]").forEach(function (b) {
      b.addEventListener("click", function () {
        state.window = b.getAttribute("data-window");
        document.querySelectorAll("[data-window]").forEach(function (o) {
          o.className = o === b ? "on" : "";
        });
        refresh();
      });
    });
  }

  // -- the loop -----------------------------------------------------------------------------

  var timer = null;

  function refresh() {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    Promise.all([getJSON("/api/overview"), getJSON(seriesQuery()),
                 getJSON(deadQuery())])
      .then(function (all) {
        renderOverview(all[0]);
        renderApps(all[0].apps);
        renderAppLines(all[0].app_lines);
        renderSeries(all[1]);
        renderDead(all[2]);
        $("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function (e) { $("updated").textContent = "no answer: " + e.message; })
      .then(function () {
        if (timer === null) { timer = setTimeout(refresh, REFRESH_MS); }
      });
  }

  wire();
  refresh();
  window.relayDashboard = { lastOverview: function () { return lastOverview; } };
}());
