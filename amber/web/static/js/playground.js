// Playground: pick a model (general or one of the account's custom models and an epoch), write a
// prompt, turn the J2 knobs, see each result's tokens with their probabilities, or chat (streamed).
import { get, listModels, post, stream } from "./api.js";
import { announce, errorBox, field, fmt, h, replace } from "./dom.js";
import { paramsForm } from "./params.js";
import * as snippets from "./snippets.js";
import { legend, tokenView } from "./tokens.js";

function modelPicker(models) {
  const general = models.general.map((m) => h("option", { value: `g:${m.name}` },
    m.aliases.length ? `${m.name} (${m.aliases.join(", ")})` : m.name));
  const usable = models.custom.filter((m) => (m.currentEpoch || 0) > 0);
  const custom = usable.map((m) => h("option", { value: `c:${m.id}` }, `${m.name} (on ${m.modelType}, ${m.status.toLowerCase()})`));
  const select = h("select", { name: "model" }, h("optgroup", { label: "General models" }, general),
    custom.length ? h("optgroup", { label: "Your custom models" }, custom) : null);
  const def = models.general.find((m) => m.default);
  if (def) select.value = `g:${def.name}`;
  const epoch = h("select", { name: "epoch" });
  const epochField = field("Epoch", epoch);
  function sync() {
    const m = chosenCustom();
    epochField.hidden = !m;
    if (!m) return;
    replace(epoch, Array.from({ length: m.currentEpoch }, (_, i) => h("option", { value: i + 1 },
      `${i + 1}${i + 1 === (m.modelMetadata.defaultEpoch) ? " (default)" : ""}`)));
    epoch.value = String(Math.min(m.modelMetadata.defaultEpoch || m.currentEpoch, m.currentEpoch));
  }
  function chosenCustom() {
    return select.value.startsWith("c:") ? usable.find((m) => `c:${m.id}` === select.value) : null;
  }
  select.addEventListener("change", sync);
  sync();
  return {
    el: h("div", { class: "grid2" }, field("Model", select), epochField),
    select,
    // {model, custom, epoch}: what the request addresses
    target() {
      const m = chosenCustom();
      return m ? { model: m.modelType, custom: m.name, epoch: Number(epoch.value) }
        : { model: select.value.slice(2), custom: null, epoch: null };
    },
    choose(value) { select.value = value; sync(); },
  };
}

function resultsView(response, seconds) {
  const columns = response.completions.map((c, i) => h("section", { class: "result", "aria-label": `Result ${i + 1}` },
    h("h3", null, `Result ${i + 1}`),
    h("p", { class: "meta" }, `finish: ${c.finishReason.reason}, ${c.data.tokens.length} tokens`),
    h("pre", { class: "completion-text" }, c.data.text),
    tokenView(c.data.tokens, c.data.text, `Result ${i + 1} tokens`)));
  return [
    h("p", { class: "meta" }, `${response.prompt.tokens.length} prompt tokens read, ${fmt.ms(seconds)} round trip`),
    legend(),
    h("div", { class: "results", dataset: { count: String(columns.length) } }, columns),
    h("details", { class: "prompt-tokens" }, h("summary", null, "Prompt tokens"),
      tokenView(response.prompt.tokens, response.prompt.text, "Prompt tokens")),
  ];
}

function copyBar(request) {
  const out = h("pre", { class: "snippet", tabindex: "0", hidden: true, "aria-label": "Code snippet" });
  const kinds = [["curl", "curl"], ["ai21", "Python (ai21 SDK)"], ["openai", "Python (openai)"]];
  const buttons = kinds.map(([kind, label]) => h("button", {
    type: "button", class: "chip", onclick: async () => {
      let made;
      try {
        made = request();
      } catch (err) {
        out.textContent = err.message;
        out.hidden = false;
        return;
      }
      out.textContent = snippets[kind](location.origin, made.target, made.body);
      out.hidden = false;
      try {
        await navigator.clipboard.writeText(out.textContent);
        announce(`Copied as ${label}`);
      } catch {
        announce(`Shown as ${label}; select it to copy`);
      }
    },
  }, label));
  return h("div", { class: "copy" }, h("div", { role: "group", "aria-label": "Copy as" }, "Copy as: ", buttons), out);
}

