"""
The embedded default: a local folder (``file:PATH``).

An object is the file ``PATH/<key>``, so the folder can be browsed by hand.
Beside the objects, ``PATH/.gridnode/`` holds what S3 keeps for us: ETags
(written at put time), temporary files (written, then renamed into place, so
a reader never sees half an object) and a lock that makes conditional puts
atomic across threads and processes (several nodes on one laptop may share a
folder).

An ETag is opaque, as S3's are (a multipart upload's is not an MD5 either):
what it promises is that it changes whenever the object is replaced. Small
objects put as bytes (job records, registry records) get the MD5 of their
bytes, as S3 gives them; a file put with ``put_file`` (videos) gets a random
token instead, because hashing every input and output was a quarter of the
node's own CPU per job and nothing compares that ETag with the bytes. A file
put there by hand gets its MD5, computed once on first use.

Durable before it is acknowledged: a put returns once the object's bytes and its directory entry
are on disk (the temporary file fsynced, renamed, its folder fsynced, and every folder made for
it), so a 201 survives a power cut as an S3 answer would. A multipart upload (S3's, for the
contract) keeps its parts under ``.gridnode/parts/<upload id>/`` until it is finished or aborted;
the node itself streams nothing here (``part_size`` None: a body is put whole once complete,
fsynced as it arrived, and taken by a hard link where the caller hands its file over and both lie
on one filesystem: an upload is then written to disk once, not copied).

The folder is the node's own: every folder it makes is 0700 and every file 0600, and the
root is made 0700 at open (unless it is a shared folder, sticky as /tmp is, or another
user's), so a store an older version left world-readable is closed too. No child of the
node (an ffmpeg that a hostile upload took over) and no other user can read a tenant's
inputs or job records.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator

from gridnode import keys
from gridnode.errors import GridnodeError, InvalidKey, NotFound
from gridnode.store.base import ObjectInfo, Page
from gridnode.store.memory import check_preconditions, check_size, page_of

_CHUNK = 1 << 20
_META = ".gridnode"


class FileBackend:
    #: bodies are put whole once complete: a copy in the kernel beats parts written and joined
    part_size: int | None = None

    def __init__(self, root: str, *, read_only: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.url = "file:" + self.root
        self._meta = os.path.join(self.root, _META)
        # A reader (the command line client looking for nodes) leaves no trace where it looks.
        self.read_only = read_only
        if read_only:
            self._thread_lock = threading.Lock()
            return
        _makedirs(os.path.join(self._meta, "tmp"))
        _makedirs(os.path.join(self._meta, "etags"))
        _makedirs(os.path.join(self._meta, "parts"))
        st = os.stat(self.root)
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:
            os.chmod(self.root, 0o700)
        self._thread_lock = threading.Lock()

    # -- paths

    def _path(self, key: str) -> str:
        keys.check_key(key)
        if key.split("/", 1)[0] == _META:
            raise InvalidKey(f"{_META}/ is the file store's own folder")
        path = os.path.join(self.root, *key.split("/"))
        # check_key forbids '..', so this holds; kept as a second lock on the door.
        if os.path.commonpath([self.root, path]) != self.root:
            raise InvalidKey(f"{key} escapes the store")
        return path

    def _etag_path(self, key: str) -> str:
        return os.path.join(self._meta, "etags", *key.split("/"))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, open(os.path.join(self._meta, "lock"), "a", opener=_private) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _tmp(self) -> str:
        return os.path.join(self._meta, "tmp", f"{os.getpid()}-{keys.new_id()}")

    # -- metadata

    def _info(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None
        if not os.path.isfile(path):
            raise NotFound(f"no object {key}")
        etag = None
        try:
            with open(self._etag_path(key)) as f:
                meta = json.load(f)
            if meta["size"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns:
                etag = meta["etag"]
        except (OSError, ValueError, KeyError):
            pass
        if etag is None:
            # A file put there by hand: hash it once and remember.
            md5 = hashlib.md5()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    md5.update(chunk)
            etag = md5.hexdigest()
            if not self.read_only:
                self._write_etag(key, etag, st)
        return ObjectInfo(key, st.st_size, etag, st.st_mtime)

    def _write_etag(self, key: str, etag: str, st: os.stat_result) -> None:
        path = self._etag_path(key)
        _makedirs(os.path.dirname(path))
        tmp = self._tmp()
        with open(tmp, "w", opener=_private) as f:
            json.dump({"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, f)
        os.replace(tmp, path)

    def _current(self, key: str) -> ObjectInfo | None:
        try:
            return self._info(key)
        except NotFound:
            return None

    # -- writes

    def _commit(self, key: str, tmp: str, etag: str, if_none_match: str | None,
                if_match: str | None) -> ObjectInfo:
        path = self._path(key)
        try:
            with self._locked():
                if if_none_match is not None or if_match is not None:
                    check_preconditions(key, self._current(key), if_none_match, if_match)
                try:
                    made = _makedirs(os.path.dirname(path))
                except (FileExistsError, NotADirectoryError):
                    raise InvalidKey(f"{key} lies under another object") from None
                if os.path.isdir(path):
                    raise InvalidKey(f"{key} is a folder of other objects")
                os.replace(tmp, path)
                # the new entry, and the entry of each folder made for it, reach the disk
                for folder in [os.path.dirname(path), *(os.path.dirname(m) for m in made)]:
                    _fsync_folder(folder)
                st = os.stat(path)
                self._write_etag(key, etag, st)
                return ObjectInfo(key, st.st_size, etag, st.st_mtime)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None,
    ) -> ObjectInfo:
        self._path(key)
        tmp = self._tmp()
        with open(tmp, "wb", opener=_private) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self._commit(key, tmp, hashlib.md5(data).hexdigest(), if_none_match, if_match)

    def put_file(
        self, key: str, path: str, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None, handed_over: bool = False,
    ) -> ObjectInfo:
        self._path(key)
        tmp = self._tmp()
        try:
            if not handed_over:
                raise OSError("a copy: the caller keeps its file")
            # the spool's own body, on this filesystem: the store takes its inode, not a copy
            os.link(path, tmp)
        except OSError:
            os.close(_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))  # copyfile keeps its mode
            shutil.copyfile(path, tmp)  # in the kernel (sendfile): the bytes never pass through Python
        _fsync_file(tmp)
        return self._commit(key, tmp, secrets.token_hex(16), if_none_match, if_match)

    # -- multipart uploads

    def _parts(self, key: str, upload_id: str) -> str:
        """The folder of an upload in progress; NotFound when there is none of ``key``."""
        self._path(key)
        if not keys.is_id(upload_id):
            raise NotFound(f"no upload {upload_id} of {key}")
        folder = os.path.join(self._meta, "parts", upload_id)
        try:
            with open(os.path.join(folder, "key")) as f:
                if f.read() == key:
                    return folder
        except FileNotFoundError:
            pass
        raise NotFound(f"no upload {upload_id} of {key}")

    def begin_upload(self, key: str, *, content_type: str | None = None) -> str:
        self._path(key)
        upload_id = keys.new_id()
        folder = os.path.join(self._meta, "parts", upload_id)
        _makedirs(folder)
        with open(os.path.join(folder, "key"), "w", opener=_private) as f:
            f.write(key)
        return upload_id

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int, length: int) -> str:
        folder = self._parts(key, upload_id)
        tmp = self._tmp()
        md5 = hashlib.md5()
        with open(path, "rb") as src, open(tmp, "wb", opener=_private) as dst:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{path} ends before the {length} bytes of part {number}")
                md5.update(chunk)
                dst.write(chunk)
                left -= len(chunk)
        etag = md5.hexdigest()
        os.replace(tmp, os.path.join(folder, f"{number}.{etag}"))
        for name in os.listdir(folder):
            if name.startswith(f"{number}.") and name != f"{number}.{etag}":
                os.unlink(os.path.join(folder, name))
        return etag

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> str:
        self._info(source)  # NotFound for a missing source
        return self.put_part(key, upload_id, number, self._path(source), 0, os.path.getsize(self._path(source)))

    def finish_upload(self, key: str, upload_id: str, parts: builtins.list[tuple[str, int]]) -> ObjectInfo:
        folder = self._parts(key, upload_id)
        tmp = self._tmp()
        with open(tmp, "wb", opener=_private) as dst:
            for number, (etag, size) in enumerate(parts, start=1):
                try:
                    src = open(os.path.join(folder, f"{number}.{etag}"), "rb")  # noqa: SIM115 - closed below
                except FileNotFoundError:
                    raise GridnodeError(f"{key}: part {number} is not the part put", code="storage_error",
                                        status=502) from None
                with src:
                    if os.fstat(src.fileno()).st_size != size:
                        raise GridnodeError(f"{key}: part {number} is not the part put", code="storage_error",
                                            status=502)
                    shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
        info = self._commit(key, tmp, secrets.token_hex(16), None, None)
        shutil.rmtree(folder, ignore_errors=True)
        return info

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            shutil.rmtree(self._parts(key, upload_id))
        except (NotFound, FileNotFoundError):
            pass

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str]]:
        keys.check_prefix(prefix)
        found = []
        base = os.path.join(self._meta, "parts")
        for upload_id in os.listdir(base):
            with contextlib.suppress(OSError), open(os.path.join(base, upload_id, "key")) as f:
                key = f.read()
                if key.startswith(prefix):
                    found.append((key, upload_id))
        return sorted(found)

    # -- reads

    def get_bytes(self, key: str, *, max_size: int | None = None) -> tuple[bytes, ObjectInfo]:
        info = self._info(key)
        check_size(key, info.size, max_size)
        try:
            with open(self._path(key), "rb") as f:
                return f.read(), info
        except FileNotFoundError:
            raise NotFound(f"no object {key}") from None

    def get_file(self, key: str, path: str) -> ObjectInfo:
        info = self._info(key)
        tmp = f"{path}.{keys.new_id()}.part"
        with open(self._path(key), "rb") as src, open(tmp, "wb", opener=_private) as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                dst.write(chunk)
        os.replace(tmp, path)
        return info

    def stat(self, key: str) -> ObjectInfo:
        return self._info(key)

    def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> Page:
        keys.check_prefix(prefix)
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = os.path.join(self.root, *base.split("/")) if base else self.root
        names = []
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath == self.root:
                dirnames[:] = [d for d in dirnames if d != _META]
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                key = name if rel == "." else rel.replace(os.sep, "/") + "/" + name
                if key.startswith(prefix):
                    names.append(key)
        names.sort(key=lambda k: k.encode("utf-8"))
        return page_of(names, self._info, start_after, limit)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        path = self._path(key)
        with self._locked():
            if if_match is not None:
                check_preconditions(key, self._current(key), None, if_match)
            for p in (path, self._etag_path(key)):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                    os.unlink(p)
                _prune(os.path.dirname(p), stop=self.root)

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        return None

    def local_path(self, key: str) -> str | None:
        path = self._path(key)
        return path if os.path.isfile(path) else None

    def close(self) -> None:
        pass

    def sweep_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temporary files a crash left behind; returns how many."""
        folder = os.path.join(self._meta, "tmp")
        removed = 0
        for name in os.listdir(folder):
            p = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if time.time() - os.stat(p).st_mtime > older_than:
                    os.unlink(p)
                    removed += 1
        return removed


def _private(path: str, flags: int) -> int:
    """``open``'s opener for a file only the node may read: 0600 whatever the umask."""
    return os.open(path, flags, 0o600)


def _makedirs(path: str) -> list[str]:
    """``path`` and its missing parents, each made 0700 (``os.makedirs`` gives its mode to the
    last folder only); a file in the way raises FileExistsError as ``os.makedirs`` does. Returns
    the folders made, outermost first."""
    if os.path.isdir(path):
        return []
    made = _makedirs(os.path.dirname(path))
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return made
    return [*made, path]


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: str) -> None:
    """A folder's entries on disk: what makes a rename or a new entry in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(folder: str, stop: str) -> None:
    """Remove empty folders from ``folder`` up to (not including) ``stop``."""
    while os.path.commonpath([stop, folder]) == stop and folder != stop:
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)
