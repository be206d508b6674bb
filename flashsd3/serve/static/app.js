// flashsd3-serve's page: plain JS over the server's A1111 routes (/sdapi/v1/txt2img, img2img, with a ControlNet
// extension unit for a control image) and GET /api/progress/<task id> for the per-step progress bar and queue
// position.
"use strict";
const $ = (id) => document.getElementById(id);
let config = null;
let source = null;        // the uploaded image: {dataUrl, width, height}
let control = null;       // the uploaded control image: {dataUrl, width, height}
let maskPainted = false;
let strengthTouched = false;

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {headers: headers()} :
    {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) $("key-row").hidden = false;
    const message = typeof data.error === "object" ? data.error.message : (data.detail || data.error);
    throw new Error(`${response.status}: ${message || response.statusText}`);
  }
  return data;
}

async function loadConfig() {
  try {
    config = await api("/api/config");
  } catch (e) {
    $("error").textContent = e.message + (e.message.startsWith("401") ? " (enter the API key, then reload)" : "");
    return;
  }
  $("model").textContent = config.model;
  for (const id of ["width", "height"]) {
    $(id).value = config.default_size;
    $(id).step = config.size_step;
  }
  $("count").max = config.limits.max_images;
  for (const name of Object.keys(config.recipes)) $("recipe").add(new Option(name, name, false, name === config.default_recipe));
  for (const name of config.samplers) $("sampler").add(new Option(name, name));
  for (const lora of config.loras) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = `<label class="grow"><input type="checkbox" checked data-lora="${lora.name}"> LoRA ${lora.name}</label>
      <label>scale <input type="number" step="0.05" value="${lora.scale}" data-lora-scale="${lora.name}"></label>`;
    $("loras").append(row);
  }
  if (config.controlnets.length) {
    $("controlnet-box").hidden = false;
    for (const net of config.controlnets) $("controlnet").add(new Option(net.name + (net.inpainting ? " (inpainting)" : ""), net.name));
    for (const name of config.modules) $("control-module").add(new Option(name, name));
    setControlScale();
  }
  showRecipe();
}

function setControlScale() {  // the chosen ControlNet's --controlnet scale
  const net = config.controlnets.find((n) => n.name === $("controlnet").value);
  $("control-scale").value = net.scale;
  $("control-scale-value").textContent = Number(net.scale).toFixed(2);
}

function controlUnit() {  // the A1111 ControlNet extension's unit
  return {enabled: true, model: $("controlnet").value, image: control.dataUrl, weight: Number($("control-scale").value),
          module: $("control-module").value, save_detected_map: false};
}

