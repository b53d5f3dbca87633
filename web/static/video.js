// The video panel (issue 7): the WebSocket signalling of docs/video.md, plain RTCPeerConnection.
// One publish connection (we offer our camera and microphone, the box answers) and one
// subscribe connection per person we see (the box offers with pc "<publisher>-<n>", we
// answer). Our offers and answers go as soon as they are set; our ICE candidates follow them
// one by one ("candidate"), then an empty one when gathering is done. The box trickles none.
// Data only ever goes into the page through textContent, never innerHTML (CSP + XSS).
"use strict";

(function () {
  const panel = document.getElementById("video");
  if (!panel || typeof RTCPeerConnection === "undefined" || typeof WebSocket === "undefined") {
    return;
  }
  const cfg = panel.dataset;
  const status = document.getElementById("video-status");
  const tiles = document.getElementById("video-tiles");
  const selfTile = document.getElementById("video-self");
  const people = document.getElementById("video-people");
  const buttons = {
    start: document.getElementById("video-start"),
    audio: document.getElementById("video-mute-audio"),
    video: document.getElementById("video-mute-video"),
    leave: document.getElementById("video-leave"),
    end: document.getElementById("video-end"),
  };
  // Every text shown to a person, in English: the same table as web/video_messages.py (a test
  // compares them). The page gives it in its own language as JSON (#video-messages, data
  // only: the CSP runs no inline script); a key the page lacks is shown in English.
  const ENGLISH = {
    "panelTitle": "Video",
    "notStarted": "Not started.",
    "you": "You",
    "start": "Start video",
    "peopleTitle": "In the visit",
    "leave": "Leave the video",
    "end": "End the visit for everyone",
    "nobody": "Nobody yet.",
    "rolePatient": "Patient",
    "roleNurse": "Nurse",
    "roleProvider": "Provider",
    "roleCamera": "Exam camera",
    "isYou": "{name} (you)",
    "presenceWaiting": "waiting to be admitted",
    "presenceAdmitted": "in the visit",
    "mutedAudio": "audio muted",
    "mutedVideo": "video muted",
    "mutedBoth": "audio and video muted",
    "weak": "weak connection: audio only",
    "reconnecting": "connection lost, reconnecting…",
    "admit": "Admit",
    "muteAudio": "Mute audio",
    "unmuteAudio": "Unmute audio",
    "muteVideo": "Mute video",
    "unmuteVideo": "Unmute video",
    "micMute": "Mute my microphone",
    "micUnmute": "Unmute my microphone",
    "cameraOff": "Turn my camera off",
    "cameraOn": "Turn my camera on",
    "paused": "Video paused: weak connection. Audio continues.",
    "sending": "sending {size}",
    "confirmEnd": "End the visit for everyone? It cannot be joined again.",
    "connecting": "Connecting…",
    "startingMedia": "Starting your camera and microphone…",
    "mediaFailed": "Your camera or microphone could not be started ({error}).",
    "connectingVideo": "Connecting the video…",
    "inVisit": "In the visit.",
    "mediaDropped": "The connection dropped. Reconnecting the video…",
    "waiting": "Waiting for the nurse to let you in…",
    "left": "You left the video.",
    "joinedElsewhere": "You joined this visit from another window or device, so this one has left the video.",
    "ended": "The visit has ended.",
    "streamFailed": "A video stream could not be opened ({error}).",
    "refused": "The visit refused that: {message}",
    "seatLost": "Your place in the visit was lost. Joining again…",
    "socketDropped": "The connection to the visit dropped. Reconnecting…",
    "disconnected": "Disconnected.",
    "retaking": "Taking your place in the visit again…"
  };
  const messages = (function () {
    const block = document.getElementById("video-messages");
    try {
      const given = block ? JSON.parse(block.textContent) : null;
      return given && typeof given === "object" ? given : {};
    } catch (error) {
      return {};
    }
  })();
  // The text of key in the page's language, its {placeholders} filled from values (as is:
  // a name, or the box's own message, is never read as a pattern or as markup).
  function t(key, values) {
    const own = Object.prototype.hasOwnProperty.call(messages, key) ? messages[key] : null;
    const text = typeof own === "string" ? own : ENGLISH[key] || key;
    return text.replace(/\{(\w+)\}/g, function (whole, name) {
      return values && Object.prototype.hasOwnProperty.call(values, name) ? String(values[name]) : whole;
    });
  }
  const ROLE_KEYS = { patient: "rolePatient", nurse: "roleNurse", provider: "roleProvider", camera: "roleCamera" };
  // A camera's tile and list entry carry its configured name (the "label" of "participant").
  function nameOf(person) {
    return person.label || (ROLE_KEYS[person.role] ? t(ROLE_KEYS[person.role]) : person.role);
  }
  // A connection "disconnected" this long, or "failed", is rebuilt without leaving the visit
  // (the box replaces only our own connections; docs/video.md, "The WAN leg").
  const RECONNECT_AFTER_MS = 3000;
  const RECONNECT_EVERY_MS = 10000;

  let ws = null;
  let me = null;
  let publishPc = null;
  let localStream = null;
  const roster = new Map(); // participant id -> {role, presence, muted: Set}
  const subscriptions = new Map(); // pc id -> {pc, publisher}
  const remoteTiles = new Map(); // publisher id -> figure
  const pausedFrom = new Set(); // publishers whose video the box paused to us (weak WAN link)
  let statsTimer = null;
  let iceServers = []; // the site's STUN/TURN servers, from "joined"
  let lastReconnect = 0;
  let reconnectTimer = null;
  // When the signalling WebSocket drops, the box keeps our seat (and media) a while: a new
  // socket presents the seat's resume token (from "joined", then each "resumed") and takes
  // it back without being admitted again (docs/video.md, "Resuming after the signalling
  // connection drops"). The token lives in this page's memory; only when the page goes (a
  // reload) is it put in this tab's sessionStorage, for the next page to take at once.
  let resumeToken = null;
  let reloaded = false; // we took the seat over from this tab's previous page
  const SEAT_KEY = "video-seat";
  let closing = false; // we close the socket ourselves (left, ended): nothing to resume
  let socketLostAt = 0;
  let socketAttempts = 0;
  let socketTimer = null;
  let pruneTimer = null;
  const SOCKET_RETRY_MS = [500, 1000, 2000, 4000, 8000]; // then every 8 s
  const SOCKET_GIVE_UP_MS = 120000;

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function send(message) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(message));
    }
  }

  function trickle(pc, pcId) {
    // Sends pc's ICE candidates as it finds them ("candidate", with the connection's pc; none
    // for our publish connection), then an empty one when gathering is done (a TURN relay
    // candidate may take seconds). Those found before the offer or answer went out wait for
    // it: call the function returned once it is sent.
    let waiting = [];
    pc.addEventListener("icecandidate", function (event) {
      if (event.candidate && !event.candidate.candidate) {
        return; // an end of one generation (not Chromium's): the null event ends them all
      }
      const message = { type: "candidate", candidate: "" };
      if (event.candidate) {
        message.candidate = event.candidate.candidate;
        message.sdpMid = event.candidate.sdpMid;
        message.sdpMLineIndex = event.candidate.sdpMLineIndex;
      }
      if (pcId) {
        message.pc = pcId;
      }
      if (waiting) {
        waiting.push(message);
      } else {
        send(message);
      }
    });
    return function described() {
      const queued = waiting || [];
      waiting = null;
      queued.forEach(send);
    };
  }

  function preferVp8(transceiver) {
    // The box forwards VP8 without transcoding (docs/video.md); offer it first.
    if (!RTCRtpSender.getCapabilities || !transceiver.setCodecPreferences) {
      return;
    }
    const codecs = RTCRtpSender.getCapabilities("video").codecs;
    const vp8 = codecs.filter(function (c) {
      return c.mimeType.toLowerCase() === "video/vp8" || c.mimeType.toLowerCase() === "video/rtx";
    });
    if (vp8.length) {
      transceiver.setCodecPreferences(vp8);
    }
  }

  // -- the people in the visit -----------------------------------------------------------

  function button(text, onClick, secondary) {
    const el = document.createElement("button");
    el.type = "button";
    el.textContent = text;
    if (secondary) {
      el.className = "secondary";
    }
    el.addEventListener("click", onClick);
    return el;
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function renderPeople() {
    people.replaceChildren();
    if (!roster.size) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = t("nobody");
      people.append(empty);
    }
    for (const [id, person] of roster) {
      const item = document.createElement("li");
      item.dataset.participant = id;
      item.dataset.role = person.role;
      const name = id === me ? t("isYou", { name: nameOf(person) }) : nameOf(person);
      item.append(span("role", name));
      const presence = t(person.presence === "waiting" ? "presenceWaiting" : "presenceAdmitted");
      item.append(span("presence " + person.presence, presence));
      const muted = Array.from(person.muted).sort();
      if (muted.length) {
        const which = muted.length > 1 ? "mutedBoth" : muted[0] === "audio" ? "mutedAudio" : "mutedVideo";
        item.append(span("muted", t(which)));
      }
      if (person.weak && person.weak.size) {
        item.append(span("weak", t("weak")));
      }
      if (person.reconnecting) {
        item.append(span("reconnecting", t("reconnecting")));
      }
      if (cfg.role === "nurse" && id !== me) {
        const actions = document.createElement("span");
        actions.className = "actions";
        if (person.presence === "waiting") {
          actions.append(button(t("admit"), function () {
            send({ type: "admit", participant: id });
          }));
        } else {
          for (const kind of person.role === "camera" ? ["video"] : ["audio", "video"]) {
            const isMuted = person.muted.has(kind);
            const label = t((isMuted ? "unmute" : "mute") + (kind === "audio" ? "Audio" : "Video"));
            actions.append(button(label, function () {
              send({ type: "mute", participant: id, kind: kind, muted: !isMuted });
            }, true));
          }
        }
        item.append(actions);
      }
      people.append(item);
    }
    refreshOwnButtons();
    for (const [publisher, tile] of remoteTiles) {
      const person = roster.get(publisher);
      if (person) {
        tile.querySelector(".who").textContent = nameOf(person);
      }
    }
  }

  function refreshOwnButtons() {
    const mine = roster.get(me);
    const muted = mine ? mine.muted : new Set();
    buttons.audio.textContent = t(muted.has("audio") ? "micUnmute" : "micMute");
    buttons.video.textContent = t(muted.has("video") ? "cameraOn" : "cameraOff");
  }

  // -- media -----------------------------------------------------------------------------

  async function publish() {
    if (publishPc) {
      return;
    }
    if (!localStream) {
      say(t("startingMedia"));
      try {
        localStream = await navigator.mediaDevices.getUserMedia({
          audio: true,
          video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } },
        });
      } catch (error) {
        say(t("mediaFailed", { error: error.name }), true);
        return;
      }
      selfTile.querySelector("video").srcObject = localStream;
      selfTile.hidden = false;
    }
    const pc = new RTCPeerConnection({ iceServers: iceServers });
    publishPc = pc;
    watchConnection(pc);
    const described = trickle(pc, null);
    for (const track of localStream.getTracks()) {
      const transceiver = pc.addTransceiver(track, {
        direction: "sendonly",
        streams: [localStream],
      });
      if (track.kind === "video") {
        preferVp8(transceiver);
      }
    }
    pc.addEventListener("connectionstatechange", function () {
      if (publishPc === pc && pc.connectionState === "connected") {
        say(t("inVisit"));
      }
    });
    await pc.setLocalDescription(await pc.createOffer());
    if (publishPc !== pc) {
      return; // closed meanwhile (left, or rebuilt by reconnect())
    }
    send({ type: "offer", sdp: pc.localDescription.sdp });
    described();
    say(t("connectingVideo"));
  }

  function watchConnection(pc) {
    pc.addEventListener("connectionstatechange", function () {
      if (pc.connectionState === "failed") {
        reconnect();
      } else if (pc.connectionState === "disconnected") {
        setTimeout(function () {
          if (pc.connectionState === "disconnected" || pc.connectionState === "failed") {
            reconnect();
          }
        }, RECONNECT_AFTER_MS);
      }
    });
  }

  function reconnect() {
    // Our network flapped: ask the box over the signalling (still open) to rebuild the
    // connections that bring us the others, and publish again on a new connection. The
    // others' connections are not touched; nobody leaves or has to be admitted again.
    if (!ws || ws.readyState !== WebSocket.OPEN || !me || !publishPc) {
      return;
    }
    const wait = lastReconnect + RECONNECT_EVERY_MS - Date.now();
    if (wait > 0) {
      if (!reconnectTimer) {
        reconnectTimer = setTimeout(function () {
          reconnectTimer = null;
          const pcs = [publishPc].concat(Array.from(subscriptions.values(), function (f) {
            return f.pc;
          }));
          if (pcs.some(function (pc) {
            return pc && pc.connectionState !== "connected" && pc.connectionState !== "closed";
          })) {
            reconnect();
          }
        }, wait);
      }
      return;
    }
    lastReconnect = Date.now();
    say(t("mediaDropped"));
    send({ type: "reconnect" });
    publishPc.close();
    publishPc = null;
    publish();
  }

  function tileFor(publisher) {
    let tile = remoteTiles.get(publisher);
    if (!tile) {
      tile = document.createElement("figure");
      tile.className = "video-tile remote";
      tile.dataset.publisher = publisher;
      const video = document.createElement("video");
      video.autoplay = true;
      video.playsInline = true;
      const caption = document.createElement("figcaption");
      caption.append(span("who", ""), span("stats", ""));
      tile.append(video, caption);
      tiles.append(tile);
      remoteTiles.set(publisher, tile);
      showPaused(publisher);
    }
    return tile;
  }

  function showPaused(publisher) {
    // The box stopped this publisher's video to us (our link is too weak); audio goes on.
    const tile = remoteTiles.get(publisher);
    if (!tile) {
      return;
    }
    let notice = tile.querySelector(".video-notice");
    if (pausedFrom.has(publisher)) {
      if (!notice) {
        notice = document.createElement("p");
        notice.className = "video-notice";
        notice.setAttribute("role", "status");
        tile.insertBefore(notice, tile.querySelector("figcaption"));
        // Filled once it is in the page: screen readers announce a live region's changes,
        // not a region that arrives with its text already in it.
        const shown = notice;
        setTimeout(function () {
          shown.textContent = t("paused");
        }, 100);
      }
      tile.classList.add("paused");
    } else {
      if (notice) {
        notice.remove();
      }
      tile.classList.remove("paused");
    }
  }

  function dropTile(publisher) {
    pausedFrom.delete(publisher);
    const tile = remoteTiles.get(publisher);
    if (tile) {
      tile.remove();
      remoteTiles.delete(publisher);
    }
  }

  function closeSubscription(pcId) {
    const found = subscriptions.get(pcId);
    if (found) {
      found.pc.close();
      subscriptions.delete(pcId);
    }
  }

  async function subscribe(pcId, sdp) {
    const publisher = pcId.split("-")[0];
    for (const [id, found] of subscriptions) {
      if (found.publisher === publisher && id !== pcId) {
        closeSubscription(id); // replaced (after an unmute)
      }
    }
    const pc = new RTCPeerConnection({ iceServers: iceServers });
    watchConnection(pc);
    const described = trickle(pc, pcId);
    const stream = new MediaStream();
    subscriptions.set(pcId, { pc: pc, publisher: publisher });
    const tile = tileFor(publisher);
    const video = tile.querySelector("video");
    video.srcObject = stream;
    pc.addEventListener("track", function (event) {
      stream.addTrack(event.track);
      video.play().catch(function () {});
    });
    await pc.setRemoteDescription({ type: "offer", sdp: sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    send({ type: "answer", sdp: pc.localDescription.sdp, pc: pcId });
    described();
    renderPeople();
  }

  async function updateStats() {
    for (const [, found] of subscriptions) {
      const stats = await found.pc.getStats();
      stats.forEach(function (report) {
        if (report.type === "inbound-rtp" && report.kind === "video") {
          const tile = remoteTiles.get(found.publisher);
          if (!tile) {
            return;
          }
          const before = Number(tile.dataset.framesDecoded || 0);
          tile.dataset.framesDecoded = String(Math.max(before, report.framesDecoded || 0));
          const size = report.frameWidth ? report.frameWidth + "×" + report.frameHeight : "";
          const fps = report.framesPerSecond ? Math.round(report.framesPerSecond) + " fps" : "";
          tile.querySelector(".stats").textContent = [size, fps].filter(Boolean).join(", ");
        }
      });
    }
    if (publishPc) {
      const stats = await publishPc.getStats();
      stats.forEach(function (report) {
        if (report.type === "outbound-rtp" && report.kind === "video") {
          selfTile.dataset.framesEncoded = String(report.framesEncoded || 0);
          const size = report.frameWidth ? report.frameWidth + "×" + report.frameHeight : "";
          selfTile.querySelector(".stats").textContent = size ? t("sending", { size: size }) : "";
        }
      });
    }
  }

  function stopAll() {
    for (const id of Array.from(subscriptions.keys())) {
      closeSubscription(id);
    }
    for (const publisher of Array.from(remoteTiles.keys())) {
      dropTile(publisher);
    }
    if (publishPc) {
      publishPc.close();
      publishPc = null;
    }
    if (reconnectTimer) {
      clearTimeout(reconnectTimer);
      reconnectTimer = null;
    }
    if (localStream) {
      localStream.getTracks().forEach(function (track) {
        track.stop();
      });
      localStream = null;
    }
    selfTile.hidden = true;
    if (statsTimer) {
      clearInterval(statsTimer);
      statsTimer = null;
    }
  }

  // -- signalling ------------------------------------------------------------------------

  function handle(message) {
    switch (message.type) {
      case "joined":
        me = message.participant;
        resumeToken = message.resume || null;
        iceServers = Array.isArray(message.iceServers) ? message.iceServers : [];
        roster.set(me, { role: message.role, presence: message.presence, muted: new Set() });
        if (message.presence === "admitted") {
          publish();
        } else {
          say(t("waiting"));
        }
        break;
      case "participant":
        // Someone joined, or (to a newcomer, or after "resumed") is there already, with
        // their mutes and whether their own connection is down.
        roster.set(message.participant, {
          role: message.role,
          presence: message.presence,
          muted: new Set(message.muted || []),
          reconnecting: Boolean(message.reconnecting),
          label: message.label,
        });
        if (message.role === "camera") {
          // exam_camera.js: a camera shown from the other page (or before a reload) is
          // offered as "Stop" here too
          document.dispatchEvent(new CustomEvent("video:camera-joined", { detail: { label: message.label } }));
        }
        break;
      case "admitted": {
        const person = roster.get(message.participant);
        if (person) {
          person.presence = "admitted";
        }
        if (message.participant === me) {
          publish();
        }
        break;
      }
      case "muted": {
        const person = roster.get(message.participant);
        if (person) {
          if (message.muted) {
            person.muted.add(message.kind);
          } else {
            person.muted.delete(message.kind);
          }
        }
        if (message.participant === me && localStream) {
          localStream.getTracks().forEach(function (track) {
            if (track.kind === message.kind) {
              track.enabled = !message.muted;
            }
          });
        }
        break;
      }
      case "resumed":
        resumed(message);
        break;
      case "reconnecting": {
        const person = roster.get(message.participant);
        if (person) {
          person.reconnecting = Boolean(message.reconnecting);
        }
        break;
      }
      case "left":
        if (message.participant === me) {
          stopAll();
          roster.clear();
          say(t("left"));
          closing = true;
          ws.close();
        } else {
          const leaving = roster.get(message.participant);
          if (leaving && leaving.role === "camera") {
            // exam_camera.js offers to show it again
            document.dispatchEvent(new CustomEvent("video:camera-left", { detail: { label: leaving.label } }));
          }
          roster.delete(message.participant);
          for (const person of roster.values()) {
            if (person.weak) {
              person.weak.delete(message.participant);
            }
          }
          for (const [id, found] of subscriptions) {
            if (found.publisher === message.participant) {
              closeSubscription(id);
            }
          }
          dropTile(message.participant);
        }
        break;
      case "ended":
        stopAll();
        roster.clear();
        say(t("ended"));
        closing = true;
        ws.close();
        break;
      case "offer":
        if (message.pc) {
          subscribe(message.pc, message.sdp).catch(function (error) {
            say(t("streamFailed", { error: error.name }), true);
          });
        }
        break;
      case "answer":
        if (!message.pc && publishPc) {
          publishPc.setRemoteDescription({ type: "answer", sdp: message.sdp });
        }
        break;
      case "video_paused": {
        const viewer = roster.get(message.viewer);
        if (viewer) {
          viewer.weak = viewer.weak || new Set();
          if (message.paused) {
            viewer.weak.add(message.publisher);
          } else {
            viewer.weak.delete(message.publisher);
          }
        }
        if (message.viewer === me) {
          if (message.paused) {
            pausedFrom.add(message.publisher);
          } else {
            pausedFrom.delete(message.publisher);
          }
          showPaused(message.publisher);
        }
        break;
      }
      case "error":
        if (message.code === "resume_refused") {
          rejoin();
          break;
        }
        if (message.code === "joined_elsewhere") {
          // The same sign-in or link joined from another window or device: that one has the
          // seat. Stop here and do not join back (the two would take it from each other).
          stopAll();
          roster.clear();
          say(t("joinedElsewhere"), true);
          closing = true;
          ws.close();
          break;
        }
        if (message.code === "invalid_candidate") {
          break; // one candidate the box cannot use (the others may still connect): no call ends
        }
        say(t("refused", { message: message.message }), true);
        break;
      default:
        break;
    }
    renderPeople();
  }

  // -- the signalling socket, and taking the seat back after it drops ---------------------

  function mediaBroken() {
    // Our publish offer unanswered (the answer went to the dead socket), or a connection
    // down: the network went with the socket, so the media legs are rebuilt.
    if (publishPc && publishPc.signalingState !== "stable") {
      return true;
    }
    const pcs = [publishPc].concat(Array.from(subscriptions.values(), function (found) {
      return found.pc;
    }));
    return pcs.some(function (pc) {
      return pc && ["failed", "disconnected", "closed"].includes(pc.connectionState);
    });
  }

  function resumed(message) {
    // Our seat on the new socket, without being admitted again. The box follows with who is
    // there now (so the list starts over) and sends again the offers we missed.
    socketLostAt = 0;
    socketAttempts = 0;
    const wasReloaded = reloaded;
    reloaded = false;
    resumeToken = message.resume || null;
    iceServers = Array.isArray(message.iceServers) ? message.iceServers : iceServers;
    const muted = new Set(message.muted || []);
    roster.clear();
    roster.set(me, { role: message.role, presence: message.presence, muted: muted });
    pausedFrom.clear(); // told again ("video_paused") for what is still paused
    for (const publisher of remoteTiles.keys()) {
      showPaused(publisher);
    }
    if (localStream) {
      localStream.getTracks().forEach(function (track) {
        track.enabled = !muted.has(track.kind);
      });
    }
    if (pruneTimer) {
      clearTimeout(pruneTimer);
    }
    pruneTimer = setTimeout(function () {
      // Whoever left while we were away has no place in the list any more: drop their tiles.
      pruneTimer = null;
      for (const publisher of Array.from(remoteTiles.keys())) {
        if (!roster.has(publisher)) {
          for (const [id, found] of subscriptions) {
            if (found.publisher === publisher) {
              closeSubscription(id);
            }
          }
          dropTile(publisher);
        }
      }
    }, 1500);
    if (message.presence !== "admitted") {
      say(t("waiting"));
    } else if (!publishPc) {
      if (wasReloaded) {
        // The box's connections to us ended with the previous page: offered again (new pcs).
        send({ type: "reconnect" });
      }
      publish();
    } else if (mediaBroken()) {
      reconnect();
    } else {
      say(t("inVisit"));
    }
  }

  function rejoin() {
    // The seat is gone (away too long, or the box restarted): join again, as a new arrival.
    resumeToken = null;
    reloaded = false;
    stopAll();
    roster.clear();
    me = null;
    say(t("seatLost"));
    send({ type: "join", visit: cfg.visit, role: cfg.role, token: cfg.token });
    statsTimer = setInterval(updateStats, 1000);
  }

  function showControls(live) {
    for (const key of ["audio", "video", "leave", "end"]) {
      if (buttons[key]) {
        buttons[key].hidden = !live;
      }
    }
    buttons.start.hidden = live;
  }

  function connect(resuming) {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + location.host + cfg.ws);
    ws = socket;
    socket.addEventListener("open", function () {
      if (resuming) {
        send({ type: "resume", visit: cfg.visit, participant: me, token: resumeToken });
        return;
      }
      // The page around the panel may listen (the kiosk suspends its idle reset meanwhile).
      panel.dispatchEvent(new CustomEvent("videocall", { bubbles: true, detail: { live: true } }));
      send({ type: "join", visit: cfg.visit, role: cfg.role, token: cfg.token });
      showControls(true);
      statsTimer = setInterval(updateStats, 1000);
    });
    socket.addEventListener("message", function (event) {
      handle(JSON.parse(event.data));
    });
    socket.addEventListener("close", function () {
      if (socket === ws) {
        socketClosed();
      }
    });
  }

  function socketClosed() {
    // Not our doing (a network outage, a sleeping laptop): keep the camera, the media
    // connections and the call, and try new sockets, backing off, with jitter so that the
    // pages of one clinic do not all come back at the same instant.
    if (!closing && me && resumeToken) {
      socketLostAt = socketLostAt || Date.now();
      if (Date.now() - socketLostAt < SOCKET_GIVE_UP_MS) {
        const base = SOCKET_RETRY_MS[Math.min(socketAttempts, SOCKET_RETRY_MS.length - 1)];
        socketAttempts += 1;
        say(t("socketDropped"));
        socketTimer = setTimeout(function () {
          socketTimer = null;
          connect(true);
        }, base / 2 + Math.random() * (base / 2));
        return;
      }
    }
    panel.dispatchEvent(new CustomEvent("videocall", { bubbles: true, detail: { live: false } }));
    stopAll();
    roster.clear();
    renderPeople();
    me = null;
    resumeToken = null;
    reloaded = false;
    socketLostAt = 0;
    socketAttempts = 0;
    showControls(false);
    if (!status.classList.contains("error") && status.textContent !== t("ended")) {
      say(t("disconnected"));
    }
  }

  function start() {
    say(t("connecting"));
    closing = false;
    if (socketTimer) {
      clearTimeout(socketTimer);
      socketTimer = null;
    }
    buttons.start.hidden = true;
    connect(false);
  }

  // -- taking the seat back after a reload ------------------------------------------------

  function keepSeat() {
    // The page goes (reload, or away and back) while in the visit: the next page of this tab
    // takes the seat back within the box's grace period. Nothing is kept after leave or end.
    if (closing || !me || !resumeToken) {
      return;
    }
    const seat = { ws: cfg.ws, visit: cfg.visit, role: cfg.role, participant: me, token: resumeToken };
    try {
      sessionStorage.setItem(SEAT_KEY, JSON.stringify(seat));
    } catch (error) {
      // Storage refused (private mode, quota): a reload joins afresh through admission.
    }
  }

  function takeSeat() {
    // Taken out at once: the token is in storage only between two pages of this tab, so a
    // tab duplicated during the call copies none (the box would give the seat to that tab).
    let seat = null;
    try {
      const raw = sessionStorage.getItem(SEAT_KEY);
      sessionStorage.removeItem(SEAT_KEY);
      seat = raw ? JSON.parse(raw) : null;
    } catch (error) {
      return null;
    }
    if (
      !seat || seat.ws !== cfg.ws || seat.visit !== cfg.visit || seat.role !== cfg.role ||
      typeof seat.participant !== "string" || typeof seat.token !== "string"
    ) {
      return null;
    }
    return seat;
  }

  function restore(seat) {
    // As start(), but the first socket resumes the seat (no admission). If the box refuses
    // ("resume_refused": away too long, or the box restarted), rejoin() joins afresh.
    me = seat.participant;
    resumeToken = seat.token;
    reloaded = true;
    closing = false;
    say(t("retaking"));
    panel.dispatchEvent(new CustomEvent("videocall", { bubbles: true, detail: { live: true } }));
    showControls(true);
    statsTimer = setInterval(updateStats, 1000);
    connect(true);
  }

  window.addEventListener("pagehide", keepSeat);
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) {
      // Back from the back-forward cache: this page still holds its seat in memory.
      try {
        sessionStorage.removeItem(SEAT_KEY);
      } catch (error) {
        // nothing stored
      }
    }
  });

  buttons.start.addEventListener("click", start);
  buttons.audio.addEventListener("click", function () {
    const mine = roster.get(me);
    send({ type: "mute", participant: me, kind: "audio", muted: !(mine && mine.muted.has("audio")) });
  });
  buttons.video.addEventListener("click", function () {
    const mine = roster.get(me);
    send({ type: "mute", participant: me, kind: "video", muted: !(mine && mine.muted.has("video")) });
  });
  buttons.leave.addEventListener("click", function () {
    send({ type: "leave" });
  });
  if (buttons.end) {
    buttons.end.addEventListener("click", function () {
      if (window.confirm(t("confirmEnd"))) {
        send({ type: "end" });
      }
    });
  }
  const seat = takeSeat();
  if (seat) {
    restore(seat);
  }
})();
