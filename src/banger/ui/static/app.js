// banger web UI: a small client-side router over /api; live updates come from /api/events (server-sent events).
"use strict";

const main = document.getElementById("main");
const errorsBox = document.getElementById("errors");

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(message, hint, status) { super(message); this.hint = hint; this.status = status; }
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let resp;
  try { resp = await fetch(path, opts); } catch (e) { throw new ApiError("the banger UI server is not answering", "is `banger ui` still running?", 0); }
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const msg = data && data.error ? data.error : `${method} ${path}: HTTP ${resp.status}`;
    throw new ApiError(msg, data && data.hint, resp.status);
  }
  return data;
}

// Errors read as the CLI prints them: "error: ..." then "hint: ...".
function showError(err) {
  const box = h("div", { class: "error" },
    h("button", { onclick: () => box.remove(), title: "dismiss" }, "×"),
    `error: ${err.message}`,
    err.hint ? h("div", { class: "hint" }, `hint: ${err.hint}`) : null);
  errorsBox.append(box);
  while (errorsBox.children.length > 5) errorsBox.firstChild.remove();
}

function errorLine(err) {
  return h("div", { class: "error" }, `error: ${err.message}`, err.hint ? h("div", { class: "hint" }, `hint: ${err.hint}`) : null);
}

async function act(button, fn) {
  if (button) button.disabled = true;
  try { return await fn(); } catch (e) { showError(e); return undefined; } finally { if (button) button.disabled = false; }
}

function confirmed(question) { return window.confirm(question); }

function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function fmtUptime(s) {
  if (s === null || s === undefined) return "";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), ss = s % 60;
  if (d) return `${d}d${hh}h`;
  if (hh) return `${hh}h${String(m).padStart(2, "0")}m`;
  return `${m}m${String(ss).padStart(2, "0")}s`;
}

function stateBadge(state) { return h("span", { class: `state state-${state}`, "data-state": state }, state); }

function publishedLinks(vm) {
  return (vm.publish || []).map((p) => {
    const hostPort = p.split(":")[0];
    return h("a", { href: `http://${location.hostname}:${hostPort}/`, target: "_blank", rel: "noopener" }, p);
  }).reduce((acc, el) => (acc.length ? [...acc, " ", el] : [el]), []);
}

// ---- live events ------------------------------------------------------------------------------------------
const listeners = new Set();
const liveBadge = document.getElementById("live");
function onEvent(fn) { listeners.add(fn); return () => listeners.delete(fn); }
function startEvents() {
  const es = new EventSource("/api/events");
  es.onopen = () => { liveBadge.textContent = "live"; liveBadge.className = "live on"; };
  es.onerror = () => { liveBadge.textContent = "reconnecting"; liveBadge.className = "live off"; };
  es.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type === "subscribed") { liveBadge.textContent = "live"; liveBadge.className = "live on"; }
    for (const fn of [...listeners]) { try { fn(ev); } catch (e) { console.error(e); } }
  };
  es.addEventListener("failure", (m) => {
    const err = JSON.parse(m.data);
    liveBadge.textContent = "daemon unavailable"; liveBadge.className = "live off";
    liveBadge.title = `error: ${err.error}${err.hint ? `\nhint: ${err.hint}` : ""}`;
  });
}

function debounce(fn, ms) {
  let t = null;
  return () => { clearTimeout(t); t = setTimeout(fn, ms); };
}

// ---- VMs --------------------------------------------------------------------------------------------------
function vmActions(vm, after) {
  const live = ["running", "starting", "stopping"].includes(vm.state);
  const post = (verb) => (e) => act(e.target, async () => { await api("POST", `/api/vms/${vm.name}/${verb}`, {}); if (after) after(); });
  const remove = (e) => {
    const q = live ? `VM ${vm.name} is ${vm.state}: kill it and remove it with all its files?` : `Remove VM ${vm.name} and all its files?`;
    if (!confirmed(q)) return;
    act(e.target, async () => { await api("DELETE", `/api/vms/${vm.name}${live ? "?force=1" : ""}`); if (after) after(true); });
  };
  const stop = (e) => { if (confirmed(`Stop VM ${vm.name}?`)) post("stop")(e); };
  const restart = (e) => { if (confirmed(`Restart VM ${vm.name}?`)) post("restart")(e); };
  return h("span", { class: "actions" },
    h("button", { "data-action": "start", onclick: post("start"), disabled: live }, "Start"), " ",
    h("button", { "data-action": "stop", onclick: stop, disabled: vm.state !== "running" }, "Stop"), " ",
    h("button", { "data-action": "restart", onclick: restart, disabled: vm.state !== "running" }, "Restart"), " ",
    h("button", { "data-action": "delete", class: "danger", onclick: remove }, "Delete"));
}

