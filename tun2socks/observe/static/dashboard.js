// tun2socks dashboard: reads the API's server-sent events (GET /events) and draws them.
// fetch() streaming instead of EventSource, because EventSource cannot send the
// Authorization header. The token comes from "#token=..." in the address (then removed
// from it) or from the form shown after a 401; it is kept in sessionStorage only.
"use strict";

const HISTORY = 120; // samples on the chart (one a second)
const samples = []; // {t, down, up} in bytes per second
let previous = null; // the last stats, for rates
let previousConn = new Map(); // id -> {bytes, t}

function token() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("t2s-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("t2s-token");
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: authHeaders() });
  if (response.status === 401) askToken();
  return response;
}

function askToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
  setStatus("token needed", "down");
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("t2s-token", document.getElementById("token-input").value);
  document.getElementById("token-form").hidden = true;
  connect();
});

function setStatus(text, cls) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = "status " + cls;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
}

function duration(s) {
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
}

function fillList(id, values, sorted = true) {
  const el = document.getElementById(id);
  el.replaceChildren();
  const keys = sorted ? Object.keys(values).sort() : Object.keys(values);
  if (!keys.length) {
    const dt = document.createElement("dt");
    dt.textContent = "none";
    el.append(dt);
  }
  for (const key of keys) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = key.replaceAll("_", " ");
    dd.textContent = values[key];
    el.append(dt, dd);
  }
}

// ------------------------------------------------------------------ chart

function drawChart() {
  const canvas = document.getElementById("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const left = 70, bottom = height - 18, top = 8, right = width - 8;
  const max = Math.max(1024, ...samples.map((s) => Math.max(s.down, s.up)));
  canvas.dataset.samples = samples.length;
  canvas.dataset.maxRate = samples.length ? Math.max(...samples.map((s) => s.down + s.up)) : 0;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e5e7eb";
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    ctx.fillText(bytes(max * i / 4) + "/s", 2, y + 4);
  }
  ctx.fillText("-" + HISTORY + "s", left, height - 4);
  ctx.fillText("now", right - 22, height - 4);
  const x = (i) => right - (samples.length - 1 - i) * (right - left) / (HISTORY - 1);
  const y = (v) => bottom - (bottom - top) * v / max;
  for (const [key, color] of [["down", "#2563eb"], ["up", "#ea580c"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    samples.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s[key])) : ctx.moveTo(x(i), y(s[key]))));
    ctx.stroke();
  }
}

// ------------------------------------------------------------------ one update

function update(data) {
  const stats = data.stats, now = stats.uptime_s;
  document.getElementById("uptime").textContent = "up " + duration(now);
  if (previous && now > previous.uptime_s) {
    const dt = now - previous.uptime_s;
    samples.push({
      t: now,
      down: (stats.tun.bytes_out - previous.tun.bytes_out) / dt,
      up: (stats.tun.bytes_in - previous.tun.bytes_in) / dt,
    });
    while (samples.length > HISTORY) samples.shift();
    const last = samples[samples.length - 1];
    document.getElementById("rate-down").textContent = bytes(last.down) + "/s";
    document.getElementById("rate-up").textContent = bytes(last.up) + "/s";
  }
  previous = stats;
  drawChart();

  fillList("flows", {
    open: stats.flows.open,
    connecting: stats.flows.half_open,
    "since start": stats.flows.total,
    "relayed up": bytes(stats.relayed.bytes_up),
    "relayed down": bytes(stats.relayed.bytes_down),
    "TUN packets in": stats.tun.packets_in,
    "TUN packets out": stats.tun.packets_out,
  }, false);
  fillList("upstream-errors", stats.upstream_errors);
  fillList("drops", stats.drops);
  const components = document.getElementById("components");
  const names = Object.keys(stats.components).sort();
  if (names.length) {
    components.replaceChildren();
    for (const name of names) {
      const h = document.createElement("h3");
      const dl = document.createElement("dl");
      h.textContent = name;
      dl.id = "component-" + name;
      components.append(h, dl);
      fillList(dl.id, stats.components[name]);
    }
  }
  const pcap = stats.pcap;
  if (pcap) {
    document.getElementById("pcap-status").textContent =
      (pcap.running ? "running" : pcap.full ? "stopped at its size limit" : "stopped") +
      ": " + pcap.packets + " packets, " + bytes(pcap.bytes) + " of " + bytes(pcap.max_bytes) +
      " → " + pcap.target;
  }
  showConnections(data.connections, stats.flows.open, now);
}

function showConnections(connections, open, now) {
  document.getElementById("conn-count").textContent =
    "(" + open + " open" + (connections.length < open ? ", busiest " + connections.length : "") + ")";
  const body = document.querySelector("#connections tbody");
  body.replaceChildren();
  const seen = new Map();
  for (const c of connections) {
    const total = c.bytes_up + c.bytes_down;
    const before = previousConn.get(c.id);
    const rate = before && now > before.t ? (total - before.bytes) / (now - before.t) : 0;
    seen.set(c.id, { bytes: total, t: now });
    const row = document.createElement("tr");
    row.dataset.id = c.id;
    const destination = c.domain ? c.domain + " (" + c.destination + ")" : c.destination;
    const cells = [c.id, c.protocol, c.source, destination, c.route, c.state,
      bytes(c.bytes_up), bytes(c.bytes_down), bytes(rate) + "/s",
      c.age_s === null ? "–" : duration(c.age_s)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i >= 6) td.className = "num";
      row.append(td);
    });
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "close";
    button.textContent = "close";
    button.addEventListener("click", () => api("DELETE", "/connections/" + c.id));
    td.append(button);
    row.append(td);
    body.append(row);
  }
  previousConn = seen;
}

// ------------------------------------------------------------------ capture buttons

document.getElementById("pcap-start").addEventListener("click", () => api("POST", "/pcap/start"));
document.getElementById("pcap-stop").addEventListener("click", () => api("POST", "/pcap/stop"));
document.getElementById("pcap-download").addEventListener("click", async () => {
  const response = await api("GET", "/pcap/download");
  if (!response.ok) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = "tun2socks.pcap";
  link.click();
  URL.revokeObjectURL(link.href);
});

// ------------------------------------------------------------------ the event stream

let connecting = false;

async function connect() {
  if (connecting) return;
  connecting = true;
  try {
    const response = await api("GET", "/events");
    if (response.status === 401) return; // the token form calls connect() again
    if (!response.ok) throw new Error("API error " + response.status);
    setStatus("live", "live");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) update(JSON.parse(line.slice(6)));
        }
      }
    }
    setStatus("disconnected", "down");
  } catch (error) {
    setStatus("disconnected: " + error.message, "down");
  } finally {
    connecting = false;
  }
  setTimeout(connect, 2000);
}

window.addEventListener("resize", drawChart);
drawChart();
connect();
