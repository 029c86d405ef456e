// The edge-ssd chat page: plain JavaScript, no dependencies, no build step.
// It talks to the same OpenAI-compatible endpoints as any client: POST /v1/chat/completions
// with "stream": true, read as server-sent events from fetch's ReadableStream (EventSource
// cannot POST, and cannot send the Authorization header).
"use strict";

const KEY_STORE = "edge-ssd-api-key";         // sessionStorage: forgotten when the tab closes
const SETTINGS_STORE = "edge-ssd-settings";   // localStorage: what the user chose last time
const SETTINGS = ["temperature", "max_tokens", "mode", "drafter", "show_sources"];
const SOURCE_NAMES = {model: "accepted from the draft model", ngram: "accepted from an n-gram / lookup draft",
                      target: "the target's own token"};

const $ = (id) => document.getElementById(id);
const state = {messages: [], features: [], model: "edge-ssd", controller: null};

// ---- settings ------------------------------------------------------------------------------

function readSettings() {
  const out = {};
  for (const name of SETTINGS) {
    const el = $(name);
    out[name] = el.type === "checkbox" ? el.checked : el.value.trim();
  }
  return out;
}

function restoreSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}"); } catch (e) { /* start afresh */ }
  for (const name of SETTINGS) {
    if (!(name in saved)) continue;
    const el = $(name);
    if (el.type === "checkbox") el.checked = Boolean(saved[name]); else el.value = saved[name];
  }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(readSettings()));
  document.body.classList.toggle("show-sources", sourcesWanted());
}

function spansSupported() { return state.features.includes("spans"); }
function sourcesWanted() { return spansSupported() && $("show_sources").checked; }

// The request body: only what the user set, so that the server's own defaults (its --temperature,
// --max-new-tokens, --mode, … flags) apply to everything left empty.
function requestBody() {
  const s = readSettings();
  const body = {model: state.model, messages: state.messages, stream: true};
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.max_tokens !== "") body.max_tokens = Number(s.max_tokens);
  if (s.mode) body.mode = s.mode;
  if (s.drafter) body.drafter = s.drafter;
  if (sourcesWanted()) body.show_sources = true;   // only where the server says it can
  return body;
}

// ---- the API key ---------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? {Authorization: "Bearer " + key} : {};
}

// Shows the key dialog; resolves to true when a key was given.
function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = $("key-input").value.trim();
      const ok = dialog.returnValue === "ok" && key !== "";
      if (ok) sessionStorage.setItem(KEY_STORE, key);
      resolve(ok);
    }, {once: true});
    dialog.returnValue = "";   // Escape closes without setting it: do not reuse the last answer
    dialog.showModal();
  });
}

