"""
HEVC and AV1 ladders in CMAF: the codec strings read from init segments (``headers.codec_string``),
written into both manifests (``cmaf.with_codecs``, ``finish.write_cmaf_codecs``) without
trusting what ffmpeg left in the folder, and each codec's keyframe options (unit); and the
files real ffmpeg makes from a node's argv: codec strings the manifests state are the init
segments' own, keyframes at the same times on every rung (integration).
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridnode.errors import GridnodeError
from gridnode.media import cmaf
from gridnode.media.finish import write_cmaf_codecs
from gridnode.media.headers import codec_string
from gridnode.media.presets import build_argv, folders
from gridnode.media.templates import parse_outputs
from tests.media_samples import FFMPEG, needs_ffmpeg
from tests.test_cmaf_storyboard import _keyframes
from tests.test_media_presets import source, value_after


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def init_segment(entry: bytes, config_kind: bytes, config: bytes) -> bytes:
    """A CMAF init segment as ffmpeg's muxer lays it out, its one track's sample entry
    ``entry`` holding the decoder configuration ``config``."""
    sample = box(entry, bytes(78) + box(config_kind, config) + box(b"pasp", bytes(8)))
    stsd = box(b"stsd", b"\0\0\0\0\0\0\0\1" + sample)
    stbl = box(b"stbl", stsd + box(b"stts", bytes(8)))
    trak = box(b"trak", box(b"tkhd", bytes(84)) + box(b"mdia", box(b"mdhd", bytes(24)) + box(b"hdlr", bytes(25))
                                                    + box(b"minf", box(b"vmhd", bytes(12)) + stbl)))
    return box(b"ftyp", b"iso5\0\0\2\0iso6mp41") + box(b"moov", box(b"mvhd", bytes(100)) + trak)


#: decoder configurations and the codec string each must give: x265's Main at level 2.1 (as
#: libx265 wrote it for a 360p rung), ISO/IEC 14496-15's own example of a Main 10 high tier,
#: SVT-AV1's 8-bit level 2.1 and a 10-bit 5.1, x264's High at 3.0
CONFIGS = [
    (b"hvc1", b"hvcC", bytes.fromhex("010160000000900000000000" + "3f") + bytes(10), "hvc1.1.6.L63.90"),
    (b"hev1", b"hvcC", bytes.fromhex("012220000000b00000000000" + "78") + bytes(10), "hev1.2.4.H120.B0"),
    (b"av01", b"av1C", bytes.fromhex("81010c00"), "av01.0.01M.08"),
    (b"av01", b"av1C", bytes.fromhex("810d4c00"), "av01.0.13M.10"),
    (b"avc1", b"avcC", bytes.fromhex("0164001effe1"), "avc1.64001e"),
]


class CodecStringTests:
    @pytest.mark.parametrize(("entry", "kind", "config", "want"), CONFIGS)
    def test_each_codec_as_rfc_6381_spells_it(self, entry: bytes, kind: bytes, config: bytes, want: str) -> None:
        """The codec string is read from the sample entry's decoder configuration."""
        data = init_segment(entry, kind, config)
        assert codec_string(io.BytesIO(data), len(data)) == want

    def test_unknown_or_broken_entries_are_none(self) -> None:
        """A codec the node does not write, a configuration of the wrong version, or a cut
        file gives None, never a guess."""
        for data in (init_segment(b"vp09", b"vpcC", bytes(12)), init_segment(b"hvc1", b"hvcC", bytes(23)),
                     init_segment(b"av01", b"av1C", b"\x01\x01\x0c\x00")):
            assert codec_string(io.BytesIO(data), len(data)) is None
        whole = init_segment(*CONFIGS[0][:3])
        for cut in (0, 8, 40, len(whole) - 30):
            assert codec_string(io.BytesIO(whole[:cut]), cut) is None

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.integers(min_value=0, max_value=2000))
    def test_hostile_bytes_never_raise(self, junk: bytes, where: int) -> None:
        """ffmpeg read a hostile input: whatever an init segment holds, the reader answers a
        string of safe characters or None."""
        whole = init_segment(*CONFIGS[0][:3])
        for data in (junk, whole[:where % len(whole)] + junk, box(b"moov", junk)):
            got = codec_string(io.BytesIO(data), len(data))
            assert got is None or re.fullmatch(r"[a-z0-9]{4}(\.[A-Z0-9]+)+", got, re.I)


