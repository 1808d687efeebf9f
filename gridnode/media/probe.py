"""
ffprobe an upload and decide whether gridnode will convert it.

``probe(reactor, path)`` runs ``ffprobe -v error -of json -show_format
-show_streams`` as a child process (never a blocking subprocess; ``ProbeProcess``,
with ffmpeg's discipline from ``child``: a time limit, SIGTERM then SIGKILL to its
process group, the backup timer) and turns its JSON into a frozen ``ProbeResult``;
``parse_probe`` is the pure half, fed with ffprobe's JSON, so the decisions are
unit-testable.

Refusals are ``GridnodeError`` with stable codes:

- ``not_a_video`` (422): not media at all, image or data only, unreadable;
- ``unsupported_format`` (422): a container outside the allowlist, including
  playlists and concat lists (hls, m3u8, ffconcat), which would make ffmpeg
  open other files;
- ``too_many_streams`` (422): more than ``Limits.max_streams`` streams, counted in the JSON
  or by the demuxer itself (``-max_streams``: past it, ffprobe stops reading the header);
- ``too_long`` (413): duration over ``Limits.max_duration`` (an audio-only input's: over
  ``Limits.max_audio_duration``), or unknown;
- ``too_large`` (413): more pixels per frame than ``Limits.max_pixels``, declared or met by a
  decoder (``-max_pixels``);
- ``timeout`` (504): ffprobe did not answer within ``Limits.probe_timeout``;
- ``ffprobe_unavailable`` (500): the configured ffprobe is not there.

ffprobe is started with ``-protocol_whitelist file`` and a
``-format_whitelist`` of the allowed demuxers: a playlist or concat list is
rejected by ffprobe itself after format detection and before it would open any
file it names. ``limit_refusal`` reads what ffprobe and ffmpeg say on stderr when a
limit stops them (a frame over ``-max_pixels``, a stream past ``-max_streams``): a
limit on what the file holds, not on what its header declares.

An input with audio and no video (a podcast, a music track; cover art is a picture, not a
video) is a ``ProbeResult`` whose ``video_codec`` is None and whose frame size is 0: only the
outputs made of audio alone take it (``templates.check_inputs``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.child import ChildProcess, Timeouts, spawn_child
from gridnode.media.sandbox import ChildLimits, Sandbox, let_read, sandboxed_argv

_log = Logger()

# ffprobe's format_name (the demuxer's own name list) -> the demuxer to force
# with -f on the ffmpeg command line.
ALLOWED_FORMATS: dict[str, str] = {
    "mov,mp4,m4a,3gp,3g2,mj2": "mov",  # mp4, mov, 3gp
    "matroska,webm": "matroska",
    "avi": "avi",
    "mpegts": "mpegts",
    "flv": "flv",
    "mpeg": "mpeg",  # MPEG program stream (.mpg, .vob)
    "ogg": "ogg",
    # audio-only containers (an m4a is "mov,mp4,..." above)
    "mp3": "mp3",
    "flac": "flac",
    "wav": "wav",
}

# Formats that name other files or URLs: refused with their own message.
PLAYLIST_FORMATS = frozenset({"hls", "applehttp", "m3u8", "concat", "ffconcat", "dash", "webm_dash_manifest",
                              "image2", "imagepipe", "tee", "sdp", "rtsp", "data"})

# Video containers that ffmpeg reads but gridnode does not accept: these get
# unsupported_format, anything else that is not on the allowlist not_a_video.
_OTHER_VIDEO_FORMATS = frozenset({"asf", "mxf", "rm", "nut", "gxf", "ivf", "dv", "wtv", "h264", "hevc", "m4v",
                                  "mpegvideo", "rawvideo", "yuv4mpegpipe", "obu", "vc1", "av1", "mjpeg",
                                  "smjpeg", "rl2", "roq", "swf", "bink", "smk", "vivo", "xmv"})

_NOT_ON_WHITELIST = re.compile(r"\[([^\]@]+?) @ 0x[0-9a-fA-F]+\] Format not on whitelist")
# What libavutil's av_image_check_size2 and libavformat's avformat_new_stream log (at
# error level) when -max_pixels or -max_streams stops them.
_PIXELS = re.compile(r"Picture size (\d{1,9})x(\d{1,9}) exceeds specified max pixel count \d{1,19}")
_STREAMS = re.compile(r"Number of streams exceeds max_streams parameter \((\d{1,9})\)")

@dataclass(frozen=True)
class Limits:
    """What a node accepts. Defaults: 4 h (audio alone: 24 h), 8192x4320, 16 streams, 30 s to probe."""

    max_duration: float = 4 * 3600.0
    #: an input without video costs a hundredth of a video's time a second: a longer one is fine
    max_audio_duration: float = 24 * 3600.0
    max_pixels: int = 8192 * 4320
    max_streams: int = 16
    probe_timeout: float = 30.0
    # ffprobe's JSON is a few kB per stream; more means something odd.
    max_probe_output: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class ProbeResult:
    """The checked facts about one input file."""

    size: int
    format_name: str  # ffprobe's format_name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    container: str  # short label for users: mp4, mov, 3gp, matroska, webm, avi, mpegts, flv, mpeg, ogg
    demuxer: str  # what to force with ``-f`` on the ffmpeg input
    duration: float  # seconds
    width: int  # coded frame size of the first video stream (0 without video)
    height: int
    video_codec: str | None  # None: audio alone
    audio_codec: str | None
    has_audio: bool
    rotation: int  # clockwise degrees to display: 0, 90, 180 or 270
    display_width: int  # size as shown, after rotation and sample aspect ratio
    display_height: int
    stream_count: int
    name: str | None = field(default=None, compare=False)  # the user's file name, kept as data
    #: how long the first video and audio streams last (what gridnode converts), where the
    #: file says; None: only the file's ``duration`` is known
    streams_duration: float | None = None
    #: frames a second of the first video stream (its average), where the file says
    frame_rate: float | None = None
    #: the rate ffmpeg makes a constant-rate output of this video at (``nominal_rate``), exact
    rate: Fraction | None = None

    @property
    def has_video(self) -> bool:
        return self.video_codec is not None

    @property
    def converted_duration(self) -> float:
        """How long a whole output of this input lasts: a stream gridnode does not convert
        (a second audio track, a data track) may make the file longer than that."""
        return self.streams_duration or self.duration

    def to_json(self) -> dict[str, Any]:
        """The job JSON's ``input`` object (docs/api.md, "The job")."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update({
            "size": self.size,
            "format": self.container,
            "duration": round(self.duration, 3),
            "width": self.display_width,
            "height": self.display_height,
            "video_codec": self.video_codec,
            "audio_codec": self.audio_codec,
        })
        return out


