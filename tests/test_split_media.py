"""
Split-and-stitch on real ffmpeg: a job made in chunks (run two at a time, as the pool would
run them) and stitched, beside the same job made whole by the node's one argv, for three
sources that break naive splitting: a frame counter (CFR), an open-GOP x264 source with
B-frames, a source with one keyframe, and a variable-frame-rate phone-style clip (jittered
timestamps, a rate change and a 1.2 s gap). For each: the stitched mp4's frame count and every
frame's timestamp equal the whole's; each frame matches its source frame (PSNR >= 30 dB: a
shifted or repeated frame of these sources is far below); audio and video as long as the
whole's.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.media import chunks
from gridnode.media.ffmpeg import spawn_ffmpeg
from gridnode.media.presets import Preset, build_argv, folders
from gridnode.media.probe import ProbeResult, probe
from gridnode.media.split import SplitJob, Task
from gridnode.media.templates import Catalog
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg

pytestmark = [pytest.mark.integration, needs_ffmpeg]

SECONDS = 24
SOURCES = {
    # A frame counter over testsrc2: every frame differs from its neighbours.
    "counter": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={SECONDS},"
                "drawtext=text='%{n}':fontsize=48:x=20:y=20:fontcolor=white:box=1",
                "-c:v", "libx264", "-preset", "ultrafast"],
    # Open GOPs with B-frames: a chunk's decode starts at an I-frame whose leading B-frames
    # reference the GOP before.
    "opengop": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30000/1001:duration={SECONDS}",
                "-c:v", "libx264", "-preset", "fast",
                "-x264-params", "open-gop=1:bframes=3:b-pyramid=normal:keyint=90"],
    # One keyframe for the whole clip (a screen recording's): every chunk decodes from the start.
    "sparse": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={SECONDS}",
               "-c:v", "libx264", "-preset", "ultrafast", "-x264-params", "keyint=100000:min-keyint=100000"],
    # A phone's clip: 30 fps nominal, every 7th frame 11 ms late, then slower frames after a gap.
    "vfr": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30:duration={SECONDS - 2},"
            "setpts='N/30/TB+if(mod(N,7),0,0.011/TB)+if(gt(N,300),N*0.003/TB,0)'",
            "-c:v", "libx264", "-preset", "ultrafast", "-fps_mode", "vfr", "-video_track_timescale", "90000"],
}


def make_source(folder: Path, name: str) -> Path:
    path = folder / f"{name}.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *SOURCES[name][:4],
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}", *SOURCES[name][4:],
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("split-sources")
    return {name: make_source(folder, name) for name in SOURCES}


def run_task(reactor: Any, duration: float) -> Any:
    def run(task: Task, progress: Any) -> Any:
        proto = spawn_ffmpeg(reactor, task.argv, duration=task.seconds or duration, on_progress=progress,
                             label=task.key)
        return proto.deferred.addCallback(lambda _r: int(proto.parser.fields.get("frame", "-1")))
    return run


async def whole(reactor: Any, info: ProbeResult, src: Path, out: Path, presets: Sequence[Preset]) -> None:
    for name in ["", *folders(presets)]:
        (out / name).mkdir(parents=True, exist_ok=True)
    argv = build_argv(FFMPEG, info, str(src), str(out), presets, threads=1)
    await spawn_ffmpeg(reactor, argv, duration=info.duration).deferred


def frames(path: Path, stream: str = "v:0") -> list[float]:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", stream, "-show_entries", "frame=pts_time",
                          "-of", "json", str(path)], check=True, capture_output=True, timeout=60).stdout
    return [float(f["pts_time"]) for f in json.loads(out)["frames"]]


def duration(path: Path, stream: str) -> float:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", stream, "-show_entries", "stream=duration",
                          "-of", "json", str(path)], check=True, capture_output=True, timeout=60).stdout
    return float(json.loads(out)["streams"][0]["duration"])


def psnr_per_frame(made: Path, src: Path, info: ProbeResult, tmp: Path) -> list[float]:
    """Each frame of ``made`` against the source frame the whole's fps filter puts in its slot,
    decoded losslessly from the source."""
    assert info.rate is not None
    stats = tmp / f"psnr-{made.stem}.log"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(made), "-i", str(src), "-lavfi",
                    f"[1:v]fps={info.rate.numerator}/{info.rate.denominator},scale={info.display_width}:"
                    f"{info.display_height},format=yuv420p[ref];[0:v][ref]psnr=stats_file={stats}",
                    "-f", "null", "-"], check=True, timeout=120)
    return [float(m.group(1)) if m.group(1) != "inf" else 99.0
            for m in (re.search(r"psnr_avg:(\S+)", line) for line in stats.read_text().splitlines()) if m]


@pytest.mark.parametrize("name", list(SOURCES))
@pytest_twisted.ensureDeferred
async def test_stitched_mp4_is_frame_exact(name: str, sources: dict[str, Path], real_reactor: Any,
                                           tmp_path: Path) -> None:
    """The stitched mp4 has the whole's frames at the whole's timestamps, each its source frame,
    and the whole's audio; the poster and the storyboard's sheets are the whole's, byte for
    byte (the tiles come from the chunks that hold their frames)."""
    src = sources[name]
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    presets = Catalog().parse("mp4-720p,poster", [{"name": "board", "container": "storyboard", "interval": 0.5,
                                                   "width": 64}])
    plan = chunks.plan(info, presets, chunk_seconds=5, chunk_over=0)
    assert plan.chunked and len(plan.chunks) >= 4, plan
    await whole(real_reactor, info, src, tmp_path / "whole", presets)
    reports: list[float] = []
    job = SplitJob(plan, info, str(src), presets, str(tmp_path / "work"), str(tmp_path / "out"),
                   run_task(real_reactor, info.duration), ffmpeg=FFMPEG, threads=1, parallel=2,
                   on_progress=reports.append)
    await job.run()
    assert reports[-1] == 1.0 and reports == sorted(reports)

    one, made = tmp_path / "whole" / "mp4-720p.mp4", tmp_path / "out" / "mp4-720p.mp4"
    expected = frames(one)
    got = frames(made)
    assert len(got) == len(expected) and got == expected
    assert frames(made, "a:0") == frames(one, "a:0")
    tick = 1 / float(plan.rate or 25)
    assert abs(duration(made, "a:0") - duration(one, "a:0")) < tick
    assert abs(duration(made, "v:0") - duration(one, "v:0")) < tick
    if name != "vfr":  # the VFR clip's video is longer than its audio, in the source too
        assert abs(duration(made, "a:0") - duration(made, "v:0")) <= tick + 0.001
    scores = psnr_per_frame(made, src, info, tmp_path)
    assert len(scores) == len(expected) and min(scores) >= 30, [i for i, s in enumerate(scores) if s < 30][:10]
    assert (tmp_path / "out" / "poster.jpg").read_bytes() == (tmp_path / "whole" / "poster.jpg").read_bytes()
    sheets = sorted((tmp_path / "whole" / "board").iterdir())
    made_sheets = sorted(p.name for p in (tmp_path / "out" / "board").iterdir())
    assert len(sheets) >= 1 and [p.name for p in sheets] == made_sheets
    for sheet in sheets:
        assert (tmp_path / "out" / "board" / sheet.name).read_bytes() == sheet.read_bytes(), sheet.name


@pytest_twisted.ensureDeferred
async def test_a_shifted_frame_fails_the_check(sources: dict[str, Path], tmp_path: Path) -> None:
    """The PSNR check can fail: the counter source against itself one frame late is below 30 dB
    on every frame."""
    src = sources["counter"]
    late = tmp_path / "late.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-i", str(src), "-vf", "trim=start_frame=1,setpts=PTS-STARTPTS",
                    "-an", "-c:v", "libx264", "-qp", "0", str(late)], check=True, timeout=120)
    from twisted.internet import reactor

    info = await probe(reactor, str(src), ffprobe=FFPROBE)
    scores = psnr_per_frame(late, src, info, tmp_path)
    assert max(scores[:-1]) < 30


@pytest_twisted.ensureDeferred
async def test_stitched_webm_keeps_the_frames(sources: dict[str, Path], real_reactor: Any, tmp_path: Path) -> None:
    """webm: the whole's frames, each at the whole's timestamp less the constant shift ffmpeg's
    matroska muxing gives the whole by the audio encoder's priming (Opus: 7 ms)."""
    src = sources["opengop"]
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    presets = Catalog().parse("webm-480p")
    plan = chunks.plan(info, presets, chunk_seconds=8, chunk_over=0)
    await whole(real_reactor, info, src, tmp_path / "whole", presets)
    job = SplitJob(plan, info, str(src), presets, str(tmp_path / "work"), str(tmp_path / "out"),
                   run_task(real_reactor, info.duration), ffmpeg=FFMPEG, threads=1, parallel=2)
    await job.run()
    expected, got = frames(tmp_path / "whole" / "webm-480p.webm"), frames(tmp_path / "out" / "webm-480p.webm")
    assert len(got) == len(expected)
    assert {round(a - b, 3) for a, b in zip(expected, got, strict=True)} == {round(expected[0] - got[0], 3)}
    assert abs(expected[0] - got[0]) <= 0.007
    assert min(psnr_per_frame(tmp_path / "out" / "webm-480p.webm", src, info, tmp_path)) >= 30


