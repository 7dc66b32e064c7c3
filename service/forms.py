"""Multipart bodies read with hard caps (parts, text sizes, file sizes), enforced while the body streams in."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from model_store.errors import InvalidRequest
from model_store.manifest import shown

from .errors import ClientGone, LimitExceeded


@dataclass(frozen=True)
class FormLimits:
    """What one multipart body may hold. `*_name` name the server setting each bound comes from."""

    file_fields: tuple[str, ...]  # the only field names that may carry files
    max_files: int
    max_file_bytes: int
    max_fields: int
    max_field_bytes: int
    files_name: str = "max_files"
    file_bytes_name: str = "max_file_bytes"
    fields_name: str = "a fixed limit"  # what the text fields' count limit is, in a message
    field_bytes_name: str = "fixed"  # what the text fields' limit is, in a message: a setting, or fixed
    file_word: str = "file"  # what a file is called in messages, and the `details` key of its index ("image")
    files_setting: str | None = None  # the setting max_files is, named in the 413's details so a client can adapt
    fields_setting: tuple[str, int] | None = None  # (setting, its value) the 413 of too many text fields names
    field_bytes_setting: tuple[str, str, int] | None = None  # (field, setting, value): that field's length limit


@dataclass
class Form:
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # (field, filename, bytes)
    fields: list[tuple[str, str]] = field(default_factory=list)  # (field, text)


class _Reader:
    """python-multipart callbacks that build a `Form` and raise as soon as a bound is crossed."""

    def __init__(self, limits: FormLimits) -> None:
        self.limits = limits
        self.form = Form()
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self._name: str = ""
        self._filename: str | None = None
        self._data = bytearray()
        self.ended = False  # the closing boundary was seen

    def on_end(self) -> None:
        self.ended = True

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()
        self._name, self._filename = "", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]  # python-multipart bounds header lines (4 KB) and their count (8)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._field).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequest('a multipart part has no Content-Disposition "name"')
        self._name = _utf8(options[b"name"], "a multipart field name")
        lim = self.limits
        if b"filename" in options and self._name not in lim.file_fields:
            raise InvalidRequest(
                f"unexpected file field {shown(self._name)}; send files in {', '.join(map(repr, lim.file_fields))}"
            )
        # a file field's part is a file, with or without a filename (RFC 7578 makes it optional; hand-built Java
        # bodies leave it out, and such a part was refused)
        if self._name in lim.file_fields:
            if len(self.form.files) >= lim.max_files and lim.files_setting is None:  # a fixed shape, no setting
                raise InvalidRequest(f"the file field {shown(self._name)} is sent more than once: {lim.files_name}")
            if len(self.form.files) >= lim.max_files:
                message = f"more than {lim.files_name}={lim.max_files} files in one request"
                raise LimitExceeded(message, lim.files_setting, lim.max_files)
            self._filename = _utf8(options.get(b"filename", b""), "a file name", errors="replace")
        elif len(self.form.fields) >= lim.max_fields:
            raise LimitExceeded(
                f"more than {lim.max_fields} text fields in one request ({lim.fields_name})",
                *(lim.fields_setting or ()),
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        lim = self.limits
        if self._filename is not None and len(self._data) > lim.max_file_bytes:
            index = len(self.form.files)
            error = LimitExceeded(
                f"{lim.file_word} {index}{named_part(self._filename)} is longer than {lim.max_file_bytes} bytes; "
                f"the limit is {lim.file_bytes_name}={lim.max_file_bytes}"
            )
            error.details = {lim.file_word: index}
            raise error
        if self._filename is None and len(self._data) > lim.max_field_bytes:
            setting = lim.field_bytes_setting
            named = setting[1:] if setting and setting[0] == self._name else ()  # a `task` field is no label
            # which of the labels: 'labels' 3 (it said "passed 800 bytes; the limit is 800 bytes", as if its size)
            which = f" {sum(name == self._name for name, _ in self.form.fields)}" if named else ""
            raise LimitExceeded(
                f"text field {shown(self._name)}{which} is longer than {lim.max_field_bytes} bytes; "
                f"the limit is {lim.max_field_bytes} bytes ({lim.field_bytes_name})",
                *named,
            )

    def on_part_end(self) -> None:
        if self._filename is not None:
            self.form.files.append((self._name, self._filename, bytes(self._data)))
        else:
            self.form.fields.append((self._name, _utf8(bytes(self._data), f"text field {shown(self._name)}")))
        self._data = bytearray()


def _malformed(head: bytes, boundary: bytes, error: object) -> str:
    """What is wrong with a body the parser refused (or found no closing boundary in), in words where its start
    tells: "Expected boundary character 79, got 88 at index 4" was said of a body whose boundary is not the one
    Content-Type names (an outside check's)."""
    said = str(error)[:160]
    body = head.lstrip(b"\r\n")  # the parser skips line breaks before the first boundary
    if not body.startswith(b"--" + boundary):
        named = ("--" + boundary.decode("latin-1"))[:72]
        return f"it does not start with {named!r}, the boundary its Content-Type names, as its first line ({said})"
    rest = body[len(boundary) + 2 :]
    if not rest.startswith(b"\r\n"):
        return f"the boundary line must end in CRLF (\\r\\n), with nothing after the boundary ({said})"
    ends = [i for i in (rest.find(b"\r\n\r\n", 2), rest.find(b"\n\n", 2)) if i >= 0]
    headers = rest[2 : min(ends) + 4] if ends else rest[2:]  # the first part's header lines, with their end
    if b"\n" in headers.replace(b"\r\n", b""):
        return f"every line of the part headers must end in CRLF (\\r\\n), not LF alone ({said})"
    return said


def named_part(filename: str) -> str:
    """A file part's filename as messages show it, after its index; nothing for a part sent without one."""
    return f" ({shown(filename, 60)})" if filename else ""


def _utf8(raw: bytes, what: str, errors: str = "strict") -> str:
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8") from None


async def read_multipart(request: Request, limits: FormLimits) -> Form:
    """The request's multipart body, parsed as it streams in: the first bound it crosses stops the parse."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data needs a boundary parameter in Content-Type")
    reader = _Reader(limits)
    names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end")
    callbacks = {name: getattr(reader, name) for name in (*names, "on_headers_finished", "on_end")}
    head = bytearray()  # the body's first bytes, to say what is wrong in words
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in request.stream():
            if len(head) < 512:
                head += chunk[: 512 - len(head)]
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise ClientGone("the client closed the connection before its body arrived") from None
    except (FormParserError, ValueError) as e:  # a malformed body (our own errors are not ValueErrors)
        raise InvalidRequest(f"the multipart body is malformed: {_malformed(bytes(head), boundary, e)}") from None
    if not reader.ended:  # python-multipart's finalize() does not check: a cut-off last part would vanish
        # (a body whose lines end in LF alone, never CR, ends here too, unrefused by the parser)
        said = _malformed(bytes(head), boundary, "it has no closing boundary")
        raise InvalidRequest(
            f"the multipart body is {'truncated' if said.startswith('it has') else 'malformed'}: {said}"
        )
    return reader.form
