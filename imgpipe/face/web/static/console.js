// The review console: lease the next item, show it, decide with one key press.
// a = the mildest verdict (allow / pass), b = the most severe (block / fail), s = skip,
// h = heat map, x = boxes.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const EMPTY_POLL_MS = 3000;
// /console?pipeline=NAME works the queue of one pipeline only.
const PIPELINE = new URLSearchParams(location.search).get("pipeline");
const PIPELINE_QUERY = PIPELINE ? `?pipeline=${encodeURIComponent(PIPELINE)}` : "";
const state = {
  item: null, busy: false, skipped: [], leaseS: 120, renewTimer: null, emptyTimer: null,
  blobUrls: [], shown: 0,
};

function clearTimers() {
  clearInterval(state.renewTimer);
  clearTimeout(state.emptyTimer);
  state.renewTimer = state.emptyTimer = null;
}

async function refreshCount() {
  try {
    const queue = await (await api(`/v1/review/queue${PIPELINE_QUERY}`)).json();
    document.getElementById("queue-count").textContent =
      `queue: ${queue.waiting} waiting, ${queue.leased} on screens`;
  } catch (_) { /* the status line already says why */ }
}

async function imageUrl(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  state.blobUrls.push(url);
  return url;
}

function releaseBlobs() {
  state.blobUrls.forEach((url) => URL.revokeObjectURL(url));
  state.blobUrls = [];
}

function drawBoxes(item) {
  const svg = document.getElementById("boxes");
  svg.replaceChildren();
  const width = item.width || 1, height = item.height || 1;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const fontSize = Math.max(width, height) / 45;
  const list = document.getElementById("box-list");
  list.replaceChildren();
  for (const b of item.boxes) {
    const [x1, y1, x2, y2] = b.box;
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("x", x1);
    rect.setAttribute("y", y1);
    rect.setAttribute("width", Math.max(0, x2 - x1));
    rect.setAttribute("height", Math.max(0, y2 - y1));
    rect.setAttribute("stroke-width", "2");
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    const label = document.createElementNS(SVG_NS, "text");
    label.setAttribute("x", x1 + 2);
    label.setAttribute("y", Math.max(fontSize, y1 - 4));
    label.setAttribute("font-size", fontSize);
    label.setAttribute("stroke-width", fontSize / 6);
    label.textContent = `${b.label} ${b.score.toFixed(2)}`;
    svg.append(rect, label);
    const li = document.createElement("li");
    li.textContent = `${b.label} ${b.score.toFixed(2)} at [${b.box.map((v) => Math.round(v)).join(", ")}]`;
    list.appendChild(li);
  }
  if (!item.boxes.length) {
    const li = document.createElement("li");
    li.textContent = "none";
    list.appendChild(li);
  }
}

function fillRules(item) {
  const body = document.querySelector("#rules tbody");
  body.replaceChildren();
  for (const r of item.rules) {
    const row = document.createElement("tr");
    row.classList.toggle("hit", r.matched);
    cell(row, `${r.stage}.${r.field} ${r.op}`);
    cell(row, r.found ? formatValue(r.actual) : "not computed");
    cell(row, formatValue(r.value));
    cell(row, r.matched ? r.verdict : "");
    body.appendChild(row);
  }
  const block = document.getElementById("moderation-block");
  const moderation = item.moderation;
  block.hidden = !moderation;
  const mbody = document.querySelector("#moderation tbody");
  mbody.replaceChildren();
  if (!moderation) return;
  const scores = Object.entries(moderation.scores || {}).sort((a, b) => b[1] - a[1]);
  for (const [category, score] of scores) {
    const limits = (moderation.thresholds || {})[category] || {};
    const row = document.createElement("tr");
    const over = [limits.review, limits.block].some((t) => typeof t === "number" && score >= t);
    row.classList.toggle("hit", over);
    cell(row, category);
    cell(row, formatValue(score));
    cell(row, formatValue(limits.review));
    cell(row, formatValue(limits.block));
    mbody.appendChild(row);
  }
}

function fillDecisions(item) {
  const box = document.getElementById("decisions");
  box.replaceChildren();
  item.choices.forEach((choice, index) => {
    const button = document.createElement("button");
    button.type = "button";
    const keyName = index === 0 ? "a" : index === item.choices.length - 1 ? "b" : "";
    button.textContent = keyName ? `${choice} [${keyName}]` : choice;
    button.className = index === 0 ? "primary" : "danger";
    button.dataset.decision = choice;
    button.addEventListener("click", () => decide(choice));
    box.appendChild(button);
  });
}

