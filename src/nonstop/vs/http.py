"""A sans-IO HTTP/1.1 message parser for the reverse proxy (h11's shape, a smaller scope).

``RequestParser`` and ``ResponseParser`` take bytes (``feed``) and hand out whole messages
(``next_request`` / ``next_response``), or None while more bytes are needed. Bodies are read whole
(Content-Length or chunked; a response without either is read until the connection closes, see
``ResponseParser.eof``): the proxy forwards complete messages, which is what lets it retry an
idempotent request on another worker when the first one dies before answering.

Any byte sequence either parses or raises :class:`~nonstop.common.RemoteProtocolError` with
``counter="bad_http"``; nothing else escapes (tests feed random bytes, whole and byte by byte).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nonstop.common import RemoteProtocolError

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_HEADERS = 100
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
# Hop-by-hop headers (RFC 9110 7.6.1): never forwarded; the proxy writes its own framing.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
    }
)
IDEMPOTENT_HEADER = b"x-nonstop-idempotent"  # "1" marks a POST/PATCH safe to retry

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(rb"^[\x21-\x7e]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def _bad(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, counter="bad_http")


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: tuple[tuple[bytes, bytes], ...]  # names lower-cased
    body: bytes
    keep_alive: bool

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT or self.header(IDEMPOTENT_HEADER) == b"1"

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def _first(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0][:60]


def _parse_head(head: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    start = lines[0].split(b" ", 2)
    headers: list[tuple[bytes, bytes]] = []
    if len(lines) - 1 > MAX_HEADERS:
        raise _bad(f"more than {MAX_HEADERS} header fields")
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise _bad(f"malformed header line {line[:40]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _bad(f"control character in header {name[:40]!r}")
        headers.append((name.lower(), value))
    return start, headers


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    """(chunked, content_length) from the headers; both at once or two lengths is an error."""
    chunked = False
    length: int | None = None
    for k, v in headers:
        if k == b"transfer-encoding":
            codings = [c.strip().lower() for c in v.split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise _bad(f"unsupported transfer-encoding {v[:40]!r}")
            chunked = True
        elif k == b"content-length":
            if not v.isdigit() or len(v) > 12:
                raise _bad(f"bad content-length {v[:40]!r}")
            n = int(v)
            if length is not None and n != length:
                raise _bad("two different content-length values")
            length = n
    if chunked and length is not None:
        raise _bad("both transfer-encoding and content-length")
    if length is not None and length > MAX_BODY:
        raise _bad(f"body of {length} bytes is over {MAX_BODY}")
    return chunked, length


def _keep_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    conn = b",".join(v for k, v in headers if k == b"connection").lower()
    tokens = {t.strip() for t in conn.split(b",")}
    if version == b"1.0":
        return b"keep-alive" in tokens
    return b"close" not in tokens


class _Buffer:
    """Byte buffer with a read position, compacted lazily."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos and self.pos > len(self.buf) // 2:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def __len__(self) -> int:
        return len(self.buf) - self.pos

    def find(self, sub: bytes) -> int:
        i = self.buf.find(sub, self.pos)
        return -1 if i < 0 else i - self.pos

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out


class _Chunked:
    """Decoder of a chunked body; ``step`` returns the body when the last chunk is in."""

    __slots__ = ("parts", "size", "state", "total")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.state = "size"  # size | data | crlf | trailer
        self.size = 0
        self.total = 0

    def step(self, b: _Buffer) -> bytes | None:
        while True:
            if self.state == "size":
                i = b.find(b"\r\n")
                if i < 0:
                    if len(b) > 1024:
                        raise _bad("chunk size line too long")
                    return None
                line = b.take(i + 2)[:-2].split(b";", 1)[0].strip()
                if not line or len(line) > 8 or not re.fullmatch(rb"[0-9A-Fa-f]+", line):
                    raise _bad(f"bad chunk size {line[:20]!r}")
                self.size = int(line, 16)
                self.total += self.size
                if self.total > MAX_BODY:
                    raise _bad(f"chunked body over {MAX_BODY} bytes")
                self.state = "data" if self.size else "trailer"
            elif self.state == "data":
                if len(b) < self.size:
                    return None
                self.parts.append(b.take(self.size))
                self.state = "crlf"
            elif self.state == "crlf":
                if len(b) < 2:
                    return None
                if b.take(2) != b"\r\n":
                    raise _bad("chunk not followed by CRLF")
                self.state = "size"
            else:  # trailer: lines until an empty one (trailers are dropped)
                i = b.find(b"\r\n")
                if i < 0:
                    if len(b) > MAX_HEAD:
                        raise _bad("trailer too long")
                    return None
                line = b.take(i + 2)
                if line == b"\r\n":
                    return b"".join(self.parts)


