// vlserve playground: upload images, chat over the public API, show the stage timings.
// Plain ES module, no dependencies. Everything the model sees goes through the same
// routes as any client: POST /files, POST /chat/completions (SSE), GET /models, GET /health.

// The app root, from this file's own URL (…/playground/static/app.js): works behind a prefix.
const ROOT = new URL("../../", import.meta.url);
const API = new URL("api/v1/", ROOT);

// Stages that run one after another (they add up to about `total`), in order, with short
// labels (the image stages are told apart by colour; tooltips give the full names).
const STAGES = [
  ["queue", "queue"],
  ["image_decode", "decode"],
  ["image_resize", "resize"],
  ["image_encode", "encode"],
  ["prompt_eval", "prompt eval"],
  ["generation", "generation"],
];

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), statusText: $("status-text"), messages: $("messages"), empty: $("empty"),
  system: $("system"), schema: $("schema"), tools: $("tools"), toolRequired: $("tool-required"),
  maxTokens: $("max-tokens"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), apiKey: $("api-key"), newChat: $("new-chat"),
  composer: $("composer"), attachments: $("attachments"), notice: $("notice"),
  fileInput: $("file-input"), prompt: $("prompt"), send: $("send"), overlay: $("drop-overlay"),
};

let history = [];       // the conversation so far, re-sent in full each turn
let session = newSession();  // X-Session-ID: keeps a conversation on one replica's cache
let pending = [];       // images added for the next question: {file, url, id, upload, chip}
let modelId = null;     // from GET /models; the server answers any name anyway
let textOnly = false;   // the model has no vision projector: images would be refused
let streaming = null;   // AbortController of the answer being streamed

// ---------- HTTP ----------

function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = ui.apiKey.value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return fetch(new URL(path, API), { ...init, headers });
}

// A random id per conversation. Behind a router (vlserve cluster) the header keeps every
// turn on the replica that holds the conversation's KV prefix and image embeddings.
// getRandomValues, not randomUUID: the latter needs a secure context (https or localhost).
function newSession() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "playground-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

class ApiError extends Error {}

// Turn an error response (OpenAI error JSON, or anything else) into one readable sentence.
async function apiError(response) {
  let detail = response.statusText || "request failed";
  try {
    const body = await response.json();
    detail = body?.error?.message || body?.detail || detail;
  } catch { /* not JSON: keep the status text */ }
  let message = `Error ${response.status}: ${detail}`;
  if (response.status === 401) {
    message = ui.apiKey.value.trim()
      ? `The server rejected the API key (401: ${detail}). Check the API key field.`
      : `This server requires an API key (401: ${detail}). Enter it in the API key field.`;
  } else if (response.status === 429) {
    message = `The server is busy (429: ${detail}). Try again in a moment.`;
  } else if (response.status === 503) {
    message = `The model is not ready yet (503: ${detail}).`;
  }
  return new ApiError(message);
}

function readable(err) {
  if (err instanceof ApiError) return err.message;
  if (err instanceof TypeError) return "Cannot reach the server (network error). Is it running?";
  return String(err?.message || err);
}

// ---------- status line ----------

// Where the model really runs, as llama.cpp reported it at load (meta.placement).
function placementParts(p, textOnly) {
  if (!p) return [];
  const llm = p.llm_device === "CPU" ? "CPU"
    : `${p.llm_device} (${p.gpu_layers}/${p.offloadable_layers} layers)`;
  const vision = textOnly ? "text only" : `vision on ${p.projector_device || "?"}`;
  const parts = [`LLM on ${llm}`, vision];
  if (p.flash_attn) parts.push(`flash attn ${p.flash_attn === "enabled" ? "on" : "off"}`);
  if (p.kv_type_k) parts.push(`KV ${p.kv_type_k}`);
  return parts;
}

// Batches still running (this key's): "batch 120/200", counted from request_counts.
const BATCH_LIVE = ["validating", "in_progress", "finalizing", "cancelling"];
async function batchPart() {
  try {
    const response = await api("batches?limit=100");
    if (!response.ok) return null;
    const live = (await response.json()).data.filter((b) => BATCH_LIVE.includes(b.status));
    if (!live.length) return null;
    const sum = (f) => live.reduce((n, b) => n + f(b.request_counts), 0);
    const done = sum((c) => c.completed + c.failed);
    const label = live.length === 1 ? "batch" : `${live.length} batches`;
    return `${label} ${done}/${sum((c) => c.total)}`;
  } catch { return null; }
}

