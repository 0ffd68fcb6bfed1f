// The operator page (dashboard.py serves it and its API). It asks for a token once, keeps
// it in sessionStorage and sends it only as a Bearer header; or, where people sign in with
// the team's provider (ui_sign_in.py), the browser sends the HttpOnly session the server set,
// which no script here can read. Then it draws the overview's
// sections every REFRESH_MS. Every value goes into the page as text (text nodes, never
// HTML): hostnames, banners and versions are whatever the scanned hosts said, a requester's
// justification whatever they wrote. What the API keeps under `untrusted` (the targets' own
// text) is drawn apart, by targetText(). Its one change is an approver's decision (decide()).
"use strict";

const TOKEN_KEY = "nmap-mcp-token";
const REFRESH_MS = 2000;
// Each overview section is drawn into its own <section> by the renderer of its name:
// renderer(data, body, viewer), where body keeps what the renderer put there last time.
const RENDERERS = {
  approvals: renderApprovals, pools: renderPools, running: renderRunning, recent: renderRecent, diff: renderDiff, schedules: renderSchedules,
  inventory: renderInventory,
};
// The inventory search's filters: find_hosts' argument, its label, an example.
const HOST_FILTERS = [["network", "network", "10.0.0.0/24"], ["port", "port", "22"], ["service", "service", "ssh"],
  ["product", "product", "OpenSSH"]];
// A finished task's result never changes: each is fetched once, keyed by taskKey().
const results = new Map();
// The completed tasks the diff section offers, by taskKey().
let comparable = new Map();
let overview = null;
let timer = null;

class Unauthorized extends Error {}

function $(id) {
  return document.getElementById(id);
}

// An element with attributes and children; strings become text nodes, null is skipped.
function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function table(headings, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headings.map((heading) => el("th", {}, heading)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((cell) => el("td", {}, cell))))));
}

// GET `path`, or POST `sent` to it as JSON; the answer's JSON, or an Error with its words.
async function api(path, sent) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  if (sent !== undefined) {
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {
    method: sent === undefined ? "GET" : "POST",
    headers,
    body: sent === undefined ? undefined : JSON.stringify(sent),
    cache: "no-store",
    credentials: token ? "omit" : "same-origin",
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    // Without a token of its own the page only tried a signed-in session: no words to show.
    signOut(token ? body.error_description || "the token was not accepted" : "");
    throw new Unauthorized();
  }
  if (!response.ok) {
    throw new Error(body.error_description || "the server answered " + response.status);
  }
  return body;
}

async function start() {
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  const refusal = new URLSearchParams(location.search).get("sign_in_error");
  if (refusal !== null) {
    history.replaceState(null, "", location.pathname);
    showSignIn(refusal);
  }
  const options = await fetch("/ui/sign-in-options", { cache: "no-store", credentials: "omit" });
  if (options.ok) {
    $("provider-sign-in").hidden = false;
  }
  if (refusal === null) {
    // A token this tab holds, else the session of a person who signed in, else neither (401).
    refresh();
  }
}

function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  refresh();
}

function signOut(reason) {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    fetch("/ui/sign-out", { method: "POST", credentials: "same-origin" });
  }
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(timer);
  results.clear();
  overview = null;
  $("sections").replaceChildren();
  showSignIn(reason);
}

function showSignIn(reason) {
  $("sign-in").hidden = false;
  $("sections").hidden = true;
  $("sign-out").hidden = true;
  $("viewer").textContent = "";
  $("sign-in-error").textContent = reason;
  $("token").focus();
}

