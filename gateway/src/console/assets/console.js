// The Sluice operator's console. Everything it shows comes from the admin API with the
// admin token, which is kept in sessionStorage (this tab only). No framework; charts
// with the vendored uPlot.
"use strict";

const TOKEN_KEY = "sluice-admin-token";
const POLL_MS = 1000;
const KEEP_POINTS = 900;

const $ = (selector) => document.querySelector(selector);

// What the page knows; window.sluiceConsole lets tests read what the charts were given.
const state = {
  tab: "overview",
  charts: {},
  data: null, // {t: [s…], series: {name: [v…]}}
  lastMs: 0,
  timer: null,
  ticks: 0,
  dlqSelected: new Set(),
};
window.sluiceConsole = state;

// ------------------------------------------------------------------ the admin API

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = Object.assign({}, options.headers || {}, { authorization: `Bearer ${token}` });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    throw new Unauthorized("the admin token was refused");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = text; }
  if (!response.ok) {
    const message = body && body.message ? body.message : `${response.status} ${text}`;
    const error = new Error(message);
    error.status = response.status;
    error.code = body && body.code;
    throw error;
  }
  return body;
}

const postJson = (path, value) => api(path, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify(value),
});

// ------------------------------------------------------------------ signing in

async function signIn(event) {
  event.preventDefault();
  const token = $("#token").value;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/admin/console/overview");
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#signin-error").textContent = error instanceof Unauthorized
      ? "Wrong token: the gateway refused it." : `Cannot reach the gateway: ${error.message}`;
    return;
  }
  $("#signin-error").textContent = "";
  $("#token").value = "";
  showApp();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearInterval(state.timer);
  state.timer = null;
  $("#signin-view").hidden = false;
  $("#tabs").hidden = true;
  $("#signout").hidden = true;
  document.querySelectorAll(".tab").forEach((tab) => { tab.hidden = true; });
  $("#readiness").textContent = "signed out";
  $("#readiness").className = "badge";
  $("#signin-error").textContent = message || "";
}

function showApp() {
  $("#signin-view").hidden = true;
  $("#tabs").hidden = false;
  $("#signout").hidden = false;
  showTab(state.tab);
  if (!state.timer) {
    state.timer = setInterval(tick, POLL_MS);
  }
  tick();
}

function showTab(name) {
  state.tab = name;
  document.querySelectorAll(".tab").forEach((tab) => { tab.hidden = tab.id !== name; });
  document.querySelectorAll("#tabs button").forEach((button) => {
    button.classList.toggle("active", button.dataset.tab === name);
  });
  refreshTab().catch(report);
}

function report(error) {
  if (error instanceof Unauthorized) {
    signOut("The admin token was refused; sign in again.");
  } else {
    console.warn(error);
  }
}

// ------------------------------------------------------------------ polling

async function tick() {
  if (document.hidden || !sessionStorage.getItem(TOKEN_KEY)) {
    return;
  }
  state.ticks += 1;
  try {
    const [overview, history] = await Promise.all([
      api("/admin/console/overview"),
      api(`/admin/console/history?since=${state.lastMs}`),
    ]);
    renderOverview(overview);
    appendHistory(history);
    // The other tabs refresh every other second, and only while shown.
    if (state.tab !== "overview" && state.tab !== "config" && state.ticks % 2 === 0) {
      await refreshTab();
    }
  } catch (error) {
    report(error);
  }
}

async function refreshTab() {
  switch (state.tab) {
    case "routes": return renderRoutes(await api("/admin/console/overview"));
    case "plugins": return renderPlugins();
    case "dlq": return renderDeadLetters();
    case "devices": return renderDevices();
    case "config": return renderConfig();
    default: return undefined;
  }
}

// ------------------------------------------------------------------ formatting

const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 1 }));
const bytes = (n) => {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
};
const time = (ms) => (ms ? new Date(ms).toLocaleString() : "–");

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function fill(tbody, rows, build) {
  tbody.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    build(tr, row);
    tbody.appendChild(tr);
  }
}

// ------------------------------------------------------------------ overview

