"""
CMAF and storyboard outputs: the plans and argv pieces on their own (unit), and the files
real ffmpeg makes from them (integration): one set of segments under both manifests, the
same keyframe times on every rung, sheets whose tiles are exactly the VTT's cues.
"""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gridnode.errors import GridnodeError
from gridnode.media import cmaf, storyboard
from gridnode.media.finish import write_storyboards
from gridnode.media.presets import build_argv, folders
from gridnode.media.templates import PRESETS, parse_output, parse_outputs, spec_of
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.test_media_presets import source, value_after


class StoryboardPlanTests:
    def test_a_tile_every_two_seconds_to_the_end(self) -> None:
        p = storyboard.plan(12.0, (1280, 720))
        assert (p.interval, p.count, p.width, p.height, p.columns, p.rows) == (2.0, 6, 160, 90, 6, 1)
        p = storyboard.plan(12.04, (1280, 720))
        assert p.count == 7  # the last 0.04 s has its own tile: the cues cover the whole video

    def test_portrait_tiles_keep_the_aspect_with_even_sides(self) -> None:
        p = storyboard.plan(5.0, (720, 1280))
        assert (p.width, p.height) == (90, 160)
        p = storyboard.plan(5.0, (333, 1000), width=100)
        assert p.width % 2 == 0 and p.height == 100

    def test_long_videos_get_a_longer_interval_not_more_tiles(self) -> None:
        p = storyboard.plan(6 * 3600.0, (1920, 1080))
        assert p.count <= storyboard.MAX_TILES and p.interval == 72
        assert (p.columns, p.rows, p.sheets) == (10, 10, 3)

    def test_a_tiny_video_has_one_tile(self) -> None:
        p = storyboard.plan(0.08, (64, 64))
        assert (p.count, p.columns, p.rows, p.sheets) == (1, 1, 1, 1)

    def test_vtt_cues_cover_the_video_and_name_their_tile(self) -> None:
        p = storyboard.plan(250.5, (1920, 1080))  # 126 tiles: two sheets
        text = storyboard.vtt(p)
        assert text.startswith("WEBVTT\n\n")
        cues = re.findall(r"(\S+) --> (\S+)\n(\S+)#xywh=(\d+),(\d+),(\d+),(\d+)", text)
        assert len(cues) == 126
        assert cues[0][:2] == ("00:00:00.000", "00:00:02.000") and cues[-1][1] == "00:04:10.500"
        assert all(a[1] == b[0] for a, b in zip(cues, cues[1:], strict=False))  # no gap, no overlap
        assert cues[0][2:] == ("sheet-001.jpg", "0", "0", "160", "90")
        assert cues[11][2:] == ("sheet-001.jpg", "160", "90", "160", "90")
        assert cues[100][2:] == ("sheet-002.jpg", "0", "0", "160", "90")

    def test_chain_keeps_exactly_the_planned_frames(self) -> None:
        chain = storyboard.chain(storyboard.plan(9.0, (640, 360), interval=3))
        assert "trim=end_frame=3" in chain and "selected_n*3" in chain and chain.endswith("tile=3x1")


class CmafOptionsTests:
    def test_rungs_audio_and_manifests(self) -> None:
        rungs = [cmaf.CmafRung("[v0]", 1280, 720, 2800), cmaf.CmafRung("[v1]", 640, 360, 800)]
        opts = cmaf.output_options("/out", rungs, video=["-c:v", "libx264", *cmaf.keyframe_options("libx264")],
                                   audio=["-c:a", "aac"], audio_label="[a]", audio_kbps=128)
        assert opts[:6] == ["-map", "[v0]", "-map", "[v1]", "-map", "[a]"]
        assert opts[opts.index("-b:v:1") + 1] == "800k" and "-sc_threshold" in opts
        assert opts[opts.index("-adaptation_sets") + 1] == "id=0,streams=v id=1,streams=a"
        assert opts[-1] == "/out/cmaf/manifest.mpd"
        silent = cmaf.output_options("/out", rungs[:1], video=["-c:v", "libx264"], audio=None, audio_kbps=128)
        assert "[a]" not in silent and silent[silent.index("-adaptation_sets") + 1] == "id=0,streams=v"

    def test_audio_ends_before_the_video(self) -> None:
        assert cmaf.audio_chain(12.0) == "atrim=end=11.950,asetpts=PTS-STARTPTS"
        assert cmaf.audio_chain(0.01).startswith("atrim=end=0.001,")

    def test_files(self) -> None:
        names = [n for n, _ in cmaf.files(3, audio=True)]
        assert names[:2] == ["cmaf/manifest.mpd", "cmaf/master.m3u8"] and "cmaf/seg-3-*.m4s" in names


