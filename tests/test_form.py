"""
Form uploads (gridnode/web/form.py): ``POST /jobs`` with a multipart/form-data body, its file part
streamed to the spool. The parser glue on a real spool file; a whole node's resource tree in memory
(tests/test_access.py's MemoryNode: fakes, no sockets) for what a client sees, malformed forms
first. A real curl against a real node: tests/test_form_nodes.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gridnode.errors import GridnodeError
from gridnode.spool import SpoolFile
from gridnode.web.form import FIELD_BYTES, FORM_OVERHEAD, FormBody, boundary_of
from tests.test_access import ALICE, MemoryNode, bearer, code, mint
from tests.test_tus import parse_answer


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())

BOUNDARY = "------------------------d74496d66958873e"
VIDEO = bytes(range(256)) * 40 + b"\r\n--" + b"-" * 30  # a near-boundary inside the file


def part(name: str, value: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}"
    if filename is not None:
        head += "Content-Type: application/octet-stream\r\n"
    return head.encode() + b"\r\n" + value + b"\r\n"


def form(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class BoundaryTests:
    def test_content_types(self) -> None:
        """A form's boundary; None for a raw body (whatever its type); bad_form for a form without a
        usable boundary and for other multipart types, before the body."""
        assert boundary_of(f"multipart/form-data; boundary={BOUNDARY}".encode()) == BOUNDARY
        assert boundary_of(b'multipart/form-data; boundary="a b"') == "a b"
        for raw in (None, b"video/mp4", b"application/x-www-form-urlencoded", b"application/octet-stream"):
            assert boundary_of(raw) is None
        for bad in (b"multipart/form-data", b"multipart/form-data; boundary=", b"multipart/mixed; boundary=x",
                    b"multipart/form-data; boundary=" + b"x" * 71):
            with pytest.raises(GridnodeError) as e:
                boundary_of(bad)
            assert e.value.code == "bad_form" and "curl -F file=@" in e.value.message


class FormBodyTests:
    def sink(self, tmp_path: Path) -> FormBody:
        return FormBody(SpoolFile(str(tmp_path / "upload")), BOUNDARY)

    @settings(max_examples=60, deadline=None)
    @given(cuts=st.lists(st.integers(min_value=0, max_value=12_000), max_size=12))
    def test_any_chunking_gives_the_same_file(self, tmp_path_factory: pytest.TempPathFactory,
                                              cuts: list[int]) -> None:
        """However the body arrives in pieces, the spool file holds exactly the file part's bytes (a
        boundary look-alike inside it included) and the fields are read."""
        body = form(part("name", b"holiday.mov"), part("file", VIDEO, "clip.mp4"), part("presets", b"hls,poster"))
        sink = self.sink(tmp_path_factory.mktemp("form"))
        at = 0
        for cut in sorted(c for c in cuts if c < len(body)) + [len(body)]:
            sink.write(body[at:cut])
            at = cut
        spool = sink.finish()
        spool.close()
        assert Path(spool.path).read_bytes() == VIDEO
        assert sink.fields == {"name": "holiday.mov", "presets": "hls,poster"} and sink.filename == "clip.mp4"

    @pytest.mark.parametrize(("body", "says"), [
        (form(part("file", b"a", "a.mp4"), part("other", b"b", "b.mp4")), "more than one file part"),
        (form(part("presets", b"hls")), "no file part"),
        (form(part("file", b"a", "a.mp4"), end=False), "ended before its closing boundary"),
        (form(part("file", b"a", "a.mp4", extra="X-Long: " + "x" * 5000 + "\r\n")), "malformed"),
        (form(part("presets", b"x" * (FIELD_BYTES + 1)), part("file", b"a", "a.mp4")), "over 4096 bytes"),
        (form(part("name", b"a"), part("name", b"b"), part("file", b"a", "a.mp4")), "name twice"),
        (b"no boundary anywhere\r\n" * 10, "ended before its closing boundary"),
        (b"x" * (FORM_OVERHEAD + 1), "beside its file"),
        (form(part("file", b"a", "a.mp4")) + b"epilogue" * (FORM_OVERHEAD // 8), "beside its file"),
        (form(part("junk", b"j" * (FORM_OVERHEAD + 1)), part("file", b"a", "a.mp4")), "beside its file"),
    ], ids=["two files", "no file", "truncated", "long header", "long field", "field twice", "no boundary",
            "long preamble", "long epilogue", "long other field"])
    def test_malformed(self, tmp_path: Path, body: bytes, says: str) -> None:
        """Each malformed kind is bad_form, with a message naming it and saying what to send."""
        sink = self.sink(tmp_path)
        with pytest.raises(GridnodeError) as e:
            sink.write(body)
            sink.finish()
        assert e.value.code == "bad_form" and e.value.status == 400
        assert says in e.value.message and "raw video as the body" in e.value.message

    def test_limit_holds_on_the_file_part(self, tmp_path: Path) -> None:
        """The spool file's limit counts the file part's bytes: a form whose file fits passes even
        though the body is larger; one byte more is too_large."""
        fits = FormBody(SpoolFile(str(tmp_path / "a"), limit=len(VIDEO)), BOUNDARY)
        fits.write(form(part("name", b"n" * 100), part("file", VIDEO, "clip.mp4")))
        assert fits.finish().size == len(VIDEO)
        over = FormBody(SpoolFile(str(tmp_path / "b"), limit=len(VIDEO) - 1), BOUNDARY)
        with pytest.raises(GridnodeError) as e:
            over.write(form(part("file", VIDEO, "clip.mp4")))
        assert e.value.code == "too_large"


class FormUploadTests:
    def post(self, node: MemoryNode, body: bytes, query: str = "", headers: dict[str, str] | None = None,
             ) -> tuple[int, str, dict[str, object]]:
        r = node.request("POST", f"/jobs{query}", {**ALICE, **FORM, **(headers or {})}, body)
        payload = r.json()
        return r.status_code, payload["error"]["code"] if r.status_code >= 400 else "", payload

    def test_a_form_becomes_a_job(self, node: MemoryNode) -> None:
        """The file part is the job's input: its size and sha256 (Upload-Checksum checked on it too);
        the form's presets and name are used; the query string wins over a field; without a name
        the file part's file name is the job's."""
        digest = hashlib.sha256(VIDEO).digest()
        import base64
        checksum = {"Upload-Checksum": "sha256 " + base64.b64encode(digest).decode()}
        body = form(part("presets", b"poster"), part("name", b"field.mov"), part("file", VIDEO, "clip.mp4"))
        status, _, job = self.post(node, body, headers=checksum)
        assert status == 201, job
        assert job["sha256"] == digest.hex() and job["input"]["size"] == len(VIDEO)  # type: ignore[index]
        assert job["presets"] == ["poster"] and job["name"] == "field.mov"
        status, _, job = self.post(node, body, query="?presets=mp4-720p&name=query.mov")
        assert status == 201, job
        assert job["presets"] == ["mp4-720p"] and job["name"] == "query.mov"
        status, _, job = self.post(node, form(part("file", VIDEO, "C:\\videos\\win.mov")))
        assert status == 201 and job["name"] == "win.mov"  # the file's name, its folders left out

    def test_malformed_forms_are_refused_and_leave_nothing(self, node: MemoryNode) -> None:
        """No boundary (before the body), two files, no file, a truncated form: 400 bad_form; no
        spool file is left and the node's upload slots are free again."""
        one = part("file", VIDEO, "clip.mp4")
        cases = [(b"x", {"Content-Type": "multipart/form-data"}), (form(one, one), {}),
                 (form(part("name", b"n")), {}), (form(one, end=False), {})]
        for body, headers in cases:
            status, error, _ = self.post(node, body, headers=headers)
            assert (status, error) == (400, "bad_form"), body[:60]
        assert node.spooled() == [] and not node.jobs.uploading
        counted = node.jobs.metrics.registry.get_sample_value("gridnode_upload_rejections_total",
                                                              {"reason": "bad_form"})
        # the metric operators watch (a refusal mid-body is counted by the site's on_refused, which
        # the assembly wires and this tree in memory does not: the two files here)
        assert counted == len(cases) - 1

    def test_a_chunked_form_cut_short_is_bad_form(self, node: MemoryNode) -> None:
        """A chunked body ends where its last chunk says: a form cut before its closing boundary is
        bad_form, not a job of the bytes that came."""
        body = form(part("file", VIDEO, "clip.mp4"), end=False)
        head = (f"POST /jobs HTTP/1.1\r\nHost: gridnode\r\nTransfer-Encoding: chunked\r\n"
                f"Authorization: {ALICE['Authorization']}\r\nContent-Type: {FORM['Content-Type']}\r\n\r\n").encode()
        answer = parse_answer(node.raw("POST", "/jobs", data=head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)),
                              "POST")
        assert code(answer) == (400, "bad_form") and node.spooled() == []

    def test_token_presets_hold_on_form_fields(self, node: MemoryNode) -> None:
        """A token kept to some presets cannot ask for others through a form field."""
        narrow = bearer(mint("alice", "upload", presets=["mp4-720p"]))
        body = form(part("presets", b"poster"), part("file", VIDEO, "clip.mp4"))
        r = node.request("POST", "/jobs", {**narrow, **FORM}, body)
        assert code(r) == (403, "forbidden") and node.spooled() == []
        r = node.request("POST", "/jobs", {**narrow, **FORM}, form(part("file", VIDEO, "clip.mp4")))
        assert r.status_code == 201

    def test_a_large_file_part_is_limited(self, node: MemoryNode) -> None:
        """--max-upload (4 MiB here) holds on the file part, declared or not: too_large."""
        body = form(part("file", b"v" * (4 * 1024 * 1024 + 1), "big.mp4"))
        status, error, _ = self.post(node, body)
        assert (status, error) == (413, "too_large") and node.spooled() == []
