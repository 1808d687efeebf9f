"""
Templates: named sets of outputs, from typed fields only. Plain data (one stat of a
watermark image aside), no ffmpeg.

An output spec is a JSON object (a TOML inline table in the config file) of the fields
below; ``parse_output`` checks every one and makes a ``presets.Preset``, which is all the
argv builder ever sees: a user names codecs, sizes and numbers within ranges, never an
ffmpeg argument. A field that is unknown, of the wrong type or out of range is
``400 bad_spec`` and the message starts with the field's path (``outputs[1].crf``).

A template is a name, a description and 1..``MAX_OUTPUTS`` outputs. The built-in presets
are templates of one output each, written as specs (``BUILTIN``); the operator adds more
in the config file (``[templates.NAME]``), and a job may carry its own outputs inline
(``parse_outputs``). ``Catalog`` resolves ``presets=a,b`` (preset and template names share
one namespace) and lists what a caller may use (``GET /presets``).

``cmaf`` is a ladder of H.264, HEVC or AV1 rungs under one HLS master and one DASH manifest
(``cmaf.py``: how each codec's keyframes are kept on the segment boundaries);
``dash`` is the same ladder under a DASH manifest alone (no HLS playlists);
``storyboard`` is sprite sheets and their WebVTT (``storyboard.py``); ``m4a`` (AAC) and
``opus`` (Opus in Ogg) are audio alone, the only outputs an input without video can make
(``check_inputs``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gridnode.errors import GridnodeError
from gridnode.media.codecs import CRF_RANGE, SPEEDS
from gridnode.media.presets import AUDIO_ONLY, LADDERS, Preset, Rung, Watermark
from gridnode.media.probe import ProbeResult

SPEC_ERROR = "bad_spec"
MAX_OUTPUTS = 16
MAX_RUNGS = 8
DEFAULT_PRESET = "mp4-720p"
CONTAINERS = ("mp4", "webm", "mkv", "hls", "cmaf", "dash", "jpeg", "storyboard", *AUDIO_ONLY)
#: the video codecs each container may carry, the first its default
VIDEO_IN = {"mp4": ("h264", "hevc", "av1"), "webm": ("vp9", "av1"), "mkv": ("h264", "hevc", "av1", "vp9"),
            "hls": ("h264",), "cmaf": ("h264", "hevc", "av1"), "dash": ("h264", "hevc", "av1")}
AUDIO_IN = {"mp4": ("aac", "opus"), "webm": ("opus",), "mkv": ("aac", "opus"), "hls": ("aac",), "cmaf": ("aac",),
            "dash": ("aac",), "m4a": ("aac",), "opus": ("opus",)}
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}\Z")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.png\Z")
_COMMON = {"name", "container", "size", "clip", "watermark", "fps"}
_AUDIO = {"audio", "audio_kbps", "loudness", "true_peak"}
FIELDS = {
    "mp4": _COMMON | _AUDIO | {"video", "crf", "max_kbps", "keyint", "speed"},
    "webm": _COMMON | _AUDIO | {"video", "crf", "max_kbps", "keyint", "speed"},
    "mkv": _COMMON | _AUDIO | {"video", "crf", "max_kbps", "keyint", "speed"},
    "hls": (_COMMON - {"size"}) | _AUDIO | {"video", "ladder"},
    "cmaf": (_COMMON - {"size"}) | _AUDIO | {"video", "ladder"},
    "dash": (_COMMON - {"size"}) | _AUDIO | {"video", "ladder"},
    "jpeg": _COMMON - {"fps"} | {"at"},
    "storyboard": {"name", "interval", "width"},
    "m4a": {"name", "container", "clip"} | _AUDIO,
    "opus": {"name", "container", "clip"} | _AUDIO,
}
ALL_FIELDS = set().union(*FIELDS.values())
#: the longest clip end and start, in seconds (a week: past any input a node accepts)
MAX_SECONDS = 7 * 24 * 3600.0


def spec_error(field: str, message: str) -> GridnodeError:
    return GridnodeError(f"{field}: {message}", code=SPEC_ERROR, status=400)


class _Reader:
    """One spec object's fields, each taken once and checked; what is left is unknown."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise spec_error(where, "must be an object of output fields")
        self.raw = dict(raw)
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def take(self, key: str) -> Any:
        return self.raw.pop(key, None)

    def number(self, key: str, lo: float, hi: float, default: float | None = None, *,
               whole: bool = False) -> float | None:
        value = self.take(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise spec_error(self.path(key), f"must be a number from {lo:g} to {hi:g}")
        if whole and value != int(value):
            raise spec_error(self.path(key), f"must be a whole number from {lo:g} to {hi:g}")
        if not lo <= value <= hi:
            raise spec_error(self.path(key), f"{value!r} is out of range; from {lo:g} to {hi:g}")
        return value

    def whole(self, key: str, lo: int, hi: int, default: int) -> int:
        return int(self.number(key, lo, hi, default, whole=True) or 0)

    def choice(self, key: str, allowed: Sequence[str], default: str) -> str:
        value = self.take(key)
        if value is None:
            return default
        if not isinstance(value, str) or value not in allowed:
            raise spec_error(self.path(key), f"{str(value)[:40]!r} is not one of {', '.join(allowed)}")
        return value

    def done(self, allowed: Iterable[str]) -> None:
        unknown = sorted(str(k) for k in self.raw if k not in set(allowed))
        if unknown:
            key = unknown[0]
            known = sorted(allowed)
            raise spec_error(self.path(key[:40]), f"unknown field here; known fields: {', '.join(known)}")


def parse_output(raw: Any, where: str, *, watermarks: str | None, template: str = "",
                 name: str | None = None) -> Preset:
    """One output spec -> a ``Preset``; ``bad_spec`` naming the field at ``where``. ``name``:
    the output's name when the spec gives none (a template of one output takes its own)."""
    f = _Reader(raw, where)
    container = f.take("container")
    if not isinstance(container, str) or container not in CONTAINERS:
        raise spec_error(f.path("container"), f"must be one of {', '.join(CONTAINERS)}")
    allowed = FIELDS[container]
    f.done(ALL_FIELDS)  # unknown fields first, then those of other containers
    extra = sorted(set(f.raw) - allowed)
    if extra:
        raise spec_error(f.path(extra[0][:40]), f"not a field of a {container} output; its fields: "
                                                f"{', '.join(sorted(allowed))}")
    out_name = f.take("name")
    if out_name is None:
        out_name = name
    if not isinstance(out_name, str) or not _NAME.match(out_name):
        raise spec_error(f.path("name"), "must be 1-40 characters of a-z, 0-9, - and _, starting with a letter "
                                         "or digit (it names the output's file)")
    fields: dict[str, Any] = {"name": out_name, "container": container, "template": template}
    fields["short_side"] = f.whole("size", 16, 4320, 720)
    start, end = _clip(f)
    fields.update(start=start, end=end)
    mark = f.take("watermark")
    if mark is not None:
        fields["watermark"] = _watermark(mark, f.path("watermark"), watermarks)
    if container == "jpeg":
        fields["at"] = f.number("at", 0.0, 1.0, 0.1)
        return Preset(**fields)
    if container == "storyboard":
        interval = f.number("interval", 0, 600, 0.0) or 0.0
        if 0 < interval < 0.5:
            raise spec_error(f.path("interval"), "must be 0 (chosen by the duration) or 0.5 to 600 seconds")
        fields.update(interval=float(interval), width=f.whole("width", 32, 640, 160))
        return Preset(**fields)
    if container not in AUDIO_ONLY:
        _video_fields(f, container, fields)
    audio = f.take("audio")
    # an audio output without its audio would be empty
    choices = AUDIO_IN[container] if container in AUDIO_ONLY else (*AUDIO_IN[container], "none")
    if audio is not None and audio not in choices:
        raise spec_error(f.path("audio"), f"{str(audio)[:40]!r} is not one of {', '.join(choices)} in {container}")
    fields["audio"] = "" if audio == "none" else audio or AUDIO_IN[container][0]
    fields["audio_kbps"] = f.whole("audio_kbps", 32, 512, 128)
    loudness = f.take("loudness")
    if loudness is True:
        loudness = -16.0
    if loudness is not None and loudness is not False:
        f.raw["loudness"] = loudness
        fields["loudness"] = f.number("loudness", -70, -5)
        fields["true_peak"] = f.number("true_peak", -9, 0, -1.5)
    elif f.take("true_peak") is not None:
        raise spec_error(f.path("true_peak"), "goes with a loudness target; give loudness too")
    return Preset(**fields)


def _video_fields(f: _Reader, container: str, fields: dict[str, Any]) -> None:
    fields["fps"] = f.number("fps", 1, 120, 0.0)
    video = fields["video"] = f.choice("video", VIDEO_IN[container], VIDEO_IN[container][0])
    if container in ("hls", *LADDERS):
        fields["ladder"] = _ladder(f.take("ladder"), f.path("ladder"), container)
        return
    lo, hi = CRF_RANGE[video]
    crf = f.number("crf", lo, hi, None, whole=True)
    fields["crf"] = None if crf is None else int(crf)
    fields["max_kbps"] = f.whole("max_kbps", 50, 200_000, 0)
    fields["keyint"] = f.number("keyint", 0.5, 20, 0.0)
    fields["speed"] = f.choice("speed", SPEEDS, "fast")


def _clip(f: _Reader) -> tuple[float, float | None]:
    clip = f.take("clip")
    if clip is None:
        return 0.0, None
    c = _Reader(clip, f.path("clip"))
    start = c.number("start", 0, MAX_SECONDS, 0.0) or 0.0
    end = c.number("end", 0, MAX_SECONDS)
    c.done({"start", "end"})
    if end is not None and end - start < 0.1:
        raise spec_error(c.path("end"), f"must be at least 0.1 s after the start ({start:g})")
    return float(start), None if end is None else float(end)


def check_inputs(presets: list[Preset], probe: ProbeResult) -> None:
    """Once the input is probed: an input without video makes audio outputs alone, and one
    without audio no audio output. A job that asks for both kinds is refused whole (422
    ``needs_video``, ``needs_audio``) naming the outputs it cannot make, before the 201: a job
    is never accepted to end without some of its outputs."""
    if not probe.has_video and (video := [p.template or p.name for p in presets if p.needs_video]):
        raise GridnodeError(f"this file has audio and no video, so it cannot make {', '.join(video)}; ask for "
                            "audio outputs only (the audio preset, or an m4a or opus output)",
                            code="needs_video", status=422)
    if not probe.has_audio and (audio := [p.template or p.name for p in presets if not p.needs_video]):
        raise GridnodeError(f"this file has no audio, so it cannot make {', '.join(audio)}; ask for video "
                            "outputs only", code="needs_audio", status=422)
    check_clips(presets, probe.duration)


def check_clips(presets: list[Preset], duration: float) -> None:
    """Once the input is probed: a clip that starts past its end (less than 0.1 s of video left)
    would make an empty output after the 201; refuse it now, naming the output."""
    for p in presets:
        if p.clipped and p.start > duration - 0.1:
            raise spec_error(f"{p.template or p.name}.clip.start",
                             f"{p.start:g} s is past the end of this {duration:.1f} s video; start the clip "
                             "within it")


def _watermark(raw: Any, where: str, folder: str | None) -> Watermark:
    w = _Reader(raw, where)
    image = w.take("image")
    if folder is None:
        raise spec_error(where, "this node has no watermark folder (watermark-dir); ask its operator")
    if not isinstance(image, str) or not _IMAGE.match(image) or ".." in image:
        raise spec_error(w.path("image"), "must name a .png file of the watermark folder (a bare file name)")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, image))
    if os.path.dirname(path) != root or not os.path.isfile(path):
        raise spec_error(w.path("image"), f"{image!r} is not a file of the watermark folder")
    corner = w.choice("corner", CORNERS, "bottom-right")
    margin = w.whole("margin", 0, 500, 16)
    w.done({"image", "corner", "margin"})
    return Watermark(image, path, corner, margin)


