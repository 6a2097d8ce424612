// The service's web page: pick tasks, see the consolidated model, predict an image. Plain JS, no build step.
"use strict";

const state = { pool: null, picked: [], image: null, seq: 0, predictSeq: 0 };
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

const postJSON = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function human(n) {
  for (const [unit, div] of [["G", 1e9], ["M", 1e6], ["K", 1e3]]) if (n >= div) return (n / div).toFixed(2) + unit;
  return String(n);
}

function show(id, text, value) {
  const el = $(id);
  el.textContent = text;
  el.dataset.value = value === undefined ? "" : String(value);
}

function element(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el) el[k] = v;
    else el.setAttribute(k, v);
  }
  el.append(...children);
  return el;
}

// ------------------------------------------------------------------ tasks
function renderPool(pool) {
  state.pool = pool;
  const present = pool.tasks.filter((t) => t.present).length;
  $("pool-line").textContent =
    `${pool.dataset}: ${present} of ${pool.tasks.length} experts in the pool · ${pool.precision} · ` +
    `images ${pool.image_size}×${pool.image_size} RGB`;
  $("size-note").textContent = `PNG or JPEG; other sizes are centre-cropped and scaled to ${pool.image_size}×${pool.image_size} here`;
  $("preview").width = $("preview").height = pool.image_size;
  const grid = $("tasks");
  grid.replaceChildren();
  for (const task of pool.tasks) {
    const box = element("input", { type: "checkbox", id: `task-${task.name}`, value: task.name, disabled: !task.present });
    box.addEventListener("change", () => toggle(task.name, box.checked));
    const acc = task.accuracy == null ? "" : `expert ${task.accuracy.toFixed(1)}%`;
    const card = element(
      "label",
      { className: "task" + (task.present ? "" : " absent"), htmlFor: box.id, title: task.present ? "" : "no expert in the pool" },
      box,
      element("span", { className: "task-name" }, task.name.replaceAll("_", " ")),
      element("span", { className: "muted small" }, task.present ? acc : "not in the pool"),
      element("span", { className: "task-classes small" }, task.classes.map((c) => c.name.replaceAll("_", " ")).join(", ")),
    );
    grid.append(card);
  }
}

function toggle(name, on) {
  state.picked = state.picked.filter((t) => t !== name);
  if (on) state.picked.push(name);
  document.querySelectorAll(".task").forEach((card) => card.classList.toggle("on", card.querySelector("input").checked));
  update();
}

$("clear").addEventListener("click", () => {
  document.querySelectorAll("#tasks input").forEach((b) => (b.checked = false));
  document.querySelectorAll(".task").forEach((card) => card.classList.remove("on"));
  state.picked = [];
  update();
});

// ------------------------------------------------------------------ the model
// Forget the last model's numbers and link, so nothing of an earlier query can show again.
function clearModel() {
  for (const id of ["accuracy", "params", "flops", "build-ms"]) show(id, "–");
  show("n-test", "");
  $("classes").textContent = "";
  $("download").removeAttribute("href");
  $("download-onnx").removeAttribute("href");
}

async function update() {
  const seq = ++state.seq;
  const tasks = [...state.picked];
  $("picked").textContent = tasks.length ? `query: ${tasks.join(", ")}` : "no task picked";
  $("model-error").hidden = true;
  if (!tasks.length) {
    clearModel();
    $("model").hidden = true;
    $("model-empty").hidden = false;
    $("result-row").hidden = true;
    $("prediction").tBodies[0].replaceChildren();
    document.body.dataset.state = "idle";
    return;
  }
  document.body.dataset.state = "busy";
  try {
    const q = await postJSON("/api/query", { tasks, evaluate: false });
    if (seq !== state.seq) return;
    $("model-empty").hidden = true;
    $("model").hidden = false;
    show("params", q.params.toLocaleString("en-US"), q.params);
    show("flops", human(q.flops), q.flops);
    show("build-ms", `${q.build_ms.toFixed(2)} ms`, q.build_ms);
    $("classes").textContent = q.classes.map((c) => c.name.replaceAll("_", " ")).join(", ");
    $("download").href = q.model;
    $("download-onnx").href = q.onnx;
    show("accuracy", "evaluating…");
    show("n-test", "");
    const predicted = state.image ? predict() : Promise.resolve();
    if (state.pool.accuracy_available) {
      const e = await postJSON("/api/query", { tasks, evaluate: true });
      if (seq !== state.seq) return;
      show("accuracy", `${e.accuracy.toFixed(2)}%`, e.accuracy);
      show("n-test", `on ${e.n_test.toLocaleString("en-US")} test images of these classes`, e.n_test);
    } else {
      show("accuracy", "not available (the server has no test data)");
    }
    await predicted;
    if (seq === state.seq) document.body.dataset.state = "ready";
  } catch (err) {
    if (seq !== state.seq) return;
    $("model-error").textContent = err.message;
    $("model-error").hidden = false;
    document.body.dataset.state = "error";
  }
}

// ------------------------------------------------------------------ images
async function loadImage(file) {
  $("predict-error").hidden = true;
  const size = state.pool.image_size;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showPredictError(`${file.name || "this file"} is not an image this browser can read; use a PNG or JPEG`);
    return;
  }
  const canvas = $("preview");
  const ctx = canvas.getContext("2d");
  const exact = bitmap.width === size && bitmap.height === size && /^image\/(png|jpeg)$/.test(file.type);
  const side = Math.min(bitmap.width, bitmap.height);
  ctx.clearRect(0, 0, size, size);
  ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, size, size);
  // an image of the pool's size goes as it is (byte for byte); others go as the preview drawn here
  state.image = exact ? file : await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  $("preview-note").textContent = exact
    ? `${file.name}, sent unchanged`
    : `${file.name} (${bitmap.width}×${bitmap.height}), sent as this ${size}×${size} crop`;
  if (state.picked.length) await predict();
  else showPredictError("pick at least one task to predict");
}

function showPredictError(message) {
  $("predict-error").textContent = message;
  $("predict-error").hidden = false;
}

async function predict() {
  const seq = ++state.predictSeq;
  const form = new FormData();
  for (const t of state.picked) form.append("tasks", t);
  form.append("images", state.image, "image.png");
  form.append("top", "5");
  document.body.dataset.predict = "busy";
  try {
    const r = await api("/api/predict/upload", { method: "POST", body: form });
    if (seq !== state.predictSeq) return;
    $("predict-error").hidden = true;
    const rows = r.predictions[0].top.map((c) =>
      element(
        "tr",
        { dataset: { id: c.id, name: c.name, p: c.probability } },
        element("td", {}, c.name.replaceAll("_", " ")),
        element("td", { className: "num" }, `${(100 * c.probability).toFixed(2)}%`),
        element("td", {}, element("span", { className: "bar", style: `width:${(100 * c.probability).toFixed(1)}%` })),
      ),
    );
    $("prediction").tBodies[0].replaceChildren(...rows);
    $("result-row").hidden = false;
    document.body.dataset.predict = "ready";
  } catch (err) {
    if (seq !== state.predictSeq) return;
    showPredictError(err.message);
    document.body.dataset.predict = "error";
  }
}

$("file").addEventListener("change", (e) => e.target.files[0] && loadImage(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) loadImage(e.dataTransfer.files[0]);
});

api("/api/pool")
  .then(renderPool)
  .then(() => (document.body.dataset.state = "idle"))
  .catch((err) => ($("pool-line").textContent = `cannot load the pool: ${err.message}`));
