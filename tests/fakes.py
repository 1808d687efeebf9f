"""
Fakes for unit tests, type-checked: mypy checks this module (pyproject's
files), so `FakeMedia` keeps the shape of `gridnode.media.interface.Media`
that the real converter has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed

from gridnode.errors import GridnodeError

if TYPE_CHECKING:
    from gridnode.media.interface import Media, Produced


@dataclass
class Preset:
    name: str
    template: str = ""


@dataclass
class Probe:
    def to_json(self) -> dict[str, Any]:
        return {"format": "mp4", "duration": 4.0, "width": 320, "height": 240}


@dataclass
class Output:
    name: str
    path: str
    size: int
    preset: str = "mp4-720p"
    content_type: str = "video/mp4"
    duration: float | None = None


class FakeMedia:
    """Presets ``mp4-720p`` and ``poster``; every probe passes (or fails with ``probe_error``);
    a run waits until the test calls ``finish(job_id)``, ``cancel(job_id)`` or ``fail(job_id, error)``,
    and the test plays its ``started`` and ``progress`` through ``hooks[job_id]``, and its
    ``waiting`` (held for scratch space) through ``waits[job_id]``, its chunk list through
    ``chunk_hooks[job_id]``; ``started_runs`` counts runs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: dict[str, Deferred[Any]] = {}
        self.hooks: dict[str, tuple[Callable[[], None], Callable[[float], None],
                                    Callable[[Sequence[Produced]], Deferred[Any]]]] = {}
        self.probe_error: GridnodeError | None = None
        self.waits: dict[str, Callable[[], None] | None] = {}
        #: job id -> (priority rank, tenant) it was queued with
        self.places: dict[str, tuple[int, str]] = {}
        self.started_runs: dict[str, int] = {}
        #: job id -> its run's ``chunks`` hook (a chunked job's chunk list)
        self.chunk_hooks: dict[str, Callable[[list[dict[str, Any]]], None] | None] = {}

    def parse_presets(self, text: str | None, spec: Sequence[Any] | None = None) -> list[Preset]:
        """Names as the real catalog takes them; an inline ``spec``: its outputs' names, any
        output without one refused with ``bad_spec``."""
        names = [] if text is None and spec is not None else (text if text is not None else "mp4-720p").split(",")
        for n in names:  # "" is no preset: refused
            if n not in ("mp4-720p", "poster"):
                raise GridnodeError(f"unknown preset {n}", code="unknown_preset", status=400)
        inline = []
        for i, item in enumerate(spec or []):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise GridnodeError(f"outputs[{i}].name: missing", code="bad_spec", status=400)
            inline.append(Preset(item["name"]))
        return [Preset(n, n) for n in names] + inline

    def probe(self, path: str) -> Deferred[Probe]:
        return fail(self.probe_error) if self.probe_error else succeed(Probe())

    def check(self, presets: list[Preset], info: Probe) -> None:
        pass

    def run(self, job_id: str, info: Probe, input_path: str, presets: list[Preset],
            started: Callable[[], None], progress: Callable[[float], None],
            finish: Callable[[Sequence[Produced]], Deferred[Any]],
            waiting: Callable[[], None] | None = None, rank: int = 1, tenant: str = "",
            chunks: Callable[[list[dict[str, Any]]], None] | None = None, job: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: None)
        self.chunk_hooks[job_id] = chunks
        self.places[job_id] = (rank, tenant)
        self.runs[job_id] = d
        self.hooks[job_id] = (started, progress, finish)
        self.waits[job_id] = waiting
        self.started_runs[job_id] = self.started_runs.get(job_id, 0) + 1
        return d

    def fail(self, job_id: str, error: GridnodeError) -> None:
        """The run ends with ``error`` (e.g. ``scratch_full``, as the converter ends it)."""
        self.runs[job_id].errback(error)

    def finish(self, job_id: str, duration: float | None = 3.96) -> None:
        """ffmpeg is done: one output, timed (a video) unless ``duration`` is None (a poster)."""
        out = self.folder / f"{job_id}.mp4"
        out.write_bytes(b"converted")
        stored = self.hooks[job_id][2]([Output("video.mp4", str(out), 9, duration=duration)])
        stored.chainDeferred(self.runs[job_id])

    def cancel(self, job_id: str) -> None:
        if job_id in self.runs and not self.runs[job_id].called:
            self.runs[job_id].errback(CancelledError())


if TYPE_CHECKING:
    _fake: type[Media[Preset, Probe]] = FakeMedia