def _ladder(raw: Any, where: str, container: str) -> tuple[Rung, ...]:
    # CMAF has one audio rendition for every rung: its bitrate is the output's audio_kbps.
    fields = {"size", "kbps", "audio_kbps"} if container == "hls" else {"size", "kbps"}
    if raw is None:
        raise spec_error(where, f"a {container} output needs a ladder: a list of {{{', '.join(sorted(fields))}}}")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_RUNGS:
        raise spec_error(where, f"must be a list of 1 to {MAX_RUNGS} rungs")
    rungs = []
    for i, item in enumerate(raw):
        r = _Reader(item, f"{where}[{i}]")
        size = r.whole("size", 16, 4320, 0)
        if not size:
            raise spec_error(r.path("size"), "each rung needs its short side")
        kbps = r.whole("kbps", 50, 100_000, 0)
        if not kbps:
            raise spec_error(r.path("kbps"), "each rung needs its video bitrate")
        audio_kbps = r.whole("audio_kbps", 32, 512, 96) if container == "hls" else 0
        r.done(fields)
        rungs.append(Rung(f"{size}p", size, kbps, audio_kbps))
    if len({r.short_side for r in rungs}) != len(rungs):
        raise spec_error(where, "two rungs have the same size")
    return tuple(sorted(rungs, key=lambda r: -r.short_side))


