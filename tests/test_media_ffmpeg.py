"""
The ffmpeg runner: the progress parser, the stderr tail, the timeout and kill
logic on a fake transport and ``task.Clock``, and real ffmpeg runs (outputs,
rotation, cancellation of the whole process group, idle timeout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task

from gridnode.errors import GridnodeError
from gridnode.media.ffmpeg import (
    FfmpegProcess,
    FfmpegResult,
    ProgressParser,
    StderrTail,
    Timeouts,
    collect_outputs,
    max_time_for,
    spawn_ffmpeg,
    start_transcode,
    transcode_command,
)
from gridnode.media.presets import build_argv, default_output_limit
from gridnode.media.probe import Limits, ProbeResult, decoder_pixels, probe, probe_command
from gridnode.media.sandbox import sandboxed_argv
from gridnode.media.templates import parse_presets
from gridnode.media.verify import OutputWatch, measure_outputs
from tests.fake_child import PID, ChildRun, FakeGroups, FakeTransport, exited
from tests.media_samples import (
    FFMPEG,
    FFPROBE,
    Clips,
    alive,
    cut_faststart,
    ffprobe_json,
    group_gone,
    late_giant_frames,
    wait_for,
)

BLOCK = b"frame=10\nfps=0.0\nout_time_us=%d\nout_time_ms=%d\nout_time=00:00:01.000000\nspeed=2x\nprogress=continue\n"


def block(us: int) -> bytes:
    return BLOCK % (us, us)


class ProgressParserTests:
    def test_out_time_us(self) -> None:
        """out_time_us against the duration gives the fraction done."""
        parser = ProgressParser(4.0)
        assert parser.feed(block(1_000_000)) == [0.25]
        assert parser.fields["speed"] == "2x"

    def test_out_time_ms_is_microseconds(self) -> None:
        """Without out_time_us, out_time_ms is read as microseconds (ffmpeg's naming quirk)."""
        assert ProgressParser(10.0).feed(b"out_time_ms=5000000\n") == [0.5]

    def test_out_time_clock_fallback(self) -> None:
        """Only out_time=HH:MM:SS.micro present: it is used."""
        assert ProgressParser(100.0).feed(b"out_time=00:00:25.000000\n") == [0.25]

    def test_junk_and_na_ignored(self) -> None:
        """N/A, negative times and junk lines change nothing."""
        parser = ProgressParser(4.0)
        assert parser.feed(b"out_time_us=N/A\nout_time=-00:00:00.1\nhello\n=\nout_time_us=-5\n") == []
        assert parser.progress == 0.0

    def test_never_decreases_and_caps_at_one(self) -> None:
        """A later smaller time is not reported; times past the duration are 1.0."""
        parser = ProgressParser(2.0)
        assert parser.feed(block(1_500_000) + block(1_000_000) + block(9_000_000)) == [0.75, 1.0]

    def test_end(self) -> None:
        """progress=end is 1.0."""
        parser = ProgressParser(2.0)
        assert parser.feed(b"progress=end\n") == [1.0]
        assert parser.ended

    def test_overlong_line_dropped(self) -> None:
        """A line without newline longer than 4 kB is dropped, not buffered forever."""
        parser = ProgressParser(2.0)
        parser.feed(b"x" * 10_000)
        assert parser.feed(b"\nout_time_us=1000000\n") == [0.5]

    @given(st.lists(st.integers(0, 5_000_000), max_size=20), st.data())
    def test_any_chunking_gives_same_result(self, times: list[int], data: st.DataObject) -> None:
        """However the stream is cut into chunks, the updates are the same, rising, within 0..1."""
        stream = b"".join(block(t) for t in times) + b"progress=end\n"
        whole = ProgressParser(4.0).feed(stream)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
        parser = ProgressParser(4.0)
        chunked: list[float] = []
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            chunked += parser.feed(stream[start:end])
        assert chunked == whole
        assert all(0 < v <= 1 for v in chunked)
        assert chunked == sorted(set(chunked))
        assert chunked[-1] == 1.0


class StderrTailTests:
    def test_keeps_last_64_lines(self) -> None:
        """Only the last 64 non-empty lines are kept, with a trailing partial line."""
        tail = StderrTail()
        tail.feed(b"".join(b"line %d\n" % i for i in range(100)) + b"\n\nlast")
        lines = tail.tail()
        assert len(lines) == 65 and lines[0] == "line 36" and lines[-1] == "last"


class Harness(ChildRun):
    def __init__(self, duration: float = 10.0, timeouts: Timeouts = Timeouts(idle=5, kill_grace=3, backup=7),
                 group_exists: bool = True, on_tick: Callable[[], GridnodeError | None] | None = None) -> None:
        self.clock = task.Clock()
        self.groups = FakeGroups(exists=group_exists)
        self.sent = self.groups.sent
        self.progress: list[float] = []
        self.proc = FfmpegProcess(self.clock, duration=duration, on_progress=self.progress.append,
                                  on_tick=on_tick, timeouts=timeouts, killpg=self.groups)
        self.attach(self.proc)


class FfmpegProcessTests:
    def test_success(self) -> None:
        """Exit 0: progress reaches 1.0, the Deferred fires with elapsed time and tail, no timer left."""
        h = Harness()
        assert h.transport.stdin_closed
        h.clock.advance(1)
        h.proc.childDataReceived(1, block(5_000_000))
        h.proc.childDataReceived(2, b"some warning\n")
        h.clock.advance(2)
        h.end(exited(0))
        assert h.progress == [0.5, 1.0]
        assert h.results == [FfmpegResult(elapsed=3.0, stderr_tail=("some warning",))]
        assert h.clock.getDelayedCalls() == []

    def test_failure_has_stderr_tail(self) -> None:
        """Non-zero exit: ffmpeg_failed, message ending with stderr's last lines."""
        h = Harness()
        h.proc.childDataReceived(2, b"first\nInvalid data found when processing input\n")
        h.end(exited(1))
        error = h.error()
        assert error.code == "ffmpeg_failed" and "status 1" in error.message
        assert error.message.endswith("first\nInvalid data found when processing input")
        assert h.sent == [(PID, signal.SIGKILL)]  # what it left in its group is swept

    def test_killed_by_signal_is_failure(self) -> None:
        """A child killed from outside (OOM killer) is ffmpeg_failed naming the signal."""
        h = Harness()
        h.end(exited(None, signal.SIGKILL))
        assert h.error().code == "ffmpeg_failed" and "signal 9" in h.error().message

    def test_idle_timeout_terms_then_kills_the_group(self) -> None:
        """No output for `idle` seconds: SIGTERM to the group, SIGKILL after the grace, then timeout."""
        h = Harness()
        h.clock.advance(4.9)
        assert h.sent == []
        h.clock.advance(0.1)
        assert h.sent == [(4242, signal.SIGTERM)]
        h.clock.advance(3)
        assert h.sent == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)]
        assert h.results == []
        h.end(exited(None, signal.SIGKILL))
        assert h.error().code == "timeout" and "wrote nothing" in h.error().message
        assert h.sent[-1] == (4242, signal.SIGKILL)  # the sweep after reaping
        assert h.clock.getDelayedCalls() == []

    def test_output_resets_idle_timer(self) -> None:
        """Any output (stdout or stderr) restarts the idle countdown."""
        h = Harness()
        for fd in (1, 2, 1, 2):
            h.clock.advance(4)
            h.proc.childDataReceived(fd, b"x\n")
        assert h.sent == []
        h.clock.advance(5)
        assert h.sent == [(4242, signal.SIGTERM)]

    def test_sigterm_enough(self) -> None:
        """A child that ends on SIGTERM gets no SIGKILL timer; the group is swept once."""
        h = Harness()
        h.proc.cancel()
        h.end(exited(255))
        assert h.sent == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)]
        assert h.error().code == "cancelled" and h.error().status == 409
        assert h.clock.getDelayedCalls() == []

    def test_max_time(self) -> None:
        """A busy child past the maximum total time is stopped with timeout."""
        h = Harness(duration=10, timeouts=Timeouts(idle=5, max_time=12, kill_grace=1, backup=1))
        for _ in range(12):
            h.clock.advance(1)
            h.proc.childDataReceived(1, b"frame=1\n")
        assert h.sent == [(4242, signal.SIGTERM)]
        h.end(exited(255))
        assert h.error().code == "timeout" and "longer than 12 s" in h.error().message

    def test_default_max_time_scales_with_duration(self) -> None:
        """Max total time: ten times the input duration, at least 60 s."""
        assert max_time_for(2) == 60 and max_time_for(600) == 6000

    def test_backup_timer(self) -> None:
        """A child never reported as ended: the Deferred still fails after SIGKILL + backup."""
        h = Harness()
        h.proc.cancel()
        h.clock.advance(3)
        assert h.results == []
        h.clock.advance(7)
        assert h.error().code == "cancelled"
        h.end(exited(None, signal.SIGKILL))  # a late end changes nothing
        assert len(h.results) == 1

    def test_cancel_twice_and_after_end(self) -> None:
        """cancel() is idempotent and harmless after the end."""
        h = Harness()
        h.proc.cancel()
        h.proc.cancel()
        assert h.sent == [(4242, signal.SIGTERM)]
        h.end(exited(255))
        h.proc.cancel()
        assert len(h.results) == 1

    def test_no_group_falls_back_to_the_child(self) -> None:
        """When the group does not exist, the child itself is signalled."""
        h = Harness(group_exists=False)
        h.proc.cancel()
        h.clock.advance(3)
        assert h.transport.signals == ["TERM", "KILL"]

    def test_frame_over_max_pixels_stops_the_group(self) -> None:
        """The decoder's line for a frame over -max_pixels (ffmpeg itself would go on to the next
        frame): the group is stopped at once, and the job fails with too_large, not ffmpeg_failed."""
        h = Harness()
        h.proc.childDataReceived(2, b"[mjpeg @ 0x55d1] Picture size 16000x16000 exceeds specified max pixel "
                                    b"count 35389440, see the documentation if you wish to increase it\n")
        assert h.sent == [(4242, signal.SIGTERM)]
        h.proc.childDataReceived(2, b"[mjpeg @ 0x55d1] Picture size 16000x16000 exceeds specified max pixel "
                                    b"count 35389440, see the documentation if you wish to increase it\n")
        assert h.sent == [(4242, signal.SIGTERM)]  # once
        h.end(exited(255))
        assert (h.error().code, h.error().status) == ("too_large", 413)
        assert "16000x16000" in h.error().message

    def test_stream_past_max_streams_stops_the_group(self) -> None:
        """A stream the demuxer finds past -max_streams while reading (an MPEG-TS that adds
        streams) stops the job with too_many_streams, even when ffmpeg would exit 0."""
        h = Harness()
        h.proc.childDataReceived(2, b"[mpegts @ 0x1] Number of streams exceeds max_streams parameter (16), see the "
                                    b"documentation if you wish to increase it\n")
        h.end(exited(0))
        assert h.error().code == "too_many_streams"

    def test_tick_answer_stops_the_group(self) -> None:
        """on_tick is asked once per progress report (not per line); its first error stops the
        group, and the job fails with that error."""
        answers: list[GridnodeError | None] = [None, GridnodeError("over", code="output_too_large", status=413)]
        asked: list[int] = []

        def tick() -> GridnodeError | None:
            asked.append(1)
            return answers.pop(0) if answers else None

        h = Harness(on_tick=tick)
        h.proc.childDataReceived(1, block(1_000_000))
        assert len(asked) == 1 and h.sent == []
        h.proc.childDataReceived(1, b"frame=20\nout_time_us=2000000\n")  # a report not ended yet
        assert len(asked) == 1
        h.proc.childDataReceived(1, b"progress=continue\n")
        assert len(asked) == 2 and h.sent == [(4242, signal.SIGTERM)]
        h.proc.childDataReceived(1, block(3_000_000))
        assert len(asked) == 2  # stopping: not asked again
        h.end(exited(255))
        assert h.error().code == "output_too_large"

    def test_progress_listener_errors_are_contained(self) -> None:
        """A listener that raises does not break the conversion."""
        clock = task.Clock()

        def bad(_: float) -> None:
            raise RuntimeError("boom")

        proc = FfmpegProcess(clock, duration=1, on_progress=bad, killpg=lambda p, s: None)
        proc.makeConnection(FakeTransport())
        proc.childDataReceived(1, block(500_000))
        results: list[Any] = []
        proc.deferred.addBoth(results.append)
        proc.processEnded(exited(0))
        assert isinstance(results[0], FfmpegResult)


