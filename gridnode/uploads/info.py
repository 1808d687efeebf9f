"""An upload's state as the store holds it: ``uploads/<id>/info`` and the parts it lists."""

from __future__ import annotations

import json
from dataclasses import dataclass

from gridnode import keys
from gridnode.errors import GridnodeError
from gridnode.notify.targets import parse_urls
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.priority import RANK as PRIORITY_RANK

#: an info object larger than this is not read
MAX_INFO_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Part:
    """A committed chunk: ``uploads/<upload>/part-<n>-<id>``."""

    id: str
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadInfo:
    id: str
    length: int
    offset: int
    created: float
    expires: float
    #: the Upload-Metadata header as the client sent it (echoed on HEAD)
    metadata: str = ""
    filename: str = ""
    presets: str | None = None
    parts: tuple[Part, ...] = ()
    #: the ``sub`` of the token that created it ("" without tokens): only that tenant may go on
    tenant: str = ""
    #: its job's notify URLs, comma-separated (Upload-Metadata ``notify``, checked at creation)
    notify: str = ""
    #: its job's priority (Upload-Metadata ``priority``, checked at creation: gridnode/priority.py)
    priority: str = DEFAULT_PRIORITY

    def notify_urls(self) -> list[str]:
        return parse_urls(self.notify)

    def dumps(self) -> bytes:
        doc = {"id": self.id, "length": self.length, "offset": self.offset, "created": self.created,
               "expires": self.expires, "metadata": self.metadata, "filename": self.filename,
               "presets": self.presets, "parts": [[p.id, p.size, p.sha256] for p in self.parts],
               "tenant": self.tenant, "notify": self.notify, "priority": self.priority}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes, upload_id: str) -> UploadInfo:
        """Parse and check an info object: the store is shared, so trust nothing in it."""
        try:
            doc = json.loads(data)
            parts = tuple(Part(str(p[0]), int(p[1]), str(p[2])) for p in doc["parts"])
            info = cls(id=str(doc["id"]), length=int(doc["length"]), offset=int(doc["offset"]),
                       created=float(doc["created"]), expires=float(doc["expires"]),
                       metadata=str(doc.get("metadata") or ""), filename=str(doc.get("filename") or ""),
                       presets=None if doc.get("presets") is None else str(doc["presets"]), parts=parts,
                       tenant=str(doc.get("tenant") or ""), notify=str(doc.get("notify") or ""),
                       priority=str(doc.get("priority") or DEFAULT_PRIORITY))
        except (ValueError, KeyError, TypeError, IndexError):
            raise GridnodeError(f"the stored state of upload {upload_id} is unreadable; start a new upload",
                                code="storage_corrupt", status=500) from None
        if (info.id != upload_id or not all(keys.is_id(p.id) for p in parts)
                or info.offset != sum(p.size for p in parts) or info.offset > info.length
                or info.priority not in PRIORITY_RANK):
            raise GridnodeError(f"the stored state of upload {upload_id} is inconsistent; start a new upload",
                                code="storage_corrupt", status=500)
        return info


def owned_by(info: UploadInfo, tenant: str | None) -> bool:
    """May ``tenant`` (None: any, an admin or a node without tokens) go on with this upload?"""
    return tenant is None or info.tenant == tenant


def info_key(upload_id: str) -> str:
    return keys.check_key(keys.upload_prefix(upload_id) + "info")


def part_key(upload_id: str, number: int, part_id: str) -> str:
    """Part ``number`` (1-based); ``part_id`` is a fresh id per attempt, checked before use."""
    return keys.check_key(keys.upload_prefix(upload_id) + f"part-{number:05d}-{keys.check_segment(part_id)}")
