// convnet serve: the page's behaviour. Plain JavaScript, no libraries, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, explain: null, part: 0, step: 0, trainVersion: -1, pollTimer: null };

// ---------------------------------------------------------------- helpers

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function decode(block) {
  const raw = atob(block.data);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// Viridis, five stops, for maps without negative values.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(byte, signed) {
  const t = byte / 255;
  if (signed) {  // blue < 0 < red, white at 0
    const s = 2 * t - 1;
    return s >= 0 ? [255, Math.round(255 * (1 - s)), Math.round(255 * (1 - s))]
                  : [Math.round(255 * (1 + s)), Math.round(255 * (1 + s)), 255];
  }
  const x = t * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
  return VIRIDIS[i].map((c, k) => Math.round(c + f * (VIRIDIS[i + 1][k] - c)));
}

// Draw map `index` of an encoded stack (see encode_maps in serve.py) onto `canvas`.
function paintMap(canvas, block, bytes, index) {
  const [h, w] = block.shape.slice(-2);
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  const offset = index * h * w;
  for (let p = 0; p < h * w; p++) {
    const [r, g, b] = colour(bytes[offset + p], block.signed);
    image.data.set([r, g, b, 255], 4 * p);
  }
  ctx.putImageData(image, 0, 0);
}

// A grid of canvases, one per map, reused when the shape stays the same.
function paintStack(container, block, title) {
  const bytes = decode(block);
  const n = block.shape.length === 3 ? block.shape[0] : 1;
  let grid = container.querySelector(".grid");
  if (!grid || grid.childElementCount !== n) {
    container.innerHTML = "";
    if (title) {
      const t = document.createElement("div");
      t.className = "title";
      container.appendChild(t);
    }
    grid = document.createElement("div");
    grid.className = "grid";
    for (let i = 0; i < n; i++) grid.appendChild(document.createElement("canvas"));
    container.appendChild(grid);
  }
  if (title) container.querySelector(".title").textContent = title;
  [...grid.children].forEach((canvas, i) => paintMap(canvas, block, bytes, i));
}

// ---------------------------------------------------------------- tabs

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  if (view === "explain") loadExplain();
  if (view === "train") pollTraining();
}

// ---------------------------------------------------------------- drawing

const pad = $("pad");
const padCtx = pad.getContext("2d", { willReadFrequently: true });
const predict = { timer: null, inflight: false, again: false, seq: 0 };

function clearPad() {
  predict.seq++;  // an answer still on its way is for the old drawing
  clearTimeout(predict.timer);
  padCtx.fillStyle = "#000";
  padCtx.fillRect(0, 0, pad.width, pad.height);
  $("input").getContext("2d").clearRect(0, 0, 28, 28);
  $("predicted").textContent = "";
  delete $("predicted").dataset.pixels;
  delete $("predicted").dataset.class;
  for (const bar of document.querySelectorAll(".bar")) setBar(bar, 0, false);
  $("maps").innerHTML = '<p class="muted">Draw something to see them.</p>';
  $("saliency").getContext("2d").clearRect(0, 0, 28, 28);
  $("latency").textContent = "";
}

function padPoint(event) {
  const rect = pad.getBoundingClientRect();
  return [(event.clientX - rect.left) * pad.width / rect.width, (event.clientY - rect.top) * pad.height / rect.height];
}

let last = null;
pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  pad.dataset.pointer = event.pointerType;  // mouse, pen or touch
  last = padPoint(event);
  stroke(last, last);
});
pad.addEventListener("pointermove", (event) => {
  if (last === null) return;
  const p = padPoint(event);
  stroke(last, p);
  last = p;
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => { last = null; schedulePredict(0); });
}

function stroke(a, b) {
  padCtx.strokeStyle = "#fff";
  padCtx.lineWidth = 22;
  padCtx.lineCap = "round";
  padCtx.lineJoin = "round";
  padCtx.beginPath();
  padCtx.moveTo(a[0], a[1]);
  padCtx.lineTo(b[0], b[1]);
  padCtx.stroke();
  schedulePredict(120);
}

