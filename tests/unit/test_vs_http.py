"""nonstop.vs.http: golden parses, framing errors, random bytes whole and byte by byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.common import RemoteProtocolError
from nonstop.vs.http import (
    RequestParser,
    ResponseParser,
    encode_request,
    encode_response,
    error_response,
)


def _all(data: bytes, *, bytewise: bool = False) -> list:
    p = RequestParser()
    out = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for c in chunks:
        p.feed(c)
        while (r := p.next_request()) is not None:
            out.append(r)
    return out


def test_pipelined_requests_with_bodies() -> None:
    data = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
        b"PUT /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nhe\r\n3;ext=1\r\nllo\r\n0\r\ntrailer: t\r\n\r\n"
        b"GET /d HTTP/1.0\r\n\r\n"
    )
    for bytewise in (False, True):
        reqs = _all(data, bytewise=bytewise)
        assert [r.target for r in reqs] == [b"/a", b"/b", b"/c", b"/d"]
        assert [r.body for r in reqs] == [b"", b"abc", b"hello", b""]
        assert [r.keep_alive for r in reqs] == [True, True, True, False]
        assert [r.idempotent for r in reqs] == [True, False, True, True]
        assert reqs[0].header(b"host") == b"x"


def test_marked_post_is_idempotent() -> None:
    (r,) = _all(
        b"POST / HTTP/1.1\r\nhost: x\r\nx-nonstop-idempotent: 1\r\ncontent-length: 0\r\n\r\n"
    )
    assert r.idempotent


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\nhost: x\r\n\r\n",
        b"GET /\r\n\r\n",
        b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n",
        b"GET / HTTP/1.1\r\nhost: x\x01\r\n\r\n",
    ],
)
def test_malformed_requests_raise_the_remote_error(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as e:
        _all(bad)
    assert e.value.counter == "bad_http"


def test_oversized_head_is_refused_before_the_end() -> None:
    p = RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nhost: x\r\n" + b"a: b\r\n" * 20000)
    with pytest.raises(RemoteProtocolError):
        p.next_request()


def test_responses_head_204_chunked_until_close_and_1xx() -> None:
    p = ResponseParser()
    p.expect(b"HEAD")
    p.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    r = p.next_response()
    assert r is not None and r.body == b"" and r.keep_alive
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert p.next_response() is None
    p.feed(b"1\r\na\r\n0\r\n\r\n")
    r = p.next_response()
    assert r is not None and r.body == b"a" and r.status == 200
    p.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert p.next_response() is None
    p.eof()
    r = p.next_response()
    assert r is not None and r.body == b"until close" and not r.keep_alive


def test_truncated_response_is_an_error_at_eof() -> None:
    p = ResponseParser()
    p.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    assert p.next_response() is None and p.started
    p.eof()
    with pytest.raises(RemoteProtocolError):
        p.next_response()


def test_round_trip_through_the_encoders() -> None:
    (req,) = _all(
        b"POST /x HTTP/1.1\r\nhost: h\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nhi"
    )
    wire = encode_request(req, extra=((b"x-forwarded-for", b"10.77.0.1"),))
    (again,) = _all(wire)
    assert again.body == b"hi" and again.header(b"x-forwarded-for") == b"10.77.0.1"
    assert again.header(b"connection") is None  # hop-by-hop dropped
    p = ResponseParser()
    p.feed(
        b"HTTP/1.1 201 Created\r\nx: y\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    resp = p.next_response()
    assert resp is not None
    out = encode_response(resp, keep_alive=False)
    p2 = ResponseParser()
    p2.feed(out)
    r2 = p2.next_response()
    assert r2 is not None and r2.status == 201 and r2.body == b"ok" and not r2.keep_alive
    assert error_response(502, "x").startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_parse_or_raise_the_remote_error(data: bytes, bytewise: bool) -> None:
    for parser_kind in (RequestParser, ResponseParser):
        p = parser_kind()
        chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        try:
            for c in chunks:
                p.feed(c)
                if isinstance(p, RequestParser):
                    while p.next_request() is not None:
                        pass
                else:
                    while p.next_response() is not None:
                        pass
            if isinstance(p, ResponseParser):
                p.eof()
                p.next_response()
        except RemoteProtocolError:
            pass  # the only error allowed


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]),
    st.from_regex(rb"\A/[a-z0-9/]{0,20}\Z"),
    st.binary(max_size=200),
)
def test_encoded_requests_parse_back(method: bytes, target: bytes, body: bytes) -> None:
    p = RequestParser()
    p.feed(
        b"X / HTTP/1.1\r\nhost: h\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    req = p.next_request()
    assert req is not None
    from dataclasses import replace

    req = replace(req, method=method, target=target)
    (back,) = _all(encode_request(req))
    assert (back.method, back.target, back.body) == (method, target, body)
