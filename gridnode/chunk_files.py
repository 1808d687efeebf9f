"""
A chunk's folder as one archive: what a node that ran a chunk stores, and what the job's
owner unpacks into its work folder (``stitch.chunk_dir``) so the stitch runs unchanged.

One uncompressed tar per chunk, not one object per file: a CMAF chunk holds a segment per
2 s per rung, and the pool pays per request (one PUT, one GET and one DELETE a chunk,
whatever it holds); the video is compressed already. Packing takes plain files reached
through no link (a child may plant one), and unpacking trusts nothing in the archive: only
regular files under names of safe segments, bounded in number and bytes, written into a
fresh folder of our own that then replaces the chunk's folder (a link an earlier run left
there is removed, never followed).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile

from gridnode.errors import GridnodeError

#: the archive's name under ``chunks/<job>/<task>/``
ARCHIVE = "files.tar"
#: files a chunk's folder may hold (a CMAF ladder of 2 s segments over a long chunk, and its tiles)
MAX_FILES = 20_000
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,200}")


def bad_archive(message: str) -> GridnodeError:
    return GridnodeError(f"a chunk's archive {message}; the chunk is made again", code="bad_chunk", status=422)


def _safe(name: str) -> bool:
    parts = name.split("/")
    return 0 < len(parts) <= 8 and all(_SEGMENT.fullmatch(p) and p not in (".", "..") for p in parts)


def pack(folder: str, archive: str, limit: int) -> int:
    """``folder``'s plain files (reached through no link) into the tar ``archive``; fires the
    archive's size. A link, a device or a file with other names fails ``ffmpeg_failed`` (the
    child made it); more than ``limit`` bytes fail ``output_too_large``."""
    root = os.path.realpath(folder)
    total, count = 0, 0
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, folder).replace(os.sep, "/")
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                        and os.path.realpath(path) == os.path.join(root, relative)) or not _safe(relative):
                    raise GridnodeError(f"ffmpeg wrote {relative[:200]} as something other than a plain file",
                                        code="ffmpeg_failed", status=422)
                total += st.st_size
                count += 1
                if total > limit or count > MAX_FILES:
                    raise GridnodeError(f"the chunk's files passed the limit of {limit} bytes",
                                        code="output_too_large", status=413)
                info = tarfile.TarInfo(relative)
                info.size, info.mode, info.mtime = st.st_size, 0o600, int(st.st_mtime)
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    return os.path.getsize(archive)


def unpack(archive: str, folder: str, limit: int) -> list[str]:
    """The archive's files, checked, as the new content of ``folder`` (replaced whole); fires the
    names. Anything but a regular file under safe names, more than ``limit`` bytes or
    `MAX_FILES` files fails ``bad_chunk``, leaving ``folder`` as it was."""
    parent = os.path.dirname(os.path.abspath(folder))
    fresh = tempfile.mkdtemp(prefix=".unpack-", dir=parent)
    names: list[str] = []
    try:
        total = 0
        try:
            tar = tarfile.open(archive, "r:")  # noqa: SIM115 - closed below
        except tarfile.TarError:
            raise bad_archive("is not a tar archive") from None
        with tar:
            try:
                for member in tar:
                    if member.isdir():
                        continue
                    if not member.isreg() or not _safe(member.name):
                        raise bad_archive(f"holds {member.name[:200]!r}, not a plain file of a safe name")
                    total += member.size
                    if total > limit or len(names) >= MAX_FILES:
                        raise bad_archive(f"holds more than {limit} bytes or {MAX_FILES} files")
                    target = os.path.join(fresh, *member.name.split("/"))
                    try:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                    except OSError:  # a file of the archive holds the folder's name
                        raise bad_archive(f"holds {member.name[:200]!r} under a file's name") from None
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file's
                    try:
                        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    except FileExistsError:
                        raise bad_archive(f"holds {member.name[:200]!r} twice") from None
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(source, out, 1024 * 1024)
                    names.append(member.name)
            except tarfile.TarError as e:
                raise bad_archive(f"is cut or malformed ({e})") from None
        if os.path.lexists(folder):
            if os.path.isdir(folder) and not os.path.islink(folder):
                shutil.rmtree(folder)
            else:
                os.unlink(folder)
        os.replace(fresh, folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return names