// fetch with the key; on 401 asks for one (again) and retries, until it works or the user cancels.
async function authorizedFetch(url, options = {}) {
  for (;;) {
    const res = await fetch(url, {...options, headers: {...options.headers, ...authHeaders()}});
    if (res.status !== 401) return res;
    const had = Boolean(sessionStorage.getItem(KEY_STORE));
    if (!await askForKey(had ? "That API key was not accepted; try another." : "This server needs an API key.")) {
      return res;
    }
  }
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${res.status} ${res.statusText}`;
}

// ---- the server ----------------------------------------------------------------------------

async function connect() {
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model || state.model;
    state.features = Array.isArray(health.features) ? health.features : [];
    $("model").textContent = state.model;
  } catch (e) {
    setStatus("the server does not answer /health", true);
    return;
  }
  describeSources();
  const res = await authorizedFetch("/v1/models");
  setStatus(res.ok ? "ready" : await errorMessage(res), !res.ok);
}

function describeSources() {
  const box = $("show_sources");
  box.disabled = !spansSupported();
  $("sources-note").textContent = spansSupported() ? ""
    : "This server does not report where tokens came from; replies show as plain text.";
  document.body.classList.toggle("show-sources", sourcesWanted());
}

function setStatus(text, bad = false) {
  const el = $("server-status");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

// ---- server-sent events --------------------------------------------------------------------

// Yields each event's JSON payload; stops at "data: [DONE]" or the end of the stream.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += value.replace(/\r/g, "");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- the transcript ------------------------------------------------------------------------

function addMessage(role) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const text = document.createElement("div");
  text.className = "text";
  el.append(text);
  let stats = null;
  if (role === "assistant") {
    stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = "…";
    el.append(stats);
  }
  $("transcript").append(el);
  return {el, text, stats, content: ""};
}

function scrollDown() {
  const t = $("transcript");
  t.scrollTop = t.scrollHeight;
}

// A piece of the reply: coloured spans when the chunk carries them, plain text otherwise.
// Model text only ever goes in through textContent / text nodes, never as HTML.
function appendPiece(reply, chunk) {
  const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
  const piece = typeof delta.content === "string" ? delta.content : "";
  const spans = Array.isArray(chunk.edge_ssd_spans) ? chunk.edge_ssd_spans : null;
  if (spans) {
    for (const s of spans) {
      const span = document.createElement("span");
      span.className = `src-${String(s.source).replace(/[^a-z]/g, "")}`;
      span.title = SOURCE_NAMES[s.source] || String(s.source);
      span.textContent = s.text;
      reply.text.append(span);
    }
  } else if (piece) {
    reply.text.append(document.createTextNode(piece));
  }
  reply.content += piece;
}

function stat(name, label) {
  const el = document.createElement("span");
  el.className = "stat";
  el.dataset.stat = name;
  el.textContent = label;
  return el;
}

function fixed(x, digits) { return typeof x === "number" ? x.toFixed(digits) : "–"; }

function showStats(reply, st) {
  const drafted = st.drafted > 0;
  reply.stats.replaceChildren(
    stat("tokens_per_s", `${fixed(st.tokens_per_s, 1)} tok/s`),
    stat("acceptance_rate", `acceptance ${drafted ? fixed(st.acceptance_rate, 2) : "–"}`),
    stat("mean_accepted_len", `mean accepted ${drafted ? fixed(st.mean_accepted_len, 2) : "–"}`),
    stat("new_tokens", `${st.new_tokens} tokens`),
    stat("mode", `${st.mode}${st.finish_reason ? ", " + st.finish_reason : ""}`),
  );
  reply.stats.classList.add("done");
}

function showError(reply, message) {
  reply.el.classList.add("error");
  reply.stats.textContent = message;
}

// ---- one turn ------------------------------------------------------------------------------

async function streamReply(reply, controller) {
  const res = await authorizedFetch("/v1/chat/completions", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(requestBody()), signal: controller.signal,
  });
  if (!res.ok) throw new Error(await errorMessage(res));
  for await (const chunk of sseEvents(res)) {
    if (chunk.error) throw new Error(chunk.error.message || "generation failed");
    appendPiece(reply, chunk);
    if (chunk.edge_ssd) showStats(reply, chunk.edge_ssd);
    scrollDown();
  }
  if (!reply.stats.classList.contains("done")) throw new Error("the stream ended without its statistics");
}

async function send(text) {
  state.messages.push({role: "user", content: text});
  addMessage("user").text.textContent = text;
  const reply = addMessage("assistant");
  scrollDown();
  const controller = new AbortController();
  setBusy(controller);
  try {
    await streamReply(reply, controller);
    state.messages.push({role: "assistant", content: reply.content});
  } catch (e) {
    if (controller.signal.aborted && reply.content) {
      state.messages.push({role: "assistant", content: reply.content});   // the part the user saw
      showError(reply, "stopped");
    } else {
      state.messages.pop();   // the turn failed: leave the history as it was, to retry
      showError(reply, controller.signal.aborted ? "stopped" : e.message);
    }
  } finally {
    setBusy(null);
  }
}

function setBusy(controller) {
  state.controller = controller;
  $("send").textContent = controller ? "Stop" : "Send";
  $("composer").classList.toggle("busy", Boolean(controller));
}

// ---- wiring --------------------------------------------------------------------------------

function onSubmit(event) {
  event.preventDefault();
  if (state.controller) {     // the button reads "Stop"
    state.controller.abort();
    return;
  }
  const text = $("message").value.trim();
  if (!text) return;
  $("message").value = "";
  send(text);
}

function start() {
  restoreSettings();
  for (const name of SETTINGS) $(name).addEventListener("change", saveSettings);
  $("composer").addEventListener("submit", onSubmit);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !state.controller) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("transcript").replaceChildren();
  });
  $("change-key").addEventListener("click", async () => {
    if (await askForKey("Enter the API key to use.")) connect();
  });
  connect();
}

document.addEventListener("DOMContentLoaded", start);
