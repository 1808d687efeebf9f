"""
Probing uploads: the pure decisions on ffprobe JSON, the ffprobe child on
``task.Clock`` and a fake transport (its time limit, group kill and backup
timer), and real ffprobe runs on generated clips, junk, playlists and a probe
that hangs.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.probe import (
    Limits,
    ProbeProcess,
    ProbeResult,
    decoder_pixels,
    limit_refusal,
    parse_probe,
    probe,
    probe_argv,
)
from tests.fake_child import PID, ChildRun, FakeGroups, FakeProcessReactor, exited
from tests.media_samples import FFPROBE, Clips


def doc(format_name: str = "mov,mp4,m4a,3gp,3g2,mj2", duration: Any = "12.5",
        streams: list[dict[str, Any]] | None = None, **fmt: Any) -> dict[str, Any]:
    if streams is None:
        streams = [video(), {"codec_type": "audio", "codec_name": "aac"}]
    return {"format": {"format_name": format_name, "duration": duration, **fmt}, "streams": streams}


def video(width: int = 1920, height: int = 1080, **extra: Any) -> dict[str, Any]:
    return {"codec_type": "video", "codec_name": "h264", "width": width, "height": height, **extra}


def refused(data: dict[str, Any], limits: Limits = Limits()) -> GridnodeError:
    with pytest.raises(GridnodeError) as info:
        parse_probe(data, size=1000, limits=limits)
    return info.value


class ParseProbeTests:
    def test_plain_mp4(self) -> None:
        """An mp4 with H.264 and AAC becomes a ProbeResult forcing the mov demuxer."""
        result = parse_probe(doc(tags={"major_brand": "isom"}), size=1234, name="holiday.mp4")
        assert result == ProbeResult(size=1234, format_name="mov,mp4,m4a,3gp,3g2,mj2", container="mp4",
                                     demuxer="mov", duration=12.5, width=1920, height=1080, video_codec="h264",
                                     audio_codec="aac", has_audio=True, rotation=0, display_width=1920,
                                     display_height=1080, stream_count=2)
        assert result.name == "holiday.mp4"

    def test_to_json_has_the_design_fields(self) -> None:
        """to_json() gives the job JSON's input object (docs/api.md): name, size, format, duration,
        displayed size, codecs."""
        result = parse_probe(doc(streams=[video(rotation=0)]), size=10, name="a.mp4")
        assert result.to_json() == {"name": "a.mp4", "size": 10, "format": "mp4", "duration": 12.5,
                                    "width": 1920, "height": 1080, "video_codec": "h264", "audio_codec": None}
        assert "name" not in parse_probe(doc(), size=10).to_json()

    @pytest.mark.parametrize(("side", "tag", "expected"), [
        (-90, None, 90), (90, None, 270), (180, None, 180), (-180, None, 180), (-270, None, 270),
        (None, "90", 90), (None, "-90", 270), (None, "360", 0), (-88.9, None, 90), (None, None, 0),
    ])
    def test_rotation_is_normalised(self, side: float | None, tag: str | None, expected: int) -> None:
        """Display-matrix angles (counter-clockwise) and rotate tags (clockwise) become 0/90/180/270 clockwise."""
        stream = video()
        if side is not None:
            stream["side_data_list"] = [{"side_data_type": "Display Matrix", "rotation": side}]
        if tag is not None:
            stream["tags"] = {"rotate": tag}
        assert parse_probe(doc(streams=[stream]), size=1).rotation == expected

    def test_quarter_turn_swaps_display_size(self) -> None:
        """A 90° rotation shows a 1920x1080 frame as 1080x1920; 180° does not swap."""
        turned = parse_probe(doc(streams=[video(side_data_list=[{"rotation": -90}])]), size=1)
        assert (turned.display_width, turned.display_height) == (1080, 1920)
        upside = parse_probe(doc(streams=[video(side_data_list=[{"rotation": 180}])]), size=1)
        assert (upside.display_width, upside.display_height) == (1920, 1080)

    def test_sample_aspect_ratio_widens_display(self) -> None:
        """Anamorphic 720x576 with SAR 64:45 is shown 1024 wide."""
        result = parse_probe(doc(streams=[video(720, 576, sample_aspect_ratio="64:45")]), size=1)
        assert (result.display_width, result.display_height) == (1024, 576)

    @pytest.mark.parametrize(("format_name", "demuxer", "container", "codec"), [
        ("matroska,webm", "matroska", "webm", "vp9"), ("matroska,webm", "matroska", "matroska", "h264"),
        ("avi", "avi", "avi", "h264"), ("mpegts", "mpegts", "mpegts", "h264"), ("flv", "flv", "flv", "h264"),
        ("mpeg", "mpeg", "mpeg", "mpeg2video"), ("ogg", "ogg", "ogg", "theora"),
    ])
    def test_allowed_containers(self, format_name: str, demuxer: str, container: str, codec: str) -> None:
        """Every container on the allowlist is accepted with the demuxer to force."""
        result = parse_probe(doc(format_name, streams=[video(codec_name=codec)]), size=1)
        assert (result.demuxer, result.container) == (demuxer, container)

    def test_3gp_and_mov_labels(self) -> None:
        """ISO files are labelled by major brand: qt -> mov, 3gp4 -> 3gp."""
        assert parse_probe(doc(tags={"major_brand": "qt  "}), size=1).container == "mov"
        assert parse_probe(doc(tags={"major_brand": "3gp4"}), size=1).container == "3gp"

    @pytest.mark.parametrize("format_name", ["hls", "concat", "image2", "tee"])
    def test_playlists_refused(self, format_name: str) -> None:
        """Formats that name other files are refused with unsupported_format and say why."""
        error = refused(doc(format_name))
        assert (error.code, error.status) == ("unsupported_format", 422)
        assert "playlist" in error.message

    def test_other_video_container_refused(self) -> None:
        """A real video container off the allowlist (ASF/WMV) is unsupported_format."""
        assert refused(doc("asf")).code == "unsupported_format"

    def test_audio_format_off_the_allowlist_is_not_a_video(self) -> None:
        """An audio format that is not allowlisted (raw ADTS AAC, WavPack) is not_a_video."""
        assert refused(doc("aac")).code == "not_a_video"
        assert refused(doc("wv")).code == "not_a_video"

    @pytest.mark.parametrize(("format_name", "container"), [
        ("mov,mp4,m4a,3gp,3g2,mj2", "m4a"), ("mp3", "mp3"), ("flac", "flac"), ("wav", "wav"), ("ogg", "ogg"),
        ("matroska,webm", "matroska"),
    ])
    def test_audio_alone_is_accepted(self, format_name: str, container: str) -> None:
        """A file of audio alone is an input without video: no video codec, no frame size, no
        frame rate; its own demuxer, and its audio stream's length where the file says none."""
        audio = {"codec_type": "audio", "codec_name": "mp3", "duration": "3600.5"}
        result = parse_probe(doc(format_name, duration=None, streams=[audio]), size=10)
        assert (result.has_video, result.has_audio, result.container) == (False, True, container)
        assert (result.width, result.height, result.display_width, result.rate, result.frame_rate) == (0, 0, 0,
                                                                                                    None, None)
        assert result.duration == result.converted_duration == 3600.5
        assert result.to_json()["video_codec"] is None

    def test_cover_art_is_not_a_video(self) -> None:
        """An attached picture (an mp3's or m4a's cover) is not a video stream: the file is audio
        alone, never a one-frame video; without audio it is not_a_video."""
        art = video(disposition={"attached_pic": 1}, codec_name="mjpeg")
        result = parse_probe(doc("mp3", streams=[art, {"codec_type": "audio", "codec_name": "mp3"}]), size=1)
        assert (result.has_video, result.width, result.stream_count) == (False, 0, 2)
        assert refused(doc("mp3", streams=[art])).code == "not_a_video"

    @pytest.mark.parametrize("kind", ["data", "subtitle", "attachment"])
    def test_neither_video_nor_audio(self, kind: str) -> None:
        """A file of a data, subtitle or attachment stream alone is not_a_video (422)."""
        error = refused(doc("matroska,webm", streams=[{"codec_type": kind, "codec_name": "bin_data"}]))
        assert (error.code, error.status) == ("not_a_video", 422)
        assert refused(doc(streams=[])).code == "not_a_video"

    def test_audio_has_its_own_length_limit(self) -> None:
        """Audio alone may last ``max_audio_duration`` (24 h by default: a 6 h recording passes
        where a 6 h video does not); a huge declared length is too_long (413) either way."""
        audio = [{"codec_type": "audio", "codec_name": "aac"}]
        assert parse_probe(doc(duration="21600", streams=audio), size=1).duration == 21600
        assert refused(doc(duration="21600")).code == "too_long"
        for huge in ("86401", "1e15"):
            error = refused(doc(duration=huge, streams=audio))
            assert (error.code, error.status) == ("too_long", 413) and "audio" in error.message
        assert refused(doc(duration="61", streams=audio), Limits(max_audio_duration=60)).code == "too_long"

    def test_too_long(self) -> None:
        """Longer than max_duration: too_long (413)."""
        error = refused(doc(duration="14401"))
        assert (error.code, error.status) == ("too_long", 413)
        assert parse_probe(doc(duration="14400"), size=1).duration == 14400

    def test_unknown_duration_refused(self) -> None:
        """No duration anywhere: too_long, since the length cannot be checked."""
        assert refused(doc(duration="N/A")).code == "too_long"

    def test_stream_duration_used_when_format_has_none(self) -> None:
        """The video stream's duration stands in for a missing format duration."""
        assert parse_probe(doc(duration=None, streams=[video(duration="3.5")]), size=1).duration == 3.5

    def test_too_large(self) -> None:
        """More pixels than max_pixels: too_large (413); exactly 8192x4320 passes."""
        error = refused(doc(streams=[video(8200, 4320)]))
        assert (error.code, error.status) == ("too_large", 413)
        assert parse_probe(doc(streams=[video(8192, 4320)]), size=1).width == 8192

    def test_too_many_streams(self) -> None:
        """More than max_streams streams: too_many_streams (422)."""
        streams = [video()] + [{"codec_type": "audio", "codec_name": "aac"}] * 16
        assert refused(doc(streams=streams)).code == "too_many_streams"
        assert parse_probe(doc(streams=streams[:16]), size=1).stream_count == 16

    def test_converted_duration_is_the_converted_streams(self) -> None:
        """What a whole output lasts: the first video and audio stream where the file says, never
        more than the file; the file's duration where no stream says."""
        audio = {"codec_type": "audio", "codec_name": "aac", "duration": "9.5"}
        longer_data = [video(duration="8.0"), audio, {"codec_type": "data", "duration": "30"}]
        assert parse_probe(doc(duration="30", streams=longer_data), size=1).converted_duration == 9.5
        assert parse_probe(doc(duration="5", streams=[video(duration="8.0")]), size=1).converted_duration == 5.0
        assert parse_probe(doc(duration="12.5"), size=1).converted_duration == 12.5

    def test_limits_are_configurable(self) -> None:
        """Limits set per node are applied."""
        assert refused(doc(duration="61"), Limits(max_duration=60)).code == "too_long"

    @pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"format": 1}', b'{"format": {}, "streams": {}}'])
    def test_garbage_json(self, raw: bytes) -> None:
        """Output that is not ffprobe's JSON: not_a_video."""
        with pytest.raises(GridnodeError) as info:
            parse_probe(raw, size=1)
        assert info.value.code == "not_a_video"


