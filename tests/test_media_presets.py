"""
Presets: parsing the ``presets=`` list, target sizes (never upscale, even,
aspect kept, rotation honoured), the HLS ladder and the ffmpeg argv.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode.errors import GridnodeError
from gridnode.media.presets import COMMON_OPTIONS, build_argv, hls_rungs, target_size
from gridnode.media.probe import FORMAT_WHITELIST, Limits, ProbeResult, input_options
from gridnode.media.templates import PRESETS, parse_presets


def source(width: int = 1920, height: int = 1080, *, audio: bool = True, rotation: int = 0,
           duration: float = 20.0) -> ProbeResult:
    dw, dh = (height, width) if rotation in (90, 270) else (width, height)
    return ProbeResult(size=10_000_000, format_name="mov,mp4,m4a,3gp,3g2,mj2", container="mp4", demuxer="mov",
                       duration=duration, width=width, height=height, video_codec="h264",
                       audio_codec="aac" if audio else None, has_audio=audio, rotation=rotation,
                       display_width=dw, display_height=dh, stream_count=2 if audio else 1)


def value_after(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


class ParsePresetsTests:
    def test_default(self) -> None:
        """No presets asked for: mp4-720p."""
        assert [p.name for p in parse_presets(None)] == ["mp4-720p"]

    def test_empty_is_refused(self) -> None:
        """``presets=`` given empty (or only commas) is an error, not the default: docs say so."""
        for text in ("", " ", ",,"):
            with pytest.raises(GridnodeError) as e:
                parse_presets(text)
            assert e.value.code == "unknown_preset" and "mp4-720p" in e.value.message

    def test_order_kept_and_repeats_dropped(self) -> None:
        """Names are taken in order, trimmed, once each."""
        assert [p.name for p in parse_presets(" hls, poster ,hls,,mp4-480p")] == ["hls", "poster", "mp4-480p"]

    def test_unknown_preset(self) -> None:
        """An unknown name: unknown_preset (400) naming it and listing the known presets."""
        with pytest.raises(GridnodeError) as info:
            parse_presets("mp4-720p,mp4-4k")
        assert (info.value.code, info.value.status) == ("unknown_preset", 400)
        assert "mp4-4k" in info.value.message
        for name in PRESETS:
            assert name in info.value.message


class SizeTests:
    def test_downscale_landscape(self) -> None:
        """1920x1080 to 720p is 1280x720; to 480p 852x480 (even)."""
        assert target_size(source(), 720) == (1280, 720)
        assert target_size(source(), 480) == (852, 480)

    def test_never_upscale(self) -> None:
        """A 640x360 source stays 640x360 for 720p."""
        assert target_size(source(640, 360), 720) == (640, 360)

    def test_rotation_uses_display_size(self) -> None:
        """A 1920x1080 frame turned a quarter is a 720x1280 portrait at 720p."""
        assert target_size(source(rotation=90), 720) == (720, 1280)

    def test_odd_source_made_even_without_growing(self) -> None:
        """An odd 641x361 source becomes 640x360, never 642x362."""
        assert target_size(source(641, 361), 720) == (640, 360)

    @given(st.integers(2, 8192), st.integers(2, 8192), st.sampled_from([360, 480, 720]))
    def test_even_bounded_and_aspect_kept(self, w: int, h: int, short: int) -> None:
        """Any source: both sides even, no side larger than the source, short side <= target, aspect kept."""
        tw, th = target_size(source(w, h), short)
        assert tw % 2 == 0 and th % 2 == 0
        assert tw <= max(2, w) and th <= max(2, h)
        assert min(tw, th) <= max(short, 2)
        if min(tw, th) >= 100:
            assert abs(tw / th - w / h) / (w / h) < 0.03


class LadderTests:
    ladder = PRESETS["hls"].ladder

    def test_full_ladder_for_1080p(self) -> None:
        """A 1080p source gets 720p, 480p and 360p."""
        assert [(r.name, size) for r, size in hls_rungs(source(), self.ladder)] == \
            [("720p", (1280, 720)), ("480p", (852, 480)), ("360p", (640, 360))]

    def test_rungs_above_source_dropped(self) -> None:
        """A 854x480 source keeps 480p and 360p only."""
        assert [r.name for r, _ in hls_rungs(source(854, 480), self.ladder)] == ["480p", "360p"]

    def test_one_rung_kept_for_tiny_source(self) -> None:
        """A 320x240 source keeps the lowest rung, at its own size."""
        assert [(r.name, size) for r, size in hls_rungs(source(320, 240), self.ladder)] == [("360p", (320, 240))]

    def test_hls_outputs_listed(self) -> None:
        """The hls preset lists the master playlist, each rung's playlist and its segments."""
        names = [(o.name, o.content_type) for o in PRESETS["hls"].outputs(source(854, 480))]
        assert names == [("hls/master.m3u8", "application/vnd.apple.mpegurl"),
                         ("hls/480p/index.m3u8", "application/vnd.apple.mpegurl"),
                         ("hls/480p/seg_*.ts", "video/mp2t"),
                         ("hls/360p/index.m3u8", "application/vnd.apple.mpegurl"),
                         ("hls/360p/seg_*.ts", "video/mp2t")]

    def test_single_file_outputs(self) -> None:
        """mp4, webm and poster presets write one named file each."""
        outs = {name: [(o.name, o.content_type) for o in PRESETS[name].outputs(source())]
                for name in ("mp4-720p", "mp4-480p", "webm-480p", "poster")}
        assert outs == {"mp4-720p": [("mp4-720p.mp4", "video/mp4")], "mp4-480p": [("mp4-480p.mp4", "video/mp4")],
                        "webm-480p": [("webm-480p.webm", "video/webm")], "poster": [("poster.jpg", "image/jpeg")]}


