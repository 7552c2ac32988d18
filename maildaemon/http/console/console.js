// maildaemon operator console: a client of the internal HTTP API, nothing else.
// Every value from the API is put on the page with textContent (never innerHTML), and a
// message's HTML only goes into a sandboxed frame (sandbox="", no script, no remote loads).
"use strict";

const API = "/api/v1/internal";
const TOKEN_KEY = "maildaemon.operatorToken";
const REFRESH_MS = 5000;
let refreshTimer = null;

// --- DOM helpers --------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function main() { return document.getElementById("main"); }

function show(...nodes) {
  const m = main();
  m.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function flash(text, isError) {
  const box = document.getElementById("flash");
  const p = h("p", { class: isError ? "error" : "" }, text);
  box.append(p);
  setTimeout(() => p.remove(), isError ? 9000 : 4000);
}

function when(iso) {
  if (!iso) return "–";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");
}

function status(s) { return h("span", { class: "status status-" + s }, s); }

function deliveryLink(id) { return h("a", { href: "#/delivery/" + encodeURIComponent(id) }, id); }

function fields(pairs) {
  return h("dl", { class: "fields" },
    pairs.filter((p) => p).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "–" : v)]));
}

function table(headers, rows, cls) {
  return h("table", { class: cls || "results" },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, r.map((c) => h("td", { class: "wrap" }, c ?? "–"))))
      : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "Nothing here."))));
}

function input(id, label, attrs) {
  return h("label", { for: id }, label, h("input", Object.assign({ id: id, name: id }, attrs || {})));
}

function select(id, label, options, value) {
  return h("label", { for: id }, label,
    h("select", { id: id, name: id }, options.map((o) => h("option", { value: o, selected: o === value }, o || "any"))));
}

// --- API ------------------------------------------------------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  const type = res.headers.get("Content-Type") || "";
  if (type.startsWith("application/json")) data = await res.json();
  if (!res.ok) {
    const err = new Error((data && data.error && data.error.message) || res.status + " " + res.statusText);
    err.status = res.status;
    err.code = data && data.error && data.error.code;
    throw err;
  }
  return data;
}

function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) p.append(k, v);
  const s = p.toString();
  return s ? "?" + s : "";
}

async function act(method, path, body, done) {
  if (!token()) { flash("Enter the operator token (top right) first: actions need it.", true); return; }
  try {
    const result = await api(method, path, body || {});
    if (done) done(result);
  } catch (e) { flash(e.message, true); }
}

async function download(path, filename) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  const res = await fetch(API + path, { headers });
  if (!res.ok) { flash("download failed: " + res.status, true); return; }
  const url = URL.createObjectURL(await res.blob());
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function failed(e) { return h("p", { class: "error", role: "alert" }, e.message); }

// --- overview -------------------------------------------------------------------------------

