// listenerd console: reads the daemon's /1.0 API with the token the person gives; no framework, no build step.
// The token lives in sessionStorage (this tab only) and travels only in the Authorization header, never in a URL.
"use strict";

const TOKEN_KEY = "listenerd-token";
const POLL_MS = 2000;        // short polling of the API; the tap is a streamed response
const SPARK_POINTS = 20;     // samples kept per listener for the sparkline (40 s at POLL_MS)
const TAP_KEEP = 50;         // tapped events shown on a listener's page
const PAGE_ROWS = 50;        // listeners per page of a tenant's table: a refresh asks for at most this many statuses
const DEAD_ROWS = 50;        // dead letters shown per tenant (the oldest first)
const STATES = ["failed", "retrying", "starting", "stopped", "started"];  // trouble first

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  tenants: [],
  samples: new Map(),        // "tid/id" -> [{t, received}]
  rows: new Map(),           // "tid/id" -> row elements of the overview (the pages shown only)
  pages: new Map(),          // tid -> {filter, starts: [URL of each page seen], index, next: URL or null}
  deadIds: null,             // the dead letters shown, to rebuild only on change
  timer: null,
  pollRun: 0,                // each poll() bumps it: a poll that finds it changed was superseded, and stops
  tap: null,                 // AbortController of the running tap
  route: null,
};

class Refused extends Error {}
class Superseded extends Error {}  // a newer poll started (a page turned, a filter chosen): this one stops drawing

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Authorization": `Bearer ${state.token}`, "Accept": "application/json", ...(options.headers || {}) },
    cache: "no-store",
  });
  if (response.status === 401) throw new Refused("The daemon refused this token.");
  if (!response.ok) {
    let reason = `${response.status}`;
    try { reason += ` ${(await response.json()).error}`; } catch (_) { /* not JSON */ }
    throw new Error(`${options.method || "GET"} ${path}: ${reason}`);
  }
  return response;
}

async function getJson(path) { return (await api(path)).json(); }

// One page of a list route: its items, and the next page's path from `Link: <...>; rel="next"` (null on the last).
async function getPage(path) {
  const response = await api(path);
  const items = await response.json();
  const link = response.headers.get("Link");
  const found = link && /<([^>]+)>\s*;\s*rel="?next"?/.exec(link);
  const url = found ? new URL(found[1], new URL(path, location.href)) : null;
  return { items, next: url ? url.pathname + url.search : null };
}

const enc = encodeURIComponent;
const listenerPath = (tid, id) => `/1.0/tenants/${enc(tid)}/listeners/${enc(id)}`;

