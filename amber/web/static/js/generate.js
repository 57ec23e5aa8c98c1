// Data generation: a general (or custom) model writes a training set from a few examples; the
// filters flag rows; the reviewer approves, rejects or edits them and saves the rest as a dataset.
import { get, patch, post } from "./api.js";
import { announce, errorBox, field, fmt, h, replace } from "./dom.js";

const POLL_MS = 1500;
const unescape = (line) => line.replaceAll("\\n", "\n");

async function examplesOf(datasetId, count, offset = 0) {
  const page = await get(`/studio/v1/dataset/${datasetId}/rows?split=train&offset=${offset}&limit=${count}`);
  return page.rows.map((r) => ({ prompt: r.prompt, completion: r.completion }));
}

function form(models, datasets, onQueued) {
  const mode = h("select", { name: "mode" }, h("option", { value: "inputs" }, "inputs: label my inputs"),
    h("option", { value: "examples" }, "examples: write new pairs"));
  const model = h("select", { name: "model" },
    h("optgroup", { label: "General models" }, models.general.map((m) => h("option", { value: m.aliases[0] || m.name, selected: m.default }, m.aliases[0] || m.name))),
    models.custom.filter((m) => m.status === "COMPLETED").length
      ? h("optgroup", { label: "Your custom models" }, models.custom.filter((m) => m.status === "COMPLETED").map((m) => h("option", { value: m.name }, m.name)))
      : null);
  const source = h("select", { name: "examplesDataset" }, datasets.map((d) => h("option", { value: d.id }, d.datasetName)));
  const k = h("input", { type: "number", name: "k", min: 1, max: 64, value: 8 });
  const inputsFrom = h("select", { name: "inputsDataset" }, h("option", { value: "" }, "the text box below"),
    datasets.map((d) => h("option", { value: d.id }, `prompts of ${d.datasetName} (after its first k rows, labels left out)`)));
  const inputs = h("textarea", { name: "inputs", rows: 4, spellcheck: "false" });
  const n = h("input", { type: "number", name: "n", min: 1, max: 2000, value: 50 });
  const samples = h("input", { type: "number", name: "samples", min: 1, max: 8, value: 1 });
  const temperature = h("input", { type: "number", name: "temperature", min: 0, max: 5, step: 0.05, placeholder: "0 (inputs), 0.9 (examples)" });
  const maxTokens = h("input", { type: "number", name: "maxTokens", min: 1, max: 512, value: 32 });
  const result = h("div", { "aria-live": "polite" });
  const inputsFields = h("div", null, field("Inputs from", inputsFrom),
    field("Inputs", inputs, "one per line; write \\n for a line break inside an input"),
    field("Samples per input", samples, "more than 1: the majority answer is kept, its share is the confidence"));
  const examplesFields = h("div", null, field("Rows to write (N)", n, "at most 2,000"));
  const sync = () => { inputsFields.hidden = mode.value !== "inputs"; examplesFields.hidden = mode.value !== "examples"; };
  mode.addEventListener("change", sync);
  sync();
  const submit = h("button", { type: "submit", disabled: !datasets.length }, "Generate");
  return h("form", { class: "generate", onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const count = Number(k.value);
      const body = { mode: mode.value, model: model.value, examples: await examplesOf(source.value, count),
        maxTokens: Number(maxTokens.value) };
      if (temperature.value !== "") body.temperature = Number(temperature.value);
      if (mode.value === "inputs") {
        body.samples = Number(samples.value);
        body.inputs = inputsFrom.value
          ? (await get(`/studio/v1/dataset/${inputsFrom.value}/rows?offset=${count}&limit=500`)).rows.map((r) => r.prompt)
          : inputs.value.split("\n").filter((line) => line.trim()).map(unescape);
      } else {
        body.n = Number(n.value);
      }
      const job = await post("/studio/v1/dataset/generate", body);
      announce(`Generation job ${job.id} queued`);
      replace(result);
      onQueued();
    } catch (err) {
      replace(result, errorBox(err));
    } finally {
      submit.disabled = false;
    }
  } },
  h("div", { class: "grid2" }, field("Mode", mode), field("Model", model), field("Examples from", source),
    field("Examples (k)", k, "the dataset's first k training rows"), field("Max tokens per row", maxTokens),
    field("Temperature", temperature)),
  inputsFields, examplesFields, h("div", { class: "actions" }, submit), result);
}

function rowView(job, row, refresh) {
  const output = h("textarea", { name: `output-${row.index}`, rows: 2, "aria-label": `Output of row ${row.index}` }, row.output);
  const decide = (decision) => async () => {
    await patch(`/studio/v1/dataset/generate/${job.id}/rows/${row.index}`, { decision });
    refresh();
  };
  return h("tr", { dataset: { index: String(row.index), included: String(row.included) } },
    h("td", null, String(row.index)), h("td", null, h("pre", null, row.input)),
    h("td", null, output),
    h("td", null, row.details.length ? h("ul", { class: "flags-list" }, row.details.map((d) => h("li", null, d))) : "—"),
    h("td", null, row.confidence == null ? "—" : fmt.pct(row.confidence)),
    h("td", null, row.included ? "in" : "out", row.decision ? ` (${row.decision})` : ""),
    h("td", { class: "row-actions" },
      h("button", { type: "button", class: "secondary", onclick: decide("approve") }, "Approve", h("span", { class: "sr-only" }, ` row ${row.index}`)),
      h("button", { type: "button", class: "danger", onclick: decide("reject") }, "Reject", h("span", { class: "sr-only" }, ` row ${row.index}`)),
      h("button", { type: "button", class: "chip", onclick: async () => {
        await patch(`/studio/v1/dataset/generate/${job.id}/rows/${row.index}`, { output: output.value });
        refresh();
      } }, "Save edit", h("span", { class: "sr-only" }, ` of row ${row.index}`))));
}

