"""Bytes in, Layer tree out: forms, multipart, JSON, msgpack and Meta's nested encodings.

Nested encodings found inside values:
- a string holding a JSON object or array (Falco `e`, GraphQL `variables`, nested JSON strings);
- a base64 string of zlib-compressed JSON (`message` with `compressed=1`);
- Banzai wads: `posts` as base64(raw Snappy(JSON)) when `compression` is `snappy_base64`, or a
  part number `"N"` naming a binary `post_N` multipart part when it is `snappy` or `deflate`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import time
from typing import Any
from urllib.parse import unquote_to_bytes

import msgpack

from keyveil.codecs import compress
from keyveil.codecs.tree import DecodeError, Field, Layer, LimitError, Limits

_B64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_ZLIB_B64_HEADS = ("eJ", "eN", "eA", "eF", "eD", "eT", "eL")  # base64 of 0x78 + FLG bytes
_BOUNDARY = re.compile(rb'boundary="?([^";,]+)"?', re.I)
_DISPOSITION_NAME = re.compile(rb'name="([^"]*)"', re.I)


class Decoder:
    """One decode of one payload: carries the limits and the node budget."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.nodes = 0
        budget = self.limits.time_budget_ms
        # the flow's deadline starts with its decoder; the pipeline checks it between stages too
        self.deadline = time.monotonic() + budget / 1000.0 if budget > 0 else float("inf")
        self._next_check = 4096

    # -- entry points ----------------------------------------------------------------------
    def body(self, body: bytes, content_type: str = "", hint: str = "auto") -> Layer | None:
        """Decode a request body. None: nothing structured here (left alone, not an error)."""
        if len(body) > self.limits.max_body:
            raise LimitError("max_body", f"{len(body)} bytes")
        if not body:
            return None
        ct = content_type.lower()
        if "multipart/form-data" in ct:
            m = _BOUNDARY.search(content_type.encode("latin-1", "replace"))
            if not m:
                raise DecodeError("multipart without boundary")
            return self.multipart(body, m.group(1))
        if "x-www-form-urlencoded" in ct:
            return self.form(body)
        if "msgpack" in ct:
            return self.msgpack(body)
        if "json" in ct:
            return self.json(body)
        # no or wrong content type: sniff
        head = body[:1]
        if head in (b"{", b"["):
            try:
                return self.json(body)
            except LimitError:
                raise
            except DecodeError:
                pass
        if hint in ("form", "banzai", "graph_logging", "pixel") and b"=" in body[:512]:
            return self.form(body)
        if hint == "msgpack":
            return self.msgpack(body)
        return None

    def query(self, query: str) -> Layer:
        """A URL query string as a form layer (Pixel GET hits)."""
        return self.form(query.encode("latin-1", "surrogateescape"), codec="query")

    # -- formats ---------------------------------------------------------------------------
    def json(self, raw: bytes | str, depth: int = 0) -> Layer:
        self._depth(depth)
        esc = "\\u" if isinstance(raw, str) else b"\\u"
        layer = Layer("json", raw, None, {"ascii": esc in raw and raw.isascii()})
        # Nested encodings are found while the C parser builds each object (object_hook), so the
        # numbers and plain strings of a payload are never visited one by one in Python.
        hook = self._object_hook(layer, depth + 1)
        try:
            value = json.loads(raw, object_hook=hook)
        except RecursionError:  # deeper than the interpreter's stack: a depth limit, not bad JSON
            raise LimitError("max_depth", "json nesting beyond the recursion limit") from None
        except DecodeError:  # a limit reached inside a nested encoding
            raise
        except ValueError as e:
            raise DecodeError(f"json: {e.__class__.__name__}") from None
        if type(value) is list:
            self._sniff_list(value, layer, depth + 1, 0)
        layer.value = value
        return layer

    def _object_hook(self, layer: Layer, depth: int) -> Any:
        def hook(d: dict) -> dict:
            self._count(1 + len(d))
            for k, v in d.items():
                tv = type(v)
                if tv is str:
                    if len(v) > 1 and (v[0] in "{[" or v[:2] in _ZLIB_B64_HEADS):
                        d[k] = self._string(v, layer, depth)
                elif tv is list and v:
                    self._sniff_list(v, layer, depth, 0)
            posts = d.get("posts")
            if type(posts) is str and d.get("compression") == "snappy_base64":
                d["posts"] = self._snappy_b64(posts, layer, depth)
            return d

        return hook

    def _sniff_list(self, lst: list, layer: Layer, depth: int, nest: int) -> None:
        """Strings holding an encoding in a list, and in lists inside it (objects got their hook)."""
        if nest > self.limits.max_depth:
            raise LimitError("max_depth", f"nesting over {self.limits.max_depth}")
        self._count(len(lst))
        for i, v in enumerate(lst):
            tv = type(v)
            if tv is str:
                if len(v) > 1 and (v[0] in "{[" or v[:2] in _ZLIB_B64_HEADS):
                    lst[i] = self._string(v, layer, depth)
            elif tv is list and v:
                self._sniff_list(v, layer, depth, nest + 1)

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > self.limits.max_nodes:
            raise LimitError("max_nodes", f"over {self.limits.max_nodes} values")
        if self.nodes >= self._next_check:  # the clock is read every few thousand values, not each
            self._next_check = self.nodes + 4096
            self.check_time()

    def msgpack(self, raw: bytes, depth: int = 0) -> Layer:
        self._depth(depth)
        try:
            value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except msgpack.StackError:  # msgpack's own nesting cap (1024)
            raise LimitError("max_depth", "msgpack nesting") from None
        except Exception as e:  # msgpack raises several unrelated types on bad input
            raise DecodeError(f"msgpack: {e.__class__.__name__}") from None
        layer = Layer("msgpack", raw, None)
        layer.value = self._walk(value, layer, depth + 1)
        return layer

    def form(self, raw: bytes, depth: int = 0, codec: str = "form") -> Layer:
        self._depth(depth)
        layer = Layer(codec, raw, None)
        fields: list[Field] = []
        if raw:
            for seg in raw.split(b"&"):
                self.check_time()
                k, eq, v = seg.partition(b"=")
                name = _unquote(k)
                value: Any = _unquote(v) if eq else ""
                field = Field(name, value, seg)
                field.value = self._string(value, layer, depth + 1) if value else value
                fields.append(field)
        layer.value = fields
        # mobile loggers: message = base64(zlib(JSON)) when compressed=1 (also found by sniffing)
        return layer

    def multipart(self, raw: bytes, boundary: bytes, depth: int = 0) -> Layer:
        self._depth(depth)
        first = raw.find(b"--" + boundary)
        if first < 0:
            raise DecodeError("multipart: boundary not found")
        delim = b"\r\n--" + boundary
        pieces = raw[first + 2 + len(boundary) :].split(delim)
        if not pieces[-1].startswith(b"--"):
            raise DecodeError("multipart: no closing boundary")
        layer = Layer("multipart", raw, None, {"boundary": boundary, "preamble": raw[:first], "end": pieces[-1]})
        fields: list[Field] = []
        for piece in pieces[:-1]:
            self.check_time()
            head, sep, content = piece.partition(b"\r\n\r\n")
            if not sep or not head.startswith(b"\r\n"):
                raise DecodeError("multipart: malformed part")
            m = _DISPOSITION_NAME.search(head)
            name = m.group(1).decode("utf-8", "replace") if m else ""
            value: Any = content
            with contextlib.suppress(UnicodeDecodeError):
                value = content.decode("utf-8")
            field = Field(name, value, piece, headers=head)
            if isinstance(value, str) and value:
                field.value = self._string(value, layer, depth + 1, as_bytes=content)
            fields.append(field)
        layer.value = fields
        self._banzai_parts(layer, fields, depth)
        return layer

    # -- nested values ---------------------------------------------------------------------
    def _walk(self, value: Any, parent: Layer, depth: int) -> Any:
        """Replace strings that hold an encoding by Layers, in place; count nodes."""
        self.nodes += 1 + (len(value) if isinstance(value, (dict, list)) else 0)  # children counted up front
        if self.nodes > self.limits.max_nodes:
            raise LimitError("max_nodes", f"over {self.limits.max_nodes} values")
        if self.nodes >= self._next_check:  # the clock is read every few thousand values, not each
            self._next_check = self.nodes + 4096
            self.check_time()
        if isinstance(value, dict):
            self._depth(depth)
            for k, v in value.items():
                if isinstance(v, str):
                    if len(v) > 1:
                        value[k] = self._string(v, parent, depth + 1)
                elif isinstance(v, (dict, list)):
                    value[k] = self._walk(v, parent, depth + 1)
            posts = value.get("posts")
            if isinstance(posts, str) and value.get("compression") == "snappy_base64":
                value["posts"] = self._snappy_b64(posts, parent, depth + 1)
        elif isinstance(value, list):
            self._depth(depth)
            for i, v in enumerate(value):
                if isinstance(v, str):
                    if len(v) > 1:
                        value[i] = self._string(v, parent, depth + 1)
                elif isinstance(v, (dict, list)):
                    value[i] = self._walk(v, parent, depth + 1)
        return value

    def _string(self, s: str, parent: Layer, depth: int, as_bytes: bytes | None = None) -> Any:
        """A string, or a Layer when the string holds JSON or base64(zlib(JSON))."""
        first = s[0]
        if first in "{[" and s[-1] in "}]":
            try:
                child = self.json(as_bytes if as_bytes is not None else s, depth)
            except LimitError:
                raise
            except DecodeError:
                return s
            if isinstance(child.value, (dict, list)):
                parent.children.append(child)
                return child
            return s
        if len(s) >= 12 and s[:2] in _ZLIB_B64_HEADS and _B64.fullmatch(s):
            child = self._b64zlib(s, depth)
            if child is not None:
                parent.children.append(child)
                return child
        return s

    def _b64zlib(self, s: str, depth: int) -> Layer | None:
        self._depth(depth)
        try:
            data = _b64decode(s)
            inner = compress.inflate(data, self.limits)
            child = self.json(inner, depth + 1)
        except LimitError:
            raise
        except DecodeError:
            return None
        layer = Layer("b64zlib", s, child, {**_b64_style(s), "level": compress.zlib_level(data[:2])})
        layer.children.append(child)
        return layer

    def _snappy_b64(self, s: str, parent: Layer, depth: int) -> Any:
        self._depth(depth)
        try:
            data = _b64decode(s)
            inner = compress.snappy_decompress(data, self.limits)
            child = self.json(inner, depth + 1)
        except LimitError:
            raise
        except DecodeError:
            return s
        layer = Layer("snappy_b64", s, child, _b64_style(s))
        layer.children.append(child)
        parent.children.append(layer)
        return layer

    def _banzai_parts(self, layer: Layer, fields: list[Field], depth: int) -> None:
        """Decode `post_N` parts that Banzai wads in `q` point to (compression snappy/deflate)."""
        q = next((f for f in fields if f.name == "q"), None)
        if q is None or not isinstance(q.value, Layer) or not isinstance(q.value.value, list):
            return
        by_name = {f.name: f for f in fields}
        for wad in q.value.value:
            if not isinstance(wad, dict):
                continue
            comp = wad.get("compression")
            ref = wad.get("posts")
            if comp not in ("snappy", "deflate") or not isinstance(ref, (str, int)):
                continue
            part = by_name.get(f"post_{ref}")
            if part is None or isinstance(part.value, Layer):
                continue
            data = part.value.encode("utf-8", "surrogateescape") if isinstance(part.value, str) else part.value
            child = self._binary_posts(data, comp, depth + 1)
            if child is not None:
                part.value = child
                layer.children.append(child)

    def _binary_posts(self, data: bytes, comp: str, depth: int) -> Layer | None:
        self._depth(depth)
        try:
            if comp == "snappy":
                inner = compress.snappy_decompress(data, self.limits)
                meta: dict = {}
            else:
                try:
                    inner = compress.inflate(data, self.limits)
                    meta = {"wbits": 15, "level": compress.zlib_level(data[:2])}
                except LimitError:
                    raise
                except DecodeError:
                    inner = compress.inflate(data, self.limits, wbits=-15)
                    meta = {"wbits": -15, "level": 6}
            child = self.json(inner, depth + 1)
        except LimitError:
            raise
        except DecodeError:
            return None
        layer = Layer(comp, data, child, meta)
        layer.children.append(child)
        return layer

    def check_time(self) -> None:
        """Cooperative time budget: raise once the flow's deadline has passed."""
        if time.monotonic() > self.deadline:
            raise LimitError("time_budget", f"over {self.limits.time_budget_ms} ms")

    def _depth(self, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise LimitError("max_depth", f"nesting over {self.limits.max_depth}")


def _unquote(b: bytes) -> str:
    return unquote_to_bytes(b.replace(b"+", b" ")).decode("utf-8", "surrogateescape")


def _b64decode(s: str) -> bytes:
    t = s.replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"base64: {e}") from None


def _b64_style(s: str) -> dict:
    # a string whose length needs no padding tells nothing: write padding then, as btoa does
    return {"urlsafe": "-" in s or "_" in s, "padded": s.endswith("=") or len(s) % 4 == 0}


def decode_body(body: bytes, content_type: str = "", hint: str = "auto", limits: Limits | None = None) -> Layer | None:
    return Decoder(limits).body(body, content_type, hint)
