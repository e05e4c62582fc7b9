// /quay: door staff sign in with their venue's staff token, then check people in or out by
// phone number (and name, when the phone has several people) or by the ID card's QR text.
import {
  busy, call, clearFieldErrors, explain, hide, markField, newEventId, say, show, t,
} from "./common.js";

const TOKEN_KEY = "scangate.staff";
// Rejections that a fresh venue code (GET /v1/staff/venue) would cure.
const STALE_CODE = new Set(["unknown_key", "bad_signature", "malformed_code"]);

const signin = document.getElementById("door-signin");
const signinForm = document.getElementById("door-signin-form");
const signinRegion = document.getElementById("door-signin-message");
const desk = document.getElementById("door-desk");
const form = document.getElementById("door-form");
const verdict = document.getElementById("door-verdict");
const phoneField = document.getElementById("door-phone-field");
const nameField = document.getElementById("door-name-field");
const cardField = document.getElementById("door-card-field");
let venue = null;

function token() {
  return localStorage.getItem(TOKEN_KEY);
}

function auth() {
  return { Authorization: `Bearer ${token()}` };
}

async function fetchVenue() {
  venue = await call("GET", "/v1/staff/venue", { headers: auth() });
}

async function openDesk() {
  try {
    await fetchVenue();
  } catch (refusal) {
    if (refusal.status === 401) localStorage.removeItem(TOKEN_KEY);
    say(signinRegion, refusal.status === 401 ? t("js.door.bad_token") : explain(refusal), "error");
    show(signin);
    hide(desk);
    document.getElementById("staff-token-input").focus();
    return;
  }
  document.getElementById("door-venue").textContent = venue.name;
  document.getElementById("door-venue-address").textContent = venue.address;
  hide(signin);
  show(desk);
  document.getElementById("door-phone").focus();
}

function showVerdict(good, text) {
  verdict.className = `verdict ${good ? "ok" : "bad"}`;
  verdict.replaceChildren();
  const mark = document.createElement("span");
  mark.className = "verdict-mark";
  mark.setAttribute("aria-hidden", "true");
  mark.textContent = good ? "✓" : "✗";
  const words = document.createElement("span");
  words.textContent = text;
  verdict.append(mark, words);
}

function method() {
  return form.by.value;
}

function syncMethod() {
  const byCard = method() === "id_card";
  phoneField.hidden = byCard;
  cardField.hidden = !byCard;
  if (byCard) nameField.hidden = true;
}

signinForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = document.getElementById("staff-token-input").value.trim();
  if (!value) {
    say(signinRegion, t("js.door.bad_token"), "error");
    return;
  }
  localStorage.setItem(TOKEN_KEY, value);
  signinForm.reset();
  await busy(signinForm, openDesk);
});

for (const radio of form.querySelectorAll('input[name="by"]')) {
  radio.addEventListener("change", syncMethod);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearFieldErrors(form);
  const kind = form.kind.value;
  const body = {
    event_id: newEventId(),
    kind,
    venue_code: venue.venue_code,
    scanned_at: Date.now(),
  };
  if (method() === "phone") {
    body.phone = form.phone.value;
    if (!nameField.hidden && form.full_name.value.trim()) body.full_name = form.full_name.value;
  } else {
    body.id_card = form.id_card.value;
  }
  await busy(form, async () => {
    try {
      let answer = await call("POST", "/v1/scans/manual", { body, headers: auth() });
      if (answer.status === "rejected" && STALE_CODE.has(answer.reason)) {
        // The venue's code was issued with a key since retired: get a fresh one, once.
        await fetchVenue();
        body.venue_code = venue.venue_code;
        body.event_id = newEventId();
        answer = await call("POST", "/v1/scans/manual", { body, headers: auth() });
      }
      if (answer.status === "rejected") {
        showVerdict(false, t(`js.reason.${answer.reason}`));
        return;
      }
      const done = t(answer.status === "duplicate" ? "js.door.duplicate" : `js.door.${kind}`);
      showVerdict(true, done);
      form.phone.value = "";
      form.full_name.value = "";
      form.id_card.value = "";
      nameField.hidden = true;
      (method() === "phone" ? form.phone : form.id_card).focus();
    } catch (refusal) {
      const code = refusal.body?.error;
      if (refusal.status === 401) {
        localStorage.removeItem(TOKEN_KEY);
        hide(desk);
        show(signin);
        say(signinRegion, t("js.door.bad_token"), "error");
        document.getElementById("staff-token-input").focus();
        return;
      }
      if (code === "ambiguous_person") {
        show(nameField);
        showVerdict(false, t("js.door.ambiguous"));
        form.full_name.focus();
        return;
      }
      showVerdict(false, code === "not_found" ? t("js.door.not_found") : explain(refusal));
      const field = code === "invalid_phone" ? "phone" : refusal.body?.field;
      if (field) markField(form, field, verdict);
    }
  });
});

document.getElementById("door-signout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  venue = null;
  hide(desk);
  show(signin);
  say(signinRegion, t("js.door.signed_out"), "ok");
  document.getElementById("staff-token-input").focus();
});

syncMethod();
if (token()) openDesk();