function createForm(images, kernels, done) {
  const field = (label, input) => h("label", {}, label, input);
  const select = (name, items) => h("select", { name }, h("option", { value: "" }, "(default)"), items.map((i) => h("option", { value: i.name }, i.name)));
  const form = h("form", { class: "grid", id: "create-form" },
    field("name", h("input", { name: "name", placeholder: "random" })),
    field("image", select("image", images)),
    field("kernel", select("kernel", kernels)),
    field("vCPUs", h("input", { name: "vcpus", type: "number", min: 1, value: 2 })),
    field("memory (MiB)", h("input", { name: "memory", type: "number", min: 128, value: 1024 })),
    field("disk", h("input", { name: "disk_size", placeholder: "image size, e.g. 8G" })),
    field("network", h("select", { name: "net" }, h("option", { value: "bridge" }, "bridge"), h("option", { value: "none" }, "none"))),
    field("publish HOST:GUEST", h("input", { name: "publish", placeholder: "8080:80" })),
    field("workspace", h("input", { name: "workspace", placeholder: "not supported by this daemon", disabled: true })),
    field("only create", h("input", { name: "no_start", type: "checkbox" })),
    h("div", {}, h("button", { type: "submit" }, "Create")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const fd = new FormData(form);
    const body = {};
    for (const [k, v] of fd.entries()) if (v !== "") body[k] = v;
    body.no_start = form.elements.no_start.checked;
    for (const k of ["vcpus", "memory"]) if (body[k] !== undefined) body[k] = Number(body[k]);
    act(form.querySelector("button[type=submit]"), async () => { await api("POST", "/api/vms", body); done(); });
  });
  return form;
}

async function pageVms() {
  const table = h("tbody", { id: "vm-rows" });
  const uptimes = {};
  const render = async () => {
    let vms;
    try { [vms] = await Promise.all([api("GET", "/api/vms"), api("GET", "/api/uptime").then((u) => Object.assign(uptimes, u))]); } catch (e) { table.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, errorLine(e)))); return; }
    if (!vms.length) { table.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "no VMs (create one below)"))); return; }
    table.replaceChildren(...vms.map((vm) => h("tr", { id: `vm-row-${vm.name}`, "data-vm": vm.name },
      h("td", {}, h("a", { href: `#/vm/${vm.name}` }, vm.name)),
      h("td", { class: "state-cell" }, stateBadge(vm.state), vm.reason ? h("div", { class: "muted" }, vm.reason) : null),
      h("td", {}, vm.ip || ""),
      h("td", {}, vm.vmm),
      h("td", { class: "uptime", "data-since": vm.state === "running" && uptimes[vm.name] !== undefined ? Date.now() / 1000 - uptimes[vm.name] : "" }, ""),
      h("td", {}, publishedLinks(vm)),
      h("td", {}, vmActions(vm, render)))));
    tick();
  };
  const tick = () => {
    for (const td of table.querySelectorAll("td.uptime")) td.textContent = td.dataset.since ? fmtUptime(Date.now() / 1000 - Number(td.dataset.since)) : "";
  };
  const timer = setInterval(tick, 1000);  // a clock for the uptime column; state changes come as events
  const refresh = debounce(render, 150);
  const off = onEvent((ev) => { if (ev.type.startsWith("vm.")) refresh(); });
  const formSlot = h("div", {});
  main.replaceChildren(h("h1", {}, "VMs"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Name", "State", "Address", "VMM", "Uptime", "Ports", ""].map((c) => h("th", {}, c)))), table),
    h("h2", {}, "Create a VM"), formSlot);
  await render();
  Promise.all([api("GET", "/api/images").catch(() => []), api("GET", "/api/kernels").catch(() => [])])
    .then(([images, kernels]) => formSlot.replaceChildren(createForm(images, kernels, render)));
  return () => { off(); clearInterval(timer); };
}

