"""Bounded decompression: zlib/deflate and raw Snappy, never inflating past a limit."""

from __future__ import annotations

import zlib

import cramjam

from keyveil.codecs.tree import DecodeError, LimitError, Limits

_RATIO_FLOOR = 64 * 1024  # small inputs may legitimately expand a lot (JSON of zeros)


def _check_ratio(out_len: int, in_len: int, limits: Limits) -> None:
    if out_len > _RATIO_FLOOR and out_len > limits.max_ratio * max(in_len, 1):
        raise LimitError("max_ratio", f"{out_len} bytes from {in_len}")


def inflate(data: bytes, limits: Limits, wbits: int = zlib.MAX_WBITS) -> bytes:
    """zlib (wbits 15) or raw deflate (wbits -15), stopping at limits.max_decompressed."""
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, limits.max_decompressed + 1)
    except zlib.error as e:
        raise DecodeError(f"zlib: {e}") from None
    if len(out) > limits.max_decompressed or d.unconsumed_tail:
        raise LimitError("max_decompressed", f"over {limits.max_decompressed} bytes")
    if not d.eof:
        raise DecodeError("zlib: truncated stream")
    if d.unused_data:
        raise DecodeError("zlib: trailing bytes after stream")
    _check_ratio(len(out), len(data), limits)
    return out


def zlib_level(header: bytes) -> int:
    """The compression level a zlib header announces, so a re-encode writes the same header."""
    if len(header) < 2:
        return 6
    return {0: 1, 1: 5, 2: 6, 3: 9}[(header[1] >> 6) & 3]


def deflate(data: bytes, level: int = 6, wbits: int = zlib.MAX_WBITS) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


def snappy_length(data: bytes) -> int:
    """The uncompressed length a raw Snappy stream announces in its varint preamble."""
    n = shift = 0
    for i, b in enumerate(data[:5]):
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
        shift += 7
        if i == 4:
            break
    raise DecodeError("snappy: bad length preamble")


def snappy_decompress(data: bytes, limits: Limits) -> bytes:
    length = snappy_length(data)
    if length > limits.max_decompressed:
        raise LimitError("max_decompressed", f"snappy announces {length} bytes")
    _check_ratio(length, len(data), limits)
    try:
        out = bytes(cramjam.snappy.decompress_raw(data))
    except Exception as e:  # cramjam raises its own DecompressionError
        raise DecodeError(f"snappy: {e}") from None
    if len(out) != length:
        raise DecodeError("snappy: length mismatch")
    return out


def snappy_compress(data: bytes) -> bytes:
    return bytes(cramjam.snappy.compress_raw(data))
