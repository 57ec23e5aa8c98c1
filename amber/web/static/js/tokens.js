// The token view: each token shaded by its probability, its logprob and top alternatives shown on
// hover or keyboard focus. One tab stop per view; arrow keys, Home and End move between tokens.
import { fmt, h } from "./dom.js";

let views = 0;

// The characters of `text` (code points, as the server counts textRange) from start to end.
function slice(chars, range, fallback) {
  return range ? chars.slice(range.start, range.end).join("") : fallback;
}

// J2 token strings mark a leading space with ▁ and a line break with <|newline|>.
function readable(token) {
  return token.replaceAll("▁", " ").replaceAll("<|newline|>", "\n");
}

function probability(logprob) {
  return logprob === null || logprob === undefined ? null : Math.exp(logprob);
}

function tipContent(entry) {
  const g = entry.generatedToken || {};
  const p = probability(g.logprob);
  const rows = (entry.topTokens || []).map((t) =>
    h("tr", null, h("td", { class: "mono" }, JSON.stringify(t.token)), h("td", null, fmt.logprob(t.logprob)),
      h("td", null, fmt.pct(Math.exp(t.logprob)))));
  return [
    h("div", { class: "mono" }, JSON.stringify(g.token ?? "")),
    h("dl", null,
      h("dt", null, "logprob"), h("dd", { class: "tip-logprob" }, fmt.logprob(g.logprob)),
      h("dt", null, "probability"), h("dd", null, p === null ? "—" : fmt.pct(p)),
      g.raw_logprob !== undefined && g.raw_logprob !== g.logprob
        ? [h("dt", null, "raw logprob"), h("dd", null, fmt.logprob(g.raw_logprob))] : null),
    rows.length
      ? h("table", { class: "top" }, h("caption", null, "Top alternatives"),
        h("thead", null, h("tr", null, h("th", { scope: "col" }, "token"), h("th", { scope: "col" }, "logprob"),
          h("th", { scope: "col" }, "p"))),
        h("tbody", null, rows))
      : null,
  ];
}

// tokens: J2 token entries; text: the string their textRanges point into; label: what they are.
export function tokenView(tokens, text, label) {
  const id = `tip${++views}`;
  const tip = h("div", { class: "tip", role: "tooltip", id, hidden: true });
  const chars = Array.from(text || "");
  const spans = tokens.map((entry, i) => {
    const g = entry.generatedToken || {};
    const shown = slice(chars, entry.textRange, readable(g.token || ""));
    const p = probability(g.logprob);
    const span = h("span", {
      class: p === null ? "tok unscored" : "tok", tabindex: i === 0 ? "0" : "-1", "aria-describedby": id,
      dataset: { index: String(i), logprob: g.logprob ?? "" },
    }, shown === "\n" ? "↵\n" : shown);
    if (p !== null) span.style.setProperty("--p", p.toFixed(3));
    return span;
  });

  function show(span) {
    tip.replaceChildren(...tipContent(tokens[Number(span.dataset.index)]));
    tip.hidden = false;
    const box = span.getBoundingClientRect(), host = view.getBoundingClientRect();
    tip.style.setProperty("--x", `${Math.max(0, box.left - host.left)}px`);
    tip.style.setProperty("--y", `${box.bottom - host.top + 4}px`);
  }
  function hide() { tip.hidden = true; }
  function move(from, to) {
    const next = spans[Math.max(0, Math.min(spans.length - 1, to))];
    if (!next || next === from) return;
    from.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }

  const body = h("div", { class: "tokens", role: "group", "aria-label": `${label}: ${tokens.length} tokens, `
    + "shaded by probability; use the arrow keys to move between tokens" }, spans);
  body.addEventListener("mouseover", (e) => e.target.classList.contains("tok") && show(e.target));
  body.addEventListener("mouseleave", () => { if (!body.contains(document.activeElement)) hide(); });
  body.addEventListener("focusin", (e) => e.target.classList.contains("tok") && show(e.target));
  body.addEventListener("focusout", (e) => { if (!body.contains(e.relatedTarget)) hide(); });
  body.addEventListener("keydown", (e) => {
    const i = Number(e.target.dataset.index);
    const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: spans.length - 1 }[e.key];
    if (e.key === "Escape") hide();
    if (to === undefined) return;
    e.preventDefault();
    move(e.target, to);
  });
  const view = h("div", { class: "token-view" }, h("h4", null, label), body, tip);
  return view;
}

export function legend() {
  return h("p", { class: "legend" }, "Token shading: ",
    h("span", { class: "tok swatch low" }, "unlikely"), " → ", h("span", { class: "tok swatch high" }, "likely"),
    ". Hover or focus a token for its logprob and top alternatives.");
}
