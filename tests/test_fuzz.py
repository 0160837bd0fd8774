"""Fuzzing (hypothesis): random and mutated payloads through the decoder, the detector and the pipeline.

Properties, for any bytes at all:
- decoding raises nothing but DecodeError (LimitError is one);
- where decoding succeeds, the tree encodes back to the exact input bytes;
- the detector accepts every tree the decoder builds;
- Pipeline.process never raises; a functional request is either passed unchanged or re-encoded into a
  body that still decodes; a telemetry request is always answered locally (dropped).

Mutations start from the real Banzai bodies in tests/fixtures and from generated forms, JSON,
msgpack, multipart and snappy_base64 wads. Bounded: the whole file runs in well under a minute.
"""

from __future__ import annotations

import base64
import json
import zlib
from urllib.parse import quote

import cramjam
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CONFIG, banzai_fixture
from keyveil.codecs import DecodeError, Decoder, Layer, Limits
from keyveil.codecs.compress import decode_content
from keyveil.pipeline import Pipeline, Request

PIPE = Pipeline.from_config_dir(CONFIG)
SMALL = Limits(max_body=256 * 1024, max_decompressed=512 * 1024, max_depth=32, max_nodes=20_000, time_budget_ms=0)
FIXTURES = banzai_fixture()
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONTENT_TYPES = ["application/x-www-form-urlencoded", "application/json", "application/x-msgpack", "text/plain", "",
                 "multipart/form-data; boundary=----kvB", "multipart/form-data; boundary=\"b\"", "application/json; charset=utf-8"]
HINTS = ["auto", "banzai", "form", "json", "msgpack", "graph_logging", "pixel"]
URLS = {  # url -> kind
    "https://www.facebook.com/ajax/bz": "telemetry",
    "https://www.instagram.com/logging/falco": "telemetry",
    "https://graph.facebook.com/logging_client_events": "telemetry",
    "https://www.facebook.com/tr/": "telemetry",
    "https://www.facebook.com/api/graphql/": "functional",
    "https://i.instagram.com/api/v1/direct_v2/threads/broadcast/text/": "functional",
    "https://www.facebook.com/ajax/some_new_logger/": "uncataloged",
}

# -- strategies -------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.sampled_from(["keydown", "click", "mousemove", "scroll", "clientX", "tos_array"]),
    st.integers(1_737_333_000_000, 1_737_334_000_000),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=8), st.sampled_from(["name", "extra", "time", "clientX", "t", "e", "posts"])),
                        inner, max_size=6),
    ),
    max_leaves=40,
)
timings = st.lists(st.integers(30, 400), min_size=4, max_size=12).map(
    lambda gaps: [1_737_333_755_000 + sum(gaps[: i + 1]) for i in range(len(gaps))])


@st.composite
def banzai_wad(draw: st.DrawFn) -> list:
    posts = [[draw(st.sampled_from(["falco:keystroke_x", "click_ref_logger", "falco:ods_web_batch", "scroll_depth"])),
              draw(st.one_of(json_values, timings.map(lambda t: {"t": t}))), draw(st.integers(0, 2**41)),
              draw(st.integers(0, 3)), draw(st.integers(0, 999))] for _ in range(draw(st.integers(0, 3)))]
    wad: dict = {"user": "0", "posts": posts}
    if draw(st.booleans()):
        wad = {"compression": "snappy_base64", "posts": base64.b64encode(
            bytes(cramjam.snappy.compress_raw(json.dumps(posts, separators=(",", ":")).encode()))).decode()}
    return [wad]


def form(pairs: list[tuple[str, str]]) -> bytes:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs).encode()


def multipart(parts: list[tuple[str, bytes]], boundary: bytes = b"----kvB") -> bytes:
    out = b""
    for name, content in parts:
        out += b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@st.composite
