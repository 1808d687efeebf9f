"""
What the job service needs of the media side, as a `typing.Protocol`.

gridnode/converter.py's `Converter` is the real one; the unit tests drive
tests/fakes.py's `FakeMedia`. mypy checks both against `Media` (the fake
because tests/fakes.py is in mypy's files). The job service looks into
presets and probe results only through `Named` and `Described`; what else
they hold is the media side's own, handed back to it as it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

#: error codes the media side fails a run with when scratch space is short; the job service
#: never fails a job with them: ``SCRATCH_FULL`` (ffmpeg ran out: the job waits and runs
#: again), ``SCRATCH_WAIT`` (it waited its longest: the job goes to the pool)
SCRATCH_FULL = "scratch_full"
SCRATCH_WAIT = "scratch_wait"
#: the job record's ``waiting`` while the job waits for scratch space
WAITING_SCRATCH = "scratch_space"


class Named(Protocol):
    """A preset, as the job service sees it."""

    @property
    def name(self) -> str: ...

    @property
    def template(self) -> str:
        """The preset or template name it was asked by ("" for an output of an inline spec)."""
        ...


class Described(Protocol):
    """A probe result, as the job service sees it: what goes in the job's ``input``."""

    def to_json(self) -> dict[str, Any]: ...


class Produced(Protocol):
    """A file ffmpeg made, to be stored under ``outputs/<id>/<name>``."""

    @property
    def preset(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    @property
    def duration(self) -> float | None:
        """Seconds the output lasts, as measured (on each preset's first file; None for images)."""
        ...


PresetT = TypeVar("PresetT", bound=Named)
ProbeT = TypeVar("ProbeT", bound=Described)


class Media(Protocol[PresetT, ProbeT]):
    def parse_presets(self, text: str | None, spec: Sequence[Any] | None = None) -> list[PresetT]:
        """``"a,b"`` (presets and templates by name) and ``spec`` (a JSON list of output specs)
        -> the job's outputs; fails with ``unknown_preset`` or ``bad_spec``."""
        ...

    def probe(self, path: str) -> Deferred[ProbeT]:
        """The checked facts about an input; fails with ``not_a_video`` and kin."""
        ...

    def check(self, presets: list[PresetT], info: ProbeT) -> None:
        """Whether these outputs can be made of this input; fails with ``bad_spec``."""
        ...

    def run(self, job_id: str, info: ProbeT, input_path: str, presets: list[PresetT],
            started: Callable[[], None], progress: Callable[[float], None],
            finish: Callable[[Sequence[Produced]], Deferred[Any]],
            waiting: Callable[[], None] | None = None, rank: int = 1, tenant: str = "",
            chunks: Callable[[list[dict[str, Any]]], None] | None = None, job: Any = None) -> Deferred[Any]:
        """Queue the job (raises ``busy`` when the queue is full), served by priority ``rank``
        (gridnode/priority.py's) and among the other tenants' in turn; when a worker takes it,
        ``started()``, ffmpeg with ``progress(0..1)``, then ``finish(outputs)`` while the
        files are still there. Fires with what ``finish`` gave, or fails with ``cancelled``.
        ``waiting()``: the job is held for scratch space before it starts. Fails with
        ``SCRATCH_FULL`` when ffmpeg ran out of it (its partial outputs gone), and with
        ``SCRATCH_WAIT`` when the space never came. ``chunks(list)``: a job made in chunks, each
        chunk's state as it changes (the job's ``chunks``); ``job``: its record (whose chunks
        the pool may make)."""
        ...

    def cancel(self, job_id: str) -> object:
        """Stop the job, queued or running."""
        ...
