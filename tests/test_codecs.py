"""Codecs: byte-identical round trips, and same-format re-encoding after a change."""

from __future__ import annotations

import base64
import json
import zlib
from urllib.parse import parse_qsl, urlencode

import cramjam
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import banzai_fixture
from keyveil.codecs import DecodeError, Decoder, Layer, LimitError, Limits, decode_body, plain


def _field(layer: Layer, name: str):
    return next(f for f in layer.value if f.name == name)


def multipart(parts: list[tuple[str, bytes]], boundary: str = "----WebKitFormBoundaryAbC123") -> tuple[str, bytes]:
    out = b""
    for name, content in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", out


def parsed(posts: list) -> list:
    """POSTS as the decoder sees them: JSON strings inside are parsed."""
    return json.loads(json.dumps(posts), object_hook=lambda d: {k: json.loads(v) if k == "e" else v for k, v in d.items()})


POSTS = [
    ["falco:web_time_spent_bit_array", {"e": json.dumps({"tos_array": [7, 0], "tos_len": 64}), "t": 1737333649685.7}, 1737333755505.6, 0, 140],
    ["falco:ods_web_batch", {"e": '{"counters":{"a":1}}'}, 1737333755506, 0, 40],
]


class TestRoundTrip:
    @pytest.mark.parametrize("i", range(7))
    def test_real_fixture_bodies_identical(self, i):
        ct, body = banzai_fixture()[i]
        layer = decode_body(body, ct)
        assert layer is not None and layer.codec == "multipart"
        assert layer.encode() == body
        assert len(list(layer.layers())) >= 3  # multipart > q json > e json

    def test_fixture_snappy_base64_is_decoded(self):
        codecs = {c for ct, body in banzai_fixture() for c in (lay.codec for lay in decode_body(body, ct).layers())}
        assert {"multipart", "json", "snappy_b64"} <= codecs

    def test_form(self):
        body = b"__a=1&q=%5B%7B%22a%22%3A1%7D%5D&ph=C3&msg=h%C3%A9llo+w%20x&flag"
        layer = decode_body(body, "application/x-www-form-urlencoded")
        assert layer.encode() == body
        assert plain(_field(layer, "q").value) == [{"a": 1}]
        assert _field(layer, "msg").value == "héllo w x"

    def test_json_keeps_float_and_unicode_spelling(self):
        body = b'{"t":1737333755568.9001,"s":"\\u00e9t\\u00e9","n":[1,2.50,3e2]}'
        assert decode_body(body, "application/json").encode() == body

    def test_msgpack(self):
        body = msgpack.packb({"events": [{"name": "x", "t": [1, 2, 3]}], "bin": b"\x00\x01"}, use_bin_type=True)
        layer = decode_body(body, "application/x-msgpack")
        assert layer.codec == "msgpack" and layer.encode() == body

    def test_b64zlib_message(self):
        message = json.dumps({"data": [{"name": "instagram_organic_time_spent", "extra": {"timespent_in_ms": 5}}]})
        b64 = base64.b64encode(zlib.compress(message.encode(), 9)).decode()
        body = urlencode({"access_token": "tok", "compressed": "1", "message": b64, "format": "json"}).encode()
        layer = decode_body(body, "application/x-www-form-urlencoded")
        assert [lay.codec for lay in layer.layers()] == ["form", "b64zlib", "json"]
        assert layer.encode() == body

    def test_snappy_base64_wad(self):
        posts = json.dumps(POSTS, separators=(",", ":")).encode()
        wad = {"app_id": "1", "posts": base64.b64encode(bytes(cramjam.snappy.compress_raw(posts))).decode(),
               "compression": "snappy_base64", "send_method": "beacon"}
        ct, body = multipart([("ts", b"1737333755506"), ("q", json.dumps([wad]).encode())])
        layer = decode_body(body, ct)
        assert "snappy_b64" in [lay.codec for lay in layer.layers()]
        assert layer.encode() == body

    @pytest.mark.parametrize("comp", ["snappy", "deflate"])
    def test_post_n_binary_parts(self, comp):
        posts = json.dumps(POSTS, separators=(",", ":")).encode()
        data = bytes(cramjam.snappy.compress_raw(posts)) if comp == "snappy" else zlib.compress(posts)
        q = json.dumps([{"app_id": "1", "posts": "0", "compression": comp}]).encode()
        ct, body = multipart([("ts", b"1"), ("q", q), ("post_0", data)])
        layer = decode_body(body, ct)
        part = _field(layer, "post_0")
        assert isinstance(part.value, Layer) and part.value.codec == comp
        assert plain(part.value) == parsed(POSTS)
        assert layer.encode() == body


