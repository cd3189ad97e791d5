// The labelling page: log in with a token, rank the responses of one item at a time, by dragging or with the
// keyboard alone. Everything from the server is put on the page as text (textContent), never as HTML: model
// output may contain <script>. No framework, no build step, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "rlhfkit-label-token";
let token = sessionStorage.getItem(TOKEN_KEY);
let current = null; // {item_id, prompt, responses}
let busy = false;

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + token, ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    logout("That token was not accepted.");
    throw new Error("unauthorised");
  }
  if (response.status === 204) return { status: 204, data: null };
  let data = null;
  try { data = await response.json(); } catch (e) { data = { error: "unreadable answer from the server" }; }
  return { status: response.status, data };
}

function show(id, visible) { $(id).hidden = !visible; }

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function logout(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  current = null;
  show("login", true); show("labelling", false); show("admin", false); show("logout", false);
  $("who").textContent = ""; $("progress").textContent = "";
  $("login-error").textContent = message;
  $("token").value = "";
  $("token").focus();
}

// ---- text rendering (textContent only, never HTML) ----
function textOf(value) {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return value.map((m) => m && m.content !== undefined ? m.content : "").join("\n\n");
  return String(value);
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (Array.isArray(prompt)) {
    for (const message of prompt) {
      const turn = document.createElement("div");
      turn.className = "turn";
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = message.role + ":";
      const content = document.createElement("div");
      content.className = "text";
      content.textContent = message.content;
      turn.append(role, content);
      box.append(turn);
    }
  } else {
    box.textContent = prompt;
  }
}

// ---- the ranked list ----
const LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

function cards() { return Array.from($("responses").children); }

function renderResponses(responses) {
  const list = $("responses");
  list.replaceChildren();
  responses.forEach((text, index) => {
    const li = document.createElement("li");
    li.className = "response";
    li.tabIndex = 0;
    li.draggable = true;
    li.dataset.index = String(index);
    li.dataset.tie = "false";

    const head = document.createElement("div");
    head.className = "head";
    const rank = document.createElement("span");
    rank.className = "rank";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = "Response " + (LETTERS[index] || String(index + 1));
    const tie = document.createElement("label");
    tie.className = "tie";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.tabIndex = -1;
    box.addEventListener("change", () => { li.dataset.tie = String(box.checked); refreshRanks(); });
    tie.append(box, document.createTextNode(" tie with the one above"));
    const up = document.createElement("button");
    up.type = "button"; up.className = "move up"; up.textContent = "▲"; up.tabIndex = -1;
    up.title = "Move up"; up.setAttribute("aria-label", "Move up");
    up.addEventListener("click", () => move(li, -1));
    const down = document.createElement("button");
    down.type = "button"; down.className = "move down"; down.textContent = "▼"; down.tabIndex = -1;
    down.title = "Move down"; down.setAttribute("aria-label", "Move down");
    down.addEventListener("click", () => move(li, +1));
    head.append(rank, name, tie, up, down);

    const body = document.createElement("div");
    body.className = "text";
    body.textContent = textOf(text); // as text: a <script> in a response shows as the characters it is
    li.append(head, body);

    li.addEventListener("keydown", onCardKey);
    li.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData("text/plain", li.dataset.index);
      event.dataTransfer.effectAllowed = "move";
      li.classList.add("dragging");
    });
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); clearDropMarks(); });
    li.addEventListener("dragover", (event) => {
      event.preventDefault();
      clearDropMarks();
      li.classList.add(dropsBefore(li, event) ? "drop-before" : "drop-after");
    });
    li.addEventListener("drop", (event) => {
      event.preventDefault();
      const dragged = cards().find((c) => c.dataset.index === event.dataTransfer.getData("text/plain"));
      const before = dropsBefore(li, event);
      clearDropMarks();
      if (!dragged || dragged === li) return;
      setTie(dragged, false);
      $("responses").insertBefore(dragged, before ? li : li.nextSibling);
      refreshRanks();
      dragged.focus();
    });
    list.append(li);
  });
  refreshRanks();
}

function dropsBefore(li, event) {
  const box = li.getBoundingClientRect();
  return event.clientY < box.top + box.height / 2;
}

function clearDropMarks() {
  for (const c of cards()) c.classList.remove("drop-before", "drop-after");
}

function setTie(li, on) {
  li.dataset.tie = String(on);
  li.querySelector(".tie input").checked = on;
}

function move(li, step) {
  const all = cards();
  const at = all.indexOf(li);
  const to = at + step;
  if (to < 0 || to >= all.length) return;
  setTie(li, false);
  if (step < 0) $("responses").insertBefore(li, all[to]);
  else $("responses").insertBefore(li, all[to].nextSibling);
  refreshRanks();
  li.focus();
}

// Ranks from the order on screen: 1 for the top; a card tied with the one above shares its rank; otherwise
// its rank is its position (1, 1, 3: competition ranking).
function currentRanks() {
  const ranks = new Array(cards().length);
  let previous = 0;
  cards().forEach((li, position) => {
    const tied = position > 0 && li.dataset.tie === "true";
    const rank = tied ? previous : position + 1;
    ranks[Number(li.dataset.index)] = rank;
    previous = rank;
  });
  return ranks;
}

