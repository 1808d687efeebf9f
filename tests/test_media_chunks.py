"""
Split-and-stitch without ffmpeg: the plan of chunks (cover the video exactly, cuts on every
output's keyframe grid, when to chunk at all), each chunk's argv, the concat lists, and the
run of a chunked job's tasks through a fake runner (progress, a failed chunk redone alone).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer

from gridnode.errors import GridnodeError
from gridnode.media import chunks, stitch, storyboard
from gridnode.media.presets import default_output_limit
from gridnode.media.probe import ProbeResult, nominal_rate
from gridnode.media.split import SplitJob, Task, TasksFailed
from gridnode.media.templates import Catalog, parse_outputs

RATES = [Fraction(25), Fraction(30), Fraction(30000, 1001), Fraction(24000, 1001), Fraction(60), Fraction(50),
         Fraction(15), Fraction(8290, 301)]


def source(duration: float = 600.0, rate: Fraction | None = Fraction(25), audio: bool = True) -> ProbeResult:
    return ProbeResult(size=10_000_000, format_name="mov,mp4,m4a,3gp,3g2,mj2", container="mp4", demuxer="mov",
                       duration=duration, width=1280, height=720, video_codec="h264",
                       audio_codec="aac" if audio else None, has_audio=audio, rotation=0, display_width=1280,
                       display_height=720, stream_count=2 if audio else 1,
                       frame_rate=float(rate) if rate else None, rate=rate)


def outputs(*specs: dict[str, Any]) -> list[Any]:
    return parse_outputs(list(specs), watermarks=None)


MP4 = {"name": "v", "container": "mp4"}
LADDER = [{"size": 720, "kbps": 2800}, {"size": 360, "kbps": 800}]
CMAF = {"name": "c", "container": "cmaf", "audio": "none", "ladder": LADDER}


class PlanTests:
    @settings(max_examples=200, deadline=None)
    @given(duration=st.floats(0.05, 4 * 3600.0), rate=st.sampled_from(RATES),
           chunk_seconds=st.floats(1.0, 600.0), keyint=st.sampled_from([0, 1, 2, 2.5, 5]),
           cmaf=st.booleans())
    def test_chunks_cover_the_video_on_the_grid(self, duration: float, rate: Fraction, chunk_seconds: float,
                                                keyint: float, cmaf: bool) -> None:
        """The chunks cover the video exactly (from slot 0, each ending where the next starts,
        the last open), every cut is the slot the whole forces a keyframe on at a multiple of
        the grid, chunks are about ``chunk_seconds`` (the last may be short), tiny videos are one
        chunk."""
        specs = [{**MP4, "keyint": keyint} if keyint else MP4] + ([CMAF] if cmaf else [])
        presets = outputs(*specs)
        plan = chunks.plan(source(duration, rate), presets, chunk_seconds=chunk_seconds, chunk_over=0)
        step = chunks.cut_step(presets)
        assert plan.chunks[0].first == 0 and plan.chunks[-1].end is None
        for a, b in zip(plan.chunks, plan.chunks[1:], strict=False):
            assert a.end == b.first and a.first < b.first
        spacing = step * max(1, round(Fraction(chunk_seconds) / step))
        for i, c in enumerate(plan.chunks[1:], 1):
            assert c.first == chunks.keyframe_slot(i * spacing, rate)  # on the grid, spacing apart
        if duration < float(spacing) + 0.5:
            assert len(plan.chunks) == 1 and not plan.chunked
        if plan.chunked:  # the last chunk holds at least half a chunk (or a second) of the probed video
            assert duration - float(plan.chunks[-1].start) >= min(float(spacing) / 2, 1.0) - 1 / float(rate)

    def test_grid_is_the_common_multiple(self) -> None:
        """HLS 6 s, CMAF 4 s and a 2.5 s keyint cut only at multiples of 60 s; none asks: 1 s."""
        hls = {"name": "h", "container": "hls", "audio": "none", "ladder": LADDER}
        assert chunks.cut_step(outputs({**MP4, "keyint": 2.5}, CMAF, hls)) == 60
        assert chunks.cut_step(outputs({**MP4, "keyint": 2.5}, CMAF)) == 20
        assert chunks.cut_step(outputs(MP4)) == 1

    @given(seconds=st.integers(0, 100_000).map(lambda n: Fraction(n, 4)), rate=st.sampled_from(RATES))
    def test_keyframe_slot_is_ffmpegs(self, seconds: Fraction, rate: Fraction) -> None:
        """The slot is the first whose time, in doubles as ffmpeg's expression has it, reaches
        the grid point."""
        n = chunks.keyframe_slot(seconds, rate)
        tick = rate.denominator / rate.numerator
        assert n * tick >= float(seconds) and (n == 0 or (n - 1) * tick < float(seconds))

    @pytest.mark.parametrize("over, duration, why", [(None, 600.0, "off"), (300.0, 300.0, "not longer"),
                                                      (0.0, 600.0, "")])
    def test_when_to_chunk(self, over: float | None, duration: float, why: str) -> None:
        """chunk_over None: never; a video no longer than it: whole; 0: always."""
        plan = chunks.plan(source(duration), outputs(MP4), chunk_over=over)
        assert plan.chunked == (why == "") and why in plan.reason

    @pytest.mark.parametrize("spec, why", [
        ({**MP4, "name": "clip", "clip": {"start": 5}}, "clipped"),
        ({**CMAF, "name": "av1", "video": "av1"}, "AV1 ladder"),
        ({**CMAF, "name": "dash", "container": "dash"}, "this container"),
    ])
    def test_outputs_made_whole(self, spec: dict[str, Any], why: str) -> None:
        """A job with an output the stitch cannot join yet is made whole, and says why."""
        plan = chunks.plan(source(), outputs(MP4, spec), chunk_over=0)
        assert not plan.chunked and why in plan.reason

    def test_an_input_without_a_seek_index_is_made_whole(self) -> None:
        """An MPEG-TS (or AVI, FLV...) input: its seeks are estimates, so it is made whole."""
        plan = chunks.plan(dataclasses.replace(source(), demuxer="mpegts", container="mpegts"), outputs(MP4),
                           chunk_over=0)
        assert not plan.chunked and "mpegts" in plan.reason

    def test_a_storyboard_alone_is_made_whole(self) -> None:
        """Storyboard tiles come from the chunks of a video output; alone, the job is made whole."""
        plan = chunks.plan(source(), outputs({"name": "s", "container": "storyboard"}), chunk_over=0)
        assert not plan.chunked and "no output is a video" in plan.reason

    def test_storyboard_tiles_come_from_the_chunk_holding_their_time(self) -> None:
        """Each tile is made by the chunk whose time range holds the tile's time, once; the last
        chunk pads the end as the whole does; the stitch lays them out as the whole does."""
        board = storyboard.plan(100.0, (1280, 720), interval=3.0)
        plan = chunks.plan(source(100.0), outputs(MP4, {"name": "s", "container": "storyboard", "interval": 3}),
                           chunk_seconds=20, chunk_over=0)
        shares = [storyboard.tiles_of(board, float(c.start), c.cut.stop) for c in plan.chunks]
        assert shares[0] == (0, 7) and sum(n for _f, n in shares) == board.count
        assert all(a[0] + a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
        argv = chunks.chunk_argv("ffmpeg", source(100.0), "/in.mp4", "/w", outputs(
            MP4, {"name": "s", "container": "storyboard", "interval": 3}), plan.chunks[1])
        graph = argv[argv.index("-filter_complex") + 1]
        assert "select='gte(t\\,(selected_n+7)*3)',trim=end_frame=7," in graph and "tpad" not in graph
        assert argv[-3:] == ["-f", "matroska", "/w/s.mkv"]

    def test_unknown_rate_is_made_whole(self) -> None:
        """No frame rate: no slot grid to cut on."""
        plan = chunks.plan(source(rate=None), outputs(MP4), chunk_over=0)
        assert not plan.chunked and "frame rate" in plan.reason

    def test_nominal_rate(self) -> None:
        """ffprobe's r_frame_rate, unless it is a time base's beside a video's average."""
        assert nominal_rate("30000/1001", "8290/301") == Fraction(30000, 1001)
        assert nominal_rate("90000/1", "30/1") == 30
        assert nominal_rate("0/0", "25/1") == 25
        assert nominal_rate("junk", "0/0") is None