async function show(item) {
  releaseBlobs();
  state.item = item;
  state.shown += 1;
  const section = document.getElementById("item");
  document.getElementById("empty").hidden = true;
  section.hidden = false;
  section.dataset.jobId = item.job_id;
  document.getElementById("job-id").textContent = item.job_id;
  document.getElementById("pipeline").textContent = item.pipeline;
  document.getElementById("finished").textContent = item.finished_at || "";
  document.getElementById("score").textContent = formatValue(item.score);
  document.getElementById("lease").textContent = item.lease ? item.lease.expires_at : "";
  const reasons = document.getElementById("reasons");
  reasons.replaceChildren(...item.reasons.map((r) => {
    const li = document.createElement("li");
    li.textContent = typeof r === "string" ? r : JSON.stringify(r);
    return li;
  }));
  document.getElementById("note").value = "";
  drawBoxes(item);
  fillRules(item);
  fillDecisions(item);
  const heatmap = document.getElementById("heatmap");
  heatmap.hidden = true;
  heatmap.removeAttribute("src");
  document.getElementById("toggle-heatmap").disabled = !item.has_heatmap;
  document.getElementById("toggle-heatmap").setAttribute("aria-pressed", "false");
  const original = document.getElementById("original");
  original.src = item.image_sha256
    ? await imageUrl(`/v1/images/${item.image_sha256}/original`) : "";
  section.dataset.ready = "true";
  clearTimers();
  state.renewTimer = setInterval(renew, (state.leaseS * 1000) / 3);
}

function showEmpty() {
  releaseBlobs();
  state.item = null;
  const section = document.getElementById("item");
  section.hidden = true;
  section.dataset.jobId = "";
  section.dataset.ready = "false";
  document.getElementById("empty").hidden = false;
  clearTimers();
  state.emptyTimer = setTimeout(loadNext, EMPTY_POLL_MS);
}

async function loadNext() {
  clearTimers();
  document.getElementById("item").dataset.ready = "false";
  const order = document.getElementById("order").value;
  try {
    const response = await api("/v1/review/next", {
      method: "POST", json: { order, exclude: state.skipped.slice(-1000), pipeline: PIPELINE },
    });
    if (response.status === 204) showEmpty(); else await show(await response.json());
  } catch (err) {
    setStatus(`could not load the next item: ${err.message}`, true);
    state.emptyTimer = setTimeout(loadNext, EMPTY_POLL_MS);
  }
  refreshCount();
}

async function decide(decision) {
  const item = state.item;
  if (!item || state.busy) return;
  state.busy = true;
  try {
    const note = document.getElementById("note").value.trim();
    const response = await api(`/v1/review/items/${item.job_id}/decision`, {
      method: "POST", json: note ? { decision, note } : { decision },
    });
    const outcome = await response.json();
    setStatus(`${outcome.job_id.slice(0, 8)}: ${outcome.decision} (stored at ${outcome.at})`);
  } catch (err) {
    setStatus(`${item.job_id.slice(0, 8)} not decided: ${err.message}`, true);
  }
  try {
    await loadNext();
  } finally {
    state.busy = false;
  }
}

async function skip() {
  const item = state.item;
  if (!item || state.busy) return;
  state.busy = true;
  state.skipped.push(item.job_id);
  try {
    await api(`/v1/review/items/${item.job_id}/lease`, { method: "DELETE" });
    setStatus(`${item.job_id.slice(0, 8)} skipped; back in the queue for the others`);
  } catch (err) {
    setStatus(`skip: ${err.message}`, true);
  }
  try {
    await loadNext();
  } finally {
    state.busy = false;
  }
}

async function renew() {
  const item = state.item;
  if (!item) return;
  try {
    const lease = await (await api(`/v1/review/items/${item.job_id}/lease`, { method: "POST" })).json();
    document.getElementById("lease").textContent = lease.expires_at;
  } catch (err) {
    if (err.status === 409) {
      setStatus(`lost the lease on ${item.job_id.slice(0, 8)}: ${err.message}`, true);
      loadNext();
    }
  }
}

async function toggleHeatmap() {
  const item = state.item;
  if (!item || !item.has_heatmap) return;
  const heatmap = document.getElementById("heatmap");
  if (heatmap.hidden && !heatmap.getAttribute("src")) {
    heatmap.src = await imageUrl(`/v1/images/${item.image_sha256}/heatmap?job_id=${item.job_id}`);
  }
  heatmap.hidden = !heatmap.hidden;
  document.getElementById("toggle-heatmap").setAttribute("aria-pressed", String(!heatmap.hidden));
}

function toggleBoxes() {
  const off = document.getElementById("boxes").classList.toggle("off");
  document.getElementById("toggle-boxes").setAttribute("aria-pressed", String(!off));
}

function onKey(event) {
  const target = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (target instanceof HTMLInputElement || target instanceof HTMLSelectElement) return;
  const item = state.item;
  const key = event.key.toLowerCase();
  if (key === "a" && item) decide(item.choices[0]);
  else if (key === "b" && item) decide(item.choices[item.choices.length - 1]);
  else if (key === "s") skip();
  else if (key === "h") toggleHeatmap();
  else if (key === "x") toggleBoxes();
  else return;
  event.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("skip").addEventListener("click", skip);
  document.getElementById("toggle-heatmap").addEventListener("click", toggleHeatmap);
  document.getElementById("toggle-boxes").addEventListener("click", toggleBoxes);
  document.getElementById("order").addEventListener("change", () => { if (!state.busy) loadNext(); });
  document.addEventListener("keydown", onKey);
  setUpSignIn((queue) => {
    state.leaseS = queue.lease_s;
    loadNext();
  });
});
