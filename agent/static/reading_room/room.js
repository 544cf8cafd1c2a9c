/* The reading room of `dxagent serve`: plain JS over the REST API (agent/app/serve.py, agent/app/reading_room.py).
   Everything from the server is untrusted text: it is put in the page with textContent, never as HTML.
   Research use only. */
"use strict";

const $ = id => document.getElementById(id);
const PALETTE = ["#ff4646", "#3cc8ff", "#5ae65a", "#ffc800", "#e15aff", "#ff8c00"];
const S = {
  run: null, seq: -1, status: null, model: null, view: null, slice: 0, center: null, width: null,
  zoom: 1, panX: 0, panY: 0, base: null, baseKey: "", masks: new Map(), layerOff: new Set(), boxOff: new Set(), seenMasks: new Set(), bigLayers: new Set(),
  opacity: 0.45, highlight: null, chosen: null, tab: "upload", watching: 0, pending: 0, draft: null,
};

// -- helpers ---------------------------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "style") Object.assign(e.style, v);  // the CSSOM: the page's CSP allows no inline style attribute
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}
const sleep = ms => new Promise(r => setTimeout(r, ms));

function token() { return sessionStorage.getItem("dxagent-token") || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  let body = opts.body;
  if (opts.json !== undefined) { body = JSON.stringify(opts.json); headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, {method: opts.method || "GET", headers, body, signal: opts.signal});
  if (!r.ok) {
    let detail = r.status + " " + r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
    if (r.status === 401) $("token-box").open = true;
    const err = new Error(detail); err.status = r.status; throw err;
  }
  if (opts.raw) return r;
  if (opts.blob) return r.blob();
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r.blob();
}

/* Text with evidence ids ([E2], [E1, E3]) as links that open the evidence. */
function cite(text) {
  const frag = document.createDocumentFragment();
  const re = /\[(E\d+(?:\s*,\s*E\d+)*)\]/g;
  let last = 0, m;
  text = String(text ?? "");
  while ((m = re.exec(text)) !== null) {
    frag.append(text.slice(last, m.index), "[");
    m[1].split(",").map(s => s.trim()).forEach((id, i) => {
      if (i) frag.append(", ");
      frag.append(el("a", {class: "eid", text: id, "data-eid": id, href: "#", onclick: ev => { ev.preventDefault(); showEvidence(id); }}));
    });
    frag.append("]");
    last = re.lastIndex;
  }
  frag.append(text.slice(last));
  return frag;
}

function showError(msg) { $("open-error").textContent = msg || ""; }