async function overview() {
  const windowSel = sessionStorage.getItem("maildaemon.window") || "1h";
  const box = h("div", { id: "overview" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Overview"), box);
  const draw = async () => {
    try {
      const s = await api("GET", "/stats" + qs({ window: sessionStorage.getItem("maildaemon.window") || windowSel }));
      box.replaceChildren(...overviewBody(s));
    } catch (e) { box.replaceChildren(failed(e)); }
  };
  await draw();
  refreshTimer = setInterval(() => { if (!document.hidden) draw(); }, REFRESH_MS);
}

function overviewBody(s) {
  const by = s.deliveries_by_status;
  const card = (n, label, cls) => h("div", { class: "card " + (cls || "") }, h("div", { class: "n" }, n), h("div", { class: "l" }, label));
  const paused = s.sending.paused_globally ? "all sources" : s.sending.paused_sources.join(", ") || "no";
  const cards = h("div", { class: "cards", id: "figures" },
    Object.keys(by).map((k) => card(by[k], "deliveries " + k, k === "dead_letter" || k === "failed" ? (by[k] ? "bad" : "") : "")),
    card(s.backlog.due, "due now"),
    card(s.backlog.oldest_due_age_seconds.toFixed(1) + " s", "oldest due age", s.backlog.oldest_due_age_seconds > 60 ? "bad" : ""),
    card(s.backlog.scheduled, "scheduled"),
    card(s.backlog.in_flight, "in flight"),
    card(s.dead_letters.unreviewed, "dead letters unreviewed", s.dead_letters.unreviewed ? "bad" : ""),
    card(s.malformed_commands_last_hour, "malformed (last hour)", s.malformed_commands_last_hour ? "bad" : ""),
    card(paused, "sending paused", paused === "no" ? "ok" : "bad"));
  const pause = h("div", { class: "actions" },
    input("pause-source", "Source (empty: all)", { placeholder: "all sources" }),
    input("pause-reason", "Reason"),
    h("button", { type: "button", id: "pause", onclick: () => pauseResume("pause") }, "Pause sending"),
    h("button", { type: "button", id: "resume", onclick: () => pauseResume("resume") }, "Resume sending"));
  return [cards, h("h3", {}, "Sending"), pause, chart(s.series),
    h("p", { class: "muted" }, "Generated " + when(s.generated_at) + "; refreshes every " + REFRESH_MS / 1000 + " s.")];
}

function pauseResume(which) {
  const source = document.getElementById("pause-source").value.trim();
  const reason = document.getElementById("pause-reason").value.trim();
  act("POST", "/sending/" + which, { source: source || null, reason: reason || null }, (r) => {
    flash("sending " + (r.paused ? "paused" : "resumed") + " for " + (r.scope === "*" ? "all sources" : r.scope));
    route();
  });
}

const SERIES = ["sent", "failed", "dead_lettered", "malformed"];

function chart(series) {
  const wrap = h("section", { class: "chart", "aria-labelledby": "chart-title" });
  const current = series ? series.window : "1h";
  const pick = (w) => h("button", { type: "button", "aria-pressed": String(w === current), onclick: () => { sessionStorage.setItem("maildaemon.window", w); route(); } }, w === "1h" ? "Last hour (per minute)" : "Last day (per 15 min)");
  wrap.append(h("h3", { id: "chart-title" }, "Outcomes over time"), h("div", { class: "actions" }, pick("1h"), pick("24h")));
  if (!series) return wrap;
  const pts = series.points;
  const max = Math.max(1, ...pts.flatMap((p) => SERIES.map((k) => p[k])));
  const W = 600, H = 160, pad = 4, step = (W - 2 * pad) / Math.max(1, pts.length - 1);
  const g = svg("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "outcomes per interval", preserveAspectRatio: "none" });
  for (const k of SERIES) {
    const d = pts.map((p, i) => `${(pad + i * step).toFixed(1)},${(H - pad - (p[k] / max) * (H - 2 * pad)).toFixed(1)}`).join(" ");
    g.append(svg("polyline", { points: d, class: "s-" + k, fill: "none", "stroke-width": 2, "vector-effect": "non-scaling-stroke" }));
  }
  const t = series.totals;
  wrap.append(h("div", { class: "legend" }, SERIES.map((k) => h("span", {}, svgKey(k), `${k.replace("_", " ")}: ${t[k]}`)),
    h("span", { class: "muted" }, "peak " + max + " per " + series.interval_seconds / 60 + " min")), g,
    table(["interval start", ...SERIES], pts.filter((p) => SERIES.some((k) => p[k])).slice(-10).map((p) => [when(p.start), ...SERIES.map((k) => p[k])]), "series"));
  return wrap;
}

function svgKey(k) {
  const s = svg("svg", { width: 10, height: 10, "aria-hidden": "true" });
  s.append(svg("rect", { width: 10, height: 10, class: "s-" + k }));
  return s;
}

// --- deliveries -----------------------------------------------------------------------------

const STATUSES = ["", "queued", "sending", "sent", "suppressed", "failed", "dead_letter", "expired", "cancelled"];

function params() {
  const q = location.hash.split("?")[1] || "";
  return Object.fromEntries(new URLSearchParams(q));
}

function go(path, query) { location.hash = path + qs(query || {}); }

function toIso(local) { return local ? new Date(local).toISOString() : ""; }

async function deliveries() {
  const p = params();
  const form = h("form", { class: "filters", id: "delivery-search", role: "search" },
    input("search-id", "Delivery id", { value: p.id || "" }),
    input("search-recipient", "Recipient", { value: p.recipient || "", type: "search" }),
    select("search-status", "Status", STATUSES, p.status || ""),
    input("search-source", "Source", { value: p.source || "" }),
    input("search-after", "Created after", { type: "datetime-local", value: p.after_local || "" }),
    input("search-before", "Created before", { type: "datetime-local", value: p.before_local || "" }),
    h("button", { type: "submit", class: "primary" }, "Search"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    if (v("search-id")) { go("#/delivery/" + encodeURIComponent(v("search-id"))); return; }
    go("#/deliveries", { recipient: v("search-recipient"), status: v("search-status"), source: v("search-source"),
      after_local: v("search-after"), before_local: v("search-before") });
  });
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Deliveries"), form, results);
  const query = { recipient: p.recipient, status: p.status, source: p.source, created_after: toIso(p.after_local),
    created_before: toIso(p.before_local), cursor: p.cursor, limit: 50 };
  try {
    const page = await api("GET", "/deliveries" + qs(query));
    results.replaceChildren(table(["delivery", "status", "source", "to", "attempts", "created", "last reply"],
      page.items.map((d) => [deliveryLink(d.delivery_id), status(d.status), d.source, d.to.join(", "), d.attempt_count,
        when(d.created_at), d.last_reply_code ? d.last_reply_code + " " + (d.last_reply_text || "") : null])),
    pager(p, page.next_cursor, "#/deliveries"));
  } catch (e) { results.replaceChildren(failed(e)); }
}

function pager(p, next, path) {
  const box = h("div", { class: "pager" });
  if (p.cursor) box.append(h("button", { type: "button", onclick: () => history.back() }, "Previous page"));
  if (next) box.append(h("button", { type: "button", id: "next-page", onclick: () => go(path, Object.assign({}, p, { cursor: next })) }, "Next page"));
  return box;
}

async function delivery(id) {
  show(h("h2", {}, "Delivery ", id), h("p", {}, "Loading…"));
  let d;
  try { d = await api("GET", "/deliveries/" + encodeURIComponent(id)); } catch (e) {
    if (e.status !== 404) { show(h("h2", {}, "Delivery ", id), failed(e)); return; }
    return rejected(id, e);
  }
  const r = d.recipients, plan = d.retry_plan;
  const actions = h("div", { class: "actions", id: "delivery-actions" },
    input("action-reason", "Reason (kept in the audit log)"),
    ["dead_letter", "failed"].includes(d.status) ? h("button", { type: "button", id: "requeue", class: "primary", onclick: () => confirmThen(actions, `Requeue ${id}: queued, due now, the retry ladder starts over?`, () => deliveryAction(id, "requeue")) }, "Requeue") : null,
    d.status === "queued" ? h("button", { type: "button", id: "cancel", class: "danger", onclick: () => confirmThen(actions, `Cancel ${id}? It will never be sent.`, () => deliveryAction(id, "cancel")) }, "Cancel") : null);
  const attempts = table(["#", "started", "finished", "outcome", "SMTP reply", "recipients"],
    d.attempts.map((a) => [a.attempt_no, when(a.started_at), when(a.finished_at),
      h("span", {}, status(a.status), a.status === "unknown" ? h("strong", {}, " possible duplicate") : null),
      a.reply_code ? a.reply_code + " " + (a.reply_text || "") : a.reply_text,
      Object.entries(a.recipients || {}).map(([addr, x]) => `${addr}: ${x.outcome}${x.code ? " " + x.code : ""}`).join("; ")]), "attempts");
  const dl = d.dead_letter;
  show(
    h("h2", {}, "Delivery ", h("span", { id: "delivery-id" }, d.delivery_id), " ", h("span", { id: "delivery-status" }, status(d.status))),
    fields([["status reason", d.status_reason], ["source", d.source], ["priority", d.priority],
      ["template", d.template_id ? `${d.template_id} (${d.locale || "default locale"})` : d.payload_mode],
      ["to", r.to.join(", ")], ["cc", r.cc.join(", ")], ["bcc", r.bcc.join(", ")], ["reply to", r.reply_to],
      ["still owed", r.pending === null ? (["queued", "sending"].includes(d.status) ? "all recipients" : "–") : r.pending.join(", ") || "none"],
      ["accepted by the server", String(r.accepted_count)],
      ["created", when(d.created_at)], ["send at", when(d.send_at)], ["expires", when(d.expires_at)],
      ["rendered", when(d.rendered_at)], ["finished", when(d.finished_at)], ["message id", d.message_id],
      ["stream entry", d.stream_entry_id], ["possible duplicate", d.possible_duplicate ? "yes: an attempt's outcome is unknown" : "no"],
      ["idempotency key", d.idempotency_key]]),
    actions,
    h("h3", {}, "Retry plan"),
    fields([["next attempt", plan.in_flight ? "running now" : when(plan.next_attempt_at)],
      ["attempts", `${d.attempt_count} made, ${plan.attempts_remaining} remaining`],
      ["gives up at", when(plan.gives_up_at)], ["ladder step", String(plan.ladder_step)],
      ["paused", plan.paused ? "yes: sending is paused for its source" : "no"]]),
    h("h3", {}, "Attempts"), attempts,
    (d.reports || []).length ? [h("h3", {}, "Reports after delivery"), reportsTable(d.reports)] : null,
    dl ? [h("h3", {}, "Dead letter"), fields([["since", when(dl.created_at)], ["last status", dl.last_status],
      ["last reply", dl.last_reply_code ? dl.last_reply_code + " " + (dl.last_reply_text || "") : null],
      ["reviewed", dl.reviewed_at ? `${when(dl.reviewed_at)} by ${dl.reviewed_by}: ${dl.review_note}` : "no"],
      ["requeued", dl.requeued_at ? `${when(dl.requeued_at)} by ${dl.requeued_by}` : "no"]]), reviewForm(id)] : null,
    h("h3", {}, "Message"), h("div", { id: "message" }, h("p", {}, "Loading…")));
  const box = document.getElementById("message");
  try {
    const m = await api("GET", "/deliveries/" + encodeURIComponent(id) + "/rendered");
    box.replaceChildren(messageView(m, () => download("/deliveries/" + encodeURIComponent(id) + "/message", id.replace(/[^A-Za-z0-9._-]/g, "_") + ".eml")));
  } catch (e) {
    box.replaceChildren(h("p", { class: "muted" }, e.code === "not_rendered" ? "Not rendered yet: the message is rendered and pinned at its first attempt." : e.message));
  }
}

function confirmThen(box, question, run) {
  const old = box.querySelector(".confirm");
  if (old) old.remove();
  const c = h("div", { class: "confirm", role: "alertdialog", "aria-label": "Confirm" }, h("p", {}, question),
    h("button", { type: "button", class: "primary", id: "confirm-yes", onclick: () => { c.remove(); run(); } }, "Confirm"),
    " ", h("button", { type: "button", onclick: () => c.remove() }, "Keep as is"));
  box.append(c);
  c.querySelector("button").focus();
}

function deliveryAction(id, what) {
  const reason = document.getElementById("action-reason").value.trim() || null;
  act("POST", `/deliveries/${encodeURIComponent(id)}/${what}`, { reason }, (r) => {
    flash(`${r.delivery_id}: ${r.previous_status} → ${r.status}`);
    route();
  });
}

function reviewForm(id) {
  const f = h("form", { class: "actions", id: "review-form" }, input("review-note", "Review note", { required: true, size: 40 }),
    h("button", { type: "submit" }, "Mark reviewed"));
  f.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act("POST", `/dead-letters/${encodeURIComponent(id)}/review`, { note: document.getElementById("review-note").value }, () => { flash("reviewed"); route(); });
  });
  return f;
}

async function rejected(id, err) {
  const head = h("h2", {}, "Delivery ", id);
  try {
    const page = await api("GET", "/deliveries/" + encodeURIComponent(id) + "/malformed");
    if (!page.items.length) { show(head, h("p", { class: "error", role: "alert" }, err.message + "; no stream entry naming it was refused either.")); return; }
    show(head, h("p", { role: "alert" }, "No delivery: stream entries naming this delivery id were refused at intake."), malformedTable(page.items));
  } catch (e) { show(head, failed(e)); }
}

// --- message view (deliveries, dev inbox, preview) ------------------------------------------

function messageView(m, onDownload) {
  const panel = h("div", { class: "tabpanel", role: "tabpanel", id: "message-panel" });
  const tabs = [
    ["HTML", () => m.html === null ? h("p", { class: "muted" }, "No HTML part.") :
      h("iframe", { class: "mail", id: "html-frame", sandbox: "", referrerpolicy: "no-referrer", title: "HTML part (sandboxed: no script, no remote content)", srcdoc: m.html })],
    ["Text", () => h("pre", { id: "text-part" }, m.text === null ? "No text part." : m.text)],
    ["Headers", () => table(["name", "value"], m.headers.map((x) => [x.name, x.value]), "headers")],
    ["Source", () => h("pre", { id: "source" }, m.source + (m.source_truncated ? "\n… (truncated)" : ""))],
  ];
  const bar = h("div", { class: "tabs", role: "tablist" });
  const pick = (i) => {
    bar.querySelectorAll("button").forEach((b, j) => b.setAttribute("aria-selected", String(i === j)));
    panel.replaceChildren(tabs[i][1]());
  };
  tabs.forEach(([name], i) => bar.append(h("button", { type: "button", role: "tab", id: "tab-" + name.toLowerCase(), onclick: () => pick(i) }, name)));
  pick(m.html !== null ? 0 : 1);
  return h("div", {},
    fields([["subject", h("span", { id: "message-subject" }, m.subject ?? "–")], ["from", m.sender], ["to", m.to], ["date", m.date],
      ["size", m.size + " bytes"], ["attachments", m.attachments.map((a) => `${a.filename || "(unnamed)"} (${a.content_type}, ${a.size} bytes)`).join("; ")],
      m.problems.length ? ["problems", m.problems.join("; ")] : null]),
    onDownload ? h("p", {}, h("button", { type: "button", id: "download-eml", onclick: onDownload }, "Download .eml (the exact bytes)")) : null,
    bar, panel);
}

// --- dead letters ---------------------------------------------------------------------------

async function deadLetters() {
  const p = params();
  const form = h("form", { class: "filters", id: "dl-filters" },
    input("dl-source", "Source", { value: p.source || "" }),
    input("dl-domain", "Recipient domain", { value: p.recipient_domain || "" }),
    input("dl-code", "Reply code", { value: p.reply_code || "", inputmode: "numeric", size: 5 }),
    select("dl-class", "Reply class", ["", "4xx", "5xx"], p.reply_class || ""),
    select("dl-reviewed", "Reviewed", ["", "true", "false"], p.reviewed || ""),
    select("dl-requeued", "Requeued", ["", "true", "false"], p.requeued || "false"),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  const v = (id) => document.getElementById(id).value.trim();
  const filter = () => ({ source: v("dl-source"), recipient_domain: v("dl-domain"), reply_code: v("dl-code"), reply_class: v("dl-class") });
  form.addEventListener("submit", (ev) => { ev.preventDefault(); go("#/dead-letters", Object.assign(filter(), { reviewed: v("dl-reviewed"), requeued: v("dl-requeued") })); });
  const bulk = h("div", { class: "actions", id: "bulk" },
    input("bulk-rate", "Release rate (per second, optional)", { size: 6 }),
    input("bulk-reason", "Reason"),
    h("button", { type: "button", id: "bulk-dry-run", onclick: () => bulkRequeue(bulk, filter()) }, "Requeue all matching…"));
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Dead letters"), form, bulk, results);
  try {
    const q = { source: p.source, recipient_domain: p.recipient_domain, reply_code: p.reply_code, reply_class: p.reply_class,
      reviewed: p.reviewed, requeued: p.requeued === undefined ? "false" : p.requeued, cursor: p.cursor };
    const page = await api("GET", "/dead-letters" + qs(q));
    results.replaceChildren(table(["delivery", "status now", "source", "to", "since", "attempts", "last reply", "reviewed", "requeued"],
      page.items.map((d) => [deliveryLink(d.delivery_id), status(d.delivery_status), d.source, d.to.join(", "), when(d.created_at), d.attempt_count,
        d.last_reply_code ? d.last_reply_code + " " + (d.last_reply_text || "") : d.last_status,
        d.reviewed_by ? `${d.reviewed_by}: ${d.review_note}` : "no", d.requeued_by || "no"])),
    pager(p, page.next_cursor, "#/dead-letters"));
  } catch (e) { results.replaceChildren(failed(e)); }
}

function bulkBody(filter, dry) {
  const body = { dry_run: dry };
  for (const [k, v] of Object.entries(filter)) if (v) body[k] = k === "reply_code" ? Number(v) : v;
  const rate = document.getElementById("bulk-rate").value.trim();
  if (rate) body.rate_per_second = Number(rate);
  const reason = document.getElementById("bulk-reason").value.trim();
  if (reason) body.reason = reason;
  return body;
}

function bulkRequeue(box, filter) {
  act("POST", "/dead-letters/requeue", bulkBody(filter, true), (dry) => {
    if (!dry.matched) { flash("No dead letter matches these filters."); return; }
    confirmThen(box, `${dry.matched} dead letter(s) match. Requeue them now?`, () =>
      act("POST", "/dead-letters/requeue", bulkBody(filter, false), (r) => { flash(`requeued ${r.requeued} of ${r.matched}`); route(); }));
  });
}

// --- malformed commands ---------------------------------------------------------------------

const FAILURE_CODES = ["", "invalid_json", "missing_field", "invalid_field", "unknown_field", "unknown_payload_mode", "unknown_source", "unknown_template", "invalid_address", "header_injection", "header_not_allowed", "too_large", "attachment_too_large", "invalid_attachment", "too_many_recipients", "already_expired", "idempotency_conflict", "delivery_id_conflict"];  // contract.command.FAILURE_CODES

function malformedTable(items) {
  return table(["id", "stream entry", "received", "failure", "delivery id", "source", "command as received", "replayed as", ""],
    items.map((c) => [String(c.id), c.stream_entry_id, when(c.received_at), `${c.failure_code}: ${c.failure_detail}`, c.delivery_id, c.source,
      h("details", {}, h("summary", {}, c.raw_truncated ? "raw (truncated)" : "raw"), h("pre", {}, c.raw)),
      c.replayed_delivery_id ? deliveryLink(c.replayed_delivery_id) : null,
      c.replayed_at ? null : h("button", { type: "button", onclick: () => act("POST", `/malformed-commands/${c.id}/replay`, {}, (r) => { flash(`replay: ${r.accepted} accepted, ${r.still_invalid} still invalid`); route(); }) }, "Replay")]), "malformed");
}

async function malformed() {
  const p = params();
  const trace = h("form", { class: "filters", id: "trace-form", role: "search" },
    input("trace-id", "What became of… (stream entry id or delivery id)", { size: 36, value: p.trace || "" }),
    h("button", { type: "submit" }, "Look up"));
  trace.addEventListener("submit", (ev) => { ev.preventDefault(); go("#/malformed", Object.assign({}, p, { trace: document.getElementById("trace-id").value.trim() })); });
  const form = h("form", { class: "filters" },
    select("m-code", "Failure code", FAILURE_CODES, p.failure_code || ""),
    input("m-source", "Source", { value: p.source || "" }),
    select("m-replayed", "Replayed", ["", "true", "false"], p.replayed || ""),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); const v = (id) => document.getElementById(id).value; go("#/malformed", { failure_code: v("m-code"), source: v("m-source"), replayed: v("m-replayed") }); });
  const bulk = h("div", { class: "actions" }, h("button", { type: "button", id: "replay-bulk", onclick: () => {
    const code = document.getElementById("m-code").value;
    if (!code) { flash("Choose a failure code to replay by.", true); return; }
    act("POST", "/malformed-commands/replay", { failure_code: code, dry_run: true }, (dry) => confirmThen(bulk,
      `${dry.matched} unreplayed entr(ies) with ${code}; ${dry.accepted} would now be accepted, ${dry.still_invalid} still invalid. Replay them?`,
      () => act("POST", "/malformed-commands/replay", { failure_code: code, dry_run: false }, (r) => { flash(`${r.accepted} accepted, ${r.still_invalid} still invalid`); route(); })));
  } }, "Replay all with this failure code…"));
  const traced = h("div", { id: "trace" });
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Malformed commands"), trace, traced, form, bulk, results);
  if (p.trace) traceLookup(p.trace, traced);
  try {
    const page = await api("GET", "/malformed-commands" + qs({ failure_code: p.failure_code, source: p.source, replayed: p.replayed, cursor: p.cursor }));
    results.replaceChildren(malformedTable(page.items), pager(p, page.next_cursor, "#/malformed"));
  } catch (e) { results.replaceChildren(failed(e)); }
}

