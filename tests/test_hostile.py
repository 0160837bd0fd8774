"""Hostile input: nothing a client sends makes keyveil raise, recurse or balloon.

Past a limit, or on input it cannot decode, a flow gets the documented outcome: dropped on a pure
telemetry endpoint (fail closed), passed unchanged on a functional one (fail open), and the journal
says why (`limit:<name>`, `decode:<error>`). Checked on the pipeline and through a real `keyveil run`.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib
from pathlib import Path

import brotli
import cramjam
import msgpack
import pytest
import zstandard

from keyveil.codecs import DecodeError, Decoder, LimitError, Limits, decode_body
from keyveil.codecs.compress import decode_content
from keyveil.journal import read_records
from keyveil.pipeline import Pipeline, Request
from support.servers import Upstream, request, start_proxy

ROOT = Path(__file__).resolve().parents[1]
TELEMETRY = "https://www.facebook.com/ajax/bz"
FALCO = "https://www.instagram.com/logging/falco"
GRAPH_LOGGING = "https://graph.facebook.com/logging_client_events"
FUNCTIONAL = "https://www.facebook.com/api/graphql/"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
MIB = 1024 * 1024
DEEP = 200_000


def q(obj: object) -> bytes:
    """A Banzai-style form body with `q` holding JSON."""
    return b"q=" + json.dumps(obj).encode()


def multipart(parts: list[tuple[str, bytes]], boundary: bytes = b"----kvB", close: bool = True) -> bytes:
    out = b""
    for name, content in parts:
        out += b"--" + boundary + b'\r\ncontent-disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
        out += content + b"\r\n"
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


MP = "multipart/form-data; boundary=----kvB"
_zjson = zlib.compress(json.dumps({"events": [{"name": "x", "extra": {"a": 1}}]}).encode())
_snappy = bytes(cramjam.snappy.compress_raw(json.dumps([["falco:x", {"a": 1}, 1, 0, 1]]).encode()))

# (id, content type, body, reason the record must give, or None when the payload decodes without one)
HOSTILE: list[tuple[str, str, bytes, str | None]] = [
    ("malformed_json", JSON, b'{"a": [1, 2,', "decode:DecodeError"),
    ("malformed_json_in_form", FORM, b'q=[{"a": 1,&x=1', None),
    ("json_trailing_garbage", JSON, b'{"a": 1} {"b": 2}', "decode:DecodeError"),
    ("bad_utf8_json", JSON, b'{"a": "\xff\xfe\xc3"}', "decode:DecodeError"),
    ("bad_utf8_form", FORM, b"q=%ff%fe%c3&\xff\xfe=\xc0\x80", None),
    ("lone_surrogate_escape", JSON, b'{"a": "\\ud800\\udfff\\ud800"}', None),
    ("nan_infinity", JSON, b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": [NaN, 1, 2, 3, 4]}', None),
    ("huge_float", JSON, b'{"a": 1e999999, "b": -1e999999, "c": [1e308, 1e308, 1e308, 1e308]}', None),
    ("huge_int", JSON, b'{"a": ' + b"9" * 5000 + b"}", "decode:DecodeError"),
    ("huge_int_ok", JSON, b'{"a": [' + b",".join([b"9" * 4000] * 5) + b"]}", None),
    ("empty_json", JSON, b"", None),
    ("empty_form", FORM, b"", None),
    ("empty_multipart", MP, b"", None),
    ("only_ampersands", FORM, b"&&&&===&=&", None),
    ("wrong_ct_json_as_msgpack", "application/x-msgpack", b'{"a": 1}', "decode:DecodeError"),
    ("wrong_ct_msgpack_as_json", JSON, msgpack.packb({"a": [1, 2, 3]}), "decode:DecodeError"),
    ("wrong_ct_multipart_without_boundary", "multipart/form-data", b"q=1", "decode:DecodeError"),
    ("wrong_ct_multipart_empty_boundary", "multipart/form-data; boundary=", b"--\r\n\r\n--", "decode:DecodeError"),
    ("wrong_ct_binary", "image/png", bytes(range(256)) * 4, None),
    ("multipart_no_closing_boundary", MP, multipart([("q", b"[1]")], close=False), "decode:DecodeError"),
    ("multipart_boundary_absent", MP, b"just some bytes", "decode:DecodeError"),
    ("multipart_malformed_part", MP, b"------kvB\r\nno blank line\r\n------kvB--", "decode:DecodeError"),
    ("broken_msgpack", "application/msgpack", b"\x93\x01\x02", "decode:DecodeError"),
    ("msgpack_reserved_byte", "application/msgpack", b"\xc1", "decode:DecodeError"),
    ("msgpack_lying_array_len", "application/msgpack", b"\xdd\xff\xff\xff\xff\x01", "decode:DecodeError"),
    ("msgpack_unhashable_key", "application/msgpack", b"\x81\x80\x01", "decode:DecodeError"),
    ("msgpack_ext_and_bin", "application/msgpack", msgpack.packb({"a": msgpack.ExtType(5, b"xy"), "b": b"\x00\xff"}), None),
    ("msgpack_nan_and_big", "application/msgpack", msgpack.packb([float("nan"), 2**64 - 1, -(2**63), 1e308]), None),
    ("invalid_base64_zlib", FORM, b"message=eJ%21%21%21%21%21%21%21%21%21%21%21%21&compressed=1", None),
    ("truncated_zlib_b64", FORM, b"compressed=1&message=" + base64.b64encode(_zjson[:-6]).replace(b"+", b"%2B"), None),
    ("zlib_b64_trailing_bytes", FORM, b"compressed=1&message=" + base64.b64encode(_zjson + b"xx").replace(b"+", b"%2B"), None),
    ("invalid_base64_snappy", FORM, q([{"compression": "snappy_base64", "posts": "!!!not base64!!!"}]), None),
    ("truncated_snappy", FORM, q([{"compression": "snappy_base64", "posts": base64.b64encode(_snappy[:-5]).decode()}]), None),
    ("snappy_wrong_preamble", FORM, q([{"compression": "snappy_base64", "posts": base64.b64encode(b"\xff" * 8).decode()}]), None),
    ("truncated_deflate_post", MP, multipart([("q", json.dumps([{"compression": "deflate", "posts": "1"}]).encode()),
                                              ("post_1", _zjson[:-9])]), None),
    ("truncated_snappy_post", MP, multipart([("q", json.dumps([{"compression": "snappy", "posts": "1"}]).encode()),
                                             ("post_1", _snappy[:-3])]), None),
    ("nul_bytes", JSON, b'{"a\\u0000": "\\u0000\\u0000"}', None),
    ("long_string", FORM, b"q=" + b"A" * (2 * MIB), None),
    ("deep_json", JSON, b"[" * DEEP + b"]" * DEEP, "limit:max_depth"),
    ("deep_json_objects", JSON, b'{"a":' * DEEP + b"1" + b"}" * DEEP, "limit:max_depth"),
    ("deep_json_unclosed", JSON, b"[" * DEEP, "limit:max_depth"),
    ("deep_json_sniffed", "", b"[" * DEEP + b"]" * DEEP, "limit:max_depth"),
    ("deep_json_in_form", FORM, b"q=" + b"%5B" * DEEP + b"%5D" * DEEP, "limit:max_depth"),
    ("deep_json_in_multipart", MP, multipart([("q", b"[" * DEEP + b"]" * DEEP)]), "limit:max_depth"),
    ("deep_msgpack", "application/msgpack", b"\x91" * DEEP + b"\x00", "limit:max_depth"),
    ("deep_json_string_in_string", JSON, json.dumps({"v": json.dumps({"v": json.dumps([[[[1]]]])})}).encode(), None),
    ("moderately_deep_json", JSON, b"[" * 500 + b"]" * 500, "limit:max_depth"),
]
IDS = [h[0] for h in HOSTILE]


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_config_dir(ROOT / "config")


class TestPipelineNeverRaises:
    @pytest.mark.parametrize(("name", "ct", "body", "reason"), HOSTILE, ids=IDS)
    @pytest.mark.parametrize("url", [TELEMETRY, FALCO, GRAPH_LOGGING])
    def test_telemetry_fails_closed(self, pipe, name, ct, body, reason, url):
        out = pipe.process(Request("POST", url, {"content-type": ct}, body))
        assert out.action == "dropped", (name, out.record)
        assert out.answer is not None and out.answer.status == 200 and out.record["size_out"] == 0
        if reason is not None:
            assert out.record["reason"] == reason

    @pytest.mark.parametrize(("name", "ct", "body", "reason"), HOSTILE, ids=IDS)
    def test_functional_fails_open_byte_for_byte(self, pipe, name, ct, body, reason):
        out = pipe.process(Request("POST", FUNCTIONAL, {"content-type": ct}, body))
        assert out.action == "passed", (name, out.record)
        assert out.body is None and out.url is None and out.answer is None  # the bytes go on untouched
        assert out.record["size_in"] == out.record["size_out"] == len(body)
        if reason is not None:
            assert out.record["reason"] == reason

    @pytest.mark.parametrize(("name", "ct", "body", "reason"), HOSTILE, ids=IDS)
    def test_decoder_raises_only_decode_errors_and_round_trips(self, name, ct, body, reason):
        try:
            layer = decode_body(body, ct, "banzai")
        except DecodeError as e:  # LimitError is a DecodeError
            assert reason is not None and reason.split(":")[1] in (type(e).__name__, getattr(e, "limit", ""))
            return
        assert reason is None, f"{name} decoded although {reason} was expected"
        if layer is not None:
            assert layer.encode() == body

    def test_pixel_hostile_query(self, pipe):
        for url in ("https://www.facebook.com/tr?" + "%" * 5000, "https://www.facebook.com/tr?ev=%ff&id=%00&" + "&" * 10000,
                    "https://www.facebook.com/tr?cd[x]=" + "%5B" * DEEP):
            out = pipe.process(Request("GET", url))
            assert out.action == "dropped" and out.answer.body.startswith(b"GIF89a")

    def test_headers_of_any_shape(self, pipe):
        for headers in ({}, {"Content-Type": JSON}, {"content-type": "\x00\xff;;boundary=\"\""}, {"content-type": "a" * 100000}):
            out = pipe.process(Request("POST", FUNCTIONAL, headers, b'{"a":1}'))
            assert out.action == "passed" and out.body is None

    def test_strange_urls(self, pipe):
        for url in ("https://www.facebook.com", "https://WWW.FACEBOOK.COM./api/graphql/", "https://www.facebook.com:99999/x",
                    "https://[::1/x", "https://www.facebook.com/api/graphql/?" + "a=1&" * 50000):
            out = pipe.process(Request("POST", url, {"content-type": JSON}, b'{"a":1}'))
            assert out.action in ("passed", "ignored") and out.body is None


class TestLimits:
    def test_max_body(self):
        p = Pipeline.from_config_dir(ROOT / "config", limits=Limits(max_body=1000))
        body = q([{"posts": [["falco:x", {"a": "b" * 2000}, 1, 0, 1]]}])
        assert p.process(Request("POST", TELEMETRY, {"content-type": FORM}, body)).record["reason"] == "limit:max_body"
        out = p.process(Request("POST", FUNCTIONAL, {"content-type": FORM}, body))
        assert out.action == "passed" and out.body is None and out.record["reason"] == "limit:max_body"
        # just under the limit the same flow is inspected
        assert p.process(Request("POST", FUNCTIONAL, {"content-type": FORM}, body[:999])).record["reason"] == ""

    def test_nested_zlib_bomb(self, pipe):
        bomb = base64.b64encode(zlib.compress(bytes(64 * MIB), 9))  # 64 KiB of base64 holding 64 MiB
        body = b"compressed=1&message=" + bomb.replace(b"+", b"%2B").replace(b"/", b"%2F")
        t = time.perf_counter()
        out = pipe.process(Request("POST", GRAPH_LOGGING, {"content-type": FORM}, body))
        assert out.action == "dropped" and out.record["reason"] == "limit:max_decompressed"
        assert time.perf_counter() - t < 2.0
        fun = pipe.process(Request("POST", FUNCTIONAL, {"content-type": FORM}, body))
        assert fun.action == "passed" and fun.body is None and fun.record["reason"] == "limit:max_decompressed"

    def test_nested_ratio(self):
        p = Pipeline.from_config_dir(ROOT / "config", limits=Limits(max_ratio=100))
        body = b"compressed=1&message=" + base64.b64encode(zlib.compress(b"[" + b"0," * MIB + b"0]", 9)).replace(b"+", b"%2B")
        assert p.process(Request("POST", GRAPH_LOGGING, {"content-type": FORM}, body)).record["reason"] == "limit:max_ratio"
        # a small payload may expand a lot: the ratio only applies past 64 KiB of output
        small = b"compressed=1&message=" + base64.b64encode(zlib.compress(b"[" + b"0," * 1000 + b"0]", 9)).replace(b"+", b"%2B")
        assert p.process(Request("POST", GRAPH_LOGGING, {"content-type": FORM}, small)).record["reason"] == ""

    def test_snappy_announcing_a_huge_length(self, pipe):
        lie = base64.b64encode(b"\xff\xff\xff\xff\x0f" + b"\x00" * 16).decode()  # claims 4 GiB
        out = pipe.process(Request("POST", TELEMETRY, {"content-type": FORM}, q([{"compression": "snappy_base64", "posts": lie}])))
        assert out.action == "dropped" and out.record["reason"] == "limit:max_decompressed"

    def test_deflate_post_bomb_in_multipart(self, pipe):
        body = multipart([("q", json.dumps([{"compression": "deflate", "posts": "1"}]).encode()),
                          ("post_1", zlib.compress(bytes(48 * MIB), 9))])
        assert pipe.process(Request("POST", TELEMETRY, {"content-type": MP}, body)).record["reason"] == "limit:max_decompressed"
        out = pipe.process(Request("POST", FUNCTIONAL, {"content-type": MP}, body))
        assert out.action == "passed" and out.body is None

    def test_max_nodes(self):
        p = Pipeline.from_config_dir(ROOT / "config", limits=Limits(max_nodes=1000))
        body = json.dumps({"a": list(range(5000))}).encode()
        assert p.process(Request("POST", FALCO, {"content-type": JSON}, body)).record["reason"] == "limit:max_nodes"
        assert p.process(Request("POST", FUNCTIONAL, {"content-type": JSON}, body)).body is None

    def test_time_budget(self):
        events = [{"name": "client_event", "extra": {"seq": list(range(60)), "k": "v" * 20}} for _ in range(6000)]
        body = json.dumps({"events": events}).encode()
        tight = Pipeline.from_config_dir(ROOT / "config", limits=Limits(time_budget_ms=1))
        t = time.perf_counter()
        out = tight.process(Request("POST", FUNCTIONAL, {"content-type": JSON}, body))
        spent = time.perf_counter() - t
        assert out.action == "passed" and out.body is None and out.record["reason"] == "limit:time_budget"
        drop = tight.process(Request("POST", FALCO, {"content-type": JSON}, body))
        assert drop.action == "dropped" and drop.record["reason"] == "limit:time_budget"
        # without a budget the same payload is decoded and inspected in full, which takes longer
        free = Pipeline.from_config_dir(ROOT / "config", limits=Limits(time_budget_ms=0))
        t = time.perf_counter()
        full = free.process(Request("POST", FUNCTIONAL, {"content-type": JSON}, body))
        assert full.record["reason"] == "" and "json" in full.record["layers"]
        assert spent < time.perf_counter() - t

    def test_time_budget_inside_the_detector_walk(self):
        """Decoding fits the budget but detection does not: the walk itself stops."""
        p = Pipeline.from_config_dir(ROOT / "config", limits=Limits(time_budget_ms=1))
        body = json.dumps({"events": [{"name": "e", "extra": {"a": 1}}] * 3000}).encode()
        d = Decoder(Limits(time_budget_ms=0))
        root = d.body(body, JSON)
        assert root is not None  # the decoder alone is fine
        out = p.process(Request("POST", FALCO, {"content-type": JSON}, body))
        assert out.record["reason"] == "limit:time_budget"

    def test_deep_trees_never_recurse(self, pipe):
        """200,000 levels: json.loads, msgpack, the decoder walk and the detector all stay bounded."""
        for ct, body in (
            (JSON, b"[" * DEEP + b"]" * DEEP),
            (JSON, b'{"a":' * DEEP + b"0" + b"}" * DEEP),
            ("application/msgpack", b"\x91" * DEEP + b"\xc0"),
            ("application/msgpack", b"\x81\xa1a" * DEEP + b"\xc0"),
            (FORM, b"q=" + b"%5B" * DEEP + b"%5D" * DEEP),
            (MP, multipart([("q", b"[" * DEEP + b"]" * DEEP)])),
        ):
            with pytest.raises(LimitError) as e:
                Decoder().body(body, ct)
            assert e.value.limit == "max_depth"
        # the deepest tree the decoder may build goes through detection and re-encoding
        depth = Limits().max_depth - 2
        body = ('{"a":' * depth + '{"clientX":[1,2,3],"b":1}' + "}" * depth).encode()
        out = pipe.process(Request("POST", FUNCTIONAL, {"content-type": JSON}, body))
        assert out.action == "stripped" and b"clientX" not in out.body and out.body.count(b"{") == depth + 1

    def test_a_depth_limit_above_the_stack_still_gives_the_limit_outcome(self):
        p = Pipeline.from_config_dir(ROOT / "config", limits=Limits(max_depth=100_000))
        for n in (300, 600, 2000, DEEP):
            body = ("[" * n + '{"clientX":[1,2,3]}' + "]" * n).encode()
            out = p.process(Request("POST", FUNCTIONAL, {"content-type": JSON}, body))
            assert out.action in ("passed", "stripped")
            if out.action == "passed":
                assert out.record["reason"] == "limit:max_depth" and out.body is None

    def test_unforeseen_error_fails_closed_on_telemetry(self, pipe, monkeypatch):
        """A bug past decoding (here: in the detector) never escapes process() and never leaks telemetry."""
        def boom(*a, **k):
            raise KeyError("bug")

        monkeypatch.setattr(pipe.detector, "detect", boom)
        out = pipe.process(Request("POST", TELEMETRY, {"content-type": FORM}, q([1])))
        assert out.action == "dropped" and out.answer is not None and out.record["reason"] == "error:KeyError"
        fun = pipe.process(Request("POST", FUNCTIONAL, {"content-type": FORM}, b"a=1"))
        assert fun.action == "passed" and fun.body is None and fun.record["reason"] == "error:KeyError"

    def test_allowlisted_flow_is_never_refused(self, tmp_path):
        import shutil

        for n in ("endpoints.toml", "detection.toml"):
            shutil.copy(ROOT / "config" / n, tmp_path / n)
        (tmp_path / "policy.toml").write_text('[allowlist]\nendpoints = ["banzai"]\n')
        p = Pipeline.from_config_dir(tmp_path)
        out = p.refuse(Request("POST", TELEMETRY, {}, b"x"), p.match("www.facebook.com", "/ajax/bz", "POST"), LimitError("max_body"))
        assert out.action == "allowed" and out.answer is None


class TestContentEncoding:
    BODY = b'{"events":[' + b",".join([b'{"name":"x","extra":{"a":[1,2,3]}}'] * 500) + b"]}"

    @pytest.mark.parametrize(("coding", "enc"), [
        ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]), ("br", brotli.compress),
        ("zstd", zstandard.ZstdCompressor().compress), ("identity", lambda b: b), ("", lambda b: b),
        ("gzip, br", lambda b: brotli.compress(gzip.compress(b))), ("GZIP", gzip.compress),
    ])
    def test_round_trip(self, coding, enc):
        assert decode_content(enc(self.BODY), coding, Limits()) == self.BODY

    def test_gzip_members(self):
        assert decode_content(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", Limits()) == b"abcd"

    @pytest.mark.parametrize(("coding", "data"), [
        ("gzip", gzip.compress(BODY)[:-12]), ("gzip", b"\x1f\x8b garbage"), ("gzip", b"plain"),
        ("deflate", zlib.compress(BODY)[:-20]), ("br", brotli.compress(BODY)[:-4]), ("br", b"\xff" * 10),
        ("zstd", zstandard.ZstdCompressor().compress(BODY)[:-5]), ("zstd", b"nope"), ("compress", b"x"),
        ("x-made-up", b"x"),
    ])
    def test_broken_is_a_decode_error(self, coding, data):
        with pytest.raises(DecodeError) as e:
            decode_content(data, coding, Limits())
        assert not isinstance(e.value, LimitError)

    @pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
    def test_bombs_stop_at_the_cap(self, coding):
        zeros = bytes(64 * MIB)
        compress = {"gzip": lambda b: gzip.compress(b, 6), "deflate": lambda b: zlib.compress(b, 6),
                    "br": lambda b: brotli.compress(b, quality=1), "zstd": zstandard.ZstdCompressor().compress}
        data = compress[coding](zeros)
        with pytest.raises(LimitError) as e:
            decode_content(data, coding, Limits(max_body=MIB))
        assert e.value.limit == "max_body"
        with pytest.raises(LimitError) as e:
            decode_content(data, coding, Limits(max_decompressed=2 * MIB))
        assert e.value.limit == "max_decompressed"

    def test_ratio_applies_to_content_encoding(self):
        plain = b",".join(b"%d" % (i * 7919 % 100003) for i in range(400_000))
        data = gzip.compress(plain, 9)
        ratio = len(plain) / len(data)
        with pytest.raises(LimitError) as e:
            decode_content(data, "gzip", Limits(max_ratio=ratio / 2))
        assert e.value.limit == "max_ratio"
        assert decode_content(data, "gzip", Limits(max_ratio=ratio * 2)) == plain


# -- through a real `keyveil run` --------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def gzip_of_zeros(n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    return b"".join([c.compress(chunk) for _ in range(n // MIB)] + [c.flush()])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    up = Upstream().start()
    proxy = start_proxy(tmp, up.address)
    yield up, proxy
    proxy.stop()
    up.stop()


@pytest.mark.timeout(120)
class TestThroughTheProxy:
    SELECTION = ["malformed_json", "bad_utf8_json", "nan_infinity", "huge_int", "empty_json", "wrong_ct_msgpack_as_json",
                 "multipart_no_closing_boundary", "broken_msgpack", "truncated_snappy", "truncated_zlib_b64",
                 "invalid_base64_snappy", "deep_json", "deep_msgpack", "deep_json_in_form", "lone_surrogate_escape"]

    def test_hostile_bodies(self, env):
        up, proxy = env
        cases = [h for h in HOSTILE if h[0] in self.SELECTION]
        assert len(cases) == len(self.SELECTION)
        for name, ct, body, _ in cases:
            n = len(up.seen)
            r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", body, {"content-type": ct})
            assert r.status == 200 and r.headers.get("x-keyveil") == "dropped", name
            assert len(up.seen) == n, name  # telemetry never reached the upstream
            r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", body, {"content-type": ct})
            assert r.status == 200 and r.body == b"upstream-ok", name
            assert up.seen[-1].body == body and up.seen[-1].path == "/api/graphql/", name  # byte for byte

    def test_broken_content_encodings(self, env):
        up, proxy = env
        plain = b"variables=" + b"%7B%22a%22%3A1%7D"
        for coding, data in (("gzip", gzip.compress(plain)[:-7]), ("br", b"\x00\x01garbage"), ("zstd", b"zz"),
                             ("deflate", b"\x78\x9c\xff"), ("x-unknown", plain), ("gzip", b"")):
            n = len(up.seen)
            r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", data, {"content-encoding": coding})
            assert r.status == 200 and r.headers.get("x-keyveil") == "dropped" and len(up.seen) == n, coding
            r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", data, {"content-encoding": coding})
            assert r.status == 200 and up.seen[-1].body == data, coding
            assert up.seen[-1].headers.get("content-encoding") == coding or not data

    def test_journal_has_the_reasons(self, env):
        _, proxy = env
        out = proxy.stop()
        assert "Traceback" not in out and "internal error" not in out
        recs = list(read_records([proxy.journal]))
        n_bodies = 2 * len(self.SELECTION) + 2 * 6
        assert len(recs) == n_bodies
        reasons = {(r["endpoint"], r["reason"]) for r in recs}
        for ep in ("banzai", "graphql"):
            assert (ep, "limit:max_depth") in reasons and (ep, "decode:DecodeError") in reasons
        assert {r["action"] for r in recs if r["endpoint"] == "banzai"} == {"dropped"}
        assert {r["action"] for r in recs if r["endpoint"] == "graphql"} == {"passed"}


@pytest.mark.timeout(120)
def test_gzip_bomb_is_never_inflated(tmp_path):
    """256 MiB of zeros as Content-Encoding: gzip (about 260 KB on the wire). The proxy's peak RSS must
    not grow by anything like 256 MiB; telemetry is dropped, a functional request passes unchanged."""
    bomb = gzip_of_zeros(256 * MIB)
    assert len(bomb) < 400_000
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address)
    try:
        # warm up: both paths once with an ordinary gzip body
        small = gzip.compress(b"variables=%7B%7D")
        request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", small, {"content-encoding": "gzip"})
        request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", small, {"content-encoding": "gzip"})
        before = _status(proxy.proc.pid)
        r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", bomb, {"content-encoding": "gzip"}, timeout=60)
        assert r.status == 200 and r.headers.get("x-keyveil") == "dropped"
        n = len(up.seen)
        r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", bomb,
                    {"content-encoding": "gzip", "content-type": FORM}, timeout=60)
        assert r.status == 200 and r.body == b"upstream-ok"
        assert len(up.seen) == n + 1 and up.seen[-1].body == bomb and up.seen[-1].headers["content-encoding"] == "gzip"
        after = _status(proxy.proc.pid)
    finally:
        out = proxy.stop()
        up.stop()
    grew = after["VmHWM"] - before["VmHWM"]
    print(f"\nproxy peak RSS {before['VmHWM'] / MIB:.1f} MiB -> {after['VmHWM'] / MIB:.1f} MiB "
          f"(+{grew / MIB:.1f} MiB) for a {len(bomb)} byte gzip of 256 MiB")
    assert grew < 48 * MIB  # the cap is 8 MiB of output; 256 MiB inflated would show here
    assert "Traceback" not in out
    recs = list(read_records([proxy.journal]))
    bombs = [r for r in recs if r["size_in"] == len(bomb)]
    assert [(r["endpoint"], r["action"], r["reason"]) for r in bombs] == [
        ("banzai", "dropped", "limit:max_body"), ("graphql", "passed", "limit:max_body")]


ROUTE_STREAMED = '''
import os
from mitmproxy import http

UP = os.environ["KEYVEIL_TEST_UPSTREAM"]


class RouteStreamed:
    """Streamed requests connect before the `request` hook: route them to the local upstream here."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:
            host = flow.request.pretty_host
            h, _, p = UP.rpartition(":")
            flow.request.scheme, flow.request.host, flow.request.port = "http", h, int(p)
            flow.request.headers["host"] = host


