"""
One base error with a stable code, an HTTP status and a message that tells
the user what to do next. Everything a user or a client sees goes through it.
"""

from __future__ import annotations

from typing import Any


class GridnodeError(Exception):
    """An error with a stable ``code`` (a short snake_case string)."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(GridnodeError):
    """A configuration key is unknown or has a bad value."""

    code = "bad_config"
    status = 400


class InvalidKey(GridnodeError):
    """A store key that could not be listed or deleted again by every tool."""

    code = "invalid_key"
    status = 400


class NotFound(GridnodeError):
    code = "not_found"
    status = 404


class PreconditionFailed(GridnodeError):
    """A conditional write or delete lost: the object changed under us."""

    code = "precondition_failed"
    status = 412


class StorageUnavailable(GridnodeError):
    """The store cannot be reached: an upload is refused rather than kept on this node's disk
    alone; the client retries after ``retry_after`` seconds (Retry-After) or uses another node."""

    code = "storage_unavailable"
    status = 503
    retry_after = 10


class Busy(GridnodeError):
    """No room for this work now: retry after ``retry_after`` seconds (Retry-After), or use another node."""

    code = "busy"
    status = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after
