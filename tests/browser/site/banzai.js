// The fixture page's telemetry client. It collects what Meta's web clients collect and sends it the
// ways they do (see docs/testing.md and shared reference meta-telemetry.md sections 2-3):
//  - keydown/keyup -> falco:bd_pdc_signals, signal 30100 {action: 2 down | 1 up, key_code: 0},
//    Blowfish-encrypted in `sjd`, one post per flush (vital queue);
//  - click -> one click_ref_logger post per click, a positional array (vital queue);
//  - pointermove / scroll -> DOM-vocabulary samples in a falco:web_interaction_trace post, plus an
//    active-seconds falco:web_time_spent_bit_array (basic queue);
//  - vital queue: multipart POST /ajax/bz by fetch every second, every other batch snappy_base64;
//    basic queue: every 3 s by fetch; on pagehide everything left goes by navigator.sendBeacon;
//  - the composer's keystroke timing rides in the GraphQL message send (typing_metrics, client_timing).
// Like the Comet Banzai adapter, exactly HTTP 200 is success; anything else re-queues the posts with
// retry_count + 1. The page counts what it sent and shows it in #kv-status (data-* attributes).
(function () {
  "use strict";
  const C = window.KVCodecs;
  const APP_ID = "2220391788200892";
  const USER = "100000000000001";
  const SESSION = "kv7x2q:p0d9sa:3m1c8e";
  const DEVICE = "$^|AcKvFixtureDeviceId|fd.AcKvFixture";
  const ASID = crypto.randomUUID();
  const PDC_CT = 1659080345;
  const THREAD_ID = "100000000000100";
  const T0 = Date.now();

  const stats = {
    sent: { keystroke: 0, click: 0, pointer: 0, scroll: 0 },
    gqlKeystroke: 0, pdcKeystroke: 0,
    keystrokeValues: 0, // timing numbers about keys: 30100 records, typing_metrics values, client_timing
    ok: 0, failed: 0, inflight: 0, batches: 0, snappyBatches: 0, beacons: 0,
  };
  const vital = [];   // {post, counts}
  const basic = [];
  let pdcRecords = []; // 30100 records not yet in a post
  let trace = [];      // pointer / scroll samples not yet in a post
  const activeSeconds = new Set();
  let req = 0;

  // ---------------------------------------------------------------- UI helpers
  const $ = (id) => document.getElementById(id);
  const statusEl = $("kv-status");

  function logLine(text, ok) {
    const div = document.createElement("div");
    div.textContent = text;
    div.className = ok ? "ok" : "bad";
    $("sendlog").prepend(div);
  }

  function pendingCounts() {
    const p = { keystroke: 0, click: 0, pointer: 0, scroll: 0 };
    for (const q of [vital, basic]) {
      for (const item of q) for (const k in item.counts) p[k] += item.counts[k];
    }
    p.keystroke += pdcRecords.length;
    for (const s of trace) p[s.type === "scroll" ? "scroll" : "pointer"] += 1;
    return p;
  }

  function render() {
    const p = pendingCounts();
    const retry = vital.concat(basic).filter((i) => i.post[3] > 0).length;
    const d = statusEl.dataset;
    d.keystrokeSent = stats.sent.keystroke;
    d.keystrokeSentPdc = stats.pdcKeystroke;
    d.keystrokeSentGraphql = stats.gqlKeystroke;
    d.keystrokeValuesSent = stats.keystrokeValues;
    d.clickSent = stats.sent.click;
    d.pointerSent = stats.sent.pointer;
    d.scrollSent = stats.sent.scroll;
    d.sendsOk = stats.ok;
    d.sendsFailed = stats.failed;
    d.inflight = stats.inflight;
    d.batches = stats.batches;
    d.snappyBatches = stats.snappyBatches;
    d.retryQueued = retry;
    d.pendingKeystroke = p.keystroke;
    d.pendingClick = p.click;
    d.pendingPointer = p.pointer;
    d.pendingScroll = p.scroll;
    $("n-keystroke").textContent = stats.sent.keystroke;
    $("n-click").textContent = stats.sent.click;
    $("n-pointer").textContent = stats.sent.pointer;
    $("n-scroll").textContent = stats.sent.scroll;
    $("n-ok").textContent = stats.ok;
    $("n-failed").textContent = stats.failed;
    $("n-retry").textContent = retry;
    $("n-pending").textContent = p.keystroke + p.click + p.pointer + p.scroll;
  }

  function query() {
    req += 1;
    return "__a=1&__user=" + USER + "&__req=" + req.toString(36) + "&dpr=1&__ccg=EXCELLENT&__rev=1019999999" +
      "&__s=" + encodeURIComponent(SESSION) + "&__hsi=7400000000000000001&__comet_req=15&lsd=AVqKvFixtureLsd";
  }

  // ---------------------------------------------------------------- collectors
  function markActive() {
    activeSeconds.add(Math.floor((Date.now() - T0) / 1000));
  }

  function onKey(e) {
    markActive();
    pdcRecords.push({ t: Date.now() / 1000, v: { action: e.type === "keydown" ? 2 : 1, key_code: 0 } });
    if (e.target === $("message")) composerKey(e);
    render();
  }
  document.addEventListener("keydown", onKey, true);
  document.addEventListener("keyup", onKey, true);

  document.addEventListener("click", function (e) {
    markActive();
    const el = e.target.closest("a,button,[role=button]") || e.target;
    const mods = (e.ctrlKey ? 1 : 0) + (e.shiftKey ? 2 : 0) + (e.altKey ? 4 : 0) + (e.metaKey ? 8 : 0);
    const data = [SESSION, Date.now(), "act", Math.round(e.timeStamp), vital.length + 1,
      el.getAttribute("href") || "-", "messenger_thread", "click" + (mods ? mods : ""),
      el.id || el.dataset.reaction || el.tagName.toLowerCase(), "r", location.pathname,
      { ft: { click_type: ["left", "middle", "right"][e.button] || "left" }, gt: {} },
      Math.round(e.clientX), Math.round(e.clientY), 0, 0, "MessengerThreadPage", "XMessengerThreadController"];
    enqueue(vital, "click_ref_logger", data, { click: 1 });
  }, true);

  document.addEventListener("pointermove", function (e) {
    markActive();
    trace.push({ type: "pointermove", timeStamp: +e.timeStamp.toFixed(1), clientX: e.clientX, clientY: e.clientY });
    render();
  }, true);

  document.addEventListener("scroll", function (e) {
    markActive();
    const t = e.target === document ? document.scrollingElement : e.target;
    trace.push({ type: "scroll", timeStamp: +e.timeStamp.toFixed(1), scrollY: Math.round(t.scrollTop) });
    render();
  }, true);

  // ---------------------------------------------------------------- Banzai
  function enqueue(queue, route, data, counts) {
    const size = JSON.stringify(data).length;
    queue.push({ post: [route, data, Date.now(), 0, size], counts: counts });
    render();
  }

  function falco(name, extra) {
    return { e: JSON.stringify(extra), r: 1, d: DEVICE, s: SESSION, t: Date.now(), b: [1, 128] };
  }

  // Turn the raw buffers into posts right before a send.
  function cutPdc() {
    if (!pdcRecords.length) return;
    const records = pdcRecords;
    pdcRecords = [];
    const sjd = C.pdcEncrypt(ASID, { "30100": records });
    enqueue(vital, "falco:bd_pdc_signals", falco("bd_pdc_signals", { asid: ASID, ct: PDC_CT, sjd: sjd, sid: -1 }),
      { keystroke: records.length });
  }

  function cutTrace() {
    if (!trace.length) return;
    const samples = trace;
    trace = [];
    let pointer = 0, scroll = 0;
    for (const s of samples) (s.type === "scroll") ? scroll++ : pointer++;
    enqueue(basic, "falco:web_interaction_trace",
      falco("web_interaction_trace", { events: samples, surface: "messenger_thread" }),
      { pointer: pointer, scroll: scroll });
    const secs = Array.from(activeSeconds).filter((s) => s < 64);
    const tos = [0, 0];
    for (const s of secs) tos[s >> 5] |= (1 << (s & 31));
    enqueue(basic, "falco:web_time_spent_bit_array", falco("web_time_spent_bit_array", {
      tos_id: "kvtos", start_time: Math.floor(T0 / 1000), tos_array: tos.map((x) => x | 0), tos_len: 64,
      tos_seq: stats.batches, tos_cum: secs.length, sid_raw: SESSION,
    }), {});
  }

  function wad(items, method, compression) {
    const posts = items.map((i) => i.post);
    const w = { app_id: APP_ID, user: USER, webSessionId: SESSION, posts: posts, trigger: posts[0][0],
      send_method: method, compression: compression };
    if (compression === "snappy_base64") {
      const start = performance.now();
      w.posts = C.snappyBase64(posts);
      w.snappy_ms = Math.max(1, Math.round(performance.now() - start));
    }
    return w;
  }

  function formData(w) {
    const fd = new FormData();
    fd.append("ts", String(Date.now()));
    fd.append("q", JSON.stringify([w]));
    return fd;
  }

  function credit(items) {
    for (const i of items) for (const k in i.counts) stats.sent[k] += i.counts[k];
    for (const i of items) {
      if (i.post[0] !== "falco:bd_pdc_signals") continue;
      stats.pdcKeystroke += i.counts.keystroke;
      stats.keystrokeValues += i.counts.keystroke;
    }
  }

  async function flush(queue) {
    if (!queue.length) return;
    const items = queue.splice(0, queue.length);
    stats.batches += 1;
    const compression = stats.batches % 2 === 0 ? "snappy_base64" : "";
    if (compression) stats.snappyBatches += 1;
    stats.inflight += 1;
    render();
    let status = 0;
    try {
      // keepalive: a flush that starts as the page is left still completes
      const resp = await fetch("/ajax/bz?" + query(), { method: "POST", body: formData(wad(items, "ajax", compression)),
        credentials: "include", keepalive: true });
      status = resp.status;
    } catch (err) {
      status = 0;
    }
    stats.inflight -= 1;
    if (status === 200) {
      stats.ok += 1;
      credit(items);
    } else { // keep the posts and try again later, as Banzai does
      stats.failed += 1;
      for (const i of items) i.post[3] += 1;
      queue.unshift(...items);
    }
    logLine("POST /ajax/bz (" + items.length + " posts" + (compression ? ", snappy" : "") + ") -> " + status,
      status === 200);
    render();
  }

  setInterval(function () { cutPdc(); flush(vital); }, 1000);
  setInterval(function () { cutTrace(); flush(basic); }, 3000);

  window.addEventListener("pagehide", function () {
    cutPdc();
    cutTrace();
    const items = vital.splice(0).concat(basic.splice(0));
    if (!items.length) return;
    const queued = navigator.sendBeacon("/ajax/bz?" + query(), formData(wad(items, "beacon", "snappy_base64")));
    if (queued) stats.beacons += 1;
  });

  // ---------------------------------------------------------------- GraphQL message send
  let downTimes = [], upTimes = [], dwell = [], held = {}, composeStart = null;

  function composerKey(e) {
    const t = Math.round(performance.now() * 10) / 10;
    if (composeStart === null) composeStart = t;
    if (e.type === "keydown") {
      downTimes.push(t);
      held[e.code || e.key] = t;
    } else {
      upTimes.push(t);
      const d = held[e.code || e.key];
      if (d !== undefined) dwell.push(Math.round((t - d) * 10) / 10);
      delete held[e.code || e.key];
    }
  }

  async function sendMessage() {
    const text = $("message").value;
    if (!text) return;
    const el = $("message-status");
    const metrics = { keydown_ts: downTimes, keyup_ts: upTimes, dwell: dwell };
    const keyEvents = downTimes.length + upTimes.length;
    // timing numbers about the keys: every keydown_ts, keyup_ts and dwell value, and the three
    // client_timing numbers (first key, send, and the typing duration between them)
    const keyValues = keyEvents + dwell.length + 3;
    const now = Math.round(performance.now() * 10) / 10;
    const variables = { input: {
      client_mutation_id: String(req + 1), actor_id: USER,
      message: { text: text }, thread_id: THREAD_ID,
      offline_threading_id: String(Date.now()) + "0000", source: "www_chat",
      typing_metrics: metrics,
      client_timing: { compose_start: composeStart, send_clicked: now, compose_ms: Math.round(now - composeStart) },
    } };
    downTimes = []; upTimes = []; dwell = []; held = {}; composeStart = null;
    const body = new URLSearchParams({
      av: USER, __user: USER, __a: "1", __req: (++req).toString(36), __comet_req: "15",
      fb_dtsg: "NAcKvFixtureDtsg:1:1", jazoest: "25500", lsd: "AVqKvFixtureLsd",
      fb_api_caller_class: "RelayModern", fb_api_req_friendly_name: "useMWChatSendMessageMutation",
      variables: JSON.stringify(variables), server_timestamps: "true", doc_id: "7241726279209872",
    });
    el.dataset.state = "sending";
    stats.inflight += 1;
    render();
    let status = 0, mid = null;
    try {
      const resp = await fetch("/api/graphql/", { method: "POST", body: body, credentials: "include",
        headers: { "X-FB-Friendly-Name": "useMWChatSendMessageMutation", "X-FB-LSD": "AVqKvFixtureLsd" } });
      status = resp.status;
      const json = await resp.json();
      mid = json && json.data && json.data.send_message ? json.data.send_message.message_id : null;
    } catch (err) {
      mid = null;
    }
    stats.inflight -= 1;
    // A message counts as sent only when the server says so: status 200 *and* a message id back.
    if (status === 200 && mid) {
      stats.ok += 1;
      stats.sent.keystroke += keyEvents;
      stats.gqlKeystroke += keyEvents;
      stats.keystrokeValues += keyValues;
      el.dataset.state = "sent";
      el.dataset.messageId = mid;
      el.textContent = "Sent ✓ (" + mid + ")";
      const bubble = document.createElement("div");
      bubble.className = "msg mine";
      bubble.textContent = text;
      $("feed").append(bubble);
      $("feed").scrollTop = $("feed").scrollHeight;
      $("message").value = "";
    } else {
      stats.failed += 1;
      el.dataset.state = "failed";
      el.textContent = "Not sent (HTTP " + status + ")";
    }
    logLine("POST /api/graphql/ useMWChatSendMessageMutation -> " + status, status === 200 && !!mid);
    render();
  }

  $("send").addEventListener("click", sendMessage);

  // ---------------------------------------------------------------- a thread to scroll through
  const lines = ["hey!", "are we still on for tonight?", "yes, 8pm", "cool", "should I bring anything?",
    "maybe dessert", "ok, cake it is", "see you there", "running 5 min late", "no worries"];
  for (let i = 0; i < 40; i++) {
    const div = document.createElement("div");
    div.className = "msg" + (i % 3 === 0 ? " mine" : "");
    div.textContent = lines[i % lines.length];
    $("feed").append(div);
  }
  render();
  statusEl.dataset.ready = "1";
})();
