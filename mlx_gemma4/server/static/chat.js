// The chat page: keeps the conversation, streams answers from the same-origin
// /v1/chat/completions (server-sent events), attaches images as data URLs.
"use strict";

const MAX_IMAGE_SIDE = 2048; // larger images are scaled down here before they are sent
const MAX_IMAGE_BYTES = 4 * 1024 * 1024; // and so are bigger files

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  thinking: $("thinking"),
  settingsButton: $("settings-button"),
  settings: $("settings"),
  newChat: $("new-chat"),
  system: $("system"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  log: $("log"),
  empty: $("empty"),
  composer: $("composer"),
  attachments: $("attachments"),
  imageInput: $("image-input"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  dropZone: $("drop-zone"),
};

const state = {
  messages: [], // the conversation sent with every turn (thoughts are not sent back)
  attachments: [], // {name, url}: images waiting for the next message
  controller: null, // the AbortController of the request in flight
  model: null, // the id /v1/models names
};

// ------------------------------------------------------------------ settings that persist

// Page settings live in localStorage, the API key only for this tab (sessionStorage).
const remembered = [
  [ui.thinking, localStorage, "gemma4.thinking", "checked"],
  [ui.system, localStorage, "gemma4.system", "value"],
  [ui.temperature, localStorage, "gemma4.temperature", "value"],
  [ui.maxTokens, localStorage, "gemma4.maxTokens", "value"],
  [ui.apiKey, sessionStorage, "gemma4.apiKey", "value"],
];

function restoreSettings() {
  for (const [element, storage, key, property] of remembered) {
    try {
      const saved = storage.getItem(key);
      if (saved !== null) element[property] = property === "checked" ? saved === "1" : saved;
    } catch (_) {
      // storage can be unavailable (private windows, file URLs): settings just do not persist
    }
    element.addEventListener("change", () => {
      try {
        const value = element[property];
        storage.setItem(key, property === "checked" ? (value ? "1" : "0") : value);
      } catch (_) {
        // see above
      }
    });
  }
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function optionalNumber(input) {
  const text = input.value.trim();
  if (text === "") return undefined;
  const number = Number(text);
  if (!Number.isFinite(number)) throw new Error(`${input.labels[0].firstChild.textContent.trim()} must be a number`);
  return number;
}

// ------------------------------------------------------------------ the conversation view

function addMessage(role) {
  ui.empty.hidden = true;
  const message = document.createElement("article");
  message.className = `message ${role}`;
  message.setAttribute("aria-label", role === "user" ? "You" : "Gemma");
  ui.log.append(message);
  return message;
}

function addPart(parent, tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  parent.append(element);
  return element;
}

function showUserMessage(text, images) {
  const message = addMessage("user");
  if (images.length) {
    const strip = addPart(message, "div", "images");
    for (const image of images) {
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      strip.append(img);
    }
  }
  if (text) addPart(message, "div", "bubble", text);
  return message;
}

function showError(parent, text) {
  const error = addPart(parent, "div", "error", text);
  error.setAttribute("role", "alert");
  return error;
}

function nearBottom() {
  return ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 80;
}

function scrollDown(wasNearBottom) {
  if (wasNearBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

// One assistant answer as it streams in: thoughts in a collapsed <details>, then the text.
class AnswerView {
  constructor() {
    this.message = addMessage("assistant");
    this.message.dataset.state = "streaming";
    this.message.setAttribute("aria-busy", "true");
    this.bubble = addPart(this.message, "div", "bubble");
    this.thoughts = null;
    this.text = "";
    this.thought = "";
    this.pending = null; // the animation frame that will render the text
  }

  addThought(delta) {
    if (!this.thoughts) {
      this.thoughts = document.createElement("details");
      this.thoughts.className = "thoughts";
      this.summary = addPart(this.thoughts, "summary", "", "Thinking\u2026");
      this.thoughtText = addPart(this.thoughts, "div", "thoughts-text");
      this.message.insertBefore(this.thoughts, this.bubble);
    }
    this.thought += delta;
    this.thoughtText.append(delta);
  }

  addText(delta) {
    this.text += delta;
    // Markdown is rendered again from the whole text, at most once a frame
    this.pending ??= requestAnimationFrame(() => this.render());
  }

  render() {
    if (this.pending) cancelAnimationFrame(this.pending);
    this.pending = null;
    const follow = nearBottom();
    this.bubble.replaceChildren(renderMarkdown(this.text));
    scrollDown(follow);
  }

  finish(state, note) {
    this.render();
    this.message.dataset.state = state;
    this.message.removeAttribute("aria-busy");
    if (this.thoughts) this.summary.textContent = "Thoughts";
    if (!this.text) this.bubble.remove();
    if (note) addPart(this.message, "div", "meta", note);
  }
}

// ------------------------------------------------------------------ server-sent events

// Yields {event, data} for each event of a text/event-stream response body.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  function* lines(final) {
    // "\r\n" may arrive split across reads: hold back a trailing "\r" until more comes
    const cut = !final && buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const parts = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = (final ? "" : parts.pop()) + buffer.slice(cut);
    yield* parts;
  }
  function* dispatch(line) {
    if (line === "") {
      if (data.length) yield { event, data: data.join("\n") };
      event = "message";
      data = [];
    } else if (line.startsWith("data:")) {
      data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    } else if (line.startsWith("event:")) {
      event = line.slice(6).trim();
    } // comments (":") and id / retry fields mean nothing to a chat
  }
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    for (const line of lines(false)) yield* dispatch(line);
  }
  for (const line of lines(true)) yield* dispatch(line);
  yield* dispatch("");
}

async function errorText(response) {
  let detail = "";
  try {
    const body = await response.text();
    try {
      const parsed = JSON.parse(body);
      detail = parsed?.error?.message ?? parsed?.detail ?? body;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
    } catch (_) {
      detail = body;
    }
  } catch (_) {
    // no body
  }
  const status = `${response.status} ${response.statusText}`.trim();
  const hint = response.status === 401 ? " Enter the server's API key in Settings." : "";
  return `${status}${detail ? `: ${detail}` : ""}${hint}`;
}

// ------------------------------------------------------------------ sending a message

function requestBody(conversation) {
  const body = {
    model: state.model ?? "default",
    messages: [...conversation],
    stream: true,
    stream_options: { include_usage: true },
  };
  const system = ui.system.value.trim();
  if (system) body.messages.unshift({ role: "system", content: system });
  const temperature = optionalNumber(ui.temperature);
  const maxTokens = optionalNumber(ui.maxTokens);
  if (temperature !== undefined) body.temperature = temperature;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (ui.thinking.checked) body.chat_template_kwargs = { enable_thinking: true };
  return body;
}

function userContent(text, images) {
  if (!images.length) return text;
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text) parts.push({ type: "text", text });
  return parts;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.composer.setAttribute("aria-busy", busy ? "true" : "false");
}