// The drawing as the network's input, prepared like an MNIST digit: the ink's bounding box
// scaled (area averaging) to fit 20/28 of the frame, then moved so its centre of mass is
// in the middle. Returns H*W values k/255 in [0, 1], or null for an empty pad.
function inputPixels() {
  const [, H, W] = state.model.input_shape;
  const src = padCtx.getImageData(0, 0, pad.width, pad.height).data;
  const side = pad.width;
  let top = side, bottom = -1, left = side, right = -1;
  for (let y = 0; y < side; y++) for (let x = 0; x < side; x++) {
    if (src[4 * (y * side + x)] > 0) {
      top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, x); right = Math.max(right, x);
    }
  }
  if (bottom < 0) return null;
  const bw = right - left + 1, bh = bottom - top + 1;
  const scale = Math.min(20 * H / 28, 20 * W / 28) / Math.max(bw, bh);
  const tw = Math.max(1, Math.round(bw * scale)), th = Math.max(1, Math.round(bh * scale));
  const box = new Float64Array(tw * th);
  for (let j = 0; j < th; j++) for (let i = 0; i < tw; i++) {
    const y0 = top + Math.floor(j * bh / th), y1 = top + Math.max(Math.floor((j + 1) * bh / th), Math.floor(j * bh / th) + 1);
    const x0 = left + Math.floor(i * bw / tw), x1 = left + Math.max(Math.floor((i + 1) * bw / tw), Math.floor(i * bw / tw) + 1);
    let sum = 0;
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) sum += src[4 * (y * side + x)];
    box[j * tw + i] = sum / ((y1 - y0) * (x1 - x0));
  }
  let mass = 0, my = 0, mx = 0;
  for (let j = 0; j < th; j++) for (let i = 0; i < tw; i++) { const v = box[j * tw + i]; mass += v; my += v * j; mx += v * i; }
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const oy = clamp(Math.round((H - 1) / 2 - my / mass), 0, H - th);
  const ox = clamp(Math.round((W - 1) / 2 - mx / mass), 0, W - tw);
  const out = new Array(H * W).fill(0);
  for (let j = 0; j < th; j++) for (let i = 0; i < tw; i++) out[(oy + j) * W + ox + i] = Math.round(box[j * tw + i]) / 255;
  return out;
}

function showInput(pixels) {
  const [, H, W] = state.model.input_shape;
  const canvas = $("input");
  canvas.width = W; canvas.height = H;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(W, H);
  pixels.forEach((v, p) => { const g = Math.round(255 * v); image.data.set([g, g, g, 255], 4 * p); });
  ctx.putImageData(image, 0, 0);
}

function schedulePredict(delay) {
  clearTimeout(predict.timer);
  predict.timer = setTimeout(sendPredict, delay);
}

async function sendPredict() {
  if (!state.model) return;
  if (predict.inflight) { predict.again = true; return; }
  const pixels = inputPixels();
  if (pixels === null) return;
  showInput(pixels);
  predict.inflight = true;
  document.body.dataset.busy = "1";
  const seq = ++predict.seq;
  const started = performance.now();
  try {
    const result = await api("/api/predict", { pixels });
    showPrediction(result, pixels, performance.now() - started, seq);
  } catch (error) {
    $("latency").textContent = `error: ${error.message}`;
  } finally {
    predict.inflight = false;
    if (predict.again) { predict.again = false; schedulePredict(0); } else document.body.dataset.busy = "0";
  }
}

function setBar(bar, p, top) {
  bar.classList.toggle("top", top);
  bar.dataset.prob = String(p);
  bar.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
  bar.querySelector(".pct").textContent = `${(100 * p).toFixed(1)}%`;
}

function buildBars(classes) {
  const bars = $("bars");
  bars.innerHTML = "";
  for (let k = 0; k < classes; k++) {
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.dataset.class = String(k);
    bar.innerHTML = `<span>${k}</span><div class="track"><div class="fill"></div></div><span class="pct"></span>`;
    bars.appendChild(bar);
    setBar(bar, 0, false);
  }
}

function showPrediction(result, pixels, ms, seq) {
  if (seq !== predict.seq) return;
  const out = $("predicted");
  out.textContent = String(result.predicted);
  out.dataset.class = String(result.predicted);
  out.dataset.pixels = JSON.stringify(pixels);  // exactly what was sent, for checking the answer
  out.dataset.seq = String(seq);
  document.querySelectorAll(".bar").forEach((bar, k) => setBar(bar, result.probabilities[k], k === result.predicted));
  $("latency").textContent = `answered in ${ms.toFixed(0)} ms`;
  const maps = $("maps");
  if (maps.querySelector("p")) maps.innerHTML = "";
  result.maps.forEach((block, i) => {
    let layer = maps.children[i];
    if (!layer) { layer = document.createElement("div"); layer.className = "layer"; maps.appendChild(layer); }
    layer.dataset.name = block.name;
    const range = block.signed ? `values in [${block.lo.toFixed(2)}, ${block.hi.toFixed(2)}]` : `max ${block.hi.toFixed(2)}`;
    paintStack(layer, block, `${block.name} -> ${block.shape.join("x")}, ${range}`);
  });
  paintMap($("saliency"), result.saliency, decode(result.saliency), 0);
}

