"""Prefixes as ints: ``key = address << 8 | length`` (the address at full width, host bits zero).

One int per route instead of an object keeps a million-route table small and fast to hash. The
decoder works on a whole NLRI field at once.
"""

from __future__ import annotations

import ipaddress

from nonstop.bgp.wire import INVALID_NETWORK, UPDATE_ERROR, NotifyError

# per family width: shift and mask tables indexed by prefix length
_TABLES: dict[int, tuple[list[int], list[int]]] = {}


def _tables(bits: int) -> tuple[list[int], list[int]]:
    t = _TABLES.get(bits)
    if t is None:
        shifts = [bits - 8 * ((p + 7) >> 3) + 8 for p in range(bits + 1)]
        masks = [(((1 << p) - 1) << (bits - p + 8)) for p in range(bits + 1)]
        t = _TABLES[bits] = (shifts, masks)
    return t


def decode_prefixes(data: bytes | memoryview, bits: int = 32) -> list[int]:
    """Every prefix of an NLRI (or withdrawn routes) field as a key. Malformed -> NotifyError
    UPDATE/Invalid Network Field (RFC 7606 section 5.3: session reset)."""
    shifts, masks = _tables(bits)
    out: list[int] = []
    append = out.append
    frombytes = int.from_bytes
    raw = bytes(data)
    n = len(raw)
    i = 0
    try:
        while i < n:
            plen = raw[i]
            j = i + 1 + ((plen + 7) >> 3)
            if j > n:
                raise NotifyError(UPDATE_ERROR, INVALID_NETWORK, "prefix overruns the NLRI field")
            append(((frombytes(raw[i + 1 : j], "big") << shifts[plen]) & masks[plen]) | plen)
            i = j
    except IndexError:  # plen > bits
        raise NotifyError(
            UPDATE_ERROR, INVALID_NETWORK, f"prefix length {raw[i]} > {bits}"
        ) from None
    return out


def encode_prefix(key: int, bits: int = 32) -> bytes:
    plen = key & 0xFF
    nb = (plen + 7) >> 3
    return bytes([plen]) + ((key >> 8) >> (bits - 8 * nb)).to_bytes(nb, "big")


def encode_prefixes(keys: list[int], bits: int = 32) -> bytes:
    return b"".join(encode_prefix(k, bits) for k in keys)


def key_of(prefix: str) -> tuple[int, int]:
    """'10.77.1.0/24' -> (4, key); '::/0' -> (6, key). Host bits must be zero."""
    net = ipaddress.ip_network(prefix, strict=True)
    return net.version, (int(net.network_address) << 8) | net.prefixlen


def prefix_of(key: int, version: int = 4) -> str:
    addr = key >> 8
    a = ipaddress.IPv4Address(addr) if version == 4 else ipaddress.IPv6Address(addr)
    return f"{a}/{key & 0xFF}"


def bits_of(afi: int) -> int:
    return 32 if afi == 1 else 128
