// Magnetar's console: the admin API for the tree and the stats, the
// WebSocket API for live messages and publishing. Plain DOM, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;
const CHART_POINTS = 60;
const MAX_ROWS = 1000;
const RATE_SAMPLES = 6;

const state = {
  token: localStorage.getItem("magnetar.token") || "",
  topics: [],          // {name, domain, tenant, ns, local, partitioned}
  counters: new Map(), // name -> recent [{at, msgIn, msgOut}]
  rates: new Map(),    // name -> {in, out, backlog, stored, subs}
  series: [],          // [{in, out}] of the selected topic
  brokerSeries: [],    // [{in, out}] of the whole broker, from /metrics
  scrapes: [],         // recent [{at, ns: Map(namespace -> {in, out})}]
  selected: null,
  shape: "",
  reader: null,
  producer: null,
  pendingPublish: new Map(),
};

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(path) {
  const r = await fetch(path, { headers: headers() });
  if (!r.ok) {
    let why = r.status + " " + r.statusText;
    try { why = (await r.json()).reason || why; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + why);
  }
  return r.json();
}

function wsUrl(path, params) {
  const u = new URL(path, location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params || {})) u.searchParams.set(k, v);
  return u.toString();
}

// A browser cannot set headers on a WebSocket, and a token in the URL
// would end up in logs and history: it travels as a subprotocol
// (`bearer.<jwt>`) next to `magnetar`, which the server echoes.
function openSocket(path, params) {
  const url = wsUrl(path, params);
  return state.token ? new WebSocket(url, ["magnetar", "bearer." + state.token]) : new WebSocket(url);
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "muted";
}

// ---- the tree ----

function parseTopic(full, partitionedBases) {
  const m = /^(persistent|non-persistent):\/\/([^/]+)\/([^/]+)\/(.+)$/.exec(full);
  if (!m) return null;
  let local = m[4];
  const p = /^(.*)-partition-\d+$/.exec(local);
  const base = p ? `${m[1]}://${m[2]}/${m[3]}/${p[1]}` : null;
  if (p && partitionedBases.has(base)) local = p[1];
  return {
    name: `${m[1]}://${m[2]}/${m[3]}/${local}`,
    domain: m[1], tenant: m[2], ns: m[3], local,
    partitioned: partitionedBases.has(`${m[1]}://${m[2]}/${m[3]}/${local}`),
  };
}

async function loadTopics() {
  const out = new Map();
  const tenants = await api("/admin/v2/tenants");
  for (const t of tenants) {
    const namespaces = await api(`/admin/v2/namespaces/${encodeURIComponent(t)}`);
    for (const full of namespaces) {
      const ns = full.split("/")[1];
      const base = `${encodeURIComponent(t)}/${encodeURIComponent(ns)}`;
      const partitioned = new Set(await api(`/admin/v2/persistent/${base}/partitioned`));
      const names = [
        ...(await api(`/admin/v2/persistent/${base}`)),
        ...(await api(`/admin/v2/non-persistent/${base}`)),
        ...partitioned,
      ];
      out.set(`${t}/${ns}`, null);
      for (const n of names) {
        const topic = parseTopic(n, partitioned);
        if (topic) out.set(topic.name, topic);
      }
    }
  }
  return out;
}

function topicPath(t) {
  return `${t.domain}/${encodeURIComponent(t.tenant)}/${encodeURIComponent(t.ns)}/${encodeURIComponent(t.local)}`;
}

function renderTree(entries) {
  const nav = $("tree");
  const open = new Set([...nav.querySelectorAll("details[open]")].map((d) => d.dataset.key));
  const first = nav.childElementCount === 0;
  nav.textContent = "";
  const groups = new Map();
  for (const [key, t] of entries) {
    const [tenant, ns] = t ? [t.tenant, t.ns] : key.split("/");
    if (!groups.has(tenant)) groups.set(tenant, new Map());
    const nss = groups.get(tenant);
    if (!nss.has(ns)) nss.set(ns, []);
    if (t) nss.get(ns).push(t);
  }
  for (const [tenant, nss] of [...groups].sort()) {
    const td = document.createElement("details");
    td.dataset.key = tenant;
    td.open = first || open.has(tenant);
    const ts = document.createElement("summary");
    ts.textContent = tenant;
    td.append(ts);
    for (const [ns, topics] of [...nss].sort()) {
      const nd = document.createElement("details");
      nd.dataset.key = `${tenant}/${ns}`;
      nd.open = first || open.has(nd.dataset.key);
      const s = document.createElement("summary");
      s.textContent = `${ns} (${topics.length})`;
      nd.append(s);
      topics.sort((a, b) => a.name.localeCompare(b.name));
      for (const t of topics) nd.append(topicRow(t));
      td.append(nd);
    }
    nav.append(td);
  }
}

