"""The logs of a real ``scangate serve`` (two workers, a flusher, its supervisor), in JSON
at debug level with the access log on, after a citizen's whole journey with planted
personal data and secrets: an OTP, a declaration, a personal code, scans, a case with its
notices (a webhook and an SMS), a trace by phone, and requests that fail while carrying
the planted values. Every line must be JSON, request lines must carry their request id, and
none of the planted values may appear anywhere."""

from __future__ import annotations

import http.server
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from tests.test_declarations import NAME, NATIONAL_ID, PHONE, declaration
from tests.test_serve import clean_env, cli, free_port

PHONE_DIGITS: Final = "912345678"  # in every form: 0912345678, 84912345678, +84912345678
PLANTED: Final = declaration()
ADDRESS: Final = PLANTED["address"]
INSURANCE: Final = PLANTED["health_insurance_no"]
OUR_REQUEST_ID: Final = "logs-test-1"
MINUTE_MS: Final = 60_000
LEVELS: Final = {"debug", "info", "warning", "error", "critical"}
UTC_MS: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Gateway:
    """``scangate serve`` with its output in files (a pipe left unread could fill up)."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out, self.err = data_dir.parent / "serve.out", data_dir.parent / "serve.err"
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "gateway", "--data-dir", str(data_dir), "serve"),
                    *("--port", str(self.port), "--workers", "2"),
                ],
                env=clean_env() | env,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if call(self.base + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, self.err.read_text()
            time.sleep(0.2)
        raise AssertionError("serve did not become ready")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def call(
    url: str, body: Any = None, headers: dict[str, str] | None = None, *, raw: bytes | None = None
) -> tuple[int, Any, Any]:
    """(status, the body parsed when JSON, the headers)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:  # loopback only
            status, content, answer_headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        status, content, answer_headers = exc.code, exc.read(), exc.headers
    is_json = answer_headers.get("Content-Type", "").startswith("application/json")
    return status, json.loads(content) if is_json else content, answer_headers


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[bytes]]]:
    """A local endpoint that accepts every POST: its URL and the bodies it got."""
    got: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


