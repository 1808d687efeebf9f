"""
Request and response bodies for the client: an upload file whose reads are
counted (a stalled upload is seen by its count standing still), a streamed
response read as it comes and closable from our side, and result downloads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from gridnode.errors import GridnodeError


class CountingFile:
    """A file whose reads are counted, so a stalled upload can be seen."""

    def __init__(self, f: IO[bytes], on_read: Callable[[int], None]) -> None:
        self.f = f
        self.on_read = on_read

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.on_read(len(data))
        return data

    def seek(self, *args: Any) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


class StreamReader(Protocol):
    """A streamed response body handed to ``on_data`` as it comes; ``abort()`` closes the
    connection (a frozen node never closes it), and ``finished`` then fails with CancelledError:
    the node stalled, which the user is told as ``timed_out``. ``quiet()``: seconds since the last
    byte (or since ``heard()``), on the clock given."""

    def __init__(self, on_data: Callable[[bytes], None], clock: Any) -> None:
        self.on_data = on_data
        self.clock = clock
        self.finished: Deferred[None] = Deferred()
        self.last = clock.seconds()
        self.stalled = False
        self.checking = False

    def quiet(self) -> float:
        return float(self.clock.seconds() - self.last)

    def heard(self) -> None:
        self.last = self.clock.seconds()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.heard()
        try:
            self.on_data(data)
        except Exception:  # noqa: BLE001 - a bad event ends the stream; the caller polls instead
            if not self.finished.called:
                self.finished.errback(GridnodeError("the node sent a stream gridnode cannot read",
                                                    code="bad_stream", status=502))
            self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        if self.finished.called:
            return
        if self.stalled:
            self.finished.errback(CancelledError())
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)

    def abort(self) -> None:
        self.stalled = True
        # the body's transport is a producer proxy: stopping it closes the connection
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()


_URI = re.compile(r'URI="([^"]+)"')


def playlist_entries(name: str, path: str) -> list[str]:
    """The files an HLS playlist (its lines, and the ``URI=`` of its tags: CMAF's init segments
    and audio rendition) or a storyboard's WebVTT (its cues' sheets) names, relative to it,
    each once (never above the output folder)."""
    base = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    vtt = name.endswith(".vtt")
    out: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if vtt:
                found = [line.split("#", 1)[0]] if "#xywh=" in line else []
            elif line.startswith("#"):
                found = _URI.findall(line)
            else:
                found = [line] if line else []
            for item in found:
                if item and "://" not in item and not item.startswith("/"):
                    entry = os.path.normpath(base + item).replace(os.sep, "/")
                    if not entry.startswith("..") and entry not in out:
                        out.append(entry)
    return out


_REPRESENTATION = re.compile(r'<Representation\b[^>]*?\bid="([^"]{1,40})"[^>]*>(.*?)</Representation>', re.S)
_SEGMENT_TEMPLATE = re.compile(r"<SegmentTemplate\b([^>]*)>")
_ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
_TIMELINE_ENTRY = re.compile(r"<S\b([^>]*)/?>")
_NUMBER = re.compile(r"\$Number(?:%0(\d)d)?\$")
#: the most segments a manifest may name for one representation (a week of 4 s segments)
MAX_SEGMENTS = 151_200


def manifest_entries(name: str, path: str, most: int = 1024 * 1024) -> list[str]:
    """The files a DASH manifest with segment timelines (a ``dash`` output's) names, relative
    to it, each once: every representation's init segment and numbered segments. A manifest
    without timelines (a CMAF's: its HLS playlists name the same files) names none here."""
    base = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(most)
    out: list[str] = []
    for rep_id, body in _REPRESENTATION.findall(text):
        template = _SEGMENT_TEMPLATE.search(body)
        if template is None or "<SegmentTimeline" not in body:
            continue
        attrs = dict(_ATTRIBUTE.findall(template.group(1)))
        count = 0
        for entry in _TIMELINE_ENTRY.findall(body):
            repeat = dict(_ATTRIBUTE.findall(entry)).get("r", "0")
            count += 1 + (int(repeat) if repeat.isascii() and repeat.isdigit() else 0)
        start = attrs.get("startNumber", "1")
        first = int(start) if start.isascii() and start.isdigit() else 1
        names = [attrs.get("initialization", "")]
        media = attrs.get("media", "")
        width = _NUMBER.search(media)
        digits = int(width.group(1) or 1) if width else 1
        names += [_NUMBER.sub(f"{n:0{digits}d}", media) for n in range(first, first + min(count, MAX_SEGMENTS))]
        for item in names:
            item = item.replace("$RepresentationID$", rep_id)
            if item and "$" not in item and "://" not in item and not item.startswith("/"):
                entry_name = os.path.normpath(base + item).replace(os.sep, "/")
                if not entry_name.startswith("..") and entry_name not in out:
                    out.append(entry_name)
    return out


async def read_stream(response: Any, on_data: Callable[[bytes], None], clock: Any,
                      on_tick: Callable[[StreamReader], None]) -> None:
    """Read ``response``'s body into ``on_data``; ``on_tick(reader)`` runs every second meanwhile
    (it may ``abort()`` a stream that went quiet)."""
    reader = StreamReader(on_data, clock)
    response.deliverBody(reader)
    guard = LoopingCall(on_tick, reader)
    guard.clock = clock
    guard.start(1.0, now=False)
    try:
        await reader.finished
    finally:
        if guard.running:
            guard.stop()


async def download(response: Any, path: str, name: str, size: int,
                   on_progress: Callable[[str, int, int], None] | None, *, clock: Any, stall_timeout: float) -> int:
    """The body into ``path``; a download silent for ``stall_timeout`` seconds is dropped."""
    got = 0
    with open(path, "wb") as f:
        def write(data: bytes) -> None:
            nonlocal got
            f.write(data)
            got += len(data)
            if on_progress is not None:
                on_progress(name, got, size)

        def tick(reader: StreamReader) -> None:
            if reader.quiet() >= stall_timeout:
                reader.abort()

        await read_stream(response, write, clock, tick)
    return got