function statsNote(finishReason, usage, seconds) {
  const notes = [];
  if (finishReason === "length") notes.push("stopped at the token limit");
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens;
    notes.push(`${usage.prompt_tokens} prompt tokens${cached ? ` (${cached} cached)` : ""}`);
    notes.push(`${usage.completion_tokens} generated`);
    if (seconds > 0 && usage.completion_tokens > 1) {
      notes.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    }
  }
  return notes.join(" \u00b7 ");
}

async function send() {
  const text = ui.prompt.value.trim();
  const images = state.attachments;
  if (state.controller || (!text && !images.length)) return;

  // "New chat" replaces state.messages: this turn finishes in the conversation it began in
  const conversation = state.messages;
  const userMessage = { role: "user", content: userContent(text, images) };
  const leave = () => conversation.splice(conversation.indexOf(userMessage), 1);
  conversation.push(userMessage);
  let body;
  try {
    body = requestBody(conversation);
  } catch (error) {
    leave();
    showError(addMessage("assistant"), error.message);
    return;
  }
  const shownUser = showUserMessage(text, images);
  ui.prompt.value = "";
  resizePrompt();
  setAttachments([]);

  const answer = new AnswerView();
  scrollDown(true);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  let finishReason = null;
  let usage = null;
  let started = null;
  let response = null;
  try {
    response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const { event, data } of serverSentEvents(response.body)) {
      if (data === "[DONE]") break;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        throw new Error(`The server sent something that is not JSON: ${data.slice(0, 200)}`);
      }
      if (event === "error" || chunk.error) {
        throw new Error(chunk.error?.message ?? chunk.message ?? data);
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const follow = nearBottom();
      const delta = choice.delta ?? {};
      if (delta.reasoning_content) answer.addThought(delta.reasoning_content);
      if (delta.content) {
        started ??= performance.now();
        answer.addText(delta.content);
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
      scrollDown(follow);
    }
    const seconds = started === null ? 0 : (performance.now() - started) / 1000;
    answer.finish("done", statsNote(finishReason, usage, seconds));
    conversation.push({ role: "assistant", content: answer.text });
  } catch (error) {
    if (controller.signal.aborted) {
      answer.finish("stopped", "stopped");
      if (answer.text) conversation.push({ role: "assistant", content: answer.text });
      else leave(); // nothing came back: the question is not part of the chat
    } else {
      answer.finish("error");
      let message = error.message;
      if (error instanceof TypeError && response === null) {
        message = `Cannot reach the server (${message}).`; // fetch's network failure
      }
      showError(answer.message, message);
      if (answer.text) {
        conversation.push({ role: "assistant", content: answer.text });
      } else {
        // the turn failed: it leaves the conversation, and what was typed goes back to the box
        leave();
        shownUser.classList.add("failed");
        if (!ui.prompt.value && !state.attachments.length) {
          ui.prompt.value = text;
          resizePrompt();
          setAttachments(images);
        }
      }
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    scrollDown(nearBottom());
  }
}

function stop() {
  state.controller?.abort();
}

function newChat() {
  stop();
  state.messages = [];
  for (const message of ui.log.querySelectorAll(".message")) message.remove();
  ui.empty.hidden = false;
  ui.prompt.focus();
}

// ------------------------------------------------------------------ images

function setAttachments(images) {
  state.attachments = images;
  ui.attachments.replaceChildren(
    ...images.map((image, index) => {
      const item = document.createElement("li");
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "\u00d7";
      remove.setAttribute("aria-label", `Remove ${image.name}`);
      remove.addEventListener("click", () => {
        setAttachments(state.attachments.filter((_, i) => i !== index));
        ui.prompt.focus();
      });
      item.append(img, remove);
      return item;
    }),
  );
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`Cannot read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// Phone photos can be tens of megabytes: scale big ones down (the model sees a few hundred
// soft tokens per image anyway) onto white, which is also what transparency becomes.
async function shrunk(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return canvas.toDataURL("image/jpeg", 0.9);
}

async function imageURL(file) {
  if (file.size <= MAX_IMAGE_BYTES) {
    const url = await readAsDataURL(file);
    const size = await new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(Math.max(img.naturalWidth, img.naturalHeight));
      img.onerror = () => reject(new Error(`${file.name} is not an image this browser can read.`));
      img.src = url;
    });
    if (size <= MAX_IMAGE_SIDE) return url;
  }
  return shrunk(file);
}

async function attach(files) {
  const added = [];
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError(addMessage("assistant"), `${file.name} is not an image: only images can be attached.`);
      continue;
    }
    try {
      added.push({ name: file.name || "pasted image", url: await imageURL(file) });
    } catch (error) {
      showError(addMessage("assistant"), error.message);
    }
  }
  if (added.length) setAttachments([...state.attachments, ...added]);
}

function hasFiles(event) {
  return [...(event.dataTransfer?.types ?? [])].includes("Files");
}

function watchDrops() {
  let depth = 0; // dragenter / dragleave fire for every child crossed
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth += 1;
    ui.dropZone.hidden = false;
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) ui.dropZone.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    ui.dropZone.hidden = true;
    attach([...event.dataTransfer.files]);
    ui.prompt.focus();
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.length) {
      event.preventDefault();
      attach(files);
    }
  });
}

// ------------------------------------------------------------------ the model name

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) {
      ui.model.textContent = response.status === 401 ? "(API key needed: see Settings)" : "";
      return;
    }
    const models = (await response.json()).data ?? [];
    state.model = models[0]?.id ?? null;
    const name = state.model ? state.model.split("/").filter(Boolean).pop() : "";
    ui.model.textContent = name;
    ui.model.title = state.model ?? "";
  } catch (_) {
    ui.model.textContent = "(server unreachable)";
  }
}

// ------------------------------------------------------------------ wiring

function resizePrompt() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight + 2}px`;
}

function toggleSettings() {
  const open = ui.settings.hidden;
  ui.settings.hidden = !open;
  ui.settingsButton.setAttribute("aria-expanded", String(open));
  if (open) ui.system.focus();
}

function main() {
  restoreSettings();
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.controller) {
      stop();
    }
  });
  ui.prompt.addEventListener("input", resizePrompt);
  ui.stop.addEventListener("click", () => {
    stop();
    ui.prompt.focus();
  });
  ui.newChat.addEventListener("click", newChat);
  ui.settingsButton.addEventListener("click", toggleSettings);
  ui.apiKey.addEventListener("change", loadModel);
  ui.imageInput.addEventListener("change", async () => {
    await attach([...ui.imageInput.files]);
    ui.imageInput.value = "";
    ui.prompt.focus();
  });
  watchDrops();
  loadModel();
  ui.prompt.focus();
}

main();
