// Apps: every app, live; one app (?app=NAME) with its replicas per node, releases,
// autoscaling and the actions (deploy an image, scale, roll back, remove), each one call
// to the same /v1 endpoint as the CLI's.
import { api, badge, clearError, fill, h, live, param, showError, when } from "./common.js";

const listBody = document.querySelector("#apps tbody");
const section = document.getElementById("app");
const selected = param("app");
let current = null; // the selected app as the last event showed it
let releasesOf = null; // the revision whose release list is shown
let nodeNames = {};
let proxy = null; // GET /v1/proxy as last read: this node's proxy and its routes
let jobs = null; // the live "jobs" topic (GET /v1/jobs) as last sent

function renderList(apps) {
  fill(
    listBody,
    apps.map((a) =>
      h(
        "tr",
        { "data-app": a.name, class: a.name === selected ? "selected" : null },
        h("td", {}, h("a", { href: `/ui/apps?app=${encodeURIComponent(a.name)}` }, a.name)),
        h("td", {}, badge(a.state)),
        h("td", { class: "mono" }, a.image),
        h("td", {}, `${a.healthy}/${a.replicas}`),
        h("td", {}, a.host || "default"),
      ),
    ),
    "no apps yet: deploy one with `pleaco apps deploy NAME --image IMAGE`",
  );
}

// The parts of the detail that change with every event; the forms stay as they are.
const el = {};

function skeleton(name) {
  el.summary = h("dl", { class: "summary" });
  el.message = h("p", { class: "message", id: "app-message" });
  el.replicas = h("tbody");
  el.releases = h("tbody");
  el.autoscale = h("div", { id: "autoscale" });
  el.jobs = h("div", { id: "jobs" });
  el.notice = h("p", { class: "notice", id: "app-notice", role: "status" });
  el.scaleInput = h("input", { type: "number", min: 0, id: "scale-replicas", required: true, "aria-label": "replicas" });
  el.imageInput = h("input", { type: "text", id: "deploy-image", required: true, "aria-label": "image" });
  const scaleForm = h("form", { class: "row", id: "scale-form", onsubmit: (e) => { e.preventDefault(); scale(); } },
    h("label", {}, "Replicas ", el.scaleInput), h("button", { type: "submit", id: "scale-button" }, "Scale"));
  const deployForm = h("form", { class: "row", id: "deploy-form", onsubmit: (e) => { e.preventDefault(); deploy(); } },
    h("label", {}, "Image ", el.imageInput), h("button", { type: "submit", id: "deploy-button" }, "Deploy"));
  const buttons = h("div", { class: "row" },
    h("button", { type: "button", id: "rollback", onclick: rollback }, "Roll back"),
    h("button", { type: "button", id: "remove", class: "danger", onclick: remove }, "Remove"));
  section.replaceChildren(
    h("h2", {}, name),
    el.summary,
    el.message,
    h("h3", {}, "Actions"),
    scaleForm, deployForm, buttons, el.notice,
    h("h3", {}, "Replicas"),
    h("div", { class: "scroll" }, h("table", { id: "replicas" },
      h("thead", {}, h("tr", {}, ["Replica", "Node", "Release", "State", "Health", "Restarts", "Address", "Last error"]
        .map((t) => h("th", {}, t)))), el.replicas)),
    h("h3", {}, "Releases"),
    h("div", { class: "scroll" }, h("table", { id: "releases" },
      h("thead", {}, h("tr", {}, ["Revision", "Image", "Created", "Note"].map((t) => h("th", {}, t)))), el.releases)),
    h("h3", {}, "Autoscaling"),
    el.autoscale,
    h("h3", {}, "Scheduled jobs"),
    el.jobs,
  );
  section.hidden = false;
}

function term(k, v) {
  return [h("dt", {}, k), h("dd", {}, v)];
}