class ProbeRun(ChildRun):
    """A ``ProbeProcess`` as ``probe()`` makes it, on a fake clock, transport and killpg."""

    def __init__(self, limits: Limits = Limits(probe_timeout=30)) -> None:
        self.clock = task.Clock()
        self.groups = FakeGroups()
        self.child = ProbeProcess(self.clock, limits, killpg=self.groups)
        self.attach(self.child)


class ProbeChildTests:
    def test_answer(self) -> None:
        """Exit 0: stdout whole and stderr, with stdin closed and no timer left."""
        run = ProbeRun()
        assert run.transport.stdin_closed
        run.child.childDataReceived(1, b'{"format": ')
        run.child.childDataReceived(2, b"a warning\n")
        run.child.childDataReceived(1, b"{}}")
        run.end(exited(0))
        assert run.results == [(b'{"format": {}}', b"a warning\n")]
        assert run.clock.getDelayedCalls() == [] and run.groups.sent == [(PID, signal.SIGKILL)]  # the sweep

    def test_timeout_kills_the_group(self) -> None:
        """Past probe_timeout: SIGTERM to ffprobe's whole process group, SIGKILL after the
        grace, and timeout (504) once it is gone; the group is swept after the reaping."""
        run = ProbeRun()
        run.clock.advance(29.9)
        assert run.groups.sent == []
        run.clock.advance(0.1)
        assert run.groups.sent == [(PID, signal.SIGTERM)]
        run.clock.advance(5)
        assert run.groups.sent == [(PID, signal.SIGTERM), (PID, signal.SIGKILL)]
        assert run.results == []
        run.end(exited(None, signal.SIGKILL))
        assert (run.error().code, run.error().status) == ("timeout", 504)
        assert "longer than 30 s" in run.error().message
        assert run.groups.sent[-1] == (PID, signal.SIGKILL)
        assert run.transport.signals == [] and run.clock.getDelayedCalls() == []

    def test_backup_timer(self) -> None:
        """An ffprobe never reported as ended: the probe still fails with timeout after
        SIGKILL and the backup time; a late end changes nothing."""
        run = ProbeRun()
        run.clock.advance(30)
        run.clock.advance(5)
        assert run.groups.sent == [(PID, signal.SIGTERM), (PID, signal.SIGKILL)]
        run.clock.advance(9.9)
        assert run.results == []
        run.clock.advance(0.1)
        assert run.error().code == "timeout"
        run.end(exited(None, signal.SIGKILL))
        assert len(run.results) == 1

    def test_too_much_output_stops_the_group(self) -> None:
        """More JSON than max_probe_output: the group is stopped and the file refused."""
        run = ProbeRun(Limits(max_probe_output=10))
        run.child.childDataReceived(1, b"x" * 8)
        assert run.groups.sent == []
        run.child.childDataReceived(1, b"x" * 8)
        assert run.groups.sent == [(PID, signal.SIGTERM)]
        run.end(exited(None, signal.SIGTERM))
        assert run.error().code == "unsupported_format"

    @pytest.mark.parametrize(("stderr", "code"), [
        (b"[hls @ 0x55d0c0a1b2c0] Format not on whitelist 'mov,avi'\n", "unsupported_format"),
        (b"file:/tmp/x: Invalid data found when processing input\n", "not_a_video"),
        (b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x5581] Number of streams exceeds max_streams parameter (16), see the "
         b"documentation if you wish to increase it\nfile:/x: Cannot allocate memory\n", "too_many_streams"),
        (b"[mjpeg @ 0x55] Picture size 16000x16000 exceeds specified max pixel count 35389440, see the "
         b"documentation if you wish to increase it\n", "too_large"),
    ])
    def test_failed_exit_is_a_refusal(self, stderr: bytes, code: str) -> None:
        """A non-zero exit is a refusal read from stderr: a playlist demuxer off the whitelist
        is unsupported_format, a demuxer stopped at -max_streams too_many_streams (an mp4 of
        10,000 tracks), a decoder stopped at -max_pixels too_large, anything else not_a_video."""
        run = ProbeRun()
        run.child.childDataReceived(2, stderr)
        run.end(exited(1))
        assert run.error().code == code


