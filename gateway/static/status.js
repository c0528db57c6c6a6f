"use strict";
// The status page: polls /status.json (gateway/status.py) every refresh_s and redraws from it. Plain DOM,
// no framework, no build step; text goes in as text (worker names and errors come from the network).
(() => {
  const KEY = "sglang-gw-admin-key"; // session storage: this tab only
  const HIGHLIGHT_MS = 10000; // how long a row stays marked after its state changed
  const MAX_EVENTS = 100;
  const $ = (id) => document.getElementById(id);
  const seen = new Map(); // engine name -> {label, changedAt}: what the last poll showed
  let refreshMs = 2000;
  let timer = null;

  // ---- formatting -------------------------------------------------------------------------------------

  const none = "—";
  const number = (v, digits = 0) => (v == null ? none : v.toFixed(digits));
  const percent = (v) => (v == null ? none : `${(v * 100).toFixed(1)} %`);
  const seconds = (v) => (v == null ? none : v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`);
  const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "dataset") Object.assign(node.dataset, value);
      else node[name] = value;
    }
    node.append(...children.filter((c) => c != null));
    return node;
  }

  const cell = (content, className = "") => el("td", { className }, content);
  const badge = (text, kind) => el("span", { className: `badge ${kind}` }, text);

  function meter(fraction) {
    const bar = el("span");
    bar.style.width = `${Math.min(100, Math.max(0, fraction * 100))}%`;
    return el("span", { className: "meter", role: "presentation" }, bar);
  }

  // ---- the data ---------------------------------------------------------------------------------------

  async function poll() {
    const key = sessionStorage.getItem(KEY);
    let response;
    try {
      response = await fetch("/status.json", {
        cache: "no-store",
        headers: key ? { Authorization: `Bearer ${key}` } : {},
      });
    } catch (err) {
      connection("lost", "gateway unreachable, retrying…");
      return schedule();
    }
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(KEY);
      return askForKey(await reason(response));
    }
    if (!response.ok) {
      connection("lost", `${await reason(response)}, retrying…`);
      return schedule();
    }
    render(await response.json());
    schedule();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, refreshMs);
  }

  async function reason(response) {
    try {
      return (await response.json()).error.message;
    } catch (err) {
      return `status ${response.status}`;
    }
  }

  function connection(kind, text) {
    const node = $("connection");
    node.className = `connection ${kind}`;
    node.textContent = text;
  }

  function askForKey(why) {
    $("content").hidden = true;
    $("key-form").hidden = false;
    $("key-reason").textContent = why;
    connection("lost", "admin key needed");
    $("key-input").focus();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value);
    $("key-input").value = "";
    $("key-form").hidden = true;
    poll();
  });

  // ---- drawing ----------------------------------------------------------------------------------------

  function render(data) {
    refreshMs = data.refresh_s * 1000;
    $("content").hidden = false;
    connection("live", `live · updated ${clock(data.now)} · every ${data.refresh_s} s`);
    $("window").textContent = `(${data.fleet.policy} routing; rates over the last ${Math.round(data.window_s)} s)`;
    renderFleet(data.fleet);
    renderEngines(data.workers, data.now);
    renderRoutes(data.fleet.routes);
    renderAttempts("decisions", data.decisions, (a) => [
      cell(a.path), cell(a.worker), cell(a.route), cell(String(a.matched_bytes), "num"),
      cell(a.failed ? badge(a.status == null ? "none" : String(a.status), "failed") : String(a.status), "num"),
      cell(seconds(a.ttfb_s), "num"),
    ]);
    renderAttempts("errors", data.errors, (a) => [
      cell(a.path), cell(a.worker), cell(a.route), cell(a.status == null ? none : String(a.status), "num"),
      cell(a.why || `status ${a.status}`, "wrap"),
    ]);
  }

  function renderFleet(f) {
    const tiles = [
      ["ready workers", `${f.ready_workers} / ${f.workers}`],
      ["admitting", f.admitting ? "yes" : "no (shutting down)"],
      ["answers/s", number(f.answers_per_s, 2)],
      ["errors/s", number(f.errors_per_s, 2)],
      ["first byte p50", seconds(f.ttfb_p50_s)],
      ["first byte p95", seconds(f.ttfb_p95_s)],
      ["tokens/s", number(f.tokens_per_s, 1)],
      ["in flight", String(f.inflight)],
      ["gateway queue", String(f.queued)],
    ];
    $("fleet").replaceChildren(...tiles.map(([name, value]) => el("div", {}, el("dt", {}, name), el("dd", {}, value))));
  }

  function stateName(w) {
    return w.draining && w.state === "ready" ? "draining" : w.state; // a drained worker is still "ready"
  }

  function stateBadge(w) {
    const name = stateName(w);
    return badge(name, name === "draining" ? "hold" : name);
  }

  function phaseBadge(phase) {
    if (phase == null) return none; // not a local engine: no supervisor phase
    const kind = { ready: "ready", starting: "starting", backoff: "unhealthy", held_out: "hold" }[phase] || "dead";
    return badge(phase.replace("_", " "), kind);
  }

  function renderEngines(workers, now) {
    const rows = workers.map((w) => {
      const label = `${stateName(w)}${w.phase ? ` (${w.phase})` : ""}`;
      const before = seen.get(w.name);
      if (before && before.label !== label) {
        event(now, `${w.name}: ${before.label} → ${label}`);
      }
      const changedAt = before && before.label !== label ? Date.now() : before ? before.changedAt : 0;
      seen.set(w.name, { label, changedAt });
      const kv = w.token_usage == null ? none : el("span", {}, meter(w.token_usage), percent(w.token_usage));
      const payoff = w.prediction_payoff == null ? none
        : `${percent(w.prediction_payoff)}${w.prediction_distrusted ? " (distrusted)" : ""}`;
      return el("tr", {
        className: Date.now() - changedAt < HIGHLIGHT_MS ? "changed" : "",
        dataset: { engine: w.name, state: w.state, phase: w.phase || "" },
        title: `${w.url} · ${w.origin}${w.pid ? ` · pid ${w.pid}` : ""} · breaker ${w.breaker}`,
      },
        el("th", { scope: "row" }, w.name),
        cell(stateBadge(w)),
        cell(phaseBadge(w.phase)),
        cell(w.restarts == null ? none : String(w.restarts), "num"),
        cell(String(w.inflight), "num"),
        cell(number(w.running), "num"),
        cell(number(w.queued), "num"),
        cell(kv),
        cell(percent(w.cache_hit_rate), "num"),
        cell(payoff, "num"),
        cell(number(w.tokens_per_s, 1), "num"),
        cell(seconds(w.ttft_s), "num"),
        cell(w.load_error || w.last_exit || none, "wrap"),
      );
    });
    $("engines").tBodies[0].replaceChildren(...rows);
  }

  function event(now, text) {
    const list = $("events");
    list.prepend(el("li", {}, `${clock(now)} ${text}`));
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  }

  function renderRoutes(routes) {
    const entries = Object.entries(routes).sort((a, b) => b[1] - a[1]);
    const total = entries.reduce((sum, [, n]) => sum + n, 0);
    const items = entries.map(([route, n]) => el("li", {}, el("span", {}, route), meter(n / total), el("span", { className: "num" }, String(n))));
    $("routes").replaceChildren(...(items.length ? items : [el("li", { className: "empty" }, "no requests in the window")]));
  }

  function renderAttempts(id, attempts, cells) {
    const table = $(id);
    const columns = table.tHead.rows[0].cells.length;
    const rows = attempts.map((a) => el("tr", {}, cell(clock(a.at)), ...cells(a)));
    table.tBodies[0].replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { className: "empty", colSpan: columns }, "none yet"))]));
  }

  // First: whether the data needs a key (asked of /status/access, which holds none), so that a page opened
  // without one asks for it instead of drawing a 401 from /status.json.
  async function start() {
    if (!sessionStorage.getItem(KEY)) {
      try {
        const access = await (await fetch("/status/access", { cache: "no-store" })).json();
        if (!access.open) return askForKey("The status data needs the gateway's admin key.");
      } catch (err) {
        connection("lost", "gateway unreachable, retrying…");
        timer = setTimeout(start, refreshMs);
        return;
      }
    }
    poll();
  }

  start();
})();
