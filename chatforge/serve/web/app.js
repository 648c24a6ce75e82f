// chatforge's chat page: talks to the same server's OpenAI-style API, nothing else.
//
// A conversation lives in the server's feedback store: the page creates it (POST /v1/conversations),
// sends each turn with {"metadata": {"conversation_id"}} so the server stores it, and rates an
// answer by its id, which is "<completion id>-<choice index>" (POST /v1/feedback). Reopening a
// conversation shows the newest branch of its message tree.
//
// Model output is shown through renderMarkdown, which escapes ALL HTML before adding its own few
// tags, allows only http(s) links, and never creates an <img> (an image URL could carry the
// conversation to another server). The Content-Security-Policy header backs this up.
"use strict";

// ---- Markdown, safely -----------------------------------------------------------------------
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// A link, only to http(s); `url` and `text` are already escaped, so they hold no quote or tag.
function safeLink(url, text) {
  if (!/^https?:\/\/[^\s<>"'`]+$/i.test(url)) return null;
  return `<a href="${url}" rel="noopener noreferrer nofollow" target="_blank">${text}</a>`;
}

// Inline syntax on one escaped line: `code`, links, **bold**, *italic* / _italic_.
// Code spans and links are set aside first (as \u0000N\u0000) so emphasis never rewrites them.
function renderInline(escaped) {
  const kept = [];
  const keep = (html) => `\u0000${kept.push(html) - 1}\u0000`;
  let s = escaped.replace(/`([^`]+)`/g, (_, code) => keep(`<code>${code}</code>`));
  // ![alt](url): shown as a link labelled "image", never loaded
  s = s.replace(/!\[([^\]]*)\]\(([^)\s]+)\)/g, (m, alt, url) => {
    const link = safeLink(url, `image: ${alt || url}`);
    return link ? keep(link) : m;
  });
  s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (m, text, url) => {
    const link = safeLink(url, text);
    return link ? keep(link) : m;
  });
  s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__(?=\S)([^_]*?\S)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?![*\w])/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?![_\w])/g, "$1<em>$2</em>");
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => kept[Number(i)]);
}

// Markdown -> HTML: fenced code blocks, headings, lists, paragraphs. Everything the model wrote is
// escaped first; the only tags in the result are the ones written here.
function renderMarkdown(src) {
  const lines = escapeHtml(String(src).replace(/\u0000/g, "")).split("\n");
  const out = [];
  let para = [];
  let list = null; // {tag: "ul" | "ol", items: []}
  const flushPara = () => {
    if (para.length) out.push(`<p>${para.map(renderInline).join("<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((x) => `<li>${renderInline(x)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^\s*```/.test(line)) {
      flushPara();
      flushList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) code.push(lines[i]);
      out.push(`<pre><code>${code.join("\n")}</code></pre>`);
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (heading) {
      flushPara();
      flushList();
      const level = Math.min(6, heading[1].length + 2); // h3..h6: answers are not documents
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (!line.trim()) {
      flushPara();
      flushList();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}

// ---- API --------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const state = {
  model: null,
  conversationId: null,
  messages: [], // the branch on screen: {role, content, id?, rating, comment, correction, el}
  controller: null, // AbortController of the answer being streamed
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("chatforge-api-key");
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) throw await apiError(res);
  return res.json();
}

async function apiError(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    message = (await res.json()).error.message || message;
  } catch (_) { /* not JSON */ }
  if (res.status === 401) {
    $("settings").open = true;
    message += " Enter the server's API key in Settings.";
  }
  return new Error(message);
}

function status(text) {
  $("status").textContent = text || "";
}

// ---- conversations ------------------------------------------------------------------------------
async function loadConversations() {
  const list = $("conversations");
  let data;
  try {
    data = (await api("GET", "/v1/conversations")).data;
  } catch (e) {
    status(e.message);
    return;
  }
  list.replaceChildren();
  for (const c of data) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === state.conversationId) li.className = "current";
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title || "(untitled)";
    open.title = `${c.n_messages} messages, ${c.up} up, ${c.down} down`;
    open.onclick = () => openConversation(c.id);
    const del = document.createElement("button");
    del.className = "delete";
    del.textContent = "×";
    del.title = "delete";
    del.onclick = async () => {
      if (!confirm("Delete this conversation?")) return;
      await api("DELETE", `/v1/conversations/${encodeURIComponent(c.id)}`);
      if (c.id === state.conversationId) newChat();
      loadConversations();
    };
    li.append(open, del);
    list.append(li);
  }
}

