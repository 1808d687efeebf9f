"""
Audio outputs and inputs without video: the ``audio`` preset and the m4a/opus specs, their
argv, which outputs a probed input may make (``check_inputs``), the plan (never chunked),
scratch estimates, and reading an Ogg Opus file's length. Pure, no I/O but a BytesIO.
"""

from __future__ import annotations

import io
import struct

import pytest

from gridnode.chunked import plan_for
from gridnode.errors import GridnodeError
from gridnode.media.headers import opus_duration
from gridnode.media.presets import AUDIO_ONLY, build_argv
from gridnode.media.probe import ProbeResult
from gridnode.media.scratch import output_estimate
from gridnode.media.templates import Catalog, check_inputs, parse_outputs, parse_presets, spec_of


def audio_source(duration: float = 21600.0) -> ProbeResult:
    return ProbeResult(size=30_000_000, format_name="mp3", container="mp3", demuxer="mp3", duration=duration,
                       width=0, height=0, video_codec=None, audio_codec="mp3", has_audio=True, rotation=0,
                       display_width=0, display_height=0, stream_count=2)


def silent_video() -> ProbeResult:
    return ProbeResult(size=1_000_000, format_name="matroska,webm", container="matroska", demuxer="matroska",
                       duration=20.0, width=640, height=360, video_codec="h264", audio_codec=None, has_audio=False,
                       rotation=0, display_width=640, display_height=360, stream_count=1)


def refusal(presets: str, probe: ProbeResult) -> GridnodeError:
    with pytest.raises(GridnodeError) as info:
        check_inputs(parse_presets(presets), probe)
    return info.value


class AudioSpecTests:
    def test_builtin_audio_preset(self) -> None:
        """``audio`` is one AAC output, audio.m4a, 128 kb/s, listed by GET /presets."""
        (preset,) = parse_presets("audio")
        assert (preset.container, preset.audio, preset.audio_kbps, preset.loudness) == ("m4a", "aac", 128, None)
        assert [(f.name, f.content_type) for f in preset.outputs(audio_source())] == [("audio.m4a", "audio/mp4")]
        listed = {t["name"]: t for t in Catalog().listing()}
        assert listed["audio"]["outputs"] == [{"name": "audio", "container": "m4a", "audio": "aac",
                                               "audio_kbps": 128}]

    def test_opus_spec_round_trips(self) -> None:
        """An opus output with a loudness target and a clip is read back from its own spec."""
        (preset,) = parse_outputs([{"name": "talk", "container": "opus", "audio_kbps": 48, "loudness": -16,
                                    "clip": {"start": 5, "end": 65}}], watermarks=None)
        assert preset.outputs(audio_source())[0].name == "talk.opus"
        assert parse_outputs([spec_of(preset)], watermarks=None) == [preset]

    @pytest.mark.parametrize(("spec", "field"), [
        ({"container": "m4a", "size": 720}, "size"), ({"container": "m4a", "video": "h264"}, "video"),
        ({"container": "opus", "audio": "aac"}, "audio"), ({"container": "m4a", "audio": "none"}, "audio"),
        ({"container": "opus", "watermark": {"image": "a.png"}}, "watermark"),
        ({"container": "m4a", "audio_kbps": 4}, "audio_kbps"),
    ])
    def test_video_fields_and_no_audio_refused(self, spec: dict[str, object], field: str) -> None:
        """An audio output takes no video field, no other codec and never ``audio: none`` (it
        would be empty): ``bad_spec`` naming the field."""
        with pytest.raises(GridnodeError) as info:
            parse_outputs([{"name": "a", **spec}], watermarks=None)
        assert info.value.code == "bad_spec" and info.value.message.startswith(f"outputs[0].{field}")


