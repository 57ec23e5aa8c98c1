// Small SVG charts with a table beside them, so that what a chart shows can also be read.
import { h, svg } from "./dom.js";

const W = 560, H = 220, PAD = { left: 48, right: 12, top: 12, bottom: 28 };

function scale(min, max, from, to) {
  const span = max - min || 1;
  return (v) => from + ((v - min) / span) * (to - from);
}

function axes(yMin, yMax, xLabels, x, y) {
  const ticks = [yMin, (yMin + yMax) / 2, yMax];
  return [
    ...ticks.map((t) => [svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(t), y2: y(t), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(t) + 4, class: "tick", "text-anchor": "end" }, t.toPrecision(3))]),
    ...xLabels.map((label, i) => svg("text", { x: x(i), y: H - 8, class: "tick", "text-anchor": "middle" }, label)),
  ];
}

// series: [{name, values: [number|null], class}] over labels; a line per series.
export function lineChart(title, labels, series) {
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
  const yMin = Math.min(...all, 0), yMax = Math.max(...all, 1e-9);
  const x = labels.length > 1 ? scale(0, labels.length - 1, PAD.left + 10, W - PAD.right - 10) : () => (W / 2);
  const y = scale(yMin, yMax, H - PAD.bottom, PAD.top);
  const shapes = series.map((s) => {
    const points = s.values.map((v, i) => (v === null || v === undefined ? null : [x(i), y(v)])).filter(Boolean);
    return svg("g", { class: `series ${s.class}` },
      points.length > 1 ? svg("polyline", { points: points.map((p) => p.join(",")).join(" ") }) : null,
      points.map(([px, py]) => svg("circle", { cx: px, cy: py, r: 3.5 })));
  });
  const summary = series.map((s) => `${s.name}: ${s.values.map((v) => (v == null ? "none" : v.toFixed(4))).join(", ")}`).join("; ");
  return h("figure", { class: "chart" },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}. ${summary}` },
      axes(yMin, yMax, labels, x, y), shapes),
    h("figcaption", null, title, " ", series.map((s) => h("span", { class: `key ${s.class}` }, s.name))),
    dataTable(title, labels, series));
}

// Stacked bars: series values summed per label.
export function barChart(title, labels, series) {
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const yMax = Math.max(...totals, 1);
  const band = (W - PAD.left - PAD.right) / Math.max(labels.length, 1);
  const x = (i) => PAD.left + band * (i + 0.5);
  const y = scale(0, yMax, H - PAD.bottom, PAD.top);
  const bars = labels.map((_, i) => {
    let base = 0;
    return series.map((s) => {
      const v = s.values[i] || 0;
      const rect = svg("rect", { x: x(i) - band * 0.35, width: band * 0.7, y: y(base + v), height: Math.max(0, y(base) - y(base + v)), class: s.class });
      base += v;
      return rect;
    });
  });
  const shown = labels.map((l, i) => (labels.length <= 10 || i % Math.ceil(labels.length / 10) === 0 ? l.slice(5) : ""));
  return h("figure", { class: "chart" },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${totals.reduce((a, b) => a + b, 0)} in all` },
      axes(0, yMax, shown, x, y), bars),
    h("figcaption", null, title, " ", series.map((s) => h("span", { class: `key ${s.class}` }, s.name))),
    dataTable(title, labels, series));
}

function dataTable(title, labels, series) {
  return h("details", { class: "chart-data" }, h("summary", null, "Data"),
    h("table", null, h("caption", null, title),
      h("thead", null, h("tr", null, h("th", { scope: "col" }, ""), series.map((s) => h("th", { scope: "col" }, s.name)))),
      h("tbody", null, labels.map((label, i) => h("tr", null, h("th", { scope: "row" }, label),
        series.map((s) => h("td", null, s.values[i] == null ? "—" : String(Number(s.values[i].toPrecision(6))))))))));
}
