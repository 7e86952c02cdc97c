# Type stubs for the Cython module hotpath._records (_records.pyx; its C contract is
# _records.pxd). mypy cannot read .pyx; `make lint` runs stubtest, which checks these
# against the build.

from collections.abc import Iterable
from typing import TypeAlias

# Readers take any bytes-like object: LMDB hands out bytes or memoryviews.
_Buffer: TypeAlias = bytes | bytearray | memoryview
# total_fen, remaining_fen, created_at_ms, expires_at_ms, count, claimed, kind, status, flags
_EnvelopeHeader: TypeAlias = tuple[int, int, int, int, int, int, int, int, int]

ENVELOPE_HEADER_SIZE: int
GRAB_RECORD_SIZE: int
TRANSFER_HEADER_SIZE: int

def pack_i64(v: int) -> bytes: ...
def unpack_i64(buf: _Buffer) -> int: ...
def add_fen(a: int, b: int) -> int: ...
def debit_ok(balance_fen: int, amount_fen: int) -> bool: ...
def pack_envelope(
    total_fen: int,
    remaining_fen: int,
    created_at_ms: int,
    expires_at_ms: int,
    count: int,
    claimed: int,
    kind: int,
    status: int,
    flags: int,
    shares: Iterable[int],
) -> bytes: ...
def unpack_envelope(
    buf: _Buffer,
) -> tuple[int, int, int, int, int, int, int, int, int, tuple[int, ...]]: ...
def envelope_header(buf: _Buffer) -> _EnvelopeHeader: ...
def claim_share(buf: _Buffer, status_sold_out: int) -> tuple[bytes, int, int]: ...
def pack_grab(
    amount_fen: int, grabbed_at_ms: int, share_index: int, flags: int, request_digest: bytes
) -> bytes: ...
def unpack_grab(buf: _Buffer) -> tuple[int, int, int, int, bytes]: ...
def pack_transfer(
    amount_fen: int,
    created_at_ms: int,
    kind: int,
    debit_account: bytes,
    credit_account: bytes,
    ref: bytes,
) -> bytes: ...
def unpack_transfer(buf: _Buffer) -> tuple[int, int, int, bytes, bytes, bytes]: ...
