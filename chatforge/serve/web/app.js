// chatforge's chat page: talks to the same server's OpenAI-style API, nothing else.
//
// A conversation lives in the server's feedback store: the page creates it (POST /v1/conversations),
// sends each turn with {"metadata": {"conversation_id"}} so the server stores it, and rates an
// answer by its id, which is "<completion id>-<choice index>" (POST /v1/feedback). Reopening a
// conversation shows the newest branch of its message tree.
//
// Documents: the sidebar uploads files into a collection (POST /v1/collections/NAME/files, JSON with
// the files in base64) and picks the collection the chat answers from (the request's "collection").
// The answer's citations [n] become buttons that open the cited chunk (GET .../chunks/ID).
//
// Model output is shown through renderMarkdown: markdown-it (raw HTML off) renders it and DOMPurify
// keeps only the tags and attributes listed below, links only to http(s), and no <img> (an image URL
// could carry the conversation to another server). Both are vendored under /vendor/ (docs/web.md),
// and the Content-Security-Policy (scripts from this server only, nothing inline) backs this up.
"use strict";

// ---- Markdown, safely -----------------------------------------------------------------------
const md = window.markdownit({ html: false, linkify: false, typographer: false, breaks: true });
// headings from h3: answers are not documents
md.renderer.rules.heading_open = (tokens, i) => `<h${Math.min(6, Number(tokens[i].tag.slice(1)) + 2)}>`;
md.renderer.rules.heading_close = (tokens, i) => `</h${Math.min(6, Number(tokens[i].tag.slice(1)) + 2)}>`;
// an image becomes a link labelled "image: alt", never loaded (the sanitiser checks its URL)
md.renderer.rules.image = (tokens, i) => {
  const t = tokens[i];
  const alt = md.utils.escapeHtml(t.content || t.attrGet("src"));
  return `<a href="${md.utils.escapeHtml(t.attrGet("src"))}">image: ${alt}</a>`;
};

const SANITISE = {
  ALLOWED_TAGS: ["p", "br", "strong", "em", "s", "code", "pre", "ul", "ol", "li", "a", "h3", "h4", "h5", "h6",
    "blockquote", "table", "thead", "tbody", "tr", "th", "td", "hr"],
  ALLOWED_ATTR: ["href", "start"],
  ALLOWED_URI_REGEXP: /^https?:\/\//i,
};
// The output policy, when the server runs with --defenses output-policy (it then adds
// <meta name="chatforge-link-hosts" content="host,...">): links keep no query string or fragment,
// the usual way an injected answer carries conversation data out, and a link to a host off the list
// is plain text.
const POLICY = document.querySelector('meta[name="chatforge-link-hosts"]');
const LINK_HOSTS = POLICY ? POLICY.content.split(",").map((h) => h.trim().toLowerCase()).filter(Boolean) : null;
function policyHref(href) {
  let url;
  try { url = new URL(href); } catch { return null; }
  if (!LINK_HOSTS.includes(url.hostname.toLowerCase())) return null;
  url.search = "";
  url.hash = "";
  return url.href;
}
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName !== "A") return;
  if (node.hasAttribute("href") && LINK_HOSTS !== null) {
    const href = policyHref(node.getAttribute("href"));
    if (href === null) node.removeAttribute("href");
    else node.setAttribute("href", href);
  }
  if (node.hasAttribute("href")) {
    node.setAttribute("rel", "noopener noreferrer nofollow");
    node.setAttribute("target", "_blank");
  }
});

// Markdown -> sanitised HTML.
function renderMarkdown(src) {
  return DOMPurify.sanitize(md.render(String(src)), SANITISE);
}