// -- opening a case and asking -----------------------------------------------------------------------------------------
function switchTab(name) {
  S.tab = name;
  document.querySelectorAll(".tabs button").forEach(b => b.classList.toggle("on", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach(t => t.classList.toggle("hidden", t.id !== "tab-" + name));
  if (name === "folder" && !$("folder").children.length) loadFolder("");
}

async function loadFolder(path) {
  try {
    const f = await api("/api/files?path=" + encodeURIComponent(path));
    $("folder-path").textContent = f.path || "(served roots)";
    const ul = $("folder");
    ul.replaceChildren();
    if (f.parent !== null) ul.append(el("li", {text: "⬑ ..", onclick: () => loadFolder(f.parent)}));
    if (f.path) ul.append(el("li", {text: "▣ use this folder (a DICOM series)", onclick: ev => choose(f.path, ev.target)}));
    for (const e of f.entries) {
      if (e.kind === "folder") ul.append(el("li", {text: "▸ " + e.name, onclick: () => loadFolder(e.path)}));
      else if (e.kind === "other") ul.append(el("li", {class: "dim", text: "  " + e.name}));
      else ul.append(el("li", {text: "  " + e.name + "  (" + e.kind + ")", "data-path": e.path, onclick: ev => choose(e.path, ev.target)}));
    }
    if (f.truncated) ul.append(el("li", {class: "dim", text: "… more entries not listed"}));
  } catch (e) { showError(e.message); }
}

function choose(path, li) {
  S.chosen = path;
  $("chosen").textContent = path;
  document.querySelectorAll("#folder li").forEach(x => x.classList.toggle("sel", x === li));
}

async function ask() {
  showError("");
  const question = $("question").value.trim();
  let body, json;
  const options = {};
  if ($("no-route").checked) options.route = false;
  if ($("max-steps").value) options.max_steps = +$("max-steps").value;
  if (S.tab === "upload") {
    const files = [...$("file").files];
    if (!files.length) return showError("choose a file to upload");
    body = new FormData();
    files.forEach(f => body.append("file", f, f.name));
    if (question) body.append("question", question);
    if ($("series").checked) body.append("series", "true");
    for (const [k, v] of Object.entries(options)) body.append(k, String(v));
  } else if (S.tab === "folder") {
    if (!S.chosen) return showError("choose a file or folder");
    json = {path: S.chosen, question: question || null, ...options};
  } else {
    const ref = $("dicomweb").value.trim();
    if (!ref) return showError("type a dicomweb:// study reference");
    json = {path: ref, question: question || null, ...options};
  }
  $("ask").disabled = true;
  try {
    const run = await api("/api/runs", {method: "POST", body, json});
    openRun(run.id);
  } catch (e) {
    showError(e.message);
    $("ask").disabled = false;
  }
}

async function loadRuns() {
  try {
    const runs = await api("/api/runs?limit=30");
    $("runs").replaceChildren(...runs.map(r => el("li", {
      class: r.id === S.run ? "sel" : "", title: r.question || "", "data-run": r.id,
      text: `${r.id.slice(4)} · ${r.status} · ${r.question || "(describe)"}`, onclick: () => openRun(r.id)})));
  } catch (e) { showError(e.message); }
}

function resetRun() {
  Object.assign(S, {seq: -1, status: null, model: null, view: null, slice: 0, center: null, width: null, zoom: 1,
                    panX: 0, panY: 0, base: null, baseKey: "", highlight: null, draft: null});
  S.masks.clear(); S.layerOff.clear(); S.boxOff.clear(); S.seenMasks.clear(); S.bigLayers.clear();
  $("events").replaceChildren();
  for (const id of ["answer", "evidence", "report", "followup", "downloads"]) $(id).classList.add("hidden");
  for (const id of ["mask-list", "box-list", "tool-overlays", "view-select", "preset"]) $(id).replaceChildren();
  $("download-note").textContent = "";
  $("push").classList.add("hidden");
  $("resume").classList.add("hidden");
  $("stage-empty").classList.remove("hidden");
  draw();
}

function openRun(id) {
  S.run = id;
  resetRun();
  if (location.hash !== "#run=" + id) history.replaceState(null, "", "#run=" + id);
  loadRuns();
  watch(id);
}

// -- the live event stream -----------------------------------------------------------------------------------------------
/* Read the run's events after the last one seen until the stream's `end`; a dropped connection reconnects and
   continues after the last event id (the server's Last-Event-ID / ?after=). Returns the final status. */
async function follow(id) {
  while (S.run === id) {
    try {
      const r = await api(`/api/runs/${id}/events?after=${S.seq}`, {raw: true});
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const msg = {event: "message", data: ""};
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const k = i < 0 ? line : line.slice(0, i);
            const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (k === "data") msg.data += (msg.data ? "\n" : "") + v; else msg[k] = v;
          }
          if (!msg.data || S.run !== id) continue;
          const data = JSON.parse(msg.data);
          if (msg.event === "end") { try { reader.cancel(); } catch (e) { /* closed */ } return data.status; }
          if (data.seq > S.seq) { S.seq = data.seq; onEvent(data); }
        }
      }
    } catch (e) {
      if (e.status && e.status < 500) { showError(e.message); return null; }
    }
    await sleep(500);  // the connection dropped: continue after the last event
  }
  return null;
}

