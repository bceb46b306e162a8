// Builds: an app's builds; one build (?build=ID) with its steps, its log streaming while it
// runs (GET /v1/builds/ID/logs?follow=1, as `builds logs --follow`), its test output and
// its scan findings.
import { api, appPicker, badge, clearError, fill, h, param, readJson, setParams, showError, when } from "./common.js";

const listBody = document.querySelector("#builds tbody");
const section = document.getElementById("build");
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const active = (b) => !TERMINAL.has(b.state);
let app = null;
let shown = null; // the build whose log streams
let stream = null; // its AbortController
let listTimer = null;

async function loadList() {
  if (!app) return;
  try {
    const builds = await api("GET", `/v1/builds?app=${encodeURIComponent(app)}`);
    fill(
      listBody,
      builds.map((b) =>
        h("tr", { "data-build": b.id, class: b.id === shown ? "selected" : null },
          h("td", {}, h("a", { href: `/ui/builds?app=${encodeURIComponent(app)}&build=${encodeURIComponent(b.id)}`,
            onclick: (e) => { e.preventDefault(); openBuild(b.id); } }, b.id)),
          h("td", {}, badge(b.state)),
          h("td", { class: "mono" }, b.commit.slice(0, 12)),
          h("td", {}, when(b.started_ms || b.created_ms)),
          h("td", { class: "err" }, b.reason || ""))),
      "no builds yet: connect a repository with `pleaco apps connect` and push",
    );
    // Refreshed while a build is under way, for its state; a finished list stays as it is.
    clearTimeout(listTimer);
    if (builds.some(active)) listTimer = setTimeout(loadList, 3000);
  } catch (e) {
    showError("Listing builds", e);
  }
}

function summary(b) {
  return h("dl", { class: "summary", id: "build-summary" },
    h("dt", {}, "State"), h("dd", { id: "build-state" }, badge(b.state)),
    h("dt", {}, "Commit"), h("dd", { class: "mono" }, `${b.commit} (${b.branch})`),
    h("dt", {}, "Node"), h("dd", { class: "mono" }, b.node ? b.node.slice(0, 12) : "—"),
    h("dt", {}, "Steps"), h("dd", {}, Object.entries(b.steps || {}).map(([k, v]) => `${k} ${v} s`).join(", ") || "—"),
    h("dt", {}, "Release"), h("dd", {}, b.release ? `revision ${b.release}` : "—"),
    b.reason ? [h("dt", {}, "Reason"), h("dd", { class: "err" }, b.reason)] : null);
}

function renderBuild(b) {
  const parts = [h("h2", {}, b.id), summary(b)];
  if (active(b)) {
    parts.push(h("button", { type: "button", id: "cancel-build", class: "danger", onclick: () => cancel(b.id) }, "Cancel build"));
  }
  parts.push(h("h3", {}, "Log"), h("pre", { id: "build-log", class: "log" }));
  section.replaceChildren(...parts);
  section.hidden = false;
}

function renderResults(b) {
  document.getElementById("build-results")?.remove();
  const box = h("div", { id: "build-results" });
  const parts = [];
  if (b.test && Object.keys(b.test).length) {
    parts.push(h("h3", {}, `Tests (exit code ${b.test.exit_code})`), h("pre", { id: "test-output", class: "log" }, b.test.output || ""));
  }
  if (b.scan && Object.keys(b.scan).length) {
    const findings = b.scan.findings || [];
    parts.push(
      h("h3", {}, `Scan: ${b.scan.scanner}`),
      h("p", { id: "scan-summary" }, `${b.scan.packages ?? "?"} packages, ${findings.length} findings, ${b.scan.blocking} at or above ${b.scan.fail_on}`),
      findings.length
        ? h("div", { class: "scroll" }, h("table", { id: "findings" },
          h("thead", {}, h("tr", {}, ["Severity", "Advisory", "Package", "Installed", "Fixed in", "Summary"].map((t) => h("th", {}, t)))),
          h("tbody", {}, findings.map((f) => h("tr", {}, h("td", {}, badge(f.severity)), h("td", {}, f.id), h("td", {}, f.package),
            h("td", {}, f.installed), h("td", {}, f.fixed || "—"), h("td", {}, f.summary))))))
        : null,
    );
  }
  box.append(...parts.filter(Boolean));
  section.append(box);
}

async function openBuild(id) {
  clearError();
  stream?.abort();
  shown = id;
  setParams({ app, build: id });
  let b;
  try {
    b = await api("GET", `/v1/builds/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(`Reading build ${id}`, e);
    return;
  }
  renderBuild(b);
  loadList();
  await follow(id);
  if (shown !== id) return;
  try {
    const done = await api("GET", `/v1/builds/${encodeURIComponent(id)}`);
    document.getElementById("build-summary").replaceWith(summary(done));
    document.getElementById("cancel-build")?.remove();
    renderResults(done);
    loadList();
  } catch (e) {
    showError(`Reading build ${id}`, e);
  }
}

// Streams the log into the page as it is written; returns when the build's log ends.
async function follow(id) {
  const log = document.getElementById("build-log");
  stream = new AbortController();
  let resp;
  try {
    resp = await fetch(`/v1/builds/${encodeURIComponent(id)}/logs?follow=1`, { credentials: "same-origin", signal: stream.signal });
  } catch (e) {
    if (e.name !== "AbortError") showError("Reading the build log", e);
    return;
  }
  if (!resp.ok) {
    try {
      await readJson(resp);
    } catch (e) {
      showError("Reading the build log", e);
    }
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(decoder.decode(value, { stream: true }));
      if (atEnd) log.scrollTop = log.scrollHeight;
    }
  } catch (e) {
    if (e.name !== "AbortError") showError("Reading the build log", e);
  }
}

async function cancel(id) {
  if (!confirm(`Cancel build ${id}?`)) return;
  try {
    await api("POST", `/v1/builds/${encodeURIComponent(id)}/cancel`);
  } catch (e) {
    showError("Cancelling", e);
  }
}

appPicker((name) => {
  app = name;
  stream?.abort();
  section.hidden = true;
  shown = null;
  loadList();
  const wanted = param("build");
  if (wanted) openBuild(wanted);
});
