"""
What the node writes beside ffmpeg's outputs once ffmpeg is done and the output folder is
the node's again (``sandbox.take_back``): each storyboard's WebVTT, and each CMAF rung's
codec string in both manifests.

ffmpeg read a hostile input, so what it left is read with care: only plain files reached
through no link (a planted link must not copy a node's file into a result), of a bounded
size; and a file the node writes is made new, never opened through a link the child
planted under its name.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable, Sequence

from gridnode.errors import GridnodeError
from gridnode.media import cmaf, headers, storyboard
from gridnode.media.ffmpeg import plain_file
from gridnode.media.presets import LADDERS, Preset, hls_rungs, storyboard_plan
from gridnode.media.probe import ProbeResult

#: an init segment's most bytes (ffmpeg's are under 1 KiB)
MAX_INIT = 64 * 1024


def write_storyboards(out_dir: str, probe: ProbeResult, presets: Iterable[Preset]) -> None:
    """Write each storyboard's VTT beside the sheets ffmpeg made, from the plan the sheets
    followed (``ffmpeg_failed`` when a planned sheet is missing). Run once the folder is the
    node's again (``sandbox.take_back``): whatever the child left under that name is removed,
    and the file is made new, never opened through a link it planted."""
    for preset in dict.fromkeys(presets):
        if preset.container != "storyboard":
            continue
        plan = storyboard_plan(probe, preset)
        folder = os.path.join(out_dir, preset.name)
        sheets = os.path.basename(storyboard.SHEET)
        missing = [sheets % n for n in range(1, plan.sheets + 1)
                   if not os.path.isfile(os.path.join(folder, sheets % n))]
        if missing:  # the cues would point at nothing
            raise GridnodeError(f"ffmpeg did not write {preset.name}/{missing[0]}", code="ffmpeg_failed", status=422)
        _write_new(os.path.join(folder, os.path.basename(storyboard.VTT)), storyboard.vtt(plan))


def write_cmaf_codecs(out_dir: str, probe: ProbeResult, presets: Iterable[Preset]) -> None:
    """Write each CMAF (and DASH) rung's codec string, read from its init segment, into its
    manifests (ffmpeg 5.1's dash muxer states HEVC as a bare ``hvc1``); ``ffmpeg_failed`` when
    a file is missing, unreadable or not what the muxer writes."""
    for preset in dict.fromkeys(presets):
        if preset.container not in LADDERS:
            continue
        folder = os.path.join(out_dir, preset.name)
        codecs = []
        for n in range(len(hls_rungs(probe, preset.ladder))):
            init = _read_plain(out_dir, f"{preset.name}/init-{n}.m4s", MAX_INIT)
            codec = headers.codec_string(io.BytesIO(init), len(init))
            if codec is None:
                raise GridnodeError(f"ffmpeg wrote no codec this node knows in {preset.name}/init-{n}.m4s",
                                    code="ffmpeg_failed", status=422)
            codecs.append(codec)
        manifests: list[tuple[str, Callable[[str, Sequence[str]], str | None]]] = [
            (cmaf.MANIFEST, cmaf.mpd_with_codecs)]
        if preset.container == "cmaf":
            manifests.append((cmaf.MASTER, cmaf.master_with_codecs))
        rewritten = []
        for name, rewrite in manifests:
            text = _read_plain(out_dir, f"{preset.name}/{os.path.basename(name)}", cmaf.MAX_MANIFEST)
            done = rewrite(text.decode("utf-8", "replace"), codecs)
            if done is None:
                raise GridnodeError(f"ffmpeg's {preset.name}/{os.path.basename(name)} does not name each rung once",
                                    code="ffmpeg_failed", status=422)
            rewritten.append((name, done))
        for name, done in rewritten:
            _write_new(os.path.join(folder, os.path.basename(name)), done)


def _read_plain(out_dir: str, name: str, most: int) -> bytes:
    """The file ``name`` under ``out_dir``, if a plain file reached through no link and at most
    ``most`` bytes long; else ``ffmpeg_failed``."""
    path = os.path.join(out_dir, *name.split("/"))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    if fd >= 0:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            inside = os.path.join(os.path.realpath(out_dir), *name.split("/"))
            if plain_file(st, path, inside) and st.st_size <= most:
                return f.read(most + 1)[:most]
    raise GridnodeError(f"ffmpeg did not write {name} as a plain file of at most {most} bytes",
                        code="ffmpeg_failed", status=422)


def _write_new(path: str, text: str) -> None:
    """``text`` as the new file ``path``: whatever the child left under that name is removed,
    and the file is made new, never opened through a link it planted."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