/* Follow a run until it and any follow-up turn under way are finished. */
async function watch(id) {
  const me = ++S.watching;
  setBusy(true);
  for (;;) {
    const status = await follow(id);
    if (S.run !== id || me !== S.watching) return;
    let turn = {status: "none"};
    try { turn = await api(`/api/runs/${id}/followups`); } catch (e) { /* none */ }
    if (turn.status === "running") { await sleep(300); continue; }
    if (turn.status === "failed" && turn.error) addStep("error", "follow-up failed: " + turn.error);
    S.status = status;
    break;
  }
  setBusy(false);
  await refreshModel();
  await showReport();
  await showOutcome(id);
  loadRuns();
}

/* A run that ended without a report says why; an interrupted, cancelled or failed one can be resumed. */
async function showOutcome(id) {
  let run;
  try { run = await api(`/api/runs/${id}`); } catch (e) { return; }
  if (S.run !== id) return;
  if (run.error) addStep("error", `${run.status}: ${run.error}`);
  $("resume").classList.toggle("hidden", !["interrupted", "cancelled", "failed"].includes(run.status) || !!run.answer);
}

async function resume() {
  try {
    await api(`/api/runs/${S.run}/resume`, {method: "POST"});
    $("resume").classList.add("hidden");
    watch(S.run);
  } catch (e) { showError(e.message); }
}

function setBusy(on) {
  $("ask").disabled = on;
  $("stop").disabled = !on;
  $("followup-ask").disabled = on;
}

function stepOf(ev) {
  if (ev.kind === "node" && ev.name === "intake") return "intake";
  if (ev.kind === "tool") return "act";
  if (ev.kind === "node" && ev.node === "think") return "think";
  if (ev.kind === "node" && ev.name === "question") return "question";
  if (ev.name === "critique") return "rethink";
  if (ev.name === "answer" && ev.answer) return "answer";
  if (ev.name === "report" && ev.kind === "node") return "report";
  if (ev.kind === "note" && ev.name === "turn") return "turn";
  if (ev.kind === "llm") return (ev.name === "error" || ev.rejected) ? "think" : null;  // a planner reply: its decision follows
  return ev.node || ev.kind;
}

function addStep(step, text, ev) {
  const li = el("li", {"data-step": step, "data-seq": ev ? ev.seq : ""}, el("span", {class: "step", text: step}), cite(text));
  $("events").append(li);
  $("events").scrollTop = $("events").scrollHeight;
  return li;
}

function onEvent(ev) {
  const step = stepOf(ev);
  if (!step) return;
  let text = ev.summary || `${ev.node} ${ev.name}`;
  if (step === "act" && ev.evidence) text = `[${ev.evidence.id}] ` + text.replace(/^E\d+ /, "");
  if (step === "turn") text = "follow-up: " + text;
  addStep(step, text, ev);
  if (step === "intake" || step === "act") refreshModel();
  if (step === "turn") { $("answer").classList.add("hidden"); $("report").classList.add("hidden"); }
  if (step === "answer") showAnswer(ev.answer);
}

function showAnswer(a) {
  $("answer").classList.remove("hidden");
  $("answer-text").replaceChildren(cite(a.text || a.value || ""));
  const p = typeof a.probability === "number" ? `probability ${a.probability.toFixed(2)}` : "no calibrated probability";
  const bits = [`kind ${a.kind}`, a.value != null ? `value ${a.value}${a.unit ? " " + a.unit : ""}` : null, p,
                a.reason ? `abstained: ${a.reason}` : null].filter(Boolean);
  $("answer-meta").textContent = bits.join(" · ");
}