// ---------------------------------------------------------------- explain

async function loadExplain() {
  if (state.explain) return;
  try {
    state.explain = (await api("/api/explain")).filter((part) => part.title);
  } catch (error) {
    $("step-body").textContent = `error: ${error.message}`;
    return;
  }
  choosePart(0);
}

function choosePart(index) {
  state.part = index;
  document.querySelectorAll(".part").forEach((b) => b.classList.toggle("selected", Number(b.dataset.part) === index));
  const list = $("steps");
  list.innerHTML = "";
  state.explain[index].steps.forEach((step, i) => {
    const li = document.createElement("li");
    li.textContent = step.title || "The arrays";
    li.addEventListener("click", () => chooseStep(i));
    list.appendChild(li);
  });
  chooseStep(0);
}

function chooseStep(index) {
  const steps = state.explain[state.part].steps;
  state.step = Math.max(0, Math.min(index, steps.length - 1));
  const step = steps[state.step];
  [...$("steps").children].forEach((li, i) => li.classList.toggle("current", i === state.step));
  $("step-title").textContent = `${state.explain[state.part].title}: ${step.title || "the arrays"}`;
  $("step-count").textContent = `step ${state.step + 1} of ${steps.length}`;
  $("prev").disabled = state.step === 0;
  $("next").disabled = state.step === steps.length - 1;
  const body = $("step-body");
  body.innerHTML = "";
  let group = null;
  for (const item of step.items) {
    if (item.cells) {
      if (!group) { group = document.createElement("div"); group.className = "arrays"; body.appendChild(group); }
      group.appendChild(arrayTable(item));
      continue;
    }
    group = null;
    const el = document.createElement(item.check !== undefined ? "div" : "p");
    if (item.check !== undefined) {
      el.className = `check ${item.ok ? "ok" : "bad"}`;
      el.textContent = item.check;
    } else {
      el.textContent = item.text;
    }
    body.appendChild(el);
  }
}

// One 2-D array; clicking a cell marks the same position in every table of the step.
function arrayTable(item) {
  const table = document.createElement("table");
  table.className = "array";
  table.dataset.label = item.label;
  table.createCaption().textContent = item.label;
  item.cells.forEach((row, r) => {
    const tr = table.insertRow();
    row.forEach((text, c) => {
      const td = tr.insertCell();
      td.textContent = text;
      if (text.startsWith("-")) td.classList.add("neg");
      td.addEventListener("click", () => {
        const on = !td.classList.contains("hl");
        for (const t of $("step-body").querySelectorAll("table.array")) {
          for (const cell of t.querySelectorAll("td")) cell.classList.remove("hl");
          const same = t.rows[r] && t.rows[r].cells[c];
          if (same && on) same.classList.add("hl");
        }
      });
    });
  });
  return table;
}

// ---------------------------------------------------------------- training

async function startTraining() {
  const epochs = Number($("epochs").value), lr = Number($("lr").value);
  try {
    showTraining(await api("/api/train", { epochs, lr }));
  } catch (error) {
    $("train-status").textContent = `error: ${error.message}`;
  }
  pollTraining();
}

async function stopTraining() {
  try { showTraining(await api("/api/train/stop", {})); } catch (error) { $("train-status").textContent = `error: ${error.message}`; }
}

async function pollTraining() {
  clearTimeout(state.pollTimer);
  let running = false;
  try {
    const s = await api("/api/train");
    showTraining(s);
    running = s.status === "running";
  } catch (error) {
    $("train-status").textContent = `error: ${error.message}`;
  }
  if (running || !$("view-train").hidden) state.pollTimer = setTimeout(pollTraining, running ? 400 : 2000);
}

function showTraining(s) {
  const running = s.status === "running";
  $("start").disabled = running;
  $("stop").disabled = !running;
  const status = $("train-status");
  status.dataset.status = s.status;
  status.textContent = running
    ? `training on ${s.train_images || "the"} digits: epoch ${s.epoch} of ${s.epochs}, batch ${s.batch} of ${s.batches} (lr ${s.lr})`
    : s.status === "idle" ? "idle: pick epochs and a learning rate, then Start" : s.message;
  const done = s.batches ? ((Math.max(s.epoch, 1) - 1) * s.batches + s.batch) / (s.epochs * s.batches) : 0;
  $("train-progress").value = s.status === "done" ? 1 : done;
  if (s.version === state.trainVersion) return;
  state.trainVersion = s.version;
  drawCurve(s.history, s.epochs);
  if (s.filters) paintStack($("filters"), s.filters, "");
}

