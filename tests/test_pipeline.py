"""The sans-I/O pipeline: request in, decision and bytes out."""

from __future__ import annotations

import base64
import json
import shutil
import zlib
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from keyveil.pipeline import GIF_1X1, Pipeline, Request

ROOT = Path(__file__).resolve().parents[1]
FORM = {"content-type": "application/x-www-form-urlencoded"}
KEYS = [1737333755506, 1737333755618, 1737333755790, 1737333755901, 1737333756133, 1737333756240]
TEXT = "meet me at the usual place at 7"


def graphql_send(extra: dict | None = None) -> bytes:
    variables = {"input": {"message": {"text": TEXT}, "thread_id": "100042", "client_mutation_id": "9"}}
    variables["input"].update(extra or {})
    return urlencode({"av": "100001", "doc_id": "7241726279", "fb_api_req_friendly_name": "useMWChatSendMessageMutation",
                      "variables": json.dumps(variables, separators=(",", ":")), "fb_dtsg": "NAcN8x:1"}).encode()


def with_policy(tmp_path: Path, text: str) -> Pipeline:
    for name in ("endpoints.toml", "detection.toml"):
        shutil.copy(ROOT / "config" / name, tmp_path / name)
    (tmp_path / "policy.toml").write_text(text)
    return Pipeline.from_config_dir(tmp_path)