async function traceLookup(id, box) {
  try {
    if (/^[0-9]{1,20}-[0-9]{1,20}$/.test(id)) {
      const t = await api("GET", "/commands/" + id);
      box.replaceChildren(fields([["stream entry", t.stream_entry_id], ["outcome", t.outcome],
        ["delivery", t.delivery ? h("span", {}, deliveryLink(t.delivery.delivery_id), " ", status(t.delivery.status)) : null],
        ["duplicate of", t.duplicate_of ? deliveryLink(t.duplicate_of) : null],
        ["malformed", t.malformed ? `#${t.malformed.id} ${t.malformed.failure_code}: ${t.malformed.failure_detail}` : null]]));
      return;
    }
    const page = await api("GET", "/deliveries/" + encodeURIComponent(id) + "/malformed");
    let exists = true;
    try { await api("GET", "/deliveries/" + encodeURIComponent(id)); } catch (e) { if (e.status === 404) exists = false; else throw e; }
    box.replaceChildren(h("p", {}, exists ? h("span", {}, "A delivery exists: ", deliveryLink(id)) : "No delivery with this id.",
      page.items.length ? ` ${page.items.length} refused stream entr(ies) named it:` : " No refused stream entry named it."),
    page.items.length ? malformedTable(page.items) : null);
  } catch (e) { box.replaceChildren(failed(e)); }
}