function drawCurve(history, epochs) {
  const canvas = $("curve");
  canvas.dataset.points = String(history.length);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, m = { l: 48, r: 48, t: 28, b: 36 };
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = "#d9dee7";
  ctx.fillStyle = "#667085";
  ctx.strokeRect(m.l, m.t, w - m.l - m.r, h - m.t - m.b);
  const n = Math.max(epochs || 1, history.length, 1);
  const maxLoss = Math.max(0.5, ...history.map((r) => r.loss), ...history.map((r) => r.val_loss || 0));
  const X = (e) => m.l + (w - m.l - m.r) * e / n;
  const YL = (v) => m.t + (h - m.t - m.b) * (1 - v / maxLoss);
  const YA = (v) => m.t + (h - m.t - m.b) * (1 - v);
  ctx.textAlign = "center";
  for (let e = 0; e <= n; e += Math.max(1, Math.ceil(n / 10))) ctx.fillText(String(e), X(e), h - m.b + 14);
  ctx.fillText("epoch", (m.l + w - m.r) / 2, h - 6);
  ctx.textAlign = "right";
  for (let k = 0; k <= 4; k++) ctx.fillText((maxLoss * k / 4).toFixed(2), m.l - 4, YL(maxLoss * k / 4) + 4);
  ctx.textAlign = "left";
  for (let k = 0; k <= 4; k++) ctx.fillText(`${25 * k}%`, w - m.r + 4, YA(k / 4) + 4);
  const series = [
    ["train loss", "#d1495b", (r) => r.loss, YL],
    ["train accuracy", "#2f6fde", (r) => r.accuracy, YA],
    ["test accuracy", "#12803c", (r) => r.val_accuracy, YA],
  ];
  series.forEach(([name, colourName, get, Y], k) => {
    ctx.strokeStyle = colourName;
    ctx.fillStyle = colourName;
    ctx.lineWidth = 2;
    ctx.beginPath();
    history.forEach((r, i) => { const v = get(r); if (v !== null) (i ? ctx.lineTo : ctx.moveTo).call(ctx, X(r.epoch), Y(v)); });
    ctx.stroke();
    history.forEach((r) => { const v = get(r); if (v !== null) { ctx.beginPath(); ctx.arc(X(r.epoch), Y(v), 3, 0, 7); ctx.fill(); } });
    ctx.fillText(`\u25CF ${name}`, m.l + 120 * k, 16);
  });
  const table = $("history");
  table.innerHTML = "<tr><th>epoch</th><th>train loss</th><th>train acc.</th><th>test loss</th><th>test acc.</th><th>time</th></tr>";
  for (const r of history) {
    const pct = (v) => (v === null ? "" : `${(100 * v).toFixed(2)}%`);
    table.insertAdjacentHTML("beforeend", `<tr><td>${r.epoch}</td><td>${r.loss.toFixed(4)}</td><td>${pct(r.accuracy)}</td>` +
      `<td>${r.val_loss === null ? "" : r.val_loss.toFixed(4)}</td><td>${pct(r.val_accuracy)}</td><td>${r.time.toFixed(1)} s</td></tr>`);
  }
}

// ---------------------------------------------------------------- start

async function main() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("clear").addEventListener("click", clearPad);
  for (const b of document.querySelectorAll(".part")) b.addEventListener("click", () => choosePart(Number(b.dataset.part)));
  $("prev").addEventListener("click", () => chooseStep(state.step - 1));
  $("next").addEventListener("click", () => chooseStep(state.step + 1));
  document.addEventListener("keydown", (event) => {
    if ($("view-explain").hidden || !state.explain) return;
    if (event.key === "ArrowRight") chooseStep(state.step + 1);
    if (event.key === "ArrowLeft") chooseStep(state.step - 1);
  });
  $("start").addEventListener("click", startTraining);
  $("stop").addEventListener("click", stopTraining);
  clearPad();
  try {
    state.model = await api("/api/model");
  } catch (error) {
    $("model-name").textContent = `error: ${error.message}`;
    return;
  }
  $("model-name").textContent = `${state.model.name}: ${state.model.layers.length} layers, ` +
    `${state.model.parameters.toLocaleString("en")} parameters`;
  buildBars(state.model.classes);
  document.body.dataset.ready = "1";
  document.body.dataset.busy = "0";
}

main();