class TestPipeline:
    def test_non_meta_is_ignored(self, pipeline):
        out = pipeline.process(Request("POST", "https://example.org/ajax/bz", FORM, b"q=1"))
        assert out.action == "ignored" and out.record is None and not out.changed

    def test_fixture_bodies_dropped_with_banzai_answer(self, pipeline, fixture_bodies):
        for ct, body in fixture_bodies:
            out = pipeline.process(Request("POST", "https://www.facebook.com/ajax/bz?__a=1&fb_dtsg=SECRET", {"content-type": ct}, body))
            assert out.action == "dropped"
            assert out.answer.status == 200 and out.answer.body == b""  # exactly 200: Banzai retries anything else
            rec = out.record
            assert rec["endpoint"] == "banzai" and rec["size_in"] == len(body) and rec["size_out"] == 0
            assert "SECRET" not in json.dumps(rec) and rec["path"] == "/ajax/bz"

    def test_audit_changes_nothing(self, fixture_bodies):
        p = Pipeline.from_config_dir(ROOT / "config", mode="audit")
        ct, body = fixture_bodies[1]
        out = p.process(Request("POST", "https://www.facebook.com/ajax/bz", {"content-type": ct}, body))
        assert out.answer is None and not out.changed
        assert out.record["action"] == "dropped" and out.record["mode"] == "audit"

    def test_functional_strip_keeps_the_message(self, pipeline):
        body = graphql_send({"typing_metrics": {"keydown_ts": KEYS, "dwell": [90, 110, 87, 140, 101, 95]}, "t": KEYS})
        out = pipeline.process(Request("POST", "https://www.facebook.com/api/graphql/", FORM, body))
        assert out.action == "stripped"
        before, after = dict(parse_qsl(body.decode())), dict(parse_qsl(out.body.decode()))
        assert {k: v for k, v in before.items() if k != "variables"} == {k: v for k, v in after.items() if k != "variables"}
        v = json.loads(after["variables"])["input"]
        assert v == {"message": {"text": TEXT}, "thread_id": "100042", "client_mutation_id": "9"}
        assert out.record["categories"]["keystroke"]["events"] == 2
        assert str(KEYS[0]) not in json.dumps(out.record) and TEXT not in json.dumps(out.record)
        # only the variables field was re-encoded: the others keep their exact bytes
        assert out.body.split(b"&")[:3] == body.split(b"&")[:3] and out.body.endswith(b"&fb_dtsg=NAcN8x%3A1")

    def test_functional_without_behavior_passes_byte_for_byte(self, pipeline):
        out = pipeline.process(Request("POST", "https://www.facebook.com/api/graphql/", FORM, graphql_send()))
        assert out.action == "passed" and out.body is None and out.answer is None

    def test_uncataloged_meta(self, pipeline):
        body = json.dumps({"stuff": "x", "k": KEYS}).encode()
        out = pipeline.process(Request("POST", "https://www.facebook.com/ajax/new_thing/", {"content-type": "application/json"}, body))
        assert out.action == "stripped" and out.record["kind"] == "uncataloged" and json.loads(out.body) == {"stuff": "x"}
        plain = pipeline.process(Request("GET", "https://www.facebook.com/photo.php?fbid=1"))
        assert plain.action == "passed" and not plain.changed

    def test_pixel_get_gets_a_gif(self, pipeline):
        url = "https://www.facebook.com/tr/?id=123&ev=SubscribedButtonClick&dl=https%3A%2F%2Fshop.example%2F&cd[buttonText]=Buy"
        out = pipeline.process(Request("GET", url, {"origin": "https://shop.example"}))
        assert out.action == "dropped" and out.answer.body == GIF_1X1
        assert out.answer.headers["content-type"] == "image/gif"
        assert out.answer.headers["access-control-allow-origin"] == "https://shop.example"
        assert "click" in out.record["categories"]

    def test_undecodable_fails_closed_on_telemetry_open_on_functional(self, pipeline):
        bad = b'--B\r\nContent-Disposition: form-data; name="q"\r\n\r\n[1'
        ct = {"content-type": "multipart/form-data; boundary=B"}
        out = pipeline.process(Request("POST", "https://www.facebook.com/ajax/bz", ct, bad))
        assert out.action == "dropped" and out.answer is not None and out.record["reason"].startswith("decode:")
        out = pipeline.process(Request("POST", "https://www.facebook.com/api/graphql/", ct, bad))
        assert out.action == "passed" and not out.changed and out.answer is None

    def test_mobile_compressed_message_strip(self, tmp_path):
        p = with_policy(tmp_path, '[defaults]\ntelemetry = "strip"\n')
        msg = {"data": [{"name": "instagram_organic_time_spent", "time": 1.7e9, "extra": {"timespent_in_ms": 9000}},
                        {"name": "ig_feed_request", "time": 1.7e9, "extra": {"count": 1}}], "app_id": "567", "seq": 4}
        b64 = base64.b64encode(zlib.compress(json.dumps(msg).encode())).decode()
        body = urlencode({"access_token": "TOKEN", "format": "json", "compressed": "1", "message": b64}).encode()
        out = p.process(Request("POST", "https://graph.instagram.com/logging_client_events", FORM, body))
        assert out.action == "stripped"
        fields = dict(parse_qsl(out.body.decode()))
        sent = json.loads(zlib.decompress(base64.b64decode(fields["message"])))
        assert [e["name"] for e in sent["data"]] == ["ig_feed_request"] and sent["seq"] == 4
        assert fields["access_token"] == "TOKEN" and "TOKEN" not in json.dumps(out.record)

    def test_rewrite_keeps_shape_and_order(self, tmp_path):
        p = with_policy(tmp_path, '[[rule]]\nendpoint = "graphql"\naction = "rewrite"\n')
        body = graphql_send({"k": KEYS})
        out = p.process(Request("POST", "https://www.facebook.com/api/graphql/", FORM, body, ts=KEYS[-1] / 1000 + 5))
        assert out.action == "rewritten"
        v = json.loads(dict(parse_qsl(out.body.decode()))["variables"])["input"]
        new = v.pop("k")
        assert v["message"]["text"] == TEXT and len(new) == len(KEYS)
        assert new != KEYS and new == sorted(new) and all(isinstance(x, int) for x in new)
        assert new[-1] <= KEYS[-1] + 5000  # never after the request time

    def test_strip_chosen_bd_signal_ids(self, tmp_path, fixture_bodies):
        p = with_policy(tmp_path, '[defaults]\ntelemetry = "strip"\n[bd_pdc_signals]\nstrip_ids = [30000, 30094]\n')
        ct, body = fixture_bodies[1]
        out = p.process(Request("POST", "https://www.facebook.com/ajax/bz", {"content-type": ct}, body))
        assert out.action == "stripped"
        from keyveil import bdsignals
        from keyveil.codecs import decode_body, plain

        q = next(f for f in decode_body(out.body, ct).value if f.name == "q")
        posts = plain(q.value)[0]["posts"]
        bd = next(po for po in posts if po[0] == "falco:bd_pdc_signals")
        ids = set(bdsignals.parse_signals(bdsignals.decrypt_sjd(bd[1]["e"]["sjd"], bd[1]["e"]["asid"])))
        assert "30000" not in ids and "30094" not in ids and "30001" in ids

    def test_query_is_never_journaled(self, pipeline):
        out = pipeline.process(Request("POST", "https://www.facebook.com/ajax/bz?__user=100001234&fb_dtsg=AbC", FORM, b"q=[]&ts=1"))
        assert "100001234" not in json.dumps(out.record) and urlsplit("x").path == "x"

    @pytest.mark.parametrize("method", ["GET", "PUT"])
    def test_method_outside_catalog(self, pipeline, method):
        out = pipeline.process(Request(method, "https://www.facebook.com/ajax/bz", FORM, b""))
        assert out.record["kind"] == "uncataloged" and out.action == "passed"


def test_the_core_never_imports_mitmproxy():
    """catalog, codecs, detect, policy, apply, timing, journal, report and pipeline are sans-I/O."""
    import subprocess
    import sys

    code = ("import sys; import keyveil.pipeline, keyveil.journal, keyveil.report, keyveil.timing, "
            "keyveil.websocket, keyveil.discover; print(sorted(m for m in sys.modules if m.startswith('mitmproxy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