addons = [RouteStreamed()]
'''


@pytest.mark.timeout(120)
def test_bodies_over_max_body(tmp_path):
    """A functional upload over keyveil_max_body streams through unbuffered and unchanged; telemetry
    that large is still dropped. Both are journaled with limit:max_body and their real size."""
    script = tmp_path / "route_streamed.py"
    script.write_text(ROUTE_STREAMED)
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address, "--pac-port", "-1", passthrough=("-s", str(script)))
    big = b"a=" + bytes(range(256)) * (96 * 1024)  # 24 MiB + 2
    try:
        request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", b"a=1")  # warm-up
        before = _status(proxy.proc.pid)
        r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", big, timeout=60)
        after = _status(proxy.proc.pid)
        assert r.status == 200 and r.body == b"upstream-ok" and up.seen[-1].body == big
        n = len(up.seen)
        r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", big, timeout=60)
        assert r.status == 200 and r.headers.get("x-keyveil") == "dropped" and len(up.seen) == n
    finally:
        out = proxy.stop()
        up.stop()
    grew = after["VmHWM"] - before["VmHWM"]
    print(f"\nproxy peak RSS +{grew / MIB:.1f} MiB while streaming a {len(big) / MIB:.0f} MiB functional upload")
    assert grew < 12 * MIB  # streamed, not buffered
    assert "Traceback" not in out
    recs = [r for r in read_records([proxy.journal]) if r["size_in"] == len(big)]
    assert [(r["endpoint"], r["action"], r["reason"]) for r in recs] == [
        ("graphql", "passed", "limit:max_body"), ("banzai", "dropped", "limit:max_body")]
