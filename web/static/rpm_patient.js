// A patient's RPM trend charts: fetches series.json and draws each vital with uPlot
// (vendored under static/vendor/uplot). Home and clinic readings are told apart by line
// style and point shape, not colour alone; the patient's thresholds are drawn as lines.
// Nothing is written into the page as HTML: text goes through textContent (CSP + XSS).
"use strict";

(function () {
  const root = document.getElementById("rpm-patient");
  if (!root) {
    return;
  }

  // The filter applies as soon as it changes (the Show button works without script).
  const filter = document.getElementById("chart-filter");
  if (filter) {
    for (const select of filter.querySelectorAll("select")) {
      select.addEventListener("change", () => filter.requestSubmit());
    }
  }

  if (typeof uPlot === "undefined" || !root.dataset.seriesUrl) {
    return;
  }

  const COLOURS = {
    systolic: "#0b5394",
    diastolic: "#0f7d6e",
    "heart-rate": "#7a3fb0",
    spo2: "#0b5394",
    weight: "#0b5394",
    glucose: "#0b5394",
    temperature: "#0b5394",
  };
  const colourOf = (s) => COLOURS[s.measure] || "#0b5394";
  const THRESHOLD_COLOUR = "#b3261e";
  const STYLE = {
    home: { dash: undefined, shape: "circle" },
    clinic: { dash: [7, 5], shape: "square" },
    unrecorded: { dash: [2, 4], shape: "diamond" },
  };
  const HEIGHT = 260;
  const charts = [];

  // Points drawn as squares or diamonds (uPlot draws circles by itself).
  function shapedPoints(shape) {
    return (u, seriesIdx, idx0, idx1) => {
      const series = u.series[seriesIdx];
      const size = series.points.size * uPlot.pxRatio;
      const half = size / 2;
      const xs = u.data[0];
      const ys = u.data[seriesIdx];
      const path = new Path2D();
      for (let i = idx0; i <= idx1; i++) {
        if (ys[i] == null) {
          continue;
        }
        const x = u.valToPos(xs[i], "x", true);
        const y = u.valToPos(ys[i], series.scale, true);
        if (shape === "square") {
          path.rect(x - half, y - half, size, size);
        } else {
          path.moveTo(x, y - half - 1);
          path.lineTo(x + half + 1, y);
          path.lineTo(x, y + half + 1);
          path.lineTo(x - half - 1, y);
          path.closePath();
        }
      }
      return { stroke: path, fill: path };
    };
  }

  // Threshold lines across the plot, each with its label at the left edge; drawn before the
  // series (drawAxes), so a reading is never hidden under a line or a label.
  function thresholdPlugin(lines) {
    return {
      hooks: {
        drawAxes: (u) => {
          const ctx = u.ctx;
          const { left, top, width, height } = u.bbox;
          ctx.save();
          ctx.beginPath();
          ctx.rect(left, top, width, height);
          ctx.clip();
          ctx.strokeStyle = THRESHOLD_COLOUR;
          ctx.fillStyle = THRESHOLD_COLOUR;
          ctx.lineWidth = 1.5 * uPlot.pxRatio;
          ctx.setLineDash([2 * uPlot.pxRatio, 3 * uPlot.pxRatio]);
          ctx.font = `${12 * uPlot.pxRatio}px system-ui, sans-serif`;
          ctx.textAlign = "left";
          ctx.textBaseline = "bottom";
          for (const line of lines) {
            const y = Math.round(u.valToPos(line.value, line.scale, true));
            ctx.beginPath();
            ctx.moveTo(left, y);
            ctx.lineTo(left + width, y);
            ctx.stroke();
            // The label on a light box, so the grid does not cross it.
            const text = `${line.label} ${line.unit}`;
            const x = left + 6 * uPlot.pxRatio;
            const textWidth = ctx.measureText(text).width;
            ctx.fillStyle = "rgba(255, 255, 255, 0.85)";
            ctx.fillRect(x - 2, y - 16 * uPlot.pxRatio, textWidth + 4, 14 * uPlot.pxRatio);
            ctx.fillStyle = THRESHOLD_COLOUR;
            ctx.fillText(text, x, y - 2 * uPlot.pxRatio);
          }
          ctx.restore();
        },
      },
    };
  }

  function formatValue(unit) {
    return (u, value) => (value == null ? "–" : `${value} ${unit}`);
  }

  function build(chart, data) {
    const holder = document.getElementById(`chart-${chart.id}`);
    const drawn = chart.series;
    if (!holder || chart.count === 0) {
      return;
    }
    // One x axis for every series: the union of their times; a series is null elsewhere.
    const times = [...new Set(drawn.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const index = new Map(times.map((t, i) => [t, i]));
    const columns = drawn.map((s) => {
      const column = new Array(times.length).fill(null);
      for (const [t, v] of s.points) {
        column[index.get(t)] = v;
      }
      return column;
    });
    const units = [...new Set(chart.measures.map((m) => m.unit))];
    const axisLabel = (unit) =>
      units.length === 1
        ? unit
        : `${chart.measures.filter((m) => m.unit === unit).map((m) => m.label).join(", ")} (${unit})`;
    const scaleOf = (measure) => chart.measures.find((m) => m.measure === measure).unit;

    // Each scale spans its data and its thresholds, with a little room.
    const ranges = {};
    for (const unit of units) {
      const values = [];
      drawn.forEach((s, i) => {
        if (s.unit === unit) {
          values.push(...columns[i].filter((v) => v != null));
        }
      });
      for (const line of chart.thresholds) {
        if (scaleOf(line.measure) === unit) {
          values.push(line.value);
        }
      }
      if (values.length === 0) {
        ranges[unit] = [0, 100];
        continue;
      }
      const lo = Math.min(...values);
      const hi = Math.max(...values);
      const pad = Math.max((hi - lo) * 0.08, hi === lo ? Math.abs(hi) * 0.05 || 1 : 0);
      ranges[unit] = [Math.floor(lo - pad), Math.ceil(hi + pad)];
    }
    // Two scales (SpO2 and pulse) get a band each, SpO2 above and pulse below, so a pulse
    // never sits on an SpO2 threshold line; each axis labels only its own band.
    const bands = {};
    if (units.length === 2) {
      const [upper, lower] = units;
      const [uLo, uHi] = ranges[upper];
      const [lLo, lHi] = ranges[lower];
      bands[upper] = uLo;
      bands[lower] = lHi;
      ranges[upper] = [uLo - (uHi - uLo) * 0.9, uHi];
      ranges[lower] = [lLo, lHi + (lHi - lLo) * 0.9];
    }
    const inBand = (unit) => (u, splits) =>
      splits.map((v) => {
        if (!(unit in bands)) {
          return v;
        }
        return (unit === units[0] ? v >= bands[unit] : v <= bands[unit]) ? v : null;
      });

    const scales = { x: { time: true, range: () => [data.start, data.end] } };
    for (const unit of units) {
      scales[unit] = { range: () => ranges[unit] };
    }
    const axes = [{ stroke: "#5b6877", grid: { stroke: "#e6ebf0" } }];
    units.forEach((unit, i) => {
      axes.push({
        scale: unit,
        side: i === 0 ? 3 : 1,
        label: axisLabel(unit),
        stroke: "#5b6877",
        filter: inBand(unit),
        ticks: { filter: inBand(unit) },
        grid: { filter: inBand(unit), stroke: "#e6ebf0" },
        size: 56,
      });
    });

    const series = [{ label: "Taken" }];
    for (const s of drawn) {
      const style = STYLE[s.setting] || STYLE.unrecorded;
      const colour = colourOf(s);
      const entry = {
        label: `${s.label} · ${s.setting_label.toLowerCase()}`,
        class: `setting-${s.setting}`,
        scale: s.unit,
        stroke: colour,
        width: 2,
        dash: style.dash,
        spanGaps: true,
        value: formatValue(s.unit),
        points: {
          show: true,
          size: 7,
          width: 2,
          stroke: colour,
          fill: style.shape === "circle" ? colour : "#ffffff",
        },
      };
      if (style.shape !== "circle") {
        entry.points.paths = shapedPoints(style.shape);
      }
      series.push(entry);
    }

    const lines = chart.thresholds.map((line) => ({ ...line, scale: scaleOf(line.measure) }));
    const options = {
      width: Math.max(holder.clientWidth, 300),
      height: HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), data.zone),
      scales,
      axes,
      series,
      legend: {
        live: true,
        // The key matches the points: home filled, clinic hollow; dashed where the line is.
        markers: {
          width: 2,
          dash: (u, i) => ({ home: "solid", clinic: "dashed" })[drawn[i - 1].setting] || "dotted",
          fill: (u, i) => (drawn[i - 1].setting === "home" ? colourOf(drawn[i - 1]) : "#ffffff"),
        },
      },
      cursor: { drag: { x: false, y: false } },
      plugins: [thresholdPlugin(lines)],
    };
    const plot = new uPlot(options, [times, ...columns], holder);
    holder.dataset.drawn = "true";
    charts.push({ plot, holder });
  }

  function showProblem(text) {
    for (const holder of root.querySelectorAll(".chart")) {
      const note = document.createElement("p");
      note.className = "error";
      note.textContent = text;
      holder.replaceChildren(note);
    }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const { plot, holder } of charts) {
        plot.setSize({ width: Math.max(holder.clientWidth, 300), height: HEIGHT });
      }
    }, 150);
  });

  // A session that ended answers with a redirect to the login page: not followed.
  fetch(root.dataset.seriesUrl, { headers: { Accept: "application/json" }, redirect: "manual" })
    .then((response) => {
      if (response.type === "opaqueredirect" || response.status === 401) {
        throw new Error("Your session has ended: log in again to see the charts.");
      }
      if (!response.ok) {
        throw new Error("The charts could not be loaded; the readings are in the tables.");
      }
      return response.json();
    })
    .then((data) => {
      for (const chart of data.charts) {
        build(chart, data);
      }
      root.dataset.chartsReady = "true";
    })
    .catch((error) => {
      showProblem(error.message);
      root.dataset.chartsReady = "error";
    });
})();
