// Live vitals for the nurse screen: applies "observation" events from /nurse/events.
// Data only ever goes into the page through textContent, never innerHTML (CSP + XSS).
"use strict";

(function () {
  const MAX_LATEST = 20;
  const live = document.getElementById("live");
  if (!live || typeof EventSource === "undefined") {
    return;
  }
  const liveLabel = live.querySelector(".label");
  const latest = document.getElementById("latest");
  const latestEmpty = document.getElementById("latest-empty");

  function setLive(on, text) {
    live.classList.toggle("on", on);
    live.classList.toggle("off", !on);
    liveLabel.textContent = text;
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function pressureCell(cell, reading) {
    cell.replaceChildren(
      document.createTextNode(reading.display + " "),
      span("unit", reading.unit),
    );
    cell.classList.remove("empty");
  }

  function findRow(patientId) {
    const rows = document.querySelectorAll("#patients tbody tr");
    for (const row of rows) {
      if (row.dataset.patientId === patientId) {
        return row;
      }
    }
    return null;
  }

  function flash(el) {
    el.classList.remove("fresh");
    void el.offsetWidth; // restart the CSS animation
    el.classList.add("fresh");
  }

  function apply(reading) {
    const row = findRow(reading.patient_id);
    let name = "Patient not on this list (reload)";
    if (row) {
      name = row.querySelector(".name").textContent;
      pressureCell(row.querySelector(".bp"), reading);
      row.querySelector(".time").textContent = reading.effective_display;
      flash(row);
    }
    const item = document.createElement("li");
    const bp = span("bp", "");
    pressureCell(bp, reading);
    item.append(span("time", reading.effective_display), span("name", name), bp);
    latest.prepend(item);
    flash(item);
    while (latest.children.length > MAX_LATEST) {
      latest.lastElementChild.remove();
    }
    if (latestEmpty) {
      latestEmpty.hidden = true;
    }
  }

  const source = new EventSource(live.dataset.events);
  source.addEventListener("open", function () {
    setLive(true, "Live");
  });
  source.addEventListener("error", function () {
    // The browser reconnects by itself (sending Last-Event-ID); grey until it does.
    setLive(false, "Disconnected – retrying");
  });
  source.addEventListener("observation", function (event) {
    let reading;
    try {
      reading = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    apply(reading);
  });
  source.addEventListener("expired", function () {
    source.close();
    setLive(false, "Logged out");
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  });
})();
