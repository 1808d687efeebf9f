"""An upload's files in this node's spool: a chunk being received, and the local copy of the
parts committed so far."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gridnode.errors import GridnodeError
from gridnode.spool import Meter
from gridnode.uploads.info import UploadInfo

_BLOCK = 1024 * 1024


class Chunk:
    """Where GridRequest writes one chunk's body (a PATCH's, or a creation POST's): a file in the
    spool, hashed as it is written. ``cut_off`` is told of a body that ended mid-way and may be
    kept. ``meter`` watches the free space as it grows; ``on_release`` frees the node's slot
    once the file is removed (after its commit, or refused)."""

    def __init__(self, path: str, upload_id: str, start: int, limit: int, checksum: str | None,
                 creation: UploadInfo | None, cut_off: Callable[[Chunk], None], *,
                 meter: Meter | None = None, tenant: str | None = None,
                 on_release: Callable[[], None] | None = None) -> None:
        self.upload_id = upload_id
        self.tenant = tenant  # who sends it (None: anyone may); the commit checks the upload is theirs
        self.start = start
        self.limit = limit
        self.checksum = checksum  # hex sha256 the client announced, or None
        self.creation = creation  # the upload to create first (POST with a body)
        self.cut_off = cut_off
        self.meter = meter
        self.on_release = on_release
        self.path = path
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.refused = False
        self.ended = False  # the body is complete, or was cut off: nothing more is written

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            self.refused = True
            raise GridnodeError(f"this chunk goes past the upload's length or this node's limit "
                                f"({self.start + self.limit} bytes)", code="too_large", status=413)
        if self.meter is not None:
            try:
                self.meter.add(len(data))
            except GridnodeError:
                self.refused = True  # a node short of disk keeps none of it
                raise
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    # twisted.web's Request.requestReceived seeks and tells the content.
    def seek(self, offset: int, whence: int = 0) -> int:
        return self.size

    def tell(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def end(self) -> None:
        """The whole body is here."""
        self.ended = True
        self.close()

    def abort(self) -> None:
        """The connection dropped mid-body, or GridRequest refused it."""
        if self.ended:
            return
        self.ended = True
        self.close()
        # A partial chunk cannot be checked against its checksum; a creation whose
        # answer never reached the client has no one to resume it.
        if self.refused or self.creation is not None or self.checksum is not None or self.size == 0:
            self.remove()
            return
        self.cut_off(self)

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        release, self.on_release = self.on_release, None
        if release is not None:
            release()


@dataclass
class LocalCopy:
    """This node's copy of an upload: its info as last read, and ``<id>.partial``, the parts
    this node has, concatenated in order."""

    info: UploadInfo
    etag: str
    path: str
    part_ids: list[str] = field(default_factory=list)
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)  # of the partial file, kept as it grows

    def reset(self) -> None:
        """Forget the local bytes (they no longer match the store); they are fetched again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.part_ids = []
        self.size = 0
        self.sha256 = hashlib.sha256()

    def in_step(self, info: UploadInfo) -> bool:
        """The partial file holds a prefix of ``info``'s parts, and exactly their bytes."""
        on_disk = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        ids = [p.id for p in info.parts[:len(self.part_ids)]]
        return on_disk == self.size and ids == self.part_ids

    def append(self, source: str, source_sha256: Any) -> str:
        """Append ``source`` to the partial file, keeping its running sha256; returns the source's
        sha256. A first chunk whose hash is known already is renamed, not copied."""
        if self.size == 0 and source_sha256 is not None:
            os.replace(source, self.path)
            self.sha256 = source_sha256.copy()
            self.size = os.path.getsize(self.path)
            digest: str = source_sha256.hexdigest()
            return digest
        chunk = hashlib.sha256()
        with open(source, "rb") as src, open(self.path, "ab") as dst:
            while block := src.read(_BLOCK):
                chunk.update(block)
                self.sha256.update(block)
                dst.write(block)
                self.size += len(block)
        return chunk.hexdigest()
