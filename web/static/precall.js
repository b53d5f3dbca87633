// The pre-call check (web/precall.py): camera, microphone, speaker, then the network.
// Everything is measured here in the browser; nothing is recorded. Text goes into the page
// through textContent only (CSP + XSS).
"use strict";

(function () {
  const root = document.getElementById("precall");
  if (!root) {
    return;
  }
  const $ = (id) => document.getElementById(id);
  const VIDEO_MBPS = 1.5; // what a 720p visit needs each way
  const AUDIO_ONLY_MBPS = 0.3; // below this the visit falls back to audio
  const RTT_OK_MS = 300;
  const results = {};

  function show(id, state, text) {
    const el = $(id);
    el.dataset.state = state;
    el.textContent = text;
    results[id] = state;
  }

  function median(values) {
    const sorted = values.slice().sort((a, b) => a - b);
    return sorted[Math.floor(sorted.length / 2)];
  }

  function mbps(bytes, ms) {
    return (bytes * 8) / (ms / 1000) / 1e6;
  }

  // -- camera and microphone -----------------------------------------------------------

  async function devices() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      show("camera", "fail", "This browser cannot use a camera here (it needs HTTPS).");
      show("microphone", "fail", "This browser cannot use a microphone here.");
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    } catch (error) {
      const text =
        error && error.name === "NotAllowedError"
          ? "Blocked: allow the camera and microphone for this page, then start again."
          : "Not found or in use by another program.";
      show("camera", "fail", text);
      show("microphone", "fail", text);
      return;
    }
    const video = stream.getVideoTracks()[0];
    const preview = $("preview");
    preview.srcObject = stream;
    await new Promise((resolve) => {
      if (preview.readyState >= 2) {
        resolve();
      } else {
        preview.addEventListener("loadeddata", resolve, { once: true });
        setTimeout(resolve, 3000);
      }
    });
    if (video && preview.videoWidth > 0) {
      show("camera", "ok", `Working (${preview.videoWidth}×${preview.videoHeight}, ${video.label || "camera"})`);
    } else {
      show("camera", "fail", "No picture from the camera.");
    }
    await microphone(stream);
  }

  async function microphone(stream) {
    const audio = stream.getAudioTracks()[0];
    if (!audio) {
      show("microphone", "fail", "No microphone found.");
      return;
    }
    const context = new AudioContext();
    const analyser = context.createAnalyser();
    analyser.fftSize = 1024;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    let loudest = 0;
    show("microphone", "waiting", "Listening… say a few words.");
    const until = performance.now() + 3000;
    while (performance.now() < until) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const value of samples) {
        sum += value * value;
      }
      const level = Math.min(1, Math.sqrt(sum / samples.length) * 4);
      $("level").value = level;
      loudest = Math.max(loudest, level);
    }
    await context.close();
    if (loudest > 0.02) {
      show("microphone", "ok", `Working (${audio.label || "microphone"})`);
    } else {
      show("microphone", "warn", "Silent: check that the microphone is not muted.");
    }
  }

  // -- speaker ---------------------------------------------------------------------------

  async function tone() {
    const context = new AudioContext();
    const oscillator = context.createOscillator();
    const gain = context.createGain();
    oscillator.frequency.value = 660;
    gain.gain.value = 0.2;
    oscillator.connect(gain).connect(context.destination);
    oscillator.start();
    await new Promise((resolve) => setTimeout(resolve, 700));
    oscillator.stop();
    await context.close();
  }

  function speaker() {
    return new Promise((resolve) => {
      show("speaker", "waiting", "Playing a tone…");
      $("speaker-ask").hidden = false;
      tone();
      $("tone-again").onclick = tone;
      $("heard-yes").onclick = () => {
        $("speaker-ask").hidden = true;
        show("speaker", "ok", "Working");
        resolve();
      };
      $("heard-no").onclick = () => {
        $("speaker-ask").hidden = true;
        show("speaker", "fail", "Not heard: check the volume and the output device.");
        resolve();
      };
    });
  }

  // -- network ---------------------------------------------------------------------------

  async function roundTrip() {
    const times = [];
    for (let i = 0; i < 10; i += 1) {
      const start = performance.now();
      await fetch(root.dataset.ping, { cache: "no-store", credentials: "same-origin" });
      times.push(performance.now() - start);
    }
    const ms = median(times);
    show("rtt", ms < RTT_OK_MS ? "ok" : "warn", `${ms.toFixed(0)} ms (median of 10)`);
  }

  function verdict(rate) {
    if (rate >= VIDEO_MBPS) {
      return "ok";
    }
    return rate >= AUDIO_ONLY_MBPS ? "warn" : "fail";
  }

  async function download() {
    const bytes = 1024 * 1024;
    const start = performance.now();
    const response = await fetch(`${root.dataset.sample}?bytes=${bytes}`, {
      cache: "no-store",
      credentials: "same-origin",
    });
    const body = await response.arrayBuffer();
    const rate = mbps(body.byteLength, performance.now() - start);
    show("down", verdict(rate), `${rate.toFixed(1)} Mbit/s`);
  }

  async function upload() {
    // The box takes at most 64 KiB per request: 16 pieces of 64000 bytes, four at a time.
    const piece = new Uint8Array(64000);
    crypto.getRandomValues(piece);
    const token = document.querySelector('meta[name="csrf-token"]');
    let received = 0;
    let refused = null;
    async function send() {
      const response = await fetch(root.dataset.upload, {
        method: "POST",
        body: piece,
        cache: "no-store",
        credentials: "same-origin",
        headers: {
          "Content-Type": "application/octet-stream",
          "X-CSRF-Token": token ? token.content : "",
        },
      });
      if (!response.ok) {
        refused = response.status;
        return;
      }
      received += (await response.json()).bytes;
    }
    const start = performance.now();
    for (let round = 0; round < 4; round += 1) {
      await Promise.all([send(), send(), send(), send()]);
    }
    if (refused !== null) {
      show("up", "fail", `The box refused the upload (HTTP ${refused}).`);
      return;
    }
    const rate = mbps(received, performance.now() - start);
    show("up", verdict(rate), `${rate.toFixed(1)} Mbit/s`);
  }

  async function upstream() {
    const response = await fetch(root.dataset.upstream, { cache: "no-store", credentials: "same-origin" });
    const link = await response.json();
    if (!link.sync_running) {
      show("upstream", "warn", "The sync service is not running: the visit works, records wait on the box.");
    } else if (!link.upstream) {
      show("upstream", "warn", "No EHR is configured.");
    } else if (!link.online) {
      show("upstream", "warn", `Offline: the visit works here; ${link.waiting} record(s) wait on the box.`);
    } else {
      const rtt = link.rtt_ms === null ? "" : `, round trip ${Math.round(link.rtt_ms)} ms`;
      show("upstream", "ok", `Online (${link.upstream}${rtt})`);
    }
  }

  async function run() {
    $("start").disabled = true;
    show("verdict", "waiting", "Checking…");
    try {
      await devices();
      await speaker();
      await roundTrip();
      await download();
      await upload();
      await upstream();
    } catch (error) {
      show("verdict", "fail", "The check could not finish. Reload the page and try again.");
      $("start").disabled = false;
      return;
    }
    // Name the rows that need attention, as their table headings say them.
    const rows = (state) =>
      Object.entries(results)
        .filter(([id, value]) => id !== "verdict" && value === state)
        .map(([id]) => $(id).closest("tr").querySelector("th").textContent)
        .map((heading) => heading.charAt(0).toLowerCase() + heading.slice(1));
    const failed = rows("fail");
    const warned = rows("warn");
    if (failed.length) {
      show("verdict", "fail", `Not ready: fix ${failed.join(", ")} before paging the provider.`);
    } else if (warned.length) {
      show("verdict", "warn", `Ready, with warnings (${warned.join(", ")}): page the provider.`);
    } else {
      show("verdict", "ok", "Ready: page the provider.");
    }
    $("start").disabled = false;
  }

  $("start").addEventListener("click", run);
})();