class ChunkArgvTests:
    def test_a_chunk_seeks_trims_and_forces_its_keyframes(self) -> None:
        """A middle chunk decodes from a whole second before its cut with every frame kept, puts
        the whole's timestamps back, keeps its slots, has no audio, and lists the keyframes the
        whole forces (no expression, which would count from the chunk's start)."""
        presets = outputs({**MP4, "keyint": 2}, CMAF)
        plan = chunks.plan(source(100.0, Fraction(30000, 1001)), presets, chunk_seconds=20, chunk_over=0)
        c = plan.chunks[1]
        argv = chunks.chunk_argv("ffmpeg", source(100.0, Fraction(30000, 1001)), "/in.mp4", "/w", presets, c)
        assert argv[argv.index("-ss") + 1] == "19" and argv[argv.index("-ss") + 2] == "-noaccurate_seek"
        graph = argv[argv.index("-filter_complex") + 1]
        assert graph.startswith("[0:v:0]setpts=PTS+19/TB,split=3")  # mp4 and two rungs
        assert graph.count(f"trim=start_pts={c.first}:end_pts={c.end},setpts=PTS-STARTPTS") == 3
        assert graph.count("fps=30000/1001") == 3
        assert "-c:a" not in argv and "0:a:0" not in argv
        dash = argv.index("dash")
        assert argv[dash - 5:dash - 1] == ["-output_ts_offset", f"{float(c.start):.6f}", "-format_options",
                                           "movflags=+frag_discont"]
        lists = [argv[i + 1] for i, a in enumerate(argv) if a == "-force_key_frames"]
        assert len(lists) == 2 and not any("expr" in x for x in lists)
        for text, step in zip(lists, (2, 4), strict=True):
            slots = [c.first + round(float(t) * 30000 / 1001) for t in text.split(",")]
            grid = {chunks.keyframe_slot(Fraction(step * n), Fraction(30000, 1001)) for n in range(60)}
            assert slots[0] == c.first and set(slots) <= grid
            assert len(slots) == 20 // step

    def test_an_hls_chunk_is_one_mp4_of_its_rungs(self) -> None:
        """An HLS ladder's chunk writes its rungs' video to one mp4 (the stitch segments them with
        the audio); the encoder options stay the whole's."""
        hls = outputs({"name": "h", "container": "hls", "ladder": [{**r, "audio_kbps": 64} for r in LADDER]})
        plan = chunks.plan(source(100.0), hls, chunk_seconds=20, chunk_over=0)
        argv = chunks.chunk_argv("ffmpeg", source(100.0), "/in.mp4", "/w", hls, plan.chunks[1])
        assert argv[-5:] == ["-f", "mp4", "-fs", str(default_output_limit(source(100.0))), "/w/h.mp4"]
        assert "hls" not in argv and argv.count("-map") == 2 and "-b:v:1" in argv
        audio = chunks.audio_argv("ffmpeg", source(100.0), "/in.mp4", "/w", hls)
        assert audio is not None and audio.count("0:a:0") == 2 and audio[-1] == "/w/audio-h.m4a"
        assert audio[audio.index("-b:a:1") + 1] == "64k"
        text = stitch.stitch("ffmpeg", "/w", "/o", hls[0], plan.chunks, audio=True, max_output_bytes=9,
                             rungs=["720p", "360p"]).argv
        assert text[text.index("-var_stream_map") + 1] == "v:0,a:0,name:720p v:1,a:1,name:360p"
        assert text[text.index("-c") + 1] == "copy" and text[-1] == "/o/h/%v/index.m3u8"

    def test_first_chunk_needs_no_seek(self) -> None:
        """Chunk 0 starts at the input's start: no seek, the whole's timestamps as they are."""
        plan = chunks.plan(source(100.0), outputs(MP4), chunk_seconds=20, chunk_over=0)
        argv = chunks.chunk_argv("ffmpeg", source(100.0), "/in.mp4", "/w", outputs(MP4), plan.chunks[0])
        assert "-ss" not in argv and "setpts=PTS+" not in argv[argv.index("-filter_complex") + 1]

    def test_cmaf_audio_pass(self) -> None:
        """A CMAF output's audio: the whole's rendition (cut before the video's end) in a
        manifest of its own, the only adaptation set, mapped by the pass itself."""
        presets = outputs({"name": "c", "container": "cmaf", "ladder": LADDER})
        a = chunks.audio_argv("ffmpeg", source(100.0), "/in.mp4", "/w", presets)
        assert a is not None and a[-1] == "/w/audio-c/manifest.mpd"
        assert a[a.index("-adaptation_sets") + 1] == "id=0,streams=a" and a.count("-map") == 1
        assert a[a.index("-af") + 1] == "atrim=end=99.950,asetpts=PTS-STARTPTS"

    def test_audio_argv_and_the_poster_in_its_chunk(self) -> None:
        """The audio pass makes each output's audio as the whole does (none: no pass); the poster
        is made by the chunk that holds its frame, on the whole's timestamps, alone."""
        presets = Catalog().parse("mp4-720p,webm-480p,poster")
        a = chunks.audio_argv("ffmpeg", source(), "/in.mp4", "/w", presets)
        assert a is not None and a.count("0:a:0") == 2 and "/w/audio-mp4-720p.m4a" in a
        assert "/w/audio-webm-480p.webm" in a and "libopus" in a and "-filter_complex" not in a
        assert chunks.audio_argv("ffmpeg", source(audio=False), "/in.mp4", "/w", presets) is None
        plan = chunks.plan(source(), presets, chunk_seconds=25, chunk_over=0)
        holder = chunks.poster_chunk(source(), presets[2], plan.chunks)
        assert holder.index == 2  # 60 s of 600: the third chunk of 25 s
        for c in plan.chunks:
            argv = chunks.chunk_argv("ffmpeg", source(), "/in.mp4", "/w", presets, c)
            graph = argv[argv.index("-filter_complex") + 1]
            assert ("/w/poster.jpg" in argv) == (c is holder)
            if c is holder:
                assert "trim=start=60.0,scale" in graph and "STARTPTS,trim=start=60" not in graph


