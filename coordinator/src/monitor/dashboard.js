// The dashboard: polls the JSON API every 2 s and draws the page. The charts are drawn on
// canvases by `lineChart` below (no third-party code, nothing fetched from elsewhere).
"use strict";

const $ = (id) => document.getElementById(id);

function bytes(b) {
  if (b >= 1e9) return (b / 1e9).toFixed(2) + " GB";
  if (b >= 1e6) return (b / 1e6).toFixed(1) + " MB";
  if (b >= 1e3) return (b / 1e3).toFixed(1) + " kB";
  return b + " B";
}

function num(x, digits) {
  return x === null || x === undefined || !isFinite(x) ? "–" : Number(x).toFixed(digits);
}

function duration(s) {
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + (s % 60) + "s";
}

// A table cell whose text is set (never parsed as HTML: names and reasons come from workers).
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows, render, emptyText) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = $(id).tHead.rows[0].cells.length;
    td.className = "empty";
    td.textContent = emptyText;
    return;
  }
  for (const r of rows) render(body.insertRow(), r);
}

// Draws `series` ([{points: [[x, y], ...], color, label}]) on a canvas, with axes and ticks.
function lineChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300, h = canvas.clientHeight || 220;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  canvas.dataset.points = String(all.length);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#667085";
  if (!all.length) {
    ctx.fillText("no data yet", 10, 20);
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = { l: 48, r: 10, t: 18, b: 22 };
  const px = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const py = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#e4e7ec";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, py(y)); ctx.lineTo(w - pad.r, py(y)); ctx.stroke();
    ctx.fillText(y.toPrecision(3), 4, py(y) + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    ctx.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
    ctx.fillText(String(Math.round(x)), px(x), h - 6);
  }
  ctx.textAlign = "left";
  let lx = pad.l;
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(px(p[0]), py(p[1])) : ctx.moveTo(px(p[0]), py(p[1]))));
    ctx.stroke();
    if (s.points.length === 1) {
      ctx.fillStyle = s.color;
      ctx.fillRect(px(s.points[0][0]) - 2, py(s.points[0][1]) - 2, 4, 4);
    }
    ctx.fillStyle = s.color;
    ctx.fillText(s.label, lx, 12);
    lx += ctx.measureText(s.label).width + 16;
  }
}

// A curve's points, with its newest point when decimation left it out.
function curve(c) {
  const p = c.points.slice();
  if (c.latest && (!p.length || p[p.length - 1][0] < c.latest[0])) p.push(c.latest);
  return p;
}

function card(key, value) {
  const d = document.createElement("div");
  d.className = "card";
  const k = document.createElement("div"); k.className = "k"; k.textContent = key;
  const v = document.createElement("div"); v.className = "v"; v.textContent = value;
  d.append(k, v);
  return d;
}

