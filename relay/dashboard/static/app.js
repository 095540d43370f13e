// relay's operator page: refreshes itself every 2 s from the JSON endpoints, draws the charts
// as SVG, and sends actions as POSTs with the page's CSRF token. Everything from Redis goes
// into the page through textContent, never innerHTML: a payload holding <script> is text.
(function () {
  "use strict";

  var REFRESH_MS = 2000;
  var SVG = "http://www.w3.org/2000/svg";
  var RATES = [["delivered", "delivered"], ["failed", "failed calls"], ["retried", "retried"],
               ["dead", "dead-lettered"], ["shed", "shed"]];
  var LATENCIES = [["age_p50", "age p50"], ["age_p99", "age p99"],
                   ["call_p50", "call p50"], ["call_p99", "call p99"]];
  var csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  var state = { window: "15m", offset: 0, limit: 20, q: "", cls: "" };
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
      return x.worker + ": " + x.reason + " (next probe in " + x.next_probe_in_s + " s)";
    }).join("; ");
    var body = $("workers");
    body.textContent = "";
    o.workers.forEach(function (w) {
      var mark = w.expired ? "expired" : (w.late ? "late" : "ok");
      var tr = el("tr", null, mark === "ok" ? "" : mark);
      var started = new Date((w.started_at || 0) * 1000).toISOString().slice(0, 19)
        .replace("T", " ");
      [w.host, w.pid, started, w.heartbeat_age_s + " s (" + mark + ")",
       w.busy + " / " + w.slots, w.inflight].forEach(function (c) { tr.appendChild(el("td", c)); });
      body.appendChild(tr);
    });
    if (!o.workers.length) {
      var none = el("td", "no worker registered");
      none.setAttribute("colspan", "6");
      body.appendChild(el("tr")).appendChild(none);
    }
  }

  // -- charts ------------------------------------------------------------------------------

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function timeLabel(t, step) {
    var d = new Date(t * 1000).toISOString();
    return step >= 60 ? d.slice(11, 16) : d.slice(11, 19);
  }

  // One chart: a line per series; log=true for latencies (they span milliseconds to hours).
  function chart(box, series, points, step, log, unit) {
    var w = Math.max(box.clientWidth || 600, 300), h = 180, pad = { l: 56, r: 8, t: 8, b: 20 };
    var max = 0, min = Infinity;
    series.forEach(function (s) {
      points.forEach(function (p) {
        var v = p[s[0]];
        if (v !== null && v !== undefined) { max = Math.max(max, v); if (v > 0) { min = Math.min(min, v); } }
      });
    });
    if (log) { min = Math.min(min === Infinity ? 0.001 : min, 0.001); max = Math.max(max, 1); }
    else { max = max > 0 ? max * 1.1 : 1; }
    var x = function (i) { return pad.l + (w - pad.l - pad.r) * i / Math.max(points.length - 1, 1); };
    var y = function (v) {
      var f = log ? (Math.log(Math.max(v, min)) - Math.log(min)) / (Math.log(max) - Math.log(min))
                  : v / max;
      return h - pad.b - (h - pad.t - pad.b) * f;
    };
    var root = svg("svg", { viewBox: "0 0 " + w + " " + h, width: w, height: h });
    root.appendChild(svg("line", { x1: pad.l, y1: h - pad.b, x2: w - pad.r, y2: h - pad.b,
                                   class: "axis" }));
    [[max, pad.t + 10], [log ? min : 0, h - pad.b]].forEach(function (lab) {
      var text = svg("text", { x: pad.l - 4, y: lab[1], "text-anchor": "end", class: "tick" });
      text.textContent = log ? fmtS(lab[0]) : fmtN(Math.round(lab[0] * 10) / 10) + unit;
      root.appendChild(text);
    });
    if (points.length) {
      [[0, "start"], [points.length - 1, "end"]].forEach(function (lab) {
        var text = svg("text", { x: x(lab[0]), y: h - 4, "text-anchor": lab[1], class: "tick" });
        text.textContent = timeLabel(points[lab[0]].t, step);
        root.appendChild(text);
      });
    }
    series.forEach(function (s, n) {
      var d = "", drawn = 0, pen = "M";
      points.forEach(function (p, i) {
        var v = p[s[0]];
        if (v === null || v === undefined) { pen = "M"; return; }
        d += pen + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
        if (v > 0) { drawn += 1; }
      });
      root.appendChild(svg("path", { d: d, class: "line s" + n, "data-series": s[0],
                                     "data-points": drawn }));
    });
    var legend = el("p", null, "legend");
    series.forEach(function (s, n) { legend.appendChild(el("span", s[1], "s" + n)); });
    box.textContent = "";
    box.appendChild(root);
    box.appendChild(legend);
  }

  function renderSeries(s) {
    chart($("chart-rate"), RATES, s.points, s.step_s, false, "/s");
    chart($("chart-latency"), LATENCIES, s.points, s.step_s, true, "");
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
      [e.error_class, e.error, e.attempts, fmtS(e.age_s)].forEach(function (c) {
        tr.appendChild(el("td", c));
      });
      tr.appendChild(el("td", e.head + (e.size > e.head.length ? "…" : ""), "payload"));
      var actions = el("td");
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

  function wire() {
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
    Promise.all([getJSON("/api/overview"), getJSON("/api/series?window=" + state.window),
                 getJSON(deadQuery())])
      .then(function (all) {
        renderOverview(all[0]);
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
