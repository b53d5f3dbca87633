// Live RPM worklist: applies "alert" events from /rpm/events to the alerts table.
// Data only ever goes into the page through textContent and attributes, never innerHTML
// (CSP + XSS). New rows are clones of the <template> the server rendered (with the CSRF
// token already in its forms).
"use strict";

(function () {
  const live = document.getElementById("live");
  const table = document.getElementById("alerts");
  const template = document.getElementById("alert-row-template");
  if (!live || !table || !template || typeof EventSource === "undefined") {
    return;
  }
  const liveLabel = live.querySelector(".label");
  const body = table.tBodies[0];
  const empty = document.getElementById("alerts-empty");
  const announce = document.getElementById("announce");
  const filter = table.dataset.setting || "";

  function setLive(on, text) {
    live.classList.toggle("on", on);
    live.classList.toggle("off", !on);
    liveLabel.textContent = text;
  }

  function findRow(id) {
    for (const row of body.rows) {
      if (row.dataset.alertId === String(id)) {
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

  function capitalise(text) {
    return text ? text.charAt(0).toUpperCase() + text.slice(1) : "—";
  }

  function setClasses(row, alert) {
    for (const name of Array.from(row.classList)) {
      if (name.startsWith("sev-") || name.startsWith("is-")) {
        row.classList.remove(name);
      }
    }
    row.classList.add("sev-" + alert.severity, "is-" + alert.state);
    const badge = row.querySelector(".sev-badge");
    badge.className = "sev-badge sev-" + alert.severity;
    const state = row.querySelector(".alert-state");
    state.className = "alert-state is-" + alert.state;
  }

  function fill(row, alert) {
    row.dataset.alertId = String(alert.id);
    row.dataset.rank = String(alert.rank);
    row.dataset.opened = alert.opened_at;
    row.dataset.setting = alert.setting || "";
    setClasses(row, alert);
    row.querySelector(".sev-label").textContent = alert.severity_label;
    const patient = row.querySelector(".patient");
    if (alert.patient_url) {
      const link = document.createElement("a");
      link.href = alert.patient_url;
      link.textContent = alert.patient_name;
      patient.replaceChildren(link);
    } else {
      // A site-level alert (a sync backlog): about the appliance, no patient to link to.
      const site = document.createElement("span");
      site.className = "site-alert";
      site.title = "About the appliance, not a patient";
      site.textContent = alert.patient_name;
      patient.replaceChildren(site);
    }
    row.querySelector(".title").textContent = alert.title;
    row.querySelector(".summary").textContent = alert.summary;
    row.querySelector(".values").textContent = alert.values || "—";
    row.querySelector(".time").textContent = alert.since;
    row.querySelector(".age").textContent = alert.age;
    row.querySelector(".place").textContent = capitalise(alert.setting);
    row.querySelector(".taken").textContent = alert.taken_at || "";
    row.querySelector(".alert-state").textContent = alert.state_label;
    const ack = row.querySelector(".act-ack");
    if (ack) {
      ack.hidden = alert.state === "acknowledged";
    }
  }

  function wire(row, id) {
    // A cloned row's forms point at alert 0: give them this alert's actions and ids.
    for (const form of row.querySelectorAll("form")) {
      form.action = form.getAttribute("action").replace("/alerts/0/", "/alerts/" + id + "/");
    }
    for (const el of row.querySelectorAll("[id]")) {
      el.id = el.id.replace(/-0$/, "-" + id);
    }
    for (const label of row.querySelectorAll("label[for]")) {
      label.htmlFor = label.htmlFor.replace(/-0$/, "-" + id);
    }
  }

  function before(a, row) {
    // Worklist order: most severe first, then oldest, then lowest id.
    const rank = Number(row.dataset.rank);
    if (a.rank !== rank) {
      return a.rank > rank;
    }
    if (a.opened_at !== row.dataset.opened) {
      return a.opened_at < row.dataset.opened;
    }
    return a.id < Number(row.dataset.alertId);
  }

  function place(row, alert) {
    for (const other of body.rows) {
      if (other !== row && before(alert, other)) {
        body.insertBefore(row, other);
        return;
      }
    }
    body.appendChild(row);
  }

  function refreshEmpty() {
    if (empty) {
      empty.hidden = body.rows.length > 0;
    }
  }

  function apply(alert) {
    let row = findRow(alert.id);
    const wanted = alert.live && (!filter || alert.setting === filter);
    if (!wanted) {
      if (row) {
        row.remove();
        announce.textContent = alert.title + " for " + alert.patient_name + ": " + alert.state_label;
      }
      refreshEmpty();
      return;
    }
    const isNew = !row;
    if (isNew) {
      row = template.content.firstElementChild.cloneNode(true);
      wire(row, alert.id);
    }
    fill(row, alert);
    place(row, alert);
    flash(row);
    refreshEmpty();
    if (isNew) {
      announce.textContent =
        "New " + alert.severity_label.toLowerCase() + " alert: " + alert.title + " for " +
        alert.patient_name;
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
  source.addEventListener("alert", function (event) {
    let alert;
    try {
      alert = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    apply(alert);
  });
  source.addEventListener("expired", function () {
    source.close();
    setLive(false, "Logged out");
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  });
})();