async function showReport() {
  if (!S.run) return;
  let rep;
  try { rep = await api(`/api/runs/${S.run}/report`); } catch (e) { return; }
  const body = $("report-body");
  const rec = rep.recommendation || {};
  const rows = (rep.findings || []).map(f => el("tr", {},
    el("td", {text: f.label}), el("td", {text: f.present == null ? "—" : (f.present ? "yes" : "no")}),
    el("td", {text: typeof f.probability === "number" ? f.probability.toFixed(3) : "—"}),
    el("td", {text: (f.measurements || []).map(m => `${m.name} ${typeof m.value === "number" ? +m.value.toPrecision(4) : m.value} ${m.unit || ""}`).join("; ")}),
    el("td", {}, cite((f.evidence_ids || []).map(i => `[${i}]`).join(" ")))));
  body.replaceChildren(
    el("p", {}, el("b", {text: "outcome: "}), `${rec.outcome || "?"} — ${rec.text || ""}`),
    rows.length ? el("table", {}, el("tr", {}, ...["finding", "present", "p", "measurements", "evidence"].map(h => el("th", {text: h}))), ...rows)
                : el("p", {class: "hint", text: "no findings"}),
    el("p", {}, el("b", {text: "impression: "}), cite(rep.impression || "")),
    el("p", {class: "ruo", text: rep.disclaimer || document.querySelector("footer .ruo").textContent}));
  $("report").classList.remove("hidden");
  $("downloads").classList.remove("hidden");
  if (rep.answer && $("answer").classList.contains("hidden")) showAnswer(rep.answer);
  $("followup").classList.toggle("hidden", !["done", "cancelled", "idle"].includes(S.status));
  try { $("push").classList.toggle("hidden", (await api(`/api/runs/${S.run}`)).source !== "dicomweb"); } catch (e) { /* kept hidden */ }
}

async function stop() {
  if (!S.run) return;
  try {
    const turn = await api(`/api/runs/${S.run}/followups`);
    if (turn.status === "running") await api(`/api/runs/${S.run}/followups/cancel`, {method: "POST"});
    else await api(`/api/runs/${S.run}/cancel`, {method: "POST"});
    addStep("stop", "stop asked: the run stops before its next step (a tool under way finishes)");
  } catch (e) { showError(e.message); }
}

async function askFollowup() {
  const q = $("followup-q").value.trim();
  if (!q || !S.run) return;
  try {
    await api(`/api/runs/${S.run}/followups`, {method: "POST", json: {question: q}});
    $("followup-q").value = "";
    watch(S.run);
  } catch (e) { showError(e.message); }
}

// -- evidence -----------------------------------------------------------------------------------------------------------
async function showEvidence(id) {
  if (!S.model || !S.model.evidence[id]) await refreshModel();
  const ev = S.model && S.model.evidence[id];
  $("evidence").classList.remove("hidden");
  $("evidence-id").textContent = id;
  const body = $("evidence-body");
  if (!ev) { body.replaceChildren(el("p", {class: "error", text: `no evidence ${id} in this run`})); return; }
  body.replaceChildren(...[
    el("p", {}, el("b", {text: `${ev.tool} · ${ev.status}`}), ev.duration_s != null ? ` · ${ev.duration_s.toFixed(2)} s` : "", ` · on ${ev.view}`),
    el("p", {text: ev.summary}),
    ev.error ? el("p", {class: "error", text: ev.error}) : null,
    el("b", {text: "arguments"}), el("pre", {text: JSON.stringify(ev.args, null, 1)}),
    el("details", {}, el("summary", {text: "output"}), el("pre", {text: ev.output})),
    ev.views.length ? el("p", {}, "made ", ...ev.views.map(v => el("button", {text: v, onclick: () => selectView(v)}))) : null,
  ].filter(Boolean));
  body.dataset.eid = id;
  // its overlay: on, highlighted, on the view and slice it is on
  S.highlight = id;
  for (const k of [...S.layerOff]) if (k.startsWith(id + ":") && !S.bigLayers.has(k)) S.layerOff.delete(k);
  S.boxOff.delete(id);
  const mask = S.model.masks.find(m => m.eid === id);
  const target = mask ? mask.view : ev.view;
  if (target && target !== S.view && S.model.views.some(v => v.id === target)) await selectView(target);
  if (mask && mask.slice_index != null) setSlice(mask.slice_index);
  renderOverlayControls();
  draw();
  $("evidence").scrollIntoView({block: "nearest"});
}

// -- the viewer -----------------------------------------------------------------------------------------------------------
let modelTimer = null;
function refreshModel() {
  if (!S.run) return Promise.resolve();
  clearTimeout(modelTimer);
  return new Promise(resolve => {
    modelTimer = setTimeout(async () => {
      const id = S.run;
      try {
        const m = await api(`/api/runs/${id}/viewer`);
        if (S.run !== id) return resolve();
        S.model = m;
        renderViews();
        renderOverlayControls();
        if (!S.view && m.views.length) await selectView(m.views[0].id);
        else await loadMasks();
        draw();
      } catch (e) { if (e.status !== 409) showError(e.message); }
      resolve();
    }, 150);
  });
}