function topicRow(t) {
  const row = document.createElement("div");
  row.className = "topic-row" + (state.selected && state.selected.name === t.name ? " selected" : "");
  row.dataset.topic = t.name;
  row.title = t.name;
  const name = document.createElement("span");
  name.className = "topic-name";
  name.textContent = t.local;
  for (const [on, text, title] of [
    [t.partitioned, "P", "partitioned"],
    [t.domain === "non-persistent", "NP", "non-persistent"],
  ]) {
    if (!on) continue;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = text;
    badge.title = title;
    name.append(" ", badge);
  }
  const rate = document.createElement("span");
  rate.className = "num rate";
  const backlog = document.createElement("span");
  backlog.className = "num backlog";
  row.append(name, rate, backlog);
  fillRow(row, state.rates.get(t.name));
  row.addEventListener("click", () => select(t));
  return row;
}

function fillRow(row, r) {
  if (!r) return;
  row.querySelector(".rate").textContent = `${fmt(r.in)}/s`;
  row.querySelector(".backlog").textContent = `backlog ${r.backlog}`;
}

function fmt(x) {
  if (x >= 1e6) return (x / 1e6).toFixed(1) + "M";
  if (x >= 1e3) return (x / 1e3).toFixed(1) + "k";
  return x >= 10 || x === 0 ? Math.round(x).toString() : x.toFixed(1);
}

// ---- stats ----

function sumStats(s) {
  // One topic's stats, or a partitioned topic's (its partitions summed).
  const parts = s.partitions ? Object.values(s.partitions) : [s];
  let msgIn = 0, msgOut = 0, backlog = 0, stored = 0;
  const subs = new Set();
  for (const p of parts) {
    msgIn += p.msgInCounter || 0;
    stored += p.storageSize || 0;
    for (const [name, sub] of Object.entries(p.subscriptions || {})) {
      subs.add(name);
      msgOut += sub.msgOutCounter || 0;
      backlog += sub.msgBacklog || 0;
    }
  }
  return { msgIn, msgOut, backlog, stored, subs: subs.size };
}

async function refreshStats(t) {
  const path = `/admin/v2/${topicPath(t)}/${t.partitioned ? "partitioned-stats" : "stats"}`;
  const s = sumStats(await api(path));
  // Rates over the last few samples (about ten seconds), so that a burst
  // shows for more than one refresh.
  const now = performance.now();
  const samples = state.counters.get(t.name) || [];
  samples.push({ at: now, msgIn: s.msgIn, msgOut: s.msgOut });
  while (samples.length > RATE_SAMPLES) samples.shift();
  state.counters.set(t.name, samples);
  const first = samples[0];
  const secs = (now - first.at) / 1000;
  const r = {
    in: secs > 0 ? Math.max(0, s.msgIn - first.msgIn) / secs : 0,
    out: secs > 0 ? Math.max(0, s.msgOut - first.msgOut) / secs : 0,
    backlog: s.backlog, stored: s.stored, subs: s.subs,
  };
  state.rates.set(t.name, r);
  return r;
}

async function tick() {
  try {
    const entries = await loadTopics();
    state.topics = [...entries.values()].filter(Boolean);
    // Stats for at most the first 200 topics per refresh keep the page light.
    await Promise.all(state.topics.slice(0, 200).map((t) => refreshStats(t).catch(() => null)));
    // The tree is rebuilt only when topics come or go, so that rows stay
    // put between refreshes; otherwise only the numbers change.
    const shape = [...entries.keys()].join("|");
    if (shape !== state.shape) {
      state.shape = shape;
      renderTree(entries);
    } else {
      for (const row of document.querySelectorAll(".topic-row")) {
        fillRow(row, state.rates.get(row.dataset.topic));
      }
    }
    await refreshBroker().catch((e) => { $("broker-state").textContent = e.message; });
    setStatus(`${state.topics.length} topics · ${new Date().toLocaleTimeString()}`);
    if (state.selected) {
      const r = state.rates.get(state.selected.name);
      if (r) showStats(r);
    }
  } catch (e) {
    setStatus(e.message, true);
  }
}