// A copy button on each code block of a rendered body (made as DOM nodes, after sanitising).
function addCopyButtons(body) {
  for (const pre of body.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.onclick = async () => {
      const code = pre.querySelector("code") || pre;
      try {
        await navigator.clipboard.writeText(code.textContent.replace(/\n$/, "")); // markdown-it ends code with a newline
        button.textContent = "Copied";
      } catch (_) {
        button.textContent = "Copy failed";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    };
    pre.append(button);
  }
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

function status(text, info) {
  $("status").textContent = text || "";
  $("status").classList.toggle("info", Boolean(info));
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
    open.onclick = () => {
      showSidebar(false);
      showMode("chat");
      openConversation(c.id);
    };
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
    if (m.documents) {
      msg.collection = m.collection;
      showSources(msg, m.documents);
    }
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
  if (msg.role === "assistant") {
    msg.body.innerHTML = renderMarkdown(msg.content); // sanitised: see renderMarkdown
    addCopyButtons(msg.body);
    if (msg.documents) linkCitations(msg);
  } else {
    msg.body.textContent = msg.content; // what people typed is shown exactly as text
  }
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
  if (!(await answer()) && state.messages[state.messages.length - 1] === msg) {
    // nothing came back: the message leaves the history (and goes back into the box to edit)
    state.messages.pop();
    msg.el.remove();
    if (!$("input").value) $("input").value = text;
  }
}

async function regenerate(old) {
  if (state.controller) return;
  const i = state.messages.indexOf(old);
  if (i < 0) return;
  state.messages.splice(i, 1);
  old.el.remove();
  await answer();
}

// Stream one answer to the branch on screen into a new assistant message; true when one came
// back. The server leaves the oldest turns out of the prompt when they no longer fit the context
// (trim_history) and says how many; those are shown faded.
async function answer() {
  const system = $("system").value.trim();
  const history = state.messages.map((m) => ({ role: m.role, content: m.content }));
  const body = {
    model: state.model,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    temperature: Number($("temperature").value || 0.7),
    metadata: { conversation_id: state.conversationId },
    trim_history: true,
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const collection = $("collection").value;
  if (collection) body.collection = collection;
  const msg = { role: "assistant", content: "", rating: 0, collection };
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
          if (chunk.trimmed_messages !== undefined && state.leftOutFor !== msg) showLeftOut(chunk.trimmed_messages, msg);
          if (chunk.documents) showSources(msg, chunk.documents);
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
    const notes = [];
    if (state.leftOut) notes.push(`older messages were left out (${state.leftOut}) so the prompt fits the model's context`);
    if (finish === "length") notes.push("the answer reached its token limit");
    if (notes.length) status(`(${notes.join("; ")})`, true);
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
  return Boolean(msg.id);
}

// Fade the `n` oldest messages (after the system prompt) that the prompt of `answering` left out.
function showLeftOut(n, answering) {
  state.leftOut = n;
  state.leftOutFor = answering;
  let i = 0;
  for (const m of state.messages) {
    if (m === answering) break;
    m.el.classList.toggle("left-out", i++ < n);
  }
}

function stopAnswer() {
  if (state.controller) state.controller.abort();
}

// ---- documents: collections, uploads, citations ------------------------------------------------
// The documents an answer was given (the stream's first chunk): a row of source buttons under it,
// and [n] in its text made clickable.
function showSources(msg, documents) {
  msg.documents = documents;
  const row = document.createElement("div");
  row.className = "sources";
  row.append("Sources:");
  for (const doc of documents) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "source";
    button.textContent = `[${doc.id}] ${doc.source}${doc.heading ? ` > ${doc.heading}` : ""}`;
    button.onclick = () => openChunk(msg.collection, doc);
    row.append(button);
  }
  msg.body.after(row);
  showContent(msg);
}

// [n] in the rendered answer's text (not in code or links) -> a button that opens document n.
function linkCitations(msg) {
  const walker = document.createTreeWalker(msg.body, NodeFilter.SHOW_TEXT);
  const nodes = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.parentElement.closest("code, pre, a") && /\[\d{1,3}\]/.test(n.nodeValue)) nodes.push(n);
  }
  for (const node of nodes) {
    const parts = node.nodeValue.split(/(\[\d{1,3}\])/);
    const out = parts.map((part) => {
      const doc = /^\[(\d+)\]$/.test(part) ? msg.documents[Number(part.slice(1, -1)) - 1] : null;
      if (!doc) return document.createTextNode(part);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "cite";
      button.textContent = part;
      button.title = doc.source;
      button.onclick = () => openChunk(msg.collection, doc);
      return button;
    });
    node.replaceWith(...out);
  }
}