function chatPanel(picker, params) {
  const messages = [];
  const log = h("ol", { class: "chat-log", "aria-live": "polite", "aria-label": "Conversation" });
  const input = h("textarea", { name: "message", rows: 3, required: true });
  const system = h("input", { type: "text", name: "system", value: "You are a helpful assistant." });
  const send = h("button", { type: "submit" }, "Send");
  let controller;
  const stop = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => controller && controller.abort() }, "Stop");
  const form = h("form", { class: "chat", onsubmit: async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const target = picker.target();
    messages.push({ role: "user", content: text });
    log.append(h("li", { class: "msg user" }, h("strong", null, "You: "), h("span", null, text)));
    const reply = h("span", null, "");
    const item = h("li", { class: "msg assistant" }, h("strong", null, `${target.model}: `), reply);
    log.append(item);
    input.value = "";
    send.disabled = true;
    stop.hidden = false;
    controller = new AbortController();
    const body = params.body();
    try {
      await stream("/studio/v1/chat/completions", {
        model: target.model, stream: true, max_tokens: body.maxTokens || 64, temperature: body.temperature,
        top_p: body.topP, messages: [{ role: "system", content: system.value }, ...messages],
      }, (chunk) => { reply.textContent += chunk.choices[0].delta.content || ""; }, controller.signal);
      messages.push({ role: "assistant", content: reply.textContent });
    } catch (err) {
      if (err.name === "AbortError") messages.push({ role: "assistant", content: reply.textContent });
      else item.append(errorBox(err));
    } finally {
      send.disabled = false;
      stop.hidden = true;
    }
  } },
  field("System", system), log, field("Message", input), h("div", { class: "actions" }, send, stop));
  return form;
}

export async function playground(main) {
  const models = await listModels();
  const picker = modelPicker(models);
  const params = paramsForm();
  const prompt = h("textarea", { name: "prompt", rows: 8, required: true, spellcheck: "false" },
    "Write a tagline for an ice cream shop:");
  const out = h("div", { class: "output", "aria-live": "polite" });
  const run = h("button", { type: "submit" }, "Run");
  let controller;
  const stop = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => controller && controller.abort() }, "Stop");
  const request = () => ({ target: picker.target(), body: { prompt: prompt.value, ...params.body() } });

  const completeForm = h("form", { class: "complete", onsubmit: async (e) => {
    e.preventDefault();
    let target, body;
    try {
      ({ target, body } = request());
    } catch (err) {
      replace(out, errorBox(err));
      return;
    }
    const path = target.custom ? `/studio/v1/${encodeURIComponent(target.model)}/${encodeURIComponent(target.custom)}/complete`
      : `/studio/v1/${encodeURIComponent(target.model)}/complete`;
    if (target.custom) body.epoch = target.epoch;
    run.disabled = true;
    stop.hidden = false;
    controller = new AbortController();
    replace(out, h("p", { class: "meta" }, "Running…"));
    const started = performance.now();
    try {
      const response = await post(path, body, { signal: controller.signal });
      replace(out, resultsView(response, (performance.now() - started) / 1000));
      announce(`${response.completions.length} result${response.completions.length > 1 ? "s" : ""} ready`);
    } catch (err) {
      replace(out, err.name === "AbortError" ? h("p", { class: "meta" }, "Stopped.") : errorBox(err));
    } finally {
      run.disabled = false;
      stop.hidden = true;
    }
  } },
  field("Prompt", prompt), h("div", { class: "actions" }, run, stop), copyBar(request));

  const chat = chatPanel(picker, params);
  const modeComplete = h("input", { type: "radio", name: "mode", value: "complete", checked: true });
  const modeChat = h("input", { type: "radio", name: "mode", value: "chat" });
  function syncMode() {
    const chatting = modeChat.checked;
    completeForm.hidden = chatting;
    out.hidden = chatting;
    chat.hidden = !chatting;
  }
  function syncModel() {
    const custom = !!picker.target().custom;
    modeChat.disabled = custom;  // custom models are completion models
    if (custom && modeChat.checked) { modeComplete.checked = true; syncMode(); }
  }
  modeComplete.addEventListener("change", syncMode);
  modeChat.addEventListener("change", syncMode);
  picker.select.addEventListener("change", syncModel);
  syncMode();
  const wanted = new URLSearchParams(location.search).get("model");  // a model name, never a key
  if (wanted) {
    const custom = models.custom.find((m) => m.name === wanted || m.id === wanted);
    picker.choose(custom ? `c:${custom.id}` : `g:${wanted}`);
    syncModel();
  }

  replace(main,
    h("h1", null, "Playground"),
    h("div", { class: "playground" },
      h("div", { class: "controls" }, picker.el,
        h("fieldset", { class: "mode" }, h("legend", null, "Mode"),
          h("label", { class: "check" }, modeComplete, " Complete"), h("label", { class: "check" }, modeChat, " Chat (streamed)")),
        params.el),
      h("div", { class: "work" }, completeForm, chat, out)));
}
