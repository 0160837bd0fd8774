"""The decoded tree: layers of encoding that remember the bytes they came from.

A `Layer` is one level of encoding (a multipart body, a JSON document, a base64+zlib string...).
It keeps its original encoded form in `raw`; `encode()` returns `raw` untouched unless the layer or
one of its descendants was changed, so an unchanged tree always gives back identical bytes.

Values inside a layer are plain Python (dict, list, str, numbers) plus two node types:
`Layer` (a nested encoding, e.g. a JSON document inside a string field) and `Field` (a named field
of a form or multipart body, which keeps its raw segment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class DecodeError(ValueError):
    """The bytes are not what their envelope says they are."""


class LimitError(DecodeError):
    """Decoding stopped at a configured limit (size, ratio, depth or time)."""

    def __init__(self, limit: str, detail: str = "") -> None:
        super().__init__(f"limit {limit} exceeded{': ' + detail if detail else ''}")
        self.limit = limit


@dataclass
class Limits:
    """Bounds that keep hostile input from costing memory, stack or time."""

    max_body: int = 8 * 1024 * 1024  # bytes of body inspected at all
    max_decompressed: int = 32 * 1024 * 1024  # bytes any one decompression may produce
    max_ratio: float = 200.0  # decompressed/compressed bytes, for inputs over 64 KiB
    max_depth: int = 64  # nesting of JSON/msgpack containers and encoding layers
    max_nodes: int = 2_000_000  # values walked in one payload
    time_budget_ms: int = 2000  # wall time for decoding and detecting one flow; 0 disables


# codec name -> function(layer) -> encoded bytes or str; filled in by keyveil.codecs.encode
ENCODERS: dict[str, Callable[[Layer], bytes | str]] = {}


class Layer:
    """One level of encoding. `codec` names the format; `meta` holds what re-encoding needs."""

    __slots__ = ("codec", "raw", "value", "dirty", "meta", "children")

    def __init__(self, codec: str, raw: bytes | str, value: Any, meta: dict | None = None) -> None:
        self.codec = codec
        self.raw = raw
        self.value = value
        self.dirty = False
        self.meta = meta or {}
        self.children: list[Layer] = []

    def __repr__(self) -> str:
        return f"Layer({self.codec}, {len(self.raw)} bytes{', dirty' if self.dirty else ''})"

    def changed(self) -> bool:
        return self.dirty or any(c.changed() for c in self.children)

    def encode(self) -> bytes | str:
        if not self.changed():
            return self.raw
        return ENCODERS[self.codec](self)

    def layers(self) -> Iterator[Layer]:
        """This layer and every nested layer, outermost first."""
        yield self
        for c in self.children:
            yield from c.layers()


class Field:
    """A named field of a url-encoded form or a multipart body."""

    __slots__ = ("name", "value", "raw", "dirty", "headers")

    def __init__(self, name: str, value: Any, raw: bytes | None, headers: bytes = b"") -> None:
        self.name = name
        self.value = value
        self.raw = raw  # the field's original bytes; None once it must be re-encoded
        self.dirty = False
        self.headers = headers  # multipart part headers (raw)

    def __repr__(self) -> str:
        return f"Field({self.name!r})"

    def changed(self) -> bool:
        return self.dirty or (isinstance(self.value, Layer) and self.value.changed())


def fields_dict(fields: list[Field]) -> dict[str, Field]:
    """First field per name."""
    out: dict[str, Field] = {}
    for f in fields:
        out.setdefault(f.name, f)
    return out


def plain(value: Any) -> Any:
    """The value with nested layers unwrapped (for reading, not for writing back)."""
    if isinstance(value, Layer):
        return plain(value.value)
    if isinstance(value, Field):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def replace_layers(value: Any, encode: Callable[[Layer], Any]) -> Any:
    """A copy of a JSON-like value with each nested Layer replaced by `encode(layer)`."""
    if isinstance(value, Layer):
        return encode(value)
    if isinstance(value, dict):
        if not any(isinstance(v, (Layer, dict, list)) for v in value.values()):
            return value
        return {k: replace_layers(v, encode) for k, v in value.items()}
    if isinstance(value, list):
        if not any(isinstance(v, (Layer, dict, list)) for v in value):
            return value
        return [replace_layers(v, encode) for v in value]
    return value