function renderApp(a) {
  const first = current === null;
  current = a;
  if (first) {
    el.scaleInput.value = a.replicas;
    el.imageInput.value = a.image;
  }
  el.summary.replaceChildren(
    ...term("State", badge(a.state)),
    ...term("Image", h("span", { class: "mono", id: "app-image" }, a.image)),
    ...term("Revision", h("span", { id: "app-revision" }, String(a.revision))),
    ...term("Replicas", h("span", { id: "app-replicas" }, `${a.healthy} healthy, ${a.running} running, ${a.replicas} wanted`)),
    ...term("Host", h("span", { id: "app-host" }, served(a).host)),
    ...term("HTTPS", h("span", { id: "app-https" }, served(a).https)),
    ...term("Port", a.port ? `${a.port}${a.health ? `, health ${a.health}` : ""}` : "none"),
    ...(a.rollback ? term("Rolled back", `from ${a.rollback.from} to ${a.rollback.to}: ${a.rollback.reason || ""}`) : []),
  );
  el.message.textContent = a.message || "";
  el.message.hidden = !a.message;
  fill(
    el.replicas,
    a.instances.map((i) =>
      h(
        "tr",
        { "data-replica": i.replica, "data-release": i.release },
        h("td", {}, String(i.replica)),
        h("td", {}, nodeNames[i.node] || (i.node || "").slice(0, 12)),
        h("td", {}, String(i.release)),
        h("td", {}, badge(i.state)),
        h("td", {}, i.healthy ? badge("healthy") : badge("unhealthy")),
        h("td", {}, String(i.restarts)),
        h("td", { class: "mono" }, i.address || "—"),
        h("td", { class: "err" }, i.error || ""),
      ),
    ),
    "no replicas",
  );
  renderAutoscale(a);
  renderJobs(a.name);
  if (releasesOf !== a.revision) {
    releasesOf = a.revision;
    loadReleases(a.name);
    loadProxy(); // the host and HTTPS mode are part of the release
  }
}

// The app's host name and HTTPS state as this node's proxy serves it.
function served(a) {
  const route = proxy?.routes?.find((r) => r.app === a.name);
  const host = route ? route.host : a.host || `${a.name}.<cluster domain>`;
  const mode = { on: "HTTP and HTTPS", redirect: "HTTPS (HTTP redirects)", off: "HTTP only" }[a.https] || a.https;
  let state;
  if (!proxy) state = "";
  else if (!proxy.enabled) state = " · no proxy on this node";
  else if (!proxy.up) state = ` · proxy down${proxy.error ? `: ${proxy.error}` : ""}`;
  else if (!route) state = " · not routed yet";
  else state = ` · served on ${proxy.listen}${a.https !== "off" ? ` and ${proxy.https_listen}` : ""}, ${route.upstreams.length} upstreams`;
  return { host, https: mode + state };
}

async function loadProxy() {
  try {
    proxy = await api("GET", "/v1/proxy");
  } catch (e) {
    showError("Reading the proxy's routes", e);
  }
  if (current) renderApp(current);
}

function renderAutoscale(a) {
  if (!a.autoscale) {
    el.autoscale.replaceChildren(h("p", { class: "muted" }, "off: the replica count is set by hand (pleaco apps autoscale)"));
    return;
  }
  const p = a.autoscale;
  const s = a.autoscaler || {};
  const decisions = [...(s.decisions || [])].reverse();
  el.autoscale.replaceChildren(
    h("p", { id: "autoscale-policy" }, `${p.min_replicas} to ${p.max_replicas} replicas, ${p.metric} target ${p.target} per replica` +
      (s.panic ? " (panic)" : "") + (s.decided_by ? `, decided by ${nodeNames[s.decided_by] || s.decided_by.slice(0, 12)}` : "")),
    decisions.length
      ? h("ul", { class: "decisions" }, decisions.map((d) =>
        h("li", {}, `${when(d.at_ms)}: ${d.from} → ${d.to} on ${nodeNames[d.node] || (d.node || "").slice(0, 12)}: ${d.reason}`)))
      : h("p", { class: "muted" }, "no decision yet"),
  );
}

