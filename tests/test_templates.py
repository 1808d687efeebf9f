"""
Templates and output specs (gridnode/media/templates.py): every malformed spec is a coded 400
naming its field and queues nothing; valid specs become the argv the builder makes of them
(HEVC with hvc1, AV1, loudness, clips, watermarks, caps); config templates and the catalog.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.errors import ConfigError, GridnodeError
from gridnode.media.presets import Preset, build_argv
from gridnode.media.templates import (
    BUILTINS,
    MAX_OUTPUTS,
    Catalog,
    check_clips,
    parse_output,
    parse_outputs,
    parse_templates,
    spec_of,
)
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.fakes import FakeMedia
from tests.test_media_presets import source, value_after

HEVC = {"name": "hevc", "container": "mp4", "video": "hevc", "size": 720}


@pytest.fixture
def marks(tmp_path: Path) -> str:
    folder = tmp_path / "marks"
    folder.mkdir()
    (folder / "logo.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    os.symlink(tmp_path / "secret.png", folder / "link.png")
    return str(folder)


def with_(**fields: Any) -> dict[str, Any]:
    return {**HEVC, **fields}


#: (spec list, the field the error must name): the acceptance's malformed specs and more
MALFORMED: list[tuple[Any, str]] = [
    ([with_(video="h263")], "outputs[0].video"),  # unknown codec
    ([with_(crf=99)], "outputs[0].crf"),
    ([with_(size=100000)], "outputs[0].size"),  # 100000 px
    ([with_(clip={"start": -1, "end": 4})], "outputs[0].clip.start"),  # negative clip
    ([with_(watermark={"image": "../secret.png"})], "outputs[0].watermark.image"),  # outside the folder
    ([with_(watermark={"image": "link.png"})], "outputs[0].watermark.image"),  # a link out of it
    ([with_(watermark={"image": "/etc/passwd"})], "outputs[0].watermark.image"),
    ([{"name": "h", "container": "hls", "ladder": [{"size": 100 + 2 * i, "kbps": 500} for i in range(50)]}],
     "outputs[0].ladder"),  # 50 rungs
    ([with_(crf="23")], "outputs[0].crf"),  # a string for a number
    ([with_(crf=True)], "outputs[0].crf"),  # a boolean is no number
    ([with_(ffmpeg_args="-i /etc/shadow")], "outputs[0].ffmpeg_args"),  # unknown field: no raw arguments
    ([with_(container="avi")], "outputs[0].container"),
    ([with_(container="dash")], "outputs[0].size"),  # a ladder's sizes are its rungs'
    ([{"name": "d", "container": "dash", "video": "vp9", "ladder": [{"size": 360, "kbps": 500}]}],
     "outputs[0].video"),
    ([with_(name="../x")], "outputs[0].name"),
    ([with_(audio="mp3")], "outputs[0].audio"),
    ([with_(audio_kbps=9000)], "outputs[0].audio_kbps"),
    ([with_(loudness=-100)], "outputs[0].loudness"),
    ([with_(fps=1000)], "outputs[0].fps"),
    ([with_(keyint=float("nan"))], "outputs[0].keyint"),
    ([with_(clip={"start": 5, "end": 2})], "outputs[0].clip.end"),
    ([with_(max_kbps=-5)], "outputs[0].max_kbps"),
    ([with_(watermark={"image": "logo.png", "corner": "middle"})], "outputs[0].watermark.corner"),
    ([{"name": "p", "container": "jpeg", "crf": 20}], "outputs[0].crf"),  # a field of another container
    ([{"name": "v", "container": "webm", "video": "hevc"}], "outputs[0].video"),  # not in webm
    ([HEVC, HEVC], "outputs"),  # two outputs of one name
    ([HEVC] * (MAX_OUTPUTS + 1), "outputs"),
    ({"name": "x"}, "outputs"),  # not a list
    ([], "outputs"),
    (["mp4"], "outputs[0]"),
]


class MalformedSpecTests:
    @pytest.mark.parametrize(("spec", "field"), MALFORMED)
    def test_each_is_a_coded_400_naming_its_field(self, spec: Any, field: str, marks: str) -> None:
        """Every malformed spec: 400 bad_spec whose message starts with the field's path."""
        with pytest.raises(GridnodeError) as e:
            Catalog(watermarks=marks).parse(None, spec)
        assert (e.value.code, e.value.status) == ("bad_spec", 400)
        assert e.value.message.startswith(field + ":"), e.value.message

    def test_dash_is_a_ladder_under_a_manifest_alone(self) -> None:
        """``dash``: the fields of a ``cmaf`` ladder; its files are the manifest, init segments and
        segments, no HLS playlist; it round-trips through its spec."""
        spec = {"name": "d", "container": "dash", "video": "av1", "ladder": [{"size": 360, "kbps": 500}]}
        preset = parse_output(spec, "o", watermarks=None)
        assert parse_output(spec_of(preset), "o", watermarks=None) == preset
        files = [(f.name, f.content_type) for f in preset.outputs(source(640, 360))]
        assert files == [("d/manifest.mpd", "application/dash+xml"), ("d/init-0.m4s", "video/iso.segment"),
                         ("d/seg-0-*.m4s", "video/iso.segment"), ("d/init-1.m4s", "video/iso.segment"),
                         ("d/seg-1-*.m4s", "video/iso.segment")]
        argv = build_argv("ffmpeg", source(640, 360), "/in.mp4", "/out", [preset])
        assert "-hls_playlist" not in argv and argv[-1] == "/out/d/manifest.mpd"

    def test_watermark_without_a_folder(self) -> None:
        """A node without watermark-dir refuses any watermark, saying so."""
        with pytest.raises(GridnodeError) as e:
            parse_output(with_(watermark={"image": "logo.png"}), "o", watermarks=None)
        assert e.value.message.startswith("o.watermark:") and "watermark-dir" in e.value.message

    def test_nothing_is_queued_or_stored(self, tmp_path: Path, marks: str) -> None:
        """A job whose inline spec is malformed is refused before its probe: no job, nothing in
        the store, the spool file gone."""
        clock = Clock()
        backend = MemoryBackend()
        media = FakeMedia(tmp_path)
        catalog = Catalog(watermarks=marks)
        media.parse_presets = catalog.parse  # type: ignore[method-assign]
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 1,
                                   "min-free": 0, "max-upload": 1}).with_identity("n1")
        jobs = JobService(clock, config, ObjectStore.synchronous(backend), media, now=clock.seconds)
        for spec, _field in MALFORMED:
            spool = jobs.admit(11)
            spool.write(b"video bytes")
            results: list[Any] = []
            d: Deferred[Any] = jobs.submit(spool, name="m.mov", presets=None, checksum=None, spec=spec)
            d.addBoth(results.append)
            assert results[0].value.code == "bad_spec"
            assert not os.path.exists(spool.path)
        assert backend.list("").items == [] and jobs.active == {} and media.runs == {}