def landscape_probe() -> ProbeResult:
    return ProbeResult(size=10_000_000, format_name="mov,mp4,m4a,3gp,3g2,mj2", container="mp4", demuxer="mov",
                       duration=4.0, width=640, height=360, video_codec="h264", audio_codec="aac", has_audio=True,
                       rotation=0, display_width=640, display_height=360, stream_count=2)


class CollectOutputsTests:
    """What ffmpeg left is read by the node, which may read more than ffmpeg's user: only plain
    files inside the output folder count as outputs."""

    def test_plain_files_are_outputs(self, tmp_path: Path) -> None:
        (tmp_path / "mp4-480p.mp4").write_bytes(b"x" * 10)
        (found,) = collect_outputs(str(tmp_path), landscape_probe(), parse_presets("mp4-480p"))
        assert (found.name, found.size) == ("mp4-480p.mp4", 10)

    def test_outputs_together_over_their_limit(self, tmp_path: Path) -> None:
        """HLS segments each under -fs but together over the job's limit (one output here:
        640x360 keeps one rung): output_too_large, as a job that ended between two watches."""
        rung = tmp_path / "hls" / "360p"
        rung.mkdir(parents=True)
        (tmp_path / "hls" / "master.m3u8").write_bytes(b"#EXTM3U\n")
        (rung / "index.m3u8").write_bytes(b"#EXTM3U\n")
        for i in range(3):
            (rung / f"seg_{i:03d}.ts").write_bytes(b"x" * 40)
        collect_outputs(str(tmp_path), landscape_probe(), parse_presets("hls"), max_output_bytes=200)
        with pytest.raises(GridnodeError) as e:
            collect_outputs(str(tmp_path), landscape_probe(), parse_presets("hls"), max_output_bytes=120)
        assert (e.value.code, e.value.status) == ("output_too_large", 413) and "120 bytes" in e.value.message

    @pytest.mark.parametrize("how", ["link to a file", "link into a linked folder", "second name of a file"])
    def test_anything_else_fails_the_job(self, tmp_path: Path, how: str) -> None:
        """A symbolic link to a file the node can read (a secret), a folder that is a link, or a
        hard link to such a file: ffmpeg_failed, and nothing of the file is read."""
        secret = tmp_path / "secret"
        secret.write_bytes(b"the pool secret")
        out = tmp_path / "out"
        out.mkdir()
        if how == "link to a file":
            (out / "mp4-480p.mp4").symlink_to(secret)
            presets = parse_presets("mp4-480p")
        elif how == "link into a linked folder":
            (tmp_path / "elsewhere").mkdir()
            (tmp_path / "elsewhere" / "master.m3u8").write_bytes(b"#EXTM3U\n")
            (out / "hls").symlink_to(tmp_path / "elsewhere")
            presets = parse_presets("hls")
        else:
            os.link(secret, out / "mp4-480p.mp4")
            presets = parse_presets("mp4-480p")
        with pytest.raises(GridnodeError) as e:
            collect_outputs(str(out), landscape_probe(), presets)
        assert e.value.code == "ffmpeg_failed" and "plain file" in e.value.message


