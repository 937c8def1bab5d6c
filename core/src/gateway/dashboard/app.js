// RhizOS dashboard: plain JS, no dependencies. Every value from the network is put in the page
// as text (never as HTML): any peer may lie, and a node id or a log line is data, not markup.
"use strict";

const $ = (id) => document.getElementById(id);

/** h("td", {class: "x"}, "text", child…): an element with attributes and text/element children. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces el's children, skipping absent ones (null, undefined, false). */
function show(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

async function api(path, options) {
  const init = Object.assign({ credentials: "same-origin" }, options || {});
  init.headers = Object.assign({ "X-Rhizos-Dashboard": "1" }, init.headers || {});
  if (init.body && typeof init.body !== "string") {
    init.body = JSON.stringify(init.body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch("/dashboard/api" + path, init);
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/session") { showSignIn(body.error); throw new Error(body.error || "signed out"); }
  if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
  return body;
}

// Money is integer micro-USD end to end; shown exactly, never through floating point.
function usd(micros) {
  if (micros === undefined || micros === null) return "–";
  const negative = micros < 0;
  const abs = Math.abs(micros);
  const whole = Math.floor(abs / 1e6);
  const frac = String(abs % 1e6).padStart(6, "0");
  return (negative ? "-" : "") + "$" + whole + "." + frac;
}
const cents = (c) => "$" + Math.floor(c / 100) + "." + String(c % 100).padStart(2, "0");
function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return Math.floor(s / 86400) + "d ago";
}
const pill = (text, kind) => h("span", { class: "pill " + (kind || text) }, text.replace("_", " "));
const shortId = (id) => (id.length > 16 ? "…" + id.slice(-12) : id);

let me = null;
let events = null;
const listeners = new Set();

function showSignIn(message) {
  me = null;
  if (events) { events.close(); events = null; }
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

async function signIn(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  let text = $("signin-text").value.trim();
  const file = $("signin-file").files[0];
  if (file) text = (await file.text()).trim();
  if (!text) { $("signin-error").textContent = "Pick your credentials file or paste it."; return; }
  $("signin-button").disabled = true;
  try {
    me = await api("/session", { method: "POST", body: { credentials: text } });
    $("signin-text").value = "";
    start();
  } catch (e) {
    $("signin-error").textContent = e.message;
  } finally {
    $("signin-button").disabled = false;
  }
}

function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  $("who").textContent = me.role === "operator" ? "operator " + me.name : "account " + me.name;
  connectEvents();
  route();
}

/** One event stream for the whole page: pages refresh when something they show changes. */
function connectEvents() {
  if (events) events.close();
  events = new EventSource("/dashboard/api/events");
  events.addEventListener("open", () => { $("live-dot").classList.add("on"); $("live-text").textContent = "live"; });
  events.addEventListener("error", () => { $("live-dot").classList.remove("on"); $("live-text").textContent = "reconnecting…"; });
  events.addEventListener("event", (message) => {
    let data; try { data = JSON.parse(message.data); } catch { return; }
    for (const listener of listeners) listener(data);
  });
}

/** Calls fn at most once a second while events keep coming. */
function throttled(fn) {
  let timer = null;
  return () => { if (!timer) timer = setTimeout(() => { timer = null; fn(); }, 700); };
}

const pages = { dashboard, deploy, flows, modules, nodes, account, receipts };

async function route() {
  if (!me) return;
  listeners.clear();
  const [page, arg] = location.hash.replace(/^#\/?/, "").split("/");
  const name = pages[page] ? page : "dashboard";
  for (const a of document.querySelectorAll(".side a")) a.classList.toggle("active", a.dataset.page === name);
  const main = $("main");
  show(main, h("p", { class: "muted" }, "loading…"));
  try {
    await pages[name](main, arg ? decodeURIComponent(arg) : undefined);
  } catch (e) {
    show(main, h("h1", {}, "Something went wrong"), h("p", { class: "error" }, e.message));
  }
}

function stat(label, value, sub) {
  return h("div", { class: "card stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "nothing yet");
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

// ---- Dashboard ---------------------------------------------------------------------------

async function dashboard(main) {
  const [stats, nodeList, jobList] = await Promise.all([api("/stats"), api("/nodes"), api("/jobs?limit=1000")]);
  const count = (s) => stats.jobs_by_state[s] || 0;
  const cards = h("div", { class: "grid cards" },
    stat("Nodes", stats.nodes_live + " live", stats.nodes_lost + " lost"),
    stat("Running", String(count("running") + count("assigned")), count("pending") + " pending"),
    stat("Jobs ended", String(stats.jobs_ended), count("succeeded") + " succeeded · " + count("failed") + " failed"),
    stat("Escrow held", usd(stats.escrow_held_micros), "for open jobs"),
    stats.fees_micros !== undefined && stats.fees_micros !== null
      ? stat("Fees earned", usd(stats.fees_micros), "platform, all time")
      : stat("Balance", usd(stats.balance_micros), "account " + stats.account),
    stat("AI requests", String(stats.ai_requests), (stats.ai_input_units + stats.ai_output_units) + " tokens"));
  show(main, 
    h("h1", {}, me.role === "operator" ? "Network" : "Your account on the network"),
    cards,
    h("div", { class: "grid two section" },
      h("div", { class: "card chart" }, h("h2", {}, "Jobs ended per minute · last hour"), chart(jobList.jobs)),
      h("div", { class: "card" }, h("h2", {}, "Nodes"), nodesTable(nodeList.nodes.slice(0, 8)))),
    h("div", { class: "card" }, h("h2", {}, "Recent jobs"), jobsTable(jobList.jobs.slice(0, 12))));
  listeners.add(throttled(() => { if (location.hash.startsWith("#/dashboard") || location.hash === "") dashboard(main); }));
}

/** Bars: jobs ended per minute over the last hour; line: their mean time from submit to end. */
function chart(jobs) {
  const now = Date.now();
  const minutes = 60;
  const ended = new Array(minutes).fill(0);
  const latency = new Array(minutes).fill(0);
  for (const job of jobs) {
    if (!["succeeded", "failed", "cancelled", "timed_out"].includes(job.state)) continue;
    const bucket = minutes - 1 - Math.floor((now - job.updated_ms) / 60000);
    if (bucket < 0 || bucket >= minutes) continue;
    ended[bucket] += 1;
    latency[bucket] += job.updated_ms - job.created_ms;
  }
  const mean = latency.map((total, i) => (ended[i] ? total / ended[i] / 1000 : null));
  const W = 600, H = 160, pad = 24;
  const maxJobs = Math.max(1, ...ended);
  const maxLatency = Math.max(1, ...mean.filter((x) => x !== null));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  const bw = (W - pad) / minutes;
  add("line", { class: "axis", x1: pad, y1: H - pad, x2: W, y2: H - pad });
  ended.forEach((n, i) => {
    const height = ((H - 2 * pad) * n) / maxJobs;
    if (n) add("rect", { class: "bar", x: pad + i * bw + 1, y: H - pad - height, width: Math.max(1, bw - 2), height });
  });
  const points = mean.map((m, i) => (m === null ? null : `${pad + i * bw + bw / 2},${H - pad - ((H - 2 * pad) * m) / maxLatency}`)).filter(Boolean);
  if (points.length > 1) add("polyline", { class: "line", points: points.join(" ") });
  add("text", { x: 0, y: pad }, String(maxJobs));
  add("text", { x: pad, y: H - 6 }, "-60 min");
  add("text", { x: W - 30, y: H - 6 }, "now");
  return h("div", {}, svg, h("div", { class: "legend" },
    h("span", { class: "sw a" }), "jobs ended (max " + maxJobs + "/min)",
    h("span", { class: "sw b" }), "mean submit → end (max " + maxLatency.toFixed(1) + " s)"));
}

function nodesTable(list) {
  return table(["Node", "Tier", "Load", "CPU / h", "Reputation", "GPU", "Status"], list.map((n) => {
    const gpu = (n.gpu_telemetry || [])[0];
    return h("tr", { class: "click", onclick: () => { location.hash = "#/nodes/" + encodeURIComponent(n.node_id); } },
      h("td", { class: "mono" }, n.node_id), h("td", {}, n.tier), h("td", {}, n.active + "/" + n.max_concurrent),
      h("td", {}, cents(n.pricing.cpu_hour_cents)), h("td", {}, n.reputation.toFixed(2)),
      h("td", {}, gpu ? gpu.utilization_pct + "% · " + gpu.temperature_c + "°C" : n.gpus.length ? n.gpus.length + " GPU" : "–"),
      h("td", {}, pill(n.status)));
  }), "no nodes have registered");
}

function jobsTable(list) {
  return table(["Job", "State", "Account", "Node", "Cost", "Updated"], list.map((j) =>
    h("tr", { class: "click", onclick: () => { location.hash = "#/receipts/" + encodeURIComponent(j.job_id); } },
      h("td", { class: "mono", title: j.job_id }, shortId(j.job_id)), h("td", {}, pill(j.state)), h("td", {}, j.account),
      h("td", { class: "mono" }, j.node_id || "–"), h("td", {}, j.cost_micros !== null && j.cost_micros !== undefined ? usd(j.cost_micros) : "≤ " + usd(j.max_cost_micros)),
      h("td", { class: "muted" }, ago(j.updated_ms)))), "no jobs yet — deploy one");
}

// ---- Deploy ------------------------------------------------------------------------------

async function deploy(main, preset) {
  const form = h("form", { class: "stack" },
    h("div", { class: "row" },
      h("label", {}, "WASM module", h("input", { type: "file", id: "deploy-file", accept: ".wasm" })),
      h("label", {}, "…or a registry module", h("input", { id: "deploy-module", placeholder: "chain://mod-hello@1.0.0", value: preset || "" }))),
    h("label", {}, "Arguments (space-separated)", h("input", { id: "deploy-args", placeholder: "hello world" })),
    h("div", { class: "row" },
      h("label", {}, "Max cost (USD)", h("input", { id: "deploy-max-cost", value: "0.10" })),
      h("label", {}, "Timeout (s)", h("input", { id: "deploy-timeout", type: "number", value: "10", min: "1" })),
      h("label", {}, "GPUs", h("input", { id: "deploy-gpus", type: "number", value: "0", min: "0" })),
      h("label", {}, "Min VRAM (MiB)", h("input", { id: "deploy-vram", type: "number", value: "0", min: "0" })),
      me.role === "operator" ? h("label", {}, "Account", h("input", { id: "deploy-account", placeholder: "alice" })) : null),
    h("div", {}, h("button", { type: "submit", id: "deploy-submit" }, "Deploy")),
    h("p", { class: "error", id: "deploy-error" }));
  const result = h("div", { class: "card", id: "deploy-result", hidden: true });
  form.addEventListener("submit", (e) => { e.preventDefault(); submitJob(result); });
  show(main, h("h1", {}, "Deploy a job"),
    h("div", { class: "card section" }, form), result);
}

async function submitJob(result) {
  $("deploy-error").textContent = "";
  const file = $("deploy-file").files[0];
  const uri = $("deploy-module").value.trim();
  const body = {
    args: $("deploy-args").value.trim() ? $("deploy-args").value.trim().split(/\s+/) : [],
    max_cost_usd: $("deploy-max-cost").value.trim(),
    timeout_secs: Number($("deploy-timeout").value) || 10,
    gpus: Number($("deploy-gpus").value) || 0,
    min_vram_mib: Number($("deploy-vram").value) || 0,
  };
  if ($("deploy-account")) body.account = $("deploy-account").value.trim();
  if (file) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    body.module_b64 = btoa(binary);
  } else if (uri) {
    body.module_uri = uri;
  } else {
    $("deploy-error").textContent = "Pick a .wasm file or name a chain:// module.";
    return;
  }
  $("deploy-submit").disabled = true;
  let reply;
  try {
    reply = await api("/jobs", { method: "POST", body });
  } catch (e) {
    $("deploy-error").textContent = e.message;
    $("deploy-submit").disabled = false;
    return;
  }
  followJob(result, reply.job_id);
  $("deploy-submit").disabled = false;
}

/** Shows a job live: its states, its log lines as they stream, then the money as settled. */
function followJob(result, jobId) {
  const states = h("div", { id: "job-states" });
  const log = h("pre", { class: "log", id: "job-log" });
  const money = h("div", { id: "job-money", class: "kv" }, h("div", { class: "k" }, "Money"), h("div", {}, "held in escrow until the job ends…"));
  result.hidden = false;
  result.replaceChildren(h("h2", {}, "Job ", h("span", { class: "mono", id: "job-id" }, jobId)), states, h("div", { class: "section" }), log, h("div", { class: "section" }), money);
  const stream = new EventSource("/dashboard/api/events?job=" + encodeURIComponent(jobId));
  const seen = [];
  const showState = (state, node) => {
    seen.push(state);
    show(states, ...seen.map((s) => pill(s)), node ? h("span", { class: "muted" }, "  on " + node) : null);
  };
  stream.addEventListener("log", (message) => {
    let batch; try { batch = JSON.parse(message.data); } catch { return; }
    if (batch.job_id !== jobId) return;
    for (const line of batch.lines) log.append(h("span", { class: line.stream }, line.line + "\n"));
    log.scrollTop = log.scrollHeight;
  });
  const settle = async () => {
    const job = await api("/jobs/" + encodeURIComponent(jobId));
    if (job.cost_micros === null || job.cost_micros === undefined) return false;
    stream.close();
    money.replaceChildren(
      h("div", { class: "k" }, "State"), h("div", {}, pill(job.state), job.reason ? " " + job.reason : "", job.exit_code !== null && job.exit_code !== undefined ? "  exit " + job.exit_code : ""),
      h("div", { class: "k" }, "Held"), h("div", {}, usd(job.max_cost_micros)),
      h("div", { class: "k" }, "Cost"), h("div", { id: "job-cost" }, usd(job.cost_micros) + (job.elapsed_ms !== null ? "  (" + job.elapsed_ms + " ms)" : "")),
      h("div", { class: "k" }, "To the provider"), h("div", {}, usd(job.provider_micros)),
      h("div", { class: "k" }, "Fee"), h("div", {}, usd(job.fee_micros)),
      h("div", { class: "k" }, "Refunded"), h("div", {}, usd(job.refund_micros)),
      h("div", { class: "k" }, "Receipt"), h("div", {}, h("a", { href: "#/receipts/" + encodeURIComponent(jobId) }, "verify the signed receipt →")));
    money.dataset.settled = "true";
    return true;
  };
  stream.addEventListener("event", async (message) => {
    let event; try { event = JSON.parse(message.data); } catch { return; }
    if (event.job_id !== jobId) return;
    if (event.type === "job") showState(event.state, event.node_id);
    if (event.type === "escrow" && event.kind !== "held") await settle();
  });
  // If an event was missed, the job's own view still tells; leaving the page stops following.
  const poll = setInterval(async () => {
    if (!result.isConnected) { stream.close(); clearInterval(poll); return; }
    if (await settle()) clearInterval(poll);
  }, 3000);
}

// ---- Flows -------------------------------------------------------------------------------

const FLOW_EXAMPLE = `# One step feeding two at once (README, Flows). TOML or JSON.
name = "hello-flow"
max_cost_micros = 300000

[[steps]]
name = "shout"
max_cost_micros = 100000
spec = { workload = { backend = "module", uri = "chain://mod-hello@1.0.0" }, args = ["upper", "in.txt", "shout.txt"], input_files = { "in.txt" = "aGVsbG8KZmxvd3MK" }, timeout_ms = 5000, memory_mib = 64 }

[[steps]]
name = "left"
max_cost_micros = 100000
spec = { workload = { backend = "module", uri = "chain://mod-hello@1.0.0" }, args = ["upper", "text.txt", "left.txt"], timeout_ms = 5000, memory_mib = 64 }

[[steps]]
name = "right"
max_cost_micros = 100000
spec = { workload = { backend = "module", uri = "chain://mod-hello@1.0.0" }, args = ["upper", "text.txt", "right.txt"], timeout_ms = 5000, memory_mib = 64 }

[[edges]]
from = "shout:/output/shout.txt"
to = "left:/input/text.txt"

[[edges]]
from = "shout:/output/shout.txt"
to = "right:/input/text.txt"
when = { json = "/output/shout.txt.lines", pointer = "", op = "ge", value = 2 }
`;

const FLOW_OPEN = ["running", "stopping"];
const STEP_ENDED = ["succeeded", "failed", "skipped", "cancelled"];

async function flows(main, flowId) {
  if (flowId) return flowPage(main, flowId);
  const list = await api("/flows");
  const form = h("form", { class: "stack" },
    h("label", {}, "Flow (TOML or JSON, as rhizos flow run reads it)",
      h("textarea", { id: "flow-text", rows: "16", class: "mono", spellcheck: "false" }, FLOW_EXAMPLE)),
    me.role === "operator" ? h("label", {}, "Account", h("input", { id: "flow-account", placeholder: "alice" })) : null,
    h("div", {}, h("button", { type: "submit", id: "flow-run" }, "Run flow")),
    h("p", { class: "error", id: "flow-error" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    $("flow-error").textContent = "";
    const body = { flow: $("flow-text").value };
    if ($("flow-account")) body.account = $("flow-account").value.trim();
    $("flow-run").disabled = true;
    try {
      const flow = await api("/flows", { method: "POST", body });
      location.hash = "#/flows/" + encodeURIComponent(flow.flow_id);
    } catch (err) {
      $("flow-error").textContent = err.message;
    } finally {
      $("flow-run").disabled = false;
    }
  });
  const rows = list.flows.map((f) => h("tr", { class: "click", onclick: () => { location.hash = "#/flows/" + encodeURIComponent(f.flow_id); } },
    h("td", { class: "mono" }, f.flow_id), h("td", {}, f.name), h("td", {}, pill(f.state)),
    h("td", {}, f.steps.filter((x) => STEP_ENDED.includes(x.state)).length + " / " + f.steps.length),
    h("td", {}, f.cost_micros === undefined || f.cost_micros === null ? usd(f.escrow_micros) + " held" : usd(f.cost_micros)),
    h("td", {}, ago(f.updated_ms))));
  show(main, h("h1", {}, "Flows"),
    h("p", { class: "muted" }, "Graphs of jobs with one budget: steps run as their inputs are ready, each settled from the flow's escrow, the rest refunded at the end."),
    h("div", { class: "card section" }, table(["Flow", "Name", "State", "Steps ended", "Cost", "Updated"], rows, "no flows yet")),
    h("div", { class: "card" }, h("h2", {}, "Run a flow"), form));
  listeners.add(throttled(() => { if (main.isConnected && location.hash === "#/flows") route(); }));
}

/** One flow, live: its graph with each step's state, its money, its steps. */
async function flowPage(main, flowId) {
  const head = h("div", { id: "flow-head" });
  const graph = h("div", { id: "flow-graph", class: "flow-graph" });
  const steps = h("div", { id: "flow-steps" });
  show(main, h("h1", {}, "Flow ", h("span", { class: "mono", id: "flow-id" }, flowId)),
    h("div", { class: "card section" }, head), h("div", { class: "card section" }, graph), h("div", { class: "card" }, steps));
  const refresh = async () => {
    const flow = await api("/flows/" + encodeURIComponent(flowId));
    const ended = flow.cost_micros !== undefined && flow.cost_micros !== null;
    show(head, h("div", { class: "kv" },
      h("div", { class: "k" }, "Flow"), h("div", {}, flow.name + " · account " + flow.account),
      h("div", { class: "k" }, "State"), h("div", { id: "flow-state" }, pill(flow.state), flow.reason ? "  " + flow.reason : ""),
      h("div", { class: "k" }, "Held"), h("div", {}, usd(flow.max_cost_micros)),
      h("div", { class: "k" }, ended ? "Cost" : "Left in escrow"),
      h("div", { id: "flow-money" }, ended ? usd(flow.cost_micros) + "  (refunded " + usd(flow.refund_micros) + ")" : usd(flow.escrow_micros))),
      FLOW_OPEN.includes(flow.state) ? h("div", { class: "section" }, h("button", { id: "flow-cancel", onclick: async () => { await api("/flows/" + encodeURIComponent(flowId) + "/cancel", { method: "POST" }); refresh(); } }, "Cancel flow")) : null);
    show(graph, flowGraph(flow));
    show(steps, table(["Step", "State", "Runs", "Job", "Exit", "Cost", "Why"], flow.steps.map((x) => h("tr", {},
      h("td", {}, x.step), h("td", {}, pill(x.state)), h("td", {}, x.runs),
      h("td", { class: "mono" }, x.job_id || "–"), h("td", {}, x.exit_code === undefined || x.exit_code === null ? "–" : x.exit_code),
      h("td", {}, usd(x.cost_micros)), h("td", {}, x.reason || "")))));
    main.dataset.flowState = flow.state;
    return flow;
  };
  await refresh();
  const again = throttled(() => refresh().catch(() => {}));
  listeners.add((event) => { if (event.type === "flow" && event.flow_id === flowId) again(); });
  // Events may be missed (a reconnect): the flow's own view still tells, until it ends.
  const poll = setInterval(async () => {
    if (!graph.isConnected) { clearInterval(poll); return; }
    const flow = await refresh().catch(() => null);
    if (flow && !FLOW_OPEN.includes(flow.state)) clearInterval(poll);
  }, 2000);
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** svg("rect", {…}, children…): an SVG element (text children as text, never markup). */
function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** The flow as a graph: a column per stage (a step right of everything it waits for). */
function flowGraph(flow) {
  const stepOf = (end) => end.split(":")[0];
  const after = new Map(flow.steps.map((x) => [x.step, []]));
  for (const e of flow.edges) if (after.has(stepOf(e.to))) after.get(stepOf(e.to)).push(stepOf(e.from));
  const stage = new Map();
  const depth = (name, path) => {
    if (stage.has(name)) return stage.get(name);
    if (path.has(name)) return 0;
    path.add(name);
    const d = Math.max(0, ...(after.get(name) || []).map((p) => depth(p, path) + 1));
    stage.set(name, d);
    return d;
  };
  flow.steps.forEach((x) => depth(x.step, new Set()));
  const columns = [];
  for (const x of flow.steps) (columns[stage.get(x.step)] = columns[stage.get(x.step)] || []).push(x.step);
  const W = 190, H = 56, GX = 70, GY = 22;
  const at = new Map();
  columns.forEach((column, cx) => column.forEach((name, cy) => at.set(name, { x: 10 + cx * (W + GX), y: 10 + cy * (H + GY) })));
  const width = 20 + columns.length * (W + GX) - GX;
  const height = 20 + Math.max(1, ...columns.map((c) => c.length)) * (H + GY) - GY;
  const root = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, role: "img", "aria-label": "the flow's steps and edges" },
    svg("defs", {}, svg("marker", { id: "flow-arrowhead", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "flow-arrow" }))));
  for (const e of flow.edges) {
    const a = at.get(stepOf(e.from)), b = at.get(stepOf(e.to));
    if (!a || !b) continue;
    const [x1, y1, x2, y2] = [a.x + W, a.y + H / 2, b.x, b.y + H / 2];
    const mx = (x1 + x2) / 2;
    root.append(svg("path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, class: "flow-edge" + (e.when ? " conditional" : ""), "marker-end": "url(#flow-arrowhead)" },
      svg("title", {}, e.from + " → " + e.to + (e.when ? "  when " + JSON.stringify(e.when) : ""))));
  }
  for (const x of flow.steps) {
    const p = at.get(x.step);
    const sub = x.state + (x.runs > 1 ? " · run " + x.runs : "") + (x.cost_micros ? " · " + usd(x.cost_micros) : "");
    root.append(svg("g", { class: "flow-node " + x.state, "data-step": x.step, "data-state": x.state, transform: `translate(${p.x} ${p.y})` },
      svg("title", {}, x.step + ": " + x.state + (x.reason ? " — " + x.reason : "")),
      svg("rect", { width: W, height: H, rx: 8 }),
      svg("text", { x: 12, y: 22, class: "flow-name" }, x.step),
      svg("text", { x: 12, y: 42, class: "flow-sub" }, sub)));
  }
  return root;
}

// ---- Modules -----------------------------------------------------------------------------

async function modules(main) {
  const list = await api("/modules");
  show(main, h("h1", {}, "Modules"),
    h("p", { class: "muted" }, "Every module the orchestrator's resolver chain can enumerate (chain://id@version)."),
    h("div", { class: "card section" }, table(["Module", "Backend", "Resolver", "Description", "Price hint", ""], list.modules.map((m) =>
      h("tr", {}, h("td", { class: "mono" }, m.uri), h("td", {}, m.backend), h("td", {}, m.resolver), h("td", {}, m.description || ""),
        h("td", {}, m.price_hint_micros !== undefined && m.price_hint_micros !== null ? usd(m.price_hint_micros) : "–"),
        h("td", {}, h("button", { class: "secondary", onclick: () => { location.hash = "#/deploy/" + encodeURIComponent(m.uri); } }, "Deploy")))),
    "no resolver lists modules")),
    (list.problems || []).length ? h("div", { class: "card" }, h("h2", {}, "Resolvers that could not list"), h("ul", {}, list.problems.map((p) => h("li", {}, typeof p === "string" ? p : JSON.stringify(p))))) : null);
}

// ---- Nodes -------------------------------------------------------------------------------

async function nodes(main, nodeId) {
  if (nodeId) return node(main, nodeId);
  const list = await api("/nodes");
  show(main, h("h1", {}, "Nodes"), h("div", { class: "card" }, nodesTable(list.nodes)));
  listeners.add(throttled(() => { if (location.hash === "#/nodes") nodes(main); }));
}

async function node(main, nodeId) {
  const { node: n, plugins } = await api("/nodes/" + encodeURIComponent(nodeId));
  const kv = (pairs) => h("div", { class: "kv" }, pairs.flatMap(([k, v]) => [h("div", { class: "k" }, k), h("div", {}, v)]));
  const hw = n.hardware || {};
  const gpus = n.gpus.map((g, i) => {
    const t = (n.gpu_telemetry || []).find((x) => x.uuid === g.uuid) || (n.gpu_telemetry || [])[i];
    return h("tr", {}, h("td", {}, g.name), h("td", {}, g.vram_mib + " MiB"), h("td", {}, t ? t.utilization_pct + "%" : "–"),
      h("td", {}, t ? t.vram_used_mib + " / " + t.vram_total_mib + " MiB" : "–"), h("td", {}, t ? t.temperature_c + "°C" : "–"), h("td", {}, t ? (t.power_mw / 1000).toFixed(0) + " W" : "–"));
  });
  let earnings = null;
  if (me.role === "operator") {
    try {
      const account = await api("/account?account=" + encodeURIComponent(n.provider_account));
      earnings = usd(account.account.balance_micros) + " in " + n.provider_account;
    } catch (e) { earnings = "–"; }
  }
  const pluginRows = plugins.ok
    ? plugins.ok.plugins.map((p) => h("tr", {}, h("td", { class: "mono" }, p.name || p.file), h("td", {}, p.version || ""), h("td", {}, p.kind || ""),
        h("td", {}, (p.backends || []).join(", ")), h("td", {}, p.refused ? pill("refused: " + p.refused, "bad") : p.note ? p.note : pill("loaded", "ok"))))
    : [];
  show(main, h("h1", {}, "Node ", h("span", { class: "mono" }, n.node_id), " ", pill(n.status)),
    h("div", { class: "grid two section" },
      h("div", { class: "card" }, h("h2", {}, "Machine"), kv([
        ["Provider", n.provider_account], ["Tier", String(n.tier)], ["CPU", (hw.cpu_model || "?") + " · " + n.cpu_cores + " cores"],
        ["Memory", n.memory_mib + " MiB"], ["System", (hw.os || "?") + " " + (hw.kernel || "")], ["Runtimes", (hw.runtimes || []).join(", ") || "–"],
        ["Backends", n.backends.join(", ")], ["GPUs", n.gpus.length ? String(n.gpus.length) : hw.gpu_note || "none"]])),
      h("div", { class: "card" }, h("h2", {}, "Prices and record"), kv([
        ["CPU", cents(n.pricing.cpu_hour_cents) + " / hour"], ["GPU", cents(n.pricing.gpu_hour_cents) + " / hour"],
        ["Memory", cents(n.pricing.memory_gb_hour_cents) + " / GB·hour"],
        ["Tokens", usd(n.pricing.input_million_micros) + " in · " + usd(n.pricing.output_million_micros) + " out per 1M"],
        ["Load", n.active + " of " + n.max_concurrent + " slots"], ["Jobs", n.jobs_run + " run · " + n.jobs_succeeded + " succeeded"],
        ["Reputation", n.reputation.toFixed(2)], ["Heartbeat", n.last_heartbeat_ms_ago + " ms ago"],
        earnings ? ["Earnings", earnings] : null].filter(Boolean)))),
    n.gpus.length ? h("div", { class: "card section" }, h("h2", {}, "GPU telemetry"), table(["GPU", "VRAM", "Use", "VRAM used", "Temp", "Power"], gpus)) : null,
    h("div", { class: "card" }, h("h2", {}, "Plugins (asked of the node's agent now)"),
      plugins.ok ? table(["Plugin", "Version", "Kind", "Backends", "Status"], pluginRows, "no plugins") : h("p", { class: "error" }, "the agent did not answer: " + plugins.error)));
}

// ---- Account -----------------------------------------------------------------------------

async function account(main, named) {
  if (me.role === "operator" && !named) {
    const input = h("input", { id: "account-name", placeholder: "alice" });
    show(main, h("h1", {}, "Account"), h("div", { class: "card" }, h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); location.hash = "#/account/" + encodeURIComponent(input.value.trim()); } },
      h("label", {}, "Account to look at", input), h("div", {}, h("button", { type: "submit" }, "Open")))));
    return;
  }
  const query = me.role === "operator" ? "?account=" + encodeURIComponent(named) : "";
  const [{ account: view, statement }, keyList] = await Promise.all([api("/account" + query), api("/keys" + query)]);
  const keyName = h("input", { id: "key-name", placeholder: "my laptop" });
  const keyLimit = h("input", { id: "key-limit", placeholder: "e.g. 5 (none: the balance)" });
  const created = h("div", { id: "key-created" });
  const keyForm = h("form", { class: "row" }, h("label", {}, "Name", keyName), h("label", {}, "Credit limit (USD)", keyLimit),
    h("div", {}, h("button", { type: "submit", id: "key-create" }, "Create key")));
  keyForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const key = await api("/keys", { method: "POST", body: { account: view.account, name: keyName.value, credit_limit_usd: keyLimit.value } });
      show(created, h("p", {}, "Your new key — shown this once, only its SHA-256 is kept:"), h("div", { class: "secret mono" }, key.key));
      setTimeout(() => account(main, named).then(() => $("key-created").replaceWith(created)), 0);
    } catch (err) { show(created, h("p", { class: "error" }, err.message)); }
  });
  show(main, h("h1", {}, "Account ", view.account),
    h("div", { class: "grid cards" }, stat("Balance", usd(view.balance_micros)), stat("Held in escrow", usd(view.held_micros), "for open jobs")),
    h("div", { class: "card section" }, h("h2", {}, "API keys (for the OpenAI-compatible gateway)"), keyForm, created,
      table(["Key", "Name", "Spent", "Limit", "Created", "Last used", ""], keyList.keys.map((k) => h("tr", {},
        h("td", { class: "mono" }, k.key_id), h("td", {}, k.name || ""), h("td", {}, usd(k.spent_micros)),
        h("td", {}, k.credit_limit_micros !== null && k.credit_limit_micros !== undefined ? usd(k.credit_limit_micros) : "balance"),
        h("td", { class: "muted" }, ago(k.created_ms)), h("td", { class: "muted" }, k.last_used_ms ? ago(k.last_used_ms) : "never"),
        h("td", {}, k.revoked_ms ? pill("revoked", "bad") : h("button", { class: "secondary", onclick: async () => {
          await api("/keys/" + encodeURIComponent(k.key_id) + "/revoke", { method: "POST" });
          account(main, named);
        } }, "Revoke")))), "no keys yet")),
    h("div", { class: "card" }, h("h2", {}, "Statement (newest first)"), table(["When", "What", "Job", "Amount", "Balance after"],
      statement.lines.map((l) => h("tr", {}, h("td", { class: "muted" }, ago(l.created_ms)), h("td", {}, l.kind),
        h("td", { class: "mono" }, l.job_id ? shortId(l.job_id) : ""), h("td", {}, usd(l.amount_micros)), h("td", {}, usd(l.balance_after_micros)))), "no postings")));
  listeners.add(throttled(() => { if (location.hash.startsWith("#/account") && !$("key-created").childElementCount) account(main, named); }));
}

