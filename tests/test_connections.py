"""Connections held open on purpose, against a real ``scangate serve``: slow heads, slow
bodies, idle connections, more connections than a worker takes; and the headers every
answer carries. The deadlines are shortened through the settings, so each test takes
seconds."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.servers import free_loopback_port
from tests.test_serve import Served, cli, request

SHORT: Final = {
    "SCANGATE_HEADER_TIMEOUT": "1s",
    "SCANGATE_BODY_TIMEOUT": "1s",
    "SCANGATE_KEEPALIVE_TIMEOUT": "1s",
}
SLACK_S: Final = 1.5  # a deadline's timer, the event loop, this machine


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    gateway = Served(tmp_path_factory.mktemp("connections"), 1, env=SHORT)
    yield gateway
    gateway.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def closed_after(sock: socket.socket, started: float, limit_s: float) -> float:
    """Seconds from ``started`` until the server closed ``sock`` (reading whatever it sends);
    AssertionError if it is still open at ``limit_s``."""
    sock.settimeout(0.05)
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - started
    raise AssertionError(f"still open after {limit_s} s")


def trickle(sock: socket.socket, parts: list[bytes], every_s: float, stop: threading.Event) -> None:
    for part in parts:
        if stop.wait(every_s):
            return
        with contextlib.suppress(OSError):
            sock.sendall(part)


def test_slow_heads_are_closed_at_the_header_deadline(served: Served) -> None:
    stop = threading.Event()
    socks, threads = [], []
    head = [b"POST /v1/scans HTTP/1.1\r\n"] + [f"X-Slow-{i}: 1\r\n".encode() for i in range(100)]
    started = time.monotonic()
    for _ in range(50):
        sock = connect(served.port)
        sock.sendall(head[0])
        thread = threading.Thread(target=trickle, args=(sock, head[1:], 0.2, stop), daemon=True)
        thread.start()
        socks.append(sock)
        threads.append(thread)
    try:
        took = [closed_after(sock, started, 1 + SLACK_S + 2) for sock in socks]
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert max(took) <= 1 + SLACK_S + 2, took
    assert min(took) >= 0.9, took  # held to the deadline, not closed at once
    assert request(served.base + "/healthz")[0] == 200


def test_connections_that_send_nothing_are_closed_at_the_header_deadline(served: Served) -> None:
    started = time.monotonic()
    socks = [connect(served.port) for _ in range(50)]
    try:
        took = [closed_after(sock, started, 1 + SLACK_S) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert min(took) >= 0.9 and max(took) <= 1 + SLACK_S, took


def test_a_slow_body_is_closed_at_the_body_deadline(served: Served) -> None:
    sock = connect(served.port)
    stop = threading.Event()
    sock.sendall(
        b"POST /v1/scans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    started = time.monotonic()
    thread = threading.Thread(target=trickle, args=(sock, [b" "] * 100, 0.2, stop), daemon=True)
    thread.start()
    try:
        took = closed_after(sock, started, 1 + SLACK_S)
    finally:
        stop.set()
        sock.close()
    assert 0.9 <= took <= 1 + SLACK_S


def test_an_idle_keep_alive_connection_is_closed_at_its_timeout(served: Served) -> None:
    sock = connect(served.port)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(65536)
        started = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200"), answer
        took = closed_after(sock, started, 1 + SLACK_S)
    finally:
        sock.close()
    assert 0.9 <= took <= 1 + SLACK_S


def test_requests_within_the_deadlines_are_served_on_one_connection(served: Served) -> None:
    """A head and a body each sent in pieces, within their deadlines, three times over."""
    sock = connect(served.port)
    try:
        for _ in range(3):
            body = b'{"events": []}'
            for part in (
                b"POST /v1/scans HTTP/1.1\r\nHost: x\r\n",
                b"Content-Type: application/json\r\nAuthorization: Bearer sga_nothing\r\n",
                f"Content-Length: {len(body)}\r\n\r\n".encode(),
                body[:5],
                body[5:],
            ):
                sock.sendall(part)
                time.sleep(0.15)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 401"), answer  # answered, not cut off
    finally:
        sock.close()


def test_past_the_cap_idle_connections_make_room_and_busy_ones_get_503(tmp_path: Path) -> None:
    gateway = Served(
        tmp_path, 1, env={"SCANGATE_MAX_CONNECTIONS": "10", "SCANGATE_HEADER_TIMEOUT": "30s"}
    )
    socks: list[socket.socket] = []
    try:
        # Ten idle keep-alive connections: a newcomer closes one of them and is served.
        for _ in range(10):
            sock = connect(gateway.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            socks.append(sock)
        assert request(gateway.base + "/healthz")[0] == 200
        for sock in socks:
            sock.close()
        socks.clear()
        time.sleep(0.5)
        # Ten connections in the middle of a request: a newcomer gets 503 and is closed.
        for _ in range(10):
            sock = connect(gateway.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            socks.append(sock)
        time.sleep(0.5)
        newcomer = connect(gateway.port)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := newcomer.recv(65536):
                answer += chunk
        newcomer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"Retry-After: 1" in head and b"Connection: close" in head
        assert json.loads(body)["error"] == "overloaded"
        for sock in socks:  # the busy ones finish their requests
            sock.sendall(b"Host: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
        assert gateway.stop()[0] == 0


def raw_answer(port: int, path: str, headers: str = "") -> tuple[str, bytes]:
    with connect(port) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.decode("latin-1"), body


def test_every_answer_says_nosniff_and_no_version_and_personal_ones_no_store(
    tmp_path: Path,
) -> None:
    token = json.loads(cli(tmp_path, "apps", "add", "vhd"))["token"]
    venue = json.loads(
        cli(
            tmp_path,
            "venues",
            "add",
            "--app",
            "vhd",
            "--name",
            "Chợ Bến Thành",
            "--phone",
            "0983829927",
            "--address",
            "Lê Lợi",
            "--province",
            "Hồ Chí Minh",
            "--kind",
            "market",
        )
    )
    gateway = Served(tmp_path, 1)
    try:
        for path in ("/healthz", "/nowhere", "/v1/trace/P1", "/openapi.json", "/"):
            head, _ = raw_answer(gateway.port, path)
            assert "X-Content-Type-Options: nosniff" in head, (path, head)
            assert "Server: scangate\r\n" in head and "aiohttp" not in head, (path, head)
        head, _ = raw_answer(gateway.port, "/v1/trace/P1")
        assert "Cache-Control: no-store" in head
        head, body = raw_answer(
            gateway.port,
            f"/v1/venues/{venue['venue_id']}/poster.svg",
            f"Authorization: Bearer {token}\r\n",
        )
        assert head.startswith("HTTP/1.1 200"), head
        assert "Content-Security-Policy: default-src 'none'" in head and "sandbox" in head
        assert body.lstrip().startswith(b"<")
    finally:
        assert gateway.stop()[0] == 0


def test_metrics_on_a_listener_of_their_own(tmp_path: Path) -> None:
    port = free_loopback_port()
    gateway = Served(tmp_path, 2, env={"SCANGATE_METRICS_PORT": str(port)})
    try:
        assert request(gateway.base + "/metrics")[0] == 404
        for _ in range(6):  # either worker answers, for both
            status, body = request(f"http://127.0.0.1:{port}/metrics")
            assert status == 200 and b"scangate_" in body
        assert request(f"http://127.0.0.1:{port}/healthz")[0] == 404
    finally:
        assert gateway.stop()[0] == 0
