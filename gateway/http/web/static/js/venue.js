// /dang-ky-diem: verify the venue's phone, register the venue, then its poster.
import {
  busy, call, clearFieldErrors, hide, refuseOrVerifyAgain, say, show, verifyPhone,
} from "./common.js";

function start() {
  const section = document.getElementById("registration");
  if (!section) return; // the web pages are not configured here
  const form = document.getElementById("venue-form");
  const region = document.getElementById("venue-message");
  const done = document.getElementById("registered");
  let session = null;

  const askAgain = verifyPhone((verified, restored) => {
    session = verified;
    document.getElementById("venue-phone").value = verified.phone;
    show(section);
    if (!restored) document.getElementById("name").focus();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const data = new FormData(form);
    await busy(form, async () => {
      try {
        const made = await call("POST", "/web/api/venues", {
          body: {
            name: data.get("name"),
            kind: data.get("kind"),
            phone: data.get("phone"),
            address: data.get("address"),
            province: data.get("province"),
          },
          headers: { "X-Session": session.session },
          web: true,
        });
        const venueId = made.venue_id;
        document.getElementById("venue-id").textContent = venueId;
        const base = `/web/api/venues/${venueId}/poster`;
        const pdf = document.getElementById("poster-pdf");
        pdf.href = `${base}.pdf`;
        pdf.download = `poster-${venueId}.pdf`;
        const png = document.getElementById("poster-png");
        png.href = `${base}.png`;
        png.download = `poster-${venueId}.png`;
        document.getElementById("poster-print").href = `${base}.pdf`;
        say(region, "");
        hide(section);
        show(done);
        document.getElementById("registered-heading").focus();
      } catch (refusal) {
        refuseOrVerifyAgain(refusal, { form, region, section, askAgain });
      }
    });
  });

}

start();