function currentView() { return S.model && S.model.views.find(v => v.id === S.view); }

function renderViews() {
  const sel = $("view-select");
  sel.replaceChildren(...S.model.views.map(v => el("option", {value: v.id,
    text: `${v.id} ${v.modality} ${v.shape.join("×")}` + (v.parent ? ` (${v.made_by || "derived"} of ${v.parent})` : "")})));
  if (S.view) sel.value = S.view;
}

async function selectView(id) {
  S.view = id;
  $("view-select").value = id;
  const v = currentView();
  S.slice = v.slices > 1 ? Math.floor(v.slices / 2) : 0;
  S.center = v.window.center; S.width = v.window.width;
  S.zoom = 1; S.panX = 0; S.panY = 0;
  $("slice").max = v.slices - 1; $("slice").value = S.slice; $("slice").disabled = v.slices < 2;
  const pre = $("preset");
  pre.replaceChildren(el("option", {value: "", text: v.rgb ? "colour image" : "default window"}),
    ...Object.keys(v.presets).map(k => el("option", {value: k, text: k})));
  pre.disabled = v.rgb;
  const o = v.orientation;
  $("orientation-note").textContent = o.assumed ? "Orientation: " + o.source + "." : `Orientation from ${o.source}.`;
  $("stage-empty").classList.add("hidden");
  await loadSlice();
}

function setSlice(k) {
  const v = currentView();
  if (!v) return;
  S.slice = Math.max(0, Math.min(v.slices - 1, k));
  $("slice").value = S.slice;
  loadSlice();
}

async function loadSlice() {
  const v = currentView();
  if (!v) return;
  $("slice-label").textContent = `${S.slice + 1}/${v.slices}`;
  $("wl-label").textContent = v.rgb ? "" : `W ${Math.round(S.width)} L ${Math.round(S.center)}`;
  const q = v.rgb ? "" : `?center=${S.center}&width=${S.width}`;
  const key = `${S.run}/${v.id}/${S.slice}${q}`;
  S.pending = key;
  try {
    const blob = await api(`/api/runs/${S.run}/views/${v.id}/slices/${S.slice}.png${q}`, {blob: true});
    const bmp = await createImageBitmap(blob);
    if (S.pending !== key) return;
    S.base = bmp; S.baseKey = key;
    await loadMasks();
    draw();
  } catch (e) { showError(e.message); }
}

function masksHere() {
  const v = currentView();
  if (!v || !S.model) return [];
  return S.model.masks.filter(m => m.view === v.id && (m.slice_index == null || v.slices < 2 || m.slice_index === S.slice));
}

async function loadMasks() {
  const v = currentView();
  for (const m of masksHere()) {
    const k = m.shape.length === 3 ? S.slice : 0;
    const key = `${m.name}:${k}`;
    if (S.masks.has(key)) continue;
    const r = await api(`/api/runs/${S.run}/masks/${m.name}/slices/${k}`, {raw: true});
    const [h, w] = r.headers.get("X-Shape").split(",").map(Number);
    S.masks.set(key, {h, w, data: new Uint8Array(await r.arrayBuffer()), canvas: null, drawnWith: ""});
  }
  if (v) draw();
}