// --- reports (bounces, delays, complaints) --------------------------------------------------

function rawLink(r) {
  return h("button", { type: "button", onclick: () => download("/reports/" + r.report_id + "/raw", "report-" + r.report_id + ".eml") }, "raw");
}

function reportsTable(reports) {
  return table(["report", "received", "kind", "match", "recipient", "status", "diagnostic", "effect", ""],
    reports.flatMap((r) => (r.recipients.length ? r.recipients : [{}]).map((x) => [String(r.report_id), when(r.received_at), r.kind,
      r.match_status, x.address, x.status, x.diagnostic, x.effect || r.detail, rawLink(r)])), "reports");
}

async function reports() {
  const p = params();
  const form = h("form", { class: "filters", role: "search" },
    select("r-match", "Match status", ["", "matched", "unmatched", "bad_token", "unparseable"], p.match_status || ""),
    select("r-kind", "Kind", ["", "bounce", "delay", "complaint", "auto_reply", "unknown"], p.kind || ""),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); const v = (id) => document.getElementById(id).value; go("#/reports", { match_status: v("r-match"), kind: v("r-kind") }); });
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  const rates = h("div", { id: "rates" });
  show(h("h2", {}, "Reports (bounces, delays, complaints)"), form, results, h("h3", {}, "Rates, last 24 hours"), rates);
  api("GET", "/reports/rates" + qs({ hours: 24 })).then((r) => {
    const pct = (x) => (x === null ? "–" : (100 * x).toFixed(2) + " %");
    const rows = (list) => list.map((x) => [x.key, String(x.sent), String(x.bounced), pct(x.bounce_rate), String(x.complained), pct(x.complaint_rate)]);
    const head = (k) => [k, "sent", "bounced", "bounce rate", "complained", "complaint rate"];
    rates.replaceChildren(table(head("source"), rows(r.by_source), "rates"), table(head("recipient domain"), rows(r.by_recipient_domain), "rates"));
  }).catch((e) => rates.replaceChildren(failed(e)));
  try {
    const page = await api("GET", "/reports" + qs({ match_status: p.match_status, kind: p.kind, before: p.before }));
    results.replaceChildren(table(["report", "received", "via", "kind", "match", "delivery", "detail", ""],
      page.items.map((r) => [String(r.report_id), when(r.received_at), r.via, r.kind, r.match_status,
        r.delivery_id ? deliveryLink(r.delivery_id) : "–", r.detail, rawLink(r)]), "reports"),
    page.next_before ? h("p", {}, h("a", { href: "#/reports" + qs({ match_status: p.match_status, kind: p.kind, before: page.next_before }) }, "Older →")) : null);
  } catch (e) { results.replaceChildren(failed(e)); }
}