class AudioArgvTests:
    def test_m4a_maps_the_audio_alone(self) -> None:
        """The audio preset: no filter graph (nothing to filter), the audio stream mapped as it is,
        AAC, fast start, the ipod muxer, capped a second past the probed length."""
        argv = build_argv("ffmpeg", audio_source(), "/in/talk.mp3", "/out", parse_presets("audio"))
        assert "-filter_complex" not in argv and "0:v:0" not in " ".join(argv)
        tail = argv[argv.index("-map"):]
        assert tail[:2] == ["-map", "0:a:0"] and tail[tail.index("-c:a") + 1] == "aac"
        assert tail[tail.index("-t") + 1] == "21601.0" and tail[tail.index("-f") + 1] == "ipod"
        assert tail[-1] == "/out/audio.m4a" and "+faststart" in tail
        assert argv[argv.index("-i") - 1] == "mp3"

    def test_loudness_and_clip_go_through_the_audio_graph(self) -> None:
        """An opus output with a loudness target and a clip: one audio branch (trim, loudnorm),
        libopus in Ogg, capped at the clip's length."""
        outputs = parse_outputs([{"name": "talk", "container": "opus", "loudness": -16,
                                  "clip": {"start": 10, "end": 70}}], watermarks=None)
        argv = build_argv("ffmpeg", audio_source(), "/in/a.mp3", "/out", outputs)
        graph = argv[argv.index("-filter_complex") + 1]
        assert graph.startswith("[0:a:0]") and "atrim=start=10.000:end=70.000" in graph and "loudnorm=I=-16" in graph
        assert "[0:v:0]" not in graph
        assert argv[argv.index("-c:a") + 1] == "libopus" and argv[argv.index("-t") + 1] == "61.0"
        assert argv[-1] == "/out/talk.opus" and argv[argv.index("-f", argv.index("-c:a")) + 1] == "ogg"


class CheckInputsTests:
    def test_audio_alone_takes_audio_outputs(self) -> None:
        """An input without video may make audio outputs, any number of them."""
        outputs = parse_presets("audio") + parse_outputs([{"name": "o", "container": "opus"}], watermarks=None)
        check_inputs(outputs, audio_source())

    @pytest.mark.parametrize("presets", ["mp4-720p", "audio,poster", "hls,audio,mp4-480p"])
    def test_video_outputs_of_audio_refused_whole(self, presets: str) -> None:
        """An input without video and a job asking for any output that needs video (the default
        mp4-720p, a poster): the whole job is ``needs_video`` (422), naming those outputs."""
        error = refusal(presets, audio_source())
        assert (error.code, error.status) == ("needs_video", 422)
        named = [p for p in presets.split(",") if p != "audio"]
        assert all(p in error.message for p in named) and "audio preset" in error.message
        assert "audio," not in error.message

    def test_audio_output_of_a_silent_video_refused(self) -> None:
        """A video without audio cannot make an audio output: ``needs_audio`` (422)."""
        error = refusal("mp4-480p,audio", silent_video())
        assert (error.code, error.status, "audio" in error.message) == ("needs_audio", 422, True)
        check_inputs(parse_presets("mp4-480p,poster"), silent_video())

    def test_clip_past_the_end_still_refused(self) -> None:
        """The clip check holds for audio as for video."""
        (late,) = parse_outputs([{"name": "a", "container": "m4a", "clip": {"start": 100}}], watermarks=None)
        with pytest.raises(GridnodeError) as info:
            check_inputs([late], audio_source(50.0))
        assert info.value.code == "bad_spec"


class AudioPlanTests:
    @pytest.mark.parametrize("chunk_over", [0.0, 60.0, None])
    def test_never_chunked(self, chunk_over: float | None) -> None:
        """A 6-hour input without video is one piece whatever the node's --chunk-over."""
        plan = plan_for(audio_source(), parse_presets("audio"), chunk_over=chunk_over, chunk_seconds=60.0)
        assert len(plan.chunks) == 1 and plan.chunks[0].end is None

    def test_scratch_estimate_is_the_audio_rate(self) -> None:
        """The scratch an audio output needs: its rate times its length, not a picture's."""
        estimate = output_estimate(audio_source(3600.0), parse_presets("audio"))
        assert 3600 * 128_000 / 8 < estimate < 1.5 * 3600 * 128_000 / 8
        assert set(AUDIO_ONLY) == {"m4a", "opus"}


def ogg_page(granule: int, payload: bytes) -> bytes:
    return b"OggS\x00\x00" + struct.pack("<q", granule) + b"\x00" * 12 + bytes([1, len(payload)]) + payload


class OpusDurationTests:
    def test_granule_less_pre_skip(self) -> None:
        """An Ogg Opus file lasts its last page's granule position less the pre-skip, at 48 kHz."""
        head = b"OpusHead\x01\x02" + struct.pack("<H", 312) + b"\x80\xbb\x00\x00\x00\x00\x00"
        data = ogg_page(0, head) + ogg_page(0, b"OpusTags") + ogg_page(48000 * 90 + 312, b"x" * 50)
        assert opus_duration(io.BytesIO(data), len(data)) == 90.0

    @pytest.mark.parametrize("data", [b"", b"OggS" + b"\x00" * 30, b"OpusHead\x01\x02\x00\x00OggS\x00\x00"
                                      + struct.pack("<q", -1)])
    def test_unreadable(self, data: bytes) -> None:
        """No OpusHead, a cut page or a negative granule: no duration (the job fails, never passes)."""
        assert opus_duration(io.BytesIO(data), len(data)) is None