class RequestParser:
    """Requests from a client connection, one after the other (pipelining works)."""

    def __init__(self) -> None:
        self._b = _Buffer()
        self._head: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], bool] | None = None
        self._length = 0
        self._chunked: _Chunked | None = None

    def feed(self, data: bytes) -> None:
        self._b.feed(data)

    @property
    def pending(self) -> int:
        return len(self._b)

    def next_request(self) -> Request | None:
        b = self._b
        if self._head is None:
            # RFC 9112 2.2: ignore empty lines before a request line
            while len(b) >= 2 and b.buf[b.pos : b.pos + 2] == b"\r\n":
                b.pos += 2
            i = b.find(b"\r\n\r\n")
            if i < 0:
                if len(b) > MAX_HEAD:
                    raise _bad(f"request head over {MAX_HEAD} bytes")
                return None
            head = b.take(i + 4)[:-4]
            start, headers = _parse_head(head)
            if len(start) != 3:
                raise _bad(f"malformed request line {_first(head)!r}")
            method, target, version = start
            if not _TOKEN.match(method) or not _TARGET.match(target):
                raise _bad(f"malformed request line {_first(head)!r}")
            if not _VERSION.match(version):
                raise _bad(f"unsupported version {version[:20]!r}")
            ver = version[5:]
            if ver == b"1.1" and not any(k == b"host" for k, _ in headers):
                raise _bad("HTTP/1.1 request without Host")
            chunked, length = _framing(headers)
            self._chunked = _Chunked() if chunked else None
            self._length = length or 0
            self._head = (method, target, ver, headers, _keep_alive(ver, headers))
        if self._chunked is not None:
            body = self._chunked.step(b)
            if body is None:
                return None
        else:
            if len(b) < self._length:
                return None
            body = b.take(self._length)
        method, target, ver, headers, keep = self._head
        self._head, self._chunked = None, None
        return Request(method, target, ver, tuple(headers), body, keep)


class ResponseParser:
    """One response at a time from a worker connection. Tell it the request method first
    (``expect(method)``): a HEAD response has no body."""

    def __init__(self) -> None:
        self._b = _Buffer()
        self._method = b"GET"
        self._head: tuple[int, bytes, bytes, list[tuple[bytes, bytes]], bool] | None = None
        self._length: int | None = 0
        self._chunked: _Chunked | None = None
        self._eof = False

    def expect(self, method: bytes) -> None:
        self._method = method

    def feed(self, data: bytes) -> None:
        self._b.feed(data)

    def eof(self) -> None:
        self._eof = True

    @property
    def started(self) -> bool:
        """True once any byte of the current response arrived."""
        return self._head is not None or len(self._b) > 0

    def next_response(self) -> Response | None:
        b = self._b
        while True:
            resp = self._step(b)
            if resp is None or resp.status >= 200:
                return resp
            # 1xx interim: drop it, wait for the final response

    def _step(self, b: _Buffer) -> Response | None:
        if self._head is None:
            i = b.find(b"\r\n\r\n")
            if i < 0:
                if len(b) > MAX_HEAD:
                    raise _bad(f"response head over {MAX_HEAD} bytes")
                if self._eof and len(b):
                    raise _bad("connection closed inside a response head")
                return None
            head = b.take(i + 4)[:-4]
            start, headers = _parse_head(head)
            if len(start) < 2 or not _VERSION.match(start[0]):
                raise _bad(f"malformed status line {_first(head)!r}")
            code = start[1]
            if len(code) != 3 or not code.isdigit():
                raise _bad(f"bad status code {code[:10]!r}")
            status = int(code)
            ver = start[0][5:]
            reason = start[2] if len(start) == 3 else b""
            chunked, length = _framing(headers)
            keep = _keep_alive(ver, headers)
            if self._method == b"HEAD" or status < 200 or status in (204, 304):
                chunked, length = False, 0
            elif not chunked and length is None:
                keep = False  # body until close
            self._chunked = _Chunked() if chunked else None
            self._length = length
            self._head = (status, reason, ver, headers, keep)
        if self._chunked is not None:
            body = self._chunked.step(b)
            if body is None:
                if self._eof:
                    raise _bad("connection closed inside a chunked body")
                return None
        elif self._length is None:
            if not self._eof:
                if len(b) > MAX_BODY:
                    raise _bad(f"response body over {MAX_BODY} bytes")
                return None
            body = b.take(len(b))
        else:
            if len(b) < self._length:
                if self._eof:
                    raise _bad("connection closed inside a response body")
                return None
            body = b.take(self._length)
        status, reason, ver, headers, keep = self._head
        self._head, self._chunked = None, None
        return Response(status, reason, ver, tuple(headers), body, keep)


def encode_request(req: Request, *, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """The request as the proxy forwards it: HTTP/1.1, keep-alive, Content-Length framing."""
    out = [req.method, b" ", req.target, b" HTTP/1.1\r\n"]
    for k, v in req.headers:
        if k not in HOP_BY_HOP:
            out += [k, b": ", v, b"\r\n"]
    for k, v in extra:
        out += [k, b": ", v, b"\r\n"]
    if req.body or req.method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
        out += [b"content-length: ", str(len(req.body)).encode(), b"\r\n"]
    out += [b"\r\n", req.body]
    return b"".join(out)


def encode_response(resp: Response, *, keep_alive: bool, head: bool = False) -> bytes:
    """A worker's response as the proxy returns it to the client."""
    out = [b"HTTP/1.1 ", str(resp.status).encode(), b" ", resp.reason, b"\r\n"]
    for k, v in resp.headers:
        if k not in HOP_BY_HOP:
            out += [k, b": ", v, b"\r\n"]
    if resp.status >= 200 and resp.status not in (204, 304):
        out += [b"content-length: ", str(len(resp.body)).encode(), b"\r\n"]
    if not keep_alive:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if not head:
        out.append(resp.body)
    return b"".join(out)


def error_response(status: int, detail: str, *, keep_alive: bool = False) -> bytes:
    """A short text/plain error the proxy writes itself (400, 502, 503, 504)."""
    body = f"{status} {_REASONS.get(status, b'').decode()}: {detail}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, b'Error').decode()}\r\n"
        f"content-type: text/plain\r\ncontent-length: {len(body)}\r\n"
        f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}"
        "x-nonstop-error: 1\r\n\r\n"
    ).encode()
    return head + body