def parse_outputs(raw: Any, *, watermarks: str | None, where: str = "outputs", template: str = "") -> list[Preset]:
    """A list of output specs (an inline job spec, a template's) -> outputs with distinct names."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_OUTPUTS:
        raise spec_error(where, f"must be a list of 1 to {MAX_OUTPUTS} outputs")
    single = template if len(raw) == 1 and template else None
    outputs = [parse_output(item, f"{where}[{i}]", watermarks=watermarks, template=template, name=single)
               for i, item in enumerate(raw)]
    _distinct(outputs, where)
    return outputs


def _distinct(outputs: Sequence[Preset], where: str) -> None:
    seen: set[str] = set()
    for preset in outputs:
        if preset.name in seen:
            raise spec_error(where, f"two outputs are named {preset.name!r}; give each its own name")
        seen.add(preset.name)


def spec_of(preset: Preset) -> dict[str, Any]:
    """The spec that ``parse_output`` turns back into ``preset``: what a job record keeps of
    an inline output, and what ``GET /presets`` shows."""
    spec: dict[str, Any] = {"name": preset.name, "container": preset.container}
    if preset.container == "storyboard":
        return {**spec, "interval": preset.interval, "width": preset.width}
    if preset.container == "hls":
        spec["ladder"] = [{"size": r.short_side, "kbps": r.video_kbps, "audio_kbps": r.audio_kbps}
                          for r in preset.ladder]
    elif preset.container in LADDERS:
        spec["ladder"] = [{"size": r.short_side, "kbps": r.video_kbps} for r in preset.ladder]
    else:
        spec["size"] = preset.short_side
    if preset.container == "jpeg":
        spec["at"] = preset.at
    elif preset.container in AUDIO_ONLY:
        spec.pop("size")
        spec.update(audio=preset.audio, audio_kbps=preset.audio_kbps)
        if preset.loudness is not None:
            spec.update(loudness=preset.loudness, true_peak=preset.true_peak)
    else:
        spec["video"] = preset.video
        if preset.container not in ("hls", *LADDERS):
            spec.update({"speed": preset.speed})
            if preset.crf is not None:
                spec["crf"] = preset.crf
            for key in ("max_kbps", "keyint"):
                if getattr(preset, key):
                    spec[key] = getattr(preset, key)
        if preset.fps:
            spec["fps"] = preset.fps
        spec["audio"] = preset.audio or "none"
        spec["audio_kbps"] = preset.audio_kbps
        if preset.loudness is not None:
            spec.update(loudness=preset.loudness, true_peak=preset.true_peak)
    if preset.clipped:
        spec["clip"] = {"start": preset.start, **({"end": preset.end} if preset.end is not None else {})}
    if preset.watermark is not None:
        m = preset.watermark
        spec["watermark"] = {"image": m.image, "corner": m.corner, "margin": m.margin}
    return spec


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    outputs: tuple[Preset, ...]
    builtin: bool = False
    #: the tenants (token ``sub``) that may see and use it; None: every caller
    tenants: frozenset[str] | None = None

    def visible_to(self, tenant: str | None) -> bool:
        """Whether a caller of ``tenant`` sees it (None: a node without tokens, or an admin)."""
        return self.tenants is None or tenant is None or tenant in self.tenants

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "builtin": self.builtin,
                "outputs": [spec_of(p) for p in self.outputs]}


#: the built-in presets, written as templates are
BUILTIN: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "mp4-720p": ("H.264 + AAC, up to 720p, fast start",
                 [{"container": "mp4", "video": "h264", "size": 720, "audio_kbps": 128}]),
    "mp4-480p": ("H.264 + AAC, up to 480p, fast start",
                 [{"container": "mp4", "video": "h264", "size": 480, "audio_kbps": 96}]),
    "webm-480p": ("VP9 + Opus, up to 480p", [{"container": "webm", "video": "vp9", "size": 480, "audio_kbps": 96}]),
    "poster": ("JPEG of the frame at 10% of the duration, up to 720p",
               [{"container": "jpeg", "size": 720, "at": 0.1}]),
    "audio": ("AAC audio alone, 128 kb/s stereo, audio.m4a (an audio-only input takes this kind only)",
              [{"container": "m4a", "audio_kbps": 128}]),
    "hls": ("HLS ladder 720p/480p/360p, 6 s segments, hls/master.m3u8",
            [{"container": "hls", "ladder": [{"size": 720, "kbps": 2800, "audio_kbps": 128},
                                             {"size": 480, "kbps": 1400, "audio_kbps": 96},
                                             {"size": 360, "kbps": 800, "audio_kbps": 64}]}]),
}


#: the most tenants one template may name, and the longest name (a token's ``sub``)
MAX_TENANTS = 1000
MAX_TENANT = 256


def _tenants(raw: Any, where: str) -> frozenset[str] | None:
    if raw is None:
        return None
    if (not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TENANTS
            or not all(isinstance(t, str) and 1 <= len(t) <= MAX_TENANT for t in raw)):
        raise spec_error(where, f"must be a list of 1 to {MAX_TENANTS} tenants (token sub), each 1-{MAX_TENANT} "
                                "characters; leave it out for a template every caller may use")
    return frozenset(raw)


def parse_template(name: str, raw: Any, *, watermarks: str | None, where: str) -> Template:
    """A ``[templates.NAME]`` table: ``description``, ``outputs`` and, for a template of some
    tenants only, ``tenants``."""
    if not _NAME.match(name):
        raise spec_error(where, "a template's name is 1-40 characters of a-z, 0-9, - and _")
    t = _Reader(raw, where)
    description = t.take("description") or ""
    if not isinstance(description, str) or len(description) > 200:
        raise spec_error(t.path("description"), "must be text of at most 200 characters")
    outputs = parse_outputs(t.take("outputs"), watermarks=watermarks, where=t.path("outputs"), template=name)
    tenants = _tenants(t.take("tenants"), t.path("tenants"))
    t.done({"description", "outputs", "tenants"})
    return Template(name, description, tuple(outputs), tenants=tenants)


BUILTINS: dict[str, Template] = {
    name: Template(name, text, tuple(parse_outputs(specs, watermarks=None, where=name, template=name)), True)
    for name, (text, specs) in BUILTIN.items()
}


def parse_templates(raw: Any, *, watermarks: str | None) -> dict[str, Template]:
    """The config file's ``templates`` table -> templates by name; ``bad_spec`` naming
    ``templates.NAME...`` for the first bad field."""
    if not isinstance(raw, Mapping):
        raise spec_error("templates", "must be a table of templates ([templates.NAME])")
    out = {}
    for name, table in raw.items():
        where = f"templates.{str(name)[:40]}"
        if name in BUILTINS:
            raise spec_error(where, "a built-in preset has this name; choose another")
        out[str(name)] = parse_template(str(name), table, watermarks=watermarks, where=where)
    return out


class Catalog:
    """The templates a node knows: the built-in presets and the config file's."""

    def __init__(self, templates: Mapping[str, Template] | None = None, watermarks: str | None = None) -> None:
        self.templates: dict[str, Template] = {**BUILTINS, **(templates or {})}
        self.watermarks = watermarks

    def names(self, text: str | None) -> list[str]:
        """``"a,b"`` -> names, in order, without repeats; None -> the default. Unknown names,
        and a value given empty, fail with ``unknown_preset`` (400) listing the known ones."""
        names = [n.strip() for n in (text if text is not None else DEFAULT_PRESET).split(",") if n.strip()]
        if not names:
            raise GridnodeError(f"presets is empty; leave it out for the default ({DEFAULT_PRESET}) or name "
                                f"some of: {', '.join(self.templates)}", code="unknown_preset", status=400)
        unknown = [n for n in names if n not in self.templates]
        if unknown:
            raise unknown_preset(unknown, self.shared())
        return list(dict.fromkeys(names))

    def parse(self, text: str | None, spec: Sequence[Any] | None = None) -> list[Preset]:
        """The outputs of the presets and templates named in ``text`` (the default when None and
        no ``spec``), then those of ``spec``, an inline list of output specs; their names distinct."""
        outputs: list[Preset] = []
        if text is not None or spec is None:
            for name in self.names(text):
                outputs += self.templates[name].outputs
        if spec is not None:
            outputs += parse_outputs(spec, watermarks=self.watermarks)
        if len(outputs) > MAX_OUTPUTS:
            raise spec_error("outputs", f"a job makes at most {MAX_OUTPUTS} outputs; this one asks for {len(outputs)}")
        _distinct(outputs, "presets")
        return outputs

    def shared(self) -> list[str]:
        """The names every caller may use: a tenant's own templates are named to that tenant only."""
        return [name for name, t in self.templates.items() if t.tenants is None]

    def owners(self) -> dict[str, frozenset[str]]:
        """The templates of some tenants only, and those tenants."""
        return {name: t.tenants for name, t in self.templates.items() if t.tenants is not None}

    def listing(self, allowed: frozenset[str] | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        """``GET /presets``: every template the caller may ask for (``allowed``: its token's
        presets claim; ``tenant``: its tenant, None for every one)."""
        return [t.to_json() for name, t in self.templates.items()
                if (allowed is None or name in allowed) and t.visible_to(tenant)]


def unknown_preset(names: Sequence[str], known: Sequence[str] = ()) -> GridnodeError:
    """``unknown_preset`` (400) for ``names``, listing ``known`` (never another tenant's)."""
    listed = f"known presets and templates: {', '.join(known)}; " if known else ""
    return GridnodeError(f"unknown preset {', '.join(repr(n[:40]) for n in names[:5])}; {listed}GET /presets "
                         "lists those this caller may use", code="unknown_preset", status=400)


#: each built-in preset's one output
PRESETS: dict[str, Preset] = {name: t.outputs[0] for name, t in BUILTINS.items()}


def parse_presets(text: str | None) -> list[Preset]:
    """The built-in presets named in ``text``, as a node's ``Catalog`` would take them (tools and
    tests; a node asks its own catalog, which knows its config file's templates too)."""
    return Catalog().parse(text)