def _error(code: str, status: int, message: str) -> GridnodeError:
    return GridnodeError(message, code=code, status=status)


def not_a_video(message: str = "this file is not a video or audio file gridnode can read; upload a "
                               "video or an audio file (m4a, mp3, flac, wav, ogg)") -> GridnodeError:
    return _error("not_a_video", 422, message)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out and out not in (float("inf"), float("-inf")) else None


def _rotation(stream: dict[str, Any]) -> int:
    """Clockwise display rotation, normalised to 0/90/180/270.

    ffprobe reports the display matrix as a counter-clockwise angle (what
    ffmpeg's autorotate negates); old files carry a clockwise ``rotate`` tag.
    """
    degrees: float | None = None
    for side in stream.get("side_data_list") or []:
        if isinstance(side, dict) and _float(side.get("rotation")) is not None:
            degrees = -float(side["rotation"])
            break
    if degrees is None:
        degrees = _float((stream.get("tags") or {}).get("rotate"))
    if degrees is None:
        return 0
    return int(round(degrees / 90.0)) % 4 * 90


def _sample_aspect(stream: dict[str, Any]) -> float:
    raw = str(stream.get("sample_aspect_ratio") or "1:1")
    try:
        num, den = (int(x) for x in raw.split(":"))
    except ValueError:
        return 1.0
    if num <= 0 or den <= 0:
        return 1.0
    ratio = num / den
    # Absurd ratios are broken metadata, not anamorphic video.
    return ratio if 0.25 <= ratio <= 4.0 else 1.0