def stream_frames(playlist: Path, stream: str) -> list[float]:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", stream, "-show_entries", "frame=pts_time",
                          "-of", "json", str(playlist)], check=True, capture_output=True, timeout=120).stdout
    return [float(f["pts_time"]) for f in json.loads(out)["frames"]]


@pytest_twisted.ensureDeferred
async def test_stitched_cmaf_joins_the_segments(sources: dict[str, Path], real_reactor: Any, tmp_path: Path) -> None:
    """CMAF: the chunks' segments joined as they are: the whole's files, each rung's init segment
    byte for byte the whole's, every stream's frames at the whole's timestamps (every segment
    plays: ffmpeg decodes the joined master playlist to its end, each seam crossed), each frame
    its source frame."""
    src = sources["opengop"]
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    ladder = [{"size": 240, "kbps": 500}, {"size": 120, "kbps": 200}]
    presets = Catalog().parse(None, [{"name": "cmaf", "container": "cmaf", "ladder": ladder}])
    plan = chunks.plan(info, presets, chunk_seconds=8, chunk_over=0)
    assert len(plan.chunks) == 3 and plan.step == 4
    await whole(real_reactor, info, src, tmp_path / "whole", presets)
    job = SplitJob(plan, info, str(src), presets, str(tmp_path / "work"), str(tmp_path / "out"),
                   run_task(real_reactor, info.duration), ffmpeg=FFMPEG, threads=1, parallel=2)
    await job.run()
    one, made = tmp_path / "whole" / "cmaf", tmp_path / "out" / "cmaf"
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in one.iterdir())
    for n in range(3):
        assert (made / f"init-{n}.m4s").read_bytes() == (one / f"init-{n}.m4s").read_bytes()
    for n, stream in [(0, "v:0"), (1, "v:0"), (2, "a:0")]:
        assert stream_frames(made / f"media_{n}.m3u8", stream) == stream_frames(one / f"media_{n}.m3u8", stream)
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-xerror", "-i", str(made / "master.m3u8"), "-map", "0",
                    "-f", "null", "-"], check=True, timeout=120)
    assert 'AUDIO="group_A1"' in (made / "master.m3u8").read_text()
    stated = re.compile(r'mediaPresentationDuration="[^"]*"')
    assert stated.findall((made / "manifest.mpd").read_text()) == stated.findall((one / "manifest.mpd").read_text())
    rung0 = tmp_path / "rung0.mp4"
    rung0.write_bytes((made / "init-0.m4s").read_bytes()
                      + b"".join(p.read_bytes() for p in sorted(made.glob("seg-0-*.m4s"))))
    assert min(psnr_per_frame(rung0, src, info, tmp_path)) >= 30