async function refreshStatus() {
  let health = "unreachable";
  try {
    const response = await fetch(new URL("health", ROOT));
    health = `HTTP ${response.status}`;  // e.g. a proxy's error page
    health = (await response.json()).status || health;
  } catch { /* keeps what it had */ }

  let model = null;
  let modelNote = "";
  try {
    const response = await api("models");
    if (response.ok) model = (await response.json()).data[0];
    else if (response.status === 401) modelNote = "API key required for model info";
  } catch { /* the health state says enough */ }

  const state = { ok: "ready", loading: "warming up" }[health] || health;
  const parts = [state];
  if (model) {
    modelId = model.id;
    const meta = model.meta || {};
    textOnly = meta.vision === false;
    parts.push(model.id, ...placementParts(meta.placement, textOnly));
    if (meta.n_ctx) parts.push(`context ${meta.n_ctx}`);
    const warnings = meta.placement_warnings || [];
    ui.statusText.title = warnings.join("\n");  // each warning names its fix, on hover
    if (warnings.length) parts.push(`⚠ ${warnings.length} placement warning(s)`);
  } else if (modelNote) {
    parts.push(modelNote);
  }
  const batches = health === "ok" ? await batchPart() : null;
  if (batches) parts.push(batches);
  ui.status.dataset.state = health === "ok" ? "ready" : health === "loading" ? "warming" : "down";
  ui.statusText.textContent = parts.join(" · ");
  clearTimeout(refreshStatus.timer);
  // Sooner while a batch runs, so its count moves.
  refreshStatus.timer = setTimeout(refreshStatus, health === "ok" && !batches ? 15000 : 2000);
}

// ---------- uploads ----------

function addImages(files) {
  if (textOnly && files.length) {
    showNotice("This model reads text only (it has no vision projector): images are not sent.");
    return;
  }
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showNotice(`${file.name}: not an image, skipped.`);
      continue;
    }
    const item = { file, url: URL.createObjectURL(file), id: null, chip: null };
    item.chip = attachmentChip(item);
    item.upload = uploadImage(item);
    item.upload.catch((err) => {
      // Once sent, the answer shows the error instead.
      if (!pending.includes(item)) return;
      showNotice(`${file.name}: ${readable(err)}`);
      removePending(item);
    });
    pending.push(item);
  }
}

async function uploadImage(item) {
  const form = new FormData();
  form.append("purpose", "vision");
  form.append("file", item.file, item.file.name || "image");
  const response = await api("files", { method: "POST", body: form });
  if (!response.ok) throw await apiError(response);
  const uploaded = await response.json();
  item.id = uploaded.id;
  setChipState(item, uploaded.status === "processed" ? "encoded" : "uploaded");
  if (uploaded.status !== "processed") pollEncoded(item);
  return uploaded.id;
}

// "processed" means the vision encoder has run: the question will skip it.
async function pollEncoded(item, deadline = Date.now() + 60000) {
  while (Date.now() < deadline && item.chip.isConnected) {
    await sleep(250);
    try {
      const response = await api(`files/${item.id}`);
      if (!response.ok) return;
      if ((await response.json()).status === "processed") {
        setChipState(item, "encoded");
        return;
      }
    } catch {
      return;
    }
  }
}

function attachmentChip(item) {
  const chip = el("div", "chip");
  const img = el("img");
  img.src = item.url;
  img.alt = item.file.name;
  const label = el("span", "chip-state");
  const remove = el("button", "chip-remove", "×");
  remove.type = "button";
  remove.title = "Remove";
  remove.addEventListener("click", () => removePending(item));
  chip.append(img, label, remove);
  chip.title = item.file.name;
  ui.attachments.append(chip);
  item.chip = chip;
  setChipState(item, item.state || "uploading");
  return chip;
}

function setChipState(item, state) {
  item.state = item.chip.dataset.state = state;
  item.chip.querySelector(".chip-state").textContent =
    { uploading: "uploading…", uploaded: "uploaded", encoded: "encoded" }[state];
}

function removePending(item) {
  pending = pending.filter((p) => p !== item);
  item.chip.remove();
}

// ---------- chat ----------

async function sendQuestion() {
  const text = ui.prompt.value.trim();
  if (streaming || (!text && !pending.length)) return;
  const images = pending;
  pending = [];
  ui.attachments.replaceChildren();
  ui.prompt.value = "";
  hideNotice();

  addUserMessage(text, images);
  const answer = addAssistantMessage();
  const conversation = history;  // "New chat" mid-answer must not get this turn
  const sessionId = session;
  streaming = new AbortController();
  setBusy(true);
  try {
    // Usually long done: the upload started when the image was added.
    const ids = await Promise.all(images.map((image) => image.upload));
    const parts = ids.map((id) => ({ type: "file", file: { file_id: id } }));
    if (text) parts.unshift({ type: "text", text });
    const user = { role: "user", content: ids.length ? parts : text };
    const reply = await streamAnswer([...systemMessages(), ...conversation, user], answer,
                                     sessionId);
    conversation.push(user, reply);
  } catch (err) {
    answer.body.classList.remove("pending");
    if (err.name === "AbortError") {
      answer.text.textContent = "(stopped)";
    } else {
      answer.body.classList.add("error");
      answer.text.textContent = readable(err);
      restore(text, images);
    }
  } finally {
    streaming = null;
    setBusy(false);
    ui.prompt.focus();
  }
}