class ArgvTests:
    def argv(self, probe: ProbeResult | None = None, names: str = "mp4-720p,webm-480p,poster,hls") -> list[str]:
        return build_argv("/usr/bin/ffmpeg", probe or source(), "in put.mp4", "/scratch/j1", parse_presets(names),
                          max_output_bytes=1000)

    def test_common_options_and_forced_input(self) -> None:
        """Every argv: no stdin, progress on stdout, file protocol only, the stream and pixel limits,
        forced demuxer, absolute file: input."""
        argv = self.argv()
        assert argv[0] == "/usr/bin/ffmpeg"
        assert argv[1:1 + len(COMMON_OPTIONS)] == COMMON_OPTIONS
        i = argv.index("-i")
        assert argv[i - 10:i] == ["-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST,
                                  *input_options(Limits(), source()), "-f", "mov"]
        assert argv[i + 1].startswith("file:/") and argv[i + 1].endswith("/in put.mp4")
        assert all(isinstance(a, str) for a in argv)

    def test_size_limit_on_every_output(self) -> None:
        """-fs precedes each of the four outputs."""
        argv = self.argv()
        assert argv.count("-fs") == 4
        assert {argv[i + 1] for i, a in enumerate(argv) if a == "-fs"} == {"1000"}

    def test_one_decode_split_per_output(self) -> None:
        """The filter graph splits the decoded video once: one branch per file output and per HLS rung."""
        graph = value_after(self.argv(), "-filter_complex")
        assert graph.startswith("[0:v:0]split=6")  # mp4, webm, poster, 3 rungs
        assert "scale=1280:720" in graph and "scale=852:480" in graph and "scale=640:360" in graph

    def test_encoders(self) -> None:
        """x264 -preset veryfast, VP9 realtime with cpu-used 8, AAC, Opus, mp4 faststart."""
        argv = self.argv()
        joined = " ".join(argv)
        assert "-c:v libx264 -preset veryfast" in joined
        assert "-c:v libvpx-vp9 -deadline realtime -cpu-used 8" in joined
        assert "-c:a aac" in joined and "-c:a libopus" in joined
        assert value_after(argv, "-movflags") == "+faststart"

    def test_poster_at_ten_percent(self) -> None:
        """The poster is the frame at 10% of the duration, one JPEG."""
        argv = self.argv(source(duration=20.0), "poster")
        assert "trim=start=2.0" in value_after(argv, "-filter_complex")
        assert value_after(argv, "-frames:v") == "1"
        assert argv[-1] == "/scratch/j1/poster.jpg"

    def test_hls_master_and_segments(self) -> None:
        """HLS: 6 s segments, a master playlist, one folder per rung, each variant with a bitrate."""
        argv = self.argv(names="hls")
        assert value_after(argv, "-hls_time") == "6"
        assert value_after(argv, "-master_pl_name") == "master.m3u8"
        assert value_after(argv, "-var_stream_map") == "v:0,a:0,name:720p v:1,a:1,name:480p v:2,a:2,name:360p"
        assert argv[-1] == "/scratch/j1/hls/%v/index.m3u8"
        assert value_after(argv, "-b:v:2") == "800k"

    def test_no_audio_no_audio_options(self) -> None:
        """A silent source gets no audio map and no audio encoder in any output."""
        argv = self.argv(source(audio=False))
        assert "0:a:0" not in argv
        assert not any(a.startswith("-c:a") or a.startswith("-b:a") for a in argv)
        assert value_after(argv, "-var_stream_map") == "v:0,name:720p v:1,name:480p v:2,name:360p"

    def test_single_output_has_no_split(self) -> None:
        """One output: a plain scale chain, no split."""
        graph = value_after(self.argv(names="mp4-480p"), "-filter_complex")
        assert "split" not in graph and graph.startswith("[0:v:0]scale=852:480")

    def test_portrait_sizes(self) -> None:
        """A rotated 1920x1080 source is scaled to portrait sizes (ffmpeg autorotates before filters)."""
        graph = value_after(self.argv(source(rotation=270), "mp4-720p"), "-filter_complex")
        assert "scale=720:1280" in graph
        assert "-noautorotate" not in self.argv(source(rotation=270))

    def test_threads(self) -> None:
        """threads caps each encoder."""
        argv = build_argv("ffmpeg", source(), "a.mp4", "/o", parse_presets("mp4-720p"), threads=2)
        assert value_after(argv, "-threads") == "2"

    def test_other_demuxer_forced(self) -> None:
        """The probed demuxer is what -f forces."""
        probe = dataclasses.replace(source(), format_name="matroska,webm", demuxer="matroska")
        argv = build_argv("ffmpeg", probe, "a.mkv", "/o", parse_presets("poster"))
        assert value_after(argv, "-f") == "matroska"
