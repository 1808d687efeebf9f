"""
Job priorities: their names, how a request names one, and the two rules that read a node's
jobs by priority: which new job it admits (the 503 rule) and how long a new job would wait
there (the figures its load publishes, which clients rank nodes by).

A node serves its queue highest priority first (gridnode/media/fair.py), so a job of
priority ``p`` waits only behind the running jobs and the queued ones of ``p`` or higher:
that is what both rules count. A node full of low-priority work still admits a normal or high
job, up to a bound that holds whatever the priorities: ``workers + 2 x queue`` jobs.

No I/O, nothing of the server: the command line client and the upload page's rule
(gridnode/web/static/app.js) are the same as the node's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gridnode.errors import GridnodeError

HIGH, NORMAL, LOW = "high", "normal", "low"
#: highest first: a priority's rank is its index
PRIORITIES = (HIGH, NORMAL, LOW)
DEFAULT = NORMAL
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


def bad_priority(text: object) -> GridnodeError:
    return GridnodeError(f"priority {str(text)[:40]!r} is not one of {', '.join(PRIORITIES)}; leave it out for "
                         f"{DEFAULT}", code="bad_priority", status=400)


def parse(text: str | None) -> str:
    """A request's priority (None: the default); anything else is a ``400 bad_priority``."""
    if text is None:
        return DEFAULT
    value = text.strip().lower()
    if value not in RANK:
        raise bad_priority(text)
    return value


def ahead_of(priority: str, held: Mapping[str, int]) -> int:
    """Of a node's jobs by priority, those a job of ``priority`` is counted behind."""
    return sum(n for name, n in held.items() if name in RANK and RANK[name] <= RANK[priority])


def admits(priority: str, held: Mapping[str, int], uploading: int, workers: int, queue: int) -> bool:
    """Whether a node holding ``held`` jobs by priority and ``uploading`` bodies not yet jobs takes
    a new job of ``priority``: the jobs of that priority or higher, with the uploads (whose priority
    counts once they are jobs), stay under ``workers + queue``, and all of them under
    ``workers + 2 x queue``."""
    total = sum(held.values()) + uploading
    return ahead_of(priority, held) + uploading < workers + queue and total < workers + 2 * queue


# -- the load figures by priority (docs/api.md, "GET /health")

def figure(kind: str, priority: str) -> str:
    """The name of a load figure of one priority: ``queued_high``, ``work_low``..."""
    return f"{kind}_{priority}"


def load_figures(queued: Iterable[tuple[str, float]]) -> dict[str, float]:
    """``queued_<p>`` (jobs waiting for a worker) and ``work_<p>`` (their seconds of input) of each
    priority, from the queued jobs' (priority, seconds of input left)."""
    out = {figure(kind, p): 0.0 for p in PRIORITIES for kind in ("queued", "work")}
    for priority, seconds in queued:
        if priority in RANK:
            out[figure("queued", priority)] += 1
            out[figure("work", priority)] += seconds
    return {k: round(v, 1) for k, v in out.items()}


def seen_by(priority: str, load: Mapping[str, float]) -> dict[str, float]:
    """``load`` as a new job of ``priority`` sees it: queued jobs of lower priorities (and their
    work) left out, since they wait behind it. A load without the figures (an older node) is
    taken whole."""
    lower = PRIORITIES[RANK[priority] + 1:]
    if not lower or not all(figure("queued", p) in load for p in lower):
        return dict(load)
    out = dict(load)
    out["queued"] = max(0.0, load.get("queued", 0.0) - sum(load[figure("queued", p)] for p in lower))
    if "work" in load:
        out["work"] = max(0.0, load["work"] - sum(load.get(figure("work", p), 0.0) for p in lower))
    return out
