// Shared by the console pages: the API key (this tab's sessionStorage only), fetch with it,
// sign-in and sign-out. Every value from the server is written with textContent.
"use strict";

const KEY_STORAGE = "imgpipe.apiKey";

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: `Bearer ${apiKey()}` });
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = Object.assign({}, options, { body: JSON.stringify(options.json) });
  }
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin("The API key was refused (unknown or revoked); sign in again.");
  }
  if (!response.ok) {
    let code = "error", message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      code = body.error || code;
      message = body.message || JSON.stringify(body.detail || body);
    } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

function setStatus(text, isError = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("workspace").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("whoami").textContent = "";
  document.getElementById("login-error").textContent = message || "";
}

// onSignedIn(queue) runs once the key answers GET /v1/review/queue.
function setUpSignIn(onSignedIn) {
  const start = async () => {
    try {
      const queue = await (await api("/v1/review/queue")).json();
      document.getElementById("login").hidden = true;
      document.getElementById("workspace").hidden = false;
      document.getElementById("signout").hidden = false;
      document.getElementById("whoami").textContent = `signed in as ${queue.reviewer}`;
      onSignedIn(queue);
    } catch (err) {
      if (err.status !== 401) showLogin(err.message);
    }
  };
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    input.value = "";
    start();
  });
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    location.reload();
  });
  if (apiKey()) start(); else showLogin("");
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  if (value === null || value === undefined) return "–";
  return typeof value === "string" ? value : JSON.stringify(value);
}