class ValidSpecTests:
    def test_defaults(self) -> None:
        """A bare mp4 output: H.264 at 720p, AAC 128k, no loudness, no clip."""
        (p,) = parse_outputs([{"name": "a", "container": "mp4"}], watermarks=None)
        assert (p.video, p.short_side, p.audio, p.audio_kbps, p.loudness, p.clipped) == \
            ("h264", 720, "aac", 128, None, False)

    def test_spec_round_trips(self, marks: str) -> None:
        """What a record keeps of an output (spec_of) is parsed back into the same output."""
        specs = [with_(crf=30, max_kbps=3000, fps=30, keyint=2, speed="slow", audio="opus", loudness=True,
                       clip={"start": 1.5, "end": 9}, watermark={"image": "logo.png", "corner": "top-left"}),
                 {"name": "p", "container": "jpeg", "at": 0.5, "size": 360},
                 {"name": "h", "container": "hls", "ladder": [{"size": 360, "kbps": 800}, {"size": 720, "kbps": 2500}]},
                 {"name": "w", "container": "webm", "video": "av1", "audio": "none"}]
        outputs = parse_outputs(specs, watermarks=marks)
        again = parse_outputs([spec_of(p) for p in outputs], watermarks=marks)
        assert again == outputs
        assert [r.short_side for r in outputs[2].ladder] == [720, 360]  # highest first

    def test_builtins_are_templates_of_one_output(self) -> None:
        """Each built-in preset is a template whose one output has its name."""
        assert all(len(t.outputs) == 1 and t.outputs[0].name == name and t.builtin for name, t in BUILTINS.items())

    def test_template_names_expand_and_collide(self) -> None:
        """presets= names templates like presets; two outputs of one name across them: bad_spec."""
        web = Catalog({"web": parse_template_table({"outputs": [HEVC, {"name": "poster", "container": "jpeg"}]})})
        assert [p.name for p in web.parse("web,mp4-480p")] == ["hevc", "poster", "mp4-480p"]
        assert {p.template for p in web.parse("web")} == {"web"}
        with pytest.raises(GridnodeError) as e:
            web.parse("web,poster")
        assert e.value.code == "bad_spec" and "poster" in e.value.message
        with pytest.raises(GridnodeError) as e:
            web.parse("nope")
        assert e.value.code == "unknown_preset" and "web" in e.value.message

    def test_listing_follows_the_token(self) -> None:
        """GET /presets lists every template, or those a token's presets claim allows."""
        catalog = Catalog()
        assert [t["name"] for t in catalog.listing()] == list(BUILTINS)
        assert [t["name"] for t in catalog.listing(frozenset({"poster"}))] == ["poster"]
        assert catalog.listing()[0]["outputs"][0]["container"] == "mp4"