function newChat() {
  stopAnswer();
  state.conversationId = null;
  state.messages = [];
  $("messages").replaceChildren();
  $("system").value = "";
  status("");
  loadConversations();
}

// Show the newest branch: from the most recent message back to the root.
async function openConversation(id) {
  stopAnswer();
  let conv;
  try {
    conv = await api("GET", `/v1/conversations/${encodeURIComponent(id)}`);
  } catch (e) {
    status(e.message);
    return;
  }
  const byId = new Map(conv.messages.map((m) => [m.id, m]));
  const branch = [];
  for (let m = conv.messages[conv.messages.length - 1]; m; m = byId.get(m.parent_id)) branch.unshift(m);
  state.conversationId = id;
  state.messages = [];
  $("messages").replaceChildren();
  $("system").value = "";
  for (const m of branch) {
    if (m.role === "system") {
      $("system").value = m.content || "";
      continue;
    }
    const msg = { role: m.role, content: m.content || "", id: m.id, rating: m.rating, comment: m.comment, correction: m.correction };
    state.messages.push(msg);
    addMessageElement(msg, true);
  }
  status("");
  loadConversations();
}

// ---- messages on screen -------------------------------------------------------------------------
function addMessageElement(msg, finished) {
  const el = document.createElement("div");
  el.className = `msg ${msg.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = msg.role;
  const body = document.createElement("div");
  body.className = "body";
  el.append(role, body);
  msg.el = el;
  msg.body = body;
  showContent(msg);
  if (msg.role === "assistant" && finished) addFeedback(msg);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function showContent(msg) {
  if (msg.role === "assistant") msg.body.innerHTML = renderMarkdown(msg.content); // escaped: see renderMarkdown
  else msg.body.textContent = msg.content; // what people typed is shown exactly as text
}

// Thumbs up/down, a comment and an optional better answer, saved with POST /v1/feedback.
function addFeedback(msg) {
  if (!msg.id) return;
  const bar = document.createElement("div");
  bar.className = "feedback";
  const up = document.createElement("button");
  up.type = "button";
  up.className = "up";
  up.textContent = "👍";
  up.title = "good answer";
  const down = document.createElement("button");
  down.type = "button";
  down.className = "down";
  down.textContent = "👎";
  down.title = "bad answer";
  const form = document.createElement("form");
  form.hidden = true;
  const comment = document.createElement("textarea");
  comment.className = "comment";
  comment.rows = 2;
  comment.placeholder = "Comment (optional)";
  comment.value = msg.comment || "";
  const correction = document.createElement("textarea");
  correction.className = "correction";
  correction.rows = 2;
  correction.placeholder = "A better answer (optional: it becomes training data)";
  correction.value = msg.correction || "";
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save comment";
  const note = document.createElement("span");
  note.className = "note";
  form.append(comment, correction, save);
  const regen = document.createElement("button");
  regen.type = "button";
  regen.className = "regenerate";
  regen.textContent = "↻ Regenerate";
  regen.title = "ask again (the old answer and its rating stay stored)";

  const paint = () => {
    up.classList.toggle("on", msg.rating === 1);
    down.classList.toggle("on", msg.rating === -1);
    form.hidden = !msg.rating;
    regen.hidden = state.messages[state.messages.length - 1] !== msg;
  };
  const send = async (rating) => {
    try {
      const r = await api("POST", "/v1/feedback", {
        message_id: msg.id,
        rating,
        comment: comment.value || null,
        correction: correction.value || null,
      });
      msg.rating = r.rating;
      msg.comment = r.comment;
      msg.correction = r.correction;
      note.textContent = "saved";
      paint();
      loadConversations();
    } catch (e) {
      note.textContent = `not saved: ${e.message}`;
    }
  };
  up.onclick = () => send(msg.rating === 1 ? 0 : 1);
  down.onclick = () => send(msg.rating === -1 ? 0 : -1);
  form.onsubmit = (ev) => {
    ev.preventDefault();
    send(msg.rating || -1);
  };
  regen.onclick = () => regenerate(msg);
  bar.append(up, down, regen, note, form);
  msg.el.append(bar);
  msg.paint = paint;
  paint();
}

// ---- asking -----------------------------------------------------------------------------------
async function send(text) {
  if (state.controller) return;
  try {
    if (!state.conversationId) {
      const conv = await api("POST", "/v1/conversations", { title: text.slice(0, 80), source: "web" });
      state.conversationId = conv.id;
    }
  } catch (e) {
    status(e.message);
    return;
  }
  const msg = { role: "user", content: text };
  state.messages.push(msg);
  addMessageElement(msg, true);
  await answer();
}

async function regenerate(old) {
  if (state.controller) return;
  const i = state.messages.indexOf(old);
  if (i < 0) return;
  state.messages.splice(i, 1);
  old.el.remove();
  await answer();
}

// Stream one answer to the branch on screen into a new assistant message.
async function answer() {
  const system = $("system").value.trim();
  const history = state.messages.map((m) => ({ role: m.role, content: m.content }));
  const body = {
    model: state.model,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    temperature: Number($("temperature").value || 0.7),
    metadata: { conversation_id: state.conversationId },
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const msg = { role: "assistant", content: "", rating: 0 };
  state.messages.push(msg);
  addMessageElement(msg, false);
  state.controller = new AbortController();
  $("stop").hidden = false;
  $("send").disabled = true;
  status("");
  let finish = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!res.ok) throw await apiError(res);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const c of chunk.choices) {
            msg.id = `${chunk.id}-${c.index}`;
            msg.el.dataset.id = msg.id;
            if (c.delta && c.delta.content) {
              msg.content += c.delta.content;
              showContent(msg);
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    if (finish === "length") status("(the answer reached its token limit)");
  } catch (e) {
    if (e.name === "AbortError") status("(answer stopped)");
    else status(e.message);
  } finally {
    state.controller = null;
    $("stop").hidden = true;
    $("send").disabled = false;
    if (msg.id) {
      addFeedback(msg);
      for (const m of state.messages) if (m.paint) m.paint(); // only the newest answer offers regenerate
    } else {
      state.messages.pop(); // nothing came back: drop the empty bubble
      msg.el.remove();
    }
    msg.el.dataset.done = "1";
    loadConversations();
  }
}

function stopAnswer() {
  if (state.controller) state.controller.abort();
}

// ---- start ------------------------------------------------------------------------------------
async function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem("chatforge-api-key") || "";
  keyInput.onchange = () => {
    localStorage.setItem("chatforge-api-key", keyInput.value.trim());
    init();
  };
  $("new-chat").onclick = newChat;
  $("stop").onclick = stopAnswer;
  $("composer").onsubmit = (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  };
  $("input").onkeydown = (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  };
  try {
    const models = await api("GET", "/v1/models");
    state.model = models.data[0].id;
    const health = await (await fetch("/health")).json();
    $("model-info").textContent = `${state.model}, context ${health.context} tokens`;
  } catch (e) {
    status(e.message);
    return;
  }
  document.body.dataset.ready = "1";
  loadConversations();
}

window.renderMarkdown = renderMarkdown; // for the browser test
document.addEventListener("DOMContentLoaded", init);
