// The provider view: this visit's readings arrive live from /visit/<token>/events.
// Data only ever goes into the page through textContent, never innerHTML (CSP + XSS).
"use strict";

(function () {
  const list = document.getElementById("vitals");
  const live = document.getElementById("live");
  if (!list || !live || typeof EventSource === "undefined") {
    return;
  }
  const label = live.querySelector(".label");
  const empty = document.getElementById("vitals-empty");

  function setLive(on, text) {
    live.classList.toggle("on", on);
    live.classList.toggle("off", !on);
    label.textContent = text;
  }

  function span(className, text) {
    const el = document.createElement("span");
    el.className = className;
    el.textContent = text;
    return el;
  }

  function known(id) {
    for (const item of list.children) {
      if (item.dataset.id === id) {
        return true;
      }
    }
    return false;
  }

  const source = new EventSource(list.dataset.events);
  source.addEventListener("open", function () {
    setLive(true, "Live");
  });
  source.addEventListener("error", function () {
    setLive(false, "Reconnecting…");
  });
  source.addEventListener("reading", function (event) {
    const reading = JSON.parse(event.data);
    if (known(reading.id)) {
      return;
    }
    const item = document.createElement("li");
    item.dataset.id = reading.id;
    item.className = "fresh";
    item.append(
      span("label", reading.label),
      document.createTextNode(" "),
      span("value", reading.value),
      document.createTextNode(" "),
      span("time", reading.time),
    );
    list.append(item);
    if (empty) {
      empty.hidden = true;
    }
  });
  source.addEventListener("ended", function () {
    source.close();
    setLive(false, "Link ended");
    document.body.classList.add("provider-ended");
    const button = document.getElementById("complete");
    if (button) {
      button.disabled = true;
    }
  });
})();