/* One mask slice as a canvas: the labels that are on, in their colours, at the chosen opacity. */
function maskCanvas(m, entry) {
  const on = m.labels.filter(l => !S.layerOff.has(`${m.eid}:${m.name}:${l.value}`));
  const sig = on.map(l => l.value).join(",") + "@" + S.opacity + (S.highlight === m.eid ? "!" : "");
  if (entry.canvas && entry.drawnWith === sig) return entry.canvas;
  const c = entry.canvas || document.createElement("canvas");
  c.width = entry.w; c.height = entry.h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(entry.w, entry.h);
  const colour = new Map(on.map(l => [l.value, [1, 3, 5].map(i => parseInt(l.colour.slice(i, i + 2), 16))]));
  const alpha = Math.round(255 * Math.min(1, S.opacity * (S.highlight === m.eid ? 1.4 : 1)));
  for (let i = 0; i < entry.data.length; i++) {
    const rgb = colour.get(entry.data[i]);
    if (!rgb) continue;
    img.data.set([rgb[0], rgb[1], rgb[2], alpha], i * 4);
  }
  ctx.putImageData(img, 0, 0);
  entry.canvas = c; entry.drawnWith = sig;
  return c;
}

function colourOf(eid) {
  const ids = Object.keys((S.model && S.model.evidence) || {});
  return PALETTE[Math.max(0, ids.indexOf(eid)) % PALETTE.length];
}

function geometry() {
  const c = $("canvas");
  const w = S.base.width, h = S.base.height;
  const scale = Math.min(c.width / w, c.height / h) * S.zoom;
  return {scale, ox: (c.width - w * scale) / 2 + S.panX, oy: (c.height - h * scale) / 2 + S.panY, w, h};
}

function draw() {
  const c = $("canvas"), ctx = c.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#111";
  ctx.fillRect(0, 0, c.width, c.height);
  const v = currentView();
  if (!S.base || !v) return;
  const g = geometry();
  ctx.setTransform(g.scale, 0, 0, g.scale, g.ox, g.oy);
  ctx.imageSmoothingEnabled = g.scale < 2;
  ctx.drawImage(S.base, 0, 0);
  ctx.imageSmoothingEnabled = false;
  for (const m of masksHere()) {
    const entry = S.masks.get(`${m.name}:${m.shape.length === 3 ? S.slice : 0}`);
    if (entry && entry.w === g.w && entry.h === g.h) ctx.drawImage(maskCanvas(m, entry), 0, 0);
  }
  const font = 12 / g.scale;
  ctx.font = `600 ${font}px system-ui, sans-serif`;
  for (const b of S.model.boxes.filter(b => b.view === v.id && !S.boxOff.has(b.eid))) {
    ctx.strokeStyle = ctx.fillStyle = colourOf(b.eid);
    ctx.lineWidth = (S.highlight === b.eid ? 3.5 : 1.5) / g.scale;
    ctx.strokeRect(b.x, b.y, b.w, b.h);
    ctx.fillText(b.label, b.x, b.y > font * 1.2 ? b.y - font * 0.3 : b.y + b.h + font);
  }
  for (const l of S.model.lines.filter(l => l.view === v.id && !S.boxOff.has(l.eid))) {
    ctx.strokeStyle = ctx.fillStyle = colourOf(l.eid);
    ctx.lineWidth = 2 / g.scale;
    ctx.setLineDash([6 / g.scale, 3 / g.scale]);
    ctx.beginPath(); ctx.moveTo(l.x1, l.y1); ctx.lineTo(l.x2, l.y2); ctx.stroke();
    ctx.setLineDash([]);
    if (l.text) ctx.fillText(l.text, (l.x1 + l.x2) / 2, (l.y1 + l.y2) / 2);
  }
  // orientation markers and the slice, in screen pixels
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.font = "700 16px system-ui, sans-serif";
  ctx.fillStyle = "#ffd24a";
  const o = v.orientation, mark = s => s + (o.assumed && s ? "?" : "");
  ctx.textAlign = "left"; ctx.textBaseline = "middle"; ctx.fillText(mark(o.left), 6, c.height / 2);
  ctx.textAlign = "right"; ctx.fillText(mark(o.right), c.width - 6, c.height / 2);
  ctx.textAlign = "center"; ctx.textBaseline = "top"; ctx.fillText(o.top, c.width / 2, 6);
  ctx.textBaseline = "bottom"; ctx.fillText(o.bottom, c.width / 2, c.height - 6);
  ctx.textAlign = "left"; ctx.font = "12px ui-monospace, monospace"; ctx.fillStyle = "#ddd";
  ctx.fillText(`${v.id} ${S.slice + 1}/${v.slices}` + (v.rgb ? "" : `  W ${Math.round(S.width)} L ${Math.round(S.center)}`) + `  ×${S.zoom.toFixed(2)}`, 6, c.height - 6);
}

