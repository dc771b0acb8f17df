// The review page: plain DOM, no framework, no build step. Every decision goes through the JSON API
// (/v1/review..., /v1/suspects...) that scripts use too; names and labels are shown with textContent only.
"use strict";

const PAGE = 60;
const state = {
  view: "queue", labels: [], groups: [], total: 0, selected: 0, suspects: [], suspectSelected: 0,
  token: sessionStorage.getItem("retraind-token") || "", busy: false,
};
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(method, path, body) {
  const headers = {};
  const sent = state.token;
  if (sent) headers.Authorization = `Bearer ${sent}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) {
    if (state.token && state.token !== sent) return api(method, path, body); // asked for meanwhile: no second prompt
    const token = prompt("This daemon needs its token (the contents of http.token_file):");
    if (token) { state.token = token.trim(); sessionStorage.setItem("retraind-token", state.token); return api(method, path, body); }
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function toast(message, error = false) {
  const node = $("toast");
  node.textContent = message;
  node.className = `show${error ? " error" : ""}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { node.className = ""; }, error ? 5000 : 2200);
}

function thumbnail(sha, alt) {
  const img = el("img", { alt, loading: "lazy" });
  if (!sha) return img;
  const url = `/v1/thumbnails/${sha}`;
  if (!state.token) img.src = url;
  else api("GET", url).then((blob) => { img.src = URL.createObjectURL(blob); }).catch(() => {});
  return img;
}

const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

// -- the review queue ------------------------------------------------------------------------------------

async function loadQueue(append = false) {
  const offset = append ? state.groups.length : 0;
  const page = await api("GET", `/v1/review?offset=${offset}&limit=${PAGE}`);
  state.labels = page.labels;
  state.total = page.total_groups;
  state.groups = append ? state.groups.concat(page.groups) : page.groups;
  state.selected = Math.min(state.selected, Math.max(0, state.groups.length - 1));
  $("model-version").textContent = page.model_version ? `model ${page.model_version}` : "no model yet";
  $("queue-count").textContent = page.total_images ? `(${page.total_images})` : "";
  renderQueue();
}

function renderLegend() {
  const legend = $("legend");
  legend.replaceChildren(...state.labels.slice(0, 9).map((label, i) => el("span", {}, el("kbd", {}, i + 1), " ", label)));
}

function card(group, index) {
  const item = group[0];
  const reason = el("span", { class: `badge ${item.reason}` }, item.reason.replace("_", " "));
  const badges = el("div", {}, reason);
  if (group.length > 1) badges.append(el("span", { class: "badge dup" }, `${group.length} near-duplicates`));
  const suggestions = el("ul", { class: "suggestions" }, ...item.suggestions.map((s) => el("li", {},
    el("span", {}, s.label), el("span", {}, percent(s.score)))));
  const top = item.suggestions[0];
  const actions = el("div", { class: "actions" },
    ...(top ? [el("button", { onclick: () => decide(index, top.label), title: "Enter" }, `✓ ${top.label}`)] : []),
    el("button", { onclick: () => askNewLabel(index), title: "N" }, "New label…"),
    el("button", { class: "reject", onclick: () => rejectItem(index), title: "Backspace" }, "Reject"));
  const node = el("article", { class: `card${index === state.selected ? " selected" : ""}`, "data-id": item.id,
                               onclick: () => select(index) },
    thumbnail(item.sha256, item.name), el("div", { class: "name" }, item.name), badges,
    el("div", { class: "bar", title: `margin ${item.margin}` }, el("i", { style: `width:${100 * (item.margin ?? 0)}%` })),
    suggestions, actions);
  return node;
}

function renderQueue() {
  renderLegend();
  $("queue").replaceChildren(...state.groups.map(card));
  $("queue-empty").hidden = state.groups.length > 0;
  $("queue-more").hidden = state.groups.length >= state.total;
  const selected = document.querySelector("#queue .card.selected");
  if (selected) selected.scrollIntoView({ block: "nearest" });
}

function select(index) {
  state.selected = Math.max(0, Math.min(index, state.groups.length - 1));
  renderQueue();
}

async function act(work, message) {
  if (state.busy) return;
  state.busy = true;
  try {
    await work();
    toast(message);
  } catch (error) {
    toast(error.message, true);
  } finally {
    state.busy = false;
  }
}

function decide(index, label) {
  const group = state.groups[index];
  if (!group || !label) return;
  act(async () => {
    await api("POST", `/v1/review/${group[0].id}:label`, { label, group: true });
    await loadQueue();
  }, `${group.length > 1 ? `${group.length} images` : group[0].name} → ${label}`);
}

function rejectItem(index) {
  const group = state.groups[index];
  if (!group) return;
  act(async () => {
    await api("POST", `/v1/review/${group[0].id}:reject`, { group: true });
    await loadQueue();
  }, `rejected ${group.length > 1 ? `${group.length} images` : group[0].name}`);
}

