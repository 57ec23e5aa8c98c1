// The J2 parameters as form controls, presets over them, and the request body they make.
import { field, h } from "./dom.js";

const APPLY_TO = [
  ["applyToWhitespaces", "whitespace"], ["applyToPunctuations", "punctuation"], ["applyToNumbers", "numbers"],
  ["applyToStopwords", "stopwords"], ["applyToEmojis", "emojis"],
];
const PENALTIES = [["presencePenalty", "Presence penalty"], ["countPenalty", "Count penalty"],
  ["frequencyPenalty", "Frequency penalty"]];

export const PRESETS = {
  Balanced: { temperature: 0.7, topP: 1, maxTokens: 64, presencePenalty: 0, countPenalty: 0, frequencyPenalty: 0 },
  Precise: { temperature: 0, topP: 1, maxTokens: 64, presencePenalty: 0, countPenalty: 0, frequencyPenalty: 0 },
  Creative: { temperature: 1.0, topP: 0.95, maxTokens: 128, presencePenalty: 0.4, countPenalty: 0.2, frequencyPenalty: 0 },
  Classify: { temperature: 0, topP: 1, maxTokens: 4, stopSequences: "\\n", presencePenalty: 0, countPenalty: 0, frequencyPenalty: 0 },
};

function number(name, value, attrs) {
  return h("input", { type: "number", name, value, inputmode: "decimal", ...attrs });
}

export function paramsForm() {
  const controls = {
    maxTokens: number("maxTokens", 64, { min: 0, max: 2048, step: 1 }),
    minTokens: number("minTokens", 0, { min: 0, max: 2048, step: 1 }),
    temperature: number("temperature", 0.7, { min: 0, max: 5, step: 0.05 }),
    topP: number("topP", 1, { min: 0, max: 1, step: 0.01 }),
    topKReturn: number("topKReturn", 5, { min: 0, max: 64, step: 1 }),
    numResults: number("numResults", 1, { min: 1, max: 16, step: 1 }),
    stopSequences: h("input", { type: "text", name: "stopSequences", value: "", autocomplete: "off" }),
    logitBias: h("input", { type: "text", name: "logitBias", value: "", autocomplete: "off", spellcheck: "false",
      placeholder: '{"▁banana": -5}' }),
  };
  const penalties = PENALTIES.map(([name, label]) => {
    const scale = number(`${name}.scale`, 0, { min: 0, max: 500, step: 0.05 });
    const flags = APPLY_TO.map(([flag, text]) => {
      const box = h("input", { type: "checkbox", name: `${name}.${flag}`, checked: true });
      return { flag, box, el: h("label", { class: "check" }, box, ` ${text}`) };
    });
    controls[name] = scale;
    return { name, scale, flags,
      el: h("fieldset", { class: "penalty" }, h("legend", null, label), field("scale", scale),
        h("div", { class: "flags", role: "group", "aria-label": `${label} applies to` }, flags.map((f) => f.el))) };
  });
  const presetButtons = Object.keys(PRESETS).map((name) =>
    h("button", { type: "button", class: "chip", onclick: () => apply(PRESETS[name]), "aria-label": `Preset: ${name}` }, name));

  function apply(preset) {
    for (const [name, value] of Object.entries(preset)) controls[name].value = value;
    controls.stopSequences.value = preset.stopSequences || "";
    controls.logitBias.value = "";
  }

  const el = h("fieldset", { class: "params" }, h("legend", null, "Parameters"),
    h("div", { class: "presets", role: "group", "aria-label": "Presets" }, "Presets: ", presetButtons),
    h("div", { class: "grid2" },
      field("Max tokens", controls.maxTokens), field("Min tokens", controls.minTokens),
      field("Temperature", controls.temperature), field("Top P", controls.topP),
      field("Results (numResults)", controls.numResults), field("Top alternatives (topKReturn)", controls.topKReturn)),
    field("Stop sequences", controls.stopSequences, "comma-separated; write \\n for a line break"),
    h("details", null, h("summary", null, "Penalties"), penalties.map((p) => p.el)),
    field("Logit bias", controls.logitBias, "a JSON object of J2 token strings to biases, -100..100"));

  // The J2 request body these controls describe (the prompt is added by the caller).
  function body() {
    const out = {};
    for (const name of ["maxTokens", "minTokens", "topKReturn", "numResults"]) out[name] = Number(controls[name].value);
    for (const name of ["temperature", "topP"]) out[name] = Number(controls[name].value);
    const stops = controls.stopSequences.value.split(",").map((s) => s.trim().replaceAll("\\n", "\n")).filter(Boolean);
    if (stops.length) out.stopSequences = stops;
    const bias = controls.logitBias.value.trim();
    if (bias) {
      let parsed;
      try { parsed = JSON.parse(bias); } catch { parsed = null; }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new Error('logitBias: write a JSON object such as {"▁banana": -5}');
      }
      out.logitBias = parsed;
    }
    for (const p of penalties) {
      const scale = Number(p.scale.value);
      if (!scale) continue;
      out[p.name] = { scale };
      for (const f of p.flags) out[p.name][f.flag] = f.box.checked;
    }
    return out;
  }
  return { el, body };
}
