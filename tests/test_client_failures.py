"""Every failure the client meets becomes one coded line; no exception text reaches the user."""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TCPTimedOutError
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed, RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

from gridnode.client.api import NETWORK_ERRORS
from gridnode.client.failures import as_line, network_failure, user_error
from gridnode.client.output import Output
from gridnode.errors import GridnodeError


def wrapped(kind: type[Exception], inner: Exception) -> Exception:
    return kind([Failure(inner)])


CASES = [
    # a frozen node: the watchdog cancels the request while the body is still being sent
    (wrapped(RequestGenerationFailed, CancelledError()), "timed_out"),
    (wrapped(ResponseFailed, CancelledError()), "timed_out"),
    (CancelledError(), "timed_out"),
    (TCPTimedOutError(), "node_unavailable"),
    (ConnectionRefusedError(), "node_unavailable"),
    # cut mid-upload or before the answer
    (wrapped(RequestGenerationFailed, ConnectionLost("gone")), "connection_lost"),
    (wrapped(ResponseNeverReceived, ConnectionLost("gone")), "connection_lost"),
    (wrapped(RequestTransmissionFailed, ConnectionLost("gone")), "connection_lost"),
    (wrapped(ResponseFailed, ConnectionLost("gone")), "connection_lost"),
]


class NetworkFailureTests:
    @pytest.mark.parametrize(("error", "code"), CASES)
    def test_each_kind_has_its_code(self, error: Exception, code: str) -> None:
        """Refused, stalled and cut are told apart through Twisted's wrappers."""
        assert isinstance(error, NETWORK_ERRORS)
        assert network_failure(error)[0] == code
        line = as_line(user_error(error, network_errors=NETWORK_ERRORS))
        assert line.startswith(f"gridnode: {code}: ")
        assert "Failure" not in line and "Error" not in line and "<" not in line and "\n" not in line


class UserErrorTests:
    def test_node_errors_pass_through(self) -> None:
        """A node's coded 4xx/5xx keeps its code and message (on one line)."""
        e = GridnodeError("this file is not\na video", code="not_a_video", status=422)
        assert as_line(user_error(e)) == "gridnode: not_a_video: this file is not a video"

    def test_unknown_exception_is_internal_error_without_its_text(self) -> None:
        """A bug in the client: internal_error and what to do, not the exception's words."""
        line = as_line(user_error(KeyError("secret detail")))
        assert line.startswith("gridnode: internal_error: ") and "secret detail" not in line and "--debug" in line

    def test_os_error_names_the_file(self) -> None:
        line = as_line(user_error(PermissionError(13, "Permission denied", "/x/out")))
        assert line == "gridnode: os_error: Permission denied (/x/out); check the path and permissions"


class OutputTests:
    def test_json_mode_prints_one_object_on_stdout_only(self) -> None:
        """--json: the error is one JSON object on stdout; stderr stays empty."""
        stdout, stderr = io.StringIO(), io.StringIO()
        Output(True, stdout, stderr).failed(GridnodeError("m", code="timed_out"), file="a.mp4")
        assert stderr.getvalue() == ""
        assert json.loads(stdout.getvalue()) == {"event": "error", "error": {"code": "timed_out", "message": "m"},
                                                 "file": "a.mp4"}

    def test_text_mode_prints_one_line_on_stderr(self) -> None:
        stdout, stderr = io.StringIO(), io.StringIO()
        Output(False, stdout, stderr).failed(GridnodeError("m", code="timed_out"))
        assert (stdout.getvalue(), stderr.getvalue()) == ("", "gridnode: timed_out: m\n")


class HostileTextTests:
    def test_escapes_from_a_node_do_not_reach_the_terminal(self) -> None:
        """A node's message or code with an escape sequence or newlines stays one inert line."""
        line = as_line(GridnodeError("bad\x1b[2J\r\nthing", code="x\x07y"))
        assert line == "gridnode: x y: bad [2J thing" and line.isprintable()

    def test_a_job_of_any_shape_is_one_line(self) -> None:
        """status/--wait lines from a hostile or broken node: wrong types are left out, no exception."""
        from gridnode.client.cli import _job_line

        assert _job_line({"id": "J", "state": "transcoding", "progress": "lots", "error": "boom",
                          "outputs": "x"}) == "J  transcoding"
        assert _job_line({"id": "J\x1b[31m", "state": "done", "outputs": [{"name": "a.mp4"}, 3]}) == (
            "J [31m  done  a.mp4")

    def test_a_named_nodes_id_must_be_a_plain_id(self) -> None:
        """--node URL: the id its /health gives is used only if it is a plain id, else its URL."""
        from treq.testing import StubTreq
        from twisted.internet.defer import ensureDeferred
        from twisted.web.resource import Resource

        from gridnode.client.cli import _named_nodes

        class Health(Resource):
            isLeaf = True

            def __init__(self, node: object) -> None:
                super().__init__()
                self.node = node

            def render_GET(self, request: object) -> bytes:  # noqa: N802 - Twisted's name
                return json.dumps({"node": self.node, "state": "ok", "running": 1}).encode()

        for given, shown in (("n1", "n1"), ("evil\x1b[2J", "http://x.test"), (["n"], "http://x.test"),
                             ("a" * 200, "http://x.test")):
            got: list = []
            ensureDeferred(_named_nodes(("http://x.test",), StubTreq(Health(given)), 1.0)).addBoth(got.append)
            assert [n.id for n in got[0]] == [shown]
