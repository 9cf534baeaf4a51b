// The vqa-search page: plain JS over the server's JSON API (no framework, nothing fetched from elsewhere).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { index: null, file: null, subject: null, results: [] };
const TOKEN_KEY = "vqa-search-token";

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// fetch + JSON; a 401 asks for the token once (kept for this tab, and as a cookie so <img> loads carry it).
async function api(path, options = {}, retried = false) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  if (response.status === 401 && !retried) {
    const token = window.prompt("This server needs its access token:");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token.trim());
      document.cookie = `vqa_search_token=${encodeURIComponent(token.trim())}; path=/; SameSite=Strict`;
      return api(path, options, true);
    }
  }
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

const base = () => `/api/indexes/${encodeURIComponent(state.index)}`;
const thumbnailUrl = (id) => `${base()}/thumbnails/${id}`;
const imageUrl = (id) => `${base()}/images/${id}`;
const target = () => document.querySelector("input[name=target]:checked").value;

async function start() {
  for (;;) {
    try {
      const health = await api("/api/health");
      if (health.ready) break;
    } catch (error) {
      if (error.status !== 503) { setStatus(error.message, true); return; }
      if (/cannot answer/.test(error.message)) { setStatus(error.message, true); return; }
    }
    setStatus("Loading the model…");
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  try {
    const listed = await api("/api/indexes");
    const select = $("index");
    select.replaceChildren(...listed.indexes.map((item) => new Option(
      `${item.name} (${item.images} images)`, item.name, item.name === listed.default, item.name === listed.default)));
    state.index = listed.default;
    $("index-choice").hidden = listed.indexes.length < 2;
    const chosen = listed.indexes.find((item) => item.name === listed.default);
    setStatus(`Ready: ${chosen.images} images, ${chosen.captions} captions (generation ${chosen.generation}).`);
    document.body.dataset.ready = "true";
  } catch (error) {
    setStatus(error.message, true);
  }
}

function options() {
  const rerank = $("rerank").checked || $("explain").checked;
  return { target: target(), k: $("k").value || "12", rerank, explain: $("explain").checked && rerank };
}

async function runSearch(describe, request) {
  setStatus(`Searching ${describe}…`);
  $("search-button").disabled = true;
  try {
    const result = await request();
    state.results = result.results;
    renderResults(result);
    setStatus(`${result.results.length} results for ${describe}.`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("search-button").disabled = false;
  }
}

function searchText(text) {
  const o = options();
  const params = new URLSearchParams({ q: text, target: o.target, k: o.k, rerank: o.rerank, explain: o.explain });
  return runSearch(`"${text}"`, () => api(`${base()}/search?${params}`));
}

function moreLike(hit) {
  const o = options();
  // The re-ranker re-scores text→image and image→caption: an image query re-ranks captions only.
  const rerank = o.rerank && o.target === "captions";
  const params = new URLSearchParams({ image_id: hit.image_id, target: o.target, k: o.k, rerank, explain: false });
  return runSearch(`pictures like ${hit.image}`, () => api(`${base()}/search?${params}`));
}

function searchUpload(file) {
  const o = options();
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("target", o.target);
  form.append("k", o.k);
  form.append("rerank", o.rerank && o.target === "captions");
  return runSearch(`pictures like ${file.name}`, () => api(`${base()}/search`, { method: "POST", body: form }));
}

function renderResults(result) {
  $("summary").textContent = `Query: ${result.query} → ${result.target}`;
  const cards = result.results.map((hit) => {
    const item = document.createElement("li");
    item.className = "card";
    item.dataset.imageId = hit.image_id;
    const caption = hit.caption || hit.image;
    const more = document.createElement("button");
    more.type = "button";
    more.className = "more";
    more.title = "More like this";
    more.setAttribute("aria-label", `More like this: ${caption}`);
    const img = document.createElement("img");
    img.src = thumbnailUrl(hit.image_id);
    img.alt = caption;
    img.loading = "lazy";
    more.append(img);
    more.addEventListener("click", () => moreLike(hit));
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}`;
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = caption;
    const actions = document.createElement("div");
    actions.className = "actions";
    if (hit.explanation) {
      actions.append(button("Explain", () => openExplain(hit), `Explain: ${caption}`, "explain"));
    }
    actions.append(button("Ask", () => chooseSubject({ image_id: hit.image_id, label: hit.image }),
                          `Ask about ${hit.image}`, "ask"));
    const open = document.createElement("a");
    open.href = imageUrl(hit.image_id);
    open.target = "_blank";
    open.rel = "noopener";
    open.textContent = "Open";
    actions.append(open);
    meta.append(score, text, actions);
    item.append(more, meta);
    return item;
  });
  $("results").replaceChildren(...cards);
}

function button(label, onClick, ariaLabel, className) {
  const made = document.createElement("button");
  made.type = "button";
  made.className = `secondary ${className || ""}`;
  made.textContent = label;
  if (ariaLabel) made.setAttribute("aria-label", ariaLabel);
  made.addEventListener("click", onClick);
  return made;
}

// ---- explain: each word's most attended region, drawn on the picture --------------------------

const SVG = "http://www.w3.org/2000/svg";

function openExplain(hit) {
  const dialog = $("explain-view");
  const img = $("explain-image");
  const svg = $("explain-boxes");
  svg.replaceChildren();
  $("explain-caption").textContent = hit.caption || hit.image;
  img.alt = hit.caption || hit.image;
  const words = $("explain-words");
  words.replaceChildren();
  const draw = () => {
    svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    svg.replaceChildren();
    hit.explanation.forEach((item, position) => {
      const [x1, y1, x2, y2] = item.box;
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", x1);
      rect.setAttribute("y", y1);
      rect.setAttribute("width", Math.max(x2 - x1, 0.5));
      rect.setAttribute("height", Math.max(y2 - y1, 0.5));
      rect.dataset.word = position;
      const title = document.createElementNS(SVG, "title");
      title.textContent = `${item.word}: region ${item.region}, weight ${item.weight}`;
      rect.append(title);
      svg.append(rect);
    });
  };
  img.onload = draw;
  img.src = imageUrl(hit.image_id);
  if (img.complete && img.naturalWidth) draw();
  hit.explanation.forEach((item, position) => {
    const li = document.createElement("li");
    const word = document.createElement("button");
    word.type = "button";
    word.textContent = `${item.word} ${item.weight.toFixed(2)}`;
    word.setAttribute("aria-pressed", "false");
    const highlight = () => {
      words.querySelectorAll("button").forEach((other) => other.setAttribute("aria-pressed", String(other === word)));
      svg.querySelectorAll("rect").forEach((rect) => rect.classList.toggle("active", rect.dataset.word === String(position)));
    };
    word.addEventListener("click", highlight);
    word.addEventListener("focus", highlight);
    li.append(word);
    words.append(li);
  });
  dialog.showModal();
  $("explain-close").focus();
}

// ---- questions -----------------------------------------------------------------------------------

function chooseSubject(subject) {
  state.subject = subject;
  $("ask-subject").textContent = `About: ${subject.label}`;
  $("question").focus();
}

async function askQuestion(question) {
  if (!state.subject) { setStatus("Choose a picture first: a result's Ask button, or upload one.", true); return; }
  const form = new FormData();
  form.append("question", question);
  if (state.subject.file) form.append("image", state.subject.file, state.subject.file.name);
  else form.append("image_id", state.subject.image_id);
  setStatus("Thinking…");
  $("ask-button").disabled = true;
  try {
    renderAnswers(await api(`${base()}/ask`, { method: "POST", body: form }));
    setStatus("Answered.");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $("ask-button").disabled = false;
  }
}

function renderAnswers(result) {
  const out = $("answers");
  out.replaceChildren();
  const add = (tag, text, className) => {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    out.append(node);
    return node;
  };
  if (result.head) {
    add("h3", "The answer head");
    const list = document.createElement("ol");
    list.id = "head-answers";
    result.head.forEach((item) => {
      const li = document.createElement("li");
      li.textContent = `${item.answer} (${item.probability.toFixed(2)})`;
      list.append(li);
    });
    out.append(list);
  }
  if (result.captions) {
    add("h3", "From the captions");
    add("p", result.captions.answer || "(no short answer)", "answer");
    const list = document.createElement("ol");
    list.id = "evidence";
    result.captions.evidence.forEach((item, position) => {
      const li = document.createElement("li");
      const source = item.own ? "" : ` (of a similar picture, ${item.image})`;
      const read = position === result.captions.answer_from ? " ← answer read here" : "";
      li.textContent = `${item.score.toFixed(3)} ${item.caption}${source}${read}`;
      list.append(li);
    });
    out.append(list);
    if (!result.captions.evidence.length) add("p", "No captions found.", "muted");
  }
}

// ---- wiring ----------------------------------------------------------------------------------------

function useFile(file) {
  if (!file) return;
  state.file = file;
  $("upload-name").textContent = file.name;
  chooseSubject({ file, label: file.name });
  $("query").value = "";
  searchUpload(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("query").value.trim();
    if (text) searchText(text);
    else if (state.file) searchUpload(state.file);
    else setStatus("Type what to look for, or drop a picture.", true);
  });
  $("image-file").addEventListener("change", (event) => useFile(event.target.files[0]));
  $("index").addEventListener("change", (event) => { state.index = event.target.value; });
  $("explain").addEventListener("change", (event) => { if (event.target.checked) $("rerank").checked = true; });
  $("rerank").addEventListener("change", (event) => { if (!event.target.checked) $("explain").checked = false; });
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (question) askQuestion(question);
  });
  $("explain-close").addEventListener("click", () => $("explain-view").close());
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((name) => document.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((name) => document.addEventListener(name, () => drop.classList.remove("over")));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    useFile(event.dataTransfer.files[0]);
  });
  start();
});