// ---- Receipts ----------------------------------------------------------------------------

async function receipts(main, jobId) {
  const input = h("input", { id: "receipt-job", placeholder: "job-…", value: jobId || "" });
  const out = h("div", { id: "receipt-out" });
  const form = h("form", { class: "row" }, h("label", {}, "Job id", input), h("div", {}, h("button", { type: "submit" }, "Fetch and verify")));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = "#/receipts/" + encodeURIComponent(input.value.trim()); });
  show(main, h("h1", {}, "Receipts"),
    h("p", { class: "muted" }, "A receipt is the orchestrator's ed25519 signature over what a job cost and who was paid. This page checks it itself, in your browser (WebCrypto), against the key in the receipt."),
    h("div", { class: "card section" }, form), out);
  if (!jobId) return;
  let signed;
  try { signed = await api("/receipts/" + encodeURIComponent(jobId)); } catch (e) { show(out, h("p", { class: "error" }, e.message)); return; }
  const verdict = await verifyReceipt(signed);
  const body = JSON.parse(signed.body);
  const rows = [];
  const flat = (prefix, value) => {
    if (value && typeof value === "object" && !Array.isArray(value)) for (const [k, v] of Object.entries(value)) flat(prefix ? prefix + "." + k : k, v);
    else if (prefix === "node_report" && typeof value === "string") rows.push([prefix, value.length > 160 ? value.slice(0, 160) + "… (signed by the node)" : value]);
    else rows.push([prefix, /_micros$/.test(prefix) && typeof value === "number" ? usd(value) : JSON.stringify(value)]);
  };
  flat("", body);
  show(out, h("div", { class: "card" },
    h("div", { class: "banner " + (verdict.ok ? "good" : "badn"), id: "receipt-verdict" }, verdict.ok ? "✓ " + verdict.message : "✗ " + verdict.message),
    h("div", { class: "section" }),
    h("div", { class: "kv" }, rows.flatMap(([k, v]) => [h("div", { class: "k mono" }, k), h("div", { class: "mono" }, v)]))));
}

