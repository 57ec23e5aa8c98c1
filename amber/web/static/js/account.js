// Account: API keys, datasets and custom models. Custom models in training are polled every two
// seconds while this page is open, for their progress and their loss per epoch.
import { del, get, post, put, request, session } from "./api.js";
import { lineChart } from "./chart.js";
import { announce, errorBox, field, fmt, h, replace } from "./dom.js";

const POLL_MS = 2000;

// A button that asks again before doing something that cannot be undone.
function confirmButton(label, confirmLabel, action) {
  const button = h("button", { type: "button", class: "danger" }, label);
  let armed = false;
  button.addEventListener("click", async () => {
    if (!armed) {
      armed = true;
      button.textContent = confirmLabel;
      setTimeout(() => { armed = false; button.textContent = label; }, 4000);
      return;
    }
    button.disabled = true;
    await action();
  });
  return button;
}

async function keysSection(el) {
  const { keys } = await get("/studio/v1/keys");
  const name = h("input", { type: "text", name: "keyName", maxlength: 64, autocomplete: "off" });
  const shown = h("div", { "aria-live": "polite" });
  const refresh = () => keysSection(el);
  const rows = keys.map((k) => h("tr", null,
    h("td", null, k.name || "—"), h("td", { class: "mono" }, `${k.prefix}…`), h("td", null, fmt.date(k.createdAt)),
    h("td", null, k.revoked ? "revoked" : k.current ? "active (this session)" : "active"),
    h("td", null, k.revoked ? null : confirmButton("Revoke", "Confirm revoke", async () => {
      await del(`/studio/v1/keys/${encodeURIComponent(k.prefix)}`);
      announce(`Key ${k.name || k.prefix} revoked`);
      if (k.current) { session.clear(); location.assign("/"); return; }
      refresh();
    }))));
  const form = h("form", { class: "inline", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const made = await post("/studio/v1/keys", name.value.trim() ? { name: name.value.trim() } : {});
      await keysSection(el);
      const value = h("output", { class: "mono secret" }, made.key);
      el.append(h("div", { class: "notice", role: "alert" },
        h("p", null, "Your new key. It is shown only this once: store it now."), value,
        h("button", { type: "button", class: "chip", onclick: () => navigator.clipboard.writeText(made.key).then(() => announce("Key copied")) }, "Copy key")));
    } catch (err) {
      shown.replaceChildren(errorBox(err));
    }
  } }, field("New key's name", name), h("button", { type: "submit" }, "Create key"));
  replace(el, h("h2", null, "API keys"),
    h("table", { class: "list" }, h("caption", { class: "sr-only" }, "API keys"),
      h("thead", null, h("tr", null, ["Name", "Key", "Created", "Status", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", null, rows)),
    form, shown);
}

function rowNumbers(report) {
  const parts = [["duplicates dropped", report.duplicates], ["empty rows dropped", report.empty_rows],
    ["whitespace corrected", report.whitespace_corrected], ["long rows deleted", report.deleted_long_rows]];
  const items = parts.filter(([, rows]) => rows && rows.length)
    .map(([what, rows]) => h("li", null, `${what}: row${rows.length > 1 ? "s" : ""} ${rows.join(", ")}`));
  return items.length ? h("ul", { class: "report" }, items) : null;
}

const SHOWN_ROWS = 20;

// A 422 from the upload: each error, then a table of the rows it names, with each row's text when
// the file is JSON Lines (row n is line n; a CSV row may span lines, so only its number is shown).
async function uploadErrors(err, file) {
  const details = Array.isArray(err.detail) ? err.detail : [{ loc: [], msg: err.message }];
  const lines = file && /\.jsonl?$/i.test(file.name) && details.some((d) => d.rows) ? (await file.text()).split("\n") : null;
  return h("div", { class: "error", role: "alert" }, h("p", null, "The file was not accepted:"),
    details.map((d) => {
      const where = (d.loc || []).filter((p) => p !== "body").join(".");
      const rows = d.rows || [];
      return [h("p", null, where ? h("strong", null, `${where}: `) : null, d.msg),
        rows.length ? h("table", { class: "list rows-at-fault", tabindex: "0" },
          h("caption", null, `${rows.length} row${rows.length > 1 ? "s" : ""} to fix${rows.length > SHOWN_ROWS ? ` (first ${SHOWN_ROWS} shown)` : ""}`),
          h("thead", null, h("tr", null, h("th", { scope: "col" }, "Row"), lines ? h("th", { scope: "col" }, "Content") : null)),
          h("tbody", null, rows.slice(0, SHOWN_ROWS).map((n) => h("tr", null, h("td", null, String(n)),
            lines ? h("td", null, h("pre", null, (lines[n - 1] || "").slice(0, 300))) : null)))) : null];
    }));
}

async function preview(dataset, into) {
  const page = await get(`/studio/v1/dataset/${dataset.id}/rows?limit=20`);
  replace(into, h("table", { class: "list preview", tabindex: "0" },
    h("caption", null, `${dataset.datasetName}: first ${page.rows.length} of ${page.total} rows`),
    h("thead", null, h("tr", null, ["Row", "Split", "Prompt", "Completion"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", null, page.rows.map((r) => h("tr", null, h("td", null, String(r.row)), h("td", null, r.split),
      h("td", null, h("pre", null, r.prompt)), h("td", null, h("pre", null, r.completion)))))));
}

async function datasetsSection(el, onChange) {
  const datasets = await get("/studio/v1/dataset");
  const file = h("input", { type: "file", name: "dataset_file", accept: ".csv,.tsv,.jsonl,.json,text/csv", required: true });
  const name = h("input", { type: "text", name: "dataset_name", maxlength: 128, required: true });
  const whitespace = h("input", { type: "checkbox", name: "approve_whitespace_correction" });
  const longRows = h("input", { type: "checkbox", name: "delete_long_rows" });
  const result = h("div", { "aria-live": "polite" });
  const previewBox = h("div");
  file.addEventListener("change", () => {
    if (!name.value && file.files[0]) name.value = file.files[0].name.replace(/\.[^.]+$/, "");
  });
  const upload = h("button", { type: "submit" }, "Upload");
  const form = h("form", { class: "upload", onsubmit: async (e) => {
    e.preventDefault();
    const data = new FormData();
    data.append("dataset_file", file.files[0]);
    data.append("dataset_name", name.value);
    data.append("approve_whitespace_correction", String(whitespace.checked));
    data.append("delete_long_rows", String(longRows.checked));
    upload.disabled = true;
    replace(result, h("p", { class: "meta" }, "Uploading…"));
    try {
      const made = await request("POST", "/studio/v1/dataset", { form: data });
      await datasetsSection(el, onChange);
      el.append(h("div", { class: "notice", role: "status" },
        h("p", null, `Dataset ${made.datasetName} saved: ${made.trainNumExamples} training and `
          + `${made.validationNumExamples} validation examples.`), rowNumbers(made.report || {})));
      onChange();
    } catch (err) {
      replace(result, await uploadErrors(err, file.files[0]));
    } finally {
      upload.disabled = false;
    }
  } },
  h("div", { class: "grid2" }, field("File (CSV, TSV or JSONL)", file), field("Dataset name", name)),
  h("label", { class: "check" }, whitespace, " Accept whitespace corrections"),
  h("label", { class: "check" }, longRows, " Delete rows too long for the model"),
  h("div", { class: "actions" }, upload));
  const rows = datasets.map((d) => h("tr", null,
    h("td", null, d.datasetName), h("td", null, `${d.trainNumExamples} / ${d.validationNumExamples}`),
    h("td", null, String(d.numModelsUsed)), h("td", null, fmt.date(d.creationDate)),
    h("td", { class: "row-actions" },
      h("button", { type: "button", class: "secondary", onclick: () => preview(d, previewBox).catch((err) => replace(previewBox, errorBox(err))) },
        "Preview", h("span", { class: "sr-only" }, ` ${d.datasetName}`)),
      confirmButton("Delete", "Confirm delete", async () => {
        try {
          await del(`/studio/v1/dataset/${d.id}`);
          announce(`Dataset ${d.datasetName} deleted`);
          await datasetsSection(el, onChange);
          onChange();
        } catch (err) {
          replace(result, errorBox(err));
        }
      }))));
  replace(el, h("h2", null, "Datasets"),
    datasets.length ? h("table", { class: "list" }, h("caption", { class: "sr-only" }, "Datasets"),
      h("thead", null, h("tr", null, ["Name", "Train / validation", "Models", "Created", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", null, rows)) : h("p", null, "No datasets yet."),
    previewBox, h("h3", null, "Upload a dataset"), form, result);
}

function progressView(m) {
  const p = m.progress || {};
  if (m.status === "QUEUED") return h("p", { class: "meta" }, "Queued: waiting for a worker (amber worker, or the one amber serve starts).");
  if (m.status !== "TRAINING") return null;
  if (p.phase === "evaluating") return h("p", { class: "meta" }, "Evaluating against k-shot prompting…");
  const done = p.totalSteps ? ((p.epoch - 1) * p.totalSteps + p.step) : 0;
  const total = p.totalSteps ? p.epochs * p.totalSteps : 1;
  return h("div", { class: "progress" },
    h("progress", { max: total, value: done, "aria-label": `Training ${m.name}` }),
    h("span", { class: "meta" }, p.totalSteps ? `epoch ${p.epoch} of ${p.epochs}, step ${p.step} of ${p.totalSteps}, `
      + `loss ${p.loss?.toFixed(4)}, about ${Math.round(p.etaSeconds)} s left` : "starting…"));
}

function evaluationView(ev) {
  if (!ev || !ev.custom_model) return ev ? h("p", { class: "meta" }, "No evaluation: the dataset has no validation rows.") : null;
  const row = (label, r) => h("tr", null, h("th", { scope: "row" }, label), h("td", null, `${fmt.pct(r.accuracy)} (${r.correct}/${ev.examples})`),
    h("td", null, fmt.ms(r.mean_latency_s)));
  return h("table", { class: "list evaluation", tabindex: "0" },
    h("caption", null, `Against ${ev.shots}-shot prompting, epoch ${ev.epoch}, ${ev.examples} validation examples`),
    h("thead", null, h("tr", null, h("th", { scope: "col" }, ""), h("th", { scope: "col" }, "exact match"), h("th", { scope: "col" }, "mean latency"))),
    h("tbody", null, row("custom model", ev.custom_model), row(`${ev.shots}-shot base model`, ev.few_shot)),
    h("tfoot", null, h("tr", null, h("td", { colspan: 3 },
      `${ev.accuracy_gain >= 0 ? "+" : ""}${(ev.accuracy_gain * 100).toFixed(1)} points, ${ev.speedup.toFixed(2)}x faster`))));
}

async function download(m, epoch) {
  const response = await request("GET", `/studio/v1/custom-model/${m.id}/export?epoch=${epoch}`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = h("a", { href: url, download: `${m.name}-epoch${epoch}.zip` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function modelCard(m, refresh) {
  const epochs = m.epochs || [];
  const done = m.currentEpoch || 0;
  const chart = epochs.length ? lineChart(`${m.name}: loss per epoch`, epochs.map((e) => `epoch ${e.epoch}`), [
    { name: "training loss", values: epochs.map((e) => e.train_loss), class: "train" },
    { name: "validation loss", values: epochs.map((e) => e.validation_loss), class: "validation" },
  ]) : null;
  const epochSelect = h("select", { name: "defaultEpoch" }, Array.from({ length: done }, (_, i) => h("option", { value: i + 1 }, String(i + 1))));
  epochSelect.value = String(m.modelMetadata.defaultEpoch);
  const message = h("div", { "aria-live": "polite" });
  const actions = done ? h("div", { class: "row-actions" },
    field("Default epoch", epochSelect),
    h("button", { type: "button", class: "secondary", onclick: async () => {
      try {
        await put(`/studio/v1/custom-model/${m.id}`, { defaultEpoch: Number(epochSelect.value) });
        announce(`${m.name} now answers with epoch ${epochSelect.value}`);
        refresh();
      } catch (err) { replace(message, errorBox(err)); }
    } }, "Set default"),
    h("button", { type: "button", class: "secondary", onclick: () => download(m, Number(epochSelect.value)).catch((err) => replace(message, errorBox(err))) },
      "Export adapter"),
    h("a", { class: "button-link", href: `/playground?model=${encodeURIComponent(m.name)}`, "data-route": "" }, "Open in playground")) : null;
  return h("article", { class: "card model", dataset: { status: m.status, name: m.name } },
    h("h3", null, m.name, " ", h("span", { class: `badge ${m.status.toLowerCase()}` }, m.status)),
    h("p", { class: "meta" }, `on ${m.modelType} (${m.baseModel}), dataset ${m.datasetName}${m.datasetDeleted ? " (deleted)" : ""}, `
      + `${done} of ${m.modelMetadata.numEpochs} epochs, learning rate ${m.modelMetadata.learningRate}`),
    m.failure ? h("p", { class: "error" }, m.failure) : null,
    progressView(m), chart, evaluationView(m.evaluation), actions, message,
    h("div", { class: "row-actions" }, confirmButton("Delete model", "Confirm delete", async () => {
      await del(`/studio/v1/custom-model/${m.id}`);
      announce(`${m.name} deleted`);
      refresh();
    })));
}

async function modelsSection(el, alive) {
  const [models, datasets, general] = await Promise.all([get("/studio/v1/custom-model"), get("/studio/v1/dataset"),
    get("/studio/v1/models")]);
  const refresh = () => modelsSection(el, alive);
  const name = h("input", { type: "text", name: "model_name", maxlength: 64, required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]*" });
  const dataset = h("select", { name: "dataset_id", required: true }, datasets.map((d) => h("option", { value: d.id }, d.datasetName)));
  const base = h("select", { name: "model_type" }, general.models.map((m) => h("option", { value: m.aliases[0] || m.name, selected: m.default },
    m.aliases.length ? `${m.aliases[0]} (${m.name})` : m.name)));
  const epochs = h("input", { type: "number", name: "num_epochs", min: 1, max: 20, value: 3, step: 1 });
  const rate = h("input", { type: "number", name: "learning_rate", min: 0, max: 1, step: "any", placeholder: "default" });
  const result = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "train", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const made = await post("/studio/v1/custom-model", { dataset_id: dataset.value, model_name: name.value, model_type: base.value,
        num_epochs: Number(epochs.value), learning_rate: rate.value ? Number(rate.value) : null });
      announce(`${made.name} queued for training`);
      refresh();
    } catch (err) {
      replace(result, errorBox(err));
    }
  } },
  h("div", { class: "grid2" }, field("Name", name, "letters, digits, '.', '_' or '-'"), field("Dataset", dataset),
    field("Base model", base), field("Epochs", epochs), field("Learning rate", rate)),
  h("div", { class: "actions" }, h("button", { type: "submit", disabled: !datasets.length }, "Train")), result);
  replace(el, h("h2", null, "Custom models"),
    models.length ? models.map((m) => modelCard(m, refresh)) : h("p", null, "No custom models yet."),
    h("h3", null, "Train a custom model"), datasets.length ? null : h("p", null, "Upload a dataset first."), form);
  if (models.some((m) => m.status === "QUEUED" || m.status === "TRAINING")) {
    // Not while the user is in this section: redrawing it would take their focus away.
    const poll = () => {
      if (!alive() || !el.isConnected) return;
      if (el.contains(document.activeElement) && document.activeElement !== document.body) setTimeout(poll, POLL_MS);
      else refresh();
    };
    setTimeout(poll, POLL_MS);
  }
}

export async function account(main, alive) {
  const me = await get("/studio/v1/account");
  const keys = h("section", { class: "panel", "aria-labelledby": "keys-h" });
  const datasets = h("section", { class: "panel" });
  const models = h("section", { class: "panel" });
  const limits = [me.limits.rpm ? `${me.limits.rpm} requests` : null, me.limits.tpm ? `${me.limits.tpm} tokens` : null].filter(Boolean);
  replace(main, h("h1", null, `Account: ${me.name}`),
    h("p", { class: "meta" }, limits.length ? `Rate limits: ${limits.join(" and ")} per minute.` : "No rate limits."),
    keys, datasets, models);
  await Promise.all([keysSection(keys), datasetsSection(datasets, () => modelsSection(models, alive)), modelsSection(models, alive)]);
  keys.querySelector("h2").id = "keys-h";
}
