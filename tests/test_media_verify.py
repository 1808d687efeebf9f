"""
What is checked of a conversion while and after ffmpeg runs (gridnode/media/verify.py): the
output folder's size on a fake clock and a fake folder, HLS playlists, the duration
comparison, the container headers an output's duration is read from, and the read-back.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task

from gridnode.errors import GridnodeError
from gridnode.media.ffmpeg import ProducedFile
from gridnode.media.headers import mp4_duration, webm_duration
from gridnode.media.presets import job_output_limit
from gridnode.media.probe import ProbeResult
from gridnode.media.templates import parse_presets
from gridnode.media.verify import (
    MAX_FILES,
    OutputWatch,
    folder_size,
    hls_duration,
    measure_outputs,
    tolerance,
    truncation,
)


def source(duration: float = 20.0, streams_duration: float | None = None, size: int = 1000) -> ProbeResult:
    return ProbeResult(size=size, format_name="mov,mp4,m4a,3gp,3g2,mj2", container="mp4", demuxer="mov",
                       duration=duration, width=1280, height=720, video_codec="h264", audio_codec="aac",
                       has_audio=True, rotation=0, display_width=1280, display_height=720, stream_count=2,
                       streams_duration=streams_duration)


class FakeFolder:
    """A folder's (bytes, files), as the test sets them; counts the walks."""

    def __init__(self) -> None:
        self.size = 0
        self.files = 1
        self.walks = 0

    def __call__(self, folder: str) -> tuple[int, int]:
        self.walks += 1
        return self.size, self.files


class OutputWatchTests:
    def test_over_the_limit_is_output_too_large(self) -> None:
        """Under the limit a tick answers nothing; the first tick that finds the folder over it
        answers output_too_large (413) saying the limit."""
        clock, folder = task.Clock(), FakeFolder()
        watch = OutputWatch(clock, "/out", 1000, measure=folder)
        folder.size = 1000
        assert watch.tick() is None
        clock.advance(0.5)
        folder.size = 1001
        error = watch.tick()
        assert error is not None and (error.code, error.status) == ("output_too_large", 413)
        assert "1000 bytes" in error.message

    def test_measures_at_most_every_half_second(self) -> None:
        """Ticks closer together than ffmpeg's progress period walk the folder once."""
        clock, folder = task.Clock(), FakeFolder()
        watch = OutputWatch(clock, "/out", 1000, measure=folder)
        for _ in range(5):
            watch.tick()
            clock.advance(0.1)
        assert folder.walks == 1
        clock.advance(0.1)
        watch.tick()
        assert folder.walks == 2

    def test_many_files_are_walked_less_often(self) -> None:
        """A folder of 5,000 files (a long HLS ladder) is walked every 5 s, not every tick."""
        clock, folder = task.Clock(), FakeFolder()
        folder.files = 5000
        watch = OutputWatch(clock, "/out", 10**9, measure=folder)
        for _ in range(20):
            watch.tick()
            clock.advance(0.5)
        assert folder.walks == 2  # at 0 s and at 5 s of the 10 s

    def test_too_many_files(self) -> None:
        """More files than any job makes: output_too_large, whatever their size."""
        clock, folder = task.Clock(), FakeFolder()
        folder.files = MAX_FILES + 1
        error = OutputWatch(clock, "/out", 10**9, measure=folder).tick()
        assert error is not None and error.code == "output_too_large" and "files" in error.message

    def test_limit_counts_each_output_and_rung(self) -> None:
        """A job's limit is the per-output limit times its outputs, each HLS rung one: 720p
        keeps all three rungs, so mp4 + poster + hls is five outputs."""
        presets = parse_presets("mp4-720p,poster,hls")
        assert job_output_limit(source(), presets, 100) == 500
        assert job_output_limit(source(size=10**9), parse_presets("mp4-720p"), None) == 4 * 10**9


