"""Streamed bodies on the client: a stream gone quiet is dropped from our side as a stall; on fakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from gridnode.client.bodies import StreamReader, download, manifest_entries, playlist_entries
from gridnode.errors import GridnodeError


class FakeResponse:
    """Delivers its body to a protocol; stopping the transport loses the connection, as TCP does."""

    def __init__(self) -> None:
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 - Twisted's name
        self.protocol = protocol
        response = self

        class Transport:
            def stopProducing(self) -> None:  # noqa: N802 - Twisted's name
                response.protocol.connectionLost(Failure(ConnectionDone()))

        protocol.makeConnection(Transport())


def outcome(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0] if out else None


class StreamReaderTests:
    def test_done_and_cut(self) -> None:
        """A body that ends is done; one whose connection is cut fails with the cut."""
        done = StreamReader(lambda b: None, Clock())
        done.connectionLost(Failure(ResponseDone()))
        assert outcome(done.finished) is None
        cut = StreamReader(lambda b: None, Clock())
        cut.connectionLost(Failure(ConnectionDone()))
        assert outcome(cut.finished).check(ConnectionDone)

    def test_a_bad_event_is_a_coded_error(self) -> None:
        def bad(data: bytes) -> None:
            raise ValueError("not json")

        response = FakeResponse()
        reader = StreamReader(bad, Clock())
        response.deliverBody(reader)
        reader.dataReceived(b"data: {")
        failure = outcome(reader.finished)
        assert failure.check(GridnodeError) and failure.value.code == "bad_stream"


class DownloadTests:
    def test_a_quiet_download_is_dropped_as_a_stall(self, tmp_path: Path) -> None:
        """Bytes keep it going; stall_timeout seconds of silence close it with CancelledError
        (told to the user as timed_out)."""
        clock, response = Clock(), FakeResponse()
        d = ensureDeferred(download(response, str(tmp_path / "x.part"), "x", 10, None, clock=clock,
                                    stall_timeout=3))
        ended: list[Any] = []
        d.addBoth(ended.append)
        for _ in range(5):
            clock.advance(2)
            response.protocol.dataReceived(b"ab")
        assert ended == []
        clock.advance(3)
        assert len(ended) == 1 and ended[0].check(CancelledError)
        assert (tmp_path / "x.part").read_bytes() == b"ab" * 5


class PlaylistEntriesTests:
    def test_cmaf_playlists_name_their_init_segments_and_audio_once(self, tmp_path: Path) -> None:
        master = tmp_path / "master.m3u8"
        master.write_text('#EXTM3U\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",URI="media_3.m3u8"\n'
                          '#EXT-X-STREAM-INF:BANDWIDTH=1\nmedia_0.m3u8\n#EXT-X-STREAM-INF:BANDWIDTH=1\nmedia_0.m3u8\n'
                          '#EXT-X-MAP:URI="../../etc/passwd"\nhttps://elsewhere/x.m4s\n/abs.m4s\n')
        assert playlist_entries("s/master.m3u8", str(master)) == ["s/media_3.m3u8", "s/media_0.m3u8"]
        media = tmp_path / "media_0.m3u8"
        media.write_text('#EXTM3U\n#EXT-X-MAP:URI="init-0.m4s"\n#EXTINF:4,\nseg-0-00001.m4s\n#EXT-X-ENDLIST\n')
        assert playlist_entries("s/media_0.m3u8", str(media)) == ["s/init-0.m4s", "s/seg-0-00001.m4s"]

    def test_a_storyboard_vtt_names_its_sheets(self, tmp_path: Path) -> None:
        vtt = tmp_path / "storyboard.vtt"
        vtt.write_text("WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nsheet-001.jpg#xywh=0,0,160,90\n\n"
                       "00:00:02.000 --> 00:00:04.000\nsheet-001.jpg#xywh=160,0,160,90\n\n"
                       "00:00:04.000 --> 00:00:06.000\n../../x.jpg#xywh=0,0,1,1\n")
        assert playlist_entries("b/storyboard.vtt", str(vtt)) == ["b/sheet-001.jpg"]


#: what ffmpeg's dash muxer writes for a ``dash`` output: a timeline per representation
TIMELINE_MPD = """<MPD><Period id="0" start="PT0.0S">
<AdaptationSet id="0" contentType="video">
<Representation id="0" mimeType="video/mp4" codecs="avc1.4d401e" bandwidth="900000">
<SegmentTemplate timescale="12800" initialization="init-$RepresentationID$.m4s"
 media="seg-$RepresentationID$-$Number%05d$.m4s" startNumber="1">
<SegmentTimeline><S t="0" d="51200" r="1" /><S d="13312" /></SegmentTimeline></SegmentTemplate></Representation>
<Representation id="../../x" mimeType="video/mp4"><SegmentTemplate initialization="$RepresentationID$.m4s"
 media="$Number$.m4s"><SegmentTimeline><S t="0" d="1" /></SegmentTimeline></SegmentTemplate></Representation>
<Representation id="9" mimeType="video/mp4"><SegmentTemplate initialization="https://elsewhere/i.m4s"
 media="/abs-$Number$.m4s"><SegmentTimeline><S t="0" d="1" r="99999999999" /></SegmentTimeline></SegmentTemplate>
</Representation></AdaptationSet></Period></MPD>
"""


class ManifestEntriesTests:
    def test_a_dash_output_names_its_init_and_every_timeline_segment(self, tmp_path: Path) -> None:
        """Two segments repeated and one more: three, numbered from startNumber; names that
        leave the output folder or point elsewhere are dropped; a huge repeat is bounded."""
        mpd = tmp_path / "manifest.mpd"
        mpd.write_text(TIMELINE_MPD)
        assert manifest_entries("d/manifest.mpd", str(mpd)) == [
            "d/init-0.m4s", "d/seg-0-00001.m4s", "d/seg-0-00002.m4s", "d/seg-0-00003.m4s",
            "d/1.m4s"]  # (the second's init, named by its id, would leave the folder)

    def test_a_cmaf_manifest_without_timelines_names_nothing(self, tmp_path: Path) -> None:
        """A CMAF's manifest (no timeline): its HLS playlists name the same files."""
        mpd = tmp_path / "manifest.mpd"
        mpd.write_text(TIMELINE_MPD.replace("<SegmentTimeline>", "<X>").replace("</SegmentTimeline>", "</X>"))
        assert manifest_entries("s/manifest.mpd", str(mpd)) == []