async function refresh() {
  clearTimeout(timer);
  try {
    overview = await api("/ui/api/overview");
    draw();
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    if (error instanceof Unauthorized) {
      return;
    }
    $("status").textContent = "could not update: " + error.message;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function draw() {
  const main = $("sections");
  $("sign-in").hidden = true;
  main.hidden = false;
  $("sign-out").hidden = false;
  $("viewer").textContent = overview.viewer.name + (overview.viewer.admin ? " (sees every token's tasks)" : "");
  const existing = new Map([...main.children].map((node) => [node.dataset.section, node]));
  const wanted = new Set(overview.sections.map((section) => section.name));
  existing.forEach((node, name) => wanted.has(name) || node.remove());
  overview.sections.forEach((section, index) => {
    let node = existing.get(section.name);
    if (!node) {
      node = el("section", { "data-section": section.name }, el("h2", {}, section.title), el("div"));
    }
    if (main.children[index] !== node) {
      main.insertBefore(node, main.children[index] || null);
    }
    const body = node.lastElementChild;
    const renderer = RENDERERS[section.name];
    if (renderer) {
      renderer(section.data, body, overview.viewer);
    } else {
      body.replaceChildren(el("p", { class: "muted" }, "This page has no renderer for '" + section.name + "' yet."));
    }
  });
}

// "1 open port", "2 open ports".
function count(number, noun) {
  return number + " " + noun + (number === 1 ? "" : "s");
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function taskKey(row) {
  return row.owner + "/" + row.task.task_id;
}

// A diff choice: "alice: custom 127.0.0.1, 12/1/2026, 8:26:52 PM (3f2a9c1e)".
function describe(row, viewer) {
  const owner = viewer.admin ? row.owner + ": " : "";
  return owner + row.task.kind + " " + row.task.target + ", " + when(row.task.finished_at || row.task.created_at)
    + " (" + row.task.task_id.slice(0, 8) + ")";
}

// Text a scanned host wrote (an answer's `untrusted` parts), marked as such; with a warning
// when the server found that it reads like instructions (`suspicious`).
function targetText(text, suspicious) {
  if (!text) {
    return null;
  }
  return el("span", {
    class: suspicious ? "untrusted suspicious" : "untrusted",
    title: suspicious ? "written by the scanned host; reads like instructions to an AI" : "written by the scanned host",
  }, text);
}

// "product version" of an `untrusted` object, or "".
function productVersion(untrusted) {
  return untrusted ? [untrusted.product, untrusted.version].filter(Boolean).join(" ") : "";
}

function progressOf(task) {
  const progress = task.progress;
  if (!progress) {
    return task.status;
  }
  const left = progress.remaining_s === null ? "" : ", about " + progress.remaining_s + " s left";
  return el("span", {},
    el("progress", { max: "100", value: String(progress.percent) }),
    progress.phase + " " + progress.percent.toFixed(0) + "%" + left);
}

// The scans waiting for the viewer's decision. A row stays while its scan waits, so that a
// reason being typed survives the refreshes; what is said of it is drawn anew each time.
function renderApprovals(data, body) {
  if (!body.firstChild) {
    body.append(el("p", { id: "approvals-notice", role: "status" }),
      el("p", { id: "approvals-none", class: "muted" }, "No scan waits for approval."),
      el("div", { id: "approvals-list" }));
  }
  const list = $("approvals-list");
  const rows = new Map([...list.children].map((node) => [node.dataset.task, node]));
  const waiting = new Set(data.approvals.map((approval) => approval.task_id));
  rows.forEach((node, taskId) => waiting.has(taskId) || node.remove());
  data.approvals.forEach((approval, index) => {
    const row = rows.get(approval.task_id) || approvalRow(approval);
    row.firstChild.replaceWith(approvalText(approval));
    if (list.children[index] !== row) {
      list.insertBefore(row, list.children[index] || null);
    }
  });
  $("approvals-none").hidden = data.approvals.length > 0;
}

function approvalRow(approval) {
  const reason = el("input", { id: "reason-" + approval.task_id, class: "reason", maxlength: "500",
    spellcheck: "false", placeholder: "kept with the decision" });
  const buttons = ["approve", "deny"].map((decision) => el("button",
    { id: decision + "-" + approval.task_id, type: "button" }, decision === "approve" ? "Approve" : "Deny"));
  buttons.forEach((button, index) => button.addEventListener("click",
    () => decide(approval, index ? "deny" : "approve", reason, buttons)));
  return el("div", { class: "approval", "data-task": approval.task_id }, el("div"),
    el("p", {}, el("label", {}, "reason ", reason), " ", buttons[0], " ", buttons[1]));
}

// What a waiting scan would run and why it waits: the requester's words as they wrote them.
function approvalText(approval) {
  return el("div", {},
    el("h3", {}, approval.requested_by + ": " + approval.kind + " ", el("span", { class: "address" }, approval.target),
      " under " + approval.engagement),
    el("p", {}, "nmap ", el("code", { class: "argv" }, approval.argv.map(shellWord).join(" ")),
      " (pool " + approval.pool + ")"),
    el("ul", {}, approval.reasons.map((why) => el("li", {}, "waits because " + why))),
    approval.justification ? el("p", {}, approval.requested_by + " says: ",
      el("q", { class: "justification" }, approval.justification)) : null,
    el("p", { class: "muted" }, "requested " + whenIso(approval.requested_at) + ", denied unless decided by "
      + whenIso(approval.expires_at) + " (task " + approval.task_id.slice(0, 8) + ")"));
}

// An argument as a shell would need it, so that the argv reads back exactly.
function shellWord(word) {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : "'" + word.replace(/'/g, "'\\''") + "'";
}

function whenIso(text) {
  return text ? new Date(text).toLocaleString() : "";
}

async function decide(approval, decision, field, buttons) {
  const reason = field.value.trim();
  const which = approval.requested_by + "'s " + approval.kind + " " + approval.target + " (task "
    + approval.task_id.slice(0, 8) + ")";
  const notice = $("approvals-notice");
  if (!reason) {
    notice.className = "error";
    notice.textContent = "Give a reason to " + decision + " " + which + ": it is kept with the decision.";
    field.focus();
    return;
  }
  buttons.forEach((button) => { button.disabled = true; });
  try {
    const answer = await api("/ui/api/approvals/" + encodeURIComponent(approval.task_id), { decision, reason });
    notice.className = "";
    notice.textContent = "You " + answer.decision + " " + which + ": " + answer.decision_reason;
  } catch (error) {
    if (error instanceof Unauthorized) {
      return;
    }
    notice.className = "error";
    notice.textContent = "Could not " + decision + " " + which + ": " + error.message;
  } finally {
    buttons.forEach((button) => { button.disabled = false; });
  }
  refresh();
}

function renderPools(data, body) {
  if (!data.pools.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No pool has workers or queued tasks."));
    return;
  }
  body.replaceChildren(...data.pools.map((pool) => el("div", { class: "pool" },
    el("h3", {}, "pool " + pool.pool),
    el("p", {}, pool.queued + " queued, " + pool.workers_alive + " of " + count(pool.workers.length, "worker")
      + " alive" + (pool.networks.length ? "; reaches " + pool.networks.join(", ") : "")),
    pool.workers.length
      ? table(["worker", "state", "running", "last heartbeat"], pool.workers.map((worker) => [
        worker.name, worker.alive ? "alive" : "silent", worker.running + " of " + worker.capacity,
        Math.max(0, Math.round(Date.now() / 1000 - worker.heartbeat_at)) + " s ago"]))
      : el("p", { class: "muted" }, "no workers"))));
}

function renderRunning(data, body, viewer) {
  if (!data.tasks.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No scan is running or queued."));
    return;
  }
  const headings = [...(viewer.admin ? ["token"] : []), "target", "kind", "pool", "worker", "started", "progress"];
  body.replaceChildren(table(headings, data.tasks.map((row) => [
    ...(viewer.admin ? [row.owner] : []), el("span", { class: "address" }, row.task.target), row.task.kind,
    row.task.pool, row.task.worker || "", when(row.task.started_at), progressOf(row.task)])));
}

function renderRecent(data, body, viewer) {
  if (!data.tasks.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No tasks yet."));
    return;
  }
  const headings = [...(viewer.admin ? ["token"] : []), "created", "kind", "target", "status", "pool / worker",
    "open ports"];
  body.replaceChildren(table(headings, data.tasks.map((row) => [
    ...(viewer.admin ? [row.owner] : []), when(row.task.created_at), row.task.kind,
    el("span", { class: "address" }, row.task.target),
    el("span", { class: "status-" + row.task.status }, row.task.status, row.task.error ? ": " + row.task.error : ""),
    row.task.pool + (row.task.worker ? " / " + row.task.worker : ""), resultOf(row)])));
}

// The open ports of a finished task, fetched once; a running task shows its progress.
function resultOf(row) {
  if (row.task.status === "awaiting_approval") {
    return el("span", { class: "muted" }, "waits for an approver");
  }
  if (row.task.status === "queued" || row.task.status === "running") {
    return progressOf(row.task);
  }
  const key = taskKey(row);
  const known = results.get(key);
  if (!known) {
    results.set(key, { pending: true });
    const path = "/ui/api/tasks/" + encodeURIComponent(row.task.task_id) + "?owner=" + encodeURIComponent(row.owner);
    api(path).then((answer) => results.set(key, { task: answer.task }), (error) => {
      if (!(error instanceof Unauthorized)) {
        results.set(key, { error: error.message });
      }
    }).then(() => overview && draw());
    return el("span", { class: "muted" }, "loading");
  }
  if (known.pending) {
    return el("span", { class: "muted" }, "loading");
  }
  if (known.error) {
    return el("span", { class: "error" }, known.error);
  }
  return openPorts(known.task);
}

function openPorts(task) {
  const result = task.result;
  if (!result) {
    return el("span", { class: "muted" }, "no result");
  }
  const hosts = result.hosts.filter((host) => host.ports.length);
  const more = task.page && task.page.next_offset !== null ? " (the first " + task.page.returned + " hosts shown)" : "";
  const counts = result.hosts_up + " of " + count(result.hosts_total, "host") + " up, "
    + count(result.open_ports, "open port") + more + cutNote(task.page);
  return el("div", {}, el("span", { class: "muted" }, counts), el("ul", {}, hosts.map((host) => el("li", {},
    el("span", { class: "address" }, host.address),
    host.hostnames.length ? " (" + host.hostnames.join(", ") + ")" : "", ": ",
    host.ports.flatMap((port, index) => [index ? ", " : "",
      [port.port + "/" + port.protocol, port.service].filter(Boolean).join(" "),
      port.untrusted ? " " : "", targetText(productVersion(port.untrusted), port.suspicious)])))));
}

// A host with more ports than one answer holds comes with some of them: say how many.
function cutNote(page) {
  const cut = page && page.cut;
  return cut ? "; " + cut.address + ": " + cut.shown + " of " + count(cut.ports, "port") + " shown" : "";
}

function renderDiff(data, body, viewer) {
  if (!body.firstChild) {
    const before = el("select", { id: "diff-a", "aria-label": "before" });
    const after = el("select", { id: "diff-b", "aria-label": "after" });
    const button = el("button", { id: "diff-run", type: "button" }, "Compare");
    const output = el("div", { id: "diff-output" });
    button.addEventListener("click", () => compare(before.value, after.value, output));
    body.append(el("p", {}, el("label", {}, "before ", before), " ", el("label", {}, "after ", after), " ", button),
      output);
  }
  comparable = new Map(data.tasks.map((row) => [taskKey(row), row]));
  const choices = data.tasks.map((row) => [taskKey(row), describe(row, viewer)]);
  // Newest as "after", the one before it as "before", until the user picks others.
  fillChoices($("diff-a"), choices, Math.min(1, choices.length - 1));
  fillChoices($("diff-b"), choices, 0);
}

// Replace a select's options only when the choices changed, keeping what was picked.
function fillChoices(select, choices, fallback) {
  const same = select.options.length === choices.length
    && choices.every(([value], index) => select.options[index].value === value);
  if (same) {
    return;
  }
  const picked = select.value;
  select.replaceChildren(...choices.map(([value, text]) => el("option", { value }, text)));
  const keep = choices.some(([value]) => value === picked);
  if (choices.length) {
    select.value = keep ? picked : choices[fallback][0];
  }
}

async function compare(keyA, keyB, output) {
  const a = comparable.get(keyA);
  const b = comparable.get(keyB);
  if (!a || !b) {
    output.replaceChildren(el("p", { class: "error" }, "Pick two completed tasks."));
    return;
  }
  if (a.owner !== b.owner) {
    output.replaceChildren(el("p", { class: "error" }, "Pick two tasks of one token: a diff compares its own scans."));
    return;
  }
  output.replaceChildren(el("p", { class: "muted" }, "comparing"));
  const query = "?a=" + encodeURIComponent(a.task.task_id) + "&b=" + encodeURIComponent(b.task.task_id)
    + "&owner=" + encodeURIComponent(a.owner);
  try {
    output.replaceChildren(drawDiff(await api("/ui/api/diff" + query)));
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      output.replaceChildren(el("p", { class: "error" }, error.message));
    }
  }
}

function drawDiff(diff) {
  const hosts = (title, list) => (list.length ? el("p", {}, title + ": " + list.join(", ")) : null);
  const ports = (title, list) => (list.length ? el("div", {}, el("h3", {}, title), el("ul", {}, list.map((change) =>
    el("li", {}, el("span", { class: "address" }, change.address), " " + change.port + "/" + change.protocol + ": ",
      side(change, "before"), " \u2192 ", side(change, "after"))))) : null);
  return el("div", { class: "diff" },
    hosts("hosts that came up", diff.hosts_came_up),
    hosts("hosts that went down", diff.hosts_went_down),
    ports("ports opened", diff.ports_opened),
    ports("ports closed", diff.ports_closed),
    ports("services changed", diff.services_changed),
    el("p", { class: "muted" }, count(diff.unchanged_open_ports, "open port") + " unchanged"
      + (diff.truncated ? "; the lists were cut to fit" : "")));
}

// One side of a port's change: nmap's state and service, then the target's product and version.
function side(change, which) {
  const text = change.untrusted ? change.untrusted[which] : "";
  if (!change[which] && !text) {
    return "absent";
  }
  return el("span", {}, change[which], text ? " " : "", targetText(text, change.suspicious));
}

function renderSchedules(data, body, viewer) {
  if (!data.schedules.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No schedules yet (schedule_scan creates them)."));
    return;
  }
  const headings = [...(viewer.admin ? ["token"] : []), "scan", "every", "next run", "last run", "last change",
    "webhook"];
  body.replaceChildren(table(headings, data.schedules.map((row) => {
    const schedule = row.schedule;
    return [...(viewer.admin ? [row.owner] : []),
      el("span", {}, schedule.kind + " ", el("span", { class: "address" }, schedule.target || schedule.command)),
      schedule.every, when(schedule.next_run_at), lastRun(schedule.last_run), lastChange(schedule.last_change),
      schedule.webhook || ""];
  })));
}

function lastRun(run) {
  if (!run) {
    return el("span", { class: "muted" }, "not yet");
  }
  const task = run.task_id ? " (" + run.task_id.slice(0, 8) + ")" : "";
  return el("span", {}, el("span", { class: "status-" + run.status }, run.status + task,
    run.error ? ": " + run.error : ""), " " + when(run.due_at));
}

function lastChange(change) {
  if (!change) {
    return el("span", { class: "muted" }, "none found");
  }
  const failure = change.webhook_error ? ": " + change.webhook_error : "";
  const webhook = change.webhook ? "; webhook " + change.webhook + failure : "";
  return el("div", {}, el("span", { class: "muted" }, when(change.found_at) + webhook), drawDiff(change.diff));
}

function renderInventory(data, body, viewer) {
  if (!body.firstChild) {
    const inputs = HOST_FILTERS.map(([name, label, example]) => el("label", {}, label + " ",
      el("input", { id: "hosts-" + name, placeholder: example, spellcheck: "false" })));
    const owner = viewer.admin ? el("label", {}, "token ", el("select", { id: "hosts-owner" })) : null;
    const button = el("button", { id: "hosts-run", type: "button" }, "Search");
    const output = el("div", { id: "hosts-output" });
    button.addEventListener("click", () => searchHosts(output));
    body.append(el("p", {}, inputs.flatMap((input) => [input, " "]), owner, " ", button), output);
  }
  if (viewer.admin) {
    const own = Math.max(0, data.owners.indexOf(viewer.name));
    fillChoices($("hosts-owner"), data.owners.map((name) => [name, name]), own);
  }
}

async function searchHosts(output) {
  const query = new URLSearchParams();
  for (const [name] of HOST_FILTERS) {
    const value = $("hosts-" + name).value.trim();
    if (value) {
      query.set(name, value);
    }
  }
  if ($("hosts-owner")) {
    query.set("owner", $("hosts-owner").value);
  }
  output.replaceChildren(el("p", { class: "muted" }, "searching"));
  try {
    output.replaceChildren(drawHosts(await api("/ui/api/hosts?" + query.toString())));
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      output.replaceChildren(el("p", { class: "error" }, error.message));
    }
  }
}

function drawHosts(answer) {
  const page = answer.hosts;
  if (!page.hosts.length) {
    return el("p", { class: "muted" }, "No host of " + answer.owner + "'s inventory matches.");
  }
  const first = page.page.total > page.page.returned ? "the first " + page.page.returned + " of " : "";
  return el("div", {}, el("p", { class: "muted" }, first + count(page.page.total, "host") + " of " + answer.owner
    + "'s inventory" + cutNote(page.page)), table(["address", "status", "ports", "last seen"], page.hosts.map((host) => [
    el("span", {}, el("span", { class: "address" }, host.address),
      host.hostnames.length ? " (" + host.hostnames.join(", ") + ")" : ""),
    host.status, el("ul", {}, host.ports.map((port) => el("li", {},
      [port.port + "/" + port.protocol, port.state, port.service].filter(Boolean).join(" "),
      port.untrusted ? " " : "", targetText(productVersion(port.untrusted), port.suspicious)))),
    when(host.last_seen)])));
}

start();