function render(status, workers, history) {
  $("state").textContent = status.state;
  $("state").className = "state " + status.state;
  $("run").textContent = `${status.model} on ${status.dataset} · ${status.n_params.toLocaleString()} parameters · run ${status.run_id.slice(0, 12)}`;
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  const lm = status.language_model;
  const evalText = status.eval
    ? lm ? `val loss ${num(status.eval.loss, 4)}` : `test acc ${num(status.eval.accuracy, 4)}`
    : "–";
  $("cards").replaceChildren(
    card("Step", `${status.step} / ${status.total_steps}`),
    card("Epoch", num(status.epoch, 2)),
    card("Loss", num(status.loss, 4)),
    card("Evaluation", evalText),
    card(lm ? "Tokens/s" : "Samples/s", num(lm ? status.tokens_per_s : status.samples_per_s, 0)),
    card("Workers", `${status.workers} (seen ${status.workers_seen})`),
    card("Up (from workers)", bytes(status.bytes_in)),
    card("Down (to workers)", bytes(status.bytes_out)),
    card("Data served", bytes(status.data_served)),
    card("Uplink compression", "x" + num(status.uplink_ratio, 1)),
    card("Spot checks", `${status.checks.passed} passed / ${status.checks.done}`),
    card("Cheats caught", String(status.checks.caught)),
    card("Banned", String(status.banned)),
    card("Rollbacks", `${status.rollbacks} (${status.removed} removed)`),
    card("Wall time", duration(status.wall_s)),
  );
  const loss = curve(history.loss);
  lineChart($("loss-chart"), [{ points: loss, color: "#2f6fde", label: "train loss" }]);
  $("loss-last").textContent = loss.length ? `(${loss.length} points, last ${num(loss[loss.length - 1][1], 4)})` : "";
  const ev = curve(lm ? history.eval_loss : history.eval_accuracy);
  lineChart($("eval-chart"), [{ points: ev, color: "#067647", label: lm ? "validation loss" : "test accuracy" }]);
  $("eval-last").textContent = ev.length ? `(${ev.length} points, last ${num(ev[ev.length - 1][1], 4)})` : "";
  $("workers-count").textContent = `(${workers.length})`;
  fillTable("workers", workers, (row, w) => {
    row.dataset.worker = w.worker;
    cell(row, w.name);
    cell(row, w.worker.slice(0, 16)).title = w.worker;
    cell(row, w.class);
    cell(row, num(w.samples_per_s, 1), "num");
    cell(row, (100 * w.share).toFixed(1) + "%", "num");
    cell(row, String(w.tasks), "num");
    cell(row, String(w.checks_passed), "num");
    cell(row, String(w.strikes), w.strikes ? "num bad" : "num");
    cell(row, bytes(w.bytes_in), "num");
    cell(row, bytes(w.bytes_out), "num");
    cell(row, bytes(w.data_served), "num");
  }, "no worker connected");
  fillTable("cheats", [...status.cheats].reverse(), (row, c) => {
    cell(row, String(c.step));
    cell(row, c.worker.slice(0, 16)).title = c.worker;
    cell(row, String(c.task_id));
    cell(row, c.evidence_valid ? "signed, valid" : "invalid", c.evidence_valid ? "" : "bad");
    cell(row, c.divergent_step === null ? "–" : String(c.divergent_step));
    cell(row, c.reason, "bad");
  }, `no cheat caught (${status.checks.done} checks, ${status.checks.abandoned} abandoned)`);
  const events = status.bans.map((b) => ({ step: b.step, what: "ban " + b.worker.slice(0, 16), detail: b.reason }))
    .concat(status.rollback_log.map((r) => ({ step: r.step, what: "rollback", detail: `from round ${r.from_round}, ${r.replayed} replayed, ${r.removed} removed` })))
    .sort((a, b) => b.step - a.step);
  fillTable("bans", events, (row, e) => {
    cell(row, String(e.step));
    cell(row, e.what);
    cell(row, e.detail);
  }, "none");
}

async function refresh() {
  try {
    const get = (p) => fetch(p, { cache: "no-store" }).then((r) => r.json());
    const [status, workers, history] = await Promise.all([get("/api/status"), get("/api/workers"), get("/api/history")]);
    render(status, workers, history);
  } catch (e) {
    $("updated").textContent = "cannot reach the coordinator (" + e + ")";
  }
}

async function act(action) {
  if ((action === "stop" || action === "ban") && !confirm(action === "stop" ? "Stop the run (it saves a checkpoint)?" : "Ban this key and roll back its unverified contributions?")) return;
  const token = $("token").value.trim();
  sessionStorage.setItem("dtrain-token", token);
  const body = action === "ban" ? JSON.stringify({ worker: $("ban-key").value.trim(), reason: "banned from the dashboard" }) : "";
  const r = await fetch("/api/" + action, {
    method: "POST",
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
    body,
  });
  const j = await r.json().catch(() => ({}));
  $("op-result").textContent = r.ok ? `${action}: accepted` : `${action}: ${r.status} ${j.error || ""}`;
  refresh();
}

$("token").value = sessionStorage.getItem("dtrain-token") || "";
for (const b of document.querySelectorAll("#operator button")) b.addEventListener("click", () => act(b.dataset.action));
refresh();
setInterval(refresh, 2000);