@pytest_twisted.ensureDeferred
async def test_stitched_hls_is_the_wholes(sources: dict[str, Path], real_reactor: Any, tmp_path: Path) -> None:
    """HLS (MPEG-TS segments holding video and audio): the chunks' rungs joined and muxed with
    the audio pass's into the whole's segments: the same files and media playlists, every
    stream's frames at the whole's timestamps, the master decodes to its end; every variant
    listed."""
    src = sources["vfr"]
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    ladder = [{"size": 240, "kbps": 500, "audio_kbps": 96}, {"size": 120, "kbps": 200, "audio_kbps": 64}]
    presets = Catalog().parse(None, [{"name": "hls", "container": "hls", "ladder": ladder}])
    plan = chunks.plan(info, presets, chunk_seconds=6, chunk_over=0)
    assert len(plan.chunks) >= 3 and plan.step == 6
    await whole(real_reactor, info, src, tmp_path / "whole", presets)
    job = SplitJob(plan, info, str(src), presets, str(tmp_path / "work"), str(tmp_path / "out"),
                   run_task(real_reactor, info.duration), ffmpeg=FFMPEG, threads=1, parallel=2)
    await job.run()
    one, made = tmp_path / "whole" / "hls", tmp_path / "out" / "hls"
    assert sorted(str(p.relative_to(made)) for p in made.rglob("*")) == sorted(
        str(p.relative_to(one)) for p in one.rglob("*"))
    for rung in ("240p", "120p"):
        assert (made / rung / "index.m3u8").read_text() == (one / rung / "index.m3u8").read_text()
        for stream in ("v:0", "a:0"):
            assert stream_frames(made / rung / "index.m3u8", stream) == stream_frames(one / rung / "index.m3u8",
                                                                                      stream)
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-xerror", "-i", str(made / "master.m3u8"), "-map", "0",
                    "-f", "null", "-"], check=True, timeout=120)
    assert (made / "master.m3u8").read_text().count("#EXT-X-STREAM-INF") == 2