// ---- one VM -----------------------------------------------------------------------------------------------
async function pageVm(name) {
  const cleanups = [];
  const details = h("div", { id: "vm-details" });
  const portsBox = h("div", { id: "vm-ports" });
  const consoleBox = h("pre", { class: "console", id: "console" });
  const termBox = h("div", { id: "terminal-slot" });
  const sessionsBox = h("div", { id: "sessions" });
  let current = null;

  const renderDetails = async () => {
    let vm;
    try { vm = await api("GET", `/api/vms/${name}`); } catch (e) { details.replaceChildren(errorLine(e)); return null; }
    const rows = [["state", stateBadge(vm.state)], ["reason", vm.reason], ["vmm", vm.vmm], ["pid", vm.pid], ["address", vm.ip],
      ["kernel", vm.kernel], ["image", vm.image], ["vCPUs", vm.vcpus], ["memory", `${vm.memory_mib} MiB`], ["disk", fmtBytes(vm.disk_bytes)],
      ["network", vm.net], ["published", publishedLinks(vm)], ["created", vm.created_at], ["directory", vm.dir]];
    details.replaceChildren(h("div", { class: "row" }, vmActions(vm, (gone) => { if (gone) location.hash = "#/"; })),
      h("dl", { class: "kv" }, rows.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
    const wasRunning = current && current.state === "running";
    current = vm;
    if (vm.state === "running" && !wasRunning) { renderPorts(vm); openTerminal(); renderSessions(); }
    if (vm.state !== "running") { portsBox.replaceChildren(h("p", { class: "muted" }, "the VM is not running")); closeTerminal(); }
    return vm;
  };

  const renderPorts = async (vm) => {
    let ports;
    try { ports = await api("GET", `/api/vms/${name}/ports`); } catch (e) { portsBox.replaceChildren(errorLine(e)); return; }
    const published = {};
    for (const p of vm.publish || []) { const [hp, gp] = p.split(":"); published[gp] = hp; }
    portsBox.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["Proto", "Address", "Port", "Process", "Published"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ports.length ? ports.map((p) => h("tr", {}, h("td", {}, p.proto), h("td", {}, p.address), h("td", {}, p.port), h("td", {}, p.comm || ""),
        h("td", {}, published[p.port] && p.proto === "tcp" ? h("a", { href: `http://${location.hostname}:${published[p.port]}/`, target: "_blank", rel: "noopener" }, `:${published[p.port]}`) : "")))
        : h("tr", {}, h("td", { colspan: 5, class: "empty" }, "no listening ports")))));
  };

  // Console log: the last lines, then new output as the daemon sees it.
  const consoleStream = new EventSource(`/api/vms/${name}/console`);
  consoleStream.onmessage = (m) => {
    consoleBox.textContent += JSON.parse(m.data);
    if (consoleBox.textContent.length > 200000) consoleBox.textContent = consoleBox.textContent.slice(-150000);
    consoleBox.scrollTop = consoleBox.scrollHeight;
  };
  consoleStream.addEventListener("failure", (m) => { const e = JSON.parse(m.data); consoleBox.textContent += `\nerror: ${e.error}\n`; consoleStream.close(); });
  consoleStream.addEventListener("end", () => consoleStream.close());
  consoleStream.onopen = () => { consoleBox.textContent = ""; };  // each connection sends the tail again
  cleanups.push(() => consoleStream.close());

  let term = null, ws = null;
  const closeTerminal = () => {
    if (ws) { ws.onclose = null; ws.close(); ws = null; }
    if (term) { term.dispose(); term = null; }
    termBox.replaceChildren(h("p", { class: "muted" }, "a terminal opens when the VM runs"));
  };
  // The shell is a guest session: its name is kept for this tab, so a reload reattaches to the same shell.
  const shellKey = `banger-shell-${name}`;
  const openTerminal = (fresh) => {
    if (!window.Terminal || !window.FitAddon) {
      termBox.replaceChildren(errorLine(new ApiError("xterm.js is not installed in this banger", "run scripts/setup.sh to vendor it")));
      return;
    }
    closeTerminal();
    const div = h("div", { id: "terminal" });
    const reopen = h("button", { onclick: () => openTerminal(true) }, "New shell");
    const status = h("span", { class: "muted", id: "terminal-status" }, "connecting");
    termBox.replaceChildren(h("div", { class: "row" }, reopen, status), div);
    term = new window.Terminal({ fontSize: 13, cursorBlink: true, scrollback: 5000 });
    const fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(div);
    fit.fit();
    window.bangerTerminal = term;  // for tests and the console: rows, cols, buffer
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const kept = sessionStorage.getItem(shellKey);
    const which = kept ? (fresh === true ? `&replace=${encodeURIComponent(kept)}` : `&session=${encodeURIComponent(kept)}`) : "";
    if (fresh === true) sessionStorage.removeItem(shellKey);
    ws = new WebSocket(`${proto}://${location.host}/api/vms/${name}/terminal?rows=${term.rows}&cols=${term.cols}${which}`);
    ws.binaryType = "arraybuffer";
    const sock = ws;
    ws.onopen = () => { status.textContent = "connected"; term.focus(); };
    ws.onmessage = (m) => {
      if (typeof m.data !== "string") { term.write(new Uint8Array(m.data)); return; }
      const msg = JSON.parse(m.data);
      if (msg.session) { sessionStorage.setItem(shellKey, msg.session); term.shellSession = msg.session; }
      else if (msg.error) { status.textContent = `error: ${msg.error}`; showError(new ApiError(msg.error, msg.hint)); }
      else if (msg.exit) {
        sessionStorage.removeItem(shellKey);
        status.textContent = `shell exited (${msg.exit.signal ? `signal ${msg.exit.signal}` : `code ${msg.exit.exit_code}`})`;
      }
    };
    ws.onclose = () => { if (status.textContent === "connected" || status.textContent === "connecting") status.textContent = "disconnected"; };
    term.onData((data) => { if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ data })); });
    term.onResize(({ rows, cols }) => { if (sock.readyState === WebSocket.OPEN) sock.send(JSON.stringify({ resize: [rows, cols] })); });
    const onWinResize = debounce(() => { if (term) fit.fit(); }, 100);
    window.addEventListener("resize", onWinResize);
    cleanups.push(() => window.removeEventListener("resize", onWinResize));
  };
  cleanups.push(closeTerminal);

  // Sessions (process and agent); a daemon without them says so.
  let selected = null;
  const transcript = h("div", { class: "transcript", id: "transcript" });
  const renderSessions = async () => {
    let sessions;
    try { sessions = await api("GET", `/api/vms/${name}/sessions`); } catch (e) { sessionsBox.replaceChildren(errorLine(e)); return; }
    const startForm = h("form", { class: "row" }, h("input", { name: "command", placeholder: "command, e.g. sleep 100" }),
      h("label", {}, h("input", { type: "checkbox", name: "agent" }), " agent (opencode)"), h("button", { type: "submit" }, "Start session"));
    startForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const agent = startForm.elements.agent.checked;
      const cmd = startForm.elements.command.value.trim();
      const body = agent ? { agent: "opencode", title: cmd || null } : { command: cmd.split(/\s+/).filter(Boolean) };
      act(startForm.querySelector("button"), async () => { await api("POST", `/api/vms/${name}/sessions`, body); renderSessions(); });
    });
    const prompt = h("form", { class: "row" }, h("input", { name: "text", placeholder: "prompt or input", size: 60 }), h("button", { type: "submit" }, "Send"),
      h("button", { type: "button", class: "danger", onclick: (e) => selected && confirmed(`Abort session ${selected}?`) && act(e.target, () => api("POST", `/api/vms/${name}/sessions/${encodeURIComponent(selected)}/stop`, {})) }, "Abort"));
    prompt.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!selected) return;
      // The daemon follows the turn from here: following the session again streams it as it goes.
      act(prompt.querySelector("button"), async () => { const session = selected; await api("POST", `/api/vms/${name}/sessions/${encodeURIComponent(session)}/send`, { text: prompt.elements.text.value }); follow(session); });
      prompt.elements.text.value = "";
    });
    sessionsBox.replaceChildren(
      h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Kind", "State", "Command", "Started"].map((c) => h("th", {}, c)))),
        h("tbody", {}, sessions.length ? sessions.map((s) => h("tr", {}, h("td", {}, h("a", { href: "#", onclick: (e) => { e.preventDefault(); follow(s.name); } }, s.name)),
          h("td", {}, s.kind), h("td", {}, stateBadge(s.state)), h("td", {}, (s.command || []).join(" ")), h("td", {}, s.started_at || "")))
          : h("tr", {}, h("td", { colspan: 5, class: "empty" }, "no sessions")))),
      startForm, transcript, prompt);
  };
  // A session's transcript from the start, then live (session.logs --follow relayed as server-sent events).
  let logStream = null;
  const follow = (session) => {
    if (logStream) logStream.close();
    selected = session;
    transcript.textContent = "";
    logStream = new EventSource(`/api/vms/${name}/sessions/${encodeURIComponent(session)}/logs`);
    logStream.onmessage = (m) => {
      transcript.textContent += transcriptLine(JSON.parse(m.data));
      if (transcript.textContent.length > 400000) transcript.textContent = transcript.textContent.slice(-300000);
      transcript.scrollTop = transcript.scrollHeight;
    };
    logStream.addEventListener("failure", (m) => { const e = JSON.parse(m.data); transcript.textContent += `error: ${e.error}\n`; logStream.close(); });
    // Each connection sends everything from the start; "end": the session ended, or an agent's turn is over.
    logStream.onopen = () => { transcript.textContent = ""; };
    logStream.addEventListener("end", () => logStream.close());
  };
  cleanups.push(() => logStream && logStream.close());
  cleanups.push(onEvent((ev) => {
    if (ev.type.startsWith("vm.") && (ev.vm === name || ev.vm_id === (current && current.id))) renderDetails();
    if (ev.type.startsWith("session.") && ev.vm === name) {
      if (ev.type === "session.state") renderSessions();
    }
  }));

  main.replaceChildren(h("h1", {}, h("a", { href: "#/" }, "VMs"), " / ", name), details,
    h("h2", {}, "Terminal"), termBox, h("h2", {}, "Listening ports"), portsBox,
    h("h2", {}, "Console log"), consoleBox, h("h2", {}, "Sessions"), sessionsBox);
  closeTerminal();
  const vm = await renderDetails();
  if (vm && vm.state !== "running") renderSessions();
  return () => cleanups.forEach((fn) => fn());
}