/** Checks the signature over the exact body bytes with the orchestrator's public nkey. */
async function verifyReceipt(signed) {
  try {
    const key = nkeyPublic(signed.orchestrator_key);
    const signature = Uint8Array.from(atob(signed.signature_b64), (c) => c.charCodeAt(0));
    const cryptoKey = await crypto.subtle.importKey("raw", key, { name: "Ed25519" }, false, ["verify"]);
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, cryptoKey, signature, new TextEncoder().encode(signed.body));
    if (!ok) return { ok: false, message: "the signature does not match the receipt: it was altered or not signed by " + signed.orchestrator_key };
    // The split must add up, and the fee follow its formula (integers: BigInt, no rounding).
    const body = JSON.parse(signed.body);
    const problems = [];
    const [cost, fee, provider, refund, held] = [body.cost_micros, body.fee_micros, body.provider_micros, body.refund_micros, body.max_cost_micros].map(BigInt);
    if (cost !== provider + fee) problems.push("cost ≠ provider + fee");
    if (held !== cost + refund) problems.push("held ≠ cost + refund");
    if (fee !== (cost * BigInt(body.fee_bps) + 5000n) / 10000n) problems.push("the fee is not " + body.fee_bps + " basis points of the cost");
    if (problems.length) return { ok: false, message: "signed, but " + problems.join(", ") };
    return { ok: true, message: "signature valid, the split adds up — signed by orchestrator " + signed.orchestrator_key };
  } catch (e) {
    return { ok: false, message: "cannot verify: " + e.message };
  }
}

/** The 32-byte ed25519 key inside a public nkey (base32: 1 prefix byte, key, CRC-16). */
function nkeyPublic(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  const bytes = [];
  let bits = 0, value = 0;
  for (const ch of text) {
    const index = alphabet.indexOf(ch);
    if (index < 0) throw new Error("not a public nkey");
    value = (value << 5) | index; bits += 5;
    if (bits >= 8) { bytes.push((value >>> (bits - 8)) & 0xff); bits -= 8; }
  }
  if (bytes.length !== 35) throw new Error("not a public nkey");
  let crc = 0;
  for (const b of bytes.slice(0, 33)) {
    crc ^= b << 8;
    for (let i = 0; i < 8; i++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  if (crc !== (bytes[33] | (bytes[34] << 8))) throw new Error("the key's checksum is wrong");
  return new Uint8Array(bytes.slice(1, 33));
}

// ---- Start -------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", async () => {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", async () => { await api("/session", { method: "DELETE" }).catch(() => {}); showSignIn(); });
  try {
    const session = await api("/session");
    if (session.signed_in) { me = session; start(); } else showSignIn();
  } catch (e) {
    showSignIn(e.message);
  }
});