def until(check: Any, what: str, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def sms_lines(data_dir: Path) -> list[dict[str, str]]:
    path = data_dir / "sms.log"
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def stored_events(data_dir: Path) -> int:
    with closing(sqlite3.connect(data_dir / "scangate.db")) as db:
        count: int = db.execute("SELECT count(*) FROM scan_events").fetchone()[0]
        return count


def test_the_logs_of_a_full_run_are_json_lines_with_no_personal_data_or_secret(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    vhd = json.loads(cli(data_dir, "apps", "add", "vhd"))["token"]
    bz = json.loads(cli(data_dir, "apps", "add", "bz"))["token"]
    admin = json.loads(cli(data_dir, "admins", "add", "officer1"))["token"]
    codes = {
        (app, kind, id_): cli(data_dir, "codes", "issue", "--app", app, f"--{kind}", id_)
        for app, kind, id_ in [
            ("vhd", "venue", "MARKET"),
            ("bz", "venue", "MARKET"),
            ("vhd", "person", "CASE1"),
            ("vhd", "person", "OTHER1"),
        ]
    }
    secrets = [vhd, bz, admin]
    with webhook_receiver() as (hook_url, hooked):
        webhook = json.loads(cli(data_dir, "apps", "set-webhook", "vhd", hook_url))
        secrets += [webhook["secret"], webhook["standard_webhooks_secret"]]
        gateway = Gateway(
            data_dir,
            {
                "SCANGATE_LOG_FORMAT": "json",
                "SCANGATE_LOG_LEVEL": "debug",
                "SCANGATE_ACCESS_LOG": "true",
                "SCANGATE_WEB_APP": "vhd",
                "SCANGATE_WEBHOOK_PRIVATE": "true",
                "SCANGATE_FLUSH_MAX_AGE": "50ms",
            },
        )
        try:
            otp_code, person_code, more_secrets = journey(
                gateway.base, data_dir, vhd, bz, admin, codes, hooked
            )
            secrets += more_secrets
            fail_with_planted_values(gateway.base, gateway.port, vhd, admin)
        finally:
            assert gateway.stop() == 0, gateway.err.read_text()

    out = gateway.out.read_text(encoding="utf-8")
    err = gateway.err.read_text(encoding="utf-8")
    docs = [every_line_is_json(line) for line in (out + err).splitlines()]
    assert docs, "serve logged nothing"

    # Every process logs in JSON: the supervisor, the workers, the flusher.
    pids = {d["pid"] for d in docs}
    assert gateway.proc.pid in pids and len(pids) >= 3, pids
    assert any(d["message"].startswith("scangate listening on") for d in docs)
    assert any(d["logger"] == "gateway.pipeline.flusher" for d in docs)

    # Request lines carry their request id; the caller's own when it was sane.
    access = [d for d in docs if d["logger"] == "gateway.access"]
    assert len(access) >= 20, access
    assert all(d.get("request_id") for d in access), [d for d in access if not d.get("request_id")]
    assert [d["route"] for d in access if d["request_id"] == OUR_REQUEST_ID] == ["/v1/otp"]
    assert {"/v1/trace/search", "/v1/cases", "/web/api/declarations"} <= {
        d["route"] for d in access
    }
    malformed = [d for d in docs if "malformed HTTP request" in d["message"]]
    assert malformed and all(d.get("request_id") for d in malformed), malformed

    # Nothing planted, in any form, in the raw output or in the decoded values.
    decoded = "\n".join(json.dumps(d, ensure_ascii=False) for d in docs)
    for text in (out + err, decoded):
        for value in [PHONE_DIGITS, NAME, "Hồng Nhung", NATIONAL_ID[1:], ADDRESS, INSURANCE]:
            assert value not in text, f"{value!r} is in the logs"
        for secret in [*secrets, person_code]:
            assert secret not in text, "a secret is in the logs"
        assert not re.search(rf"(?<![0-9A-Za-z]){otp_code}(?![0-9A-Za-z])", text), (
            "the one-time code is in the logs"
        )


def every_line_is_json(line: str) -> dict[str, Any]:
    doc = json.loads(line)
    assert isinstance(doc, dict), line
    assert UTC_MS.fullmatch(doc["time"]) and doc["level"] in LEVELS, line
    assert isinstance(doc["pid"], int) and doc["logger"] and "message" in doc, line
    return doc


def journey(
    base: str,
    data_dir: Path,
    vhd: str,
    bz: str,
    admin: str,
    codes: dict[tuple[str, str, str], str],
    hooked: list[bytes],
) -> tuple[str, str, list[str]]:
    """A citizen declares on the web page, is scanned, and turns out a contact of a case an
    official records and traces: (the OTP code, the personal code, the secrets it made)."""
    # The page sets the CSRF cookie and carries its token.
    status, page, headers = call(base + "/khai-bao")
    assert status == 200 and headers["X-Request-Id"]
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    match = re.search(rb'<meta name="csrf-token" content="([0-9a-f]{64})">', page)
    assert match is not None
    form = {"Cookie": cookie, "X-CSRF-Token": match.group(1).decode()}

    status, body, _ = call(base + "/web/api/otp", {"phone": PHONE}, form)
    assert status == 202, body
    sent = until(lambda: sms_lines(data_dir), "the OTP's SMS")
    (otp_code,) = re.findall(r"\b\d{6}\b", sent[-1]["text"])
    status, body, _ = call(base + "/web/api/otp/verify", {"phone": PHONE, "code": otp_code}, form)
    assert status == 200, body
    session = body["session"]
    status, made, _ = call(base + "/web/api/declarations", PLANTED, {**form, "X-Session": session})
    assert status == 201, made
    person = made["person_id"]
    status, image, _ = call(
        f"{base}/web/api/people/{person}/code.svg", headers={**form, "X-Session": session}
    )
    assert status == 200 and image.lstrip().startswith(b"<")

    # Scans: CASE1 and OTHER1 through vhd (which has the webhook), the citizen through bz
    # (which has none: the citizen's notice goes by SMS to the planted phone).
    now = int(time.time() * 1000)
    person_bz = cli(data_dir, "codes", "issue", "--app", "bz", "--person", person)
    visits = [
        ("vhd", codes["vhd", "person", "CASE1"], now - 180 * MINUTE_MS, now - 60 * MINUTE_MS),
        ("vhd", codes["vhd", "person", "OTHER1"], now - 150 * MINUTE_MS, now - 100 * MINUTE_MS),
        ("bz", person_bz, now - 140 * MINUTE_MS, now - 90 * MINUTE_MS),
    ]
    for n, (app, code, checkin, checkout) in enumerate(visits):
        events = [
            {
                "event_id": f"LOGS{n}{kind[-3:].upper()}",
                "kind": kind,
                "venue_code": codes[app, "venue", "MARKET"],
                "person_code": code,
                "scanned_at": at,
            }
            for kind, at in (("checkin", checkin), ("checkout", checkout))
        ]
        token = vhd if app == "vhd" else bz
        status, body, _ = call(
            base + "/v1/scans", {"events": events}, {"Authorization": f"Bearer {token}"}
        )
        assert status == 200 and body["accepted"] == 2, body
    until(lambda: stored_events(data_dir) == 6, "the scans stored")

    official = {"Authorization": f"Bearer {admin}"}
    status, case, _ = call(
        base + "/v1/cases", {"person_id": "CASE1", "confirmed_at": now - 10 * MINUTE_MS}, official
    )
    assert status == 201 and (case["contacts"], case["notices"]) == (2, 2), case

    def settled() -> bool:
        shown = call(f"{base}/v1/cases/{case['case_id']}", headers=official)[1]
        return all(n["state"] == "delivered" for n in shown["notices"])

    until(settled, "both notices delivered")
    assert len(hooked) == 1 and any(m["to"].endswith(PHONE_DIGITS) for m in sms_lines(data_dir))
    for search in ({"phone": "+84" + PHONE_DIGITS}, {"national_id": NATIONAL_ID}):
        status, found, _ = call(base + "/v1/trace/search", {**search, "reveal": True}, official)
        assert status == 200, found
    return otp_code, made["code"], [session, cookie.split("=", 1)[1], form["X-CSRF-Token"]]


def fail_with_planted_values(base: str, port: int, vhd: str, admin: str) -> None:
    """Requests refused while they carry the planted values, in the body, the path, the
    query, the headers, and bytes that are not HTTP."""
    app = {"Authorization": f"Bearer {vhd}"}
    refused = [
        call(base + "/v1/otp", raw=f'{{"phone": "{PHONE}"'.encode(), headers=app),
        call(base + "/v1/otp", {"phone": PHONE + "1"}, {**app, "X-Request-Id": OUR_REQUEST_ID}),
        call(base + "/v1/otp/verify", {"phone": PHONE, "code": "000000"}, app),
        call(base + "/v1/declarations", {"full_name": NAME * 10, "phone": PHONE}, app),
        call(base + "/v1/trace/search", {"phone": "+84" + PHONE_DIGITS, "days": "x"}, {}),
        call(
            base + "/v1/trace/search", {"national_id": NAME}, {"Authorization": f"Bearer {admin}"}
        ),
        call(f"{base}/v1/trace/{PHONE}?phone={PHONE}&name={quote(NAME)}"),
        call(base + "/v1/scans", {"events": [{"phone": PHONE}]}, {"Authorization": PHONE}),
        call(base + "/nowhere", headers={"X-Request-Id": PHONE + " " + NATIONAL_ID}),
    ]
    assert all(400 <= status < 500 for status, _, _ in refused), refused
    for request_line in (
        f"GET /v1/trace/{PHONE} HTTP/1.1 {NAME}".encode(),
        f"POST /v1/otp HTTP/1.1\r\nHost: x\r\nX-Phone {PHONE}".encode(),
    ):
        with closing(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
            sock.sendall(request_line + b"\r\n\r\n")
            answer = sock.recv(65536)
            assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer
            assert re.search(rb"\r\nX-Request-Id: [0-9a-f]{16}\r\n", answer, re.I), answer
