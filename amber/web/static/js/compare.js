// Compare: one input, two columns. A custom model answers it alone; its base model answers it with
// k of the custom model's training examples written before it (prompt engineering). Each side shows
// its answer, the tokens it had to read and how long it took, measured here, one after the other.
import { get, post } from "./api.js";
import { announce, errorBox, field, fmt, h, replace } from "./dom.js";

async function runSide(path, body) {
  const started = performance.now();
  const response = await post(path, body);
  const seconds = (performance.now() - started) / 1000;
  const c = response.completions[0];
  return { text: c.data.text, read: response.prompt.tokens.length, generated: c.data.tokens.length, seconds };
}

function column(title, subtitle, side, expected) {
  const match = expected !== null && expected !== undefined
    ? h("p", { class: side.text.trim() === expected.trim() ? "good" : "bad" },
      side.text.trim() === expected.trim() ? "matches the expected answer" : "differs from the expected answer")
    : null;
  return h("section", { class: "side", "aria-label": title },
    h("h2", null, title), h("p", { class: "meta" }, subtitle),
    h("pre", { class: "answer" }, side.text),
    match,
    h("dl", { class: "figures" },
      h("dt", null, "tokens read"), h("dd", { class: "read" }, fmt.num(side.read)),
      h("dt", null, "tokens written"), h("dd", null, fmt.num(side.generated)),
      h("dt", null, "latency"), h("dd", { class: "latency" }, fmt.ms(side.seconds))));
}

export async function compare(main) {
  const models = (await get("/studio/v1/custom-model")).filter((m) => (m.currentEpoch || 0) > 0);
  if (!models.length) {
    replace(main, h("h1", null, "Compare"), h("p", null, "Compare needs a trained custom model. ",
      h("a", { href: "/account", "data-route": "" }, "Train one on the account page"), "."));
    return;
  }
  const select = h("select", { name: "custom" }, models.map((m) => h("option", { value: m.id }, `${m.name} (on ${m.modelType})`)));
  const epoch = h("input", { type: "number", name: "epoch", min: 1, step: 1 });
  const shots = h("input", { type: "number", name: "shots", value: 8, min: 0, max: 64, step: 1 });
  const input = h("textarea", { name: "input", rows: 5, required: true });
  const out = h("div", { class: "compare-out", "aria-live": "polite" });
  const run = h("button", { type: "submit" }, "Compare");
  let expected = null;
  const chosen = () => models.find((m) => m.id === select.value);
  const example = h("button", { type: "button", class: "secondary", onclick: async () => {
    const m = chosen();
    try {
      const page = await get(`/studio/v1/dataset/${m.datasetId}/rows?split=validation&limit=50`);
      const rows = page.rows.length ? page.rows : (await get(`/studio/v1/dataset/${m.datasetId}/rows?limit=50`)).rows;
      const row = rows[Math.floor(Math.random() * rows.length)];
      input.value = row.prompt;
      expected = row.completion;
      announce(`Example row ${row.row} from ${m.datasetName}; expected answer ${JSON.stringify(row.completion)}`);
    } catch (err) {
      replace(out, errorBox(err));
    }
  } }, "Use an example from its dataset");
  function syncEpoch() {
    const m = chosen();
    epoch.max = m.currentEpoch;
    epoch.value = Math.min(m.modelMetadata.defaultEpoch || m.currentEpoch, m.currentEpoch);
  }
  select.addEventListener("change", () => { syncEpoch(); expected = null; });
  input.addEventListener("input", () => { expected = null; });
  syncEpoch();

  const form = h("form", { class: "compare", onsubmit: async (e) => {
    e.preventDefault();
    const m = chosen();
    run.disabled = true;
    replace(out, h("p", { class: "meta" }, "Running the custom model, then its base model with examples…"));
    try {
      const shot = await post(`/studio/v1/custom-model/${m.id}/few-shot`, { prompt: input.value, shots: Number(shots.value), maxTokens: 16 });
      const common = { maxTokens: shot.maxTokens, temperature: 0, stopSequences: shot.stopSequences };
      const custom = await runSide(`/studio/v1/${encodeURIComponent(m.modelType)}/${encodeURIComponent(m.name)}/complete`,
        { prompt: input.value, epoch: Number(epoch.value), ...common });
      const base = await runSide(`/studio/v1/${encodeURIComponent(m.modelType)}/complete`, { prompt: shot.prompt, ...common });
      replace(out,
        h("div", { class: "sides" },
          column(`Custom model: ${m.name}`, `epoch ${epoch.value}, the input alone`, custom, expected),
          column(`Base model: ${m.modelType}`, `${shot.shots} training examples before the input`, base, expected)),
        h("p", { class: "summary" }, `The custom model read ${fmt.num(custom.read)} tokens against ${fmt.num(base.read)} `
          + `and answered in ${fmt.ms(custom.seconds)} against ${fmt.ms(base.seconds)} `
          + `(${(base.seconds / custom.seconds).toFixed(2)}x).`),
        h("details", null, h("summary", null, `The base model's ${shot.shots}-shot prompt`), h("pre", { class: "snippet" }, shot.prompt)));
      announce("Comparison ready");
    } catch (err) {
      replace(out, errorBox(err));
    } finally {
      run.disabled = false;
    }
  } },
  h("div", { class: "grid3" }, field("Custom model", select), field("Epoch", epoch), field("Examples for the base model (k)", shots)),
  field("Input", input, "written as the training prompts were"),
  h("div", { class: "actions" }, run, example));

  replace(main, h("h1", null, "Compare"),
    h("p", { class: "lede" }, "A custom model against its base model prompted with k of its training examples: "
      + "which answers better, and which answers faster."),
    form, out);
}
