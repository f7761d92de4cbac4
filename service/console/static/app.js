// The console's page logic: sign in, health, try it, make an edit, the edits table, one edit's page,
// rollback and the audit. Every value from the service is written with textContent, never as HTML.

import { Api, ApiError } from "./api.js";
import { histogram, parsePrometheus, value } from "./metrics.js";
import { drawEditsPlot } from "./plot.js";

const ROLES = ["read", "edit", "admin"];
const KEY_STORE = "horen-console-key";
const PLOT_PAGES = 5; // the plot reads at most this many pages of 1000 edits

const $ = (id) => document.getElementById(id);
const state = {
  api: null,
  session: null,
  page: { offset: 0, limit: 25, q: "", status: "" },
  total: 0,
  allEdits: [],
  allTotal: 0,
};

function allows(needed) {
  return state.session && ROLES.indexOf(state.session.role) >= ROLES.indexOf(needed);
}

function node(tag, props = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") n.textContent = v;
    else if (k === "dataset") Object.assign(n.dataset, v);
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v);
  }
  n.append(...children);
  return n;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function announce(text) {
  $("status").textContent = text;
}

function showError(err, where) {
  const message = err instanceof ApiError
    ? `${where}: ${err.message} (${err.type}${err.status ? `, HTTP ${err.status}` : ""})`
    : `${where}: ${err && err.message ? err.message : String(err)}`;
  $("notice-text").textContent = message;
  $("notice").hidden = false;
  if (err instanceof ApiError && err.status === 401 && state.session) {
    $("notice-text").textContent += " Sign in again with a valid key.";
  }
}

function clearError() {
  $("notice").hidden = true;
  $("notice-text").textContent = "";
}