LADDER = [{"size": 720, "kbps": 2800}, {"size": 480, "kbps": 1400}, {"size": 360, "kbps": 800}]
CMAF = {"name": "stream", "container": "cmaf", "ladder": LADDER}
BOARD = {"name": "board", "container": "storyboard"}

#: hostile and malformed cmaf and storyboard specs, and the field each error must name
MALFORMED_SPECS: list[tuple[dict[str, Any], str]] = [
    ({**CMAF, "video": "vp9"}, "o.video"),  # no vp9 in CMAF (h264, hevc, av1)
    ({**CMAF, "video": "h265"}, "o.video"),
    ({**CMAF, "audio": "opus"}, "o.audio"),
    ({**CMAF, "ladder": None}, "o.ladder"),
    ({**CMAF, "ladder": [{"size": 100 + 2 * i, "kbps": 500} for i in range(50)]}, "o.ladder"),
    ({**CMAF, "ladder": [{"size": 720, "kbps": 800, "audio_kbps": 96}]}, "o.ladder[0].audio_kbps"),
    ({**CMAF, "ladder": [{"size": 720}]}, "o.ladder[0].kbps"),
    ({**CMAF, "ladder": [{"size": 720, "kbps": 800}, {"size": 720, "kbps": 500}]}, "o.ladder"),
    ({**CMAF, "size": 720}, "o.size"),  # a ladder's sizes are its rungs'
    ({**CMAF, "crf": 20}, "o.crf"),
    ({**CMAF, "seg_duration": 0.001}, "o.seg_duration"),  # no muxer options from a user
    ({**CMAF, "name": "../../etc"}, "o.name"),
    ({**BOARD, "interval": 0.01}, "o.interval"),  # a tile per frame: thousands of tiles
    ({**BOARD, "interval": -2}, "o.interval"),
    ({**BOARD, "interval": float("inf")}, "o.interval"),
    ({**BOARD, "width": 100000}, "o.width"),
    ({**BOARD, "width": 7.5}, "o.width"),
    ({**BOARD, "columns": 1000}, "o.columns"),
    ({**BOARD, "clip": {"start": 1}}, "o.clip"),
    ({**BOARD, "name": "a/b"}, "o.name"),
]


class CmafStoryboardSpecTests:
    @pytest.mark.parametrize(("spec", "field"), MALFORMED_SPECS)
    def test_each_malformed_spec_names_its_field(self, spec: dict[str, Any], field: str) -> None:
        with pytest.raises(GridnodeError) as e:
            parse_output(spec, "o", watermarks=None)
        assert (e.value.code, e.value.status) == ("bad_spec", 400)
        assert e.value.message.startswith(field + ":"), e.value.message

    def test_specs_round_trip(self) -> None:
        for spec in (CMAF, {**CMAF, "video": "hevc"}, {**CMAF, "video": "av1"}, {**BOARD, "interval": 3, "width": 120}):
            preset = parse_output(spec, "o", watermarks=None)
            assert parse_output(spec_of(preset), "o", watermarks=None) == preset

    def test_outputs_name_the_master_first_then_the_manifest(self) -> None:
        preset = parse_output(CMAF, "o", watermarks=None)
        files = preset.outputs(source(1280, 720))
        assert [(f.name, f.content_type) for f in files[:2]] == [
            ("stream/master.m3u8", "application/vnd.apple.mpegurl"), ("stream/manifest.mpd", "application/dash+xml")]
        assert "stream/seg-3-*.m4s" in [f.name for f in files]  # three rungs and the audio
        small = [f.name for f in preset.outputs(source(640, 360, audio=False))]  # one rung, no audio
        assert small[-1] == "stream/seg-0-*.m4s" and len(small) == 5
        board = parse_output(BOARD, "o", watermarks=None).outputs(source())
        assert [(f.name, f.content_type) for f in board] == [("board/storyboard.vtt", "text/vtt"),
                                                             ("board/sheet-*.jpg", "image/jpeg")]
        assert folders([parse_output(CMAF, "o", watermarks=None), parse_output(BOARD, "p", watermarks=None),
                        PRESETS["poster"]]) == ["stream", "board"]


