"""Heartbeat wire format: golden fixtures, round trips, and decoding of anything at all."""

from __future__ import annotations

import json
import pathlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nonstop.auth import seal
from nonstop.common import LocalProtocolError, RemoteProtocolError, Role
from nonstop.membership import (
    MAGIC,
    VERSION,
    Heartbeat,
    MsgType,
    decode_heartbeat,
    encode_heartbeat,
)

FIXTURES = json.loads((pathlib.Path(__file__).parent / "fixtures" / "heartbeat.json").read_text())
GOLDEN_KEY = bytes.fromhex(FIXTURES["key_hex"])
KEY = bytes(range(32))
U64 = 2**64 - 1


def _from_fixture(d: dict) -> Heartbeat:
    d = dict(d, type=MsgType[d["type"]], role=Role[d["role"]])
    return Heartbeat(**d)


@pytest.mark.parametrize("msg", FIXTURES["messages"], ids=lambda m: m["name"])
def test_golden_decode(msg: dict) -> None:
    hb = decode_heartbeat(bytes.fromhex(msg["hex"]), GOLDEN_KEY)
    assert hb == _from_fixture(msg["decoded"])
    assert isinstance(hb.type, MsgType) and isinstance(hb.role, Role)


@pytest.mark.parametrize("msg", FIXTURES["messages"], ids=lambda m: m["name"])
def test_golden_encode(msg: dict) -> None:
    assert encode_heartbeat(_from_fixture(msg["decoded"]), GOLDEN_KEY).hex() == msg["hex"]


@pytest.mark.parametrize("msg", FIXTURES["messages"], ids=lambda m: m["name"])
def test_golden_with_another_key_is_bad_auth(msg: dict) -> None:
    with pytest.raises(RemoteProtocolError) as e:
        decode_heartbeat(bytes.fromhex(msg["hex"]), KEY)
    assert e.value.counter == "bad_auth"


def test_layout_of_a_golden_message() -> None:
    raw = bytes.fromhex(FIXTURES["messages"][0]["hex"])
    assert raw[:4] == MAGIC == b"NSHB" and raw[4] == VERSION == 1
    assert raw[5] == 0x9C  # msgpack fixarray of 12 items
    assert msgspec.msgpack.decode(raw[5:-16])[:4] == [1, 1, "node-a", "lan"]


idents = st.from_regex(r"\A[A-Za-z0-9_.-]{1,32}\Z")
heartbeats = st.builds(
    Heartbeat,
    type=st.sampled_from(MsgType),
    group=st.integers(0, 0xFFFF),
    node_id=idents,
    channel=idents,
    incarnation=st.integers(0, U64),
    seq=st.integers(0, U64),
    role=st.sampled_from(Role),
    priority=st.integers(0, 255),
    flags=st.integers(0, 2**32 - 1),
    sent_at=st.integers(0, U64),
    echo_seq=st.integers(0, U64),
    echo_delay_us=st.integers(0, 2**32 - 1),
)


@given(heartbeats)
def test_round_trip(hb: Heartbeat) -> None:
    data = encode_heartbeat(hb, KEY)
    assert decode_heartbeat(data, KEY) == hb
    assert len(data) <= 5 + 1 + 4 * 9 + 2 * 33 + 3 + 2 + 2 + 5 + 5 + 16


def test_typical_heartbeat_is_under_100_bytes() -> None:
    hb = Heartbeat(
        MsgType.HEARTBEAT,
        1,
        "node-a",
        "lan",
        1_700_000_000_123_456_789,
        123_456,
        Role.MASTER,
        150,
        1,
        4_000_000_000_000,
        123_455,
        9_000,
    )
    assert len(encode_heartbeat(hb, KEY)) < 100


def _decodes_or_refuses(data: bytes) -> None:
    try:
        hb = decode_heartbeat(data, KEY)
    except RemoteProtocolError as e:
        assert e.counter in {"malformed", "bad_version", "bad_auth"}
    else:
        assert isinstance(hb, Heartbeat)


@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_remote_error(data: bytes) -> None:
    _decodes_or_refuses(data)
    _decodes_or_refuses(MAGIC + bytes([VERSION]) + data)


