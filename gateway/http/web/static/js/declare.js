// /khai-bao: verify a phone, declare (for oneself or a relative), then keep the personal
// code on this device, so it can be shown at the door without a network.
import {
  busy, call, clearFieldErrors, hide, refuseOrVerifyAgain, say, show, t, verifyPhone,
} from "./common.js";

const CODES_KEY = "scangate.codes";
const ANSWERS = [
  "fever", "cough", "shortness_of_breath", "sore_throat",
  "loss_of_taste_or_smell", "contact_with_case", "visited_outbreak_area",
];

if ("serviceWorker" in navigator) {
  // The page and its files, cached for offline use; a failure only costs offline.
  navigator.serviceWorker.register("/sw.js").catch(() => {});
}

function savedCodes() {
  let codes;
  try {
    codes = JSON.parse(localStorage.getItem(CODES_KEY) ?? "[]");
  } catch {
    codes = [];
  }
  if (!Array.isArray(codes)) codes = [];
  // An expired code would be refused at the door: forget it (this may be a shared device).
  const live = codes.filter((c) => Date.parse(c.expires_at) > Date.now());
  if (live.length !== codes.length) localStorage.setItem(CODES_KEY, JSON.stringify(live));
  return live;
}

function saveCode(entry) {
  const others = savedCodes().filter((c) => c.person_id !== entry.person_id);
  localStorage.setItem(CODES_KEY, JSON.stringify([entry, ...others]));
}

function removeCode(personId) {
  localStorage.setItem(
    CODES_KEY, JSON.stringify(savedCodes().filter((c) => c.person_id !== personId)),
  );
}

function expiryText(entry) {
  const when = new Date(entry.expires_at);
  return t("js.code.valid_until", { date: when.toLocaleDateString(document.documentElement.lang) });
}

/** A card for one saved code: the QR large, the name, download, print and remove. */
function codeCard(entry) {
  const card = document.getElementById("code-card").content.firstElementChild.cloneNode(true);
  card.dataset.personId = entry.person_id;
  card.querySelector(".code-name").textContent = entry.name;
  const image = card.querySelector(".code-image");
  image.src = entry.image;
  image.alt = t("js.code.alt", { name: entry.name });
  card.querySelector(".code-meta").textContent = `${entry.person_id} · ${expiryText(entry)}`;
  const download = card.querySelector(".code-download");
  download.href = entry.image;
  download.download = `ma-ca-nhan-${entry.person_id}.png`;
  card.querySelector(".code-print").addEventListener("click", () => {
    card.classList.add("printing");
    document.body.classList.add("printing-code");
    window.print();
  });
  card.querySelector(".code-remove").addEventListener("click", () => {
    removeCode(entry.person_id);
    renderSaved();
  });
  return card;
}

window.addEventListener("afterprint", () => {
  document.body.classList.remove("printing-code");
  for (const card of document.querySelectorAll(".printing")) card.classList.remove("printing");
});

function renderSaved() {
  const list = document.getElementById("saved-list");
  const codes = savedCodes();
  list.replaceChildren(...codes.map(codeCard));
  document.getElementById("saved").hidden = codes.length === 0;
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function declarationBody(form) {
  const data = new FormData(form);
  const answers = {};
  for (const key of ANSWERS) {
    const value = data.get(key);
    if (value === "yes" || value === "no") answers[key] = value === "yes";
  }
  const birth = data.get("birth_year").trim();
  const insurance = data.get("health_insurance_no").trim();
  return {
    full_name: data.get("full_name"),
    national_id: data.get("national_id"),
    // Sent as typed: the gateway says what is wrong with it, as it does for any app.
    birth_year: /^[0-9]{1,4}$/.test(birth) ? Number(birth) : birth,
    gender: data.get("gender"),
    phone: data.get("phone"),
    address: data.get("address"),
    province: data.get("province"),
    health_insurance_no: insurance === "" ? null : insurance,
    on_behalf: data.get("whom") === "relative" ? data.get("on_behalf") : null,
    answers,
  };
}

function start() {
  renderSaved();
  const section = document.getElementById("declaration");
  if (!section) return; // the web pages are not configured here: only saved codes show
  const form = document.getElementById("declaration-form");
  const region = document.getElementById("declaration-message");
  const result = document.getElementById("result");
  const phone = document.getElementById("phone");
  let session = null;

  const askAgain = verifyPhone((verified, restored) => {
    session = verified;
    show(section);
    phone.value = verified.phone;
    // Move focus only after the person verified now, not on a page that just opened.
    if (!restored) document.getElementById("full_name").focus();
  });

  for (const radio of form.querySelectorAll('input[name="whom"]')) {
    radio.addEventListener("change", () => {
      const relative = document.getElementById("whom-relative").checked;
      document.getElementById("relationship-field").hidden = !relative;
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    if (!document.getElementById("truthful").checked) {
      say(region, t("js.fix.truthful"), "error");
      document.getElementById("truthful").focus();
      return;
    }
    await busy(form, async () => {
      try {
        const headers = { "X-Session": session.session };
        const made = await call("POST", "/web/api/declarations", {
          body: declarationBody(form), headers, web: true,
        });
        const png = await call("GET", `/web/api/people/${made.person_id}/code.png`, {
          headers, expect: "blob",
        });
        const entry = {
          person_id: made.person_id,
          name: form.full_name.value.trim(),
          code: made.code,
          expires_at: made.expires_at,
          image: await blobToDataUrl(png),
        };
        saveCode(entry);
        renderSaved();
        // The new code is shown below on its own; the list returns with the next form.
        document.getElementById("saved").hidden = true;
        say(region, "");
        hide(section);
        document.getElementById("result-card").replaceChildren(codeCard(entry));
        show(result);
        document.getElementById("result-heading").focus();
      } catch (refusal) {
        refuseOrVerifyAgain(refusal, { form, region, section, askAgain });
      }
    });
  });

  document.getElementById("declare-another").addEventListener("click", () => {
    renderSaved();
    form.reset();
    clearFieldErrors(form);
    document.getElementById("relationship-field").hidden = true;
    hide(result);
    if (session) phone.value = session.phone;
    show(section);
    document.getElementById("full_name").focus();
  });
}

start();