class StitchTests:
    @given(starts=st.lists(st.integers(1, 10**7), min_size=1, max_size=40, unique=True),
           rate=st.sampled_from(RATES))
    def test_concat_durations_add_up_to_the_cuts(self, starts: list[int], rate: Fraction) -> None:
        """Each file starts where the list's durations put it: the cut, to the microsecond, however
        many chunks (no rounding error adds up)."""
        bounds = [0, *sorted(starts)]
        plan = [chunks.Chunk(i, b, bounds[i + 1] if i + 1 < len(bounds) else None, rate)
                for i, b in enumerate(bounds)]
        text = stitch.concat_list(outputs(MP4)[0], plan)
        durations = [line.split()[1] for line in text.splitlines() if line.startswith("duration")]
        total = 0
        for chunk, d in zip(plan[1:], durations, strict=True):
            whole, frac = d.split(".")
            total += int(whole) * 1_000_000 + int(frac)
            assert total == round(chunk.start * 1_000_000)

    def test_a_name_that_would_inject_a_directive_is_refused(self) -> None:
        """A concat list names files by output name: one that is not a template name never
        reaches the list (hostile: a newline would add a directive, a path another file)."""
        bad = dataclasses.replace(outputs(MP4)[0], name="v\nfile /etc/passwd")
        with pytest.raises(ValueError):
            stitch.concat_list(bad, [chunks.Chunk(0, 0, None, Fraction(25))])


