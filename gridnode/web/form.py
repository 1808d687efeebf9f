"""
``POST /jobs`` with a ``multipart/form-data`` body (``curl -F file=@clip.mp4``, a browser's form):
the file part streams to the upload's spool file as it is parsed, in constant memory, exactly as
a raw body does; the small fields ``presets``, ``name``, ``priority``, ``notify`` and
``notify_progress`` are kept, and the file part's file name.

The parser is `multipart`'s ``PushMultipartParser`` (sans-I/O, fed as bytes arrive). Everything
but the file part's bytes (boundaries, part headers, fields, a preamble or epilogue) is capped at
`FORM_OVERHEAD`, so the body's size is the file's plus a bound; the spool file's own limit
(``--max-upload``, a token's ``max_size``) holds on the file part. Anything malformed is a coded
``400 bad_form`` whose message says what to send instead.
"""

from __future__ import annotations

from typing import Any

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from gridnode.errors import GridnodeError
from gridnode.spool import SpoolFile

#: the most bytes of a form body outside its file part
FORM_OVERHEAD = 64 * 1024
#: the most bytes of one field's value
FIELD_BYTES = 4096
#: the fields a form may give beside its file part (other fields are read and dropped)
FIELDS = ("presets", "name", "priority", "notify", "notify_progress")
#: a part header line's bound (a long file name fits; a header meant to fill memory does not)
HEADER_BYTES = 4096

_HINT = "send one file part (curl -F file=@clip.mp4) or the raw video as the body (curl -T clip.mp4)"


def bad_form(what: str) -> GridnodeError:
    return GridnodeError(f"{what}; {_HINT}", code="bad_form", status=400)


def boundary_of(content_type: bytes | None) -> str | None:
    """The boundary of a ``multipart/form-data`` body; None for any other body (a raw upload).
    Another multipart type, or a form without a usable boundary, is ``bad_form``."""
    if content_type is None:
        return None
    kind, options = parse_options_header(content_type.decode("latin-1"))
    if not kind.startswith("multipart/"):
        return None
    if kind != "multipart/form-data":
        raise bad_form(f"a {kind[:40]} body is not taken")
    boundary = options.get("boundary", "")
    # RFC 2046: 1 to 70 characters; a newline in it could never match
    if not 0 < len(boundary) <= 70 or any(c in boundary for c in "\r\n"):
        raise bad_form("a multipart/form-data body needs a boundary of 1 to 70 characters")
    return str(boundary)


def file_bound(length: int | None) -> int | None:
    """The least a declared form body's file part can be: what admission checks and reserves."""
    return None if length is None else max(0, length - FORM_OVERHEAD)


class FormBody:
    """The sink of a form upload: parsed bytes to ``spool``, fields kept, `finish` once the body is
    in. Never spliced: its bytes need parsing."""

    grows_in_place = False

    def __init__(self, spool: SpoolFile, boundary: str) -> None:
        self.spool = spool
        self.fields: dict[str, str] = {}
        #: the file part's file name, its folders left out (a job's name when none is given)
        self.filename = ""
        self._parser = PushMultipartParser(boundary, max_header_size=HEADER_BYTES, max_header_count=8)
        #: where the current part's bytes go: "file", a field's name, or "" (dropped)
        self._part: str | None = None
        self._field = bytearray()
        self._files = 0
        self._received = 0

    def write(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk would end the parser's input
        self._received += len(data)
        try:
            for event in self._parser.parse(data):
                self._event(event)
        except MultipartError as e:
            raise bad_form(f"the form is malformed ({str(e)[:80]})") from None
        if self._received - self.spool.received() > FORM_OVERHEAD:
            raise bad_form(f"the form holds more than {FORM_OVERHEAD} bytes beside its file")

    def _event(self, event: Any) -> None:
        if isinstance(event, MultipartSegment):
            if event.filename is not None:
                self._files += 1
                if self._files > 1:
                    raise bad_form("the form has more than one file part")
                self._part = "file"
                self.filename = event.filename.replace("\\", "/").rsplit("/", 1)[-1]
            elif event.name in FIELDS:
                if event.name in self.fields:
                    raise bad_form(f"the form gives {event.name} twice")
                self._part, self._field = event.name, bytearray()
            else:
                self._part = ""
        elif event is None:  # the end of a part
            if self._part in FIELDS:
                self.fields[self._part] = self._field.decode("utf-8", "replace")
            self._part = None
        elif self._part == "file":
            self.spool.write(event)
        elif self._part in FIELDS:
            if len(self._field) + len(event) > FIELD_BYTES:
                raise bad_form(f"the form's {self._part} is over {FIELD_BYTES} bytes")
            self._field += event

    def finish(self) -> SpoolFile:
        """The spool file, once the whole form is in: ``bad_form`` when it ended early or held no file."""
        try:
            self._parser.close()
        except MultipartError:
            raise bad_form("the form ended before its closing boundary") from None
        if not self._files:
            raise bad_form("the form has no file part (a part with a filename)")
        return self.spool

    def abort(self) -> None:
        self.spool.abort()

    # twisted.web's Request rewinds its content, and closes it when the request ends
    def close(self) -> None:
        self.spool.close()

    def tell(self) -> int:
        return self.spool.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.spool.seek(offset, whence)
