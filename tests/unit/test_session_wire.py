"""Session-sync wire: golden fixtures, round trips, sizes, and decoding of anything at all."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nonstop.auth import TAG_LEN, seal
from nonstop.common import LocalProtocolError, RemoteProtocolError
from nonstop.session.sync import SyncReceiver
from nonstop.session.wire import (
    HEADER_LEN,
    MAGIC,
    OVERHEAD,
    UPDATE_LEN,
    VERSION,
    Ack,
    Batch,
    Close,
    CloseReason,
    Commit,
    Data,
    Direction,
    Fin,
    FullRecord,
    Update,
    decode,
    encode_ack,
    encode_batch,
    encode_record,
    record_size,
)

FIXTURES = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "session_wire.json").read_text()
)
GOLDEN_KEY = bytes.fromhex(FIXTURES["key_hex"])
KEY = bytes(range(32))
U32 = 2**32 - 1
U64 = 2**64 - 1
RECORD_TYPES = {c.__name__: c for c in (FullRecord, Update, Data, Commit, Close, Fin)}
ENUMS = {"direction": Direction, "reason": CloseReason}


def _record(d: dict):
    d = dict(d)
    cls = RECORD_TYPES[d.pop("type")]
    for name in ("payload", "state"):
        if name in d:
            d[name] = bytes.fromhex(d[name])
    for name, e in ENUMS.items():
        if name in d:
            d[name] = e[d[name]]
    return cls(**d)


def _frame(d: dict) -> Batch | Ack:
    d = dict(d)
    if d.pop("kind") == "ACK":
        return Ack(**d)
    d["records"] = tuple(_record(r) for r in d["records"])
    return Batch(**d)


def _encode(frame: Batch | Ack, key: bytes) -> bytes:
    return encode_ack(key, frame) if isinstance(frame, Ack) else encode_batch(key, frame)


@pytest.mark.parametrize("msg", FIXTURES["frames"], ids=lambda m: m["name"])
def test_golden_decode(msg: dict) -> None:
    assert decode(bytes.fromhex(msg["hex"]), GOLDEN_KEY) == _frame(msg["decoded"])


@pytest.mark.parametrize("msg", FIXTURES["frames"], ids=lambda m: m["name"])
def test_golden_encode(msg: dict) -> None:
    assert _encode(_frame(msg["decoded"]), GOLDEN_KEY).hex() == msg["hex"]


@pytest.mark.parametrize("msg", FIXTURES["frames"], ids=lambda m: m["name"])
def test_golden_with_another_key_is_bad_auth(msg: dict) -> None:
    with pytest.raises(RemoteProtocolError) as e:
        decode(bytes.fromhex(msg["hex"]), KEY)
    assert e.value.counter == "bad_auth"


def test_layout_of_a_golden_update() -> None:
    raw = bytes.fromhex(FIXTURES["frames"][2]["hex"])
    assert raw[:4] == MAGIC == b"NSSY" and raw[4] == VERSION == 2
    assert raw[5:7] == b"\x01\x00"  # BATCH, no flags
    assert struct.unpack("!QQ", raw[7:HEADER_LEN]) == (5, 3)
    body = raw[HEADER_LEN:-TAG_LEN]
    assert len(body) == UPDATE_LEN == 25
    assert body[0] == 2 and struct.unpack("!IIIIII", body[1:]) == (
        1, 0x10, 0x11223344, 0x11223400, 64256, 65280)


@pytest.mark.parametrize(("batch", "per_update"), [(1, 64.0), (16, 27.4375), (64, 25.609375)])
def test_bytes_per_update_including_the_tag_share(batch: int, per_update: float) -> None:
    frame = encode_batch(KEY, Batch(1, 1, tuple(Update(i, i, i, i, i, i) for i in range(batch))))
    assert len(frame) == batch * UPDATE_LEN + OVERHEAD
    assert len(frame) / batch == per_update
    if batch >= 16:
        assert per_update <= 32


u32 = st.integers(0, U32)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@st.composite
def full_records(draw: st.DrawFn) -> FullRecord:
    family = draw(st.sampled_from([4, 6]))
    addrs = v4 if family == 4 else v6
    return FullRecord(
        conn_id=draw(u32), family=family, local_addr=draw(addrs),
        local_port=draw(st.integers(0, 0xFFFF)), peer_addr=draw(addrs),
        peer_port=draw(st.integers(0, 0xFFFF)), snd_seq=draw(u32), rcv_seq=draw(u32),
        mss=draw(st.integers(0, 0xFFFF)), snd_wscale=draw(st.integers(0, 14)),
        rcv_wscale=draw(st.integers(0, 14)), wscale=draw(st.booleans()),
        sack=draw(st.booleans()), timestamps=draw(st.booleans()), ts_val=draw(u32),
        snd_wl1=draw(u32), snd_wnd=draw(u32), max_window=draw(u32), rcv_wnd=draw(u32),
        rcv_wup=draw(u32),
    )


records = st.one_of(
    full_records(),
    st.builds(Update, u32, u32, u32, u32, u32, u32),
    st.builds(Data, u32, st.sampled_from(Direction), u32, st.binary(max_size=600)),
    st.builds(Commit, u32, u32, u32, st.binary(max_size=255)),
    st.builds(Close, u32, st.sampled_from(CloseReason)),
    st.builds(Fin, u32, st.sampled_from(Direction), u32),
)
batches = st.builds(Batch, st.integers(0, U64), st.integers(0, U64),
                    st.lists(records, max_size=20).map(tuple), st.booleans())
acks = st.builds(Ack, st.integers(0, U64), st.integers(0, U64), st.integers(0, U64),
                 st.integers(0, U64), st.booleans())


@given(batches)
def test_batch_round_trip(batch: Batch) -> None:
    raw = encode_batch(KEY, batch)
    assert len(raw) == OVERHEAD + sum(record_size(r) for r in batch.records)
    assert decode(raw, KEY) == batch


@given(acks)
def test_ack_round_trip(ack: Ack) -> None:
    assert decode(encode_ack(KEY, ack), KEY) == ack


@given(records)
def test_each_record_alone_round_trips(rec) -> None:
    assert len(encode_record(rec)) == record_size(rec)
    assert decode(encode_batch(KEY, Batch(1, 1, (rec,))), KEY).records == (rec,)


def _decodes_or_remote_error(data: bytes, key: bytes = KEY) -> None:
    try:
        decode(data, key)
    except RemoteProtocolError as e:
        assert e.counter in ("malformed", "bad_version", "bad_auth")


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_remote_errors(data: bytes) -> None:
    _decodes_or_remote_error(data)
    _decodes_or_remote_error(MAGIC + bytes([VERSION]) + data)


@given(st.binary(max_size=300), st.integers(0, 255), st.integers(0, 255))
def test_authenticated_garbage_raises_only_remote_errors(body: bytes, kind: int,
                                                         flags: int) -> None:
    """Even a body the key holder sealed must not crash the parser (our own bug, or a rogue)."""
    head = MAGIC + bytes([VERSION, kind, flags]) + bytes(16)
    _decodes_or_remote_error(seal(KEY, head + body))


@given(batches, st.data())
def test_truncations_and_bit_flips_are_refused(batch: Batch, data: st.DataObject) -> None:
    raw = encode_batch(KEY, batch)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(RemoteProtocolError):
        decode(raw[:cut], KEY)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(RemoteProtocolError):
        decode(bytes(flipped), KEY)


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_receiver_never_raises_and_keeps_nothing_from_garbage(frames: list[bytes]) -> None:
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    for f in frames:
        assert rx.receive(f, 0.0) == []
    assert rx.connections() == {}
    assert sum(rx.counters[c] for c in ("malformed", "bad_version", "bad_auth")) == len(frames)


def test_bad_version_and_kind_have_their_counters() -> None:
    raw = bytearray(encode_ack(KEY, Ack(1, 1, 1, 0)))
    for old_or_new in (1, VERSION + 1):  # 1: before the FIN record
        raw[4] = old_or_new
        with pytest.raises(RemoteProtocolError) as e:
            decode(bytes(raw), KEY)
        assert e.value.counter == "bad_version"
    for body in (b"\x09", b"\x02" + bytes(23), b"\x03" + bytes(11) + b"\x00\x05ab",
                 b"\x06" + bytes(8), b"\x06\x00\x00\x00\x01\x02" + bytes(4)):
        with pytest.raises(RemoteProtocolError) as e:
            decode(seal(KEY, MAGIC + bytes([VERSION, 1, 0]) + bytes(16) + body), KEY)
        assert e.value.counter == "malformed"


def test_ipv4_padding_and_unknown_enum_values_are_malformed() -> None:
    good = encode_record(Close(1, CloseReason.CLOSED))
    for body in (good[:-1] + b"\x03", encode_record(Data(1, Direction.RCV, 0, b""))[:5] + b"\x02"
                 + bytes(6)):
        with pytest.raises(RemoteProtocolError):
            decode(seal(KEY, MAGIC + bytes([VERSION, 1, 0]) + bytes(16) + body), KEY)
    full = bytearray(encode_record(FullRecord(
        conn_id=1, family=4, local_addr="10.77.0.1", local_port=1, peer_addr="10.77.0.2",
        peer_port=2, snd_seq=0, rcv_seq=0, mss=1460)))
    full[20] = 1  # inside the 12 zero bytes after the IPv4 local address
    with pytest.raises(RemoteProtocolError):
        decode(seal(KEY, MAGIC + bytes([VERSION, 1, 0]) + bytes(16) + bytes(full)), KEY)


@pytest.mark.parametrize("bad", [
    lambda: Update(-1, 0, 0, 0, 0, 0),
    lambda: Update(0, 2**32, 0, 0, 0, 0),
    lambda: Commit(1, 0, 0, b"x" * 256),
    lambda: Data(1, 0, 0, b""),
    lambda: Data(1, Direction.RCV, 0, b"x" * 65536),
    lambda: Close(1, 2),
    lambda: Fin(1, 1, 0),
    lambda: Fin(1, Direction.SND, 2**32),
    lambda: FullRecord(conn_id=1, family=4, local_addr="fd77::1", local_port=1,
                       peer_addr="10.77.0.2", peer_port=2, snd_seq=0, rcv_seq=0, mss=1),
    lambda: FullRecord(conn_id=1, family=5, local_addr="10.77.0.1", local_port=1,
                       peer_addr="10.77.0.2", peer_port=2, snd_seq=0, rcv_seq=0, mss=1),
    lambda: FullRecord(conn_id=1, family=4, local_addr="10.77.0.1", local_port=1,
                       peer_addr="10.77.0.2", peer_port=2, snd_seq=0, rcv_seq=0, mss=1,
                       snd_wscale=15),
])
def test_out_of_range_values_are_our_bug(bad) -> None:
    with pytest.raises(LocalProtocolError):
        bad()


def test_fixture_names_every_record_type() -> None:
    seen = {r["type"] for f in FIXTURES["frames"] for r in f["decoded"].get("records", [])}
    assert seen == set(RECORD_TYPES)
    assert {f["decoded"]["kind"] for f in FIXTURES["frames"]} == {"BATCH", "ACK"}


def test_with_ts_is_replace_without_the_checks() -> None:
    from dataclasses import replace

    f = FullRecord(conn_id=3, family=6, local_addr="fd77::100", local_port=80,
                   peer_addr="fd77::1", peer_port=4000, snd_seq=1, rcv_seq=2, mss=1440,
                   timestamps=True, ts_val=5)
    g = f.with_ts(U32)
    assert g == replace(f, ts_val=U32) and g is not f and f.ts_val == 5
    assert encode_record(g) == encode_record(replace(f, ts_val=U32))
    with pytest.raises(LocalProtocolError):
        f.with_ts(U32 + 1)