// --- suppressions, audit --------------------------------------------------------------------

async function suppressions() {
  const p = params();
  const search = h("form", { class: "filters", role: "search" },
    input("s-address", "Address", { value: p.address || "" }), input("s-domain", "Domain", { value: p.domain || "" }),
    h("button", { type: "submit", class: "primary" }, "Search"));
  search.addEventListener("submit", (ev) => { ev.preventDefault(); go("#/suppressions", { address: document.getElementById("s-address").value.trim(), domain: document.getElementById("s-domain").value.trim() }); });
  const add = h("form", { class: "actions", id: "suppress-form" },
    input("add-address", "Address to suppress", { required: true, type: "email" }),
    input("add-reason", "Reason", { required: true }),
    input("add-expires", "Expires (optional)", { type: "datetime-local" }),
    h("button", { type: "submit" }, "Add"));
  add.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    act("POST", "/suppressions", { address: v("add-address"), reason: v("add-reason"), expires_at: toIso(v("add-expires")) || null }, (r) => { flash(r.address + " suppressed"); route(); });
  });
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Suppression list"), search, add, results);
  try {
    const page = await api("GET", "/suppressions" + qs({ address: p.address, domain: p.domain, cursor: p.cursor }));
    results.replaceChildren(table(["address", "reason", "reply code", "since", "expires", "by", ""],
      page.items.map((s) => [s.address, s.reason, s.reply_code, when(s.created_at), when(s.expires_at), s.created_by,
        h("button", { type: "button", onclick: (ev) => confirmThen(ev.target.parentElement, `Stop suppressing ${s.address}?`, () => act("POST", "/suppressions/remove", { address: s.address }, () => { flash(s.address + " removed"); route(); })) }, "Remove")])),
    pager(p, page.next_cursor, "#/suppressions"));
  } catch (e) { results.replaceChildren(failed(e)); }
}