class TestReencode:
    """A changed tree re-encodes in the same format and compression."""

    def _strip_first_post(self, posts_layer: Layer) -> None:
        del posts_layer.value[0]
        posts_layer.dirty = True

    def test_multipart_part_changes_others_stay(self):
        ct, body = multipart([("ts", b"17"), ("q", json.dumps([{"posts": POSTS}]).encode()), ("x", b"keep\r\nme")])
        layer = decode_body(body, ct)
        q = _field(layer, "q").value
        del q.value[0]["posts"][0]
        q.dirty = True
        out = layer.encode()
        again = decode_body(out, ct)
        assert plain(_field(again, "q").value)[0]["posts"] == parsed([POSTS[1]])
        assert _field(again, "x").value == "keep\r\nme" and _field(again, "ts").value == "17"
        assert out.count(b"------WebKitFormBoundaryAbC123") == 4

    def test_snappy_base64_recompressed(self):
        posts = json.dumps(POSTS).encode()
        wad = {"posts": base64.b64encode(bytes(cramjam.snappy.compress_raw(posts))).decode(), "compression": "snappy_base64"}
        layer = decode_body(json.dumps([wad]).encode(), "application/json")
        inner = layer.value[0]["posts"]
        assert inner.codec == "snappy_b64"
        self._strip_first_post(inner.value)
        out = json.loads(layer.encode())
        raw = bytes(cramjam.snappy.decompress_raw(base64.b64decode(out[0]["posts"])))
        assert json.loads(raw) == [POSTS[1]]  # the e string is written back as a string
        assert out[0]["compression"] == "snappy_base64"

    @pytest.mark.parametrize("comp", ["snappy", "deflate"])
    def test_post_n_recompressed(self, comp):
        posts = json.dumps(POSTS).encode()
        data = bytes(cramjam.snappy.compress_raw(posts)) if comp == "snappy" else zlib.compress(posts, 9)
        ct, body = multipart([("q", json.dumps([{"posts": "0", "compression": comp}]).encode()), ("post_0", data)])
        layer = decode_body(body, ct)
        part = _field(layer, "post_0").value
        self._strip_first_post(part.value)
        again = decode_body(layer.encode(), ct)
        new = _field(again, "post_0").value
        assert new.codec == comp and plain(new) == parsed([POSTS[1]])
        if comp == "deflate":
            assert new.raw[:2] == data[:2]  # same zlib header: same level

    def test_b64zlib_recompressed(self):
        msg = {"data": [{"name": "a"}, {"name": "b"}]}
        b64 = base64.b64encode(zlib.compress(json.dumps(msg).encode())).decode()
        body = urlencode({"compressed": "1", "message": b64}).encode()
        layer = decode_body(body, "application/x-www-form-urlencoded")
        js = _field(layer, "message").value.value
        del js.value["data"][0]
        js.dirty = True
        fields = dict(parse_qsl(layer.encode().decode()))
        assert json.loads(zlib.decompress(base64.b64decode(fields["message"]))) == {"data": [{"name": "b"}]}
        assert fields["compressed"] == "1"

    def test_form_only_changed_field_is_requoted(self):
        body = b"a=x%2Fy&variables=%7B%22k%22%3A1%2C%22d%22%3A2%7D&z=%7e"
        layer = decode_body(body, "application/x-www-form-urlencoded")
        v = _field(layer, "variables").value
        del v.value["d"]
        v.dirty = True
        out = layer.encode()
        assert out.startswith(b"a=x%2Fy&") and out.endswith(b"&z=%7e")
        assert dict(parse_qsl(out.decode()))["variables"] == '{"k":1}'


class TestBadInput:
    @pytest.mark.parametrize(
        "body,ct",
        [
            (b'{"a": [1, 2', "application/json"),
            (b"\x93\x01", "application/x-msgpack"),
            (b'--B\r\nContent-Disposition: form-data; name="q"\r\n\r\n[1]', 'multipart/form-data; boundary="B"'),
            (b"x", "multipart/form-data"),
        ],
    )
    def test_decode_error(self, body, ct):
        with pytest.raises(DecodeError):
            decode_body(body, ct)

    def test_deep_nesting_is_a_limit_not_a_crash(self):
        with pytest.raises(DecodeError):
            decode_body(b"[" * 200_000 + b"]" * 200_000, "application/json")

    def test_zlib_bomb_stops_at_limit(self):
        bomb = base64.b64encode(zlib.compress(b"[" + b"0," * 5_000_000 + b"0]", 9)).decode()
        with pytest.raises(LimitError):
            Decoder(Limits(max_decompressed=1_000_000)).form(urlencode({"message": bomb}).encode())

    def test_body_limit(self):
        with pytest.raises(LimitError) as e:
            decode_body(b"{}" * 100, "application/json", limits=Limits(max_body=10))
        assert e.value.limit == "max_body"

    def test_corrupt_nested_encodings_stay_strings(self):
        body = urlencode({"message": "eJzLSM3JyVcozy/KSQEAGgQEXQ=="[:-6] + "AAAA", "e": "{not json}"}).encode()
        layer = decode_body(body, "application/x-www-form-urlencoded")
        assert all(isinstance(f.value, str) for f in layer.value)
        assert layer.encode() == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(json_values, st.booleans())
    def test_json_round_trip(self, value, ascii_):
        body = json.dumps({"v": value, "nested": json.dumps(value)}, ensure_ascii=ascii_).encode()
        assert decode_body(body, "application/json").encode() == body

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.text(max_size=10), st.text(max_size=30)), max_size=8))
    def test_form_round_trip(self, pairs):
        body = urlencode(pairs).encode()
        layer = decode_body(body, "application/x-www-form-urlencoded")
        assert layer is None or layer.encode() == body

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.tuples(st.from_regex(r"[a-z_0-9]{1,8}", fullmatch=True), st.binary(max_size=40)), max_size=5))
    def test_multipart_round_trip(self, parts):
        parts = [(n, c) for n, c in parts if b"--XyZ" not in c]
        ct, body = multipart(parts, boundary="XyZ")
        assert decode_body(body, ct).encode() == body

    @settings(max_examples=100, deadline=None)
    @given(json_values)
    def test_msgpack_round_trip(self, value):
        body = msgpack.packb({"v": value}, use_bin_type=True)
        assert decode_body(body, "application/msgpack").encode() == body
