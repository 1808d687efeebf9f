"""
Logging helpers.

``twistd --logger gridnode.logs.json_observer -n gridnode`` writes one JSON
object per line to standard output: ``time``, ``level``, ``namespace``,
``message`` (the formatted text) and every named field of the event whose
value is plain JSON (``job``, ``node``, ``peer``, ``state``, ``code``, ...),
which is what a log shipper wants.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

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
