// sd-onnx web page: drives the server's A1111 API (/sdapi/v1) with plain fetch calls; no build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
// what the page has seen, for whoever drives it (the browser test reads it)
window.sdOnnx = { progressSeen: 0, previewSeen: 0, results: 0, mode: "txt2img", busy: false };

function say(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch("/sdapi/v1/" + path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && (data.detail || data.errors) ? (data.detail || data.errors) : response.statusText;
    throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return data;
}

async function loadLists() {
  const [models, samplers, options] = await Promise.all([api("GET", "sd-models"), api("GET", "samplers"),
                                                         api("GET", "options")]);
  const modelSelect = $("model");
  modelSelect.replaceChildren(...models.map((m) => new Option(m.title, m.title)));
  modelSelect.value = options.sd_model_checkpoint;
  const samplerSelect = $("sampler_name");
  samplerSelect.replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  samplerSelect.value = "Euler a";
  say("ready");
}

function number(id) {
  return Number($(id).value);
}

function readFileAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function pollProgress() {
  try {
    const p = await api("GET", "progress");
    if (!window.sdOnnx.busy) return;
    if (p.state && p.state.job) {
      window.sdOnnx.progressSeen += 1;
      $("progress").value = p.progress;
      const step = p.state.sampling_steps ? ` step ${p.state.sampling_step}/${p.state.sampling_steps}` : "";
      $("progress-text").textContent = `${Math.round(p.progress * 100)}%${step}, ETA ${p.eta_relative.toFixed(1)} s`;
      if (p.current_image) {
        $("live").src = "data:image/png;base64," + p.current_image;
        $("live").hidden = false;
        window.sdOnnx.previewSeen += 1;
      }
    } else if (p.state && p.state.queue_pending) {
      $("progress-text").textContent = `waiting: ${p.state.queue_pending} job(s) in the queue`;
    }
  } catch (e) {
    say("progress: " + e.message, true);
  }
}

function addResults(result) {
  const info = JSON.parse(result.info);
  const gallery = $("gallery");
  result.images.forEach((b64, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = info.infotexts[i] || "";
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[i] || "";
    figure.append(img, caption);
    gallery.prepend(figure);
    window.sdOnnx.results += 1;
  });
  if (info.notes && info.notes.length) say(info.notes.join("; "));
}

async function generate(event) {
  event.preventDefault();
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler_name: $("sampler_name").value,
    steps: number("steps"), cfg_scale: number("cfg_scale"), seed: number("seed"), width: number("width"),
    height: number("height"), batch_size: number("batch_size"), n_iter: number("n_iter"),
  };
  let path = "txt2img";
  if (window.sdOnnx.mode === "img2img") {
    const file = $("init_image").files[0];
    if (!file) { say("choose an init image first", true); return; }
    body.init_images = [await readFileAsBase64(file)];
    body.denoising_strength = number("denoising_strength");
    path = "img2img";
  }
  window.sdOnnx.busy = true;
  $("generate").disabled = true;
  $("progress").value = 0;
  $("progress-text").textContent = "starting";
  say("generating");
  const timer = setInterval(pollProgress, 250);
  try {
    const result = await api("POST", path, body);
    addResults(result);
    $("progress").value = 1;
    $("progress-text").textContent = "done";
    say("done");
  } catch (e) {
    say(e.message, true);
    $("progress-text").textContent = "";
  } finally {
    clearInterval(timer);
    window.sdOnnx.busy = false;
    $("generate").disabled = false;
  }
}

async function showPngInfo(file) {
  try {
    const result = await api("POST", "png-info", { image: await readFileAsBase64(file) });
    $("png_text").textContent = result.info || "(no generation parameters in this image)";
    $("send_to_txt2img").hidden = !result.info;
    window.sdOnnx.pngInfo = result;
  } catch (e) {
    say(e.message, true);
  }
}

function sendToTxt2img() {
  const p = (window.sdOnnx.pngInfo || {}).parameters || {};
  const set = (id, value) => { if (value !== undefined) $(id).value = value; };
  set("prompt", p.Prompt);
  set("negative_prompt", p["Negative prompt"]);
  set("steps", p.Steps);
  set("cfg_scale", p["CFG scale"]);
  set("seed", p.Seed);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  if (p.Sampler && [...$("sampler_name").options].some((o) => o.value === p.Sampler)) set("sampler_name", p.Sampler);
  selectTab("txt2img");
}

function selectTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  $("generate-panel").hidden = name === "pnginfo";
  $("pnginfo-panel").hidden = name !== "pnginfo";
  $("init").hidden = name !== "img2img";
  if (name !== "pnginfo") window.sdOnnx.mode = name;
}

function setUp() {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => selectTab(t.dataset.tab)));
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", () => api("POST", "interrupt").catch((e) => say(e.message, true)));
  $("skip").addEventListener("click", () => api("POST", "skip").catch((e) => say(e.message, true)));
  $("model").addEventListener("change", async () => {
    say("loading " + $("model").value);
    try {
      await api("POST", "options", { sd_model_checkpoint: $("model").value });
      say("model: " + $("model").value);
    } catch (e) {
      say(e.message, true);
    }
  });
  $("init_image").addEventListener("change", async () => {
    const file = $("init_image").files[0];
    if (file) $("init_preview").src = await readFileAsBase64(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) showPngInfo(e.dataTransfer.files[0]);
  });
  $("png_file").addEventListener("change", () => { if ($("png_file").files[0]) showPngInfo($("png_file").files[0]); });
  $("send_to_txt2img").addEventListener("click", sendToTxt2img);
  loadLists().catch((e) => say(e.message, true));
}

setUp();