// The app's schedules (`pleaco jobs ls APP`) and their last runs, from the live "jobs"
// topic (the JSON of GET /v1/jobs, every app's).
function renderJobs(name) {
  if (!jobs) return;
  const schedules = jobs.schedules.filter((s) => s.app === name);
  if (!schedules.length) {
    el.jobs.replaceChildren(h("p", { class: "muted" }, "none ([jobs] in the app's pleaco.toml, or pleaco jobs schedule)"));
    return;
  }
  const runsOf = (s) => jobs.runs.filter((r) => r.app === name && r.name === s.name);
  el.jobs.replaceChildren(h("ul", { class: "jobs" }, schedules.map((s) =>
    h("li", { "data-job": s.name },
      h("span", { class: "mono" }, `${s.name}: ${s.cron} · ${s.command.join(" ")}`),
      s.next_at ? ` · next ${when(s.next_at * 1000)}` : "",
      h("ul", {}, runsOf(s).map((r) => h("li", { "data-run": r.id },
        `${when(r.at * 1000)} on ${nodeNames[r.node] || (r.node || "").slice(0, 12)}: `, badge(r.state),
        r.exit_code === null || r.exit_code === undefined ? "" : ` exit ${r.exit_code}`,
        r.duration === null || r.duration === undefined ? "" : ` in ${r.duration.toFixed(1)} s`,
        r.reason ? ` (${r.reason})` : "")))))));
}

async function loadReleases(name) {
  try {
    const releases = await api("GET", `/v1/apps/${encodeURIComponent(name)}/releases`);
    fill(
      el.releases,
      releases.reverse().map((r) =>
        h("tr", { "data-revision": r.revision },
          h("td", {}, String(r.revision)),
          h("td", { class: "mono" }, r.image),
          h("td", {}, when(r.created_ms)),
          h("td", {}, r.rollback_of ? `rollback to ${r.rollback_of}${r.reason ? `: ${r.reason}` : ""}` :
            r.commit ? `build ${String(r.commit).slice(0, 12)}` : ""))),
      "no release yet",
    );
  } catch (e) {
    showError("Listing releases", e);
  }
}

// One action: the button is disabled while the API answers; its error is shown as the API
// gave it, and nothing else is done.
async function act(what, buttonId, call, done) {
  const button = document.getElementById(buttonId);
  clearError();
  el.notice.textContent = "";
  if (button) button.disabled = true;
  try {
    const result = await call();
    el.notice.textContent = done(result);
  } catch (e) {
    showError(what, e);
  } finally {
    if (button) button.disabled = false;
  }
}

const path = () => `/v1/apps/${encodeURIComponent(current.name)}`;

function scale() {
  const n = Number(el.scaleInput.value);
  act("Scaling", "scale-button", () => api("POST", `${path()}/scale`, { replicas: n }),
    (a) => `${a.name} scaled to ${a.replicas} replicas`);
}

function deploy() {
  // A deploy is the whole spec (PUT /v1/apps/NAME, as `apps deploy`): the current one with the new image.
  const a = current;
  const body = { image: el.imageInput.value.trim() };
  for (const k of ["port", "env", "health", "host", "https", "memory", "cpus", "pids", "max_conns"]) {
    if (a[k] !== null && a[k] !== undefined) body[k] = a[k];
  }
  act("Deploying", "deploy-button", () => api("PUT", path(), body), (r) => `deployed ${r.image} as revision ${r.revision}`);
}

function rollback() {
  if (!confirm(`Roll ${current.name} back to the release before revision ${current.revision}?`)) return;
  act("Rolling back", "rollback", () => api("POST", `${path()}/rollback`), (r) => `rolled back: revision ${r.revision} runs ${r.image}`);
}

function remove() {
  if (!confirm(`Remove ${current.name} and stop all its replicas? This cannot be undone.`)) return;
  act("Removing", "remove", () => api("DELETE", path()), (r) => `${r.removed} removed`);
}

function onApps(apps) {
  renderList(apps);
  if (!selected) return;
  const a = apps.find((x) => x.name === selected);
  if (a) {
    if (current === null) skeleton(a.name);
    renderApp(a);
  } else {
    section.hidden = false;
    section.replaceChildren(h("h2", {}, selected), h("p", { class: "message", id: "app-message" },
      current ? `${selected} was removed.` : `No app named ${selected}.`));
  }
}

live({
  apps: onApps,
  nodes: (nodes) => { nodeNames = Object.fromEntries(nodes.map((n) => [n.id, n.name || n.id.slice(0, 12)])); },
  jobs: (j) => { jobs = j; if (current && el.jobs) renderJobs(current.name); },
});