async function audit() {
  const p = params();
  const form = h("form", { class: "filters", role: "search" },
    input("a-action", "Action", { value: p.action || "", placeholder: "delivery.requeue" }),
    input("a-actor", "Actor", { value: p.actor || "" }), input("a-target", "Target", { value: p.target || "" }),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); const v = (id) => document.getElementById(id).value.trim(); go("#/audit", { action: v("a-action"), actor: v("a-actor"), target: v("a-target") }); });
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Audit log"), form, results);
  try {
    const page = await api("GET", "/operator-actions" + qs({ action: p.action, actor: p.actor, target: p.target, cursor: p.cursor }));
    results.replaceChildren(table(["id", "at", "actor", "action", "target", "reason", "detail"],
      page.items.map((a) => [String(a.id), when(a.at), a.actor, a.action, a.target, a.reason, JSON.stringify(a.detail)])),
    pager(p, page.next_cursor, "#/audit"));
  } catch (e) { results.replaceChildren(failed(e)); }
}

// --- dev inbox and template preview ---------------------------------------------------------

async function inbox() {
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Dev inbox"), h("p", { class: "muted" }, "Mail caught by the SMTP sink of maildaemon dev."), results);
  try {
    const page = await api("GET", "/dev/inbox");
    results.replaceChildren(h("p", { class: "muted" }, `${page.total} message(s) in ${page.maildir}`),
      table(["received", "from", "to", "subject", "size"], page.items.map((m) => [when(m.received_at), m.sender, m.to,
        h("a", { href: "#/inbox/" + encodeURIComponent(m.name) }, m.subject || "(no subject)"), m.size + " B"]), "inbox"));
  } catch (e) { results.replaceChildren(e.code === "dev_inbox_off" ? h("p", {}, "The dev inbox exists only under maildaemon dev.") : failed(e)); }
}

