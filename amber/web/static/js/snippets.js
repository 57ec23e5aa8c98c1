// "Copy as": the playground's request as curl, Python with the ai21 SDK, and Python with openai.
// The key is never written into a snippet: each reads it from the environment.

const shellQuote = (s) => `'${s.replaceAll("'", "'\\''")}'`;
const py = (v) => JSON.stringify(v).replaceAll(": true", ": True").replaceAll(": false", ": False");

const SNAKE = { maxTokens: "max_tokens", minTokens: "min_tokens", topP: "top_p", topKReturn: "top_k_return",
  numResults: "num_results", stopSequences: "stop_sequences", temperature: "temperature" };
const PENALTY_SNAKE = { applyToWhitespaces: "apply_to_whitespaces", applyToPunctuations: "apply_to_punctuation",
  applyToNumbers: "apply_to_numbers", applyToStopwords: "apply_to_stopwords", applyToEmojis: "apply_to_emojis" };
const PENALTY_ARGS = { presencePenalty: "presence_penalty", countPenalty: "count_penalty",
  frequencyPenalty: "frequency_penalty" };

// target: {model, custom, epoch}; body: the J2 request body.
export function curl(origin, target, body) {
  const path = target.custom ? `${target.model}/${target.custom}` : target.model;
  const payload = target.custom && target.epoch ? { ...body, epoch: target.epoch } : body;
  return [`curl ${origin}/studio/v1/${path}/complete \\`,
    `  -H "Authorization: Bearer $AI21_API_KEY" \\`,
    `  -H "Content-Type: application/json" \\`,
    `  -d ${shellQuote(JSON.stringify(payload, null, 2))}`].join("\n");
}

export function ai21(origin, target, body) {
  const args = [`    model=${py(target.model)},`];
  if (target.custom) args.push(`    custom_model=${py(target.custom)},`);
  if (target.custom && target.epoch) args.push(`    epoch=${target.epoch},`);
  args.push(`    prompt=${py(body.prompt)},`);
  for (const [k, name] of Object.entries(SNAKE)) if (body[k] !== undefined) args.push(`    ${name}=${py(body[k])},`);
  if (body.logitBias) args.push(`    logit_bias=${py(body.logitBias)},`);
  const penalties = Object.entries(PENALTY_ARGS).filter(([k]) => body[k]);
  for (const [k, name] of penalties) {
    const flags = Object.entries(body[k]).filter(([f]) => f !== "scale").map(([f, v]) => `, ${PENALTY_SNAKE[f]}=${v ? "True" : "False"}`);
    args.push(`    ${name}=Penalty(scale=${body[k].scale}${flags.join("")}),`);
  }
  return [
    "import os",
    "from ai21 import AI21Client",
    penalties.length ? "from ai21.models import Penalty" : null,
    "",
    `client = AI21Client(api_key=os.environ["AI21_API_KEY"], api_host=${py(`${origin}/studio/v1`)})`,
    "response = client.completion.create(",
    ...args,
    ")",
    "for completion in response.completions:",
    "    print(completion.data.text)",
  ].filter((line) => line !== null).join("\n");
}

export function openai(origin, target, body) {
  const args = [`    model=${py(target.custom || target.model)},`, `    prompt=${py(body.prompt)},`,
    `    max_tokens=${body.maxTokens},`, `    temperature=${body.temperature},`, `    top_p=${body.topP},`,
    `    n=${body.numResults},`];
  if (body.stopSequences) args.push(`    stop=${py(body.stopSequences)},`);
  if (body.topKReturn) args.push(`    logprobs=${Math.min(body.topKReturn, 5)},`);
  if (body.presencePenalty) args.push(`    presence_penalty=${body.presencePenalty.scale},`);
  if (body.frequencyPenalty) args.push(`    frequency_penalty=${body.frequencyPenalty.scale},`);
  const notes = [];
  if (body.countPenalty) notes.push("# countPenalty has no OpenAI equivalent; it is left out.");
  if (body.logitBias) notes.push("# logitBias is left out: OpenAI's logit_bias takes token ids, not token strings.");
  if (body.presencePenalty || body.frequencyPenalty) {
    notes.push("# OpenAI's penalties have no applyTo flags and scale differently from J2's.");
  }
  if (target.custom && target.epoch) notes.push("# /v1 serves a custom model's default epoch.");
  return [
    "import os",
    "from openai import OpenAI",
    "",
    ...notes,
    `client = OpenAI(api_key=os.environ["AI21_API_KEY"], base_url=${py(`${origin}/v1`)})`,
    "response = client.completions.create(",
    ...args,
    ")",
    "for choice in response.choices:",
    "    print(choice.text)",
  ].join("\n");
}