function showStats(r) {
  $("rate-in").textContent = fmt(r.in);
  $("rate-out").textContent = fmt(r.out);
  $("backlog").textContent = r.backlog;
  $("stored").textContent = `${fmt(r.stored)} B`;
  $("subs").textContent = r.subs;
  state.series.push({ in: r.in, out: r.out });
  if (state.series.length > CHART_POINTS) state.series.shift();
  drawChart();
}

function drawChart(canvas = $("chart"), series = state.series) {
  const c = canvas;
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...series.flatMap((p) => [p.in, p.out]));
  const step = c.width / (CHART_POINTS - 1);
  for (const [field, color] of [["in", "#4b3fd1"], ["out", "#d1603f"]]) {
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    series.forEach((p, i) => {
      const x = i * step, y = c.height - 4 - (p[field] / max) * (c.height - 10);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
  g.fillStyle = "#6b6b78";
  g.font = "11px system-ui";
  g.fillText(`max ${fmt(max)}/s  — in  — out`, 6, 12);
}

// ---- the broker, from /metrics ----
//
// The same numbers Prometheus scrapes: the namespace counters (which never
// go backwards when a topic unloads), rates taken as Grafana's rate() does,
// and the gauges as they are.

function parseMetrics(text) {
  // Prometheus text format: `name{labels} value`, comments skipped.
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

function byNamespace(samples, name) {
  const m = new Map();
  for (const s of samples) {
    if (s.name !== name || s.labels.namespace === undefined) continue;
    m.set(s.labels.namespace, (m.get(s.labels.namespace) || 0) + s.value);
  }
  return m;
}

async function refreshBroker() {
  const r = await fetch("/metrics", { headers: { ...headers(), Accept: "text/plain" } });
  if (r.status === 401 || r.status === 403) {
    $("broker-state").textContent = "the broker's metrics need a superuser token";
    return;
  }
  if (!r.ok) throw new Error("/metrics: " + r.status);
  const samples = parseMetrics(await r.text());
  const msgIn = byNamespace(samples, "pulsar_in_messages_total");
  const msgOut = byNamespace(samples, "pulsar_out_messages_total");
  const now = performance.now();
  const ns = new Map();
  for (const name of new Set([...msgIn.keys(), ...msgOut.keys()])) {
    ns.set(name, { in: msgIn.get(name) || 0, out: msgOut.get(name) || 0 });
  }
  state.scrapes.push({ at: now, ns });
  while (state.scrapes.length > RATE_SAMPLES) state.scrapes.shift();
  const first = state.scrapes[0];
  const secs = (now - first.at) / 1000;
  // A namespace the first sample lacks had counted nothing yet.
  const rate = (name, field) => {
    const was = first.ns.get(name);
    return secs > 0 ? Math.max(0, ns.get(name)[field] - (was ? was[field] : 0)) / secs : 0;
  };
  const backlog = byNamespace(samples, "pulsar_msg_backlog");
  const producers = byNamespace(samples, "pulsar_producers_count");
  const consumers = byNamespace(samples, "pulsar_consumers_count");
  const stored = byNamespace(samples, "pulsar_storage_size");
  const body = $("namespaces").tBodies[0];
  body.textContent = "";
  let totalIn = 0, totalOut = 0;
  for (const name of [...ns.keys()].sort()) {
    const rIn = rate(name, "in"), rOut = rate(name, "out");
    totalIn += rIn;
    totalOut += rOut;
    const tr = document.createElement("tr");
    tr.dataset.namespace = name;
    for (const v of [name, fmt(rIn), fmt(rOut), backlog.get(name) || 0,
      producers.get(name) || 0, consumers.get(name) || 0, `${fmt(stored.get(name) || 0)} B`]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  const conns = $("connections");
  conns.textContent = "";
  for (const s of samples.filter((s) => s.name === "magnetar_connections")) {
    const d = document.createElement("div");
    d.innerHTML = '<span class="label"></span> <span class="num"></span>';
    d.firstChild.textContent = s.labels.protocol;
    d.lastChild.textContent = s.value;
    d.dataset.protocol = s.labels.protocol;
    conns.appendChild(d);
  }
  state.brokerSeries.push({ in: totalIn, out: totalOut });
  if (state.brokerSeries.length > CHART_POINTS) state.brokerSeries.shift();
  drawChart($("broker-chart"), state.brokerSeries);
  $("broker-state").textContent =
    `${fmt(totalIn)} msg/s in · ${fmt(totalOut)} msg/s out · from /metrics`;
}

// ---- live messages and publishing ----

function decodePayload(b64) {
  const bin = atob(b64);
  const bytes = Uint8Array.from(bin, (ch) => ch.charCodeAt(0));
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch (_) {
    return "0x" + [...bytes.slice(0, 256)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }
}

function addRow(m) {
  const tr = document.createElement("tr");
  tr.className = "msg";
  tr.dataset.messageId = m.messageId;
  const cells = [
    m.publishTime,
    m.key ?? "",
    decodePayload(m.payload),
    Object.entries(m.properties || {}).map(([k, v]) => `${k}=${v}`).join(", "),
  ];
  const classes = ["time", "key", "payload", "props"];
  cells.forEach((text, i) => {
    const td = document.createElement("td");
    td.className = classes[i];
    td.textContent = text;
    tr.append(td);
  });
  const body = $("messages").tBodies[0];
  body.append(tr);
  while (body.rows.length > MAX_ROWS) body.deleteRow(0);
}

function closeSockets() {
  for (const s of [state.reader, state.producer]) if (s) { s.onclose = null; s.close(); }
  state.reader = state.producer = null;
}

function openReader(t) {
  const from = $("from-earliest").checked ? "earliest" : "latest";
  const ws = openSocket(`/ws/v2/reader/${topicPath(t)}`, { messageId: from });
  state.reader = ws;
  $("live-state").textContent = "connecting…";
  ws.onopen = () => { $("live-state").textContent = `reading from ${from}`; };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    if (!m.messageId) return;
    addRow(m);
    // A reader is paced by acks, as Pulsar's is.
    ws.send(JSON.stringify({ messageId: m.messageId }));
  };
  ws.onclose = (ev) => {
    $("live-state").textContent = `closed (${ev.code}${ev.reason ? ": " + ev.reason : ""}); reconnecting…`;
    setTimeout(() => { if (state.selected === t) openReader(t); }, 2000);
  };
}

function openProducer(t) {
  const ws = openSocket(`/ws/v2/producer/${topicPath(t)}`);
  state.producer = ws;
  ws.onmessage = (ev) => {
    const ack = JSON.parse(ev.data);
    const out = $("pub-result");
    if (ack.result === "ok") {
      out.textContent = `published ${ack.messageId}`;
      out.className = "muted";
    } else {
      out.textContent = `${ack.result}: ${ack.errorMsg || ""}`;
      out.className = "error";
    }
  };
  ws.onclose = () => { if (state.selected === t) setTimeout(() => openProducer(t), 2000); };
}

function select(t) {
  closeSockets();
  state.selected = t;
  state.series = [];
  for (const row of document.querySelectorAll(".topic-row")) {
    row.classList.toggle("selected", row.dataset.topic === t.name);
  }
  $("hint").hidden = true;
  $("topic").hidden = false;
  $("topic-name").textContent = t.name + (t.partitioned ? " (partitioned)" : "");
  $("messages").tBodies[0].textContent = "";
  const r = state.rates.get(t.name);
  if (r) showStats(r); else drawChart();
  openReader(t);
  openProducer(t);
}

function publish(ev) {
  ev.preventDefault();
  const ws = state.producer;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  const bytes = new TextEncoder().encode($("pub-payload").value);
  const msg = { payload: btoa(String.fromCharCode(...bytes)), context: String(Date.now()) };
  const key = $("pub-key").value.trim();
  if (key) msg.key = key;
  const props = {};
  for (const pair of $("pub-props").value.split(",")) {
    const [k, ...v] = pair.split("=");
    if (k.trim()) props[k.trim()] = v.join("=").trim();
  }
  if (Object.keys(props).length) msg.properties = props;
  ws.send(JSON.stringify(msg));
}

$("publish").addEventListener("submit", publish);
$("clear").addEventListener("click", () => { $("messages").tBodies[0].textContent = ""; });
$("from-earliest").addEventListener("change", () => { if (state.selected) select(state.selected); });
$("token").value = state.token;
$("token").addEventListener("change", (ev) => {
  state.token = ev.target.value.trim();
  localStorage.setItem("magnetar.token", state.token);
  tick();
});

tick();
setInterval(tick, REFRESH_MS);