async function caught(name) {
  show(h("h2", {}, "Caught message"), h("p", {}, "Loading…"));
  try {
    const m = await api("GET", "/dev/inbox/" + encodeURIComponent(name));
    show(h("h2", {}, "Caught message"), h("p", {}, h("a", { href: "#/inbox" }, "← Dev inbox")),
      messageView(m.message, () => download("/dev/inbox/" + encodeURIComponent(name) + "/raw", name)));
  } catch (e) { show(h("h2", {}, "Caught message"), failed(e)); }
}

async function preview() {
  const p = params();
  const form = h("form", { class: "filters", id: "preview-form" },
    input("p-template", "Template id", { required: true, value: p.template_id || "" }),
    input("p-locale", "Locale", { value: p.locale || "", size: 6 }),
    h("label", { for: "p-vars" }, "Variables (NAME=VALUE per line)", h("textarea", { id: "p-vars", rows: 3, cols: 40 }, p.vars || "")),
    h("button", { type: "submit", class: "primary" }, "Render"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    go("#/preview", { template_id: v("p-template"), locale: v("p-locale"), vars: v("p-vars") });
  });
  const out = h("div", { id: "results" });
  show(h("h2", {}, "Template preview"), h("p", { class: "muted" }, "Rendered with the daemon's loaded catalog; nothing is sent."), form, out);
  if (!p.template_id) return;
  const q = new URLSearchParams();
  if (p.locale) q.append("locale", p.locale);
  for (const line of (p.vars || "").split("\n")) if (line.trim()) q.append("var", line.trim());
  try {
    const r = await api("GET", "/templates/" + encodeURIComponent(p.template_id) + "/preview" + (q.toString() ? "?" + q.toString() : ""));
    out.replaceChildren(r.message ? messageView(r.message, null) : h("p", { class: "error", role: "alert" }, "Cannot be rendered: " + r.error));
  } catch (e) { out.replaceChildren(failed(e)); }
}