// run fn with the button disabled, so a slow request cannot be sent twice; errors are shown, not thrown
async function busy(button, where, fn) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (err) {
    showError(err, where);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---- sign in -----------------------------------------------------------------------------

async function signIn(key) {
  const api = new Api(key);
  const session = await api.get("/console/session");
  state.api = api;
  state.session = session;
  sessionStorage.setItem(KEY_STORE, key);
  clearError();
  const name = session.name ? `${session.name}` : "anonymous (the service has no API keys)";
  $("who").textContent = `Signed in as ${name}, role ${session.role}`;
  $("who").hidden = false;
  $("sign-out").hidden = false;
  $("sign-in").hidden = true;
  $("console").hidden = false;
  for (const el of document.querySelectorAll("[data-needs]")) el.hidden = !allows(el.dataset.needs);
  announce(`Signed in with role ${session.role}`);
  await Promise.all([refreshHealth(), loadEdits(), refreshAllEdits(), allows("admin") ? loadAudit() : null]);
  await route();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  state.api = null;
  state.session = null;
  $("console").hidden = true;
  $("sign-in").hidden = false;
  $("who").hidden = true;
  $("sign-out").hidden = true;
  $("api-key").value = "";
  $("api-key").focus();
  announce("Signed out");
}

// ---- health ------------------------------------------------------------------------------

function fact(dl, term, text, props = {}) {
  dl.append(node("div", { class: "fact" }, node("dt", { text: term }), node("dd", { text, ...props })));
}

function seconds(s) {
  if (s == null) return "none yet";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

function latency(h) {
  return h.count ? `mean ${seconds(h.mean)}, p50 ${seconds(h.p50)}, p95 ${seconds(h.p95)} (${h.count})` : "none yet";
}

async function refreshHealth() {
  const [ready, models, metrics] = await Promise.allSettled([
    state.api.readiness(),
    state.api.get("/v1/models"),
    state.api.text("/metrics"),
  ]);
  const dl = $("health-facts");
  dl.replaceChildren();
  if (models.status === "fulfilled") fact(dl, "Model", models.value.data.map((m) => m.id).join(", "));
  if (ready.status === "fulfilled") {
    const r = ready.value;
    const d = r.detail || {};
    if (d.device) fact(dl, "Device", d.codebook_device && d.codebook_device !== d.device ? `${d.device} (codebook on ${d.codebook_device})` : d.device);
    if (d.module) fact(dl, "Edited module", d.module);
    if (d.entries != null) fact(dl, "Codebook entries", String(d.entries), { "data-testid": "entries" });
    if ("index" in d) fact(dl, "Index", d.index || "exhaustive (below the prefilter's size)");
    let sync = r.status;
    if (d.last_event_committed != null) sync += `: applied event ${d.last_event_applied} of ${d.last_event_committed}`;
    if (d.reason) sync += ` (${d.reason})`;
    fact(dl, "Replica sync", sync, { class: r.ok ? "ok" : "warn" });
  } else {
    fact(dl, "Readiness", `unknown: ${ready.reason.message}`, { class: "warn" });
  }
  if (metrics.status === "fulfilled") {
    const samples = parsePrometheus(metrics.value);
    fact(dl, "Edit latency", latency(histogram(samples, "horen_edit_latency_seconds")));
    fact(dl, "Generate latency", latency(histogram(samples, "horen_generate_latency_seconds")));
    const depth = value(samples, "horen_queue_depth");
    if (depth != null) fact(dl, "Queue depth", String(depth));
  }
}

async function refreshAllEdits() {
  const all = [];
  let total = 0;
  for (let page = 0; page < PLOT_PAGES; page++) {
    const body = await state.api.get("/edits", { limit: 1000, offset: page * 1000 });
    all.push(...body.items);
    total = body.total;
    if (all.length >= total || !body.items.length) break;
  }
  state.allEdits = all;
  state.allTotal = total;
  const summary = drawEditsPlot($("edits-plot"), all);
  $("edits-plot-caption").textContent = `Edits over time: ${summary}${total > all.length ? ` (the first ${all.length} of ${total})` : ""}`;
}

// ---- try it ------------------------------------------------------------------------------

function routingText(g) {
  if (!g) return "";
  if (g.edit_id == null || g.score == null) return "Not routed: no edit's key is within the threshold";
  return `Routed by edit #${g.edit_id}: score ${g.score.toFixed(3)} ≥ threshold ${g.threshold.toFixed(3)}`;
}

async function tryIt() {
  const prompt = $("try-prompt").value;
  const format = $("try-format").value;
  const tokens = Number($("try-tokens").value);
  const body = { prompt, format, max_new_tokens: Number.isFinite(tokens) ? tokens : $("try-tokens").value };
  for (const id of ["answer-with", "answer-without", "routing", "compare"]) $(id).textContent = "";
  $("answer-with").setAttribute("aria-busy", "true");
  $("answer-without").setAttribute("aria-busy", "true");
  const [withEdits, without] = await Promise.allSettled([
    state.api.post("/generate", { ...body, edits: true }),
    state.api.post("/generate", { ...body, edits: false }),
  ]);
  $("answer-with").removeAttribute("aria-busy");
  $("answer-without").removeAttribute("aria-busy");
  if (withEdits.status === "rejected") throw withEdits.reason;
  if (without.status === "rejected") throw without.reason;
  const a = withEdits.value;
  const b = without.value;
  $("answer-with").textContent = a.text;
  $("answer-without").textContent = b.text;
  const route = $("routing");
  route.replaceChildren();
  route.append(routingText(a));
  if (a.edit_id != null) route.append(" ", node("a", { href: `#edit/${a.edit_id}`, text: "see the edit" }));
  const same = a.text === b.text;
  $("compare").textContent = same ? "The two answers agree." : "The answers differ: the edits changed this answer.";
  $("compare").className = `compare ${same ? "same" : "differ"}`;
  announce(same ? "Answered; the two answers agree" : "Answered; the two answers differ");
}

// ---- make an edit ------------------------------------------------------------------------

async function makeEdit() {
  const prompt = $("edit-prompt").value;
  const format = $("edit-format").value;
  $("edit-result").textContent = "Training…";
  try {
    const body = { prompt, target: $("edit-target").value, format };
    const subject = $("edit-subject").value.trim();
    if (subject) body.subject = subject;
    const e = await state.api.post("/edits", body);
    const how = e.new_key ? "a new key" : `retrained entry ${e.entry_id}`;
    const about = e.subject ? ` It applies to prompts that name “${e.subject}”.` : " It applies to any prompt its key routes.";
    $("edit-result").replaceChildren(
      node("a", { href: `#edit/${e.id}`, text: `Edit #${e.id}` }),
      ` trained in ${e.train_ms.toFixed(0)} ms, ${e.steps} steps, ${how}.${about}`,
    );
    announce(`Edit ${e.id} trained`);
    $("try-prompt").value = prompt;
    $("try-format").value = format === "chat" ? "chat" : "plain";
    await Promise.all([loadEdits(), refreshAllEdits(), refreshHealth(), allows("admin") ? loadAudit() : null]);
    await tryIt();
  } catch (err) {
    $("edit-result").textContent = "";
    throw err;
  }
}

// ---- edits table -------------------------------------------------------------------------

function statusBadge(status) {
  return node("span", { class: `badge ${status}`, text: status === "rolled_back" ? "rolled back" : status });
}

function cell(label, content, cls) {
  const td = node("td", { "data-label": label });
  if (cls) td.className = cls;
  td.append(content);
  return td;
}

async function loadEdits() {
  const p = state.page;
  const body = await state.api.get("/edits", { limit: p.limit, offset: p.offset, q: p.q, status: p.status });
  state.total = body.total;
  const rows = body.items.map((e) => {
    const actions = node("div", { class: "row-actions" }, node("a", { href: `#edit/${e.id}`, text: "View", "aria-label": `View edit ${e.id}` }));
    if (allows("admin") && e.status === "active") {
      actions.append(node("button", { type: "button", class: "danger small", text: "Roll back", "aria-label": `Roll back edit ${e.id}`, onclick: (ev) => confirmRollback(e, ev.currentTarget) }));
    }
    return node(
      "tr",
      { dataset: { id: String(e.id) } },
      cell("#", String(e.id)),
      cell("Prompt", node("span", { class: "clip", text: e.prompt, title: e.prompt })),
      cell("Target", e.target),
      cell("Status", statusBadge(e.status)),
      cell("Who", e.created_by || "anonymous"),
      cell("When", node("time", { datetime: e.created_at, text: when(e.created_at) })),
      cell("Steps", String(e.steps), "num"),
      cell("Train ms", e.train_ms.toFixed(0), "num"),
      cell("Actions", actions),
    );
  });
  const tbody = $("edits-table").tBodies[0];
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    tbody.append(node("tr", {}, node("td", { colspan: "9", class: "empty", text: p.q || p.status ? "No edit matches." : "No edits yet." })));
  }
  const first = body.total ? p.offset + 1 : 0;
  const last = p.offset + body.items.length;
  $("edits-range").textContent = `${first}–${last} of ${body.total}`;
  $("edits-caption").textContent = `Edits ${first} to ${last} of ${body.total}`;
  $("edits-prev").disabled = p.offset === 0;
  $("edits-next").disabled = last >= body.total;
}

// ---- rollback ----------------------------------------------------------------------------

function confirmRollback(edit, opener) {
  const dialog = $("confirm");
  $("confirm-text").textContent = `Edit #${edit.id}: “${edit.prompt}” → “${edit.target}”. The model will answer as if it had never been made.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (opener && opener.isConnected) opener.focus();
    if (dialog.returnValue !== "ok") return;
    try {
      const e = await state.api.post(`/admin/edits/${edit.id}/rollback`);
      announce(`Edit ${e.id} rolled back`);
      const refresh = [loadEdits(), refreshAllEdits(), refreshHealth(), loadAudit()];
      await Promise.all(refresh);
      if (location.hash === `#edit/${edit.id}`) await route();
      if ($("try-prompt").value.trim()) await tryIt();
    } catch (err) {
      showError(err, `Rolling back edit #${edit.id}`);
    }
  };
  dialog.showModal();
}

