// Usage: the account's metered requests for a date range, as a chart of tokens per day and a table
// by day, model and key (GET /studio/v1/usage).
import { get } from "./api.js";
import { barChart } from "./chart.js";
import { errorBox, field, fmt, h, replace } from "./dom.js";

const iso = (d) => d.toISOString().slice(0, 10);

function days(start, end) {
  const out = [];
  for (let d = new Date(`${start}T00:00:00Z`); iso(d) <= end; d.setUTCDate(d.getUTCDate() + 1)) out.push(iso(d));
  return out;
}

function report(data) {
  const labels = days(data.start, data.end);
  const byDay = (key) => labels.map((day) => data.usage.filter((r) => r.date === day).reduce((s, r) => s + r[key], 0));
  const t = data.total;
  return [
    h("p", { class: "totals" }, `${fmt.num(t.requests)} requests (${fmt.num(t.failed)} failed), ${fmt.num(t.promptTokens)} prompt + `
      + `${fmt.num(t.completionTokens)} completion = ${fmt.num(t.totalTokens)} tokens, ${data.start} to ${data.end} (UTC).`),
    barChart("Tokens per day", labels, [
      { name: "prompt tokens", values: byDay("promptTokens"), class: "prompt" },
      { name: "completion tokens", values: byDay("completionTokens"), class: "completion" },
    ]),
    data.usage.length ? h("table", { class: "list usage", tabindex: "0" }, h("caption", null, "By day, model and key"),
      h("thead", null, h("tr", null, ["Day", "Model", "Key", "Requests", "Failed", "Prompt tokens", "Completion tokens"]
        .map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", null, data.usage.map((r) => h("tr", null, h("td", null, r.date), h("td", null, r.model || "—"),
        h("td", { class: "mono" }, r.key ? `${r.key}…` : "—"), h("td", null, fmt.num(r.requests)), h("td", null, fmt.num(r.failed)),
        h("td", null, fmt.num(r.promptTokens)), h("td", null, fmt.num(r.completionTokens))))))
      : h("p", null, "No requests in this range."),
  ];
}

export async function usage(main) {
  const today = new Date();
  const start = h("input", { type: "date", name: "start", value: iso(new Date(today.getTime() - 29 * 86400000)) });
  const end = h("input", { type: "date", name: "end", value: iso(today) });
  const out = h("div", { "aria-live": "polite" });
  async function load() {
    try {
      replace(out, report(await get(`/studio/v1/usage?start=${start.value}&end=${end.value}`)));
    } catch (err) {
      replace(out, errorBox(err));
    }
  }
  const form = h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); load(); } },
    field("From", start), field("To", end), h("button", { type: "submit" }, "Show"));
  replace(main, h("h1", null, "Usage"), form, out);
  await load();
}