function showRecipe() {
  const recipe = config.recipes[$("recipe").value];
  $("steps").placeholder = recipe.steps;
  $("guidance").placeholder = recipe.guidance;
  $("shift").placeholder = recipe.shift;
  $("sampler").options[0].text = `recipe's (${recipe.sampler})`;
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function request(taskId) {
  const body = {prompt: $("prompt").value, negative_prompt: $("negative").value, seed: number("seed") ?? -1,
                batch_size: number("count") ?? 1, recipe: $("recipe").value, force_task_id: taskId};
  for (const [field, id] of [["steps", "steps"], ["cfg_scale", "guidance"], ["shift", "shift"]]) {
    if (number(id) !== null) body[field] = number(id);
  }
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  if (config.loras.length) {
    body.loras = {};
    for (const box of document.querySelectorAll("[data-lora]")) {
      if (box.checked) body.loras[box.dataset.lora] = Number(document.querySelector(`[data-lora-scale="${box.dataset.lora}"]`).value);
    }
  }
  if (control) body.alwayson_scripts = {controlnet: {args: [controlUnit()]}};
  if (!source) {
    body.width = number("width");
    body.height = number("height");
    return ["/sdapi/v1/txt2img", body];
  }
  body.init_images = [source.dataUrl];
  body.denoising_strength = Number($("strength").value);
  const [w, h] = stepped(source);
  // a size the server would refuse, or a control image to fit to the output: send the size
  if (w !== source.width || h !== source.height || control) { body.width = w; body.height = h; }
  if (maskPainted) body.mask = maskData();
  return ["/sdapi/v1/img2img", body];
}

async function generate(event) {
  event.preventDefault();
  $("error").textContent = "";
  const taskId = "page-" + Math.random().toString(36).slice(2) + Date.now().toString(36);
  const [path, body] = request(taskId);
  $("generate").disabled = true;
  $("progress").hidden = false;
  $("progress").value = 0;
  $("progress-text").textContent = "sending...";
  const timer = setInterval(() => poll(taskId), 300);
  try {
    const result = await api(path, body);
    const info = JSON.parse(result.info);
    result.images.forEach((b64, i) => addResult(b64, info, i));
    $("progress").value = 1;
    $("progress-text").textContent = `done: ${result.images.length} image(s)` +
      (info.notes.length ? " - " + info.notes.join("; ") : "");
  } catch (e) {
    $("error").textContent = e.message;
    $("progress-text").textContent = "";
  } finally {
    clearInterval(timer);
    $("generate").disabled = false;
  }
}

async function poll(taskId) {
  try {
    const p = await api("/api/progress/" + taskId);
    if (p.state === "queued") {
      $("progress-text").textContent = p.queue_position === 0 ? "queued: next" : `queued: position ${p.queue_position + 1}`;
    } else if (p.state === "running" && p.steps) {
      $("progress").value = p.step / p.steps;
      $("progress-text").textContent = `step ${p.step}/${p.steps}` + (p.model_batch > 1 ? ` (batch of ${p.model_batch})` : "");
    }
  } catch (e) { /* not queued yet, or finished */ }
}

function stepped(image) {  // the image's size rounded to the model's size step
  const step = config.size_step;
  return [Math.max(step, Math.round(image.width / step) * step), Math.max(step, Math.round(image.height / step) * step)];
}

function controlText(info) {  // the ControlNet extension's "ControlNet k" entries: "Module: m, Model: n, Weight: w, ..."
  return Object.entries(info.extra_generation_params).filter(([k]) => k.startsWith("ControlNet ")).map(([, v]) => {
    const f = Object.fromEntries(v.split(", ").map((part) => part.split(": ")));
    return `, ControlNet ${f.Model} x${f.Weight}` + (f.Module !== "none" ? ` (${f.Module})` : "");
  }).join("");
}

function addResult(b64, info, i) {
  const seed = info.all_seeds[i];
  const figure = document.createElement("figure");
  figure.className = "result";
  figure.dataset.seed = seed;
  const url = "data:image/png;base64," + b64;  // the server's PNG bytes, metadata included
  const settings = `${info.width}x${info.height}, ${info.extra_generation_params.recipe}, ${info.sampler_name}, ` +
    `${info.steps} steps, guidance ${info.cfg_scale}` + (info.denoising_strength ? `, strength ${info.denoising_strength}` : "") +
    controlText(info);
  figure.innerHTML = `<img alt="result"><figcaption><b>seed <span class="seed"></span></b><br><span class="prompt"></span><br>
    <span class="muted"></span><div class="actions"><button type="button" class="reuse">use this seed</button>
    <a class="download">download PNG</a></div></figcaption>`;
  figure.querySelector("img").src = url;
  figure.querySelector(".seed").textContent = seed;
  figure.querySelector(".prompt").textContent = info.all_prompts[i];
  figure.querySelector(".muted").textContent = settings;
  const link = figure.querySelector(".download");
  link.href = url;
  link.download = `flashsd3-${seed}.png`;
  figure.querySelector(".reuse").onclick = () => {
    $("seed").value = seed;
    $("prompt").value = info.all_prompts[i];
  };
  $("gallery").prepend(figure);
}

// Image upload and the mask brush --------------------------------------------------------------------

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      source = {dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight};
      for (const id of ["image-canvas", "mask-canvas"]) {
        $(id).width = img.naturalWidth;
        $(id).height = img.naturalHeight;
      }
      $("image-canvas").getContext("2d").drawImage(img, 0, 0);
      clearMask();
      $("editor").hidden = false;
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function loadControl(file) {  // txt2img takes its size (rounded to the size step)
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      control = {dataUrl: reader.result, width: img.naturalWidth, height: img.naturalHeight};
      $("control-preview").src = reader.result;
      $("control-editor").hidden = false;
      if (!source) [$("width").value, $("height").value] = stepped(control);
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
  $("edit-mode").textContent = "img2img: paint on the image to inpaint instead.";
}

function maskData() {  // white = repaint, black = keep (A1111's convention), at the image's size
  const canvas = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const pixels = ctx.getImageData(0, 0, out.width, out.height);
  for (let i = 3; i < painted.data.length; i += 4) {
    if (painted.data[i] > 0) pixels.data[i - 3] = pixels.data[i - 2] = pixels.data[i - 1] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function brushAt(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = (event.clientX - box.left) * canvas.width / box.width;
  const y = (event.clientY - box.top) * canvas.height / box.height;
  const r = Number($("brush").value) * canvas.width / box.width / 2;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#f03";
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fill();
  if (!maskPainted) {
    maskPainted = true;
    $("edit-mode").textContent = "inpainting: the painted area is repainted, the rest is kept.";
    if (!strengthTouched) { $("strength").value = 1; $("strength-value").textContent = "1.00"; }
  }
}

function setupBrush() {
  const canvas = $("mask-canvas");
  let down = false;
  canvas.addEventListener("pointerdown", (e) => { down = true; canvas.setPointerCapture(e.pointerId); brushAt(e); });
  canvas.addEventListener("pointermove", (e) => { if (down) brushAt(e); });
  canvas.addEventListener("pointerup", () => { down = false; });
  canvas.addEventListener("pointercancel", () => { down = false; });
}

async function refreshStatus() {
  try {
    const health = await (await fetch("/health")).json();
    $("server-status").textContent = health.status === "ok" ? `queue: ${health.queue_length}` : health.status;
  } catch (e) { $("server-status").textContent = "server unreachable"; }
}

$("form").addEventListener("submit", generate);
$("recipe").addEventListener("change", showRecipe);
$("randomize").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
$("image-file").addEventListener("change", (e) => { if (e.target.files.length) loadImage(e.target.files[0]); });
$("clear-mask").addEventListener("click", clearMask);
$("remove-image").addEventListener("click", () => { source = null; $("image-file").value = ""; $("editor").hidden = true; });
$("control-file").addEventListener("change", (e) => { if (e.target.files.length) loadControl(e.target.files[0]); });
$("remove-control").addEventListener("click", () => { control = null; $("control-file").value = ""; $("control-editor").hidden = true; });
$("controlnet").addEventListener("change", setControlScale);
$("control-scale").addEventListener("input", () => { $("control-scale-value").textContent = Number($("control-scale").value).toFixed(2); });
$("strength").addEventListener("input", () => { strengthTouched = true; $("strength-value").textContent = Number($("strength").value).toFixed(2); });
$("api-key").addEventListener("change", () => { if (!config) loadConfig(); });
setupBrush();
loadConfig();
refreshStatus();
setInterval(refreshStatus, 5000);