function ago(iso) {
  if (!iso) return "-";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ${Math.floor(seconds % 3600 / 60)}m ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

function badge(node, status, prefix = "s") {
  node.textContent = status;
  node.className = `badge ${prefix}-${status}`;
}

// -- sign in and out

function showOnly(section) {
  for (const id of ["login", "overview", "listener"]) $(id).hidden = id !== section;
  const signedIn = section !== "login";
  $("sign-out").hidden = !signedIn;
  $("engine").hidden = !signedIn;
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("token").value.trim();
  if (!candidate) return;
  state.token = candidate;
  $("login-error").textContent = "";
  try {
    state.tenants = await getJson("/1.0/tenants");
  } catch (error) {
    state.token = null;
    $("login-error").textContent = error instanceof Refused ? error.message : `Cannot reach the daemon: ${error.message}`;
    $("token").focus();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  $("token").value = "";
  route();
  $("main").focus();
}

function signOut(message = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  stopTap();
  clearTimeout(state.timer);
  state.rows.clear();
  state.pages.clear();
  state.samples.clear();
  state.deadIds = null;
  $("tenants").replaceChildren();
  $("dead-letters").replaceChildren();
  showOnly("login");
  $("login-error").textContent = message;
  $("token").focus();
}

// -- polling

async function poll() {
  clearTimeout(state.timer);
  const run = ++state.pollRun;
  if (!state.token) return;
  try {
    state.tenants = await getJson("/1.0/tenants");
    await Promise.all([refreshEngine(), state.route.name === "listener" ? refreshListener() : refreshOverview(run)]);
  } catch (error) {
    if (error instanceof Superseded) return;
    if (error instanceof Refused) { signOut(error.message); return; }
    $("overview-summary").textContent = `Could not refresh: ${error.message}`;
  }
  if (run === state.pollRun && state.token) state.timer = setTimeout(poll, POLL_MS);
}

async function refreshEngine() {
  const body = await getJson("/1.0/engine");
  badge($("engine-state"), body.engine.state, "e");
  $("outbox-depth").textContent = `${body.outbox.events} event(s), ${Math.round(body.outbox.bytes / 1024)} KiB`;
  $("store-state").textContent = body.store.writing ? "writing" : `failing: ${body.store.problem}`;
  $("engine-error").hidden = !body.engine["last-error"];
  $("engine-error").textContent = body.engine["last-error"] ? `Engine's last error: ${body.engine["last-error"]}` : "";
}

function sample(key, status) {
  const list = state.samples.get(key) || [];
  list.push({ t: Date.now(), received: status.received });
  if (list.length > SPARK_POINTS + 1) list.shift();
  state.samples.set(key, list);
  return list;
}

// Events per second between successive polls, drawn as a polyline scaled to its own peak.
function sparkline(svg, samples) {
  const rates = [];
  for (let i = 1; i < samples.length; i++) {
    const seconds = (samples[i].t - samples[i - 1].t) / 1000;
    rates.push(seconds > 0 ? Math.max(0, samples[i].received - samples[i - 1].received) / seconds : 0);
  }
  const peak = Math.max(1, ...rates);
  const offset = SPARK_POINTS - rates.length;  // right-aligned: the newest sample at the right edge
  const points = rates.map((r, i) =>
    `${((offset + i) * 100 / (SPARK_POINTS - 1)).toFixed(1)},${(19 - r * 15 / peak).toFixed(1)}`);
  svg.querySelector("polyline").setAttribute("points", points.join(" "));
  const last = rates.length ? rates[rates.length - 1] : 0;
  svg.querySelector("title").textContent = `Event rate over the last polls; now ${last.toFixed(1)} per second`;
}

function newSpark() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const baseline = document.createElementNS(ns, "line");
  for (const [key, value] of [["x1", 0], ["y1", 19.5], ["x2", 100], ["y2", 19.5], ["class", "baseline"]]) {
    baseline.setAttribute(key, value);
  }
  svg.append(document.createElementNS(ns, "title"), baseline, document.createElementNS(ns, "polyline"));
  return svg;
}

// A tenant's box: its summary counts, a status filter, one page of its listeners, and the pager.
function tenantBox(tenant) {
  const id = `tenant-${tenant.id}`;
  let table = $(id);
  if (table) return table;
  const label = `Tenant ${tenant.id}${tenant.name ? ` (${tenant.name})` : ""}`;
  const filter = el("select", { id: `filter-${tenant.id}`, onchange: () => {
    state.pages.set(tenant.id, newPaging(filter.value));
    poll();
  } }, el("option", { value: "", text: "every status" }),
  ...STATES.map((s) => el("option", { value: s, text: s })));
  table = el("table", { id, class: "listeners" },
    el("caption", { class: "visually-hidden", text: `Listeners of ${label}` }),
    el("thead", {}, el("tr", {}, ...["Listener", "Type", "Status", "Message", "Received", "Forwarded", "Per second",
      "Recent rate"].map((h, i) => el("th", { scope: "col", class: i >= 4 && i < 7 ? "num" : "", text: h })))),
    el("tbody"));
  const pager = el("nav", { class: "pager", "aria-label": `Pages of ${label}` },
    el("button", { type: "button", class: "previous", text: "Previous page", disabled: "",
      onclick: () => turnPage(tenant.id, -1) }),
    el("span", { class: "range", role: "status" }),
    el("button", { type: "button", class: "next", text: "Next page", disabled: "",
      onclick: () => turnPage(tenant.id, 1) }));
  $("tenants").append(el("section", { id: `box-${tenant.id}`, class: "tenant", "data-tenant": tenant.id },
    el("h3", { text: label }),
    el("div", { class: "tenant-bar" }, el("p", { class: "tenant-summary", id: `summary-${tenant.id}` }),
      el("p", { class: "filter" }, el("label", { for: `filter-${tenant.id}`, text: "Show " }), filter), pager),
    table));
  return table;
}

function newPaging(filter = "") { return { filter, starts: [null], index: 0, next: null }; }

function pageOf(tid) {
  if (!state.pages.has(tid)) state.pages.set(tid, newPaging());
  return state.pages.get(tid);
}

function turnPage(tid, step) {
  const paging = pageOf(tid);
  if (step > 0 && !paging.next) return;
  if (step > 0) paging.starts[paging.index + 1] = paging.next;
  paging.index = Math.max(0, paging.index + step);
  paging.starts.length = paging.index + 1;  // pages after this one are asked again when turned to
  poll();
}

function listenerRow(table, tid, listener) {
  const key = `${tid}/${listener.id}`;
  let row = state.rows.get(key);
  if (row) return row;
  const cells = {
    link: el("a", { href: `#/listener/${enc(tid)}/${enc(listener.id)}`, text: listener.id }),
    status: el("span", { class: "badge" }),
    message: el("td", { class: "message" }),
    received: el("td", { class: "num received" }),
    forwarded: el("td", { class: "num forwarded" }),
    rate: el("td", { class: "num rate" }),
    spark: newSpark(),
  };
  const tr = el("tr", { id: `row-${tid}-${listener.id}`, "data-tenant": tid, "data-listener": listener.id },
    el("th", { scope: "row" }, cells.link, el("div", { class: "hint", text: listener.name || "" })),
    el("td", { text: listener.type }), el("td", { class: "status" }, cells.status), cells.message, cells.received,
    cells.forwarded, cells.rate, el("td", {}, cells.spark));
  row = { tr, cells };
  state.rows.set(key, row);
  table.tBodies[0].append(tr);
  return row;
}

function countsText(counts, total) {
  return `${total} listener(s): ` + (STATES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`).join(", ")
    || "none");
}

// Per tenant: the summary (counts, and the status of every listener not started), one page of listeners, and
// the status of the page's started listeners: a refresh costs the page, not the tenant's thousands.
async function refreshTenant(tenant, seen, counts, run) {
  const base = `/1.0/tenants/${enc(tenant.id)}/listeners`;
  const paging = pageOf(tenant.id);
  const first = `${base}?limit=${PAGE_ROWS}${paging.filter ? `&status=${paging.filter}` : ""}`;
  const [summary, page] = await Promise.all([getJson(`${base}/status`), getPage(paging.starts[paging.index] || first)]);
  if (run !== state.pollRun) throw new Superseded();
  if (!page.items.length && paging.index > 0) {  // its listeners went away: back to the first page
    state.pages.set(tenant.id, newPaging(paging.filter));
    return refreshTenant(tenant, seen, counts, run);
  }
  paging.next = page.next;
  const known = new Map(summary["not-started"].map((entry) => [entry.id, entry]));
  const statuses = await Promise.all(page.items.map((l) => known.get(l.id)
    || getJson(`${listenerPath(tenant.id, l.id)}/status`)
      .catch((error) => { if (error instanceof Refused) throw error; return null; })));
  if (run !== state.pollRun) throw new Superseded();
  const table = tenantBox(tenant);
  const order = page.items.map((listener, i) => {
    const status = statuses[i];
    const key = `${tenant.id}/${listener.id}`;
    seen.add(key);
    const { tr, cells } = listenerRow(table, tenant.id, listener);
    if (!status) { cells.message.textContent = "status not available yet"; return tr; }
    badge(cells.status, status.status);
    cells.message.textContent = status.message + (status["last-error"] && status.status !== "started"
      ? ` (last error: ${status["last-error"]})` : "");
    cells.received.textContent = status.received ?? 0;
    cells.forwarded.textContent = status.forwarded ?? 0;
    cells.rate.textContent = (status.rate ?? 0).toFixed(2);
    sparkline(cells.spark, sample(key, status));
    return tr;
  });
  const body = table.tBodies[0];
  if (order.some((tr, i) => body.children[i] !== tr)) body.append(...order);  // moved only when out of order
  for (const state_ of STATES) counts[state_] = (counts[state_] || 0) + (summary.counts[state_] || 0);
  const filter = $(`filter-${tenant.id}`);
  filter.value = paging.filter;
  for (const option of filter.options) {
    option.textContent = option.value ? `${option.value} (${summary.counts[option.value] || 0})`
      : `every status (${summary.total})`;
  }
  $(`summary-${tenant.id}`).textContent = countsText(summary.counts, summary.total);
  const of = paging.filter ? summary.counts[paging.filter] || 0 : summary.total;
  const from = paging.index * PAGE_ROWS;
  const box = $(`box-${tenant.id}`);
  box.querySelector(".range").textContent = page.items.length
    ? `Listeners ${from + 1}-${from + page.items.length} of ${Math.max(of, from + page.items.length)}`
    : (paging.filter ? `No listener ${paging.filter}` : "No listeners");
  box.querySelector(".previous").disabled = paging.index === 0;
  box.querySelector(".next").disabled = !page.next;
  return summary.total;
}

async function refreshOverview(run) {
  const seen = new Set();
  const counts = {};
  const totals = await Promise.all(state.tenants.map((tenant) => refreshTenant(tenant, seen, counts, run)));
  for (const [key, row] of state.rows) {
    if (!seen.has(key)) { row.tr.remove(); state.rows.delete(key); state.samples.delete(key); }
  }
  const tenants = new Set(state.tenants.map((t) => t.id));
  for (const box of $("tenants").querySelectorAll("section.tenant")) {
    if (!tenants.has(box.dataset.tenant)) { box.remove(); state.pages.delete(box.dataset.tenant); }
  }
  $("overview-summary").textContent = `${state.tenants.length} tenant(s), `
    + countsText(counts, totals.reduce((a, b) => a + b, 0));
  await refreshDeadLetters();
}

// -- dead letters

async function refreshDeadLetters() {
  const letters = [];
  const more = [];  // tenants with more dead letters than shown
  for (const tenant of state.tenants) {
    const page = await getPage(`/1.0/tenants/${enc(tenant.id)}/dead-letters?limit=${DEAD_ROWS}`);
    for (const letter of page.items) letters.push([tenant.id, letter]);
    if (page.next) more.push(tenant.id);
  }
  const ids = letters.map(([tid, l]) => `${tid}/${l.id}`).join(",") + `|${more.join(",")}`;
  if (ids === state.deadIds) return;
  state.deadIds = ids;
  const box = $("dead-letters");
  if (!letters.length) { box.replaceChildren(el("p", { text: "No dead letters." })); return; }
  const note = more.length ? [el("p", { class: "hint", text: `Showing the oldest ${DEAD_ROWS} dead letters of `
    + `${more.join(", ")}; retry or discard them to see the next.` })] : [];
  const rows = letters.map(([tid, letter]) => el("tr", { id: `dead-${tid}-${letter.id}` },
    el("td", { text: tid }), el("th", { scope: "row", text: letter.id }), el("td", { text: letter["listener-id"] }),
    el("td", { class: "num", text: letter["status-code"] }), el("td", { class: "message", text: letter.response }),
    el("td", { text: ago(letter["failed-at"]) }), el("td", { class: "num", text: letter.events.length }),
    el("td", {},
      el("button", { type: "button", text: "Retry", "aria-label": `Retry dead letter ${letter.id} of ${tid}`,
        onclick: () => deadLetterAction(tid, letter.id, "retry") }), " ",
      el("button", { type: "button", class: "danger", text: "Discard",
        "aria-label": `Discard dead letter ${letter.id} of ${tid}`,
        onclick: () => deadLetterAction(tid, letter.id, "discard") }))));
  box.replaceChildren(...note, el("table", {},
    el("caption", { class: "visually-hidden", text: "Dead letters" }),
    el("thead", {}, el("tr", {}, ...["Tenant", "Id", "Listener", "Engine status", "Engine answer", "Failed",
      "Events", "Actions"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...rows)));
}

async function deadLetterAction(tid, id, action) {
  if (action === "discard" && !confirm(`Discard dead letter ${id} for good?`)) return;
  const path = `/1.0/tenants/${enc(tid)}/dead-letters/${enc(id)}`;
  try {
    if (action === "retry") {
      const body = await (await api(`${path}/retry`, { method: "POST" })).json();
      $("dead-message").textContent = `Dead letter ${id}: ${body.queued} event(s) queued for delivery again.`;
    } else {
      await api(path, { method: "DELETE" });
      $("dead-message").textContent = `Dead letter ${id} discarded.`;
    }
  } catch (error) {
    if (error instanceof Refused) { signOut(error.message); return; }
    $("dead-message").textContent = `Dead letter ${id}: ${error.message}`;
  }
  state.deadIds = null;
  await refreshDeadLetters().catch(() => {});
}

// -- one listener

async function refreshListener() {
  const { tid, id } = state.route;
  const [listener, status] = await Promise.all([getJson(listenerPath(tid, id)),
    getJson(`${listenerPath(tid, id)}/status`)]);
  $("listener-title").textContent = `${tid} / ${listener.id}: ${listener.name || listener.type}`;
  badge($("detail-status"), status.status);
  $("detail-message").textContent = status.message;
  $("detail-since").textContent = `${status.since} (${ago(status.since)})`;
  $("detail-received").textContent = status.received;
  $("detail-forwarded").textContent = status.forwarded;
  $("detail-rate").textContent = `${(status.rate ?? 0).toFixed(2)} events/s`;
  $("detail-last-event").textContent = status["last-event-at"] ? ago(status["last-event-at"]) : "none yet";
  $("detail-last-error").textContent = status["last-error"] || "none";
  $("detail-history").replaceChildren(...(status.history || []).map((change) => el("li", {},
    el("time", { datetime: change.at, text: new Date(change.at).toLocaleTimeString() }), " ",
    el("span", { class: `badge s-${change.status}`, text: change.status }), ` ${change.message}`)));
  $("detail-mapping").tBodies[0].replaceChildren(...Object.entries(listener.mapping || {}).map(([field, from]) =>
    el("tr", {}, el("th", { scope: "row", text: field }), el("td", {}, el("code", { text: from })))));
}

function stopTap() {
  if (state.tap) { state.tap.abort(); state.tap = null; }
}

// The tap is server-sent events; EventSource cannot send a header, so fetch() and read the body as it streams.
async function startTap(tid, id) {
  stopTap();
  const controller = new AbortController();
  state.tap = controller;
  const list = $("tap-events");
  list.replaceChildren();
  $("tap-state").textContent = "Connecting...";
  try {
    const response = await api(`${listenerPath(tid, id)}/tap`, { signal: controller.signal,
      headers: { "Accept": "text/event-stream" } });
    $("tap-state").textContent = "Connected: each normalized event appears here as it passes.";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        showTapped(list, buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
    $("tap-state").textContent = "The daemon closed the tap.";
  } catch (error) {
    if (controller.signal.aborted) return;
    if (error instanceof Refused) { signOut(error.message); return; }
    $("tap-state").textContent = `Tap interrupted: ${error.message}`;
  }
}

function showTapped(list, frame) {
  let kind = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;  // a comment (keep-alive)
  const body = JSON.parse(data.join("\n"));
  const item = kind === "missed"
    ? el("li", { class: "missed", text: `${body.missed} event(s) passed while this page was too slow to show them` })
    : el("li", { class: "event" }, el("time", { text: new Date().toLocaleTimeString() }),
      JSON.stringify(body.event ?? body));
  list.prepend(item);
  while (list.children.length > TAP_KEEP) list.lastChild.remove();
}

// -- routing: #/ (every listener) and #/listener/<tenant>/<id>

function route() {
  if (!state.token) { showOnly("login"); $("token").focus(); return; }
  const match = /^#\/listener\/([^/]+)\/([^/]+)$/.exec(location.hash);
  const previous = state.route;
  state.route = match ? { name: "listener", tid: decodeURIComponent(match[1]), id: decodeURIComponent(match[2]) }
    : { name: "overview" };
  if (state.route.name === "listener") {
    showOnly("listener");
    if (!previous || previous.tid !== state.route.tid || previous.id !== state.route.id) {
      $("detail-history").replaceChildren();
      startTap(state.route.tid, state.route.id);
    }
  } else {
    stopTap();
    showOnly("overview");
  }
  poll();
}

$("login-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
