/*
 * The upload page: pick a node (two choices by expected wait on the registry's load
 * figures), upload to it (tus when the node offers it, else POST /jobs),
 * follow the job (Server-Sent Events, else polling), show the result.
 * A node that fails mid-upload is left for another one. Requests that need
 * the pool's access token carry it (token.js: from the URL fragment or the
 * token field). Plain ES2017, no build step, no framework.
 */
(function () {
  "use strict";

  var FINAL = ["done", "failed", "cancelled"];
  var STATES = ["received", "probing", "queued", "transcoding", "storing"].concat(FINAL);
  var TUS_CHUNK = 16 * 1024 * 1024;
  var TUS_RETRY_DELAYS = [0, 1000, 3000];
  var PROBE_TIMEOUT_MS = 5000;
  var CHECK_TIMEOUT_MS = 2000;  // the live load check of the two candidates
  var POLL_MS = 1000;

  var $ = function (id) { return document.getElementById(id); };
  var token = window.gridnodeToken;

  /* -- errors ---------------------------------------------------------- */

  /** An error the node answered with a code: the upload itself is refused, moving on will not help. */
  function CodedError(code, message, status) {
    var e = new Error(message);
    e.name = "CodedError";
    e.code = code;
    e.status = status || 0;
    return e;
  }

  /** The node did not answer, or answered that it is unavailable: try another node. */
  function NodeError(message, uploadId) {
    var e = new Error(message);
    e.name = "NodeError";
    e.uploadId = uploadId || null;
    return e;
  }

  function parseErrorBody(text, status) {
    try {
      var doc = JSON.parse(text);
      if (doc && doc.error && doc.error.code) {
        return CodedError(doc.error.code, doc.error.message || "", status);
      }
    } catch (ignored) { /* not JSON */ }
    return CodedError("http_" + status, (text || "").slice(0, 200) || "the node answered " + status, status);
  }

  /** 5xx and 429 mean "this node, not now": another node may take the upload. */
  function nodeIsUnavailable(status) {
    return status === 0 || status === 429 || status >= 500;
  }

  /* -- nodes ----------------------------------------------------------- */

  /* The command line client's rule (gridnode/client/nodes.py): a pool mixes instance types, so
   * the two candidates are drawn with a chance in proportion to speed and compared by expected
   * wait, not by job count. */
  var SPREAD = 8;  // a node is drawn at most this many times more (or less) often than a typical one
  var TYPICAL_INPUT_S = 60;  // seconds of input a job stands for where a node does not say its work

  function figure(load, name) {
    var v = Number(load[name]);
    return isFinite(v) && v >= 0 ? v : null;
  }

  function busy(node) {
    var load = node.load || {};
    var workers = figure(load, "workers") || 1;
    return ((figure(load, "running") || 0) + (figure(load, "queued") || 0)) / Math.max(workers, 1);
  }

  /** Each node's speed; one that has not measured it yet is taken at the median of the others (1 when none has). */
  function speeds(nodes) {
    var raw = nodes.map(function (n) {
      var s = figure(n.load || {}, "speed");
      return s !== null && s >= 0.001 && s <= 1000 ? s : null;
    });
    var known = raw.filter(function (s) { return s !== null; }).sort(function (a, b) { return a - b; });
    var fallback = known.length ? known[Math.floor(known.length / 2)] : 1;
    return raw.map(function (s) { return s === null ? fallback : s; });
  }

  /* The page's jobs are of normal priority: a node serves high, then normal, then low
   * (gridnode/priority.py), so its queued low jobs wait behind ours and are left out of the work
   * ahead, where the node publishes them (queued_low, work_low). */
  var LOWER = ["low"];

  /** ``load`` as a new normal job sees it (gridnode/priority.py, seen_by). */
  function seenBy(load) {
    if (!LOWER.every(function (p) { return figure(load, "queued_" + p) !== null; })) return load;
    var out = Object.assign({}, load);
    var queued = figure(load, "queued"), work = figure(load, "work");
    LOWER.forEach(function (p) {
      if (queued !== null) queued -= figure(load, "queued_" + p);
      if (work !== null) work -= figure(load, "work_" + p) || 0;
    });
    if (queued !== null) out.queued = Math.max(0, queued);
    if (work !== null) out.work = Math.max(0, work);
    return out;
  }

  /** Seconds until a new job of typical length would be done on ``node`` at ``speed``. */
  function expectedWait(node, speed) {
    var load = seenBy(node.load || {});
    var workers = Math.max(1, figure(load, "workers") || 1);
    var jobs = (figure(load, "running") || 0) + (figure(load, "queued") || 0);
    var work = figure(load, "work");
    if (work === null) work = jobs * TYPICAL_INPUT_S;
    var ahead = jobs >= workers ? work / workers : 0;
    return (ahead + TYPICAL_INPUT_S) / speed;
  }

  /** Two distinct nodes of ``left`` (at least two), each drawn with a chance in proportion to its
   *  speed (kept within SPREAD times the median). */
  function drawPair(left) {
    var s = speeds(left);
    var median = s.slice().sort(function (a, b) { return a - b; })[Math.floor(s.length / 2)];
    var weights = s.map(function (v) { return Math.min(Math.max(v, median / SPREAD), median * SPREAD); });
    function pick(skip) {
      var total = 0;
      weights.forEach(function (w, k) { if (k !== skip) total += w; });
      var u = Math.random() * total;
      for (var k = 0; k < weights.length; k++) {
        if (k === skip) continue;
        u -= weights[k];
        if (u < 0) return k;
      }
      return skip === weights.length - 1 ? weights.length - 2 : weights.length - 1;  // float rounding
    }
    var i = pick(-1);
    return [left[i], left[pick(i)]];
  }

  /** The better of two candidates: the smaller expected wait, the less busy where waits tie, random on full ties. */
  function better(a, b) {
    var s = speeds([a, b]);
    var wa = expectedWait(a, s[0]), wb = expectedWait(b, s[1]);
    if (wa !== wb) return wa < wb ? a : b;
    var ba = busy(a), bb = busy(b);
    if (ba !== bb) return ba < bb ? a : b;
    return Math.random() < 0.5 ? a : b;
  }

  /** The power of two choices: two distinct nodes drawn by speed, the better one. */
  function chooseNode(nodes, tried) {
    var left = nodes.filter(function (n) { return !tried.has(n.id); });
    if (left.length === 0) return null;
    if (left.length === 1) return left[0];
    var pair = drawPair(left);
    return better(pair[0], pair[1]);
  }

  /** ``node`` with its live load (GET /health), or null when it does not answer as ready to work. */
  async function withLiveLoad(node) {
    try {
      var r = await fetchWithTimeout(node.base + "/health", { cache: "no-store" }, CHECK_TIMEOUT_MS);
      if (!r.ok) return null;
      var h = await r.json();
      var live = {};
      ["running", "queued", "workers", "work", "speed", "queued_high", "queued_normal", "queued_low",
       "work_high", "work_normal", "work_low"].forEach(function (k) { if (k in h) live[k] = h[k]; });
      return Object.assign({}, node, { load: Object.assign({}, node.load || {}, live) });
    } catch (e) {
      return null;
    }
  }

  /**
   * Two choices on live loads, as the command line client does: two distinct nodes drawn by speed,
   * both asked GET /health at once; the better of those that answered (the registry's figures are a
   * heartbeat old, and every page would herd onto the same nodes); the registry's figures when
   * neither answered (a node on another origin answers only with --cors-origins).
   */
  async function chooseNodeLive(nodes, tried) {
    var left = nodes.filter(function (n) { return !tried.has(n.id); });
    if (left.length <= 1) return left[0] || null;
    var sampled = drawPair(left);
    var checked = (await Promise.all(sampled.map(withLiveLoad))).filter(Boolean);
    var pair = checked.length ? checked : sampled;
    return pair.length === 1 ? pair[0] : chooseNode(pair, new Set());
  }

  function trimSlash(url) { return String(url || "").replace(/\/+$/, ""); }

  function fetchWithTimeout(url, options, ms) {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var opts = Object.assign({}, options || {});
    if (controller) opts.signal = controller.signal;
    var timer = setTimeout(function () { if (controller) controller.abort(); }, ms);
    return fetch(url, opts).then(function (r) { clearTimeout(timer); return r; },
      function (e) { clearTimeout(timer); throw e; });
  }

  /** The pool as the registry holds it; the node that served the page is addressed by this page's origin. */
  async function loadNodes() {
    var here = { id: "this node", http_url: location.origin, load: {} };
    var nodes = [];
    var selfId = null;
    try {
      var health = await fetchWithTimeout("/health", { cache: "no-store" }, PROBE_TIMEOUT_MS);
      if (health.ok || health.status === 503) selfId = (await health.json()).node || null;
    } catch (ignored) { /* the list below still works */ }
    try {
      var r = await fetchWithTimeout("/registry/nodes.json", { cache: "no-store" }, PROBE_TIMEOUT_MS);
      if (r.ok) {
        var doc = await r.json();
        nodes = (doc.nodes || []).filter(function (n) { return n && n.id && n.http_url; });
      }
    } catch (ignored) { /* fall back to this node */ }
    nodes = nodes.map(function (n) {
      var base = n.id === selfId ? location.origin : trimSlash(n.http_url);
      return { id: n.id, base: base, load: n.load || {} };
    });
    if (nodes.length === 0) nodes = [{ id: selfId || here.id, base: here.http_url, load: {} }];
    return nodes;
  }

  /** Does the node speak tus at /files/? (OPTIONS answers Tus-Version.) Throws NodeError when it is down. */
  async function offersTus(base) {
    if (typeof window.tus === "undefined" || !window.tus.isSupported) return false;
    var r;
    try {
      r = await fetchWithTimeout(base + "/files/", { method: "OPTIONS", cache: "no-store" }, PROBE_TIMEOUT_MS);
    } catch (e) {
      throw NodeError("no answer from " + base + " (" + e.message + ")");
    }
    if (r.status >= 500) throw NodeError(base + " answered " + r.status);
    return !!r.headers.get("Tus-Version");
  }

  /* -- uploads --------------------------------------------------------- */

  function uploadIdFrom(url) {
    if (!url) return null;
    var parts = String(url).replace(/\/+$/, "").split("/");
    return parts[parts.length - 1] || null;
  }

  /** One Idempotency-Key per file: every try of its upload, on any node, carries it, so a try whose
   *  answer was lost is answered again (the same job or upload) instead of making a second one. */
  function newIdempotencyKey() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);  // crypto.randomUUID needs https; this does not
    return Array.from(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  function tusUpload(base, file, presets, resumeId, onProgress, key) {
    return new Promise(function (resolve, reject) {
      var jobId = null;
      var upload = new window.tus.Upload(file, {
        endpoint: base + "/files/",
        // Resume where another node of the pool left off (a shared S3 store knows the upload);
        // a node that does not know it answers 404 and tus-js-client starts afresh at the endpoint.
        uploadUrl: resumeId ? base + "/files/" + encodeURIComponent(resumeId) : null,
        chunkSize: TUS_CHUNK,
        retryDelays: TUS_RETRY_DELAYS,
        headers: token.headers({ "Idempotency-Key": key }),
        storeFingerprintForResuming: false,
        metadata: { filename: file.name, filetype: file.type || "application/octet-stream",
                    presets: presets.join(",") },
        onProgress: function (sent, total) { onProgress(sent, total); },
        onAfterResponse: function (req, res) {
          var job = res.getHeader("Gridnode-Job");
          if (job) jobId = job;
        },
        onShouldRetry: function (err) {
          var status = err.originalResponse ? err.originalResponse.getStatus() : 0;
          // A full or failing node: move to another one rather than wait here.
          if (status === 503 || status === 507) return false;
          return status === 0 || status === 409 || status === 423 || status >= 500;
        },
        onError: function (err) {
          var res = err.originalResponse;
          var status = res ? res.getStatus() : 0;
          var id = uploadIdFrom(upload.url) || resumeId;
          if (nodeIsUnavailable(status) || status === 507 || status === 404 && resumeId) {
            reject(NodeError(err.message || "upload failed", id));
          } else {
            reject(parseErrorBody(res.getBody(), status));
          }
        },
        onSuccess: function () {
          resolve({ jobId: jobId || uploadIdFrom(upload.url), job: null });
        }
      });
      upload.start();
    });
  }

  function postUpload(base, file, presets, onProgress, key) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      var query = "presets=" + encodeURIComponent(presets.join(",")) + "&name=" + encodeURIComponent(file.name);
      xhr.open("POST", base + "/jobs?" + query);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.setRequestHeader("Idempotency-Key", key);
      if (token.get()) xhr.setRequestHeader("Authorization", "Bearer " + token.get());
      xhr.upload.onprogress = function (ev) {
        if (ev.lengthComputable) onProgress(ev.loaded, ev.total);
      };
      xhr.onload = function () {
        if (xhr.status === 201) {
          onProgress(file.size, file.size);
          var job = JSON.parse(xhr.responseText);
          resolve({ jobId: job.id, job: job });
        } else if (nodeIsUnavailable(xhr.status) || xhr.status === 507 ||
                   xhr.status === 409 && xhr.responseText.indexOf("idempotency_key_in_use") >= 0) {
          reject(NodeError(base + " answered " + xhr.status));
        } else {
          reject(parseErrorBody(xhr.responseText, xhr.status));
        }
      };
      xhr.onerror = function () { reject(NodeError("the connection to " + base + " failed")); };
      xhr.ontimeout = xhr.onerror;
      xhr.send(file);
    });
  }

  /** Upload ``file``, moving from node to node until one takes it. Resolves {node, jobId, job}. */
  async function uploadAnywhere(nodes, file, presets, ui) {
    var tried = new Set();
    var resumeId = null;
    var key = newIdempotencyKey();
    var node = await chooseNodeLive(nodes, tried);
    while (node) {
      tried.add(node.id);
      ui.node(node);
      try {
        var useTus = await offersTus(node.base);
        ui.log("Uploading to " + node.id + (useTus ? " (resumable, tus)" : " (POST /jobs)"));
        var result = useTus
          ? await tusUpload(node.base, file, presets, resumeId, ui.uploadProgress, key)
          : await postUpload(node.base, file, presets, ui.uploadProgress, key);
        result.node = node;
        return result;
      } catch (e) {
        if (e.name !== "NodeError") throw e;
        if (e.uploadId) resumeId = e.uploadId;
        ui.log("Node " + node.id + " failed: " + e.message);
        node = await chooseNodeLive(nodes, tried);
        if (node) ui.log("Moving to node " + node.id + (resumeId ? ", resuming the upload" : ""));
      }
    }
    throw CodedError("no_node", "no node of the pool could take the upload; try again later", 0);
  }

  /* -- following the job ----------------------------------------------- */

  function isFinal(job) { return FINAL.indexOf(job.state) >= 0; }

  /** Follow a job until it ends: Server-Sent Events, with polling as the fallback. */
  function followJob(node, nodes, jobId, onJob) {
    return new Promise(function (resolve) {
      var finished = false;
      var es = null;
      var pollTimer = null;
      var failures = 0;
      // Poll the node that took the job first, then (if it went away) the others: any node
      // answers GET /jobs/<id> from the stored record.
      var order = [node].concat(nodes.filter(function (n) { return n.id !== node.id; }));
      var at = 0;

      function finish(job) {
        if (finished) return;
        finished = true;
        if (es) es.close();
        if (pollTimer) clearTimeout(pollTimer);
        resolve(job);
      }

      function seen(job) {
        if (finished || !job || job.id !== jobId) return;
        onJob(job);
        if (isFinal(job)) finish(job);
      }

      async function poll() {
        if (finished) return;
        var target = order[at % order.length];
        try {
          var r = await fetchWithTimeout(target.base + "/jobs/" + encodeURIComponent(jobId),
            { cache: "no-store", headers: token.headers() }, PROBE_TIMEOUT_MS);
          var body = await r.text();
          if (r.ok) {
            failures = 0;
            seen(JSON.parse(body));
          } else if (!nodeIsUnavailable(r.status)) {
            var err = parseErrorBody(body, r.status);
            finish({ id: jobId, state: "failed", progress: 0, outputs: [],
                     error: { code: err.code, message: err.message } });
          } else {
            at += 1;
          }
        } catch (e) {
          failures += 1;
          at += 1;
          if (failures > order.length * 5) {
            finish({ id: jobId, state: "failed", progress: 0, outputs: [],
                     error: { code: "unreachable", message: "no node answers about this job any more" } });
          }
        }
        if (!finished) pollTimer = setTimeout(poll, es ? 5 * POLL_MS : POLL_MS);
      }

      if (typeof window.EventSource === "function") {
        // An EventSource sends no headers: the token rides in the URL (never logged by the node).
        es = new EventSource(token.url(node.base + "/jobs/" + encodeURIComponent(jobId) + "/events"));
        var onEvent = function (ev) {
          try { seen(JSON.parse(ev.data)); } catch (ignored) { /* a malformed event */ }
        };
        // The node names each event after the job's state.
        STATES.forEach(function (s) { es.addEventListener(s, onEvent); });
        es.onmessage = onEvent;
        es.onerror = function () {
          if (finished) return;
          es.close();
          es = null;
          if (pollTimer) clearTimeout(pollTimer);
          poll();
        };
        // A slow check beside the stream: a job another node adopted sends no events here.
        pollTimer = setTimeout(poll, 5 * POLL_MS);
      } else {
        poll();
      }
    });
  }

  /* -- the page -------------------------------------------------------- */

  function absolute(base, url) {
    try { return new URL(url, base + "/").href; } catch (e) { return url; }
  }

  /** A result's URL for a link or a <video src> (no headers there). A node with tokens gives
   * signed URLs (/results/<job>/~<signature>/<name>) that need none; the token is added only to
   * the node's own plain /results/ URL, never to a signed one or a URL elsewhere. */
  function resultUrl(node, url) {
    var full = absolute(node.base, url);
    var plain = full.indexOf(node.base + "/results/") === 0 && !/\/results\/[^/]+\/~/.test(full);
    return plain ? token.url(full) : full;
  }

  function humanSize(n) {
    if (!(n >= 0)) return "";
    var units = ["B", "kB", "MB", "GB", "TB"];
    var i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }

  function setMeter(id, fraction) {
    var pct = Math.max(0, Math.min(100, Math.floor(fraction * 100)));
    $(id + "-progress").value = pct;
    var out = $(id + "-percent");
    out.textContent = pct + "%";
    out.setAttribute("data-value", String(pct));
  }

  function showError(code, message) {
    $("error-code").textContent = code || "error";
    $("error-message").textContent = message || "";
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error-code").textContent = "";
    $("error-message").textContent = "";
  }

  function log(text) {
    var li = document.createElement("li");
    li.textContent = text;
    $("log").appendChild(li);
  }

  /* -- the player ------------------------------------------------------ */

  var HLS_JS = "/static/vendor/hls.min.js";
  var DASH_JS = "/static/vendor/dash.mediaplayer.min.js";
  var HLS_TYPE = "application/vnd.apple.mpegurl";
  var DASH_TYPE = "application/dash+xml";
  var engine = null;  // the hls.js or dash.js instance playing, if any
  var scripts = {};

  /** Load a vendored script once, only when it is needed. */
  function loadScript(src) {
    if (!scripts[src]) {
      scripts[src] = new Promise(function (resolve, reject) {
        var el = document.createElement("script");
        el.src = src;
        el.onload = resolve;
        el.onerror = function () { delete scripts[src]; reject(new Error("could not load " + src)); };
        document.head.appendChild(el);
      });
    }
    return scripts[src];
  }

  function stopPlayer(player) {
    if (engine) { engine.destroy(); engine = null; }
    player.removeAttribute("src");
    player.textContent = "";
    delete player.dataset.engine;
  }

  function playFile(player, url, type) {
    var source = document.createElement("source");
    source.src = url;
    source.type = type;
    player.appendChild(source);
    player.dataset.engine = "file";
    player.load();
  }

  function hlsEngine(player, url) {
    return loadScript(HLS_JS).then(function () {
      if (!window.Hls || !window.Hls.isSupported()) throw new Error("hls.js does not support this browser");
      var hls = new window.Hls();
      hls.on(window.Hls.Events.ERROR, function (event, data) {
        if (data.fatal) log("Player: " + data.type + " " + data.details);
      });
      hls.loadSource(url);
      hls.attachMedia(player);
      return { name: "hls.js", destroy: function () { hls.destroy(); } };
    });
  }

  function dashEngine(player, url) {
    return loadScript(DASH_JS).then(function () {
      if (!window.dashjs) throw new Error("dash.js did not load");
      var dash = window.dashjs.MediaPlayer().create();
      dash.on(window.dashjs.MediaPlayer.events.ERROR, function (e) {
        log("Player: " + ((e.error && e.error.message) || "dash.js error"));
      });
      dash.initialize(player, url, false);
      return { name: "dash.js", destroy: function () { dash.reset(); } };
    });
  }

  /** Play ``url`` of ``type``. Adaptive streams (HLS, DASH) go through hls.js or dash.js where the
   *  browser has Media Source Extensions (they switch rungs by measured bandwidth), HLS through the
   *  browser itself where it has that (Safari); else the plain file ``fallback``, when there is one. */
  function play(player, url, type, fallback, fallbackType) {
    stopPlayer(player);
    var mse = typeof window.MediaSource === "function" || typeof window.ManagedMediaSource === "function";
    if (type !== HLS_TYPE && type !== DASH_TYPE) {
      playFile(player, url, type);
      return Promise.resolve();
    }
    if (!mse && type === HLS_TYPE && player.canPlayType(HLS_TYPE)) {
      player.src = url;
      player.dataset.engine = "native";
      return Promise.resolve();
    }
    var start = !mse ? Promise.reject(new Error("this browser has no Media Source Extensions"))
      : type === HLS_TYPE ? hlsEngine(player, url) : dashEngine(player, url);
    return start.then(function (e) {
      engine = e;
      player.dataset.engine = e.name;
    }).catch(function (e) {
      log("Player: " + e.message);
      if (fallback) playFile(player, fallback, fallbackType);
    });
  }

  function showResult(node, job) {
    var outputs = job.outputs || [];
    var list = $("outputs");
    list.textContent = "";
    outputs.forEach(function (o) {
      var li = document.createElement("li");
      var a = document.createElement("a");
      a.href = resultUrl(node, o.url);
      a.textContent = o.name || o.url;
      a.setAttribute("download", "");
      li.appendChild(a);
      var meta = [o.preset, o.content_type, humanSize(o.size)].filter(Boolean).join(", ");
      if (o.files > 1) meta += ", " + o.files + " files";
      li.appendChild(document.createTextNode(" — " + meta));
      list.appendChild(li);
    });

    var player = $("player");
    stopPlayer(player);
    // CMAF first (its HLS master, its DASH manifest "dash" beside): fMP4 segments both engines play
    var stream = outputs.filter(function (o) { return o.content_type === HLS_TYPE && o.dash; })[0] ||
      outputs.filter(function (o) { return o.content_type === HLS_TYPE; })[0] ||
      outputs.filter(function (o) { return o.content_type === DASH_TYPE; })[0];
    var video = outputs.filter(function (o) { return o.content_type === "video/mp4"; })[0] ||
      outputs.filter(function (o) { return o.content_type === "video/webm"; })[0];
    var poster = outputs.filter(function (o) { return o.preset === "poster" || /\.jpe?g$/.test(o.name || ""); })[0];
    if (poster) player.setAttribute("poster", resultUrl(node, poster.url));
    player.hidden = !(stream || video);
    if (stream) {
      play(player, resultUrl(node, stream.url), stream.content_type, video && resultUrl(node, video.url),
        video && video.content_type);
    } else if (video) {
      play(player, resultUrl(node, video.url), video.content_type);
    }
    $("result-section").hidden = false;
  }

  function checkedPresets() {
    var chosen = Array.prototype.slice.call(document.querySelectorAll('input[name="preset"]:checked'))
      .map(function (el) { return el.value; });
    if (chosen.indexOf("poster") < 0) chosen.push("poster");
    return chosen;
  }

  var nodesReady = null;

  function describe(node) {
    return "node " + node.id + " (" + node.base + "), busy " + busy(node).toFixed(2) + " when the page loaded";
  }

  /** The outputs list: what ``GET /presets`` says the caller may use (the node's templates
   *  included), each named with its description; what was checked stays checked. A node that
   *  does not answer (a token not given yet: 401) leaves the list as it is. The poster is
   *  always made, so the player has one. */
  function showPresets(listing) {
    var box = $("preset-list");
    var checked = checkedPresets();
    box.textContent = "";
    listing.forEach(function (t) {
      if (t.name === "poster") return;
      var label = document.createElement("label");
      var input = document.createElement("input");
      input.type = "checkbox";
      input.name = "preset";
      input.value = t.name;
      input.checked = checked.indexOf(t.name) >= 0;
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + t.name + (t.description ? " — " + t.description : "")));
      box.appendChild(label);
    });
  }

  /** Ask ``node`` for the caller's presets; ``#preset-list`` carries ``data-loaded`` once it has
   *  its answer ("node") or kept the built-in list ("static"). */
  function loadPresets(node) {
    var box = $("preset-list");
    return fetchWithTimeout(node.base + "/presets", { cache: "no-store", headers: token.headers() },
      PROBE_TIMEOUT_MS).then(function (res) {
      if (!res.ok) return null;
      return res.json().then(function (body) {
        if (body && Array.isArray(body.presets)) showPresets(body.presets);
        return body;
      });
    }).catch(function () { return null; }).then(function (body) {
      box.dataset.loaded = body ? "node" : "static";
      return body;
    });
  }

  function start() {
    nodesReady = loadNodes().then(function (nodes) {
      var first = chooseNode(nodes, new Set());
      $("node-info").textContent = nodes.length + " node" + (nodes.length === 1 ? "" : "s") +
        " in the pool; chosen: " + describe(first);
      loadPresets(first);
      $("token").addEventListener("change", function () { loadPresets(first); });
      return { nodes: nodes, first: first };
    });
    return nodesReady;
  }

  async function submit(ev) {
    ev.preventDefault();
    clearError();
    var file = $("file").files[0];
    if (!file) {
      showError("no_file", "choose a video file first");
      $("file").focus();
      return;
    }
    var button = $("submit");
    button.disabled = true;
    $("result-section").hidden = true;
    $("progress-section").hidden = false;
    $("log").textContent = "";
    $("job-state").textContent = "";
    setMeter("upload", 0);
    setMeter("convert", 0);

    try {
      var pool = await nodesReady;
      var presets = checkedPresets();
      var ui = {
        node: function (node) {
          $("node-info").textContent = "Uploading to " + describe(node);
        },
        log: log,
        uploadProgress: function (sent, total) { setMeter("upload", total > 0 ? sent / total : 0); }
      };
      // The first choice was made on load; after a failure, the same rule over the nodes not tried yet.
      var taken = await uploadAnywhere(pool.nodes, file, presets, ui);
      setMeter("upload", 1);
      log("Upload complete; job " + taken.jobId + " on node " + taken.node.id);
      $("node-info").textContent = "Converting on " + describe(taken.node);

      var onJob = function (job) {
        setMeter("convert", Number(job.progress) || 0);
        $("job-state").textContent = "Job " + job.id + ": " + job.state;
      };
      if (taken.job) onJob(taken.job);
      var job = await followJob(taken.node, pool.nodes, taken.jobId, onJob);
      $("node-info").textContent = "Converted on node " + taken.node.id + " (" + taken.node.base + ")";
      if (job.state === "done") {
        setMeter("convert", 1);
        showResult(taken.node, job);
      } else {
        var err = job.error || {};
        showError(err.code || job.state, err.message || "the job ended " + job.state);
      }
    } catch (e) {
      showError(e.code || "upload_failed", e.message);
    } finally {
      button.disabled = false;
    }
  }

  // For tests and the curious: the pure parts.
  window.gridnodeUpload = {
    busy: busy, expectedWait: expectedWait, chooseNode: chooseNode, chooseNodeLive: chooseNodeLive,
    play: function (url, type) { return play($("player"), url, type); },
    presetsShown: function () {
      return Array.prototype.map.call(document.querySelectorAll('input[name="preset"]'), function (el) {
        return [el.value, el.checked];
      });
    },
    showResult: showResult
  };

  token.bind($("token"));
  $("upload-form").addEventListener("submit", submit);
  start().catch(function (e) { showError("no_nodes", e.message); });
}());