/* A label that covers over a third of its mask (a body outline) starts switched off: it would hide the picture. */
function defaultLayers() {
  for (const m of S.model.masks) {
    if (S.seenMasks.has(m.name)) continue;
    S.seenMasks.add(m.name);
    const total = m.shape.reduce((a, b) => a * b, 1);
    for (const l of m.labels) {
      if (l.pixels <= total / 3) continue;
      S.layerOff.add(`${m.eid}:${m.name}:${l.value}`);
      S.bigLayers.add(`${m.eid}:${m.name}:${l.value}`);
    }
  }
}

function renderOverlayControls() {
  if (!S.model) return;
  defaultLayers();
  const masks = $("mask-list");
  masks.replaceChildren(...S.model.masks.map(m => el("div", {class: "group", "data-mask": m.name},
    el("b", {}, cite(`[${m.eid}] `), `${m.tool} on ${m.view}${m.slice_index != null ? ` slice ${m.slice_index + 1}` : ""}: `),
    el("span", {class: "hint", text: m.description}), el("br"),
    ...m.labels.filter(l => l.pixels).map(l => {
      const key = `${m.eid}:${m.name}:${l.value}`;
      const box = el("input", {type: "checkbox", checked: !S.layerOff.has(key), "data-label": l.name,
        onchange: ev => { if (ev.target.checked) S.layerOff.delete(key); else S.layerOff.add(key); draw(); }});
      return el("label", {title: `${l.pixels} pixels`}, box, el("span", {class: "swatch", style: {background: l.colour}}), l.name);
    }),
    m.labels.some(l => !l.pixels) ? el("div", {class: "hint", text: "not in the mask: " + m.labels.filter(l => !l.pixels).map(l => l.name).join(", ")}) : null)));
  const eids = [...new Set([...S.model.boxes, ...S.model.lines].map(b => b.eid))];
  $("box-list").replaceChildren(...(eids.length ? [el("b", {text: "Boxes and lines: "})] : []), ...eids.map(eid => el("label", {},
    el("input", {type: "checkbox", checked: !S.boxOff.has(eid), "data-boxes": eid,
      onchange: ev => { if (ev.target.checked) S.boxOff.delete(eid); else S.boxOff.add(eid); draw(); }}),
    el("span", {class: "swatch", style: {background: colourOf(eid)}}), eid)));
  $("tool-overlays").replaceChildren(...S.model.overlays.map(o => {
    const img = el("img", {alt: `${o.kind} of ${o.eid}`});
    api(o.url, {blob: true}).then(b => { img.src = URL.createObjectURL(b); }).catch(() => { img.alt = "missing"; });
    return el("figure", {"data-eid": o.eid}, img, el("figcaption", {}, cite(`[${o.eid}] `), o.description));
  }));
}

// -- downloads ----------------------------------------------------------------------------------------------------------
function save(blob, name) {
  const a = el("a", {href: URL.createObjectURL(blob), download: name});
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 10000);
}

async function download(what) {
  const id = S.run, note = $("download-note");
  note.textContent = "";
  try {
    const blob = {blob: true};
    if (what === "report.md") save(await api(`/api/runs/${id}/report?format=md`, blob), `${id}.report.md`);
    else if (what === "report.json") save(await api(`/api/runs/${id}/report`, blob), `${id}.report.json`);
    else if (what === "fhir") save(await api(`/api/runs/${id}/fhir`, blob), `${id}.fhir.json`);
    else if (what === "audit") save(await api(`/api/runs/${id}/audit`, blob), `${id}.audit.html`);
    else {
      const found = await api(`/api/runs/${id}/dicom`);
      const objs = found.objects.filter(o => o.kind === (what === "sr" ? "SR" : "SEG"));
      for (const o of objs) save(await api(o.url, {blob: true}), o.file);
      if (!objs.length) note.textContent = `no ${what.toUpperCase()}: ` + (found.skipped.join("; ") || "nothing to write");
    }
  } catch (e) { note.textContent = e.message; }
}