function renderOverview(o) {
  const badge = $("#readiness");
  badge.textContent = o.ready ? "ready" : "not ready";
  badge.className = `badge ${o.ready ? "ready" : "not-ready"}`;
  $("#reasons").textContent = o.reasons.join("\n");
  const t = o.totals;
  const r = o.rates;
  $("#total-accepted").textContent = number(t.accepted);
  $("#total-refused").textContent = number(t.refused);
  $("#total-failed").textContent = number(t.rejected + t.dead_lettered);
  $("#total-dropped").textContent = number(t.dropped);
  $("#rate-accepted").textContent = `${number(r.accepted)}/s`;
  $("#rate-refused").textContent = `${number(r.refused)}/s`;
  $("#rate-failed").textContent = `${number((r.rejected || 0) + (r.dead_lettered || 0))}/s`;
  $("#rate-dropped").textContent = `${number(r.dropped)}/s`;
  $("#dead-letters").textContent = number(o.dead_letters.count);
  $("#dead-letter-bytes").textContent = `${bytes(o.dead_letters.bytes)} of ${bytes(o.dead_letters.limit_bytes)}`;
  fill($("#sinks tbody"), o.sinks, (tr, s) => {
    cell(tr, s.sink);
    cell(tr, s.failing ? "failing" : "ok", s.failing ? "error" : "ok");
    cell(tr, number(s.records), "num");
    cell(tr, bytes(s.bytes), "num");
    cell(tr, bytes(s.limit_bytes), "num");
    cell(tr, number(s.latency_p50_ms), "num");
    cell(tr, number(s.latency_p99_ms), "num");
  });
  state.overview = o;
  if (state.tab === "routes") renderRoutes(o);
}

// Charts: which series each shows, with a label and a colour.
const CHARTS = {
  messages: {
    element: "#chart-messages",
    series: [["accepted", "accepted", "#16794c"], ["refused", "refused", "#b54708"],
      ["failed", "failed", "#b42318"], ["dropped", "dropped", "#667085"]],
  },
  destinations: {
    element: "#chart-destinations",
    series: [["to_iot_core", "IoT Core", "#2457c5"], ["to_kinesis", "Kinesis", "#7a5af8"],
      ["to_local", "local", "#16794c"], ["to_dead_letter", "dead letter", "#b42318"]],
  },
  latency: {
    element: "#chart-latency",
    series: [["p50_iot_core", "IoT Core p50", "#2457c5"], ["p99_iot_core", "IoT Core p99", "#93b4f5"],
      ["p50_kinesis", "Kinesis p50", "#7a5af8"], ["p99_kinesis", "Kinesis p99", "#c4b5fd"],
      ["p50_local", "local p50", "#16794c"], ["p99_local", "local p99", "#86d5ac"]],
  },
  spool: {
    element: "#chart-spool",
    series: [["records_iot_core", "IoT Core", "#2457c5"], ["records_kinesis", "Kinesis", "#7a5af8"],
      ["records_local", "local", "#16794c"]],
  },
};

function appendHistory(h) {
  if (!state.data) {
    state.data = { t: [], series: {} };
  }
  const d = state.data;
  const names = Object.keys(h.series);
  for (const name of names) {
    d.series[name] = d.series[name] || [];
  }
  h.t.forEach((ms, i) => {
    d.t.push(ms / 1000);
    for (const name of names) d.series[name].push(h.series[name][i]);
  });
  // "failed" is what went wrong after admission: rejected plus dead-lettered.
  d.series.failed = d.series.rejected.map((v, i) => v + d.series.dead_lettered[i]);
  const extra = d.t.length - KEEP_POINTS;
  if (extra > 0) {
    d.t.splice(0, extra);
    for (const name of Object.keys(d.series)) d.series[name].splice(0, extra);
  }
  if (h.t.length) {
    state.lastMs = h.t[h.t.length - 1];
  }
  drawCharts();
}

function drawCharts() {
  const d = state.data;
  for (const [name, chart] of Object.entries(CHARTS)) {
    const data = [d.t, ...chart.series.map(([key]) => d.series[key] || [])];
    const existing = state.charts[name];
    if (existing) {
      existing.setData(data);
      continue;
    }
    const element = $(chart.element);
    if (element.clientWidth === 0) continue; // hidden: drawn when shown
    state.charts[name] = new uPlot({
      width: element.clientWidth - 10,
      height: 200,
      series: [{}, ...chart.series.map(([, label, stroke]) => ({ label, stroke, width: 2, spanGaps: false }))],
      scales: { x: { time: true } },
      axes: [{}, { size: 60 }],
    }, data, element);
  }
}

// ------------------------------------------------------------------ routes

function renderRoutes(o) {
  fill($("#routes-table tbody"), o.routes, (tr, route) => {
    cell(tr, route.route);
    cell(tr, route.destination);
    cell(tr, number(route.messages), "num");
  });
  fill($("#refusals-table tbody"), o.refusals, (tr, refusal) => {
    cell(tr, refusal.code);
    cell(tr, number(refusal.count), "num");
  });
}