def parse_template_table(table: dict[str, Any], name: str = "web") -> Any:
    from gridnode.media.templates import parse_template

    return parse_template(name, table, watermarks=None, where=f"templates.{name}")


def argv(outputs: list[Preset], **kw: Any) -> list[str]:
    return build_argv("/usr/bin/ffmpeg", kw.pop("probe", source()), "in.mp4", "/o", outputs, **kw)


class ArgvTests:
    def test_hevc_in_mp4_is_tagged_hvc1_with_its_thread_share(self) -> None:
        """HEVC: libx265, hvc1 (Apple's players), its pool held to the job's threads."""
        a = argv(parse_outputs([HEVC], watermarks=None), threads=2)
        joined = " ".join(a)
        assert "-c:v libx265" in joined and value_after(a, "-tag:v") == "hvc1"
        assert value_after(a, "-x265-params") == "log-level=error:pools=2:frame-threads=1"

    def test_av1_is_svt_with_its_thread_share_and_capped(self) -> None:
        """AV1: libsvtav1, its logical processors the job's threads, a bitrate cap as mbr."""
        a = argv(parse_outputs([with_(video="av1", max_kbps=900, speed="fastest")], watermarks=None), threads=1)
        assert value_after(a, "-c:v") == "libsvtav1" and value_after(a, "-preset") == "12"
        assert value_after(a, "-svtav1-params") == "lp=1:mbr=900"

    def test_one_decode_with_clips_loudness_and_watermarks(self, marks: str) -> None:
        """Everything in one ffmpeg: one video split, one audio split for the outputs that trim or
        normalise it, a watermark as a PNG-only input, every output in the one argv."""
        outputs = parse_outputs([
            with_(name="a", loudness=True),
            with_(name="b", clip={"start": 2, "end": 5}),
            with_(name="c"),
            {"name": "m", "container": "jpeg", "watermark": {"image": "logo.png", "corner": "top-right", "margin": 8}},
        ], watermarks=marks)
        a = argv(outputs)
        assert a.count("-i") == 2 and a.count("-filter_complex") == 1
        graph = value_after(a, "-filter_complex")
        assert "[0:v:0]split=4" in graph and "[0:a:0]asplit=2" in graph
        assert "loudnorm=I=-16:TP=-1.5:LRA=11,aresample=48000" in graph
        assert "trim=start=2.0:end=5.0" in graph and "atrim=start=2.000:end=5.000" in graph
        assert "overlay=x=W-w-8:y=8" in graph
        i = a.index("-i", a.index("-i") + 1)
        assert a[i - 6:i + 2] == ["-protocol_whitelist", "file", "-format_whitelist", "png_pipe", "-f", "png_pipe",
                                  "-i", "file:" + os.path.join(marks, "logo.png")]
        assert a.count("0:a:0") == 1  # c maps the stream as it is

    def test_clip_past_the_end_is_refused_once_probed(self) -> None:
        """At submission, once the input is probed: a clip that starts less than 0.1 s before the
        end is bad_spec naming the output; one that starts inside it passes."""
        outputs = parse_outputs([with_(name="teaser", clip={"start": 19.95})], watermarks=None)
        with pytest.raises(GridnodeError) as e:
            check_clips(outputs, 20.0)
        assert e.value.code == "bad_spec" and e.value.message.startswith("teaser.clip.start: 19.95 s is past")
        check_clips(parse_outputs([with_(clip={"start": 19.8})], watermarks=None), 20.0)
        check_clips(parse_outputs([with_()], watermarks=None), 0.05)  # no clip: nothing to check

    def test_clip_past_the_end_fails_the_job(self) -> None:
        """A clip that starts past the input's end holds nothing: bad_spec when the job runs."""
        with pytest.raises(GridnodeError) as e:
            argv(parse_outputs([with_(clip={"start": 30})], watermarks=None), probe=source(duration=20.0))
        assert e.value.code == "bad_spec"

    def test_fps_cap_only_above_the_source(self) -> None:
        """fps caps a faster source and leaves a slower one (or one of unknown rate) alone."""
        outputs = parse_outputs([with_(fps=30)], watermarks=None)
        fast = source()
        assert "fps=30.0" in value_after(argv(outputs, probe=_rate(fast, 60.0)), "-filter_complex")
        assert "fps=" not in value_after(argv(outputs, probe=_rate(fast, 25.0)), "-filter_complex")
        assert "fps=" not in value_after(argv(outputs, probe=fast), "-filter_complex")

    def test_every_video_output_has_a_constant_rate_before_its_clip(self) -> None:
        """Without a cap, a video output is made at the source's nominal rate (ffmpeg's fps filter:
        which frame fills each slot depends on timestamps alone); the filter comes before a clip's
        trim (after it, ffmpeg 5.1 pads the clip to where the input ended); a poster has none."""
        from fractions import Fraction

        vfr = dataclasses.replace(source(), frame_rate=27.5, rate=Fraction(30000, 1001))
        outputs = parse_outputs([with_(clip={"start": 2, "end": 5})], watermarks=None)
        graph = value_after(argv(outputs, probe=vfr), "-filter_complex")
        assert graph.index("fps=30000/1001") < graph.index("trim=start=2.0:end=5.0")
        poster = parse_outputs([{"name": "p", "container": "jpeg"}], watermarks=None)
        assert "fps=" not in value_after(argv(poster, probe=vfr), "-filter_complex")

    def test_silent_source_has_no_audio_filters(self) -> None:
        """No audio stream: no audio map, no loudnorm, whatever the spec asks."""
        a = argv(parse_outputs([with_(loudness=True, clip={"start": 1})], watermarks=None),
                 probe=source(audio=False))
        assert "asplit" not in " ".join(a) and "loudnorm" not in " ".join(a) and "-c:a" not in a