MPD = """<MPD><Period id="0" start="PT0.0S">
<AdaptationSet id="0" contentType="video" startWithSAP="1" segmentAlignment="true">
<Representation id="0" mimeType="video/mp4" codecs="hvc1" bandwidth="900000" width="640" height="360" sar="1:1">
</Representation>
<Representation id="1" mimeType="video/mp4" codecs="hvc1" bandwidth="500000" width="426" height="240" sar="640:639">
</Representation>
</AdaptationSet>
<AdaptationSet id="1" contentType="audio" startWithSAP="1" segmentAlignment="true">
<Representation id="2" mimeType="audio/mp4" codecs="mp4a.40.2" bandwidth="69000" audioSamplingRate="44100">
</Representation></AdaptationSet></Period></MPD>
"""
MASTER = """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="group_A1",NAME="audio_2",DEFAULT=YES,URI="media_2.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=972727,RESOLUTION=640x360,CODECS="hvc1,mp4a.40.2",AUDIO="group_A1"
media_0.m3u8

#EXT-X-STREAM-INF:BANDWIDTH=572727,RESOLUTION=426x240,CODECS="hvc1,mp4a.40.2",AUDIO="group_A1"
media_1.m3u8
"""
CODECS = ["hvc1.1.6.L63.90", "hvc1.1.6.L60.90"]


class WithCodecsTests:
    def test_each_rung_gets_its_own_string_in_both(self) -> None:
        """What ffmpeg 5.1's dash muxer wrote for an HEVC ladder, each rung's bare ``hvc1``
        replaced; the audio left as it is."""
        mpd, master = cmaf.mpd_with_codecs(MPD, CODECS), cmaf.master_with_codecs(MASTER, CODECS)
        assert mpd is not None and master is not None
        assert re.findall(r'codecs="([^"]+)"', mpd) == [*CODECS, "mp4a.40.2"]
        assert re.findall(r'CODECS="([^"]+)"', master) == [f"{c},mp4a.40.2" for c in CODECS]
        assert mpd.replace(CODECS[0], "hvc1").replace(CODECS[1], "hvc1") == MPD
        assert master.replace(CODECS[0], "hvc1").replace(CODECS[1], "hvc1") == MASTER

    def test_a_manifest_that_misses_a_rung_is_refused(self) -> None:
        """A rung missing from either manifest, or named twice, is not what the muxer writes."""
        assert cmaf.master_with_codecs(MASTER.replace("media_1.m3u8", "media_9.m3u8"), CODECS) is None
        assert cmaf.mpd_with_codecs(MPD.replace('id="1"', 'id="0"'), CODECS) is None
        assert cmaf.mpd_with_codecs(MPD, [*CODECS, "hvc1.1.6.L90.90"]) is None
        assert cmaf.master_with_codecs(MASTER, [*CODECS, "hvc1.1.6.L90.90"]) is None
        assert cmaf.mpd_with_codecs("", CODECS) is None and cmaf.master_with_codecs("", CODECS) is None


def cmaf_folder(root: Path, codec: bytes = b"hvc1", kind: bytes = b"hvcC", config: bytes = CONFIGS[0][2]) -> Path:
    """An output folder as ffmpeg leaves a 2-rung CMAF with audio."""
    folder = root / "out" / "stream"
    folder.mkdir(parents=True)
    (folder / "manifest.mpd").write_text(MPD)
    (folder / "master.m3u8").write_text(MASTER)
    for n in range(2):
        (folder / f"init-{n}.m4s").write_bytes(init_segment(codec, kind, config))
    return folder