class CmafStoryboardArgvTests:
    def test_one_argv_with_rungs_at_one_aspect_and_the_sheets(self) -> None:
        presets = parse_outputs([CMAF, {**BOARD, "interval": 3}], watermarks=None)
        argv = build_argv("ffmpeg", source(1280, 720, duration=12.0), "/in.mp4", "/out", presets, threads=1)
        graph = value_after(argv, "-filter_complex")
        assert graph.startswith("[0:v:0]split=4")
        # 480p rounds to 852x480, a hair off 16:9: shown at the top rung's aspect, as the dash muxer needs
        assert graph.count("setdar=1280/720") == 3 and "scale=852:480" in graph
        assert "selected_n*3" in graph and "atrim=end=11.950" in graph
        assert argv.count("-f") == 3 and value_after(argv, "-seg_duration") == "4"
        assert "/out/stream/manifest.mpd" in argv and "/out/board/sheet-%03d.jpg" in argv
        assert value_after(argv, "-force_key_frames") == "expr:gte(t,n_forced*4)"
        assert value_after(argv, "-b:v:2") == "800k" and value_after(argv, "-b:a") == "128k"

    def test_a_clip_and_loudness_come_before_the_audio_cut(self) -> None:
        spec = {**CMAF, "clip": {"start": 2, "end": 8}, "loudness": -16}
        argv = build_argv("ffmpeg", source(duration=12.0), "/in.mp4", "/out", parse_outputs([spec], watermarks=None))
        audio = value_after(argv, "-filter_complex").split(";")[-1]
        assert audio.startswith("[0:a:0]asetpts") and "loudnorm" in audio
        assert audio.endswith("atrim=end=5.950,asetpts=PTS-STARTPTS[a0]")

    def test_silent_source_small_source(self) -> None:
        argv = build_argv("ffmpeg", source(400, 300, audio=False), "/in.mp4", "/out",
                          parse_outputs([CMAF], watermarks=None))
        assert value_after(argv, "-adaptation_sets") == "id=0,streams=v" and "-b:v:1" not in argv
        assert "scale=400:300" in value_after(argv, "-filter_complex")  # never upscaled: the lowest rung kept


class WriteStoryboardTests:
    def test_the_vtt_replaces_what_the_child_left_never_through_a_link(self, tmp_path: Path) -> None:
        """A child that planted a link named storyboard.vtt to a node's file gets the link
        replaced by the node's VTT; the file it pointed at is left as it was."""
        secret = tmp_path / "secret"
        secret.write_text("the node's")
        (tmp_path / "out" / "board").mkdir(parents=True)
        (tmp_path / "out" / "board" / "storyboard.vtt").symlink_to(secret)
        (tmp_path / "out" / "board" / "sheet-001.jpg").write_bytes(b"\xff\xd8")
        presets = parse_outputs([{**BOARD, "interval": 4}], watermarks=None)
        write_storyboards(str(tmp_path / "out"), source(duration=10.0), presets)
        vtt = tmp_path / "out" / "board" / "storyboard.vtt"
        assert not vtt.is_symlink() and secret.read_text() == "the node's"
        assert vtt.read_text().startswith("WEBVTT") and "00:00:08.000 --> 00:00:10.000" in vtt.read_text()

    def test_a_missing_sheet_fails_the_job(self, tmp_path: Path) -> None:
        (tmp_path / "out" / "board").mkdir(parents=True)
        presets = parse_outputs([BOARD], watermarks=None)
        with pytest.raises(GridnodeError) as e:
            write_storyboards(str(tmp_path / "out"), source(duration=10.0), presets)
        assert e.value.code == "ffmpeg_failed" and "board/sheet-001.jpg" in e.value.message


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _keyframes(files: list[Path]) -> list[float]:
    """Keyframe times of one rung: its init segment and media segments read as one stream. The
    packets' key flags, not the decoder's: the AV1 decoder does not skip non-key frames."""
    joined = files[0].parent / (files[0].stem + ".joined.mp4")
    joined.write_bytes(b"".join(f.read_bytes() for f in files))
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0",
                          "-show_entries", "packet=pts_time,flags", "-of", "json", str(joined)],
                         check=True, capture_output=True, timeout=60).stdout
    return sorted(round(float(p["pts_time"]), 3) for p in json.loads(out)["packets"] if "K" in p["flags"])