// The cited chunk as the collection holds it now (or as the answer got it, if it is gone since).
async function openChunk(collection, doc) {
  let chunk = { document: doc.source, heading: doc.heading, text: doc.text };
  let note = "";
  try {
    chunk = await api("GET", `/v1/collections/${encodeURIComponent(collection)}/chunks/${doc.chunk_id}`);
  } catch (e) {
    note = ` (${e.message}; shown as the answer got it)`;
  }
  $("chunk-title").textContent = `[${doc.id}] ${chunk.document}`;
  $("chunk-heading").textContent = (chunk.heading || "") + note;
  $("chunk-text").textContent = chunk.text; // document text is shown as text, never as HTML
  $("chunk-view").showModal();
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function uploadStatus(text, error) {
  $("upload-status").textContent = text || "";
  $("upload-status").classList.toggle("error", Boolean(error));
}

async function loadCollections(select) {
  let data;
  try {
    data = (await api("GET", "/v1/collections")).data;
  } catch (e) {
    uploadStatus(e.message, true);
    return;
  }
  const box = $("collection");
  const chosen = select === undefined ? box.value : select;
  box.replaceChildren(new Option("no collection", ""));
  for (const c of data) {
    const shared = c.shared ? ", shared" : "";
    box.append(new Option(`${c.id} (${plural(c.documents, "file")}${shared})`, c.id));
  }
  box.value = data.some((c) => c.id === chosen) ? chosen : "";
  showCollectionFiles();
}

async function showCollectionFiles() {
  const name = $("collection").value;
  const list = $("collection-files");
  list.replaceChildren();
  $("collection-delete").hidden = !name;
  if (!name) return;
  let coll;
  try {
    coll = await api("GET", `/v1/collections/${encodeURIComponent(name)}`);
  } catch (e) {
    uploadStatus(e.message, true);
    return;
  }
  $("collection-delete").hidden = !coll.writable; // a shared collection is read-only but for admins
  for (const doc of coll.data) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = doc.name;
    label.title = `${doc.chunks} chunks`;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "×";
    del.title = "remove from the collection";
    del.onclick = async () => {
      if (!confirm(`Remove ${doc.name} from ${name}?`)) return;
      try {
        await api("DELETE", `/v1/collections/${encodeURIComponent(name)}/files/${doc.id}`);
      } catch (e) {
        uploadStatus(e.message, true);
      }
      loadCollections();
    };
    li.append(label);
    if (coll.writable) li.append(del);
    list.append(li);
  }
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1)); // "data:...;base64,XXXX"
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// The chosen files into the named collection (made if new), one request; what happened to each is shown.
async function uploadFiles() {
  const name = $("upload-name").value.trim() || $("collection").value;
  const files = [...$("upload-files").files];
  if (!name) return uploadStatus("name the collection (or pick one above)", true);
  if (!files.length) return uploadStatus("choose files first", true);
  $("upload-send").disabled = true;
  uploadStatus(`adding ${files.length} file(s) to ${name}…`);
  try {
    const body = { files: await Promise.all(files.map(async (f) => ({ name: f.name, content: await base64Of(f) }))) };
    const r = await api("POST", `/v1/collections/${encodeURIComponent(name)}/files`, body);
    const said = r.files.map((f) => (f.error ? f.error : `${f.name} ${f.outcome} (${plural(f.chunks, "chunk")})`));
    uploadStatus(`${r.collection.id}: ${said.join("; ")}`, r.files.some((f) => f.error));
    $("upload-files").value = "";
    $("upload-name").value = "";
    await loadCollections(r.collection.id);
  } catch (e) {
    uploadStatus(e.message, true);
  } finally {
    $("upload-send").disabled = false;
  }
}

async function deleteCollection() {
  const name = $("collection").value;
  if (!name || !confirm(`Delete the collection ${name} and its files?`)) return;
  try {
    await api("DELETE", `/v1/collections/${encodeURIComponent(name)}`);
    uploadStatus(`${name} deleted`);
  } catch (e) {
    uploadStatus(e.message, true);
  }
  loadCollections("");
}

function initDocuments() {
  $("collection").onchange = () => showCollectionFiles();
  $("upload").onsubmit = (ev) => {
    ev.preventDefault();
    uploadFiles();
  };
  $("collection-delete").onclick = deleteCollection;
  $("chunk-close").onclick = () => $("chunk-view").close();
}

// ---- layout: the sidebar on a phone, chat or compare --------------------------------------------
function showSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("scrim").hidden = !open;
  $("menu").setAttribute("aria-expanded", String(open));
}

function showMode(mode) {
  $("chat-view").hidden = mode !== "chat";
  $("compare-view").hidden = mode !== "compare";
  $("mode-chat").setAttribute("aria-selected", String(mode === "chat"));
  $("mode-compare").setAttribute("aria-selected", String(mode === "compare"));
  showSidebar(false);
}

