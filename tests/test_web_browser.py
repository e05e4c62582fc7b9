"""The web pages in a real browser: Debian's chromium, headless, driven by the Python
``playwright`` package, against ``scangate serve`` on its embedded defaults.

Each flow runs end to end as a person would: the citizen declares and gets a personal QR
code, which is screenshotted off the page and decoded with a real QR decoder, then checks
in through ``POST /v1/scans``; the venue registers and gets its poster and a staff token;
the door desk checks people in, and the check-in reaches storage; an official traces a
case and downloads the CSV. axe-core (from the npm registry, ``tests/browser``) checks
every page in both languages, and in each state a flow reaches, for serious or critical
violations. Every page is also checked at 360 px wide for sideways scrolling, and for
console errors (a content security policy violation is one).

Screenshots go to ``artifacts/screenshots/`` (``SCANGATE_SCREENSHOT_DIR`` to change it),
which CI keeps as artifacts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image

from gateway.http.people import ANSWER_KEYS
from signing import Sealer, load_master_key
from signing.personal import PersonalData, open_data_key

from .servers import free_loopback_port, scangate_env
from .test_declarations import declaration

playwright_sync = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parent.parent
BROWSER_TOOLS = Path(__file__).resolve().parent / "browser"
AXE = BROWSER_TOOLS / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = Path(os.environ.get("SCANGATE_SCREENSHOT_DIR", ROOT / "artifacts" / "screenshots"))
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # The machine's network is closed: no calls home, no updates, no sync.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGES = ["/", "/khai-bao", "/dang-ky-diem", "/quay", "/truy-vet"]
PHONE = "0912345678"
PHONE_2 = "0387654321"
VENUE_PHONE = "0978123456"
DOOR_PHONE = "0701234567"  # only the door test declares with it
CARD = "079090001234|123456789|Trần Văn Bình|15081990|Nam|5 Hai Bà Trưng, Hoàn Kiếm|01012021"
PHONE_VIEWPORT = {"width": 360, "height": 740}
pytestmark = pytest.mark.timeout(300)


def _need(what: str, how: str) -> None:
    message = f"{what} is missing: {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    path = os.environ.get("SCANGATE_CHROMIUM") or shutil.which("chromium")
    if path is None:
        _need("chromium", "apt-get install chromium (or set SCANGATE_CHROMIUM)")
    assert path is not None
    return path


def axe_source() -> str:
    if not AXE.exists():
        if shutil.which("npm") is None:
            _need("axe-core", "install Node.js and npm, then npm ci --prefix tests/browser")
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(BROWSER_TOOLS)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return AXE.read_text()


# -- the gateway under test ----------------------------------------------------------------


@dataclass
class Site:
    url: str
    data_dir: Path
    web_token: str
    admin_token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--data-dir", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=scangate_env(),
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def sms_count(self) -> int:
        path = self.data_dir / "sms.log"
        return len(path.read_bytes().splitlines()) if path.exists() else 0

    def otp_after(self, count: int, phone: str) -> str:
        """The code of the first SMS after the first ``count`` ones (the log sender)."""
        wanted = "+84" + phone.removeprefix("0")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            path = self.data_dir / "sms.log"
            lines = path.read_bytes().splitlines() if path.exists() else []
            for line in lines[count:]:
                message = json.loads(line)
                if message["to"] == wanted:
                    (code,) = re.findall(r"\b\d{6}\b", message["text"])
                    return str(code)
            time.sleep(0.1)
        raise AssertionError(f"no SMS to {wanted}")

    def stored(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.data_dir / "scangate.db", timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def wait_stored(self, sql: str, *params: object, rows: int = 1) -> list[tuple[Any, ...]]:
        """Rows once the flusher has stored them (it polls every 50 ms here)."""
        deadline = time.monotonic() + 20
        found: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            found = self.stored(sql, *params)
            if len(found) >= rows:
                return found
            time.sleep(0.1)
        raise AssertionError(f"storage has {found!r}, wanted {rows} rows of {sql}")

    def declared_answers(self, person_id: str) -> dict[str, Any]:
        """A person's one declaration, decrypted as an official's tool would."""
        ((sealed,),) = self.stored("SELECT sealed FROM data_keys")
        personal = PersonalData(open_data_key(Sealer(load_master_key(None, self.data_dir)), sealed))
        ((blob,),) = self.stored(
            "SELECT answers_enc FROM declarations WHERE person_id = ?", person_id
        )
        doc: dict[str, Any] = json.loads(personal.decrypt(blob, "declaration.answers", person_id))
        return doc

    def post_scans(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + "/v1/scans",
            data=json.dumps({"events": events}).encode(),
            headers={
                "Authorization": f"Bearer {self.web_token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            result: dict[str, Any] = json.load(answer)
            return result


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """``scangate serve`` on its embedded defaults (its own Valkey, SQLite), with the web
    app ``web`` and an admin."""
    data_dir = tmp_path_factory.mktemp("web")
    env = scangate_env()

    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--data-dir", str(data_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=env,
        )
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    web_token = cli("apps", "add", "web", "--name", "Khai báo y tế")["token"]
    admin_token = cli("admins", "add", "so-y-te")["token"]
    port = free_loopback_port()
    log = data_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "--data-dir",
                str(data_dir),
                "serve",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env={**env, "SCANGATE_WEB_APP": "web", "SCANGATE_FLUSH_MAX_AGE": "50ms"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url + "/readyz", timeout=2) as answer,
        ):
            if answer.status == 200:
                break
        assert time.monotonic() < deadline, "serve did not become ready:\n" + log.read_text()
        time.sleep(0.2)
    try:
        yield Site(url, data_dir, web_token, admin_token, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    with playwright_sync.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def axe() -> str:
    return axe_source()


@dataclass
class Tab:
    """A page in a fresh browser context, with its console errors collected."""

    page: Any
    context: Any
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # files the page could not load

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    def no_errors(self, also: str | None = None) -> None:
        """Nothing went wrong in the page: no script error, no CSP violation. A call the
        gateway refused on purpose (a test of an error path) is logged by the browser as
        a failed resource; those are not errors of the page."""
        # The browser logs every refused call as a failed resource; what failed is checked
        # from the responses instead: only calls to the gateway may be refused.
        logged = re.compile(r"Failed to load resource: the server responded with a status of")
        expected = re.compile(also) if also else None
        assert [
            e
            for e in self.errors
            if not logged.match(e) and not (expected is not None and expected.match(e))
        ] == []
        assert self.failed == []


@pytest.fixture
def tab_factory(browser: Any, site: Site) -> Iterator[Callable[..., Tab]]:
    contexts: list[Any] = []

    def open_tab(viewport: dict[str, int] = PHONE_VIEWPORT, **options: Any) -> Tab:
        context = browser.new_context(
            base_url=site.url, viewport=viewport, accept_downloads=True, **options
        )
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        tab = Tab(page, context)
        page.on(
            "console",
            lambda m: tab.errors.append(m.text) if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: tab.errors.append(str(e)))

        def check_response(response: Any) -> None:
            path = urllib.parse.urlsplit(response.url).path
            if response.status >= 400 and not path.startswith(("/web/api/", "/v1/")):
                tab.failed.append(f"{response.status} {path}")

        page.on("response", check_response)
        return tab

    yield open_tab
    for context in contexts:
        context.close()


def see(locator: Any, text: str, timeout_ms: int = 15_000) -> None:
    """Wait until ``locator`` shows ``text``; on a timeout, say what it showed instead."""
    try:
        locator.filter(has_text=text).wait_for(timeout=timeout_ms)
    except playwright_sync.TimeoutError:
        shown = locator.first.inner_text() if locator.count() else "(nothing)"
        raise AssertionError(f"wanted {text!r}, the page shows {shown!r}") from None


def check_accessibility(tab: Tab, axe: str, where: str) -> None:
    """axe-core, injected into the page as it is now: no serious or critical violation."""
    page = tab.page
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        # Evaluated through the DevTools protocol: the page's CSP is not loosened for it.
        page.evaluate(axe)
    results = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in results
        if v["impact"] in ("serious", "critical")
    ]
    assert bad == [], f"{where}: {bad}"


def check_fits_a_phone(tab: Tab, where: str) -> None:
    width = tab.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE_VIEWPORT["width"], f"{where} scrolls sideways: {width}px wide"


def verify_phone(tab: Tab, site: Site, phone: str) -> None:
    page = tab.page
    before = site.sms_count()
    page.get_by_label(re.compile("^(Số điện thoại|Phone number)$")).first.fill(phone)
    page.locator("#otp-phone-form button[type=submit]").click()
    page.locator("#otp-code").wait_for(state="visible")
    page.locator("#otp-code").fill(site.otp_after(before, phone))
    page.locator("#otp-code-form button[type=submit]").click()
    page.locator("#otp").wait_for(state="hidden")


# The declaration form's labels, as a person reads them, in each language.
FORM_LABELS = {
    "vi": {
        "full_name": "Họ và tên",
        "national_id": "Số CCCD / CMND / hộ chiếu",
        "birth_year": "Năm sinh",
        "address": "Địa chỉ",
        "province": "Tỉnh / thành phố",
        "truthful": "Tôi cam kết những thông tin trên là đúng sự thật.",
    },
    "en": {
        "full_name": "Full name",
        "national_id": "Citizen ID / ID card / passport number",
        "birth_year": "Year of birth",
        "address": "Address",
        "province": "Province / city",
        "truthful": "I declare that the information above is true.",
    },
}


def fill_declaration(
    page: Any,
    name: str,
    national_id: str,
    *,
    lang: str = "vi",
    birth_year: str = "1990",
    gender: str = "female",
    address: str = "12 Lê Lợi, Phường Bến Nghé",
    province: str = "Hồ Chí Minh",
    answered: Sequence[str] = ANSWER_KEYS,
    fever: bool = False,
) -> None:
    """Fill the form by its labels; the questions in ``answered`` (No, or Yes to fever)."""
    label = FORM_LABELS[lang]
    page.get_by_label(label["full_name"]).fill(name)
    page.get_by_label(label["national_id"]).fill(national_id)
    page.get_by_label(label["birth_year"]).fill(birth_year)
    page.locator(f"#gender-{gender}").check()
    page.get_by_label(label["address"]).fill(address)
    page.get_by_label(label["province"]).select_option(province)
    for key in answered:
        page.locator(f"#{key}-{'yes' if key == 'fever' and fever else 'no'}").check()
    page.get_by_label(label["truthful"]).check()


def decode_qr(png: bytes) -> str:
    results = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert len(results) == 1, f"{len(results)} codes in the screenshot"
    text: str = results[0].text
    return text


# -- the pages, each alone ---------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["vi", "en"])
def test_every_page_is_accessible_fits_a_phone_and_runs_under_its_csp(
    tab_factory: Callable[..., Tab], axe: str, lang: str
) -> None:
    tab = tab_factory()
    for path in PAGES:
        answer = tab.page.goto(f"{path}?lang={lang}")
        assert answer is not None and answer.status == 200
        headers = answer.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert tab.page.locator("html").get_attribute("lang") == lang
        tab.page.wait_for_load_state("networkidle")
        name = path.strip("/") or "index"
        tab.shot(f"{name}-{lang}-360")
        check_fits_a_phone(tab, f"{path}?lang={lang}")
        check_accessibility(tab, axe, f"{path}?lang={lang}")
    tab.no_errors()


def test_vietnamese_by_default_and_the_switch_remembers_english(
    tab_factory: Callable[..., Tab],
) -> None:
    tab = tab_factory()
    page = tab.page
    page.goto("/")
    assert page.locator("h1").inner_text() == "Khai báo y tế và quét mã QR"
    page.get_by_role("link", name="English").click()
    page.wait_for_url(re.compile(r"\?lang=en$"))
    assert page.locator("h1").inner_text() == "Health declaration and QR check-in"
    # The choice sticks: a page opened afterwards, without ?lang, is in English too.
    page.get_by_role("navigation").get_by_role("link", name="Door desk").click()
    page.wait_for_url(re.compile("/quay$"))
    assert page.locator("h1").inner_text() == "Door desk"
    page.get_by_role("link", name="Tiếng Việt").click()
    assert page.locator("h1").inner_text() == "Quầy kiểm soát ra vào"
    tab.no_errors()


def test_the_pages_can_be_used_by_keyboard_alone(tab_factory: Callable[..., Tab]) -> None:
    """Tab reaches every control in reading order, each with a visible focus ring; the
    skip link goes to the main content; a whole check-in is done by keyboard elsewhere."""
    tab = tab_factory(viewport={"width": 1280, "height": 900})
    page = tab.page
    page.goto("/quay")
    reached = []
    for _ in range(9):
        page.keyboard.press("Tab")
        focused = page.evaluate(
            "(() => { const e = document.activeElement;"
            " return [e.id || e.textContent.trim(), getComputedStyle(e).outlineStyle]; })()"
        )
        reached.append(focused[0])
        assert focused[1] != "none", f"{focused[0]} has no focus ring"
    assert reached == [
        "Bỏ qua, đến nội dung chính",
        "Khai báo y tế QR",
        "Khai báo y tế",
        "Đăng ký địa điểm",
        "Quầy kiểm soát",
        "Truy vết",
        "English",
        "staff-token-input",
        "Đăng nhập",
    ]
    page.goto("/quay")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "staff-token-input"
    tab.no_errors()


# -- the citizen -------------------------------------------------------------------------------


def test_a_citizen_declares_and_checks_in_with_the_code_on_the_page(
    tab_factory: Callable[..., Tab], site: Site, axe: str
) -> None:
    tab = tab_factory()
    page = tab.page
    page.goto("/khai-bao")
    # A wrong phone is refused with the API's reason, in Vietnamese.
    page.locator("#otp-phone").fill("12345")
    page.locator("#otp-phone-form button[type=submit]").click()
    message = page.locator("#otp-message")
    see(message, "Số điện thoại chưa đúng")
    assert page.locator("#otp-phone").get_attribute("aria-invalid") == "true"
    # A wrong code: the person is told how many tries are left.
    before = site.sms_count()
    page.locator("#otp-phone").fill(PHONE)
    page.locator("#otp-phone-form button[type=submit]").click()
    page.locator("#otp-code").wait_for(state="visible")
    real = site.otp_after(before, PHONE)
    page.locator("#otp-code").fill("000000" if real != "000000" else "111111")
    page.locator("#otp-code-form button[type=submit]").click()
    see(message, "Mã xác minh sai hoặc đã hết hạn. Còn 4 lần thử.")
    page.locator("#otp-code").fill(real)
    page.locator("#otp-code-form button[type=submit]").click()
    page.locator("#declaration").wait_for(state="visible")
    assert page.locator("#phone").input_value() == PHONE
    check_accessibility(tab, axe, "the declaration form")
    tab.shot("declare-form-vi-360")

    # A field the API refuses is pointed at, with the reason in words.
    fill_declaration(page, "Nguyễn Thị Hồng Nhung", "0791234")
    page.get_by_role("button", name="Gửi tờ khai").click()
    see(page.locator("#declaration-message"), "Số giấy tờ chưa đúng")
    national = page.locator("#national_id")
    assert national.get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "national_id"
    check_accessibility(tab, axe, "the declaration form with an error")

    national.fill("079123456789")
    page.get_by_role("button", name="Gửi tờ khai").click()
    card = page.locator("#result .code-card")
    card.wait_for()
    image = card.locator("img.code-image")
    page.wait_for_function("document.querySelector('#result img.code-image').naturalWidth > 0")
    assert image.get_attribute("alt") == "Mã QR cá nhân của Nguyễn Thị Hồng Nhung"
    check_accessibility(tab, axe, "the personal code")
    tab.shot("declare-code-vi-360")

    # The code shown on the page, as a camera would see it, decodes to the stored code...
    code = decode_qr(image.screenshot())
    saved = page.evaluate("JSON.parse(localStorage.getItem('scangate.codes'))")
    assert [c["code"] for c in saved] == [code]
    person_id = saved[0]["person_id"]
    assert code.startswith("WEB:")
    # ... and checks in at a venue through the scan API.
    venue_code = site.cli("codes", "issue", "--app", "web", "--venue", "CAFE7")
    answer = site.post_scans(
        [
            {
                "event_id": "WEBFLOW0001",
                "kind": "checkin",
                "venue_code": venue_code,
                "person_code": code,
                "scanned_at": int(time.time() * 1000),
            }
        ]
    )
    assert answer["results"] == [{"event_id": "WEBFLOW0001", "status": "accepted"}]
    stored = site.wait_stored(
        "SELECT person_id, venue_id, kind FROM scan_events WHERE event_id = ?", "WEBFLOW0001"
    )
    assert stored == [(person_id, "CAFE7", "checkin")]

    # The PNG download is the same image, and the print view shows only the code.
    download_href = card.locator("a.code-download").get_attribute("href")
    assert download_href is not None and download_href.startswith("data:image/png;base64,")
    page.emulate_media(media="print")
    page.evaluate("document.body.classList.add('printing-code')")
    page.evaluate("document.querySelector('#result .code-card').classList.add('printing')")
    assert not page.locator("header.top").is_visible()
    assert not page.locator("#result .code-download").is_visible()
    assert image.is_visible()
    tab.shot("declare-print-vi")
    page.emulate_media(media="screen")
    page.evaluate("document.body.classList.remove('printing-code')")

    # Offline at the door: the page opens from the service worker's cache and shows the
    # code kept in the browser.
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.reload()
    page.wait_for_function("navigator.serviceWorker.controller !== null")
    tab.context.set_offline(True)
    try:
        page.reload()
        saved_card = page.locator("#saved .code-card")
        saved_card.wait_for()
        page.wait_for_function("document.querySelector('#saved img.code-image').naturalWidth > 0")
        assert decode_qr(saved_card.locator("img.code-image").screenshot()) == code
        tab.shot("declare-offline-vi-360")
    finally:
        tab.context.set_offline(False)
    # What the browser logged while offline is the failed network, nothing else.
    tab.no_errors(also=r".*(ERR_INTERNET_DISCONNECTED|Failed to fetch)")


def test_a_citizen_declares_for_a_relative_and_keeps_both_codes(
    tab_factory: Callable[..., Tab], site: Site
) -> None:
    tab = tab_factory(viewport={"width": 1280, "height": 900})
    page = tab.page
    page.goto("/khai-bao?lang=en")
    verify_phone(tab, site, PHONE_2)
    fill_declaration(
        page,
        "Lê Văn Tám",
        "001234567",
        birth_year="1950",
        gender="male",
        answered=ANSWER_KEYS[:4],
        lang="en",
        address="3 Tràng Tiền",
        province="Hà Nội",
    )
    # Questions left unanswered: the API names the first, and the page points at it.
    page.get_by_role("button", name="Send the declaration").click()
    see(page.locator("#declaration-message"), "Answer the question about taste and smell.")
    for key in ANSWER_KEYS[4:]:
        page.locator(f"#{key}-no").check()
    page.get_by_role("button", name="Send the declaration").click()
    page.locator("#result .code-card").wait_for()

    page.get_by_role("button", name="Declare for someone else").click()
    page.locator("#whom-relative").check()
    page.get_by_label("Relationship to you").select_option("parent")
    fill_declaration(
        page,
        "Lê Thị Hoa",
        "001234568",
        birth_year="1930",
        lang="en",
        address="3 Tràng Tiền",
        province="Hà Nội",
    )
    page.get_by_role("button", name="Send the declaration").click()
    see(page.locator("#result .code-card .code-name"), "Lê Thị Hoa")
    names = page.locator("#saved .code-name").all_inner_texts()
    assert names == ["Lê Thị Hoa", "Lê Văn Tám"]
    tab.shot("declare-family-en-1280")
    # The relative is stored as declared on behalf (encrypted: read back with the keys).
    saved = page.evaluate("JSON.parse(localStorage.getItem('scangate.codes'))")
    by_name = {c["name"]: c["person_id"] for c in saved}
    assert site.declared_answers(by_name["Lê Thị Hoa"])["on_behalf"] == "parent"
    assert site.declared_answers(by_name["Lê Văn Tám"])["on_behalf"] is None
    tab.no_errors()


def test_the_web_api_takes_the_pages_token_from_this_origin_only(
    tab_factory: Callable[..., Tab], site: Site
) -> None:
    """With the browser's own cookie and the page's token, a request that says it comes
    from another site is still refused; the same from this origin is taken."""
    tab = tab_factory()
    tab.page.goto("/khai-bao")
    token = tab.page.locator('meta[name="csrf-token"]').get_attribute("content")
    before = site.sms_count()

    def post(origin: str) -> Any:
        return tab.page.request.post(
            "/web/api/otp",
            data=json.dumps({"phone": "0399999999"}),
            headers={"Content-Type": "application/json", "X-CSRF-Token": token, "Origin": origin},
        )

    refused = post("https://evil.example")
    assert refused.status == 403 and refused.json()["error"] == "csrf_failed"
    assert site.sms_count() == before
    taken = post(site.url)
    assert taken.status == 202, taken.text()
    site.otp_after(before, "0399999999")


# -- the venue, its door and the official ------------------------------------------------------


def test_a_venue_registers_prints_its_poster_and_its_door_checks_people_in(
    tab_factory: Callable[..., Tab], site: Site, axe: str
) -> None:
    tab = tab_factory()
    page = tab.page
    page.goto("/dang-ky-diem")
    verify_phone(tab, site, VENUE_PHONE)
    assert page.locator("#venue-phone").input_value() == VENUE_PHONE
    page.get_by_label("Tên địa điểm").fill("Quán Phở Hà Nội")
    page.get_by_label("Loại địa điểm").select_option("restaurant")
    page.get_by_label("Địa chỉ").fill("49 Bát Đàn, Hoàn Kiếm")
    page.get_by_role("button", name="Đăng ký").click()
    # The province was left out: the form says so.
    see(page.locator("#venue-message"), "Chọn tỉnh / thành phố.")
    page.get_by_label("Tỉnh / thành phố").select_option("Hà Nội")
    page.get_by_role("button", name="Đăng ký").click()
    page.locator("#registered").wait_for(state="visible")
    venue_id = page.locator("#venue-id").inner_text()
    check_accessibility(tab, axe, "a registered venue")
    tab.shot("venue-registered-vi-360")

    poster = page.request.get(page.locator("#poster-pdf").get_attribute("href"))
    assert poster.status == 200 and poster.headers["content-type"] == "application/pdf"
    assert poster.body().startswith(b"%PDF")
    poster_png = page.request.get(page.locator("#poster-png").get_attribute("href"))
    assert poster_png.body().startswith(b"\x89PNG")
    # The poster's QR is this venue's code, of the web app.
    venue_code = decode_qr_in(poster_png.body())
    checked = json.loads(site.cli("codes", "verify", "--app", "web", venue_code))
    assert (checked["valid"], checked["id"]) == (True, venue_id)

    # Door-staff tokens come from the operator, not from the page (a verified SIM is not
    # enough to check anyone in by phone number).
    assert page.locator("#registered").get_by_role("button").count() == 0
    staff_token = json.loads(site.cli("venues", "staff-token", venue_id))["token"]
    assert staff_token.startswith("sgs_")

    # A person declared by phone; then the door desk, signed in with the staff token.
    declared = declare_by_api(site, DOOR_PHONE, "Phạm Minh Châu", "079111222333")
    door = tab_factory()
    dpage = door.page
    dpage.goto("/quay")
    dpage.get_by_label("Mã đăng nhập của nhân viên").fill("sgs_not-a-real-token")
    dpage.get_by_role("button", name="Đăng nhập").click()
    see(dpage.locator("#door-signin-message"), "không đúng")
    dpage.get_by_label("Mã đăng nhập của nhân viên").fill(staff_token)
    dpage.get_by_role("button", name="Đăng nhập").click()
    see(dpage.locator("#door-venue"), "Quán Phở Hà Nội")
    check_accessibility(door, axe, "the door desk")

    # Check-in by phone: green, and it reaches storage.
    dpage.get_by_role("textbox", name="Số điện thoại").fill(DOOR_PHONE.replace("070", "070 "))
    dpage.get_by_role("button", name="Ghi nhận").click()
    verdict = dpage.locator("#door-verdict")
    see(verdict, "Đã ghi nhận VÀO.")
    assert "ok" in (verdict.get_attribute("class") or "")
    door.shot("door-checkin-ok-vi-360")
    rows = site.wait_stored(
        "SELECT person_id, kind, device_id FROM scan_events WHERE venue_id = ?", venue_id
    )
    assert rows[0][:2] == (declared, "checkin") and rows[0][2].startswith("staff:")

    # A phone nobody declared with: red, with the reason.
    dpage.get_by_role("textbox", name="Số điện thoại").fill("0355555555")
    dpage.get_by_role("button", name="Ghi nhận").click()
    see(verdict, "Không có ai khai báo")
    assert "bad" in (verdict.get_attribute("class") or "")
    check_accessibility(door, axe, "a refused check-in")
    door.shot("door-refused-vi-360")

    # Two people on one phone: the desk asks for the name, then records it.
    declare_by_api(site, DOOR_PHONE, "Phạm Minh Đức", "079111222444")
    dpage.get_by_role("textbox", name="Số điện thoại").fill(DOOR_PHONE)
    dpage.locator("#kind-checkout").check()
    dpage.get_by_role("button", name="Ghi nhận").click()
    see(verdict, "nhập họ tên")
    dpage.get_by_label("Họ và tên").fill("Phạm Minh Châu")
    dpage.get_by_role("button", name="Ghi nhận").click()
    see(verdict, "Đã ghi nhận RA.")

    # By the ID card's QR text, with the keyboard only (a code reader types and presses Enter).
    dpage.locator("#method-card").check()
    dpage.locator("#kind-checkin").check()
    dpage.locator("#door-card").focus()
    dpage.keyboard.type(CARD)
    dpage.keyboard.press("Enter")
    see(verdict, "Đã ghi nhận VÀO.")
    site.wait_stored("SELECT 1 FROM scan_events WHERE venue_id = ?", venue_id, rows=3)
    door.no_errors()
    tab.no_errors()


def test_an_official_traces_a_case_and_downloads_the_csv(
    tab_factory: Callable[..., Tab], site: Site, axe: str
) -> None:
    now = int(time.time() * 1000)
    venue = site.cli("codes", "issue", "--app", "web", "--venue", "MARKET9")
    case = site.cli("codes", "issue", "--app", "web", "--person", "CASE1")
    contact = site.cli("codes", "issue", "--app", "web", "--person", "NEIGHBOUR2")
    hour = 3_600_000
    events = [
        ("TRC0000001", "checkin", case, now - 3 * hour),
        ("TRC0000002", "checkout", case, now - 2 * hour),
        ("TRC0000003", "checkin", contact, now - 3 * hour + 600_000),
        ("TRC0000004", "checkout", contact, now - 2 * hour + 600_000),
    ]
    answer = site.post_scans(
        [
            {"event_id": e, "kind": k, "venue_code": venue, "person_code": p, "scanned_at": t}
            for e, k, p, t in events
        ]
    )
    assert answer["accepted"] == 4
    site.wait_stored("SELECT 1 FROM visits WHERE venue_id = 'MARKET9'", rows=2)

    tab = tab_factory(viewport={"width": 1280, "height": 900})
    page = tab.page
    page.goto("/truy-vet")
    page.get_by_label("Mã quản trị").fill("sga_wrong")
    page.get_by_role("button", name="Đăng nhập").click()
    page.get_by_label("Mã người (ví dụ P7K2…)").fill("CASE1")
    page.get_by_role("button", name="Truy vết", exact=True).click()
    see(page.locator("#trace-signin-message"), "Mã quản trị không đúng.")

    page.get_by_label("Mã quản trị").fill(site.admin_token)
    page.get_by_role("button", name="Đăng nhập").click()
    # A margin over 24h is refused, pointing at the field.
    page.get_by_label("Mã người (ví dụ P7K2…)").fill("case1")
    page.get_by_label("Khoảng đệm (ví dụ 60m)").fill("25h")
    page.get_by_role("button", name="Truy vết", exact=True).click()
    see(page.locator("#trace-message"), "tối đa 24h")
    assert page.locator("#margin").get_attribute("aria-invalid") == "true"
    page.get_by_label("Khoảng đệm (ví dụ 60m)").fill("60m")
    page.get_by_role("button", name="Truy vết", exact=True).click()
    page.locator("#trace-table").wait_for(state="visible")
    cells = page.locator("#trace-table tbody tr").first.locator("td").all_inner_texts()
    assert cells[:2] == ["NEIGHBOUR2", "MARKET9"]
    assert cells[4] == "60"  # the whole visit: within the 60m margin of the case's
    check_accessibility(tab, axe, "a trace's table")
    tab.shot("trace-table-vi-1280")

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Tải CSV").click()
    download = download_info.value
    assert download.suggested_filename == "truy-vet-CASE1.csv"
    csv_text = Path(download.path()).read_text()
    assert csv_text.splitlines()[0].startswith("person_id,venue_id")
    assert "NEIGHBOUR2,MARKET9" in csv_text
    audited = site.stored("SELECT action FROM audit_log WHERE subject = 'CASE1'")
    assert audited == [("trace",), ("trace",)]  # the table and the CSV; not the refusals
    tab.no_errors()


# -- helpers that talk to the gateway as another app would ------------------------------------


def declare_by_api(site: Site, phone: str, name: str, national_id: str) -> str:
    """Declare a person through /v1 with the web app's token; their person id."""

    def call(path: str, body: dict[str, Any], session: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {site.web_token}", "Content-Type": "application/json"}
        if session:
            headers["X-Session"] = session
        request = urllib.request.Request(
            site.url + path, data=json.dumps(body).encode(), headers=headers
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            doc: dict[str, Any] = json.load(answer)
            return doc

    before = site.sms_count()
    call("/v1/otp", {"phone": phone})
    session = call("/v1/otp/verify", {"phone": phone, "code": site.otp_after(before, phone)})
    body = declaration(full_name=name, national_id=national_id, phone=phone)
    made = call("/v1/declarations", body, session["session"])
    person_id: str = made["person_id"]
    return person_id


def decode_qr_in(png: bytes) -> str:
    """The one QR code on a poster page (scaled down: a 300-dpi A4 page is large)."""
    image = Image.open(io.BytesIO(png))
    image.thumbnail((1240, 1754))
    results = zxingcpp.read_barcodes(image)
    assert len(results) == 1
    text: str = results[0].text
    return text


def test_the_trace_table_names_venues_and_fits_with_a_revealed_contact(
    tab_factory: Callable[..., Tab], site: Site
) -> None:
    """Issue 19: venues by name, a revealed contact's name and phone, a visit with no
    check-out said in words; the table fits 1280 px and its caption 360 px."""
    venue = json.loads(
        site.cli(
            "venues", "add", "--app", "web", "--name", "Nhà văn hoá phường Bến Nghé",
            "--phone", "0983829927", "--address", "12 Nguyễn Huệ, Quận 1",
            "--province", "Hồ Chí Minh", "--kind", "other",
        )
    )  # fmt: skip
    contact = declare_by_api(site, "0933111222", "Nguyễn Thị Bích Ngọc", "079301009988")
    case = site.cli("codes", "issue", "--app", "web", "--person", "CASE7")
    contact_code = site.cli("codes", "issue", "--app", "web", "--person", contact)
    now = int(time.time() * 1000)
    hour = 3_600_000
    answer = site.post_scans(
        [
            {"event_id": e, "kind": k, "venue_code": venue["code"], "person_code": p}
            | {"scanned_at": t}
            for e, k, p, t in (
                ("TRN0000001", "checkin", case, now - 3 * hour),
                ("TRN0000002", "checkout", case, now - 2 * hour),
                ("TRN0000003", "checkin", contact_code, now - 3 * hour + 600_000),
            )
        ]
    )  # fmt: skip
    assert answer["accepted"] == 3
    site.wait_stored(f"SELECT 1 FROM visits WHERE venue_id = '{venue['venue_id']}'", rows=2)

    for width in (1280, 360):
        tab = tab_factory(viewport={"width": width, "height": 900})
        page = tab.page
        page.goto("/truy-vet")
        page.get_by_label("Mã quản trị").fill(site.admin_token)
        page.get_by_role("button", name="Đăng nhập").click()
        page.get_by_label("Mã người (ví dụ P7K2…)").fill("CASE7")
        page.locator("#trace-form [name=reveal]").check()
        page.get_by_role("button", name="Truy vết", exact=True).click()
        page.locator("#trace-table").wait_for(state="visible")
        cells = page.locator("#trace-table tbody tr").first.locator("td").all_inner_texts()
        assert cells[0] == contact
        assert cells[1].startswith("Nhà văn hoá phường Bến Nghé")
        assert "12 Nguyễn Huệ, Quận 1, Hồ Chí Minh" in cells[1]
        assert "không ghi nhận giờ ra" in cells[3]  # the contact never checked out
        assert "Nguyễn Thị Bích Ngọc" in cells and "+84933111222" in cells
        tab.shot(f"trace-table-revealed-vi-{width}")
        caption = page.locator("#trace-caption")
        assert caption.evaluate("e => e.scrollWidth <= e.clientWidth"), f"caption at {width}"
        if width == 1280:
            fits = page.locator("#trace-table").evaluate(
                "t => t.getBoundingClientRect().right <= document.documentElement.clientWidth"
            )
            assert fits, "the table with a revealed contact is wider than 1280 px"
        tab.no_errors()


# -- the API's documentation -------------------------------------------------------------------


def test_the_api_docs_list_every_operation_and_try_one_under_their_policy(
    tab_factory: Callable[..., Tab], site: Site
) -> None:
    """/docs: Swagger UI, from this origin's files only, lists every operation of
    /openapi.json under its tag and tries one out, with no console error (a content
    security policy violation is one)."""
    with urllib.request.urlopen(site.url + "/openapi.json", timeout=10) as answer:
        document = json.load(answer)
    operations = [op for item in document["paths"].values() for op in item.values()]
    tab = tab_factory(viewport={"width": 1280, "height": 900})
    page = tab.page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    answer = page.goto("/docs")
    assert answer is not None and answer.status == 200
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    page.locator(".opblock").first.wait_for()
    assert page.locator(".opblock").count() == len(operations)
    for tag in document["tags"]:
        section = page.locator(f"#operations-tag-{tag['name']}")
        assert tag["description"] in section.inner_text(), tag["name"]
    for operation in operations:
        tag, operation_id = operation["tags"][0], operation["operationId"]
        assert page.locator(f"#operations-{tag}-{operation_id}").count() == 1, operation_id

    # Tried out: the call goes to this origin, and its answer is shown.
    healthz = page.locator("#operations-operations-getHealthz")
    healthz.locator(".opblock-summary").click()
    healthz.get_by_role("button", name="Try it out").click()
    healthz.get_by_role("button", name="Execute").click()
    see(healthz.locator(".live-responses-table .response-col_status"), "200")
    tab.shot("docs-1280")
    assert requested and all(url.startswith(site.url + "/") for url in requested), requested
    tab.no_errors()
