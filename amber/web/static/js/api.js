// The studio's one door to the server: the public APIs, with the key from this tab's sessionStorage
// in the Authorization header (never in a URL), and errors turned into one readable sentence.

const KEY = "amber.apiKey";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message, detail) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI's {detail: str | [{loc, msg}]} and OpenAI's {error: {message}} as one sentence.
export function describe(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".") || "request"}: ${d.msg}`).join("; ");
  }
  if (typeof detail === "string") return detail;
  if (body && body.error && body.error.message) return body.error.message;
  return `the server answered ${status}`;
}

function headers(extra) {
  const h = { ...extra };
  if (session.key) h.Authorization = `Bearer ${session.key}`;
  return h;
}

export async function request(method, path, { json, form, signal, raw } = {}) {
  const init = { method, headers: headers(json ? { "Content-Type": "application/json" } : {}), signal };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form !== undefined) init.body = form;
  const response = await fetch(path, init);
  if (raw && response.ok) return response;
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const retry = response.headers.get("retry-after");
    const suffix = response.status === 429 && retry ? ` (try again in ${retry} s)` : "";
    throw new ApiError(response.status, describe(response.status, body) + suffix, body && body.detail);
  }
  return body;
}

export const get = (path, opts) => request("GET", path, opts);
export const post = (path, json, opts) => request("POST", path, { ...opts, json });
export const put = (path, json) => request("PUT", path, { json });
export const patch = (path, json) => request("PATCH", path, { json });
export const del = (path) => request("DELETE", path);

// Server-sent events from a POST (fetch, since EventSource cannot send a body or a header):
// calls onEvent with each `data:` JSON object until [DONE].
export async function stream(path, json, onEvent, signal) {
  const response = await request("POST", path, { json, signal, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed.error.message || "the stream failed", parsed);
        onEvent(parsed);
      }
    }
  }
}

// Models a playground can run: the general ones, and the account's custom models with their epochs.
export async function listModels() {
  const [general, custom] = await Promise.all([get("/studio/v1/models"), get("/studio/v1/custom-model")]);
  return { general: general.models, custom };
}