// A failed turn is not in the history: put it back in the composer, so "Send" retries.
function restore(text, images) {
  ui.prompt.value ||= text;
  for (const image of images) {
    if (!image.id) continue;
    attachmentChip(image);
    pending.push(image);
  }
}

function systemMessages() {
  const system = ui.system.value.trim();
  return system ? [{ role: "system", content: system }] : [];
}

// The JSON boxes: null when empty; the server enforces them (or says why it can't).
function jsonBox(box, what) {
  const text = box.value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ApiError(`The ${what} is not valid JSON: ${err.message}`);
  }
}

async function streamAnswer(messages, answer, sessionId) {
  const body = {
    model: modelId || "default",
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(ui.temperature.value),
  };
  if (ui.maxTokens.value) body.max_tokens = Number(ui.maxTokens.value);
  const schema = jsonBox(ui.schema, "answer format");
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
  const tools = jsonBox(ui.tools, "tool list");
  if (tools) {
    body.tools = tools;
    body.tool_choice = ui.toolRequired.checked ? "required" : "auto";
  }
  const response = await api("chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Session-ID": sessionId },
    body: JSON.stringify(body),
    signal: streaming.signal,
  });
  if (!response.ok) throw await apiError(response);

  let reply = "";
  let thinking = "";  // a thinking model's reasoning: shown above the answer, never sent back
  const calls = [];  // by index: {id, name, arguments}, as the stream's tool_calls pieces build them
  let timings = null;
  let finish = null;
  try {
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(`The server stopped the answer: ${chunk.error.message}`);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.reasoning_content) {
        thinking += choice.delta.reasoning_content;
        answer.thinking ||= answer.body.insertBefore(el("div", "thinking"), answer.text);
        answer.thinking.textContent = thinking;
        scrollDown();
      }
      if (choice?.delta?.content) {
        reply += choice.delta.content;
        answer.text.textContent = reply;
        scrollDown();
      }
      for (const piece of choice?.delta?.tool_calls || []) {
        const call = (calls[piece.index] ||= { id: piece.id, name: piece.function?.name, arguments: "" });
        call.arguments += piece.function?.arguments || "";
        showCalls(answer, calls);
      }
      finish = choice?.finish_reason || finish;
      timings = chunk.timings || timings;
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
    answer.body.append(el("div", "note", "stopped"));  // keep what came, in the history too
  }
  answer.body.classList.remove("pending");
  if (!reply && !calls.length) answer.text.textContent = thinking ? "" : "(empty answer)";
  if (timings) answer.body.append(timingView(timings, finish));
  scrollDown();
  const message = { role: "assistant", content: reply || (calls.length ? null : "") };
  if (calls.length) {
    message.tool_calls = calls.map((c) => ({ id: c.id, type: "function",
                                             function: { name: c.name, arguments: c.arguments } }));
  }
  return message;
}

// Tool calls as calls: one line each, name(arguments), under the answer's text.
function showCalls(answer, calls) {
  answer.calls ||= answer.body.appendChild(el("div", "calls"));
  answer.calls.replaceChildren(...calls.map((c) => el("div", "call", `${c.name}(${c.arguments})`)));
  scrollDown();
}

// The `data:` payloads of a server-sent-events response, one string per event.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

// ---------- rendering ----------

function addUserMessage(text, images) {
  const { body } = addMessage("user");
  if (images.length) {
    const thumbs = el("div", "thumbs");
    for (const image of images) {
      const img = el("img");
      img.src = image.url;
      img.alt = image.file.name;
      thumbs.append(img);
    }
    body.append(thumbs);
  }
  if (text) body.append(el("div", "text", text));
}

function addAssistantMessage() {
  const { body } = addMessage("assistant");
  body.classList.add("pending");
  const text = el("div", "text");
  body.append(text);
  return { body, text };
}

function addMessage(role) {
  const row = el("div", `msg ${role}`);
  const body = el("div", "bubble");
  row.append(el("div", "role", role === "user" ? "You" : "Model"), body);
  ui.messages.append(row);
  updateEmpty();
  scrollDown();
  return { row, body };
}