@pytest.mark.integration
@needs_ffmpeg
class RealFfmpegTests:
    def test_one_decode_makes_cmaf_and_a_storyboard(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        (out / cmaf.FOLDER).mkdir(parents=True)
        (out / storyboard.FOLDER).mkdir()
        sizes = [(1280, 720, 2800), (854, 480, 1400), (640, 360, 800)]
        board = storyboard.plan(12.0, (1280, 720))
        graph = ";".join(["[0:v]split=4[s0][s1][s2][s3]"]
                         + [f"[s{i}]scale={w}:{h},format=yuv420p[v{i}]" for i, (w, h, _) in enumerate(sizes)]
                         + [f"[s3]{storyboard.chain(board)}[sb]", f"[0:a:0]{cmaf.audio_chain(12.0)}[a]"])
        rungs = [cmaf.CmafRung(f"[v{i}]", w, h, k) for i, (w, h, k) in enumerate(sizes)]
        # a scene cut every 1.3 s (the picture inverts): keyframes must still fall on boundaries only
        video = ["-c:v", "libx264", "-preset", "veryfast", "-threads", "1", *cmaf.keyframe_options("libx264")]
        source = tmp_path / "source.mkv"
        _run([FFMPEG, "-v", "error", "-nostdin", "-y",
              "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25:duration=12,negate=enable='mod(floor(t/1.3)\\,2)'",
              "-f", "lavfi", "-i", "sine=frequency=440:duration=12",
              "-c:v", "libx264", "-preset", "ultrafast", "-qp", "10", "-c:a", "flac", str(source)])
        _run([FFMPEG, "-v", "error", "-nostdin", "-y", "-i", str(source), "-filter_complex", graph,
              *cmaf.output_options(str(out), rungs, video=video, audio=["-c:a", "aac"], audio_label="[a]",
                                  audio_kbps=96),
              *storyboard.output_options(str(out), "[sb]")])
        folder = out / cmaf.FOLDER

        # DASH and HLS name the same segment files, and every one of them exists
        mpd = ET.parse(folder / "manifest.mpd").getroot()
        ns = {"d": "urn:mpeg:dash:schema:mpd:2011"}
        reps = mpd.findall(".//d:Representation", ns)
        sets = mpd.findall(".//d:AdaptationSet", ns)
        assert sorted(a.get("contentType") or "" for a in sets) == ["audio", "video"]
        assert len(reps) == 4  # 3 rungs + the one audio rendition
        hls_segments: set[str] = set()
        master = (folder / "master.m3u8").read_text()
        assert master.count("#EXT-X-STREAM-INF") == 3 and "TYPE=AUDIO" in master
        for n in range(4):
            playlist = (folder / f"media_{n}.m3u8").read_text()
            assert f'#EXT-X-MAP:URI="init-{n}.m4s"' in playlist and "#EXT-X-ENDLIST" in playlist
            hls_segments |= set(re.findall(r"^(seg-\d+-\d+\.m4s)$", playlist, re.M))
        on_disk = {p.name for p in folder.glob("seg-*.m4s")}
        assert hls_segments == on_disk
        templates = {t.get("media") for t in mpd.findall(".//d:SegmentTemplate", ns)}
        assert templates == {"seg-$RepresentationID$-$Number%05d$.m4s"}

        # the rungs' keyframes fall at the same times: the segment boundaries
        times = [_keyframes([folder / f"init-{n}.m4s", *sorted(folder.glob(f"seg-{n}-*.m4s"))]) for n in range(3)]
        assert times[0] == times[1] == times[2] == [0.0, 4.0, 8.0], times

        # the storyboard: one sheet of 6 tiles (6x1) of 160x90, none of them the black padding
        sheets = sorted((out / storyboard.FOLDER).glob("sheet-*.jpg"))
        assert [s.name for s in sheets] == ["sheet-001.jpg"]
        probe = json.loads(subprocess.run([FFPROBE, "-v", "error", "-show_entries", "stream=width,height",
                                           "-of", "json", str(sheets[0])], check=True, capture_output=True).stdout)
        assert (probe["streams"][0]["width"], probe["streams"][0]["height"]) == (960, 90)
        for i in range(board.count):
            crop = subprocess.run([FFMPEG, "-v", "info", "-i", str(sheets[0]), "-vf",
                                   f"crop=160:90:{i * 160}:0,signalstats,metadata=print:key=lavfi.signalstats.YAVG",
                                   "-f", "null", "-"], check=True, capture_output=True, text=True).stderr
            luma = float(re.findall(r"YAVG=([\d.]+)", crop)[-1])
            assert luma > 40, (i, luma)  # testsrc2 is bright; a padded tile is black (~16)