def _container(format_name: str, fmt: dict[str, Any], video_codec: str | None) -> str:
    if format_name.startswith("mov,"):
        brand = str((fmt.get("tags") or {}).get("major_brand", "")).strip().lower()
        if video_codec is None:
            return "m4a"
        if brand.startswith("3g"):
            return "3gp"
        return "mov" if brand == "qt" else "mp4"
    if format_name == "matroska,webm":
        return "webm" if video_codec in ("vp8", "vp9", "av1") else "matroska"
    return format_name


def parse_probe(
    data: bytes | str | dict[str, Any], *, size: int, limits: Limits = Limits(), name: str | None = None
) -> ProbeResult:
    """Check ffprobe's JSON (``-show_format -show_streams``) against ``limits``."""
    if isinstance(data, dict):
        doc = data
    else:
        try:
            doc = json.loads(data)
        except ValueError:
            raise not_a_video() from None
    if not isinstance(doc, dict):
        raise not_a_video()
    fmt = doc.get("format")
    streams = doc.get("streams")
    if not isinstance(fmt, dict) or not isinstance(streams, list):
        raise not_a_video()
    streams = [s for s in streams if isinstance(s, dict)]
    format_name = str(fmt.get("format_name", ""))
    if format_name in PLAYLIST_FORMATS or set(format_name.split(",")) & PLAYLIST_FORMATS:
        raise _error("unsupported_format", 422,
                     f"playlists and file lists ({format_name}) are not accepted; upload the video file itself")
    demuxer = ALLOWED_FORMATS.get(format_name)
    if demuxer is None:
        raise _unsupported(format_name)
    if len(streams) > limits.max_streams:
        raise _error("too_many_streams", 422,
                     f"the file has {len(streams)} streams, at most {limits.max_streams} are accepted; "
                     "remove extra tracks and upload again")
    # Cover art is a "video" stream with one picture: not a video.
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    if not videos and not audios:
        raise not_a_video("the file has no video or audio stream; upload a video or audio file")
    video = videos[0] if videos else None
    first = video if video is not None else audios[0]
    width = height = 0
    if video is not None:
        width, height = int(video.get("width") or 0), int(video.get("height") or 0)
        if width <= 0 or height <= 0:
            raise not_a_video("the video stream has no frame size; the file may be damaged")
        if width * height > limits.max_pixels:
            raise _error("too_large", 413,
                         f"the video is {width}x{height}, larger than this node accepts "
                         f"({limits.max_pixels} pixels per frame); scale it down and upload again")
    duration = _float(fmt.get("duration"))
    if duration is None or duration <= 0:
        duration = _float(first.get("duration"))
    if duration is None or duration <= 0:
        raise _error("too_long", 413,
                     "the file does not say how long it is, so its length cannot be checked; "
                     "remux it (ffmpeg -i IN -c copy OUT) and upload again")
    most, what = (limits.max_duration, "video") if video is not None else (limits.max_audio_duration, "audio")
    if duration > most:
        raise _error("too_long", 413,
                     f"the {what} lasts {duration:.0f} s, longer than the {most:.0f} s "
                     "this node accepts; cut it and upload again")
    # The streams gridnode converts, as long as the file says they are, and never longer than it.
    stated = [d for d in (_float(s.get("duration")) for s in [*videos[:1], *audios[:1]]) if d is not None and d > 0]
    rotation = _rotation(video) if video is not None else 0
    shown_w = max(1, round(width * _sample_aspect(video))) if video is not None else 0
    display_w, display_h = (height, shown_w) if rotation in (90, 270) else (shown_w, height)
    video_codec = str(video.get("codec_name") or "unknown") if video is not None else None
    return ProbeResult(
        size=size,
        format_name=format_name,
        container=_container(format_name, fmt, video_codec),
        demuxer=demuxer,
        duration=duration,
        width=width,
        height=height,
        video_codec=video_codec,
        audio_codec=str(audios[0].get("codec_name") or "unknown") if audios else None,
        has_audio=bool(audios),
        rotation=rotation,
        display_width=display_w,
        display_height=display_h,
        stream_count=len(streams),
        name=name,
        streams_duration=min(max(stated), duration) if stated else None,
        frame_rate=_rate(video.get("avg_frame_rate")) if video is not None else None,
        rate=nominal_rate(video.get("r_frame_rate"), video.get("avg_frame_rate")) if video is not None else None,
    )