LADDER = [{"size": 360, "kbps": 900}, {"size": 240, "kbps": 500}]


def stream(video: str = "hevc") -> list:  # type: ignore[type-arg]
    return parse_outputs([{"name": "stream", "container": "cmaf", "video": video, "ladder": LADDER}],
                         watermarks=None)


class WriteCmafCodecsTests:
    def test_the_manifests_state_the_init_segments_codecs(self, tmp_path: Path) -> None:
        folder = cmaf_folder(tmp_path)
        write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert 'codecs="hvc1.1.6.L63.90"' in (folder / "manifest.mpd").read_text()
        assert 'CODECS="hvc1.1.6.L63.90,mp4a.40.2"' in (folder / "master.m3u8").read_text()

    def test_a_planted_link_is_never_read_through(self, tmp_path: Path) -> None:
        """An init segment the child replaced by a link to a node's file fails the job: the
        node's file is not parsed, let alone copied into a manifest a user downloads."""
        folder = cmaf_folder(tmp_path)
        secret = tmp_path / "secret.m4s"
        secret.write_bytes(init_segment(b"hvc1", b"hvcC", CONFIGS[1][2]))
        (folder / "init-1.m4s").unlink()
        (folder / "init-1.m4s").symlink_to(secret)
        with pytest.raises(GridnodeError) as e:
            write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert e.value.code == "ffmpeg_failed" and "stream/init-1.m4s" in e.value.message
        assert "H120" not in (folder / "master.m3u8").read_text()

    def test_linked_manifests_are_replaced_not_followed(self, tmp_path: Path) -> None:
        """A manifest planted as a hard link to a node's file is refused; one as a symbolic link
        too; the node's file is left as it was."""
        folder = cmaf_folder(tmp_path)
        outside = tmp_path / "node-file"
        outside.write_text(MASTER)
        (folder / "master.m3u8").unlink()
        (folder / "master.m3u8").symlink_to(outside)
        with pytest.raises(GridnodeError) as e:
            write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert e.value.code == "ffmpeg_failed"
        (folder / "master.m3u8").unlink()
        (folder / "master.m3u8").hardlink_to(outside)
        with pytest.raises(GridnodeError):
            write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert outside.read_text() == MASTER

    def test_an_unknown_codec_or_an_oversized_manifest_fails(self, tmp_path: Path) -> None:
        folder = cmaf_folder(tmp_path, b"vp09", b"vpcC", bytes(12))
        with pytest.raises(GridnodeError) as e:
            write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert e.value.code == "ffmpeg_failed" and "init-0.m4s" in e.value.message
        for n in range(2):
            (folder / f"init-{n}.m4s").write_bytes(init_segment(*CONFIGS[0][:3]))
        (folder / "manifest.mpd").write_text(MPD + " " * cmaf.MAX_MANIFEST)
        with pytest.raises(GridnodeError) as e:
            write_cmaf_codecs(str(tmp_path / "out"), source(640, 360), stream())
        assert e.value.code == "ffmpeg_failed" and "manifest.mpd" in e.value.message


