"""
Logging helpers.

``twistd --logger gridnode.logs.json_observer -n gridnode`` writes one JSON
object per line to standard output: ``time``, ``level``, ``namespace``,
``message`` (the formatted text) and every named field of the event whose
value is plain JSON (``job``, ``node``, ``peer``, ``state``, ``code``, ...),
which is what a log shipper wants.

``--log-level`` (`filter_levels`) keeps events of that level and above for every observer twistd
set up. Twisted's per-connection lines ("Starting factory <OneShotFactory ...>", one per peer
connection: most of a busy node's log) count as debug, whatever level Twisted gave them.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogPublisher,
    PredicateResult,
    formatEvent,
)
from zope.interface import implementer

_PLAIN = (str, int, float, bool, type(None))


def event_as_dict(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in out or key in ("format", "message", "isError", "system"):
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["failure"] = failure.getTraceback()
    return out


def json_lines_observer(stream: IO[str]) -> ILogObserver:
    return FileLogObserver(stream, lambda event: json.dumps(event_as_dict(event), default=str) + "\n")


def json_observer() -> ILogObserver:
    """The factory twistd's ``--logger`` option calls."""
    return json_lines_observer(sys.stdout)


_LEVELS = frozenset(LogLevel.iterconstants())
#: Twisted's lines about single connections: debug for gridnode
CHATTER = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def level_of(event: dict[str, Any]) -> LogLevel:
    """The level an event is filtered at."""
    if event.get("log_format") in CHATTER:
        return LogLevel.debug
    level: LogLevel = event.get("log_level", LogLevel.info)
    return level if level in _LEVELS else LogLevel.info


@implementer(ILogFilterPredicate)
class LevelPredicate:
    """Keeps the events at ``least`` and above (`level_of`)."""

    def __init__(self, least: LogLevel) -> None:
        self.least = least

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        return PredicateResult.yes if level_of(event) >= self.least else PredicateResult.no


def filter_levels(publisher: LogPublisher, level: str) -> None:
    """Put every observer of ``publisher`` (twistd's, once logging began) behind a `LevelPredicate`.
    LogPublisher has no public list of its observers; its ``_observers`` is read here only."""
    predicate = LevelPredicate(LogLevel.levelWithName(level))
    for observer in list(getattr(publisher, "_observers", [])):
        publisher.removeObserver(observer)
        publisher.addObserver(FilteringLogObserver(observer, [predicate]))