class JoinCmafTests:
    def chunk(self, work: Path, index: int, playlist: str) -> Path:
        folder = work / stitch.chunk_dir(index) / "c"
        folder.mkdir(parents=True)
        (folder / "init-0.m4s").write_bytes(b"init")
        (folder / "seg-0-00001.m4s").write_bytes(b"seg")
        (folder / "media_0.m3u8").write_text(playlist)
        (folder / "manifest.mpd").write_text('<MPD mediaPresentationDuration="PT4.0S">\n\t</Period>\n</MPD>\n')
        (folder / "master.m3u8").write_text('#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1"\nmedia_0.m3u8\n')
        return folder

    def join(self, tmp_path: Path) -> None:
        preset = outputs({"name": "c", "container": "cmaf", "ladder": LADDER[:1], "audio": "none"})[0]
        plan = [chunks.Chunk(0, 0, 100, Fraction(25)), chunks.Chunk(1, 100, None, Fraction(25))]
        stitch.join_cmaf(str(tmp_path / "work"), str(tmp_path / "out"), preset, plan, 1, audio=False)

    def test_segments_renumbered_and_listed(self, tmp_path: Path) -> None:
        """Two chunks' segments become one list, numbered on, under the first's init segment."""
        good = "#EXTM3U\n#EXTINF:4.000000,\nseg-0-00001.m4s\n#EXT-X-ENDLIST\n"
        for i in range(2):
            self.chunk(tmp_path / "work", i, good)
        self.join(tmp_path)
        out = tmp_path / "out" / "c"
        assert sorted(p.name for p in out.iterdir()) == ["init-0.m4s", "manifest.mpd", "master.m3u8",
                                                         "media_0.m3u8", "seg-0-00001.m4s", "seg-0-00002.m4s"]
        assert "seg-0-00002.m4s" in (out / "media_0.m3u8").read_text()
        assert 'mediaPresentationDuration="PT8.0S"' in (out / "manifest.mpd").read_text()

    @pytest.mark.parametrize("entry", ["../../../etc/passwd", "/etc/passwd", "seg-0-00002.m4s", "seg-1-00001.m4s"])
    def test_a_playlist_naming_another_file_is_refused(self, tmp_path: Path, entry: str) -> None:
        """Hostile: a chunk's playlist (written by a child that read the user's file) that names
        anything but the segment its place says fails the join; nothing is moved for it."""
        self.chunk(tmp_path / "work", 0, "#EXTM3U\n#EXTINF:4.0,\nseg-0-00001.m4s\n")
        self.chunk(tmp_path / "work", 1, f"#EXTM3U\n#EXTINF:4.0,\n{entry}\n")
        with pytest.raises(GridnodeError) as e:
            self.join(tmp_path)
        assert e.value.code == "ffmpeg_failed"

    def test_a_planted_link_is_not_read(self, tmp_path: Path) -> None:
        """Hostile: a playlist that is a link to a node's file is not followed."""
        folder = self.chunk(tmp_path / "work", 0, "")
        self.chunk(tmp_path / "work", 1, "#EXTM3U\n#EXTINF:4.0,\nseg-0-00001.m4s\n")
        secret = tmp_path / "secret"
        secret.write_text("#EXTINF:4.0,\nseg-0-00001.m4s\n")
        (folder / "media_0.m3u8").unlink()
        (folder / "media_0.m3u8").symlink_to(secret)
        with pytest.raises(GridnodeError) as e:
            self.join(tmp_path)
        assert e.value.code == "ffmpeg_failed"

    def test_chunks_with_different_init_segments_are_refused(self, tmp_path: Path) -> None:
        """Chunks encoded with different parameters cannot share one init segment."""
        good = "#EXTM3U\n#EXTINF:4.0,\nseg-0-00001.m4s\n"
        self.chunk(tmp_path / "work", 0, good)
        (self.chunk(tmp_path / "work", 1, good) / "init-0.m4s").write_bytes(b"other")
        with pytest.raises(GridnodeError) as e:
            self.join(tmp_path)
        assert "init-0.m4s differs" in e.value.message


