// A small stand-in for Meta's fbevents.js: PageView on load and the automatic SubscribedButtonClick
// event on button clicks, each sent as an image GET to https://www.facebook.com/tr (rqm=GET).
// A hit counts as answered when the image loads (the real endpoint answers a 1x1 GIF).
(function () {
  "use strict";
  const queued = (window.fbq && window.fbq.queue) || [];
  let pixelId = null, ec = 0;
  const stats = { hits: 0, ok: 0, failed: 0, clicks: 0 };
  const fbp = "fb.1." + Date.now() + "." + Math.floor(Math.random() * 1e9);

  function render() {
    const t = document.getElementById("pixel-status");
    if (!t) return;
    t.dataset.hits = stats.hits; t.dataset.hitsOk = stats.ok; t.dataset.hitsFailed = stats.failed;
    t.dataset.clickSent = stats.clicks; t.dataset.pending = stats.hits - stats.ok - stats.failed;
    document.getElementById("n-hits").textContent = stats.hits;
    document.getElementById("n-hits-ok").textContent = stats.ok;
    document.getElementById("n-hits-failed").textContent = stats.failed;
    document.getElementById("n-clicks").textContent = stats.clicks;
  }

  function hit(ev, custom) {
    const p = new URLSearchParams({ id: pixelId, ev: ev, dl: location.href, rl: document.referrer, if: "false",
      ts: String(Date.now()) });
    for (const k in custom || {}) p.append("cd[" + k + "]", custom[k]);
    p.append("sw", String(screen.width)); p.append("sh", String(screen.height));
    p.append("v", "2.9.170"); p.append("r", "stable"); p.append("ec", String(ec++)); p.append("o", "4126");
    p.append("fbp", fbp); p.append("it", String(Date.now())); p.append("coo", "false"); p.append("rqm", "GET");
    const img = new Image();
    stats.hits += 1;
    const isClick = ev === "SubscribedButtonClick";
    img.onload = function () { stats.ok += 1; if (isClick) stats.clicks += 1; render(); };
    img.onerror = function () { stats.failed += 1; render(); };
    img.src = "https://www.facebook.com/tr/?" + p.toString();
    render();
  }

  function fbq(cmd, a, b) {
    if (cmd === "init") pixelId = a;
    else if (cmd === "track") hit(a, b);
  }
  window.fbq = fbq;
  for (const args of queued) fbq.apply(null, args);

  // Automatic events: Meta's pixel describes every button the visitor clicks.
  document.addEventListener("click", function (e) {
    const btn = e.target.closest("button,input[type=submit],a.btn");
    if (!btn) return;
    const features = { classList: btn.className, destination: location.href, id: btn.id, imageUrl: "",
      innerText: btn.innerText, numChildButtons: 0, tag: btn.tagName.toLowerCase(), type: btn.type || null };
    hit("SubscribedButtonClick", { buttonFeatures: JSON.stringify(features), buttonText: btn.innerText,
      formFeatures: "[]", pageFeatures: JSON.stringify({ title: document.title }) });
  }, true);
  render();
  document.getElementById("pixel-status").dataset.ready = "1";
})();