// --- webhooks -------------------------------------------------------------------------------

async function webhooks() {
  const results = h("div", { id: "results" }, h("p", {}, "Loading…"));
  show(h("h2", {}, "Webhooks"), h("p", { class: "muted" }, "Endpoints that receive the outcome events, signed (Standard Webhooks). Add one with maildaemon webhooks add; its secret is shown only then."), results);
  try {
    const page = await api("GET", "/webhooks");
    const sw = (e) => h("button", { type: "button", onclick: () => act("POST", `/webhooks/${e.id}/${e.enabled ? "disable" : "enable"}`, {}, () => { flash(`endpoint ${e.id} ${e.enabled ? "disabled" : "enabled"}`); route(); }) }, e.enabled ? "Disable" : "Enable");
    const ping = (e) => h("button", { type: "button", onclick: () => act("POST", `/webhooks/${e.id}/test`, {}, (r) => flash(`ping msg_${r.event_id} queued`)) }, "Send test");
    results.replaceChildren(table(["id", "url", "events", "source", "enabled", "backlog", "why disabled", ""],
      page.items.map((e) => [h("a", { href: "#/webhooks/" + e.id }, String(e.id)), e.url, (e.events || ["all"]).join(", "), e.source || "all",
        e.enabled ? "yes" : "no", String(e.backlog), e.disabled_reason, h("span", {}, sw(e), " ", ping(e))])));
  } catch (e) { results.replaceChildren(failed(e)); }
}

async function webhook(id) {
  const out = h("div", { id: "results" }, h("p", {}, "Loading…"));
  const form = h("form", { class: "actions", id: "replay-form" },
    input("r-event", "Event (msg_…)", { placeholder: "msg_123" }), input("r-after", "After", { type: "datetime-local" }),
    input("r-before", "Before", { type: "datetime-local" }), h("button", { type: "submit" }, "Replay…"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = (f) => document.getElementById(f).value.trim();
    const ev_ = v("r-event").replace(/^msg_/, "");
    const body = { event_id: ev_ ? Number(ev_) : null, after: toIso(v("r-after")) || null, before: toIso(v("r-before")) || null };
    act("POST", `/webhooks/${id}/replay`, Object.assign({ dry_run: true }, body), (dry) =>
      confirmThen(form, `Replay ${dry.matched} event(s) to endpoint ${id}?`, () =>
        act("POST", `/webhooks/${id}/replay`, body, (r) => { flash(`${r.queued} event(s) queued again`); route(); })));
  });
  show(h("h2", {}, `Webhook endpoint ${id}`), h("p", {}, h("a", { href: "#/webhooks" }, "← Webhooks")), form, out);
  try {
    const page = await api("GET", `/webhooks/${encodeURIComponent(id)}/attempts`);
    out.replaceChildren(h("h3", {}, "Recent attempts"), table(["at", "event", "type", "delivery", "try", "ok", "status", "ms", "error", "answer"],
      page.items.map((a) => [when(a.at), "msg_" + a.event_id, a.event_type, deliveryLink(a.delivery_id), String(a.attempt_no), a.ok ? "yes" : "no",
        a.http_status == null ? "–" : String(a.http_status), String(a.duration_ms), a.error, a.response])));
  } catch (e) { out.replaceChildren(failed(e)); }
}

// --- routing --------------------------------------------------------------------------------

function route() {
  if (refreshTimer) { clearInterval(refreshTimer); refreshTimer = null; }
  const path = (location.hash || "#/").split("?")[0];
  document.querySelectorAll("header nav a").forEach((a) => {
    const target = a.getAttribute("href");
    if ((target === "#/" && path === "#/") || (target !== "#/" && path.startsWith(target))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  const arg = (prefix) => decodeURIComponent(path.slice(prefix.length));
  let view;
  if (path.startsWith("#/delivery/")) view = delivery(arg("#/delivery/"));
  else if (path.startsWith("#/inbox/")) view = caught(arg("#/inbox/"));
  else if (path.startsWith("#/webhooks/")) view = webhook(arg("#/webhooks/"));
  else view = ({ "#/deliveries": deliveries, "#/dead-letters": deadLetters, "#/malformed": malformed, "#/suppressions": suppressions,
    "#/reports": reports, "#/webhooks": webhooks, "#/audit": audit, "#/inbox": inbox, "#/preview": preview }[path] || overview)();
  view.catch((e) => show(failed(e)));
}

function tokenState() {
  document.getElementById("token-state").textContent = token() ? "token kept for this tab" : "no token: read only";
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const field = document.getElementById("token");
    if (field.value) sessionStorage.setItem(TOKEN_KEY, field.value);
    field.value = "";
    tokenState();
  });
  document.getElementById("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); tokenState(); });
  tokenState();
  window.addEventListener("hashchange", () => { route(); main().focus(); });
  route();
});