// One streamed session item as readable text: output, agent text, tool calls with status, errors.
function transcriptLine(note) {
  const ev = note.event && typeof note.event === "object" ? note.event : note;
  if (typeof ev.text === "string") return ev.text;
  if (typeof ev.data === "string") { try { return atob(ev.data); } catch (e) { return ""; } }
  if (ev.error) return `error: ${ev.error}\n`;
  if (ev.tool) return `[tool ${ev.tool}${ev.status ? `: ${ev.status}` : ""}]\n`;
  if (ev.type) return `[${ev.type}]\n`;
  return "";
}

// ---- kernels and images -----------------------------------------------------------------------------------
async function pageKernels() {
  const installed = h("tbody", { id: "kernel-rows" });
  const catalog = h("tbody", { id: "catalog-rows" });
  const bars = {};
  const renderInstalled = async () => {
    let rows;
    try { rows = await api("GET", "/api/kernels"); } catch (e) { installed.replaceChildren(h("tr", {}, h("td", { colspan: 6 }, errorLine(e)))); return; }
    installed.replaceChildren(...(rows.length ? rows.map((k) => h("tr", { id: `kernel-${k.name}` }, h("td", {}, k.name), h("td", {}, k.distro), h("td", {}, k.kernel_version),
      h("td", {}, k.size || ""), h("td", {}, k.source || ""),
      h("td", {}, h("button", { class: "danger", "data-action": "rm", onclick: (e) => confirmed(`Remove kernel ${k.name}?`) && act(e.target, async () => { await api("DELETE", `/api/kernels/${k.name}`); refreshAll(); }) }, "Remove"))))
      : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "no kernels installed"))]));
  };
  const renderCatalog = async () => {
    let rows;
    try { rows = await api("GET", "/api/kernels?available=1"); } catch (e) { catalog.replaceChildren(h("tr", {}, h("td", { colspan: 6 }, errorLine(e)))); return; }
    catalog.replaceChildren(...(rows.length ? rows.map((k) => {
      const bar = bars[k.name] || (bars[k.name] = { fill: h("div", {}), pct: h("span", { class: "pct" }, ""), step: h("span", { class: "muted step" }, "") });
      const pull = h("button", { "data-action": "pull", onclick: (e) => act(e.target, async () => {
        setBar(k.name, 0, "starting");
        await api("POST", `/api/kernels/${k.name}/pull`, { force: k.state === "pulled" });
        refreshAll();
      }) }, k.state === "pulled" ? "Pull again" : "Pull");
      return h("tr", { id: `catalog-${k.name}` }, h("td", {}, k.name), h("td", {}, k.kernel_version), h("td", {}, k.size),
        h("td", { class: "kstate" }, stateBadge(k.state)), h("td", {}, pull, " ", h("span", { class: "progress" }, bar.fill), " ", bar.pct, " ", bar.step), h("td", { class: "muted" }, k.description));
    }) : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "the catalog has no entries"))]));
  };
  const setBar = (name, pct, step) => {
    const bar = bars[name];
    if (!bar) return;
    if (pct !== null) { bar.fill.style.width = `${pct}%`; bar.pct.textContent = `${pct}%`; bar.fill.parentElement && bar.fill.parentElement.setAttribute("data-pct", String(pct)); }
    if (step !== null) bar.step.textContent = step;
  };
  const refreshAll = () => { renderInstalled(); renderCatalog(); };
  const off = onEvent((ev) => {
    if (ev.type === "kernel.removed" || (ev.type === "op.done" && ev.op === "kernel.build")) { refreshAll(); return; }
    if (ev.op !== "kernel.pull") return;
    if (ev.type === "op.progress") {
      const pct = ev.total ? Math.floor(100 * ev.done / ev.total) : null;
      setBar(ev.name, pct, ev.step);
    } else if (ev.type === "op.done") {
      if (ev.ok) setBar(ev.name, 100, "done"); else setBar(ev.name, null, `failed: ${ev.error}`);
      refreshAll();
    }
  });
  main.replaceChildren(h("h1", {}, "Kernels"),
    h("h2", {}, "Catalog"), h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Version", "Size", "State", "Pull", "Description"].map((c) => h("th", {}, c)))), catalog),
    h("h2", {}, "Installed"), h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Distro", "Version", "Size", "Source", ""].map((c) => h("th", {}, c)))), installed));
  await Promise.all([renderInstalled(), renderCatalog()]);
  return off;
}

