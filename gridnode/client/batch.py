"""
A batch of files through the pool: at most ``parallel`` at a time, each on the
node its own upload chooses, so a batch spreads over the pool instead of
waiting for one job before the next upload. A file that fails is named and the
rest carry on; the batch fails if any file did.

The work for one file is passed in (``one``), and so is the clock: this module
only schedules and keeps the table.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gridnode.client.failures import printable
from gridnode.errors import GridnodeError

#: the final states of a file in the batch that are not failures
GOOD = {"done", "queued", "transcoding", "storing"}


@dataclass
class FileResult:
    """One file's row of the summary: its job and node once uploaded, its last state, and the
    error that stopped it (if any)."""

    path: str
    job: str | None = None
    node: str | None = None
    state: str = "pending"
    seconds: float = 0.0
    error: GridnodeError | None = None
    outputs: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.error is not None or self.state not in GOOD

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path, "job": self.job, "node": self.node, "state": self.state,
                "seconds": round(self.seconds, 1), "outputs": self.outputs,
                "error": None if self.error is None else {"code": self.error.code, "message": self.error.message}}


async def run_batch(paths: list[str], one: Callable[[int, FileResult], Awaitable[None]], *, parallel: int,
                    clock: Callable[[], float], to_error: Callable[[BaseException], GridnodeError],
                    on_failed: Callable[[FileResult], None] | None = None) -> list[FileResult]:
    """Run ``one(index, result)`` for every file, at most ``parallel`` at once; ``one`` fills its
    result as it goes. Whatever it raises becomes that file's error (``to_error``), reported once
    (``on_failed``); the other files carry on. Results come back in the files' order."""
    from twisted.internet.defer import DeferredSemaphore, gatherResults

    results = [FileResult(p) for p in paths]
    gate = DeferredSemaphore(max(1, parallel))

    async def guarded(index: int) -> None:
        result = results[index]
        started = clock()
        try:
            await one(index, result)
        except Exception as e:  # noqa: BLE001 - one file's failure is its row, not the batch's end
            result.error = to_error(e)
            if result.state in GOOD or result.state == "pending":
                result.state = "error"
        finally:
            result.seconds = clock() - started
        if result.failed and on_failed is not None:
            on_failed(result)

    await gatherResults([gate.run(guarded, i) for i in range(len(paths))])
    return results


def table(results: list[FileResult]) -> str:
    """The summary: one row a file, columns aligned, a header row."""
    rows = [["FILE", "JOB", "NODE", "STATE", "SECONDS", "ERROR"]]
    for r in results:
        rows.append([os.path.basename(r.path) or r.path, r.job or "-", r.node or "-", r.state,
                     f"{r.seconds:.1f}", r.error.code if r.error is not None else ""])
    return align(rows)


def align(rows: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def result_folder(output: str, job_id: str) -> str:
    """Where ``fetch JOB DIR`` puts a job's results: ``DIR/<job>/`` (a job id is a ULID: never a
    path of its own)."""
    return os.path.join(output, os.path.basename(job_id))


def upload_folder(output: str, path: str, job_id: str, paths: list[str]) -> str:
    """Where ``upload --output DIR`` puts a file's results: ``DIR/<file name without extension>/``,
    the name a user looks for; two files of the batch with the same name get ``<name>-<job>``
    each, so neither overwrites the other."""
    stem = _stem(path)
    shared = sum(1 for p in paths if _stem(p) == stem) > 1
    return os.path.join(output, f"{stem}-{os.path.basename(job_id)}" if shared else stem)


def _stem(path: str) -> str:
    name = os.path.basename(path.rstrip(os.sep)) or "input"
    return os.path.splitext(name)[0] or name