def _rate(value: Any) -> float | None:
    """ffprobe's ``"30000/1001"`` as a number; None when absent, zero or absurd."""
    try:
        num, den = (int(x) for x in str(value).split("/"))
    except ValueError:
        return None
    return num / den if den > 0 and 0 < num / den <= 1000 else None


def _fraction(value: Any) -> Fraction | None:
    try:
        num, den = (int(x) for x in str(value).split("/"))
    except ValueError:
        return None
    return Fraction(num, den) if 0 < num <= 1_000_000 and 0 < den <= 1_000_000 and num <= 1000 * den else None


def nominal_rate(real: Any, average: Any) -> Fraction | None:
    """The frame rate ffmpeg guesses for a stream (``av_guess_frame_rate``): ffprobe's
    ``r_frame_rate``, unless that is a time base's (over 210) while the average is a video's
    (under 70). A constant-rate output is made at it, one frame a slot."""
    real_rate, avg = _fraction(real), _fraction(average)
    if real_rate is not None and avg is not None and avg < 70 and real_rate > 210:
        return avg
    return real_rate or avg


def _unsupported(format_name: str) -> GridnodeError:
    names = set(format_name.split(","))
    if names & PLAYLIST_FORMATS:
        return _error("unsupported_format", 422,
                      f"playlists and file lists ({format_name}) are not accepted; upload the video file itself")
    if names & _OTHER_VIDEO_FORMATS:
        return _error("unsupported_format", 422,
                      f"the {format_name} format is not accepted; accepted containers are "
                      "mp4/mov, mkv/webm, avi, mpeg-ts, flv, mpeg-ps, ogg and 3gp; for audio alone m4a, mp3, "
                      "flac, wav and ogg")
    return not_a_video()


#: the demuxers ffprobe and ffmpeg may open, nested ones included
FORMAT_WHITELIST = ",".join(sorted(set(ALLOWED_FORMATS.values())))