class FolderSizeTests:
    def test_walks_subfolders_without_following_links(self, tmp_path: Path) -> None:
        """Bytes of every file below, HLS sub-folders included; a link counts as itself, and
        what it points to is not walked."""
        (tmp_path / "hls" / "360p").mkdir(parents=True)
        (tmp_path / "a.mp4").write_bytes(b"x" * 100)
        (tmp_path / "hls" / "360p" / "seg_000.ts").write_bytes(b"x" * 50)
        elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        elsewhere.mkdir()
        (elsewhere / "big").write_bytes(b"x" * 10_000)
        (tmp_path / "hls" / "link").symlink_to(elsewhere)
        total, entries = folder_size(str(tmp_path))
        assert entries == 5 and 150 <= total < 150 + 4096  # 2 folders, 2 files, 1 link

    def test_missing_folder_is_empty(self, tmp_path: Path) -> None:
        """Before ffmpeg made its folder, the watch finds nothing."""
        assert folder_size(str(tmp_path / "none")) == (0, 0)

    @pytest.mark.parametrize("kind", ["files", "folders"])
    def test_walk_stops_past_the_entry_limit(self, tmp_path: Path, kind: str) -> None:
        """A folder of too many files, or of too many empty folders, is not walked to its end."""
        for i in range(30):
            if kind == "files":
                (tmp_path / f"f{i}").write_bytes(b"")
            else:
                (tmp_path / f"d{i}").mkdir()
        assert folder_size(str(tmp_path), max_files=10)[1] == 11


PLAYLIST = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:6\n#EXT-X-PLAYLIST-TYPE:VOD\n"


class HlsDurationTests:
    def test_sum_of_segments(self) -> None:
        """A whole playlist lasts its #EXTINF times added up."""
        text = PLAYLIST + "#EXTINF:6.000000,\nseg_000.ts\n#EXTINF:3.960000,\nseg_001.ts\n#EXT-X-ENDLIST\n"
        assert hls_duration(text) == pytest.approx(9.96)

    @pytest.mark.parametrize("text", [
        PLAYLIST + "#EXTINF:6.0,\nseg_000.ts\n",  # not ended
        PLAYLIST + "#EXT-X-ENDLIST\n",  # no segment
        PLAYLIST + "#EXTINF:abc,\nseg_000.ts\n#EXT-X-ENDLIST\n",
        PLAYLIST + "#EXTINF:-1,\nseg_000.ts\n#EXT-X-ENDLIST\n",
        PLAYLIST + "#EXTINF:nan,\nseg_000.ts\n#EXT-X-ENDLIST\n",
        PLAYLIST + "#EXTINF:inf,\nseg_000.ts\n#EXT-X-ENDLIST\n",
        "",
    ])
    def test_not_whole(self, text: str) -> None:
        """A playlist without its end, without segments, or with a time that is no number: None."""
        assert hls_duration(text) is None

    @given(st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=50))
    def test_any_segments(self, times: list[float]) -> None:
        """However many segments, the length is their sum."""
        text = PLAYLIST + "".join(f"#EXTINF:{t:.6f},\nseg_{i:03d}.ts\n" for i, t in enumerate(times))
        assert hls_duration(text + "#EXT-X-ENDLIST\n") == pytest.approx(sum(round(t, 6) for t in times))