function undo() {
  act(async () => {
    const answer = await api("POST", "/v1/review:undo", {});
    await (state.view === "suspects" ? loadSuspects() : loadQueue());
    return answer;
  }, "undone");
}

function askNewLabel(index) {
  const dialog = $("new-label");
  const input = $("new-label-name");
  input.value = "";
  dialog.onclose = () => {
    if (dialog.returnValue === "ok" && input.value.trim()) decide(index, input.value.trim());
  };
  dialog.showModal();
  input.focus();
}

// -- suspects --------------------------------------------------------------------------------------------

async function loadSuspects() {
  const answer = await api("GET", "/v1/suspects");
  state.suspects = answer.suspects;
  state.suspectSelected = Math.min(state.suspectSelected, Math.max(0, state.suspects.length - 1));
  $("suspect-count").textContent = answer.total ? `(${answer.total})` : "";
  renderSuspects();
}

function suspectCard(suspect, index) {
  const copies = (suspect.other_labels || []).length ? `the same bytes are also under ${suspect.other_labels.join(", ")}` : "";
  const why = suspect.kind === "disagrees"
    ? `cross-validated prediction: ${suspect.suggested} (${percent(suspect.probability)})${copies ? `; ${copies}` : ""}`
    : copies;
  const moveTo = suspect.suggested || (suspect.other_labels || [])[0];
  return el("article", { class: `card${index === state.suspectSelected ? " selected" : ""}`, "data-id": suspect.id,
                         onclick: () => { state.suspectSelected = index; renderSuspects(); } },
    thumbnail(suspect.sha256, suspect.path), el("div", { class: "name" }, suspect.path),
    el("div", {}, el("span", { class: `badge ${suspect.kind === "duplicate" ? "dup" : "unfamiliar"}` }, suspect.kind),
       `filed under ${suspect.label}`),
    el("div", { class: "muted" }, why),
    el("div", { class: "actions" },
      el("button", { onclick: () => fixSuspect(index, "move"), title: "Enter" }, `Move to ${moveTo}`),
      el("button", { onclick: () => fixSuspect(index, "keep"), title: "K" }, "Keep"),
      el("button", { class: "reject", onclick: () => fixSuspect(index, "remove"), title: "Backspace" }, "Remove")));
}

function renderSuspects() {
  $("suspects").replaceChildren(...state.suspects.map(suspectCard));
  $("suspects-empty").hidden = state.suspects.length > 0;
  const selected = document.querySelector("#suspects .card.selected");
  if (selected) selected.scrollIntoView({ block: "nearest" });
}

function fixSuspect(index, action) {
  const suspect = state.suspects[index];
  if (!suspect) return;
  const body = action === "move" && !suspect.suggested ? { label: suspect.other_labels[0] } : {};
  act(async () => {
    await api("POST", `/v1/suspects/${suspect.id}:${action}`, body);
    await loadSuspects();
  }, `${suspect.path}: ${action}`);
}

// -- the model -------------------------------------------------------------------------------------------

function change(delta) {
  if (!delta || delta.change === null || delta.change === undefined) return "";
  const sign = delta.change > 0 ? "+" : "";
  return el("span", { class: delta.change >= 0 ? "up" : "down" }, ` ${sign}${(100 * delta.change).toFixed(1)} pts`);
}

function figure(name, value) { return el("div", { class: "figure" }, el("b", {}, value), name); }

