"""An in-memory backend for unit tests; it passes the same contract suite."""

from __future__ import annotations

import builtins
import hashlib
import shutil
import threading
import time

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.store.base import ObjectInfo, Page, read_range


class MemoryBackend:
    url = "memory:"

    def __init__(self, part_size: int | None = None) -> None:
        self._objects: dict[str, tuple[bytes, ObjectInfo]] = {}
        self._lock = threading.Lock()
        #: any size: tests stream bodies in small parts
        self.part_size = part_size
        #: multipart uploads in progress: id -> (key, parts by number)
        self._uploads: dict[str, tuple[str, dict[int, bytes]]] = {}

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None,
    ) -> ObjectInfo:
        keys.check_key(key)
        info = ObjectInfo(key, len(data), hashlib.md5(data).hexdigest(), time.time())
        with self._lock:
            current = self._objects.get(key)
            check_preconditions(key, current[1] if current else None, if_none_match, if_match)
            self._objects[key] = (bytes(data), info)
        return info

    def put_file(self, key: str, path: str, *, handed_over: bool = False, **kw: str | None) -> ObjectInfo:
        with open(path, "rb") as f:
            return self.put_bytes(key, f.read(), **kw)

    def get_bytes(self, key: str, *, max_size: int | None = None) -> tuple[bytes, ObjectInfo]:
        keys.check_key(key)
        with self._lock:
            if key not in self._objects:
                raise NotFound(f"no object {key}")
            data, info = self._objects[key]
        check_size(key, info.size, max_size)
        return data, info

    def get_file(self, key: str, path: str) -> ObjectInfo:
        data, info = self.get_bytes(key)
        tmp = f"{path}.{keys.new_id()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        shutil.move(tmp, path)
        return info

    def stat(self, key: str) -> ObjectInfo:
        return self.get_bytes(key)[1]

    def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> Page:
        keys.check_prefix(prefix)
        with self._lock:
            names = sorted(k for k in self._objects if k.startswith(prefix))
            return page_of(names, lambda k: self._objects[k][1], start_after, limit)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        keys.check_key(key)
        with self._lock:
            current = self._objects.get(key)
            if if_match is not None:
                check_preconditions(key, current[1] if current else None, None, if_match)
            self._objects.pop(key, None)

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        return None

    def begin_upload(self, key: str, *, content_type: str | None = None) -> str:
        keys.check_key(key)
        upload_id = keys.new_id()
        with self._lock:
            self._uploads[upload_id] = (key, {})
        return upload_id

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int, length: int) -> str:
        data = read_range(path, offset, length)
        with self._lock:
            parts = self._upload(key, upload_id)
            parts[number] = data
        return hashlib.md5(data).hexdigest()

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> str:
        data = self.get_bytes(source)[0]
        with self._lock:
            self._upload(key, upload_id)[number] = data
        return hashlib.md5(data).hexdigest()

    def finish_upload(self, key: str, upload_id: str, parts: builtins.list[tuple[str, int]]) -> ObjectInfo:
        with self._lock:
            put = self._upload(key, upload_id)
            if [(hashlib.md5(put.get(n, b"")).hexdigest(), len(put.get(n, b""))) for n in range(1, len(parts) + 1)] \
                    != list(parts):
                raise GridnodeError(f"{key}: the parts named are not the parts put", code="storage_error",
                                    status=502)
            data = b"".join(put[n] for n in range(1, len(parts) + 1))
            del self._uploads[upload_id]
        return self.put_bytes(key, data)

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._uploads.pop(upload_id, None)

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str]]:
        with self._lock:
            return sorted((key, upload_id) for upload_id, (key, _) in self._uploads.items() if key.startswith(prefix))

    def _upload(self, key: str, upload_id: str) -> dict[int, bytes]:
        found = self._uploads.get(upload_id)
        if found is None or found[0] != key:
            raise NotFound(f"no upload {upload_id} of {key}")
        return found[1]

    def local_path(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        pass


def check_preconditions(
    key: str, current: ObjectInfo | None, if_none_match: str | None, if_match: str | None
) -> None:
    """S3's rules: If-None-Match ``*`` fails on an existing key; If-Match on a
    missing key is 404 and on another ETag is 412."""
    if if_none_match is not None:
        if if_none_match != "*":
            raise GridnodeError("if_none_match takes only '*'", code="bad_request", status=400)
        if current is not None:
            raise PreconditionFailed(f"{key} exists already")
    if if_match is not None:
        if current is None:
            raise NotFound(f"no object {key} to match")
        if current.etag != if_match.strip('"'):
            raise PreconditionFailed(f"{key} has changed (ETag {current.etag}, not {if_match})")


def check_size(key: str, size: int, max_size: int | None) -> None:
    if max_size is not None and size > max_size:
        raise GridnodeError(
            f"{key} is {size} bytes, more than the {max_size} allowed here",
            code="too_large", status=413,
        )


def page_of(names: list[str], info, start_after: str | None, limit: int) -> Page:  # type: ignore[no-untyped-def]
    """One page of a sorted key list, S3's ``StartAfter`` semantics."""
    if start_after is not None:
        names = [n for n in names if n > start_after]
    chosen = names[:limit]
    more = len(names) > limit
    return Page([info(n) for n in chosen], chosen[-1] if more and chosen else None)
