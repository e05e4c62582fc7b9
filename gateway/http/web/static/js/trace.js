// /truy-vet: officials sign in with an admin token (kept for this tab only), trace a
// person's contacts, read them in a table and download them as CSV. Every trace is
// audit-logged by the gateway, CSV downloads included.
import { busy, call, clearFieldErrors, explain, hide, markField, say, show, t } from "./common.js";

const TOKEN_KEY = "scangate.admin";
const timezone = document.querySelector('meta[name="timezone"]').content;

const signin = document.getElementById("trace-signin");
const desk = document.getElementById("trace-desk");
const form = document.getElementById("trace-form");
const region = document.getElementById("trace-message");
const table = document.getElementById("trace-table");
const results = document.getElementById("trace-results");
// The query the table on screen answers: the CSV is of the same, whatever the form says now.
let shown = null;
const csvButton = document.getElementById("trace-csv");
const when = new Intl.DateTimeFormat(document.documentElement.lang, {
  dateStyle: "short", timeStyle: "short", timeZone: timezone,
});

function auth() {
  return { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` };
}

function openDesk() {
  hide(signin);
  show(desk);
  document.getElementById("person_id").focus();
}

function query(format) {
  const data = new FormData(form);
  const params = new URLSearchParams({
    days: data.get("days"),
    margin: data.get("margin").trim(),
    min_overlap: data.get("min_overlap").trim(),
    depth: data.get("depth"),
  });
  if (data.get("reveal")) params.set("reveal", "1");
  if (format) params.set("format", format);
  // The table shows one page, the largest the API gives; the CSV has every row.
  else params.set("limit", "5000");
  const person = data.get("person_id").trim().toUpperCase();
  return { person, path: `/v1/trace/${encodeURIComponent(person)}?${params}` };
}

// The gateway names the parameter at the start of its detail ("days: …").
const PARAMETERS = ["person_id", "days", "margin", "min_overlap", "depth"];

function refused(refusal) {
  if (refusal.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    hide(desk);
    show(signin);
    say(document.getElementById("trace-signin-message"), t("js.trace.bad_token"), "error");
    document.getElementById("admin-token").focus();
    return;
  }
  const detail = refusal.body?.detail ?? "";
  const field = PARAMETERS.find((p) => detail.startsWith(p) || detail.startsWith(`margin/${p}`));
  if (refusal.body?.error === "invalid_request" && field) {
    say(region, t(`js.fix.${field}`), "error");
    markField(form, field, region);
  } else {
    say(region, explain(refusal), "error");
  }
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
}

// A venue by the name on its poster, its address and province beneath (an id for a venue
// registered with no app here).
function venueCell(row) {
  const td = cell(row.venue_name ?? row.venue_id);
  if (row.venue_name) {
    td.title = row.venue_id;
    const where = document.createElement("small");
    where.textContent = [row.venue_address, row.venue_province].filter(Boolean).join(", ");
    td.append(document.createElement("br"), where);
  }
  return td;
}

// An end that rests on a visit with no check-out scanned says so, in words, beneath.
function endCell(row) {
  const td = cell(when.format(new Date(row.overlap_end)));
  if (!row.checkout_recorded) {
    const note = document.createElement("small");
    note.textContent = t("js.trace.no_checkout");
    td.append(document.createElement("br"), note);
  }
  return td;
}

function render(person, rows, revealed, more) {
  const body = table.tBodies[0];
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      tr.append(
        cell(row.person_id),
        venueCell(row),
        cell(when.format(new Date(row.overlap_start))),
        endCell(row),
        cell(String(row.overlap_minutes)),
        cell(row.depth === 2 ? `2 (${row.via})` : "1"),
      );
      if (revealed) tr.append(cell(row.full_name ?? "—"), cell(row.phone ?? "—"));
      return tr;
    }),
  );
  table.classList.toggle("revealed", revealed);
  document.getElementById("trace-caption").textContent = t("js.trace.caption", {
    person, count: rows.length,
  });
  results.hidden = false;
  say(region, t(more ? "js.trace.more" : "js.trace.found", { count: rows.length }), "ok");
}

document.getElementById("trace-signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("admin-token");
  if (!input.value.trim()) {
    say(document.getElementById("trace-signin-message"), t("js.trace.bad_token"), "error");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  say(document.getElementById("trace-signin-message"), "");
  openDesk();
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearFieldErrors(form);
  const { person, path } = query();
  await busy(form, async () => {
    try {
      const page = await call("GET", path, { headers: auth() });
      render(person, page.rows, form.reveal.checked, page.next !== null);
      shown = { person, path: query("csv").path };
      csvButton.disabled = false;
    } catch (refusal) {
      results.hidden = true;
      shown = null;
      csvButton.disabled = true;
      refused(refusal);
    }
  });
});

csvButton.addEventListener("click", async () => {
  if (!shown) return;
  const { person, path } = shown;
  try {
    const blob = await call("GET", path, { headers: auth(), expect: "blob" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `truy-vet-${person}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (refusal) {
    refused(refusal);
  }
});

document.getElementById("trace-signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  results.hidden = true;
  shown = null;
  csvButton.disabled = true;
  table.tBodies[0].replaceChildren();
  hide(desk);
  show(signin);
  document.getElementById("admin-token").focus();
});

if (sessionStorage.getItem(TOKEN_KEY)) openDesk();