class SplitJobTests:
    def job(self, tmp_path: Path, run: Any, duration: float = 100.0) -> SplitJob:
        presets = Catalog().parse("mp4-720p,poster")
        plan = chunks.plan(source(duration), presets, chunk_seconds=25, chunk_over=0)
        return SplitJob(plan, source(duration), str(tmp_path / "in.mp4"), presets, str(tmp_path / "work"),
                        str(tmp_path / "out"), run, parallel=2)

    def test_tasks_run_then_stitch_and_progress_sums_chunks(self, tmp_path: Path) -> None:
        """Every chunk and the audio run before the stitch; progress is the chunks' weighted by
        their seconds, 1.0 only once stitched."""
        ran: list[str] = []
        reports: list[float] = []
        waiting: dict[str, defer.Deferred[None]] = {}

        def run(task: Task, progress: Any) -> defer.Deferred[None]:
            ran.append(task.key)
            if task.key == "chunk-0":  # the poster's chunk (10 % of 100 s)
                (tmp_path / "work" / "chunk-000" / "poster.jpg").write_bytes(b"jpeg")
            if task.kind == "chunk":
                progress(0.5)
            d: defer.Deferred[None] = defer.Deferred()
            waiting[task.key] = d
            return d

        job = self.job(tmp_path, run)
        job.on_progress = reports.append
        done = job.run()
        assert ran == ["chunk-0", "chunk-1"]  # two at a time
        assert job.progress() == pytest.approx(0.5 * 50 / 100)
        for key in ["chunk-0", "chunk-1", "chunk-2", "chunk-3", "audio-0"]:
            waiting.pop(key).callback(None)
        assert ran[-1] == "stitch-0" and (tmp_path / "work" / "concat-mp4-720p.ffconcat").exists()
        assert reports[-1] == 0.99 and all(a <= b for a, b in zip(reports, reports[1:], strict=False))
        waiting.pop("stitch-0").callback(None)
        assert self.successResultOf(done) == str(tmp_path / "out") and reports[-1] == 1.0
        assert (tmp_path / "out" / "poster.jpg").read_bytes() == b"jpeg"

    def test_a_failed_chunk_is_named_and_redone_alone(self, tmp_path: Path) -> None:
        """A chunk whose process fails is reported by its index; run() again redoes it alone."""
        ran: list[str] = []
        fail = {"chunk-2"}

        def run(task: Task, progress: Any) -> defer.Deferred[None]:
            ran.append(task.key)
            if task.key in fail:
                return defer.fail(GridnodeError("boom", code="ffmpeg_failed", status=422))
            return defer.succeed(None)

        job = self.job(tmp_path, run)
        (tmp_path / "work" / "chunk-000").mkdir(parents=True)
        (tmp_path / "work" / "chunk-000" / "poster.jpg").write_bytes(b"jpeg")
        failure = self.failureResultOf(job.run(), TasksFailed)
        assert list(failure.value.failed) == ["chunk-2"] and failure.value.code == "ffmpeg_failed"
        assert "stitch-0" not in ran
        fail.clear()
        ran.clear()
        self.successResultOf(job.run())
        assert ran == ["chunk-2", "stitch-0"]

    def test_a_chunk_short_of_frames_fails(self, tmp_path: Path) -> None:
        """A chunk whose ffmpeg says it wrote fewer frames than its slots (a seek that landed
        late) fails by its index, never stitched with a gap."""
        def run(task: Task, progress: Any) -> defer.Deferred[Any]:
            return defer.succeed(10 if task.key == "chunk-1" else None)

        failure = self.failureResultOf(self.job(tmp_path, run).run(), TasksFailed)
        assert list(failure.value.failed) == ["chunk-1"] and "made 10 frames of its 625" in str(failure.value)

    @pytest.mark.parametrize("joined, ok", [(2500, True), (1250, False)])
    def test_a_join_short_of_the_chunks_frames_fails(self, tmp_path: Path, joined: int, ok: bool) -> None:
        """The stitch must write every frame the chunks made: ffmpeg's concat ends quietly at a
        chunk's file it cannot open, which would make a short video look done."""
        def run(task: Task, progress: Any) -> defer.Deferred[Any]:
            if task.key == "chunk-0":
                (tmp_path / "work" / "chunk-000" / "poster.jpg").write_bytes(b"jpeg")
            return defer.succeed({"chunk": 625, "stitch": joined}.get(task.kind))

        done = self.job(tmp_path, run).run()
        if ok:
            self.successResultOf(done)
        else:
            failure = self.failureResultOf(done, TasksFailed)
            assert list(failure.value.failed) == ["stitch-0"] and failure.value.code == "ffmpeg_failed"
            assert "joined 1250 video frames of the chunks' 2500" in str(failure.value)

    # trial-style helpers on a plain pytest class
    @staticmethod
    def successResultOf(d: defer.Deferred[Any]) -> Any:  # noqa: N802 - trial's name
        out: list[Any] = []
        d.addBoth(out.append)
        assert out and not isinstance(out[0], Exception), out
        from twisted.python.failure import Failure

        assert not isinstance(out[0], Failure), out[0]
        return out[0]

    @staticmethod
    def failureResultOf(d: defer.Deferred[Any], kind: type) -> Any:  # noqa: N802 - trial's name
        from twisted.python.failure import Failure

        out: list[Any] = []
        d.addBoth(out.append)
        assert out and isinstance(out[0], Failure) and out[0].check(kind), out
        return out[0]