// ---- audit -------------------------------------------------------------------------------

async function loadAudit() {
  const body = await state.api.get("/admin/audit", { limit: 50 });
  const rows = body.items.map((ev) =>
    node(
      "tr",
      {},
      cell("When", node("time", { datetime: ev.at, text: when(ev.at) })),
      cell("What", ev.kind === "rollback" ? "rolled back" : "edit"),
      cell("Edit", node("a", { href: `#edit/${ev.edit_id}`, text: `#${ev.edit_id}` })),
      cell("Who", ev.actor || "anonymous"),
      cell("Prompt", node("span", { class: "clip", text: ev.prompt, title: ev.prompt })),
      cell("Target", ev.target),
    ),
  );
  $("audit-table").tBodies[0].replaceChildren(...rows);
}

// ---- one edit's page ---------------------------------------------------------------------

function history(e) {
  const items = [];
  const by = (who) => who || "anonymous";
  items.push([e.created_at, e.new_key
    ? `Created by ${by(e.created_by)}, adding a new key (codebook entry ${e.entry_id}).`
    : `Created by ${by(e.created_by)}, retraining the key of codebook entry ${e.entry_id} (first made by edit #${e.entry_id}).`]);
  for (const other of state.allEdits) {
    if (other.id !== e.id && other.entry_id === e.entry_id && other.id > e.id) {
      items.push([other.created_at, `Its entry was retrained by edit #${other.id} (by ${by(other.created_by)}: “${other.target}”).`, other.id]);
    }
  }
  if (e.rolled_back_at) items.push([e.rolled_back_at, `Rolled back by ${by(e.rolled_back_by)}.`]);
  items.sort((a, b) => Date.parse(a[0]) - Date.parse(b[0]));
  return items;
}

