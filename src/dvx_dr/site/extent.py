"""The extent: how one blob lies in a segment file.

Format version 1. All integers little-endian::

    offset  size  field
    0       2     magic  b"DX"
    2       1     format version (1)
    3       1     flags: bit 0 = payload is zstd-compressed, bit 1 = payload is AES-256-XTS
                  encrypted; other bits must be zero
    4       4     key version (0 when not encrypted)
    8       4     payload length (bytes of the compressed-or-plain payload)
    12      4     stored length (bytes that follow the header; == payload length, or
                  max(16, payload length) when encrypted: short payloads are zero-padded to
                  one AES block)
    16      ...   stored bytes

The payload is ``zstd(plaintext)`` when that is smaller, else the plaintext; when encrypted,
the stored bytes are ``AES-256-XTS(key[key version], tweak = (segment, offset of this
header), payload)``. The header holds no plaintext-derived value but the payload length,
which any stored length reveals anyway. Nothing in the header is trusted: every read checks
``SHA-256(plaintext) == id``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dvx_dr.errors import FormatError, IntegrityError

MAGIC = b"DX"
VERSION = 1
HEADER = struct.Struct("<2sBBIII")
HEADER_SIZE = HEADER.size
FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_ENCRYPTED
#: One extent is one XTS data unit: at most 2**20 AES blocks.
MAX_STORED = 1 << 24
XTS_MIN = 16


@dataclass(frozen=True, slots=True)
class ExtentHeader:
    flags: int
    key_version: int
    payload_len: int
    stored_len: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def total_len(self) -> int:
        return HEADER_SIZE + self.stored_len


def stored_length(payload_len: int, encrypted: bool) -> int:
    return max(XTS_MIN, payload_len) if encrypted else payload_len


def pack_header(flags: int, key_version: int, payload_len: int) -> bytes:
    stored = stored_length(payload_len, bool(flags & FLAG_ENCRYPTED))
    if stored > MAX_STORED:
        raise ValueError(f"extent payload of {payload_len} bytes exceeds one XTS data unit")
    return HEADER.pack(MAGIC, VERSION, flags, key_version, payload_len, stored)


def pad(payload: bytes) -> bytes:
    """Zero-pad a payload to one AES block (XTS needs at least 16 bytes)."""
    return payload + bytes(XTS_MIN - len(payload)) if len(payload) < XTS_MIN else payload


def unpack_header(data: bytes, where: str) -> ExtentHeader:
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"{where}: extent header is truncated")
    magic, version, flags, key_version, payload_len, stored = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"{where}: no extent header here (bad magic)")
    if version != VERSION:
        raise FormatError(
            f"{where}: extent format version {version} is not known to this dvx-dr "
            f"(it reads version {VERSION}); upgrade dvx-dr"
        )
    if flags & ~KNOWN_FLAGS:
        raise IntegrityError(f"{where}: extent header has unknown flags {flags:#x}")
    encrypted = bool(flags & FLAG_ENCRYPTED)
    if stored != stored_length(payload_len, encrypted) or stored > MAX_STORED:
        raise IntegrityError(f"{where}: extent header lengths are inconsistent")
    return ExtentHeader(flags, key_version, payload_len, stored)