// -- wiring ---------------------------------------------------------------------------------------------------------------
function wire() {
  document.querySelectorAll(".tabs button").forEach(b => b.addEventListener("click", () => switchTab(b.dataset.tab)));
  $("ask").addEventListener("click", ask);
  $("stop").addEventListener("click", stop);
  $("resume").addEventListener("click", resume);
  $("file").addEventListener("change", ev => {  // several DICOM files: one series, unless the user says otherwise
    const names = [...ev.target.files].map(f => f.name.toLowerCase());
    $("series").checked = names.length > 1 && names.every(n => n.endsWith(".dcm") || n.endsWith(".dicom") || !n.includes("."));
  });
  $("followup-ask").addEventListener("click", askFollowup);
  $("token").value = token();
  $("token").addEventListener("change", ev => { sessionStorage.setItem("dxagent-token", ev.target.value.trim()); loadRuns(); });
  $("view-select").addEventListener("change", ev => selectView(ev.target.value));
  $("slice").addEventListener("input", ev => setSlice(+ev.target.value));
  $("preset").addEventListener("change", ev => {
    const v = currentView();
    const w = v.presets[ev.target.value] || v.window;
    S.center = w.center; S.width = w.width;
    loadSlice();
  });
  $("opacity").addEventListener("input", ev => { S.opacity = ev.target.value / 100; draw(); });
  $("zoom-in").addEventListener("click", () => { S.zoom *= 1.25; draw(); });
  $("zoom-out").addEventListener("click", () => { S.zoom /= 1.25; draw(); });
  $("zoom-reset").addEventListener("click", () => { S.zoom = 1; S.panX = S.panY = 0; draw(); });
  document.querySelectorAll("[data-dl]").forEach(b => b.addEventListener("click", () => download(b.dataset.dl)));
  $("push").addEventListener("click", async () => {
    $("download-note").textContent = "storing to the PACS…";
    try {
      const r = await api(`/api/runs/${S.run}/push`, {method: "POST"});
      $("download-note").textContent = `stored ${r.objects.join(", ")} to ${r.pushed_to}`;
    } catch (e) { $("download-note").textContent = e.message; }
  });
  const c = $("canvas");
  c.addEventListener("wheel", ev => {
    const v = currentView();
    if (!v) return;
    ev.preventDefault();
    const dir = Math.sign(ev.deltaY);
    if (v.slices > 1 && !ev.ctrlKey) setSlice(S.slice + dir);
    else { S.zoom *= dir < 0 ? 1.1 : 1 / 1.1; draw(); }
  }, {passive: false});
  let drag = null, wlTimer = null;
  c.addEventListener("pointerdown", ev => { drag = {x: ev.clientX, y: ev.clientY}; c.setPointerCapture(ev.pointerId); });
  c.addEventListener("pointermove", ev => {
    if (!drag || !currentView()) return;
    const k = c.width / c.clientWidth, dx = (ev.clientX - drag.x) * k, dy = (ev.clientY - drag.y) * k;
    drag = {x: ev.clientX, y: ev.clientY};
    const mode = document.querySelector("input[name=mode]:checked").value;
    if (mode === "pan" || ev.shiftKey || currentView().rgb) { S.panX += dx; S.panY += dy; draw(); return; }
    const step = Math.max(S.width / 256, 0.01);
    S.width = Math.max(step, S.width + dx * step);
    S.center += dy * step;
    $("preset").value = "";
    draw();
    clearTimeout(wlTimer);
    wlTimer = setTimeout(loadSlice, 60);
  });
  c.addEventListener("pointerup", () => { drag = null; });
  window.addEventListener("hashchange", () => { const m = location.hash.match(/run=([\w-]+)/); if (m && m[1] !== S.run) openRun(m[1]); });
  const m = location.hash.match(/run=([\w-]+)/);
  if (m) openRun(m[1]); else loadRuns();
  draw();
}

wire();