// ---- compare: two answers, one pick -------------------------------------------------------------
// Two samples of the served model for one prompt (a chat completion with n = 2), an optional judge
// model's draft pick (POST /v1/compare/judge), and the person's pick appended to the server's
// comparison file (POST /v1/compare), the format `chatforge prefs` reads.
const compare = { messages: null, a: null, b: null, judge: null, busy: false };

function initCompare() {
  $("compare-form").onsubmit = (ev) => {
    ev.preventDefault();
    askPair();
  };
  for (const button of $("picks").querySelectorAll("button")) button.onclick = () => savePick(button.dataset.verdict);
}

function compareStatus(text) {
  $("compare-status").textContent = text || "";
}

function showAnswer(id, text) {
  const body = $(id).querySelector(".body");
  body.innerHTML = renderMarkdown(text || "(empty answer)");
  addCopyButtons(body);
}

async function askPair() {
  const text = $("compare-prompt").value;
  if (!text.trim() || compare.busy) return;
  compare.busy = true;
  $("compare-ask").disabled = true;
  $("pair").hidden = true;
  delete $("pair").dataset.saved;
  $("judge-draft").hidden = true;
  compareStatus("sampling two answers…");
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: text }];
  const temperature = Number($("temperature").value || 0);
  const body = { model: state.model, messages, n: 2, temperature: temperature > 0 ? temperature : 1.0 };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  try {
    const res = await api("POST", "/v1/chat/completions", body);
    const [a, b] = res.choices.map((c) => c.message.content || "");
    Object.assign(compare, { messages, a, b, judge: null });
    showAnswer("answer-a", a);
    showAnswer("answer-b", b);
    paintPicks(null);
    $("compare-comment").value = "";
    $("pair").hidden = false;
    compareStatus(a === b ? "(the two samples are the same: a tie, or ask again)" : "");
    if (state.compareInfo && state.compareInfo.judge) await draftPick();
  } catch (e) {
    compareStatus(e.message);
  } finally {
    compare.busy = false;
    $("compare-ask").disabled = false;
  }
}

async function draftPick() {
  compareStatus("the judge is reading both answers…");
  const j = await api("POST", "/v1/compare/judge", { messages: compare.messages, a: compare.a, b: compare.b });
  compare.judge = j;
  $("judge-draft").textContent = `Judge (${j.model}) suggests ${j.pick} (p(A better) = ${j.p_a.toFixed(2)}): ${j.critique}`;
  $("judge-draft").hidden = false;
  paintPicks(null);
  compareStatus("");
}

function paintPicks(chosen) {
  const suggested = compare.judge ? `prefer_${compare.judge.pick.toLowerCase()}` : null;
  for (const button of $("picks").querySelectorAll("button")) {
    button.classList.toggle("suggested", button.dataset.verdict === suggested);
    button.classList.toggle("on", button.dataset.verdict === chosen);
    button.disabled = Boolean(chosen);
  }
}

async function savePick(verdict) {
  if (!compare.messages) return;
  try {
    const saved = await api("POST", "/v1/compare", {
      messages: compare.messages,
      a: compare.a,
      b: compare.b,
      verdict,
      comment: $("compare-comment").value.trim() || null,
      judge: compare.judge ? { pick: compare.judge.pick, p_a: compare.judge.p_a, critique: compare.judge.critique } : null,
    });
    paintPicks(verdict);
    $("pair").dataset.saved = verdict;
    compareStatus(`saved: ${saved.count} in the comparison file`);
  } catch (e) {
    compareStatus(`not saved: ${e.message}`);
  }
}

// ---- start ------------------------------------------------------------------------------------
async function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem("chatforge-api-key") || "";
  keyInput.onchange = () => {
    localStorage.setItem("chatforge-api-key", keyInput.value.trim());
    init();
  };
  $("new-chat").onclick = () => {
    showMode("chat");
    newChat();
  };
  $("menu").onclick = () => showSidebar(!document.body.classList.contains("sidebar-open"));
  $("scrim").onclick = () => showSidebar(false);
  $("mode-chat").onclick = () => showMode("chat");
  $("mode-compare").onclick = () => showMode("compare");
  initCompare();
  initDocuments();
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
    state.compareInfo = await api("GET", "/v1/compare");
  } catch (e) {
    status(e.message);
    return;
  }
  document.body.dataset.ready = "1";
  loadConversations();
  loadCollections();
}

window.renderMarkdown = renderMarkdown; // for the browser test
document.addEventListener("DOMContentLoaded", init);
