// Building the page. Everything a model, a user or a dataset wrote is put in as text (text nodes,
// textContent, attribute values): nothing here parses a string as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// h("button", {class: "x", onclick: f}, "text", child): an element, its attributes and children.
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function replace(el, ...children) {
  el.replaceChildren();
  return build(el, null, children);
}

let statusTimer;
// A message for screen readers and sighted users alike (the page's polite live region).
export function announce(text) {
  const status = document.getElementById("status");
  status.textContent = text;
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => { status.textContent = ""; }, 6000);
}

let fieldIds = 0;
// A labelled form control: <label for=id>text</label> + the control (+ a hint tied by aria-describedby).
export function field(label, control, hint) {
  const id = control.id || `f${++fieldIds}`;
  control.id = id;
  const parts = [h("label", { for: id }, label), control];
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("small", { id: hintId, class: "hint" }, hint));
  }
  return h("div", { class: "field" }, parts);
}

export function errorBox(error) {
  return h("div", { class: "error", role: "alert" }, error.message || String(error));
}

export const fmt = {
  ms: (seconds) => `${Math.round(seconds * 1000)} ms`,
  pct: (x) => `${(x * 100).toFixed(1)}%`,
  num: (x) => Number(x).toLocaleString("en"),
  date: (iso) => new Date(iso).toLocaleString(),
  logprob: (x) => (x === null || x === undefined ? "—" : x.toFixed(4)),
};