async function loadModel() {
  const m = await api("GET", "/v1/review/model");
  const root = $("model");
  if (m.version === null) { root.replaceChildren(el("p", { class: "empty" }, "No model yet.")); return; }
  const trust = m.trust || {};
  const calibration = (trust.calibration || {}).test || (trust.calibration || {}).out_of_fold || {};
  const previous = m.previous || {};
  const figures = el("div", { class: "figures" },
    figure("target precision", percent(trust.target_precision)),
    figure("expected coverage", percent(trust.expected_coverage)),
    figure(`calibration error (ECE, ${(trust.calibration || {}).test ? "test" : "out-of-fold"}) before → after`,
      `${calibration.before?.toFixed?.(3) ?? "–"} → ${calibration.after?.toFixed?.(3) ?? "–"}`),
    figure("novelty threshold", (trust.novelty || {}).threshold?.toFixed?.(1) ?? "–"),
    figure("review threshold", trust.confidence_threshold === undefined ? "–" :
      trust.confidence_threshold === null ? "everything to review" : percent(trust.confidence_threshold)));
  const splits = el("table", {}, el("tr", {}, el("th", {}, "split"), el("th", {}, "accuracy"), el("th", {}, `vs ${previous.version ?? "–"}`)),
    ...Object.entries(m.accuracy).map(([split, value]) =>
      el("tr", {}, el("td", {}, split), el("td", {}, percent(value)), el("td", {}, change((previous.accuracy || {})[split])))));
  const perClass = el("table", {}, el("tr", {}, el("th", {}, "label"), el("th", {}, "accuracy"), el("th", {}, "change")),
    ...Object.entries(m.per_class_accuracy).map(([label, value]) =>
      el("tr", {}, el("td", {}, label), el("td", {}, percent(value)), el("td", {}, change((previous.per_class_accuracy || {})[label])))));
  const matrix = el("table", {}, el("tr", {}, el("th", {}, "true ↓ / predicted →"), ...m.labels.map((l) => el("th", {}, l))),
    ...(m.confusion_matrix || []).map((row, i) => el("tr", {}, el("th", {}, m.labels[i]),
      ...row.map((n, j) => el("td", { class: n ? (i === j ? "diag" : "off") : "" }, n)))));
  const changes = [];
  if ((previous.labels_added || []).length) changes.push(`labels added: ${previous.labels_added.join(", ")}`);
  if ((previous.labels_removed || []).length) changes.push(`labels removed: ${previous.labels_removed.join(", ")}`);
  const plots = el("div", { class: "plots" }, ...m.plots.map((name) => {
    const img = el("img", { alt: name });
    if (!state.token) img.src = `/v1/review/plots/${name}`;
    else api("GET", `/v1/review/plots/${name}`).then((b) => { img.src = URL.createObjectURL(b); }).catch(() => {});
    return img;
  }));
  root.replaceChildren(
    el("h2", {}, `Model ${m.version}`, el("span", { class: "muted" }, ` · ${m.backbone} · ${m.labels.length} labels`)),
    figures, el("h3", {}, "Accuracy"), splits,
    ...(changes.length ? [el("p", {}, changes.join(" · "))] : []),
    el("h3", {}, "Per label"), perClass,
    el("h3", {}, `Confusion matrix (${m.confusion_split || "test"})`), matrix, plots);
}

// -- navigation and keys ---------------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const name of ["queue", "suspects", "model"]) {
    $(`view-${name}`).hidden = name !== view;
    $(`tab-${name}`).setAttribute("aria-selected", String(name === view));
  }
  const load = { queue: loadQueue, suspects: loadSuspects, model: loadModel }[view];
  load().catch((error) => toast(error.message, true));
}

function onQueueKey(event) {
  const key = event.key;
  const group = state.groups[state.selected];
  if (/^[1-9]$/.test(key)) { decide(state.selected, state.labels[Number(key) - 1]); return true; }
  if (key === "Enter" && group && group[0].suggestions[0]) { decide(state.selected, group[0].suggestions[0].label); return true; }
  if (key === "Backspace" || key === "Delete") { rejectItem(state.selected); return true; }
  if (key === "n" || key === "N") { askNewLabel(state.selected); return true; }
  if (key === "j" || key === "ArrowRight" || key === "ArrowDown") { select(state.selected + 1); return true; }
  if (key === "k" || key === "ArrowLeft" || key === "ArrowUp") { select(state.selected - 1); return true; }
  return false;
}

function onSuspectKey(event) {
  const key = event.key;
  const move = (step) => { state.suspectSelected = Math.max(0, Math.min(state.suspectSelected + step, state.suspects.length - 1)); renderSuspects(); };
  if (key === "Enter") { fixSuspect(state.suspectSelected, "move"); return true; }
  if (key === "k" || key === "K") { fixSuspect(state.suspectSelected, "keep"); return true; }
  if (key === "Backspace" || key === "Delete") { fixSuspect(state.suspectSelected, "remove"); return true; }
  if (key === "ArrowDown" || key === "ArrowRight" || key === "j") { move(1); return true; }
  if (key === "ArrowUp" || key === "ArrowLeft") { move(-1); return true; }
  return false;
}

document.addEventListener("keydown", (event) => {
  if ($("new-label").open || event.ctrlKey || event.metaKey || event.altKey || event.target.matches("input, textarea")) return;
  let handled = false;
  const key = event.key.toLowerCase();
  if (key === "q") { show("queue"); handled = true; }
  else if (key === "s") { show("suspects"); handled = true; }
  else if (key === "m") { show("model"); handled = true; }
  else if (key === "u") { undo(); handled = true; }
  else if (state.view === "queue") handled = onQueueKey(event);
  else if (state.view === "suspects") handled = onSuspectKey(event);
  if (handled) event.preventDefault();
});

for (const tab of document.querySelectorAll("nav button")) tab.addEventListener("click", () => show(tab.dataset.view));
$("queue-more").addEventListener("click", () => loadQueue(true).catch((e) => toast(e.message, true)));
$("new-label-name").addEventListener("keydown", (event) => {
  if (event.key === "Enter") { event.preventDefault(); $("new-label").close("ok"); }
});
// A scroll to the end of the queue loads the next page.
new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting) && state.groups.length < state.total) loadQueue(true).catch(() => {});
}).observe($("queue-more"));
show("queue");
loadSuspects().catch(() => {});
