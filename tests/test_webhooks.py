"""How a webhook delivery is signed (``signing.webhooks``), and docs/webhooks.md held to it:
its worked example is exact and its two receiver snippets, run as written, take a delivery
and refuse a bad one. Real deliveries are checked end to end in ``test_cases.py``."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict
from standardwebhooks import Webhook

from gateway.outbox.notifier import ADVICE
from signing import signature_headers, standard_secret
from signing.webhooks import scangate_signature

DOC = Path(__file__).resolve().parent.parent / "docs" / "webhooks.md"


def doc_blocks(language: str) -> list[str]:
    """The fenced blocks of docs/webhooks.md in ``language`` ("" for plain ones)."""
    blocks: list[tuple[str, list[str]]] = []
    inside = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            if inside:
                blocks.append((line[3:], []))
        elif inside:
            blocks[-1][1].append(line)
    return ["\n".join(lines) + "\n" for lang, lines in blocks if lang == language]


def test_both_signatures_of_a_delivery() -> None:
    key, body, stamp = b"whsec_" + b"k" * 43, b'{"notice_id":"N1"}', 1_764_000_000
    headers = signature_headers(key, "N1", stamp, body)
    expected = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert headers["X-Scangate-Signature"] == scangate_signature(key, body) == expected
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == ("N1", "1764000000")
    when = dt.datetime.fromtimestamp(stamp, dt.UTC)
    assert headers["webhook-signature"] == Webhook(standard_secret(key)).sign("N1", when, body)
    assert base64.b64decode(standard_secret(key).removeprefix("whsec_")) == key
    with pytest.raises(ValueError, match=r"must not contain '\.'"):
        signature_headers(key, "N.1", stamp, body)  # the id is a field of the signed text


def test_the_worked_example_in_the_docs_is_exact() -> None:
    printed, shown_body = (json.loads(b) for b in doc_blocks("json")[:2])
    key = printed["secret"].encode()
    assert printed["standard_webhooks_secret"] == standard_secret(key)
    body = orjson.dumps({**shown_body, "advice": ADVICE})  # compact, as webhook_body sends
    (lines,) = (b for b in doc_blocks("") if b.startswith("webhook-id:"))
    shown = dict(line.split(": ", 1) for line in lines.splitlines())
    assert shown == {
        **signature_headers(key, shown_body["notice_id"], 1_764_040_000, body),
        "Idempotency-Key": shown_body["notice_id"],
    }


def test_the_receiver_snippets_in_the_docs_take_a_delivery_and_refuse_a_bad_one() -> None:
    snippets = [b for b in doc_blocks("python") if "def notice_of" in b]
    assert len(snippets) == 2  # the standardwebhooks one, and the standard library's
    secret = "whsec_" + secrets.token_urlsafe(32)  # as apps set-webhook makes one
    key, standard = secret.encode(), standard_secret(secret.encode())
    body = orjson.dumps({"notice_id": "N1", "advice": ADVICE})
    now_s = int(time.time())

    def delivery(**over: str) -> CIMultiDict[str]:
        """Headers as a web framework hands them over (any case), signed now under key."""
        headers = signature_headers(key, "N1", now_s, body)
        return CIMultiDict({k.title(): v for k, v in {**headers, **over}.items()})

    stale = signature_headers(key, "N1", now_s - 360, body)
    for snippet in snippets:
        space: dict[str, Any] = {"STANDARD_WEBHOOKS_SECRET": standard}
        exec(snippet, space)  # noqa: S102 - the docs' own code, run as a reader would
        verify: Callable[[bytes, Mapping[str, str]], Any] = (
            space["notice_of"]
            if "STANDARD_WEBHOOKS_SECRET" in snippet
            else lambda b, h, f=space["notice_of"]: f(b, h, standard)
        )
        assert verify(body, delivery()) == orjson.loads(body)
        assert verify(body.replace(b"N1", b"N2"), delivery()) is None  # changed
        assert verify(body, CIMultiDict(stale)) is None  # replayed after its 5 minutes
        ahead = signature_headers(key, "N1", now_s + 360, body)
        assert verify(body, CIMultiDict(ahead)) is None  # dated 6 minutes in the future
        assert verify(body, delivery(**{"webhook-signature": stale["webhook-signature"]})) is None
        other = signature_headers(secrets.token_bytes(32), "N1", now_s, body)
        assert verify(body, CIMultiDict(other)) is None  # another key
        assert verify(body, delivery(**{"webhook-timestamp": "soon"})) is None
        missing = delivery()
        del missing["webhook-signature"]
        assert verify(body, missing) is None
