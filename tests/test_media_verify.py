"""
What is checked of a conversion while and after ffmpeg runs (gridnode/media/verify.py): the
output folder's size on a fake clock and a fake folder, HLS playlists, the duration
comparison, and the read-back of every output on a reactor that spawns nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.ffmpeg import ProducedFile
from gridnode.media.presets import job_output_limit, parse_presets
from gridnode.media.probe import ProbeResult
from gridnode.media.verify import (
    MAX_FILES,
    OutputWatch,
    folder_size,
    hls_duration,
    measure_outputs,
    tolerance,
    truncation,
)
from tests.fake_child import FakeProcessReactor, exited


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
        total, files = folder_size(str(tmp_path))
        assert files == 3 and 150 <= total < 150 + 4096

    def test_missing_folder_is_empty(self, tmp_path: Path) -> None:
        """Before ffmpeg made its folder, the watch finds nothing."""
        assert folder_size(str(tmp_path / "none")) == (0, 0)

    def test_walk_stops_past_the_file_limit(self, tmp_path: Path) -> None:
        """A folder of too many files is not walked to its end."""
        for i in range(30):
            (tmp_path / f"f{i}").write_bytes(b"")
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


class MeasureOutputsTests:
    """The read-back after ffmpeg exits, on a reactor that spawns nothing: the test answers
    for each ffprobe."""

    def produce(self, tmp_path: Path, presets: str) -> tuple[list[ProducedFile], Any]:
        files = []
        for preset in parse_presets(presets):
            for declared in preset.outputs(source()):
                name = declared.name.replace("*", "000")
                path = tmp_path / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(PLAYLIST + "#EXTINF:6.0,\nseg_000.ts\n#EXTINF:4.0,\nseg_001.ts\n#EXT-X-ENDLIST\n"
                                if name.endswith("index.m3u8") else "data")
                files.append(ProducedFile(preset.name, name, str(path), 4, declared.content_type))
        return files, parse_presets(presets)

    def test_durations_on_each_presets_first_file(self, tmp_path: Path) -> None:
        """mp4 and webm are read back by ffprobe (one child each), HLS from its playlists (no
        child), a poster not at all; each preset's first file carries its duration."""
        files, presets = self.produce(tmp_path, "mp4-720p,poster,hls")
        reactor = FakeProcessReactor()
        results: list[Any] = []
        measure_outputs(reactor, files, source(10.0), presets).addBoth(results.append)
        assert len(reactor.protocols) == 1  # the mp4 only
        reactor.protocols[0].childDataReceived(1, b'{"format": {"duration": "9.98"}}')
        reactor.protocols[0].processEnded(exited(0))
        (done,) = results
        durations = {f.name: f.duration for f in done}
        assert durations["mp4-720p.mp4"] == 9.98 and durations["poster.jpg"] is None
        assert durations["hls/master.m3u8"] == 10.0 and durations["hls/720p/index.m3u8"] is None

    def test_a_short_rung_truncates(self, tmp_path: Path) -> None:
        """HLS is as long as its shortest rung: one cut short fails the job, its name said."""
        files, presets = self.produce(tmp_path, "hls")
        short = tmp_path / "hls" / "480p" / "index.m3u8"
        short.write_text(PLAYLIST + "#EXTINF:2.0,\nseg_000.ts\n#EXT-X-ENDLIST\n")
        results: list[Any] = []
        measure_outputs(FakeProcessReactor(), files, source(10.0), presets).addBoth(results.append)
        assert isinstance(results[0], Failure) and results[0].value.code == "input_truncated"
        assert "hls/480p/index.m3u8" in results[0].value.message

    def test_compared_with_the_converted_streams(self, tmp_path: Path) -> None:
        """A file whose data track runs longer than its video and audio: the outputs are whole
        when as long as those."""
        files, presets = self.produce(tmp_path, "hls")
        results: list[Any] = []
        measure_outputs(FakeProcessReactor(), files, source(30.0, streams_duration=10.0),
                        presets).addBoth(results.append)
        assert not isinstance(results[0], Failure)

    def test_truncated_carries_stderr(self, tmp_path: Path) -> None:
        """input_truncated keeps the decode errors ffmpeg reported."""
        files, presets = self.produce(tmp_path, "mp4-720p")
        reactor = FakeProcessReactor()
        results: list[Any] = []
        measure_outputs(reactor, files, source(20.0), presets,
                        stderr=["[h264 @ 0x1] error while decoding MB 4 2"]).addBoth(results.append)
        reactor.protocols[0].childDataReceived(1, b'{"format": {"duration": "10.0"}}')
        reactor.protocols[0].processEnded(exited(0))
        error = results[0].value
        assert isinstance(error, GridnodeError) and error.code == "input_truncated"
        assert "error while decoding MB 4 2" in error.message

    def test_playlist_that_is_not_whole_is_ffmpeg_failed(self, tmp_path: Path) -> None:
        """A rung's playlist without its end: ffmpeg_failed, the output named."""
        files, presets = self.produce(tmp_path, "hls")
        (tmp_path / "hls" / "360p" / "index.m3u8").write_text(PLAYLIST)
        results: list[Any] = []
        measure_outputs(FakeProcessReactor(), files, source(10.0), presets).addBoth(results.append)
        assert results[0].value.code == "ffmpeg_failed" and "hls/360p/index.m3u8" in results[0].value.message
        assert os.path.exists(tmp_path / "hls" / "360p" / "index.m3u8")