// The per-stage bar: sequential stages as proportional segments, TTFT as a marker.
function timingView(t, finish) {
  const view = el("div", "timing");
  const track = el("div", "track");  // the bar, and the TTFT marker sticking out of it
  const bar = el("div", "bar");
  track.append(bar);
  const spent = STAGES.reduce((sum, [key]) => sum + (t[key] || 0), 0);
  const scale = Math.max(spent, t.total || 0) || 1;
  const legend = el("div", "legend");
  for (const [key, label] of STAGES) {
    const ms = t[key] || 0;
    const imageStage = key.startsWith("image_");
    // A skipped image stage is news (decoded at upload, embedding cached): list it at 0.
    if (ms <= 0 && !(imageStage && t.image_tokens)) continue;
    const name = key.replace("_", " ");
    const entry = el("span", ms > 0 ? "key" : "key zero");
    entry.append(el("i", `swatch s-${key}`), `${label} ${formatMs(ms)}`);
    entry.title = name;
    legend.append(entry);
    if (ms <= 0) continue;
    const share = (100 * ms) / scale;
    const seg = el("span", `seg s-${key}`, share >= 16 ? label : "");
    seg.style.width = `${share}%`;
    seg.title = `${name}: ${formatMs(ms)} (${Math.round(share)}% of total)`;
    bar.append(seg);
  }
  // What no stage covers (hand-offs between threads, HTTP): the bar's empty tail.
  const rest = (t.total || 0) - spent;
  if (rest > 0.05 * scale) {
    const entry = el("span", "key");
    entry.title = "time between the measured stages: thread hand-offs, event loop, HTTP";
    entry.append(el("i", "swatch s-other"), `other ${formatMs(rest)}`);
    legend.append(entry);
  }
  if (t.first_token > 0) {
    const mark = el("span", "ttft");
    mark.style.left = `${Math.min(100, (100 * t.first_token) / scale)}%`;
    mark.title = `first token after ${formatMs(t.first_token)}`;
    track.append(mark);
  }

  const stats = el("div", "stats");
  const stat = (name, text) => stats.appendChild(el("span", `stat stat-${name}`, text));
  stat("ttft", `TTFT ${formatMs(t.first_token)}`).prepend(el("i", "swatch s-ttft"));
  stat("tokens", `${t.completion_tokens} tokens`);
  const speed = t.tokens_per_second || 0;
  stat("speed", `${speed.toFixed(speed < 100 ? 1 : 0)} tok/s`);
  const image = t.image_tokens ? `${t.image_tokens} image, ` : "";
  stat("cached", `prompt ${t.prompt_tokens} tokens (${image}${t.cached_tokens} cached)`);
  const hits = t.image_cache_hits;
  if (hits) {
    stat("hits", `${hits} image${hits > 1 ? "s" : ""} from cache`).title =
      "embedding reused, not encoded again: pre-encoded at upload, or by an earlier turn";
  }
  stat("total", `total ${formatMs(t.total)}`);
  if (finish === "length") stat("length", "hit max tokens");
  view.append(track, legend, stats);
  return view;
}

function formatMs(ms) {
  if (!ms) return "0 ms";
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  return `${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;  // never innerHTML: model output is untrusted text
  return node;
}

function updateEmpty() {
  ui.empty.hidden = ui.messages.children.length > 1;
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function setBusy(busy) {
  ui.send.textContent = busy ? "Stop" : "Send";
  ui.send.classList.toggle("stop", busy);
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------- wiring ----------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (streaming) streaming.abort();
  else sendQuestion();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.fileInput.addEventListener("change", () => {
  addImages([...ui.fileInput.files]);
  ui.fileInput.value = "";  // picking the same file again still fires "change"
});
ui.prompt.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])];
  if (files.length) addImages(files);
});
ui.temperature.addEventListener("input", () => {
  ui.temperatureValue.textContent = ui.temperature.value;
});
ui.apiKey.addEventListener("change", () => {
  sessionStorage.setItem("vlserve-api-key", ui.apiKey.value.trim());  // this tab only
  refreshStatus();
});
ui.newChat.addEventListener("click", () => {
  if (streaming) streaming.abort();
  history = [];
  session = newSession();
  ui.messages.replaceChildren(ui.empty);
  hideNotice();
  updateEmpty();
  ui.prompt.focus();
});

// Drop anywhere on the page; the overlay covers it while something is dragged over.
const dragsFiles = (event) => event.dataTransfer?.types.includes("Files");
window.addEventListener("dragenter", (event) => {
  if (dragsFiles(event)) ui.overlay.hidden = false;
});
window.addEventListener("dragover", (event) => event.preventDefault());
ui.overlay.addEventListener("dragleave", () => { ui.overlay.hidden = true; });
window.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.overlay.hidden = true;
  addImages([...(event.dataTransfer?.files || [])]);
});

ui.apiKey.value = sessionStorage.getItem("vlserve-api-key") || "";
refreshStatus();