// ------------------------------------------------------------------ plugins

async function renderPlugins() {
  const [{ plugins }, overview] = await Promise.all([api("/admin/plugins"), api("/admin/console/overview")]);
  fill($("#plugins-table tbody"), plugins, (tr, p) => {
    cell(tr, p.name);
    cell(tr, p.kind);
    cell(tr, p.hash.slice(0, 12)).title = p.hash;
    cell(tr, p.source === "upload" ? "upload" : `file ${p.configured_path}`);
    cell(tr, number(p.calls), "num");
    cell(tr, Object.entries(p.messages).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`).join(", ") || "–");
    const times = overview.plugins[p.name] || {};
    cell(tr, `${number(times.call_p50_us)} / ${number(times.call_p99_us)}`, "num");
    cell(tr, p.last_error ? `${p.last_error.code}: ${p.last_error.reason} (${time(p.last_error.at_ms)})` : "–", p.last_error ? "error" : "");
    const versions = cell(tr, "");
    if (p.source === "upload") {
      versions.appendChild(button("Roll back to the configured file", () => activate(p.name, { configured: true })));
    }
    for (const v of p.versions) {
      if (v.hash === p.hash) continue;
      versions.appendChild(button(`Activate ${v.hash.slice(0, 12)}`, () => activate(p.name, { hash: v.hash })));
    }
  });
  const select = $("#upload-plugin");
  const chosen = select.value;
  select.replaceChildren(...plugins.map((p) => new Option(p.name, p.name)));
  if (chosen) select.value = chosen;
}

async function activate(name, body) {
  const result = $("#upload-result");
  try {
    const report = await postJson(`/admin/plugins/${encodeURIComponent(name)}/activate`, body);
    result.className = "ok";
    result.textContent = `${name} now serves ${report.hash.slice(0, 12)}`;
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    result.className = "error";
    result.textContent = `Refused (${error.code || error.status}): ${error.message}`;
  }
  await renderPlugins();
}

async function upload(event) {
  event.preventDefault();
  const name = $("#upload-plugin").value;
  const file = $("#upload-file").files[0];
  const result = $("#upload-result");
  if (!name || !file) {
    result.className = "error";
    result.textContent = "Choose a plugin and a .wasm file.";
    return;
  }
  result.className = "";
  result.textContent = `Uploading ${file.name} (${bytes(file.size)})…`;
  const activateIt = $("#upload-activate").checked;
  try {
    const report = await api(`/admin/plugins/${encodeURIComponent(name)}/versions?activate=${activateIt}`, {
      method: "POST",
      headers: { "content-type": "application/wasm" },
      body: await file.arrayBuffer(),
    });
    result.className = "ok";
    result.textContent = `Stored ${report.hash.slice(0, 12)}${report.active ? "; it serves now" : ""}.`;
  } catch (error) {
    if (error instanceof Unauthorized) { report(error); return; }
    result.className = "error";
    result.textContent = `Refused (${error.code || error.status}): ${error.message}`;
  }
  await renderPlugins().catch(report);
}

// ------------------------------------------------------------------ dead letters

async function renderDeadLetters() {
  const page = await api("/admin/dlq?limit=200");
  const keys = new Set(page.dead_letters.map((l) => l.key));
  for (const key of state.dlqSelected) if (!keys.has(key)) state.dlqSelected.delete(key);
  fill($("#dlq-table tbody"), page.dead_letters, (tr, letter) => {
    tr.dataset.key = letter.key;
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.checked = state.dlqSelected.has(letter.key);
    pick.addEventListener("change", () => {
      if (pick.checked) state.dlqSelected.add(letter.key); else state.dlqSelected.delete(letter.key);
    });
    cell(tr, "").appendChild(pick);
    cell(tr, String(letter.key), "num");
    cell(tr, time(letter.at_ms));
    cell(tr, letter.device);
    cell(tr, letter.topic);
    cell(tr, letter.reason);
    const actions = cell(tr, "");
    actions.appendChild(button("Show", () => showLetter(letter.key).catch(report)));
    actions.appendChild(button("Redrive", () => redrive({ keys: [letter.key] }).catch(report)));
    actions.appendChild(button("Discard", () => discard([letter.key]).catch(report)));
  });
  $("#dlq-more").textContent = page.next ? "More letters than shown; the oldest 200 are listed." : "";
}

function hex(base64) {
  const raw = atob(base64);
  let out = "";
  for (let i = 0; i < raw.length; i += 1) {
    out += raw.charCodeAt(i).toString(16).padStart(2, "0") + (i % 16 === 15 ? "\n" : " ");
  }
  return out;
}

async function showLetter(key) {
  const letter = await api(`/admin/dlq/${key}`);
  let shown;
  if ("payload" in letter) shown = `JSON:\n${JSON.stringify(letter.payload, null, 2)}`;
  else if ("payload_text" in letter) shown = `text:\n${letter.payload_text}`;
  else shown = `hex:\n${hex(letter.payload_base64)}`;
  $("#dlq-payload").textContent = `#${key} ${letter.id} from ${letter.device} on ${letter.topic}\n${letter.reason}\n\n${shown}`;
}

async function redrive(body) {
  const out = $("#dlq-result");
  out.className = "";
  out.textContent = "Redriving…";
  try {
    const result = await postJson("/admin/dlq/redrive", body);
    const lines = [
      ...result.redriven.map((l) => `#${l.key} ${l.id}: ${l.status}`),
      ...result.kept.map((l) => `#${l.key} ${l.id}: kept, ${l.status}${l.error ? ` (${l.error.message || l.error.code})` : ""}`),
      ...result.missing.map((key) => `#${key}: not found`),
    ];
    out.className = "ok";
    out.textContent = `Redriven ${result.redriven.length}, kept ${result.kept.length}, not found ${result.missing.length}\n${lines.join("\n")}`;
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    out.className = "error";
    out.textContent = `Redrive failed: ${error.message}`;
  }
  state.dlqSelected.clear();
  await renderDeadLetters();
}

async function discard(keys) {
  const lines = [];
  for (const key of keys) {
    try {
      await api(`/admin/dlq/${key}`, { method: "DELETE" });
      lines.push(`#${key}: discarded`);
    } catch (error) {
      if (error instanceof Unauthorized) throw error;
      lines.push(`#${key}: ${error.message}`);
    }
  }
  $("#dlq-result").className = "ok";
  $("#dlq-result").textContent = lines.join("\n");
  state.dlqSelected.clear();
  await renderDeadLetters();
}

// ------------------------------------------------------------------ devices

async function renderDevices() {
  const { sessions } = await api("/admin/devices");
  fill($("#sessions-table tbody"), sessions, (tr, s) => {
    cell(tr, s.device);
    cell(tr, s.protocol);
    cell(tr, s.remote || "–");
    cell(tr, typeof s.auth === "string" ? s.auth : JSON.stringify(s.auth));
    cell(tr, time(s.connected_at_ms));
    cell(tr, number(s.messages), "num");
    cell(tr, `${number(s.in_flight)} of ${number(s.window)}`, "num");
    cell(tr, number(s.commands), "num");
  });
}

// ------------------------------------------------------------------ configuration

async function renderConfig() {
  const c = await api("/admin/console/config");
  $("#config-file").textContent = c.file ? `From ${c.file} (secrets shown as <redacted>).` : "The embedded default (started without --config).";
  $("#config-text").textContent = c.running;
}

async function reload() {
  const out = $("#reload-result");
  out.className = "";
  out.textContent = "Reloading…";
  try {
    const r = await api("/admin/reload", { method: "POST" });
    out.className = "ok";
    out.textContent = `Applied: ${r.applied.join(", ") || "nothing changed"}\n` +
      `Plugins loaded: ${r.plugins_loaded.join(", ") || "none"}; removed: ${r.plugins_removed.join(", ") || "none"}\n` +
      `Needs a restart: ${r.restart_required.join(", ") || "nothing"}`;
  } catch (error) {
    if (error instanceof Unauthorized) { report(error); return; }
    out.className = "error";
    out.textContent = `Refused (${error.code || error.status}); nothing changed:\n${error.message}`;
  }
  await renderConfig().catch(report);
}

// ------------------------------------------------------------------ wiring

$("#signin").addEventListener("submit", signIn);
$("#signout").addEventListener("click", () => signOut(""));
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
$("#upload").addEventListener("submit", upload);
$("#reload").addEventListener("click", reload);
$("#dlq-redrive-selected").addEventListener("click", () => redrive({ keys: [...state.dlqSelected] }).catch(report));
$("#dlq-discard-selected").addEventListener("click", () => discard([...state.dlqSelected]).catch(report));
$("#dlq-redrive-all").addEventListener("click", () => redrive({ all: true }).catch(report));
document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });

if (sessionStorage.getItem(TOKEN_KEY)) {
  showApp();
}