def _rate(probe: Any, rate: float) -> Any:
    import dataclasses

    return dataclasses.replace(probe, frame_rate=rate)


class ConfigTemplatesTests:
    def test_config_templates_are_checked_at_start(self, marks: str) -> None:
        """[templates.NAME] tables become templates; a bad field stops the node naming it."""
        table = {"web": {"description": "for the site", "outputs": [HEVC, {"name": "poster", "container": "jpeg"}]}}
        config = build_config(file={"templates": table, "watermark-dir": marks})
        assert [p.name for p in config.templates["web"].outputs] == ["hevc", "poster"]
        bad = {"web": {"outputs": [with_(crf=99)]}}
        with pytest.raises(ConfigError) as e:
            build_config(file={"templates": bad}, file_path="/etc/g.toml")
        assert "templates.web.outputs[0].crf" in e.value.message and "/etc/g.toml" in e.value.message

    def test_a_template_may_not_shadow_a_preset(self) -> None:
        """A template named like a built-in preset is refused."""
        with pytest.raises(ConfigError) as e:
            build_config(file={"templates": {"poster": {"outputs": [HEVC]}}})
        assert "templates.poster" in e.value.message

    def test_templates_only_from_a_file(self) -> None:
        """templates is a table: a string (as a command line would give) is refused."""
        with pytest.raises(ConfigError):
            build_config(cli={"templates": "web"})