class LimitRefusalTests:
    def test_messages_of_the_limits(self) -> None:
        """libavutil's and libavformat's lines when -max_pixels or -max_streams stops them become
        too_large (413) and too_many_streams (422) naming the sizes; other lines mean nothing."""
        big = limit_refusal("[mjpeg @ 0x5] Picture size 16000x16000 exceeds specified max pixel count 35389440, "
                            "see the documentation if you wish to increase it")
        assert big is not None and (big.code, big.status) == ("too_large", 413)
        assert "16000x16000" in big.message
        many = limit_refusal("Number of streams exceeds max_streams parameter (16), see the documentation")
        assert many is not None and (many.code, many.status) == ("too_many_streams", 422)
        assert "16 streams" in many.message
        assert limit_refusal("[h264 @ 0x1] error while decoding MB 3 4") is None
        assert limit_refusal("Picture size 0x0 is invalid") is None

    def test_every_probe_carries_the_limits(self) -> None:
        """ffprobe is told the node's stream and pixel limits before it opens the input."""
        argv = probe_argv("ffprobe", "/in", Limits(max_pixels=10_000, max_streams=3))
        at = argv.index("file:/in")
        assert argv[argv.index("-max_streams") + 1] == "3" and argv.index("-max_streams") < at
        assert argv[argv.index("-max_pixels") + 1] == "16400" and argv.index("-max_pixels") < at

    def test_decoder_limit_allows_for_rounded_widths(self) -> None:
        """A decoder compares a frame's width rounded up to 64: the limit given to it allows 64
        columns of sqrt(max-pixels) rows (1 % at the default), and the probed frame always
        decodes (66x4000 at a limit of exactly its pixels: 128x4000 as the decoder sees it)."""
        assert decoder_pixels(Limits()) == 8192 * 4320 + 64 * 5948
        exact = Limits(max_pixels=66 * 4000)
        frame = parse_probe(doc(streams=[video(66, 4000)]), size=1, limits=exact)
        assert decoder_pixels(exact, frame) == 128 * 4000
        assert decoder_pixels(Limits(), frame) == decoder_pixels(Limits())

    def test_a_limit_met_while_ffprobe_succeeds_refuses(self, tmp_path: Path) -> None:
        """ffprobe exits 0, but a decoder it ran met a frame over -max_pixels: too_large, whatever
        the JSON declares."""
        reactor = FakeProcessReactor()
        (tmp_path / "in.avi").write_bytes(b"x" * 100)
        results: list[Any] = []
        probe(reactor, str(tmp_path / "in.avi"), ffprobe="/bin/true").addBoth(results.append)
        (proto,) = reactor.protocols
        proto.childDataReceived(1, json_doc(doc(format_name="avi", streams=[video(64, 64)])))
        proto.childDataReceived(2, b"[mjpeg @ 0x1] Picture size 16000x16000 exceeds specified max pixel count "
                                   b"35389440, see the documentation if you wish to increase it\n")
        proto.processEnded(exited(0))
        assert isinstance(results[0], Failure) and results[0].value.code == "too_large"


