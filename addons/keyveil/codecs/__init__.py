"""Codecs: bytes in, a tree of layers out, and back to identical bytes when nothing changed."""

from keyveil.codecs import encode as _encode  # noqa: F401  (registers the encoders)
from keyveil.codecs.decode import Decoder, decode_body
from keyveil.codecs.tree import DecodeError, Field, Layer, LimitError, Limits, fields_dict, plain

__all__ = ["Decoder", "DecodeError", "Field", "Layer", "LimitError", "Limits", "decode_body", "fields_dict", "plain"]
