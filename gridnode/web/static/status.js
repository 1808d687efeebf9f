/*
 * The status page: the pool's members (GET /peers merged with
 * /registry/nodes.json; this node's load from its own GET /health, since
 * nodes.json's figures are a heartbeat old; the others' are those, marked
 * "(heartbeat)": asking every member from every open page would cost N
 * requests every few seconds), this node's running and queued jobs with live
 * progress (one EventSource per active job), and its recent failures.
 * Refreshed every few seconds. With a token keyring it needs a token with
 * scopes ops (members) and read (jobs; admin for every tenant's): token.js.
 * Plain ES2017, no build step.
 */
(function () {
  "use strict";

  var REFRESH_MS = 3000;
  var TIMEOUT_MS = 5000;
  var LIVE_TIMEOUT_MS = 2000; // a member's own /health: its live load
  var STATES = ["received", "probing", "queued", "transcoding", "storing", "done", "failed", "cancelled"];
  var FINAL = ["done", "failed", "cancelled"];

  var $ = function (id) { return document.getElementById(id); };
  var token = window.gridnodeToken;
  var streams = new Map(); // job id -> EventSource
  var jobs = new Map(); // job id -> latest job JSON (active ones)

  function getJSON(url) {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = setTimeout(function () { if (controller) controller.abort(); }, TIMEOUT_MS);
    return fetch(url, { cache: "no-store", headers: token.headers(), signal: controller ? controller.signal : undefined })
      .then(function (r) {
        clearTimeout(timer);
        if (!r.ok) throw new Error(url + " answered " + r.status);
        return r.json();
      }, function (e) { clearTimeout(timer); throw e; });
  }

  /** This node's GET /health (public; also answered while draining), or null when it does not answer in time. */
  function health() {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = setTimeout(function () { if (controller) controller.abort(); }, LIVE_TIMEOUT_MS);
    return fetch("/health", { cache: "no-store", signal: controller ? controller.signal : undefined })
      .then(function (r) { clearTimeout(timer); return r.ok || r.status === 503 ? r.json() : null; })
      .catch(function () { clearTimeout(timer); return null; });
  }

  /** ``members`` with this node's live load and state (its own /health) in its row, which is added
   *  when neither /peers nor nodes.json had it. */
  function withOwnLoad(members, h) {
    if (!h || !h.node) return members;
    var m = members.find(function (x) { return x.id === h.node; });
    if (!m) {
      m = { id: h.node, state: "alive" };
      members.push(m);
      members.sort(function (a, b) { return a.id < b.id ? -1 : a.id > b.id ? 1 : 0; });
    }
    m.load = { running: h.running, queued: h.queued, workers: h.workers };
    m.live = true;
    if (h.state && h.state !== "ok") m.health = h.state;
    return members;
  }

  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = text === undefined || text === null ? "" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function ago(epochSeconds) {
    if (!epochSeconds) return "";
    var s = Math.max(0, Date.now() / 1000 - Number(epochSeconds));
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  function num(v) { return v === undefined || v === null || v === "" ? "" : String(Math.round(Number(v))); }

  /* -- members --------------------------------------------------------- */

  function mergeMembers(peersDoc, nodesDoc) {
    var byId = new Map();
    ((peersDoc && peersDoc.peers) || []).forEach(function (p) {
      byId.set(p.id, { id: p.id, state: p.state, address: p.address, incarnation: p.incarnation });
    });
    ((nodesDoc && nodesDoc.nodes) || []).forEach(function (n) {
      var m = byId.get(n.id) || { id: n.id, state: peersDoc ? "not in view" : "registered" };
      m.load = n.load || {};
      m.heartbeat = n.heartbeat;
      m.http_url = n.http_url;
      byId.set(n.id, m);
    });
    return Array.from(byId.values()).sort(function (a, b) { return a.id < b.id ? -1 : a.id > b.id ? 1 : 0; });
  }

  function renderMembers(members, self) {
    var body = $("members").tBodies[0];
    body.textContent = "";
    members.forEach(function (m) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-node", m.id);
      var name = cell(tr, m.id + (m.id === self ? " (this node)" : ""));
      name.setAttribute("data-label", "Node");
      var shown = (m.state || "") + (m.health ? " (" + m.health + ")" : "");
      var st = cell(tr, shown, "state state-" + (m.state || "unknown").replace(/\s+/g, "-"));
      st.setAttribute("data-label", "State");
      var load = m.load || {};
      var workers = Number(load.workers) || 0;
      var busy = workers ? ((Number(load.running) || 0) + (Number(load.queued) || 0)) / workers : null;
      [["Running", num(load.running)], ["Queued", num(load.queued)], ["Workers", num(load.workers)],
       ["Busy", busy === null ? "" : busy.toFixed(2) + (m.live ? "" : " (heartbeat)")], ["Heartbeat", ago(m.heartbeat)],
       ["Address", [m.http_url, m.address ? "peer " + m.address : ""].filter(Boolean).join(", ")]]
        .forEach(function (pair) { cell(tr, pair[1]).setAttribute("data-label", pair[0]); });
      body.appendChild(tr);
    });
    return members;
  }

  /* -- jobs ------------------------------------------------------------ */

  function percent(job) { return Math.max(0, Math.min(100, Math.floor((Number(job.progress) || 0) * 100))); }

  function jobRow(job) {
    var body = $("jobs").tBodies[0];
    var tr = body.querySelector('tr[data-job="' + CSS.escape(job.id) + '"]');
    if (!tr) {
      tr = document.createElement("tr");
      tr.setAttribute("data-job", job.id);
      cell(tr, job.id, "mono").setAttribute("data-label", "Job");
      cell(tr, "", "name").setAttribute("data-label", "Name");
      cell(tr, "", "state").setAttribute("data-label", "State");
      var td = cell(tr, "", "progress");
      td.setAttribute("data-label", "Progress");
      var bar = document.createElement("progress");
      bar.max = 100;
      bar.setAttribute("aria-label", "Progress of job " + job.id);
      var out = document.createElement("span");
      out.className = "percent";
      td.appendChild(bar);
      td.appendChild(out);
      var list = document.createElement("ol");
      list.className = "chunks";
      var chunkCell = cell(tr, "", "chunk-cell");
      chunkCell.setAttribute("data-label", "Chunks");
      chunkCell.appendChild(list);
      body.appendChild(tr);
    }
    showChunks(tr.querySelector("ol.chunks"), job);
    var pct = percent(job);
    tr.querySelector(".name").textContent = job.name || (job.input && job.input.name) || "";
    tr.querySelector(".state").textContent = job.state;
    tr.querySelector("progress").value = pct;
    var out2 = tr.querySelector(".percent");
    out2.textContent = pct + "%";
    out2.setAttribute("data-value", String(pct));
  }

  /* A chunked job's chunks, one item each: its index, coloured by its state, the rest in its title. */
  function showChunks(list, job) {
    var chunks = Array.isArray(job.chunks) ? job.chunks : [];
    list.textContent = "";
    var done = 0;
    chunks.forEach(function (c) {
      var li = document.createElement("li");
      var start = Number(c.start) || 0;
      var end = start + (Number(c.seconds) || 0);
      li.setAttribute("data-state", String(c.state || ""));
      li.textContent = String(c.index);
      li.title = "chunk " + c.index + ": " + start.toFixed(1) + "-" + end.toFixed(1) + " s, " + (c.state || "") +
        (c.node ? " on " + c.node : "") + (Number(c.tries) > 1 ? " (" + c.tries + " tries)" : "");
      if (c.state === "done") done += 1;
      list.appendChild(li);
    });
    list.setAttribute("aria-label", chunks.length ? done + " of " + chunks.length + " chunks done" : "made whole");
  }

  function dropJob(id) {
    var es = streams.get(id);
    if (es) es.close();
    streams.delete(id);
    jobs.delete(id);
    var tr = $("jobs").tBodies[0].querySelector('tr[data-job="' + CSS.escape(id) + '"]');
    if (tr) tr.remove();
  }

  function watch(id) {
    if (streams.has(id) || typeof window.EventSource !== "function") return;
    var es = new EventSource(token.url("/jobs/" + encodeURIComponent(id) + "/events"));
    var onEvent = function (ev) {
      var job;
      try { job = JSON.parse(ev.data); } catch (ignored) { return; }
      if (FINAL.indexOf(job.state) >= 0) {
        dropJob(id);
        refresh(); // it may have joined the failures
        return;
      }
      jobs.set(id, job);
      jobRow(job);
      syncEmpty();
    };
    STATES.forEach(function (s) { es.addEventListener(s, onEvent); });
    es.onmessage = onEvent;
    // On an error the next refresh opens a new stream if the job is still active.
    es.onerror = function () { es.close(); streams.delete(id); };
    streams.set(id, es);
  }

  function syncEmpty() {
    $("jobs-empty").hidden = $("jobs").tBodies[0].rows.length > 0;
    $("jobs").hidden = !$("jobs-empty").hidden;
  }

  function renderJobs(doc) {
    var active = (doc && doc.active) || [];
    var ids = new Set(active.map(function (j) { return j.id; }));
    Array.from(jobs.keys()).forEach(function (id) { if (!ids.has(id)) dropJob(id); });
    active.forEach(function (j) {
      // A stream's event may be fresher than this listing: never move progress backwards.
      var known = jobs.get(j.id);
      var job = known && known.state === j.state && (known.progress || 0) > (j.progress || 0) ? known : j;
      jobs.set(j.id, job);
      jobRow(job);
      watch(j.id);
    });
    syncEmpty();

    var failures = ((doc && doc.recent) || []).filter(function (j) { return j.state === "failed"; });
    var body = $("failures").tBodies[0];
    body.textContent = "";
    failures.forEach(function (j) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-job", j.id);
      var err = j.error || {};
      cell(tr, j.id, "mono").setAttribute("data-label", "Job");
      cell(tr, j.name || (j.input && j.input.name) || "").setAttribute("data-label", "Name");
      cell(tr, err.code || "", "mono error-code").setAttribute("data-label", "Error code");
      cell(tr, err.message || "").setAttribute("data-label", "Message");
      cell(tr, ago(j.updated)).setAttribute("data-label", "When");
      body.appendChild(tr);
    });
    $("failures-empty").hidden = failures.length > 0;
    $("failures").hidden = failures.length === 0;
    return active;
  }

  /* -- refresh loop ---------------------------------------------------- */

  var running = false;

  async function refresh() {
    if (running) return;
    running = true;
    var problems = [];
    try {
      var results = await Promise.all([
        getJSON("/peers").catch(function (e) { problems.push("peers: " + e.message); return null; }),
        getJSON("/registry/nodes.json").catch(function (e) { problems.push("registry: " + e.message); return null; }),
        getJSON("/jobs?view=node").catch(function (e) { problems.push("jobs: " + e.message); return null; }),
        health()
      ]);
      var self = results[3] ? results[3].node : results[0] ? results[0].node : null;
      var members = renderMembers(withOwnLoad(mergeMembers(results[0], results[1]), results[3]), self);
      var active = results[2] ? renderJobs(results[2]) : [];
      var alive = members.filter(function (m) { return m.state === "alive"; }).length;
      $("summary").textContent = (results[0] ? "Node " + results[0].node + ": " : "") + members.length +
        " member" + (members.length === 1 ? "" : "s") + " (" + alive + " alive), " + active.length +
        " active job" + (active.length === 1 ? "" : "s") + ". Updated " + new Date().toLocaleTimeString() + ".";
      $("error").hidden = problems.length === 0;
      $("error").textContent = problems.length ? "Could not read " + problems.join("; ") : "";
    } finally {
      running = false;
    }
  }

  token.bind($("token"), function () {
    streams.forEach(function (es) { es.close(); });
    streams.clear();
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
}());