class TruncationTests:
    def test_half_is_input_truncated(self) -> None:
        """An output half as long as its input: input_truncated (422), saying how much of the
        input could be read, which output, and ffmpeg's lines."""
        error = truncation(20.0, {"mp4-720p.mp4": 10.0, "webm-480p.webm": 10.1},
                           ["[mov,mp4,m4a,3gp,3g2,mj2 @ 0x1] stream 0, offset 0x5a1f: partial file"])
        assert error is not None and (error.code, error.status) == ("input_truncated", 422)
        assert "10.0 s of the input's 20.0 s" in error.message and "50 %" in error.message
        assert "mp4-720p.mp4" in error.message and error.message.endswith("partial file")

    def test_within_tolerance_is_whole(self) -> None:
        """One frame, an encoder's padding, rounded segment times: 1 s and 1 % of the input."""
        assert tolerance(20.0) == pytest.approx(1.2) and tolerance(3600.0) == pytest.approx(37.0)
        assert truncation(20.0, {"a.mp4": 18.85}) is None
        assert truncation(20.0, {"a.mp4": 18.75}) is not None
        assert truncation(20.0, {"a.mp4": 25.0}) is None  # longer is not truncated
        assert truncation(20.0, {}) is None  # a poster alone: nothing to compare

    def test_stderr_is_cut(self) -> None:
        """The message keeps ffmpeg's last 20 lines, each cut at 300 characters."""
        lines = [f"line {i} " + "x" * 1000 for i in range(64)]
        error = truncation(20.0, {"a.mp4": 1.0}, lines)
        assert error is not None
        kept = error.message.split("ffmpeg said:\n", 1)[1].splitlines()
        assert len(kept) == 20 and kept[0].startswith("line 44 ") and all(len(k) == 300 for k in kept)


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def mp4(seconds: float, timescale: int = 1000, version: int = 0) -> bytes:
    """An mp4's header as ffmpeg lays it out (ftyp, moov with mvhd first), then its data."""
    if version == 0:
        mvhd = bytes(4) + bytes(8) + struct.pack(">II", timescale, round(seconds * timescale)) + bytes(80)
    else:
        mvhd = b"\x01" + bytes(3) + bytes(16) + struct.pack(">IQ", timescale, round(seconds * timescale)) + bytes(80)
    return box(b"ftyp", b"isom" + bytes(4)) + box(b"moov", box(b"mvhd", mvhd) + box(b"trak", bytes(40))) + \
        box(b"mdat", bytes(100))


def element(ident: int, body: bytes) -> bytes:
    """An EBML element: its id's bytes, an 8-byte size, its body."""
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + (0x01 << 56 | len(body)).to_bytes(8, "big") + body


def webm(seconds: float, scale: int = 1_000_000, width: int = 8) -> bytes:
    """A webm's header as ffmpeg lays it out: EBML header, Segment (SeekHead, Info, ...)."""
    duration = struct.pack(">d" if width == 8 else ">f", seconds * 1e9 / scale)
    info = element(0x2AD7B1, scale.to_bytes(3, "big")) + element(0x4489, duration)
    segment = element(0x114D9B74, bytes(30)) + element(0x1549A966, info) + element(0x1654AE6B, bytes(50))
    return element(0x1A45DFA3, bytes(20)) + element(0x18538067, segment)


class HeadersTests:
    @pytest.mark.parametrize("version", [0, 1])
    def test_mp4(self, version: int) -> None:
        """An mp4 lasts its movie header's duration over its timescale (both header versions)."""
        data = mp4(9.966, timescale=90000, version=version)
        assert mp4_duration(io.BytesIO(data), len(data)) == pytest.approx(9.966)

    @pytest.mark.parametrize(("scale", "width"), [(1_000_000, 8), (1_000_000, 4), (1000, 8)])
    def test_webm(self, scale: int, width: int) -> None:
        """A webm lasts its Info's Duration in TimecodeScale units (a float of 4 or 8 bytes)."""
        data = webm(4.02, scale, width)
        assert webm_duration(io.BytesIO(data), len(data)) == pytest.approx(4.02, abs=1e-6)

    def test_no_header(self) -> None:
        """A file cut before its header, another container, or an unknown duration: None."""
        data = mp4(4.0)
        assert mp4_duration(io.BytesIO(data[:40]), 40) is None
        assert mp4_duration(io.BytesIO(webm(4.0)), len(webm(4.0))) is None
        assert webm_duration(io.BytesIO(data), len(data)) is None
        unknown = data.replace(struct.pack(">II", 1000, 4000), struct.pack(">II", 1000, 0xFFFFFFFF))
        assert mp4_duration(io.BytesIO(unknown), len(unknown)) is None

    @given(st.binary(max_size=300), st.integers(0, 400))
    def test_any_bytes(self, data: bytes, cut: int) -> None:
        """Whatever the bytes, a reader answers a number of seconds or None, and never raises."""
        for raw in (data, mp4(4.0)[:cut] + data, webm(4.0)[:cut] + data):
            for read in (mp4_duration, webm_duration):
                seconds = read(io.BytesIO(raw), len(raw))
                assert seconds is None or seconds >= 0

    @given(st.integers(0, 200), st.integers(0, 255))
    def test_any_byte_changed(self, at: int, value: int) -> None:
        """A header with any one byte changed still reads as a number or None."""
        for raw, read in ((mp4(4.0), mp4_duration), (webm(4.0), webm_duration)):
            changed = bytearray(raw)
            changed[at % len(raw)] = value
            seconds = read(io.BytesIO(bytes(changed)), len(changed))
            assert seconds is None or seconds >= 0