class LadderOptionsTests:
    def test_av1_keyframes_by_frame_count_on_constant_rate_rungs(self) -> None:
        """SVT-AV1 ignores forced keyframes: a fixed interval of a segment's frames, closed
        GOPs, no scene cuts, on rungs made at one rate; no maxrate (SVT-AV1 takes it as CBR,
        which it refuses); the muxer told the length that interval makes."""
        probe = dataclasses.replace(source(1280, 720, duration=12.0), frame_rate=30000 / 1001)
        argv = build_argv("ffmpeg", probe, "/in.mp4", "/out", stream("av1"), threads=2)
        assert value_after(argv, "-svtav1-params") == "keyint=120:irefresh-type=2:scd=0:lp=2"
        assert value_after(argv, "-c:v") == "libsvtav1" and "-maxrate:v:0" not in argv
        assert "-force_key_frames" not in argv
        assert value_after(argv, "-filter_complex").count("fps=29.97,") == 2
        assert value_after(argv, "-seg_duration") == "4.004"

    def test_av1_rate_follows_the_fps_cap_and_a_missing_rate(self) -> None:
        assert cmaf.ladder_rate(50.0, 25.0) == 25.0 and cmaf.ladder_rate(None) == cmaf.DEFAULT_RATE
        assert cmaf.keyframe_interval(23.976) == 96 and cmaf.segment_length(23.976) == 4.004
        assert cmaf.segment_length(25.0) == 4.0 and cmaf.segment_length(None) == 4.0
        for rate in (0.3, 1.0, 7.5, 23.976, 29.97, 59.94, 119.88):
            # never past the keyframes: the muxer cuts at the first keyframe at or past each boundary
            assert cmaf.segment_length(rate) <= cmaf.keyframe_interval(rate) / rate

    def test_hevc_is_tagged_hvc1_with_forced_keyframes_and_no_scene_cuts(self) -> None:
        argv = build_argv("ffmpeg", source(1280, 720, duration=12.0), "/in.mp4", "/out", stream("hevc"), threads=2)
        assert value_after(argv, "-c:v") == "libx265" and value_after(argv, "-tag:v") == "hvc1"
        assert value_after(argv, "-x265-params") == "log-level=error:scenecut=0:open-gop=0:pools=2:frame-threads=1"
        assert value_after(argv, "-force_key_frames") == "expr:gte(t,n_forced*4)"
        assert value_after(argv, "-maxrate:v:1") == "500k" and value_after(argv, "-seg_duration") == "4"
        assert "fps=" not in value_after(argv, "-filter_complex")


@pytest.mark.integration
@needs_ffmpeg
class RealLadderTests:
    @pytest.mark.parametrize("video", ["hevc", "av1"])
    def test_rungs_cut_together_and_manifests_state_their_codecs(self, tmp_path: Path, video: str) -> None:
        """A 29.97 fps source with a scene cut every 1.3 s, through the node's argv: every rung's
        keyframes at the segment boundaries only, the same on each; both manifests state the
        codec string each init segment carries."""
        src = tmp_path / "source.mkv"
        subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                        "testsrc2=size=640x360:rate=30000/1001:duration=9,negate=enable='mod(floor(t/1.3)\\,2)'",
                        "-f", "lavfi", "-i", "sine=duration=9", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "10",
                        "-c:a", "flac", str(src)], check=True, capture_output=True, timeout=120)
        probe = dataclasses.replace(source(640, 360, duration=9.0), frame_rate=30000 / 1001, demuxer="matroska")
        presets = parse_outputs([{"name": "stream", "container": "cmaf", "video": video, "ladder": [
            {"size": 360, "kbps": 600}, {"size": 240, "kbps": 300}, {"size": 144, "kbps": 150}]}], watermarks=None)
        out = tmp_path / "out"
        for name in folders(presets):
            (out / name).mkdir(parents=True)
        argv = build_argv(FFMPEG, probe, str(src), str(out), presets, threads=1)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        write_cmaf_codecs(str(out), probe, presets)
        folder = out / "stream"
        times, codecs = [], []
        for n in range(3):
            init = (folder / f"init-{n}.m4s").read_bytes()
            codecs.append(codec_string(io.BytesIO(init), len(init)))
            times.append(_keyframes([folder / f"init-{n}.m4s", *sorted(folder.glob(f"seg-{n}-*.m4s"))]))
        assert times[0] == times[1] == times[2] == [0.0, 4.004, 8.008], times  # frame 120 is 4.004 s
        prefix = "hvc1.1.6.L" if video == "hevc" else "av01.0."
        assert all(c and c.startswith(prefix) for c in codecs), codecs
        mpd, master = (folder / "manifest.mpd").read_text(), (folder / "master.m3u8").read_text()
        assert re.findall(r'mimeType="video/mp4" codecs="([^"]+)"', mpd) == codecs
        assert re.findall(r'CODECS="([^",]+),mp4a\.40\.2"', master) == codecs