async function pageImages() {
  const body = h("tbody", { id: "image-rows" });
  const cols = ["Name", "Preset", "Suite", "Size", "Built", "Source", ""];
  const render = async () => {
    let rows;
    try { rows = await api("GET", "/api/images"); } catch (e) { body.replaceChildren(h("tr", {}, h("td", { colspan: cols.length }, errorLine(e)))); return; }
    const rm = (im) => (e) => confirmed(`Remove image ${im.name}?`) && act(e.target, async () => { await api("DELETE", `/api/images/${im.name}`); render(); });
    body.replaceChildren(...(rows.length ? rows.map((im) => h("tr", { id: `image-${im.name}` }, h("td", {}, im.name), h("td", {}, im.preset || ""),
      h("td", {}, im.suite || ""), h("td", {}, im.size || fmtBytes(im.size_bytes)), h("td", {}, im.built_at || ""), h("td", { class: "muted" }, im.source || ""),
      h("td", {}, h("button", { class: "danger", "data-action": "rm", onclick: rm(im) }, "Remove"))))
      : [h("tr", {}, h("td", { colspan: cols.length, class: "empty" }, "no images (build one with `banger image build`)"))]));
  };
  main.replaceChildren(h("h1", {}, "Images"), h("table", {}, h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c)))), body));
  await render();
  const refresh = debounce(render, 150);
  return onEvent((ev) => { if (ev.type === "image.removed" || (ev.type === "op.done" && ev.op === "image.build")) refresh(); });
}

// ---- router -----------------------------------------------------------------------------------------------
let cleanup = null;
async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === (parts[0] === "vm" ? "vms" : parts[0] || "vms"));
  try {
    if (parts[0] === "vm" && parts[1]) cleanup = await pageVm(parts[1]);
    else if (parts[0] === "kernels") cleanup = await pageKernels();
    else if (parts[0] === "images") cleanup = await pageImages();
    else cleanup = await pageVms();
  } catch (e) { main.replaceChildren(errorLine(e)); }
  document.body.dataset.page = parts[0] || "vms";
}
window.addEventListener("hashchange", route);
startEvents();
route();