class MeasureOutputsTests:
    """The read-back after ffmpeg exits, on files shaped as ffmpeg writes them."""

    def produce(self, tmp_path: Path, presets: str, seconds: float = 10.0) -> tuple[list[ProducedFile], Any]:
        files = []
        for preset in parse_presets(presets):
            for declared in preset.outputs(source()):
                name = declared.name.replace("*", "000")
                path = tmp_path / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if name.endswith("index.m3u8"):
                    path.write_text(PLAYLIST + f"#EXTINF:6.0,\nseg_000.ts\n#EXTINF:{seconds - 6},\nseg_001.ts\n"
                                    "#EXT-X-ENDLIST\n")
                elif preset.container in ("mp4", "webm"):
                    path.write_bytes(mp4(seconds) if preset.container == "mp4" else webm(seconds))
                else:
                    path.write_bytes(b"data")
                files.append(ProducedFile(preset.name, name, str(path), path.stat().st_size, declared.content_type))
        return files, parse_presets(presets)

    def test_durations_on_each_presets_first_file(self, tmp_path: Path) -> None:
        """mp4 and webm from their headers, HLS from its playlists, a poster not at all; each
        preset's first file carries its duration."""
        files, presets = self.produce(tmp_path, "mp4-720p,webm-480p,poster,hls", seconds=9.98)
        durations = {f.name: f.duration for f in measure_outputs(files, source(10.0), presets)}
        assert durations["mp4-720p.mp4"] == pytest.approx(9.98) and durations["poster.jpg"] is None
        assert durations["webm-480p.webm"] == pytest.approx(9.98)
        assert durations["hls/master.m3u8"] == pytest.approx(9.98) and durations["hls/720p/index.m3u8"] is None

    def test_a_short_rung_truncates(self, tmp_path: Path) -> None:
        """HLS is as long as its shortest rung: one cut short fails the job, its name said."""
        files, presets = self.produce(tmp_path, "hls")
        (tmp_path / "hls" / "480p" / "index.m3u8").write_text(PLAYLIST + "#EXTINF:2.0,\nseg_000.ts\n#EXT-X-ENDLIST\n")
        with pytest.raises(GridnodeError) as e:
            measure_outputs(files, source(10.0), presets)
        assert e.value.code == "input_truncated" and "hls/480p/index.m3u8" in e.value.message

    def test_compared_with_the_converted_streams(self, tmp_path: Path) -> None:
        """A file whose data track runs longer than its video and audio: the outputs are whole
        when as long as those."""
        files, presets = self.produce(tmp_path, "mp4-720p")
        measure_outputs(files, source(30.0, streams_duration=10.0), presets)
        with pytest.raises(GridnodeError):
            measure_outputs(files, source(30.0), presets)

    def test_truncated_carries_stderr(self, tmp_path: Path) -> None:
        """input_truncated keeps the decode errors ffmpeg reported."""
        files, presets = self.produce(tmp_path, "webm-480p", seconds=10.0)
        with pytest.raises(GridnodeError) as e:
            measure_outputs(files, source(20.0), presets, ["[h264 @ 0x1] error while decoding MB 4 2"])
        assert e.value.code == "input_truncated" and "error while decoding MB 4 2" in e.value.message

    @pytest.mark.parametrize(("name", "text"), [("hls/360p/index.m3u8", PLAYLIST), ("mp4-720p.mp4", "junk")])
    def test_no_duration_is_ffmpeg_failed(self, tmp_path: Path, name: str, text: str) -> None:
        """A rung's playlist without its end, an mp4 without a header: ffmpeg_failed, the output named."""
        files, presets = self.produce(tmp_path, "mp4-720p,hls")
        (tmp_path / name).write_text(text)
        with pytest.raises(GridnodeError) as e:
            measure_outputs(files, source(10.0), presets)
        assert e.value.code == "ffmpeg_failed" and name in e.value.message