def json_doc(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.integration
class ProbeProcessTests:
    @pytest_twisted.ensureDeferred
    async def test_landscape_clip(self, real_reactor: Any, media_clips: Clips) -> None:
        """Real ffprobe on a 640x360 4 s mp4 with audio."""
        result = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE, name="l.mp4")
        assert (result.container, result.demuxer, result.video_codec, result.audio_codec) == \
            ("mp4", "mov", "h264", "aac")
        assert (result.display_width, result.display_height) == (640, 360)
        assert abs(result.duration - 4.0) < 0.1
        assert result.size == os.path.getsize(media_clips.landscape)

    @pytest_twisted.ensureDeferred
    async def test_portrait_clip(self, real_reactor: Any, media_clips: Clips) -> None:
        """A 320x180 frame with a quarter-turn and no audio is shown 180x320."""
        result = await probe(real_reactor, str(media_clips.portrait), ffprobe=FFPROBE)
        assert result.rotation in (90, 270)
        assert (result.display_width, result.display_height) == (180, 320)
        assert not result.has_audio and result.audio_codec is None

    @pytest_twisted.ensureDeferred
    async def test_webm_and_mpegts(self, real_reactor: Any, media_clips: Clips) -> None:
        """WebM (VP9 + Opus) and MPEG-TS are read with their own demuxers."""
        webm = await probe(real_reactor, str(media_clips.webm), ffprobe=FFPROBE)
        assert (webm.container, webm.demuxer, webm.video_codec, webm.audio_codec) == \
            ("webm", "matroska", "vp9", "opus")
        ts = await probe(real_reactor, str(media_clips.mpegts), ffprobe=FFPROBE)
        assert ts.demuxer == "mpegts"

    @pytest_twisted.ensureDeferred
    async def test_audio_alone(self, real_reactor: Any, media_clips: Clips) -> None:
        """An mp4 of audio alone is an input without video (not refused: audio outputs take it)."""
        info = await probe(real_reactor, str(media_clips.audio_only), ffprobe=FFPROBE)
        assert (info.has_video, info.audio_codec, info.container) == (False, "aac", "m4a")

    @pytest.mark.parametrize(("clip", "code"), [
        ("random", "not_a_video"),
        ("playlist", "unsupported_format"), ("concat", "unsupported_format"),
    ])
    @pytest_twisted.ensureDeferred
    async def test_refusals(self, real_reactor: Any, media_clips: Clips, clip: str, code: str) -> None:
        """Random bytes are not videos; an m3u8 playlist and a concat list are refused."""
        with pytest.raises(GridnodeError) as info:
            await probe(real_reactor, str(getattr(media_clips, clip)), ffprobe=FFPROBE)
        assert info.value.code == code
        assert info.value.status == 422

    @pytest_twisted.ensureDeferred
    async def test_empty_file(self, real_reactor: Any, tmp_path: Path) -> None:
        """An empty upload is not_a_video without running ffprobe."""
        (tmp_path / "empty").write_bytes(b"")
        with pytest.raises(GridnodeError) as info:
            await probe(real_reactor, str(tmp_path / "empty"), ffprobe="/nonexistent/ffprobe")
        assert info.value.code == "not_a_video"

    @pytest_twisted.ensureDeferred
    async def test_hanging_probe_times_out(self, real_reactor: Any, tmp_path: Path) -> None:
        """An ffprobe that never answers is killed after probe_timeout: code timeout."""
        fake = tmp_path / "ffprobe"
        fake.write_text("#!/bin/sh\nexec sleep 30\n")
        fake.chmod(0o755)
        (tmp_path / "in.mp4").write_bytes(b"x" * 100)
        started = real_reactor.seconds()
        with pytest.raises(GridnodeError) as info:
            await probe(real_reactor, str(tmp_path / "in.mp4"), ffprobe=str(fake), limits=Limits(probe_timeout=0.3))
        assert info.value.code == "timeout"
        assert real_reactor.seconds() - started < 15  # the fake would sleep 30 s

    @pytest_twisted.ensureDeferred
    async def test_missing_ffprobe(self, real_reactor: Any, media_clips: Clips) -> None:
        """A node without ffprobe reports ffprobe_unavailable (500), not a fault in the user's file."""
        with pytest.raises(GridnodeError) as info:
            await probe(real_reactor, str(media_clips.landscape), ffprobe="/nonexistent/ffprobe")
        assert (info.value.code, info.value.status) == ("ffprobe_unavailable", 500)
