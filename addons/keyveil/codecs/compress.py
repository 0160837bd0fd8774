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
    _zlib_pass(data, limits.max_decompressed, "max_decompressed", wbits, keep=False)  # a bomb costs one step
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


# -- HTTP Content-Encoding ------------------------------------------------------------------------
# mitmproxy's `message.content` inflates the whole body into memory (and caches it), so a 256 MiB
# gzip of zeros would cost 256 MiB. The addon decodes `raw_content` with this instead.


def decode_content(data: bytes, encoding: str, limits: Limits) -> bytes:
    """Undo a Content-Encoding header (gzip, deflate, br, zstd, identity; comma lists), never
    producing more than min(max_body, max_decompressed) bytes."""
    if limits.max_body < limits.max_decompressed:
        cap, name = limits.max_body, "max_body"
    else:
        cap, name = limits.max_decompressed, "max_decompressed"
    out = data
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):  # the last coding listed was applied last
        if coding == "identity" or not out:
            continue
        if coding in ("gzip", "x-gzip"):
            out = _zlib_members(out, cap, name, 31)
        elif coding == "deflate":  # zlib-wrapped by the spec, raw deflate by some clients
            try:
                out = _zlib_members(out, cap, name, zlib.MAX_WBITS)
            except LimitError:
                raise
            except DecodeError:
                out = _zlib_members(out, cap, name, -zlib.MAX_WBITS)
        elif coding == "br":
            out = _into(cramjam.brotli, out, cap, name)
        elif coding == "zstd":
            out = _into(cramjam.zstd, out, cap, name)
        else:
            raise DecodeError(f"content-encoding {coding!r} is not supported")
        _check_ratio(len(out), len(data), limits)
    return out


_STEP = 256 * 1024  # inflate in steps of this many bytes


def _zlib_members(data: bytes, cap: int, name: str, wbits: int) -> bytes:
    _zlib_pass(data, cap, name, wbits, keep=False)  # count first: a bomb costs one step, not cap bytes
    return _zlib_pass(data, cap, name, wbits, keep=True)


def _zlib_pass(data: bytes, cap: int, name: str, wbits: int, keep: bool) -> bytes:
    parts: list[bytes] = []
    size = 0
    rest = data
    while True:  # gzip may hold several members
        d = zlib.decompressobj(wbits)
        buf = rest
        while not d.eof:
            try:
                chunk = d.decompress(buf, _STEP)
            except zlib.error as e:
                raise DecodeError(f"{'gzip' if wbits == 31 else 'deflate'}: {e}") from None
            size += len(chunk)
            if size > cap:
                raise LimitError(name, f"content-encoding output over {cap} bytes")
            if keep:
                parts.append(chunk)
            buf = d.unconsumed_tail
            if not buf and not chunk:
                break
        if not d.eof:
            raise DecodeError("content-encoding: truncated stream")
        rest = d.unused_data
        if not rest or wbits != 31 or not rest.startswith(b"\x1f\x8b"):
            break  # anything else after the stream is ignored, as curl does
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _into(module: object, data: bytes, cap: int, name: str) -> bytes:
    """cramjam decompresses into a fixed buffer and stops when it is full: memory stays under cap.
    The buffer starts small and grows, so ordinary bodies do not pay for a cap-sized buffer."""
    size = min(cap + 1, max(64 * 1024, 8 * len(data)))
    while True:
        buf = bytearray(size)
        try:
            n = module.decompress_into(data, buf)  # type: ignore[attr-defined]
        except Exception as e:  # cramjam.DecompressionError, for a full buffer and for bad data
            if "whole buffer" not in str(e):
                raise DecodeError(f"content-encoding: {e}") from None
            if size > cap:
                raise LimitError(name, f"content-encoding output over {cap} bytes") from None
            size = min(cap + 1, size * 4)
            continue
        if n > cap:
            raise LimitError(name, f"content-encoding output over {cap} bytes")
        return bytes(buf[:n])