def decoder_pixels(limits: Limits, frame: ProbeResult | None = None) -> int:
    """``-max_pixels``: ``limits.max_pixels`` as a decoder applies it. A decoder rounds a
    frame's width up to 64 before it compares (ffmpeg 5.1's buffers), so the limit allows 64
    columns of sqrt(max_pixels) rows (1 % at the default), and always the probed ``frame``:
    a frame a few columns over the limit may pass, never a larger one."""
    most = limits.max_pixels + 64 * math.isqrt(limits.max_pixels)
    if frame is not None:
        most = max(most, -(-frame.width // 64) * 64 * frame.height)
    return most


def input_options(limits: Limits, frame: ProbeResult | None = None) -> list[str]:
    """What ffprobe and ffmpeg are told before they open an input: the demuxer stops at
    ``max_streams`` streams, every decoder at a frame over ``max_pixels`` (each says so on
    stderr: ``limit_refusal``), so a header that lies is not believed."""
    return ["-max_streams", str(limits.max_streams), "-max_pixels", str(decoder_pixels(limits, frame))]


def probe_argv(ffprobe: str, path: str, limits: Limits = Limits()) -> list[str]:
    """The ffprobe command line; ``file:`` keeps a name with a colon from naming a protocol."""
    return [ffprobe, "-v", "error", "-of", "json", "-show_format", "-show_streams",
            "-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST, *input_options(limits),
            "file:" + os.path.abspath(path)]


class ProbeProcess(ChildProcess[tuple[bytes, bytes]]):
    """One ffprobe child (``child.ChildProcess``, stopped after ``limits.probe_timeout``):
    ``deferred`` fires with its stdout (at most ``limits.max_probe_output`` bytes) and
    the tail of its stderr, or fails with the refusal its end means."""

    def __init__(self, clock: IReactorTime, limits: Limits = Limits(), *,
                 killpg: Callable[[int, int], None] = os.killpg) -> None:
        super().__init__(clock, timeouts=Timeouts(idle=None, max_time=limits.probe_timeout), killpg=killpg,
                         label="ffprobe")
        self._out: list[bytes] = []
        self._out_size = 0
        self._err = b""
        self._max_output = limits.max_probe_output
        self._timeout = limits.probe_timeout

    def outReceived(self, data: bytes) -> None:
        self._out_size += len(data)
        if self._out_size > self._max_output:
            self.stop(_error("unsupported_format", 422, "the file has too many streams or too much metadata"))
            return
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err = (self._err + data)[-8192:]

    def outcome(self, reason: Failure) -> tuple[bytes, bytes] | Failure:
        if reason.check(ProcessDone):
            return b"".join(self._out), self._err
        return Failure(_probe_failure(self._err))

    def timeout_error(self, idle: bool) -> GridnodeError:
        return _error("timeout", 504, f"reading the file took longer than {self._timeout:.0f} s; "
                      "the file may be damaged")


def limit_refusal(text: str) -> GridnodeError | None:
    """The refusal a limit's message in ffprobe's or ffmpeg's stderr means, else None."""
    match = _PIXELS.search(text)
    if match:
        # The count in the line is the decoder's (decoder_pixels), not the node's limit.
        width, height = int(match.group(1)), int(match.group(2))
        return _error("too_large", 413,
                      f"a frame in the video is {width}x{height}, larger than this node accepts, whatever the "
                      "file's header says; scale it down and upload again")
    match = _STREAMS.search(text)
    if match:
        most = int(match.group(1))
        return _error("too_many_streams", 422,
                      f"the file has more than {most} streams, at most {most} are accepted; "
                      "remove extra tracks and upload again")
    return None


def _probe_failure(stderr: bytes) -> GridnodeError:
    text = stderr.decode("utf-8", "replace")
    limit = limit_refusal(text)
    if limit is not None:
        return limit
    match = _NOT_ON_WHITELIST.search(text)
    if match:
        return _unsupported(match.group(1))
    return not_a_video()


def probe_command(ffprobe: str, path: str, limits: Limits = Limits(), sandbox: Sandbox = Sandbox()) -> list[str]:
    """What the node starts to probe ``path``: ffprobe in its box (``sandbox``), seeing ``path``
    alone. It writes no file (FSIZE 0) and gets little memory and CPU time."""
    return sandboxed_argv(probe_argv(ffprobe, path, limits), sandbox.limits(ChildLimits(
        address_space=2 * 1024**3, cpu_seconds=int(limits.probe_timeout) + 5, file_size=0, open_files=64,
        processes=64, niceness=0), reads=[path]))


async def _probe(reactor: Any, path: str, ffprobe: str, limits: Limits, name: str | None,
                 sandbox: Sandbox) -> ProbeResult:
    size = os.stat(path).st_size
    if size == 0:
        raise not_a_video("the file is empty")
    if shutil.which(ffprobe) is None:
        # A node set up wrong must not blame the user's file.
        raise _error("ffprobe_unavailable", 500, f"this node cannot run ffprobe ({ffprobe}); tell its operator")
    proto = ProbeProcess(reactor, limits)
    let_read(sandbox.user, path)
    spawn_child(reactor, proto, probe_command(ffprobe, path, limits, sandbox), env=None)
    out, err = await proto.deferred
    if err.strip():
        _log.debug("ffprobe {path} said {stderr}", path=path, stderr=err.decode("utf-8", "replace")[-500:])
        # A limit may stop a demuxer or decoder without failing ffprobe (a stream past
        # -max_streams found while reading packets, a frame past -max_pixels).
        limit = limit_refusal(err.decode("utf-8", "replace"))
        if limit is not None:
            raise limit
    return parse_probe(out, size=size, limits=limits, name=name)


def probe(
    reactor: IReactorProcess, path: str, *, ffprobe: str = "ffprobe", limits: Limits = Limits(),
    name: str | None = None, sandbox: Sandbox = Sandbox(),
) -> Deferred[ProbeResult]:
    """Run ffprobe on ``path`` and check the result. Fails with ``GridnodeError``.

    ``reactor`` must provide IReactorProcess and IReactorTime. ``name`` is the
    user's file name, carried into ``ProbeResult.to_json()``.
    """
    return Deferred.fromCoroutine(_probe(reactor, path, ffprobe, limits, name, sandbox))