@given(st.binary(max_size=200))
def test_random_authenticated_payloads(body: bytes) -> None:
    """Past the tag check: the parser itself meets arbitrary bytes."""
    _decodes_or_refuses(seal(KEY, MAGIC + bytes([VERSION]) + body))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=14) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@given(msgpack_values)
def test_authenticated_msgpack_of_any_shape(value: object) -> None:
    _decodes_or_refuses(seal(KEY, MAGIC + bytes([VERSION]) + msgspec.msgpack.encode(value)))


@given(heartbeats, st.integers(0, 11), msgpack_values)
def test_one_field_replaced_by_anything(hb: Heartbeat, index: int, value: object) -> None:
    fields = list(msgspec.msgpack.decode(msgspec.msgpack.encode(hb)))
    fields[index] = value
    _decodes_or_refuses(seal(KEY, MAGIC + bytes([VERSION]) + msgspec.msgpack.encode(fields)))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 3),
        (0, 0),
        (1, 65536),
        (1, -1),
        (2, ""),
        (2, "x" * 33),
        (2, "no spaces"),
        (3, "l/an"),
        (4, -1),
        (5, 1.5),
        (6, 9),
        (7, 256),
        (8, 2**32),
        (9, -5),
        (10, "1"),
        (11, 2**32),
    ],
)
def test_out_of_range_fields_are_malformed(index: int, value: object) -> None:
    hb = _from_fixture(FIXTURES["messages"][0]["decoded"])
    fields = list(msgspec.msgpack.decode(msgspec.msgpack.encode(hb)))
    fields[index] = value
    data = seal(KEY, MAGIC + bytes([VERSION]) + msgspec.msgpack.encode(fields))
    with pytest.raises(RemoteProtocolError) as e:
        decode_heartbeat(data, KEY)
    assert e.value.counter == "malformed"


def test_extra_trailing_fields_are_ignored() -> None:
    hb = _from_fixture(FIXTURES["messages"][1]["decoded"])
    fields = [*msgspec.msgpack.decode(msgspec.msgpack.encode(hb)), "a future field"]
    assert decode_heartbeat(seal(KEY, MAGIC + b"\x01" + msgspec.msgpack.encode(fields)), KEY) == hb


@pytest.mark.parametrize(
    ("mangle", "counter"),
    [
        (lambda d: b"XSHB" + d[4:], "malformed"),
        (lambda d: d[:4] + b"\x02" + d[5:], "bad_version"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_auth"),
        (lambda d: d[:10] + bytes([d[10] ^ 0x20]) + d[11:], "bad_auth"),
        (lambda d: d + b"\x00", "bad_auth"),
        (lambda d: d[:5] + d[-16:], "malformed"),
        (lambda d: b"", "malformed"),
    ],
)
def test_mangled_datagrams(mangle, counter: str) -> None:  # type: ignore[no-untyped-def]
    data = bytes.fromhex(FIXTURES["messages"][0]["hex"])
    with pytest.raises(RemoteProtocolError) as e:
        decode_heartbeat(mangle(data), GOLDEN_KEY)
    assert e.value.counter == counter


def test_trailing_bytes_inside_the_sealed_payload_are_malformed() -> None:
    hb = _from_fixture(FIXTURES["messages"][0]["decoded"])
    data = seal(KEY, MAGIC + b"\x01" + msgspec.msgpack.encode(hb) + b"\x00")
    with pytest.raises(RemoteProtocolError) as e:
        decode_heartbeat(data, KEY)
    assert e.value.counter == "malformed"


def test_every_prefix_is_refused() -> None:
    data = bytes.fromhex(FIXTURES["messages"][1]["hex"])
    for n in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            decode_heartbeat(data[:n], GOLDEN_KEY)


@pytest.mark.parametrize(
    "change",
    [
        {"priority": 256},
        {"group": -1},
        {"flags": 2**32},
        {"echo_delay_us": -1},
        {"seq": 2**64},
        {"node_id": ""},
        {"channel": "c" * 33},
        {"role": 2},
    ],
)
def test_encoding_an_out_of_range_heartbeat_is_our_bug(change: dict) -> None:
    hb = msgspec.structs.replace(_from_fixture(FIXTURES["messages"][0]["decoded"]), **change)
    with pytest.raises(LocalProtocolError):
        encode_heartbeat(hb, KEY)
