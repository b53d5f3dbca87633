// The patient kiosk: idle reset, signature pad, live readings, photo upload, video visit.
// No inline script (CSP); everything hangs off data- attributes the templates set.
(function () {
  "use strict";
  var body = document.body;
  var meta = document.querySelector('meta[name="kiosk-csrf"]');
  var csrf = meta ? meta.getAttribute("content") : null;

  function clearBrowserState() {
    try { window.sessionStorage.clear(); } catch (e) { /* storage disabled */ }
    try { window.localStorage.clear(); } catch (e) { /* storage disabled */ }
    Array.prototype.forEach.call(document.forms, function (form) { form.reset(); });
    var pad = document.getElementById("signature-pad");
    if (pad) { pad.getContext("2d").clearRect(0, 0, pad.width, pad.height); }
  }

  // -- idle reset: the server forgets the flow; the page leaves nothing behind ------------
  var idleSeconds = parseInt(body.getAttribute("data-idle-timeout") || "90", 10);
  var warning = document.getElementById("kiosk-idle-warning");
  var timer = null;
  var warnTimer = null;
  var resetting = false;
  var inCall = false;  // a video call is on (video.js says so): no idle reset meanwhile

  function goHome() {
    clearBrowserState();
    window.location.replace("/kiosk/");  // replace: the page being left is not kept in history
  }

  function idleReset() {
    if (resetting) { return; }
    resetting = true;
    if (window.kioskEvents) { window.kioskEvents.close(); }
    clearBrowserState();
    if (!csrf) { goHome(); return; }
    fetch("/kiosk/reset", {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-CSRF-Token": csrf,
        "X-Requested-With": "kiosk.js"
      },
      body: "why=idle"
    }).catch(function () { /* the server expires the flow by itself too */ }).then(goHome);
  }

  function touched() {
    if (resetting || inCall) { return; }
    if (warning) { warning.hidden = true; }
    window.clearTimeout(timer);
    window.clearTimeout(warnTimer);
    timer = window.setTimeout(idleReset, idleSeconds * 1000);
    if (warning && idleSeconds > 20) {
      warnTimer = window.setTimeout(function () { warning.hidden = false; }, (idleSeconds - 15) * 1000);
    }
  }

  if (csrf) {
    ["pointerdown", "keydown", "input", "touchstart", "wheel"].forEach(function (name) {
      document.addEventListener(name, touched, { passive: true, capture: true });
    });
    touched();
  }
  // A page restored from the back-forward cache may show an earlier patient's step: reload.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { window.location.replace("/kiosk/"); }
  });

  // -- the video visit ----------------------------------------------------------------
  // The server says whether a nurse has this station's patient's visit live; /kiosk/ then
  // shows the video panel. During the call the idle reset waits; it starts afresh after.
  var VIDEO_POLL_MS = 3000;
  var LEAVE_AFTER_MS = 5000;  // time to read "The visit has ended." before the step returns
  var videoPanel = document.getElementById("video");
  var leaving = null;
  document.addEventListener("videocall", function (event) {
    inCall = Boolean(event.detail && event.detail.live);
    body.classList.toggle("in-call", inCall);
    if (inCall) {
      window.clearTimeout(timer);
      window.clearTimeout(warnTimer);
      if (warning) { warning.hidden = true; }
    } else {
      touched();
    }
  });
  function pollVideo() {
    if (resetting) { return; }
    fetch("/kiosk/video/state", { credentials: "same-origin", headers: { "X-Requested-With": "kiosk.js" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (state) {
        if (!state || resetting) { return; }
        if (state.live && !videoPanel) {
          window.location.replace("/kiosk/");
        } else if (!state.live && videoPanel && !inCall && leaving === null) {
          leaving = window.setTimeout(function () { window.location.replace("/kiosk/"); }, LEAVE_AFTER_MS);
        }
      })
      .catch(function () { /* the box is restarting: ask again next time */ });
  }
  if (csrf) { window.setInterval(pollVideo, VIDEO_POLL_MS); }

  // -- signature pad ------------------------------------------------------------------
  var pad = document.getElementById("signature-pad");
  if (pad) {
    var ctx = pad.getContext("2d");
    var drawing = false;
    var inked = false;
    ctx.lineWidth = 4;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#13212e";
    var point = function (event) {
      var box = pad.getBoundingClientRect();
      return {
        x: (event.clientX - box.left) * (pad.width / box.width),
        y: (event.clientY - box.top) * (pad.height / box.height)
      };
    };
    pad.addEventListener("pointerdown", function (event) {
      drawing = true;
      pad.setPointerCapture(event.pointerId);
      var p = point(event);
      ctx.beginPath();
      ctx.moveTo(p.x, p.y);
    });
    pad.addEventListener("pointermove", function (event) {
      if (!drawing) { return; }
      var p = point(event);
      ctx.lineTo(p.x, p.y);
      ctx.stroke();
      inked = true;
    });
    ["pointerup", "pointercancel", "pointerleave"].forEach(function (name) {
      pad.addEventListener(name, function () { drawing = false; });
    });
    document.getElementById("signature-clear").addEventListener("click", function () {
      ctx.clearRect(0, 0, pad.width, pad.height);
      inked = false;
    });
    document.getElementById("consent-form").addEventListener("submit", function (event) {
      var error = document.getElementById("sign-error");
      var data = inked ? pad.toDataURL("image/png") : "";
      var max = parseInt(pad.getAttribute("data-max-bytes"), 10);
      if (!data || data.length * 3 / 4 > max) {
        event.preventDefault();
        error.hidden = false;
        return;
      }
      document.getElementById("signature-data").value = data;
    });
  }

  // -- live readings ------------------------------------------------------------------
  var readings = document.getElementById("readings");
  if (readings && window.EventSource) {
    var source = new EventSource(readings.getAttribute("data-events"));
    window.kioskEvents = source;
    source.addEventListener("reading", function (event) {
      var r = JSON.parse(event.data);
      if (readings.querySelector('[data-id="' + r.id + '"]')) { return; }
      var li = document.createElement("li");
      li.setAttribute("data-id", r.id);
      var label = document.createElement("span");
      label.className = "label";
      label.textContent = r.label;
      var value = document.createElement("span");
      value.className = "value";
      value.textContent = r.value;
      li.appendChild(label);
      li.appendChild(document.createTextNode(" "));
      li.appendChild(value);
      readings.appendChild(li);
      var empty = document.getElementById("readings-empty");
      if (empty) { empty.hidden = true; }
      touched();  // a reading means somebody is at the station
    });
    source.addEventListener("reset", function () { source.close(); goHome(); });
  }

  // -- photos: sent in pieces under the app's request-size cap --------------------------
  var upload = document.getElementById("photo-upload");
  if (upload) {
    var input = document.getElementById("photo");
    var status = document.getElementById("photo-status");
    var maxBytes = parseInt(upload.getAttribute("data-max-bytes"), 10);
    var chunk = parseInt(upload.getAttribute("data-chunk-bytes"), 10);
    var post = function (url, payload, offset) {
      var headers = { "X-CSRF-Token": csrf, "Content-Type": "application/octet-stream" };
      if (offset !== null) { headers["X-Upload-Offset"] = String(offset); }
      return fetch(url, { method: "POST", credentials: "same-origin", headers: headers, body: payload })
        .then(function (response) {
          return response.json().then(function (data) {
            if (!response.ok) { throw new Error(data.error || "upload failed"); }
            return data;
          });
        });
    };
    input.addEventListener("change", function () {
      var file = input.files && input.files[0];
      if (!file) { return; }
      if (file.size > maxBytes) { status.textContent = upload.getAttribute("data-too-big"); input.value = ""; return; }
      if (file.type !== "image/jpeg" && file.type !== "image/png") {
        status.textContent = upload.getAttribute("data-wrong-type"); input.value = ""; return;
      }
      var offset = 0;
      var next = function () {
        if (offset >= file.size) { return post("/kiosk/photos/finish", "", null); }
        var piece = file.slice(offset, offset + chunk);
        var at = offset;
        offset += chunk;
        status.textContent = Math.round(100 * at / file.size) + " %";
        return post("/kiosk/photos/chunk", piece, at).then(next);
      };
      next().then(function (data) {
        status.textContent = upload.getAttribute("data-sent") + " (" + data.photos + ")";
        input.value = "";
      }).catch(function (error) {
        status.textContent = error.message;
        input.value = "";
      });
    });
  }
})();