class RecordTests:
    def test_a_record_keeps_the_inline_spec(self) -> None:
        """The job record keeps its inline outputs, so a peer that adopts it rebuilds the same ones;
        a record whose spec is not a list is refused."""
        from gridnode import keys
        from gridnode.jobs import Job

        job = Job.new(keys.new_id(), name="m.mov", presets=["poster"], node="n1", size=1, now=1.0, spec=[HEVC])
        again = Job.loads(job.dumps())
        assert again.spec == [HEVC] and again.presets == ["poster"]
        outputs = Catalog().parse(",".join(again.presets) or None, again.spec or None)
        assert [p.name for p in outputs] == ["poster", "hevc"]
        bad = job.to_json() | {"spec": "hevc"}
        with pytest.raises(GridnodeError) as e:
            Job.loads(json.dumps(bad).encode())
        assert e.value.code == "bad_record"


class PresetsRouteTests:
    def test_any_token_may_list(self) -> None:
        """GET /presets needs a valid token of any scope where the node has tokens (the list is
        then cut to the token's presets claim); it is no public route."""
        from gridnode.web.access import ANY, need

        assert need(b"GET", [b"presets"]).scope == ANY


class TenantTemplatesTests:
    RAW = {"mine": {"tenants": ["alice"], "outputs": [{"container": "mp4", "size": 360}]},
           "ours": {"outputs": [{"container": "mp4", "size": 240}]}}

    def test_tenants_limit_who_sees_a_template(self) -> None:
        """``tenants``: only those callers list it; a node without tokens (None) and an admin
        see every template; an unknown name's message lists no tenant's template."""
        catalog = Catalog(parse_templates(self.RAW, watermarks=None))

        def names(tenant: str | None) -> list[str]:
            return [t["name"] for t in catalog.listing(None, tenant)]

        assert "mine" in names("alice") and "mine" not in names("bob") and "ours" in names("bob")
        assert "mine" in names(None)
        assert catalog.owners() == {"mine": frozenset({"alice"})}
        with pytest.raises(GridnodeError) as e:
            catalog.parse("nope")
        assert e.value.code == "unknown_preset" and "ours" in e.value.message and "mine" not in e.value.message

    @pytest.mark.parametrize("tenants", [[], "alice", [1], [""], ["x" * 257], ["a"] * 1001])
    def test_bad_tenants_name_the_field(self, tenants: Any) -> None:
        with pytest.raises(GridnodeError) as e:
            parse_templates({"mine": {**self.RAW["mine"], "tenants": tenants}}, watermarks=None)
        assert e.value.code == "bad_spec" and e.value.message.startswith("templates.mine.tenants:"), e.value.message