class ArgvLimitsTests:
    def test_decoders_and_demuxer_get_the_limits(self) -> None:
        """Every job's ffmpeg is told the node's pixel and stream limits before its input, so a
        frame or a stream past them stops it whatever the header declared."""
        limits = Limits(max_pixels=640 * 360, max_streams=5)
        argv = build_argv("ffmpeg", landscape_probe(), "/in.mp4", "/out", parse_presets("hls"), input_limits=limits)
        at = argv.index("-i")
        assert argv[argv.index("-max_pixels") + 1] == str(decoder_pixels(limits, landscape_probe()))
        assert argv.index("-max_pixels") < at
        assert argv[argv.index("-max_streams") + 1] == "5" and argv.index("-max_streams") < at
        assert "-max_pixels" in build_argv("ffmpeg", landscape_probe(), "/in.mp4", "/out", parse_presets("poster"))


@pytest.mark.integration
class RealFfmpegTests:
    @pytest_twisted.ensureDeferred
    async def test_four_presets_from_one_clip(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """A 4 s clip to mp4-720p, webm-480p, poster and hls: H.264/VP9 outputs within 0.2 s, progress to 1.0."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        presets = parse_presets("mp4-720p,webm-480p,poster,hls")
        progress: list[float] = []
        run = start_transcode(real_reactor, source, str(media_clips.landscape), str(tmp_path / "out"), presets,
                              ffmpeg=FFMPEG, on_progress=progress.append)
        result = await run.deferred
        assert result.elapsed < 30
        assert progress and progress[-1] == 1.0 and progress == sorted(progress)
        produced = {f.name: f for f in collect_outputs(str(tmp_path / "out"), source, presets)}
        assert {"mp4-720p.mp4", "webm-480p.webm", "poster.jpg", "hls/master.m3u8", "hls/360p/index.m3u8",
                "hls/360p/seg_000.ts"} == set(produced)
        for name, codec in [("mp4-720p.mp4", "h264"), ("webm-480p.webm", "vp9"), ("hls/360p/seg_000.ts", "h264")]:
            info = ffprobe_json(produced[name].path)
            v = [s for s in info["streams"] if s["codec_type"] == "video"][0]
            assert v["codec_name"] == codec and (v["width"], v["height"]) == (640, 360)
            assert [s["codec_type"] for s in info["streams"]].count("audio") == 1
            assert abs(float(info["format"]["duration"]) - 4.0) <= 0.2, name
        assert "360p/index.m3u8" in Path(produced["hls/master.m3u8"].path).read_text()
        poster = ffprobe_json(produced["poster.jpg"].path)["streams"][0]
        assert (poster["codec_name"], poster["width"], poster["height"]) == ("mjpeg", 640, 360)
        assert produced["mp4-720p.mp4"].content_type == "video/mp4"

    @pytest_twisted.ensureDeferred
    async def test_commands_scale_with_the_input(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """What the node starts per job, as bench/pipeline.py runs it by hand: a probe that works
        behind the wrapper, and an ffmpeg whose CPU and file-size limits follow the input."""
        clip = str(media_clips.landscape)
        out = subprocess.run(probe_command(FFPROBE, clip), capture_output=True, check=True).stdout
        assert float(json.loads(out)["format"]["duration"]) == pytest.approx(4.0, abs=0.2)
        source = await probe(real_reactor, clip, ffprobe=FFPROBE)
        argv, limits = transcode_command(source, clip, str(tmp_path), parse_presets("poster"), ffmpeg=FFMPEG,
                                         threads=2, timeouts=Timeouts(max_time=100.0))
        assert argv == build_argv(FFMPEG, source, clip, str(tmp_path), parse_presets("poster"), threads=2)
        assert limits.cpu_seconds == 100 * 2 + 60
        assert limits.file_size == default_output_limit(source) + 1024 * 1024
        subprocess.run(sandboxed_argv(argv, limits), capture_output=True, check=True)
        assert (tmp_path / "poster.jpg").stat().st_size > 0

    @pytest_twisted.ensureDeferred
    async def test_portrait_without_audio(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """A rotated clip without audio converts to an upright 180x320 video with no rotation left and no audio."""
        source = await probe(real_reactor, str(media_clips.portrait), ffprobe=FFPROBE)
        presets = parse_presets("mp4-480p,webm-480p")
        await start_transcode(real_reactor, source, str(media_clips.portrait), str(tmp_path), presets,
                              ffmpeg=FFMPEG).deferred
        for f in collect_outputs(str(tmp_path), source, presets):
            streams = ffprobe_json(f.path)["streams"]
            assert [s["codec_type"] for s in streams] == ["video"]
            assert (streams[0]["width"], streams[0]["height"]) == (180, 320)
            assert not any("rotation" in sd for sd in streams[0].get("side_data_list", []))

    @pytest_twisted.ensureDeferred
    async def test_cancel_kills_process_group(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """Cancelling mid-transcode ends ffmpeg (a group leader, at nice 10) and everything in its group."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        argv = build_argv(FFMPEG, source, str(media_clips.landscape), str(tmp_path), parse_presets("mp4-480p"))
        argv[argv.index("-protocol_whitelist"):argv.index("-protocol_whitelist")] = ["-re"]  # 4 s in real time
        progress: list[float] = []
        run = spawn_ffmpeg(real_reactor, argv, duration=source.duration, on_progress=progress.append)
        assert run.pid is not None
        pid = run.pid
        await wait_for(real_reactor, lambda: progress)
        assert os.getpgid(pid) == pid
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == 10  # nice
        run.cancel()
        with pytest.raises(GridnodeError) as info:
            await run.deferred
        assert info.value.code == "cancelled"
        await group_gone(real_reactor, pid)
        assert not alive(pid)

    @pytest_twisted.ensureDeferred
    async def test_cancel_reaches_grandchildren(self, real_reactor: Any, tmp_path: Path) -> None:
        """A child's own children, in the same group, are stopped too."""
        pidfile = tmp_path / "pid"
        run = spawn_ffmpeg(real_reactor, ["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], duration=1)
        await wait_for(real_reactor, lambda: pidfile.exists() and pidfile.read_text().strip())
        grandchild = int(pidfile.read_text())
        assert alive(grandchild)
        run.cancel()
        with pytest.raises(GridnodeError):
            await run.deferred
        await wait_for(real_reactor, lambda: not alive(grandchild), timeout=10)

    @pytest_twisted.ensureDeferred
    async def test_idle_timeout(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """ffmpeg blocked on an input that never comes is stopped by the idle timeout: code timeout."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        fifo = tmp_path / "in.fifo"
        os.mkfifo(fifo)
        argv = build_argv(FFMPEG, source, str(fifo), str(tmp_path), parse_presets("mp4-480p"))
        run = spawn_ffmpeg(real_reactor, argv, duration=source.duration,
                           timeouts=Timeouts(idle=0.5, kill_grace=1, backup=2))
        started = real_reactor.seconds()
        with pytest.raises(GridnodeError) as info:
            await run.deferred
        assert info.value.code == "timeout"
        assert real_reactor.seconds() - started < 3
        assert run.pid is not None
        await group_gone(real_reactor, run.pid)

    @pytest_twisted.ensureDeferred
    async def test_broken_input_fails_with_stderr(self, real_reactor: Any, media_clips: Clips,
                                                  tmp_path: Path) -> None:
        """ffmpeg on bytes that are no mp4: ffmpeg_failed carrying ffmpeg's own error line."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        argv = build_argv(FFMPEG, source, str(media_clips.random), str(tmp_path), parse_presets("mp4-480p"))
        with pytest.raises(GridnodeError) as info:
            await spawn_ffmpeg(real_reactor, argv, duration=source.duration).deferred
        assert info.value.code == "ffmpeg_failed"
        assert "random.mp4" in info.value.message

    @pytest_twisted.ensureDeferred
    async def test_missing_binary(self, real_reactor: Any) -> None:
        """A missing ffmpeg binary is ffmpeg_failed saying which binary is missing."""
        with pytest.raises(GridnodeError) as info:
            await spawn_ffmpeg(real_reactor, ["/nonexistent/ffmpeg", "-version"], duration=1).deferred
        assert info.value.code == "ffmpeg_failed"
        assert "/nonexistent/ffmpeg" in info.value.message and "No such file or directory" in info.value.message


@pytest.mark.integration
class ActualLimitsTests:
    """Limits on what ffmpeg actually meets and makes, not on what the input declared."""

    @pytest_twisted.ensureDeferred
    async def test_late_giant_frames_stop_the_decode(self, real_reactor: Any, tmp_path: Path) -> None:
        """An MJPEG AVI that declares 64x64 is accepted; its 16000x16000 frames stop the decode:
        too_large, the whole process group gone."""
        clip = late_giant_frames(tmp_path)
        source = await probe(real_reactor, str(clip), ffprobe=FFPROBE)
        assert (source.width, source.height) == (64, 64)
        run = start_transcode(real_reactor, source, str(clip), str(tmp_path / "out"), parse_presets("mp4-480p"),
                              ffmpeg=FFMPEG)
        with pytest.raises(GridnodeError) as info:
            await run.deferred
        assert (info.value.code, info.value.status) == ("too_large", 413)
        assert "16000x16000" in info.value.message
        assert run.pid is not None
        await group_gone(real_reactor, run.pid)

    @pytest_twisted.ensureDeferred
    async def test_hls_over_its_limit_is_stopped_while_running(self, real_reactor: Any, tmp_path: Path) -> None:
        """HLS, which -fs does not bound (ffmpeg writes each 6 s segment whole), of an 18 s clip
        read at 3 times its pace: the first segment passes 10 kB and the watch stops ffmpeg
        there, before its third segment."""
        clip = tmp_path / "clip.mp4"
        subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:duration=18",
                        "-c:v", "libx264", "-preset", "ultrafast", str(clip)], check=True, timeout=60)
        source = await probe(real_reactor, str(clip), ffprobe=FFPROBE)
        out = tmp_path / "out"
        out.mkdir()
        argv = build_argv(FFMPEG, source, str(clip), str(out), parse_presets("hls"))
        argv[argv.index("-protocol_whitelist"):argv.index("-protocol_whitelist")] = ["-readrate", "3"]
        watch = OutputWatch(real_reactor, str(out), 10_000)
        run = spawn_ffmpeg(real_reactor, argv, duration=source.duration, on_tick=watch.tick)
        with pytest.raises(GridnodeError) as info:
            await run.deferred
        assert (info.value.code, info.value.status) == ("output_too_large", 413)
        assert watch.total > 10_000
        assert not (out / "hls" / "360p" / "seg_002.ts").exists()  # stopped before its last segment
        assert run.pid is not None
        await group_gone(real_reactor, run.pid)

    @pytest_twisted.ensureDeferred
    async def test_outputs_read_back(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """Real outputs of a whole clip measure its 4 s, as ffprobe reads them; the outputs of a
        faststart mp4 cut in half measure about 10 s of its 20: input_truncated, with ffmpeg's
        decode errors."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        presets = parse_presets("mp4-480p,webm-480p,poster,hls")
        await start_transcode(real_reactor, source, str(media_clips.landscape), str(tmp_path / "a"), presets,
                              ffmpeg=FFMPEG).deferred
        measured = measure_outputs(collect_outputs(str(tmp_path / "a"), source, presets), source, presets)
        durations = {f.name: f.duration for f in measured if f.duration is not None}
        assert set(durations) == {"mp4-480p.mp4", "webm-480p.webm", "hls/master.m3u8"}
        assert all(d == pytest.approx(4.0, abs=0.2) for d in durations.values()), durations
        for name in ("mp4-480p.mp4", "webm-480p.webm"):
            seen = float(ffprobe_json(tmp_path / "a" / name)["format"]["duration"])
            assert durations[name] == pytest.approx(seen, abs=0.05), name

        half = cut_faststart(tmp_path)
        source = await probe(real_reactor, str(half), ffprobe=FFPROBE)
        assert source.duration == pytest.approx(20.0, abs=0.1)
        presets = parse_presets("mp4-480p")
        result = await start_transcode(real_reactor, source, str(half), str(tmp_path / "b"), presets,
                                       ffmpeg=FFMPEG).deferred
        found = collect_outputs(str(tmp_path / "b"), source, presets)
        with pytest.raises(GridnodeError) as info:
            measure_outputs(found, source, presets, result.stderr_tail)
        assert info.value.code == "input_truncated" and "of the input's 20.0 s" in info.value.message
        assert "partial file" in info.value.message
