"""
What the user reads when something fails: every failure becomes one coded line,
``gridnode: <code>: <what to try>`` (or one JSON object), never exception text.

Network failures reach the client as Twisted's wrappers (``ResponseFailed``,
``RequestGenerationFailed`` around a list of Failures, a bare ``CancelledError``
from a timeout); ``network_failure`` reads through them to the one kind that
matters to a user: refused, stalled or cut.
"""

from __future__ import annotations

from typing import Any

from gridnode.errors import GridnodeError

#: the client's own codes for failures that are not a node's answer
NODE_UNAVAILABLE = "node_unavailable"
TIMED_OUT = "timed_out"
CONNECTION_LOST = "connection_lost"
INTERNAL = "internal_error"

_HINTS = {
    NODE_UNAVAILABLE: "is the node running? `gridnode nodes` lists the live ones",
    TIMED_OUT: "the node stopped answering (frozen or overloaded); try again, or give it longer with --timeout",
    CONNECTION_LOST: "the connection broke; run the same command again (its Idempotency-Key makes that safe)",
}


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and what it wraps: Twisted's ``_WrapperException`` holds Failures in ``reasons``."""
    found = [e]
    for reason in getattr(e, "reasons", None) or []:
        value = getattr(reason, "value", reason)
        if isinstance(value, BaseException):
            found += _causes(value)
    return found


def network_failure(e: BaseException) -> tuple[str, str]:
    """(code, reason) for a failure on the wire: refused or unreachable, no answer in time, or
    the connection cut; the reason is short and names no exception class."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError

    causes = _causes(e)
    # A connection that never opened (a connect timeout included: the host is gone; a frozen
    # node's kernel still accepts) is "unavailable"; one that opened and then went silent stalled.
    if any(isinstance(c, (ConnectError, ConnectionRefusedError)) for c in causes):
        return NODE_UNAVAILABLE, "connection refused or unreachable"
    if any(isinstance(c, (CancelledError, TimeoutError, ConnectingCancelledError)) for c in causes):
        return TIMED_OUT, "no answer within the timeout (--timeout)"
    return CONNECTION_LOST, "the connection was cut before the answer came"


def hint(code: str) -> str:
    return _HINTS.get(code, "")


def user_error(e: BaseException, *, network_errors: tuple[type[BaseException], ...] = ()) -> GridnodeError:
    """Any exception as the one coded error the user sees; an unknown one is ``internal_error``
    (its detail goes to the log with --debug, never to this line)."""
    if isinstance(e, GridnodeError):
        return e
    if network_errors and isinstance(e, network_errors):
        code, reason = network_failure(e)
        return GridnodeError(f"{reason}; {hint(code)}", code=code, status=503)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return GridnodeError(f"{e.strerror or 'a file or network error'}{where}; check the path and permissions",
                             code="os_error", status=500)
    return GridnodeError("the client failed unexpectedly; run again with --debug and report what it prints",
                         code=INTERNAL, status=500)


def printable(text: str) -> str:
    """``text`` on one line with no control characters: what a node sends (a message, an id) is
    shown on the user's terminal, where an escape sequence would act."""
    return "".join(c if c.isprintable() else " " for c in str(text))


def as_line(error: GridnodeError) -> str:
    """The one line for stderr; a newline or escape in a node's message cannot make it two."""
    return f"gridnode: {printable(error.code)}: {' '.join(printable(error.message).split())}"


def as_json(error: GridnodeError, **extra: Any) -> dict[str, Any]:
    return {"event": "error", "error": {"code": error.code, "message": error.message}, **extra}