def generated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A well-formed payload in one of the formats Meta uses, with content type."""
    kind = draw(st.sampled_from(["json", "form", "msgpack", "multipart", "b64zlib", "snappy_form"]))
    value = draw(json_values)
    if kind == "json":
        return "application/json", json.dumps(value, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
    if kind == "msgpack":
        return "application/x-msgpack", msgpack.packb(value, use_bin_type=True)
    if kind == "b64zlib":
        msg = base64.b64encode(zlib.compress(json.dumps(value).encode())).decode()
        return "application/x-www-form-urlencoded", form([("compressed", "1"), ("message", msg)])
    wad = draw(banzai_wad())
    if kind == "snappy_form":
        return "application/x-www-form-urlencoded", form([("__a", "1"), ("q", json.dumps(wad)), ("ts", "1")])
    if kind == "form":
        pairs = draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=20)), max_size=5))
        return "application/x-www-form-urlencoded", form([*pairs, ("q", json.dumps(wad))])
    parts = [("q", json.dumps(wad).encode()), ("ts", b"1737333755506")]
    if draw(st.booleans()):
        posts = json.dumps([["falco:x", value, 1, 0, 1]]).encode()
        comp = draw(st.sampled_from(["snappy", "deflate"]))
        data = bytes(cramjam.snappy.compress_raw(posts)) if comp == "snappy" else zlib.compress(posts)
        parts = [("q", json.dumps([{"compression": comp, "posts": "1"}]).encode()), ("post_1", data)]
    return "multipart/form-data; boundary=----kvB", multipart(parts)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[tuple[str, bytes]]) -> tuple[str, bytes]:
    """A payload with a few byte-level mutations: flips, inserts, deletes, truncation, duplication."""
    ct, body = draw(source)
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup", "special"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "dup" and data:
            n = draw(st.integers(1, 64))
            data[at:at] = data[at : at + n]
        elif op == "special":
            data[at:at] = draw(st.sampled_from([b"[", b"{", b'"', b"\\", b"%", b"%ff", b"\r\n", b"\x00", b"=", b"&", b"NaN",
                                                b"\xff\xfe", b"1e999", b"\\ud800", b"------kvB", b"--"]))
    return ct, bytes(data)


fixtures = st.sampled_from(FIXTURES)
anything = st.tuples(st.sampled_from(CONTENT_TYPES), st.binary(max_size=600))
payloads = st.one_of(fixtures, generated(), mutated(fixtures), mutated(generated()), anything)


# -- properties ---------------------------------------------------------------------------------------


def decode_or_none(body: bytes, ct: str, hint: str = "auto", limits: Limits | None = None) -> Layer | None:
    """The decoder contract: a Layer, None, or a DecodeError; any other exception fails the test."""
    try:
        return Decoder(limits or SMALL).body(body, ct, hint)
    except DecodeError:
        return None


class TestDecoder:
    @FAST
    @given(payloads, st.sampled_from(HINTS))
    def test_decode_raises_only_decode_errors_and_round_trips(self, payload, hint):
        ct, body = payload
        layer = decode_or_none(body, ct, hint)
        if layer is not None:
            assert layer.encode() == body
            for sub in layer.layers():  # every nested layer also gives back its own bytes
                assert sub.encode() == sub.raw

    @FAST
    @given(st.binary(max_size=400), st.sampled_from(CONTENT_TYPES), st.sampled_from(HINTS))
    def test_random_bytes(self, body, ct, hint):
        layer = decode_or_none(body, ct, hint)
        if layer is not None:
            assert layer.encode() == body

    @FAST
    @given(generated())
    def test_generated_payloads_decode(self, payload):
        ct, body = payload
        layer = Decoder(Limits()).body(body, ct, "banzai")  # well-formed: must decode, no error at all
        assert layer is not None and layer.encode() == body

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from(["gzip", "deflate", "br", "zstd", "gzip, br", "identity", "x"]))
    def test_content_encoding_random_input(self, data, coding):
        try:
            out = decode_content(data, coding, SMALL)
        except DecodeError:
            return
        assert len(out) <= SMALL.max_body


class TestDetector:
    @FAST
    @given(payloads)
    def test_detector_accepts_every_decoded_tree(self, payload):
        ct, body = payload
        layer = decode_or_none(body, ct, "banzai")
        det = PIPE.detector.detect(layer)
        assert isinstance(det.categories(), dict) and isinstance(det.stats(), dict)


class TestPipeline:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payloads, st.sampled_from(sorted(URLS)))
    def test_process_never_raises(self, payload, url):
        ct, body = payload
        out = PIPE.process(Request("POST", url, {"content-type": ct}, body))
        kind = URLS[url]
        assert out.record is not None and out.record["kind"] == kind
        if kind == "telemetry":
            assert out.action == "dropped" and out.answer is not None
        else:
            assert out.answer is None
            if out.body is not None:  # changed: what goes on must still be well-formed for the server
                assert out.action in ("stripped", "rewritten")
                assert Decoder(Limits()).body(out.body, ct, "auto") is not None
            else:
                assert out.action in ("passed", "stripped", "rewritten")

    @settings(max_examples=60, deadline=None)
    @given(st.text(max_size=200), st.sampled_from(["GET", "POST"]))
    def test_pixel_queries(self, query, method):
        url = "https://www.facebook.com/tr/?" + quote(query, safe="=&%[]")
        out = PIPE.process(Request(method, url))
        assert out.action == "dropped"
