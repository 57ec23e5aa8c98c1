// The studio's shell: sign-in with an API key, the navigation, and which page a path shows.
import { ApiError, get, session } from "./api.js";
import { account } from "./account.js";
import { compare } from "./compare.js";
import { generatePage } from "./generate.js";
import { errorBox, field, h, replace } from "./dom.js";
import { playground } from "./playground.js";
import { usage } from "./usage.js";

const PAGES = { "/playground": playground, "/compare": compare, "/generate": generatePage, "/account": account,
  "/usage": usage };
const TITLES = { "/playground": "Playground", "/compare": "Compare", "/generate": "Generate data", "/account": "Account",
  "/usage": "Usage" };
let generation = 0;  // a page's pollers stop once another page is shown

function signIn(main, problem) {
  const key = h("input", { type: "password", name: "apiKey", autocomplete: "off", required: true, spellcheck: "false" });
  const form = h("form", { class: "sign-in", method: "post", action: "/", onsubmit: async (e) => {
    e.preventDefault();  // the key goes to sessionStorage and a header, never into a URL
    session.set(key.value.trim());
    key.value = "";
    await route();
  } },
  field("API key", key, "Create one with `amber keys create ACCOUNT`; it stays in this tab only."),
  h("button", { type: "submit" }, "Sign in"));
  replace(main, h("h1", null, "Sign in to Amber Studio"), problem ? errorBox(problem) : null, form);
  document.title = "Sign in · Amber Studio";
  key.focus();
}

async function route() {
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const signOut = document.getElementById("sign-out");
  const mine = ++generation;
  if (!session.key) {
    nav.hidden = true; signOut.hidden = true; who.textContent = "";
    signIn(main);
    return;
  }
  let me;
  try {
    me = await get("/studio/v1/account");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      session.clear();
      nav.hidden = true; signOut.hidden = true; who.textContent = "";
      signIn(main, new Error("That key was not accepted: it is unknown or revoked."));
      return;
    }
    replace(main, errorBox(err));
    return;
  }
  nav.hidden = false; signOut.hidden = false;
  who.textContent = me.name;
  let path = location.pathname in PAGES ? location.pathname : "/playground";
  if (location.pathname !== path) history.replaceState(null, "", path);
  for (const a of nav.querySelectorAll("a")) {
    if (a.getAttribute("href") === path) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.title = `${TITLES[path]} · Amber Studio`;
  replace(main, h("p", { class: "meta" }, "Loading…"));
  try {
    await PAGES[path](main, () => mine === generation);
  } catch (err) {
    replace(main, h("h1", null, TITLES[path]), errorBox(err));
  }
  main.focus({ preventScroll: true });
}

// Links marked data-route change the page without a reload (and without losing the session's key).
document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-route]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);
document.getElementById("sign-out").addEventListener("click", () => {
  session.clear();
  history.pushState(null, "", "/");
  route();
});
route();