function refreshRanks() {
  const ranks = currentRanks();
  cards().forEach((li, position) => {
    if (position === 0) setTie(li, false);
    li.querySelector(".tie").hidden = position === 0;
    const rank = ranks[Number(li.dataset.index)];
    li.querySelector(".rank").textContent = String(rank);
    li.classList.toggle("tied", position > 0 && li.dataset.tie === "true");
    li.setAttribute("aria-label", "Rank " + rank + ": " + li.querySelector(".name").textContent);
  });
}

function onCardKey(event) {
  const li = event.currentTarget;
  if (event.target !== li) return; // typing in the card's own controls
  const all = cards();
  const at = all.indexOf(li);
  if (event.key === "ArrowUp" || event.key === "ArrowDown") {
    event.preventDefault();
    const step = event.key === "ArrowUp" ? -1 : 1;
    if (event.shiftKey || event.altKey) move(li, step);
    else if (all[at + step]) all[at + step].focus();
  } else if ((event.key === "t" || event.key === "T") && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    if (at > 0) { setTie(li, li.dataset.tie !== "true"); refreshRanks(); }
  }
}

// ---- the flow ----
async function loadProgress() {
  const { status, data } = await api("/api/progress");
  if (status !== 200) return;
  $("progress").textContent = "done " + data.done + " · remaining " + data.remaining;
  $("guidelines").textContent = data.guidelines || "No guidelines were given for this project.";
  show("guidelines-box", true);
}

async function loadNext() {
  setStatus("");
  const { status, data } = await api("/api/next");
  if (status === 204) {
    current = null;
    show("item", false); show("done", true);
    return;
  }
  if (status !== 200) { setStatus(data.error || "could not load the next item", true); return; }
  current = data;
  $("item-id").textContent = "item " + data.item_id;
  renderPrompt(data.prompt);
  renderResponses(data.responses);
  $("comment").value = "";
  show("done", false); show("item", true);
  cards()[0].focus();
}

async function send(extra) {
  if (!current || busy) return;
  busy = true;
  const body = { item_id: current.item_id, ...extra };
  const comment = $("comment").value.trim();
  if (comment) body.comment = comment;
  try {
    const { status, data } = await api("/api/labels", { method: "POST", body: JSON.stringify(body) });
    if (status === 200) {
      const what = data.skip ? "skipped" : data.none_acceptable ? "marked none acceptable" : "saved";
      await loadNext();
      setStatus("Item " + data.item_id + " " + what + ".");
      await loadProgress();
    } else if (status === 409 && /expired/.test(data.error || "")) {
      await loadNext();
      setStatus(data.error, true);
    } else {
      setStatus(data.error || ("error " + status), true);
    }
  } catch (e) {
    if (token) setStatus("Could not reach the server; your answer was not saved. Try again.", true);
  } finally {
    busy = false;
  }
}

async function loadAdmin() {
  const { status, data } = await api("/api/admin/progress");
  if (status !== 200) { setStatus(data.error || "error", true); return; }
  $("admin-summary").textContent = data.complete + " of " + data.items + " items complete (overlap " +
    data.overlap + "), " + data.labels + " labels";
  const rows = data.annotators.map((a) => {
    const tr = document.createElement("tr");
    const mine = data.agreement.per_annotator[a.name];
    for (const value of [a.name, a.ranked, a.skipped, a.none_acceptable, a.open_assignments,
                         mine ? mine.agreement.toFixed(2) : "–"]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.append(td);
    }
    return tr;
  });
  $("admin-table").tBodies[0].replaceChildren(...rows);
  const list = $("agreement");
  list.replaceChildren();
  const fmt = (x) => (x === null || x === undefined ? "– (needs items ranked by several)" : Number(x).toFixed(3));
  for (const [key, label] of [["pairwise_agreement", "pairwise agreement"],
                              ["krippendorff_alpha_ordinal", "Krippendorff's alpha (ordinal)"],
                              ["kendall_w_mean", "Kendall's W (mean over items)"],
                              ["items_ranked_by_several", "items ranked by several"]]) {
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = key === "items_ranked_by_several" ? String(data.agreement[key]) : fmt(data.agreement[key]);
    list.append(dt, dd);
  }
}

async function start() {
  const { status, data } = await api("/api/whoami");
  if (status !== 200) { logout(data.error || "could not log in"); return; }
  show("login", false); show("logout", true);
  $("who").textContent = data.name + (data.role === "admin" ? " (admin)" : "");
  if (data.role === "admin") {
    show("admin", true);
    await loadAdmin();
  } else {
    show("labelling", true);
    await loadProgress();
    await loadNext();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login-error").textContent = "";
    start().catch(() => {});
  });
  $("logout").addEventListener("click", () => logout());
  $("submit").addEventListener("click", () => send({ ranks: currentRanks() }));
  $("none").addEventListener("click", () => send({ none_acceptable: true }));
  $("skip").addEventListener("click", () => send({ skip: true }));
  $("again").addEventListener("click", () => loadNext());
  $("refresh").addEventListener("click", () => loadAdmin());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && current && !$("item").hidden) {
      event.preventDefault();
      send({ ranks: currentRanks() });
    }
  });
  if (token) start().catch(() => {}); else logout();
});
