"""How a webhook delivery is signed: the Standard Webhooks headers
(https://www.standardwebhooks.com/) and scangate's first signature, both under one key.

The key is the app's webhook secret exactly as ``apps set-webhook`` prints it as ``secret``
(``whsec_`` and 43 URL-safe characters), taken as UTF-8 bytes: that is what receivers of
``X-Scangate-Signature`` already hold. Standard Webhooks libraries take a secret as
``whsec_<base64 of the key>``, so the same key is handed to them as ``standard_secret(key)``.
The ``secret`` text itself, although it starts with ``whsec_``, is not base64 of anything:
a library given it derives another key and refuses every delivery.

- ``webhook-id``: the notice id, the same on every try (receivers de-duplicate by it);
- ``webhook-timestamp``: integer Unix seconds of this try (receivers refuse old ones);
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``;
- ``X-Scangate-Signature``: ``sha256=<hex HMAC-SHA256 of the body>``, for receivers written
  before the Standard Webhooks headers (no timestamp: it cannot tell a replay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Final

STANDARD_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a label, not a secret
SCANGATE_SIGNATURE_HEADER: Final = "X-Scangate-Signature"


def standard_secret(key: bytes) -> str:
    """The key as Standard Webhooks libraries take it: ``whsec_`` and its base64."""
    return STANDARD_SECRET_PREFIX + base64.b64encode(key).decode("ascii")


def scangate_signature(key: bytes, body: bytes) -> str:
    """The ``X-Scangate-Signature`` value of a body."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def standard_signature(key: bytes, webhook_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` value (one ``v1`` signature) of a delivery."""
    signed = f"{webhook_id}.{timestamp_s}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(key: bytes, webhook_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """Every header that authenticates a delivery: the Standard Webhooks three and
    ``X-Scangate-Signature``. ``webhook_id`` must hold no ``.`` (it is a field of the
    signed text); ``timestamp_s`` is the time of this try."""
    if "." in webhook_id:
        raise ValueError("a webhook id must not contain '.'")
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": standard_signature(key, webhook_id, timestamp_s, body),
        SCANGATE_SIGNATURE_HEADER: scangate_signature(key, body),
    }
