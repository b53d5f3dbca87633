// Exam camera stills and live cameras on the nurse's video page and on the remote provider's
// visit page (web/video.py): one POST per click, the call on the page goes on. The section's
// data- attributes say where to post (data-url: a still, data-stream-url: live) and what
// to send beside the camera: the nurse's page names its visit (data-visit) and sends the
// session's token (the csrf-token meta); the provider's page sends its link's form token
// (data-visit-csrf) and no visit (the link's own is used). Text reaches the page through
// textContent only.
"use strict";

(function () {
  const section = document.getElementById("exam-cameras");
  if (!section) {
    return;
  }
  const status = document.getElementById("exam-camera-status");
  const token = document.querySelector('meta[name="csrf-token"]');

  // The form of one request: the camera, what the section says to send, and ``extra``.
  function form(camera, extra) {
    const body = new URLSearchParams({ camera: camera, ...extra });
    if (section.dataset.visit) {
      body.set("visit", section.dataset.visit);
    }
    if (section.dataset.visitCsrf) {
      body.set("visit_csrf", section.dataset.visitCsrf);
    }
    return body;
  }

  // POST ``body`` to ``url``: the response and its JSON answer ({} when it is not JSON).
  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      body: body,
      credentials: "same-origin",
      headers: { "X-CSRF-Token": token ? token.content : "" },
    });
    const answer = await response.json().catch(() => ({}));
    return [response, answer];
  }

  async function take(button) {
    const camera = button.dataset.camera;
    button.disabled = true;
    status.textContent = `Taking a still from the ${camera}…`;
    const body = form(camera, {});
    try {
      const [response, answer] = await post(section.dataset.url, body);
      if (response.ok) {
        // The clinic's time (data-zone), as the page's other times: a remote provider's own
        // zone would disagree with them.
        const time = new Date().toLocaleTimeString([], {
          hour: "2-digit",
          minute: "2-digit",
          hourCycle: "h23",
          timeZone: section.dataset.zone || undefined,
        });
        status.textContent = `Still from the ${camera} saved at ${time}.`;
      } else {
        status.textContent = answer.error
          ? `No still: ${answer.error}`
          : `No still (HTTP ${response.status}).`;
      }
    } catch (error) {
      status.textContent = "No still: the box did not answer.";
    } finally {
      button.disabled = false;
    }
  }

  // Show a camera live in the visit, or stop showing it (web/video.py _exam_camera): the
  // devices process publishes it; everyone in the visit gets a tile named after the camera.
  async function toggleStream(button) {
    const camera = button.dataset.stream;
    const showing = button.dataset.showing === "true";
    button.disabled = true;
    status.textContent = showing ? `Stopping the ${camera}…` : `Starting the ${camera}…`;
    const body = form(camera, { action: showing ? "stop" : "start" });
    try {
      const [response, answer] = await post(section.dataset.streamUrl, body);
      if (response.ok) {
        button.dataset.showing = showing ? "false" : "true";
        button.textContent = showing ? `Show ${camera} in the visit` : "Stop showing it";
        status.textContent = showing
          ? `The ${camera} is no longer shown.`
          : `The ${camera} is shown in the visit.`;
      } else {
        status.textContent = answer.error
          ? `Not shown: ${answer.error}`
          : `Not shown (HTTP ${response.status}).`;
      }
    } catch (error) {
      status.textContent = "Not shown: the box did not answer.";
    } finally {
      button.disabled = false;
    }
  }

  for (const button of section.querySelectorAll("button[data-camera]")) {
    button.addEventListener("click", () => take(button));
  }
  for (const button of section.querySelectorAll("button[data-stream]")) {
    button.addEventListener("click", () => toggleStream(button));
  }
  // The page comes with each button as the camera stood when it loaded (data-showing, from
  // the box's camera_streams). The camera came into the visit from elsewhere since (the other
  // page): video.js tells us, and the button offers to stop it.
  document.addEventListener("video:camera-joined", (event) => {
    for (const button of section.querySelectorAll("button[data-stream]")) {
      if (button.dataset.stream === event.detail.label && button.dataset.showing !== "true") {
        button.dataset.showing = "true";
        button.textContent = "Stop showing it";
      }
    }
  });
  // The camera left the visit without the button (the visit ended, the devices service
  // stopped, the other page stopped it): video.js tells us, and the button offers to show it
  // again.
  document.addEventListener("video:camera-left", (event) => {
    for (const button of section.querySelectorAll("button[data-stream]")) {
      if (button.dataset.stream === event.detail.label && button.dataset.showing === "true") {
        button.dataset.showing = "false";
        button.textContent = `Show ${button.dataset.stream} in the visit`;
      }
    }
  });
})();
