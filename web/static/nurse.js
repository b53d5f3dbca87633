// The live arrivals queue and vitals of /nurse/: applies "arrival" and "observation" events
// from /nurse/events, and keeps the waiting times ticking.
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

  const pending = {};

  function apply(reading) {
    const row = findRow(reading.patient_id);
    let name = "Patient not in today's list";
    if (row) {
      name = row.querySelector(".name").textContent;
      pressureCell(row.querySelector(".bp"), reading);
      row.querySelector(".time").textContent = reading.effective_display;
      flash(row);
    }
    if (!row) {
      pending[reading.patient_id] = reading; // shown in their row once they arrive
    }
    const item = document.createElement("li");
    item.dataset.patientId = reading.patient_id;
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

  // -- arrivals --------------------------------------------------------------------------
  const arrivals = document.getElementById("arrivals");
  const arrivalsBody = arrivals ? arrivals.querySelector("tbody") : null;
  const arrivalsEmpty = document.getElementById("arrivals-empty");
  const arrivalsCount = document.getElementById("arrivals-count");
  const LONG_WAIT_MIN = 30;

  function cell(className, text) {
    const td = document.createElement("td");
    td.className = className;
    td.textContent = text;
    return td;
  }

  function link(href, text, className) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (className) {
      a.className = className;
    }
    return a;
  }

  function yesNo(className, count, withCount) {
    const text = count ? (withCount ? "Yes (" + count + ")" : "Yes") : "No";
    return cell(className + " " + (count ? "yes" : "no"), text);
  }

  function waitingText(arrivedEpoch) {
    const minutes = Math.max(0, Math.floor((Date.now() / 1000 - arrivedEpoch) / 60));
    return minutes;
  }

  function setWaiting(row) {
    const td = row.querySelector(".waiting");
    const minutes = waitingText(Number(row.dataset.arrived));
    td.textContent = minutes + " min";
    td.classList.toggle("long", minutes >= LONG_WAIT_MIN);
  }

  function arrivalRow(a) {
    const row = document.createElement("tr");
    row.dataset.encounterId = a.encounter_id;
    row.dataset.patientId = a.patient_id;
    row.dataset.arrived = String(a.arrived_epoch);
    const nameCell = cell("name", "");
    nameCell.append(link(a.chart_url, a.name));
    const chartCell = document.createElement("td");
    chartCell.append(
      link(a.chart_url, "Open chart", "open-chart"),
      document.createTextNode(" · "),
      link(a.video_url, "Video", "open-video"),
    );
    row.append(
      nameCell,
      cell("time arrived", a.arrived_display),
      cell("station", a.station),
      yesNo("intake", a.intake, false),
      yesNo("consent", a.consent, false),
      yesNo("vitals", a.vitals, true),
      cell("photos", String(a.photos)),
      cell("num waiting", a.waiting_minutes + " min"),
      chartCell,
    );
    return row;
  }

  function applyArrival(a) {
    if (!arrivalsBody) {
      return;
    }
    const fresh = arrivalRow(a);
    let existing = null;
    for (const row of arrivalsBody.children) {
      if (row.dataset.encounterId === a.encounter_id) {
        existing = row;
      }
    }
    if (a.status !== "arrived" && a.status !== "in-progress") {
      if (existing) {
        existing.remove();
      }
    } else if (existing) {
      existing.replaceWith(fresh);
      flash(fresh);
    } else {
      arrivalsBody.append(fresh); // the queue is oldest first: a new arrival goes last
      flash(fresh);
    }
    setWaiting(fresh);
    const count = arrivalsBody.children.length;
    arrivals.hidden = count === 0;
    arrivalsEmpty.hidden = count !== 0;
    arrivalsCount.textContent = String(count);
    ensurePatient(a);
  }

  // A patient who just arrived gets a row in "today's patients" for their readings.
  function ensurePatient(a) {
    const table = document.getElementById("patients");
    if (!table || findRow(a.patient_id)) {
      return;
    }
    const row = document.createElement("tr");
    row.dataset.patientId = a.patient_id;
    const nameCell = cell("name", "");
    nameCell.append(link(a.chart_url, a.name));
    row.append(nameCell, cell("", ""), cell("num bp empty", "No reading"), cell("time", ""));
    table.querySelector("tbody").append(row);
    table.hidden = false;
    const reading = pending[a.patient_id];
    if (reading) {
      pressureCell(row.querySelector(".bp"), reading);
      row.querySelector(".time").textContent = reading.effective_display;
      delete pending[a.patient_id];
    }
    for (const item of latest.children) {
      if (item.dataset.patientId === a.patient_id) {
        item.querySelector(".name").textContent = a.name;
      }
    }
    const empty = document.getElementById("patients-empty");
    if (empty) {
      empty.hidden = true;
    }
  }

  if (arrivalsBody) {
    window.setInterval(function () {
      for (const row of arrivalsBody.children) {
        setWaiting(row);
      }
    }, 30000);
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
  source.addEventListener("arrival", function (event) {
    let arrival;
    try {
      arrival = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    applyArrival(arrival);
  });
  source.addEventListener("expired", function () {
    source.close();
    setLive(false, "Logged out");
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  });
})();