async function review(job, into) {
  const view = h("select", { name: "view" }, ["all", "kept", "flagged", "approved", "rejected"].map((v) => h("option", { value: v }, v)));
  const table = h("div");
  const name = h("input", { type: "text", name: "datasetName", maxlength: 128, required: true, value: `generated-${job.id}` });
  const message = h("div", { "aria-live": "polite" });
  async function load() {
    const page = await get(`/studio/v1/dataset/generate/${job.id}/rows?view=${view.value}&limit=200`);
    replace(table, h("table", { class: "list review", tabindex: "0" },
      h("caption", null, `Job ${job.id}: ${page.total} ${view.value} rows${page.total > 200 ? " (first 200)" : ""}`),
      h("thead", null, h("tr", null, ["Row", "Input", "Output", "Flags", "Confidence", "In dataset", ""].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", null, page.rows.map((row) => rowView(job, row, load)))));
  }
  view.addEventListener("change", load);
  const save = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const dataset = await post(`/studio/v1/dataset/generate/${job.id}/save`, { dataset_name: name.value });
      replace(message, h("div", { class: "notice", role: "status" },
        `Dataset ${dataset.datasetName} saved: ${dataset.numExamples} rows. Train a custom model on it from the `,
        h("a", { href: "/account", "data-route": "" }, "account page"), "."));
    } catch (err) {
      replace(message, errorBox(err));
    }
  } }, field("Save approved rows as dataset", name), h("button", { type: "submit" }, "Save dataset"));
  replace(into, h("h3", null, `Review job ${job.id}`), field("Show", view), table, save, message);
  await load();
}

function jobCard(job, reviewBox, refresh) {
  const p = job.progress || {};
  const running = job.status === "QUEUED" || job.status === "RUNNING";
  const r = job.result;
  return h("article", { class: "card job", dataset: { id: job.id, status: job.status } },
    h("h3", null, `Job ${job.id}: ${job.mode} with ${job.model} `, h("span", { class: `badge ${job.status.toLowerCase()}` }, job.status)),
    p.rowsTotal ? h("div", { class: "progress" },
      h("progress", { max: p.rowsTotal, value: p.rowsDone || 0, "aria-label": `Job ${job.id} rows done` }),
      h("span", { class: "meta" }, `${p.rowsDone} of ${p.rowsTotal} rows, ${p.rowsKept ?? "—"} kept`
        + (running && p.etaSeconds ? `, about ${Math.round(p.etaSeconds)} s left` : ""))) : null,
    r ? h("p", { class: "meta" }, `${r.generated} rows, ${r.kept} kept (${fmt.pct(r.yield)}), ${r.rowsPerMinute} rows/min; flags: `
      + (Object.entries(r.reasons).map(([k, v]) => `${k} ${v}`).join(", ") || "none")) : null,
    job.failure ? h("p", { class: "error" }, job.failure) : null,
    h("div", { class: "row-actions" },
      running ? h("button", { type: "button", class: "danger", onclick: async () => { await post(`/studio/v1/jobs/${job.id}/cancel`, {}); refresh(); } }, "Cancel") : null,
      !running ? h("button", { type: "button", class: "secondary", onclick: () => review(job, reviewBox) }, "Review rows") : null));
}

export async function generatePage(main, alive) {
  const [general, custom, datasets] = await Promise.all([get("/studio/v1/models"), get("/studio/v1/custom-model"), get("/studio/v1/dataset")]);
  const jobsBox = h("div", { "aria-live": "polite" });
  const reviewBox = h("section", { class: "panel", "aria-label": "Review" });
  async function refresh() {
    const jobs = (await get("/studio/v1/dataset/generate")).reverse();
    replace(jobsBox, jobs.length ? jobs.map((j) => jobCard(j, reviewBox, refresh)) : h("p", null, "No generation jobs yet."));
    if (jobs.some((j) => j.status === "QUEUED" || j.status === "RUNNING")) {
      setTimeout(() => { if (alive() && jobsBox.isConnected && !jobsBox.contains(document.activeElement)) refresh(); }, POLL_MS);
    }
  }
  replace(main, h("h1", null, "Generate data"),
    h("p", { class: "lede" }, "Let a model write a training set from a few examples: label your own inputs, or write new "
      + "input/output pairs. Filters flag duplicates, empty, cut-off, repetitive, copied, outlying and profane rows; "
      + "review them, then save the rest as a dataset."),
    datasets.length ? null : h("p", null, "Upload a dataset with a few examples first, on the ", h("a", { href: "/account", "data-route": "" }, "account page"), "."),
    h("section", { class: "panel" }, h("h2", null, "New generation job"), form({ general: general.models, custom }, datasets, refresh)),
    h("section", { class: "panel" }, h("h2", null, "Jobs"), jobsBox), reviewBox);
  reviewBox.hidden = false;
  await refresh();
}
