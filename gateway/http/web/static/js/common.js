// What every page shares: its messages, calls to the gateway, how an answer the gateway
// refused is told to a person, and the phone-verification step.

const messages = JSON.parse(document.getElementById("messages").textContent);
const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

/** The page's message `key` in its language, with `{name}` placeholders filled. */
export function t(key, vars = {}) {
  let text = messages[key] ?? messages["js.err.unknown"] ?? key;
  for (const [name, value] of Object.entries(vars)) {
    text = text.replaceAll(`{${name}}`, String(value));
  }
  return text;
}

export function has(key) {
  return Object.hasOwn(messages, key);
}

/** A refused call: the HTTP status (0 when the network failed) and the gateway's body. */
export class Refusal extends Error {
  constructor(status, body) {
    super(body.error ?? `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/**
 * Call the gateway. `web: true` marks a call to the same-origin endpoints that act as the
 * web app: they need the page's CSRF token. Resolves with the JSON (or a Blob, or text);
 * rejects with a Refusal.
 */
export async function call(method, path, { body, headers = {}, web = false, expect = "json" } = {}) {
  const sent = { ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  if (web) sent["X-CSRF-Token"] = csrfToken;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
  } catch {
    throw new Refusal(0, { error: "network" });
  }
  if (!response.ok) {
    let doc = {};
    try {
      doc = await response.json();
    } catch {
      doc = {};
    }
    doc.retry_after_s = Number(response.headers.get("Retry-After") || 0);
    throw new Refusal(response.status, doc);
  }
  if (expect === "blob") return response.blob();
  if (expect === "text") return response.text();
  return response.json();
}

/** What went wrong, in words a person understands (never the gateway's English detail). */
export function explain(refusal) {
  const body = refusal.body ?? {};
  const code = body.error ?? "unknown";
  if (code === "invalid_field" || code === "invalid_phone") {
    const field = code === "invalid_phone" ? "phone" : body.field;
    return has(`js.fix.${field}`) ? t(`js.fix.${field}`) : t("js.err.invalid_field");
  }
  const minutes = Math.max(1, Math.ceil((body.retry_after_s || 60) / 60));
  if (code === "otp_invalid") {
    const tries = body.tries_left ?? 0;
    return tries > 0 ? t("js.err.otp_invalid", { tries }) : t("js.err.otp_spent");
  }
  if (has(`js.err.${code}`)) return t(`js.err.${code}`, { minutes });
  return t("js.err.unknown", { status: refusal.status });
}

/** Show `text` in a message region; `tone` is "error", "ok" or "" (neutral). */
export function say(region, text, tone = "") {
  region.textContent = text;
  region.className = `message ${tone}`.trim();
}

export function clearFieldErrors(form) {
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    // Back to the field's own hint, without the message that was added to it.
    if (el.dataset.describedby !== undefined) {
      if (el.dataset.describedby) el.setAttribute("aria-describedby", el.dataset.describedby);
      else el.removeAttribute("aria-describedby");
      delete el.dataset.describedby;
    }
  }
  for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
}

/** Mark one input as refused, described by its hint and by the message `region`. */
export function markInput(input, region) {
  input.setAttribute("aria-invalid", "true");
  if (!region.id) return;
  if (input.dataset.describedby === undefined) {
    input.dataset.describedby = input.getAttribute("aria-describedby") ?? "";
  }
  const ids = new Set(input.dataset.describedby.split(" ").filter(Boolean));
  ids.add(region.id);
  input.setAttribute("aria-describedby", [...ids].join(" "));
}

/** Mark the field the gateway named (`answers.fever`, `phone`…) and move focus to it. */
export function markField(form, field, region) {
  const box = form.querySelector(`[data-field="${CSS.escape(field ?? "")}"]`);
  if (!box) return false;
  box.classList.add("invalid");
  const inputs = box.querySelectorAll("input, select, textarea");
  for (const input of inputs) markInput(input, region);
  inputs[0]?.focus();
  return true;
}

/** Report a refusal from a form's submission: the message, and the field it is about. */
export function refuse(form, region, refusal) {
  say(region, explain(refusal), "error");
  const body = refusal.body ?? {};
  const field = body.error === "invalid_phone" ? "phone" : body.field;
  if (field) markField(form, field, region);
}

/**
 * Report a refusal of a form that sends the phone's session: when the session has run out
 * (401), hide the form and ask for the phone again; otherwise as `refuse`.
 */
export function refuseOrVerifyAgain(refusal, { form, region, section, askAgain }) {
  if (refusal.status === 401) {
    hide(section);
    askAgain(t("js.err.session"));
    return;
  }
  refuse(form, region, refusal);
}

/** Disable a form's buttons while `work` runs, so a double tap sends once. */
export async function busy(form, work) {
  const buttons = form.querySelectorAll("button");
  const focused = document.activeElement;
  for (const b of buttons) b.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    for (const b of buttons) b.disabled = false;
    form.removeAttribute("aria-busy");
    // Disabling the focused button dropped focus to the page: give it back, unless the
    // work moved it somewhere on purpose.
    const lost = document.activeElement === document.body || document.activeElement === null;
    if (lost && focused instanceof HTMLElement && focused.isConnected && !focused.closest("[hidden]")) {
      focused.focus();
    }
  }
}

/** A fresh scan event id (8 to 64 of A-Za-z0-9_-): W and 22 random base64url characters. */
export function newEventId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  const b64 = btoa(String.fromCharCode(...bytes));
  return "W" + b64.replaceAll("+", "-").replaceAll("/", "_").replaceAll("=", "");
}

export function show(...elements) {
  for (const el of elements) el.hidden = false;
}

export function hide(...elements) {
  for (const el of elements) el.hidden = true;
}

const SESSION_KEY = "scangate.session";

/** The verified phone's session, while it lasts (kept for this tab only). */
export function currentSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) ?? "null");
    if (saved && Date.parse(saved.expires_at) > Date.now() + 30_000) return saved;
  } catch {
    // a damaged entry: ask again
  }
  sessionStorage.removeItem(SESSION_KEY);
  return null;
}

export function forgetSession() {
  sessionStorage.removeItem(SESSION_KEY);
}

/**
 * The phone-verification step (_otp.html): phone, SMS code, session. Calls
 * `onVerified(session, restored)`, at once (restored = true) when this tab already has a
 * live session.
 */
export function verifyPhone(onVerified) {
  const section = document.getElementById("otp");
  const phoneForm = document.getElementById("otp-phone-form");
  const codeForm = document.getElementById("otp-code-form");
  const region = document.getElementById("otp-message");
  const phoneInput = document.getElementById("otp-phone");
  const codeInput = document.getElementById("otp-code");

  // The code asked for last: its challenge goes back with the digits, so the code works
  // even when the phone changes network in between.
  let challenge;
  const done = (session, restored = false) => {
    hide(section);
    onVerified(session, restored);
  };
  phoneForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(phoneForm);
    await busy(phoneForm, async () => {
      try {
        const sent = await call("POST", "/web/api/otp", {
          body: { phone: phoneInput.value },
          web: true,
        });
        challenge = sent.challenge;
        hide(phoneForm);
        show(codeForm);
        codeInput.value = "";
        codeInput.focus();
        say(region, t("js.otp.sent", { reference: sent.reference }), "ok");
      } catch (refusal) {
        refuse(phoneForm, region, refusal);
      }
    });
  });
  codeForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(codeForm);
    await busy(codeForm, async () => {
      try {
        const answer = await call("POST", "/web/api/otp/verify", {
          body: { phone: phoneInput.value, code: codeInput.value.trim(), challenge },
          web: true,
        });
        const session = { ...answer, phone: phoneInput.value.trim() };
        sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
        say(region, "");
        done(session);
      } catch (refusal) {
        say(region, explain(refusal), "error");
        markInput(codeInput, region);
        codeInput.focus();
      }
    });
  });
  document.getElementById("otp-again").addEventListener("click", () => {
    hide(codeForm);
    show(phoneForm);
    say(region, "");
    phoneInput.focus();
  });
  const live = currentSession();
  if (live) done(live, true);
  // To ask again (the session ran out): show the step from its start.
  return (why) => {
    forgetSession();
    show(section, phoneForm);
    hide(codeForm);
    say(region, why ?? "", why ? "error" : "");
    phoneInput.focus();
  };
}
