// The review history: every decision, newest first, with filters and pages.
"use strict";

const PAGE = 50;
let offset = 0;

function query() {
  const form = new FormData(document.getElementById("filters"));
  const params = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
  for (const [name, value] of form.entries()) {
    const text = String(value).trim();
    if (!text) continue;
    // datetime-local has no zone: the server reads a time without one as UTC, as the
    // table shows it.
    params.set(name, text);
  }
  return params;
}

async function load() {
  try {
    const page = await (await api(`/v1/review/history?${query()}`)).json();
    const body = document.querySelector("#history tbody");
    body.replaceChildren();
    for (const d of page.items) {
      const row = document.createElement("tr");
      cell(row, d.at.replace("T", " ").slice(0, 19));
      cell(row, d.decision);
      cell(row, d.reviewer);
      cell(row, d.job_id).classList.add("mono");
      cell(row, d.pipeline);
      cell(row, d.note);
      body.appendChild(row);
    }
    const last = Math.min(offset + page.items.length, page.total);
    document.getElementById("total").textContent =
      `${page.total} decision(s); showing ${page.total ? offset + 1 : 0}–${last}`;
    document.getElementById("prev").disabled = offset === 0;
    document.getElementById("next").disabled = last >= page.total;
    setStatus("");
  } catch (err) {
    setStatus(`could not load the history: ${err.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    offset = 0;
    load();
  });
  document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  document.getElementById("next").addEventListener("click", () => { offset += PAGE; load(); });
  setUpSignIn(() => load());
});
