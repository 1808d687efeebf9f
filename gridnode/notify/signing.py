"""
Standard Webhooks signatures (https://www.standardwebhooks.com/), made with the
``standardwebhooks`` library the receivers verify with.

The pool's webhook secrets are a keyring file (``--webhook-secret``, gridnode/keyring.py): lines
``ID whsec_BASE64`` where BASE64 is 24-64 random bytes, the string a receiver hands to
``standardwebhooks.Webhook``. Every key of the ring signs, and ``webhook-signature`` carries one
``v1,...`` per key separated by spaces (the spec's rotation): a receiver that knows any one of the
secrets verifies the message, so a secret rotates by adding the new key everywhere, moving the
receivers to it, then dropping the old one. Every node of a pool needs the same keyring: a peer
signs what a dead node owed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC, datetime

from standardwebhooks import Webhook

from gridnode.errors import ConfigError
from gridnode.keyring import Keyring

PREFIX = "whsec_"
MIN_KEY, MAX_KEY = 24, 64


def webhook_key(secret: bytes, where: str) -> bytes:
    """The HMAC key a ``whsec_`` secret stands for, or a ConfigError naming ``where``."""
    text = secret.decode("ascii")
    if not text.startswith(PREFIX):
        raise ConfigError(f"{where}: a webhook secret is whsec_ and base64 (echo whsec_$(head -c 32 "
                          "/dev/urandom | base64)), the string receivers verify with")
    try:
        key = base64.b64decode(text[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: the part after whsec_ is not base64") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise ConfigError(f"{where}: a webhook secret holds {MIN_KEY}-{MAX_KEY} bytes; this one {len(key)}")
    return key


def check_ring(ring: Keyring, where: str) -> Keyring:
    """``ring`` if every secret in it is a webhook secret."""
    for key in ring.keys:
        webhook_key(key.secret, f"{where}, key {key.id}")
    return ring


class Signer:
    """Signs a message with every key of the ring read last (``ring`` follows the file)."""

    def __init__(self, ring: Callable[[], Keyring]) -> None:
        self.ring = ring

    def headers(self, msg_id: str, timestamp: float, body: bytes) -> dict[str, str]:
        """The three Standard Webhooks headers for ``body`` sent now (``timestamp``, seconds)."""
        when = datetime.fromtimestamp(int(timestamp), tz=UTC)
        data = body.decode("utf-8")
        signatures = []
        for key in self.ring().keys:
            try:
                secret = webhook_key(key.secret, "webhook-secret")
            except ConfigError:
                continue  # a key changed on disk to one that is not a webhook secret: the others sign
            signatures.append(Webhook(secret).sign(msg_id, when, data))
        return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp)),
                "webhook-signature": " ".join(signatures)}
