// What every page shares: API calls with the session cookie and the CSRF token, error
// messages, DOM building without innerHTML, the live-events connection and the app picker.

const csrf = document.querySelector('meta[name="pleaco-csrf"]')?.content ?? "";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Calls the same /v1 endpoint the CLI calls; the answer's JSON, or an ApiError with the
// API's own message.
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-Pleaco-CSRF"] = csrf;
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "unreachable", `the agent did not answer (${e.message})`);
  }
  return readJson(resp);
}

export async function readJson(resp) {
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (resp.status === 401) {
    location.assign("/ui/login");
  }
  if (!resp.ok) {
    const err = data && data.error ? data.error : {};
    throw new ApiError(resp.status, err.code || "http_error", err.message || `${resp.status} ${resp.statusText}`);
  }
  return data;
}

const banner = document.getElementById("error");

export function showError(what, err) {
  const detail = err instanceof ApiError ? `${err.message} (${err.code}, HTTP ${err.status})` : String(err);
  banner.textContent = `${what} failed: ${detail}`;
  banner.hidden = false;
}

export function clearError() {
  banner.hidden = true;
  banner.textContent = "";
}

// h("td", {class: "x", onclick: f}, "text", child): an element; strings become text nodes.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { colspan: 20, class: "muted" }, empty))]));
}

export function badge(state) {
  return h("span", { class: `badge s-${String(state).replace(/[^a-z_]/g, "")}` }, state);
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "—";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

export function when(ms) {
  return ms ? new Date(ms).toLocaleString() : "—";
}

const liveMark = document.getElementById("live");

function setLive(state) {
  liveMark.textContent = state;
  liveMark.className = `live ${state === "live" ? "on" : state ? "retry" : ""}`;
}

// Server-sent events from /v1/events: handlers[topic](json) for each event. EventSource
// reconnects by itself; a session that ended sends the page to the login form.
export function live(handlers) {
  setLive("connecting");
  const es = new EventSource(`/v1/events?topics=${Object.keys(handlers).join(",")}`);
  for (const [topic, fn] of Object.entries(handlers)) {
    es.addEventListener(topic, (e) => {
      setLive("live");
      fn(JSON.parse(e.data));
    });
  }
  es.addEventListener("open", () => setLive("live"));
  es.addEventListener("error", () => {
    setLive("reconnecting");
    api("GET", "/v1/status").catch(() => {}); // a 401 there goes to the login form
  });
  return es;
}

export function param(name) {
  return new URLSearchParams(location.search).get(name);
}

export function setParams(params) {
  const q = new URLSearchParams(location.search);
  for (const [k, v] of Object.entries(params)) {
    if (v) q.set(k, v);
    else q.delete(k);
  }
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

// Fills the page's app <select> with every app, selects ?app= (or the first), and calls
// onPick(name) with the choice now and on every change.
export async function appPicker(onPick) {
  const select = document.getElementById("app-select");
  let apps;
  try {
    apps = await api("GET", "/v1/apps");
  } catch (e) {
    showError("Listing apps", e);
    return;
  }
  const names = apps.map((a) => a.name);
  select.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  const wanted = param("app");
  const first = names.includes(wanted) ? wanted : names[0];
  if (!first) {
    select.replaceChildren(h("option", { value: "" }, "no apps yet"));
    return;
  }
  select.value = first;
  select.addEventListener("change", () => {
    setParams({ app: select.value, build: null });
    onPick(select.value);
  });
  onPick(first);
}

document.getElementById("logout")?.addEventListener("click", async () => {
  try {
    await api("POST", "/ui/logout");
  } catch (e) {
    showError("Logging out", e);
    return;
  }
  location.assign("/ui/login");
});
