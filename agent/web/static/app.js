// The device page: polls the JSON API and the newest annotated frame; no libraries, works offline.
"use strict";
const $ = (id) => document.getElementById(id);
const FRAME_MS = 200, STATUS_MS = 2000;

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

let frameUrl = null;
async function refreshFrame() {
  try {
    const r = await fetch("latest.jpg?annotated=1", { cache: "no-store" });
    if (r.ok) {
      const url = URL.createObjectURL(await r.blob());
      $("live").src = url;
      if (frameUrl) URL.revokeObjectURL(frameUrl);
      frameUrl = url;
    }
  } catch (e) { /* the agent restarts: try again */ }
  setTimeout(refreshFrame, document.hidden ? 2000 : FRAME_MS);
}

function drawChart(canvas, series, colors) {
  const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const all = series.flat().filter((v) => Number.isFinite(v));
  if (!all.length) return;
  const max = Math.max(...all) * 1.15 || 1, n = Math.max(...series.map((s) => s.length));
  ctx.fillStyle = "#777"; ctx.font = "10px sans-serif";
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 10); ctx.fillText("0", 2, h - 2);
  series.forEach((s, k) => {
    ctx.strokeStyle = colors[k]; ctx.lineWidth = 1.5; ctx.beginPath();
    s.forEach((v, i) => {
      const x = n > 1 ? (i / (n - 1)) * (w - 24) + 22 : w / 2, y = h - 4 - (v / max) * (h - 14);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  canvas.dataset.points = String(n);
}

function text(el, value) { el.textContent = value == null ? "" : String(value); }

async function refreshStatus() {
  try {
    const s = await getJSON("api/v1/status");
    text($("device"), s.device_id);
    text($("state"), s.state); $("state").className = "badge " + s.state;
    text($("model"), s.model.name + " " + s.model.version);
    text($("precision"), s.model.precision ? "(" + s.model.precision + ", " + s.model.format + ")" : "");
    text($("backend"), s.backend + " / " + s.accelerator);
  } catch (e) { text($("state"), "unreachable"); $("state").className = "badge offline"; }
  try {
    const h = (await getJSON("api/v1/health/history")).samples;
    drawChart($("chart-fps"), [h.map((x) => x.fps)], ["#6cf"]);
    drawChart($("chart-latency"), [h.map((x) => x.latency_ms.inference.p50), h.map((x) => x.latency_ms.inference.p95)], ["#fc6", "#f66"]);
    drawChart($("chart-cpu"), [h.map((x) => x.cpu_percent)], ["#9c6"]);
    const temps = h.map((x) => { const v = Object.values(x.temperature_c || {}); return v.length ? Math.max(...v) : NaN; });
    if (temps.some(Number.isFinite)) { $("fig-temp").hidden = false; drawChart($("chart-temp"), [temps], ["#f96"]); }
  } catch (e) { /* no sample yet */ }
  try {
    const rows = (await getJSON("api/v1/deployments")).deployments.slice().reverse();
    const body = $("deployments"); body.replaceChildren();
    for (const d of rows) {
      const tr = document.createElement("tr");
      for (const v of [new Date(d.ts * 1000).toLocaleString(), d.deployment_id, d.state, d.reason || ""]) {
        const td = document.createElement("td"); text(td, v); tr.appendChild(td);
      }
      tr.children[2].className = "st-" + d.state;
      body.appendChild(tr);
    }
  } catch (e) { /* the deployer is busy: next time */ }
  await refreshResults();
}

async function poll() {
  await refreshStatus();
  setTimeout(poll, document.hidden ? 4 * STATUS_MS : STATUS_MS);
}

async function refreshResults() {
  try {
    const p = await getJSON("api/v1/latest");
    const items = p.results.filter((r) => r.score != null).map((r) => r.label + " " + r.score.toFixed(2));
    text($("results"), "#" + p.seq + ": " + (items.length ? items.join(", ") : "nothing found") +
      " · " + p.latency_ms.total.toFixed(1) + " ms");
  } catch (e) { /* no prediction yet */ }
}

$("rollback").addEventListener("click", async () => {
  if (!confirm("Roll back to the previous model?")) return;
  $("rollback").disabled = true; text($("rollback-result"), "rolling back…");
  try {
    const r = await fetch("api/v1/rollback", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const j = await r.json();
    text($("rollback-result"), j.ok ? "rolled back to " + j.model.name + " " + j.model.version : "not rolled back: " + j.error);
  } catch (e) { text($("rollback-result"), "not rolled back: " + e); }
  $("rollback").disabled = false;
  refreshStatus();
});

refreshFrame();
poll();
