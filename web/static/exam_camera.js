// Exam camera stills on the nurse's video page (web/video.py take_exam_still): one POST per
// click, the call on the page goes on. Text reaches the page through textContent only.
"use strict";

(function () {
  const section = document.getElementById("exam-cameras");
  if (!section) {
    return;
  }
  const status = document.getElementById("exam-camera-status");
  const token = document.querySelector('meta[name="csrf-token"]');

  async function take(button) {
    const camera = button.dataset.camera;
    button.disabled = true;
    status.textContent = `Taking a still from the ${camera}…`;
    const body = new URLSearchParams({ visit: section.dataset.visit, camera: camera });
    try {
      const response = await fetch(section.dataset.url, {
        method: "POST",
        body: body,
        credentials: "same-origin",
        headers: { "X-CSRF-Token": token ? token.content : "" },
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) {
        const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
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

  for (const button of section.querySelectorAll("button[data-camera]")) {
    button.addEventListener("click", () => take(button));
  }
})();
