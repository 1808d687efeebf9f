"""
Signed result URLs: what ``outputs[].url`` is in a job's JSON on a node with
a token keyring, so a plain ``<video src>``, a download link or an HLS player
loads a result with no header and no token in the URL.

    /results/<job>/~<expires>.<kid>.<mac>/<name>

- ``mac`` = HMAC-SHA256 over the job id, the output's scope and ``expires``
  (Unix seconds), keyed by a key derived from the keyring's key ``kid``; the
  derivation (HMAC of the key with `PURPOSE`) keeps a URL's MAC from ever
  standing for a token's signature, or the other way round.
- The scope is the file's name (``mp4-720p.mp4``), or the top folder of a
  many-file output (``hls/``): the signature sits in a path segment, so the
  playlists' relative URLs (``720p/index.m3u8``, ``seg_000.ts``) inherit it,
  which a ``?sig=`` would not.
- The segment starts with ``~``, which no object key's segment can
  (gridnode/keys.py), so it never shadows an output's name.
- Signed when a job is read (never stored in the record), valid for
  ``--result-url-ttl`` seconds; any node holding the keyring verifies.

Only the standard library and gridnode's keyring: signing is local
computation, no store request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gridnode import keys
from gridnode.errors import GridnodeError, InvalidKey
from gridnode.keyring import Key, Keyring

#: what a result URL's key is derived for (a key is used for nothing else under this name)
PURPOSE = b"gridnode result url v1"
#: the first character of a signature segment: never the first of a key segment
MARK = "~"
#: clocks of the pool's nodes may differ this much: an expiry up to ttl + this ahead is believed
LEEWAY_SECONDS = 60
_SIGNATURE = re.compile(r"~([1-9][0-9]{0,11})\.([A-Za-z0-9._-]{1,64})\.([A-Za-z0-9_-]{43})")
_LONGEST = 1 + 12 + 1 + 64 + 1 + 43


def bad_signature(message: str) -> GridnodeError:
    return GridnodeError(message, code="bad_signature", status=403)


def url_expired(message: str) -> GridnodeError:
    return GridnodeError(message, code="url_expired", status=403)


def is_signature(segment: str) -> bool:
    """Does this path segment (after ``/results/<job>/``) claim to be a signature?"""
    return segment.startswith(MARK)


def scope_of(name: str) -> str:
    """What one signature opens: the file, or the top folder of a many-file output (``hls/``)."""
    return name.split("/", 1)[0] + "/" if "/" in name else name


@dataclass(frozen=True)
class Signature:
    expires: int
    kid: str
    mac: str


def parse_signature(segment: str) -> Signature:
    """A signature segment's parts, or `bad_signature` for anything not of its exact shape."""
    found = _SIGNATURE.fullmatch(segment) if len(segment) <= _LONGEST else None
    if found is None:
        raise bad_signature("this result URL is damaged: copy it whole from the job's outputs[].url")
    return Signature(int(found.group(1)), found.group(2), found.group(3))


def _mac(key: Key, job_id: str, scope: str, expires: int) -> str:
    derived = hmac.new(key.secret, PURPOSE, hashlib.sha256).digest()
    message = f"{job_id}\n{scope}\n{expires}".encode()
    digest = hmac.new(derived, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class ResultUrls:
    """Makes and checks result URLs. ``keyring()`` answers the token keys now (None: the node has
    none, and its result URLs are plain ``/results/<job>/<name>``)."""

    def __init__(self, keyring: Callable[[], Keyring] | None, ttl: int, now: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self.ttl = ttl
        self.now = now

    def url(self, job_id: str, name: str) -> str:
        """The URL of output ``name`` of job ``job_id``, signed now when the node has a keyring."""
        plain = f"/results/{job_id}/{name}"
        if self.keyring is None:
            return plain
        keys.output(job_id, name)  # InvalidKey: never sign what could not be served
        key = self.keyring().signer
        expires = math.ceil(self.now() + self.ttl)
        return f"/results/{job_id}/{MARK}{expires}.{key.id}.{_mac(key, job_id, scope_of(name), expires)}/{name}"

    def verify(self, job_id: str, segment: str, name: str) -> int:
        """The whole seconds left to a URL's signature ``segment`` for ``name`` of ``job_id``; else the
        coded 403: `bad_signature` (not made by this pool's keys for this job and scope, or
        changed) or `url_expired`. ``name`` must have passed `keys.output` already."""
        if self.keyring is None:
            raise bad_signature(f"this node signs no result URLs: its results are at /results/{job_id}/{name}")
        signature = parse_signature(segment)
        key = self.keyring().find(signature.kid)
        expected = _mac(key, job_id, scope_of(name), signature.expires) if key is not None else ""
        if not hmac.compare_digest(expected.encode(), signature.mac.encode()):
            raise bad_signature("this result URL was not signed for this file by this pool (or its key was "
                                f"retired): read the job again (GET /jobs/{job_id}) for a fresh one")
        left = signature.expires - self.now()
        if left <= 0:
            raise url_expired(f"this result URL expired {math.ceil(-left)} s ago: read the job again "
                              f"(GET /jobs/{job_id}) for a fresh one")
        if left > self.ttl + LEEWAY_SECONDS:
            # signed by a node with a longer --result-url-ttl: this node gives no URL so long a life
            raise bad_signature(f"this result URL claims {math.ceil(left)} s of validity, more than this node's "
                                f"result-url-ttl ({self.ttl} s): read the job again for a fresh one")
        return max(1, int(left))  # a presigned URL of this life ends with the signed one

    def job_json(self, record: dict[str, Any]) -> dict[str, Any]:
        """A job's JSON (``Job.to_json()``) as a reader gets it: each output's ``url`` made now.
        The record is not changed (its lists are the job's own)."""
        outputs = record.get("outputs")
        if self.keyring is None or not outputs:
            return record
        job_id = str(record.get("id"))
        signed = []
        for output in outputs:
            name = output.get("name") if isinstance(output, dict) else None
            if isinstance(name, str):
                try:
                    output = {**output, "url": self.url(job_id, name)}
                    dash = output.get("dash")  # a CMAF's DASH manifest, in the same signed folder
                    if isinstance(dash, str) and dash.startswith(f"/results/{job_id}/"):
                        output["dash"] = self.url(job_id, dash[len(f"/results/{job_id}/"):])
                except InvalidKey:
                    pass  # a name no key can hold: its plain URL answers 404, as it did
            signed.append(output)
        return {**record, "outputs": signed}

    def listing(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``GET /jobs``'s answer with each job's URLs made now."""
        return {k: [self.job_json(j) for j in v] if isinstance(v, list) else v for k, v in doc.items()}