async function showEditPage(id) {
  const e = await state.api.get(`/edits/${id}`);
  $("edit-page-title").textContent = `Edit #${e.id}`;
  const dl = $("edit-facts");
  dl.replaceChildren();
  fact(dl, "Prompt", e.prompt);
  fact(dl, "Target", e.target);
  fact(dl, "Subject", e.subject || "(any prompt)");
  dl.append(node("div", { class: "fact" }, node("dt", { text: "Status" }), node("dd", {}, statusBadge(e.status))));
  fact(dl, "Steps", String(e.steps));
  fact(dl, "Train ms", e.train_ms.toFixed(1));
  fact(dl, "Final loss", e.final_loss.toFixed(4));
  if (e.metadata && Object.keys(e.metadata).length) fact(dl, "Metadata", JSON.stringify(e.metadata));
  const list = $("edit-history");
  list.replaceChildren(
    ...history(e).map(([at, text, other]) => {
      const li = node("li", {}, node("time", { datetime: at, text: when(at) }), " ", text);
      if (other) li.append(" ", node("a", { href: `#edit/${other}`, text: `see #${other}` }));
      return li;
    }),
  );
  const rollback = $("edit-page-rollback");
  rollback.hidden = !(allows("admin") && e.status === "active");
  rollback.onclick = () => confirmRollback(e, rollback);
  $("edit-page-try").onclick = () => {
    $("try-prompt").value = e.prompt;
    location.hash = "";
    $("try-prompt").focus();
  };
}

async function route() {
  const match = location.hash.match(/^#edit\/(\d+)$/);
  const page = $("edit-page");
  const sections = ["health", "try", "make", "edits", "audit"].map($);
  if (!match || !state.session) {
    page.hidden = true;
    for (const s of sections) s.hidden = s.dataset.needs ? !allows(s.dataset.needs) : false;
    return;
  }
  try {
    await showEditPage(Number(match[1]));
    for (const s of sections) s.hidden = true;
    page.hidden = false;
    $("edit-page-title").focus();
  } catch (err) {
    showError(err, `Edit #${match[1]}`);
    location.hash = "";
  }
}

// ---- wiring ------------------------------------------------------------------------------

function wire() {
  $("sign-in-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(ev.submitter || $("sign-in-form").querySelector("button"), "Signing in", () => signIn($("api-key").value.trim()));
  });
  $("sign-out").addEventListener("click", signOut);
  $("notice-close").addEventListener("click", clearError);
  $("health-refresh").addEventListener("click", (ev) =>
    busy(ev.currentTarget, "Health", () => Promise.all([refreshHealth(), refreshAllEdits()])));
  $("audit-refresh").addEventListener("click", (ev) => busy(ev.currentTarget, "Audit", loadAudit));
  $("try-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy($("try-run"), "Try it", tryIt);
  });
  $("edit-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy($("edit-submit"), "Making the edit", makeEdit);
  });
  $("edits-filter").addEventListener("submit", (ev) => {
    ev.preventDefault();
    Object.assign(state.page, { offset: 0, q: $("edits-q").value.trim(), status: $("edits-status").value, limit: Number($("edits-size").value) });
    busy(ev.submitter || $("edits-filter").querySelector("button"), "Edits", loadEdits);
  });
  $("edits-status").addEventListener("change", () => $("edits-filter").requestSubmit());
  $("edits-size").addEventListener("change", () => $("edits-filter").requestSubmit());
  $("edits-prev").addEventListener("click", (ev) => {
    state.page.offset = Math.max(0, state.page.offset - state.page.limit);
    busy(ev.currentTarget, "Edits", loadEdits);
  });
  $("edits-next").addEventListener("click", (ev) => {
    state.page.offset += state.page.limit;
    busy(ev.currentTarget, "Edits", loadEdits);
  });
  window.addEventListener("hashchange", () => route());
  // Ctrl/Cmd+Enter in a prompt box submits its form
  for (const id of ["try-prompt", "edit-prompt"]) {
    $(id).addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        $(id).form.requestSubmit();
      }
    });
  }
}

wire();
new ResizeObserver(() => {
  if (state.session) drawEditsPlot($("edits-plot"), state.allEdits);
}).observe($("edits-plot"));
const saved = sessionStorage.getItem(KEY_STORE);
if (saved !== null) {
  signIn(saved).catch((err) => {
    sessionStorage.removeItem(KEY_STORE);
    showError(err, "Signing in");
  });
} else {
  $("api-key").focus();
}
