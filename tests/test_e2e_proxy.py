"""End to end through a real `keyveil run` over HTTPS with its CA, to a local upstream that records."""

from __future__ import annotations

import gzip
import json
import ssl
from urllib.parse import parse_qsl, urlencode

import pytest

from keyveil.journal import read_records
from support.servers import Upstream, request, start_proxy, tls_upstream

KEYS = [1737333755506, 1737333755618, 1737333755790, 1737333755901, 1737333756133, 1737333756240]
TEXT = "the meeting moved to thursday"
pytestmark = pytest.mark.timeout(90)


def graphql(extra: dict | None = None) -> bytes:
    inp = {"message": {"text": TEXT}, "thread_id": "100042", **(extra or {})}
    return urlencode({"doc_id": "7241726279", "fb_api_req_friendly_name": "useMWChatSendMessageMutation",
                      "variables": json.dumps({"input": inp}), "fb_dtsg": "NAcN8x:1"}).encode()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    up = Upstream().start()
    proxy = start_proxy(tmp, up.address)
    yield up, proxy
    proxy.stop()
    up.stop()


class TestThroughTheProxy:
    def test_telemetry_dropped_at_the_proxy(self, env, fixture_bodies):
        up, proxy = env
        before = len(up.seen)
        for ct, body in fixture_bodies:
            r = request(proxy.port, "POST", "https://www.facebook.com/ajax/bz?__a=1", body, {"content-type": ct},
                        cafile=proxy.cafile)
            assert r.status == 200 and r.headers["x-keyveil"] == "dropped"
        assert len(up.seen) == before  # nothing reached "Meta"

    def test_message_send_stripped_text_kept(self, env):
        up, proxy = env
        body = graphql({"typing_metrics": {"keydown_ts": KEYS, "dwell": [90, 110, 87, 140, 101, 95]}})
        r = request(proxy.port, "POST", "https://www.facebook.com/api/graphql/", body, cafile=proxy.cafile)
        assert r.status == 200 and r.body == b"upstream-ok"
        seen = up.seen[-1]
        assert seen.path == "/api/graphql/" and seen.host == "www.facebook.com"
        sent = dict(parse_qsl(seen.body.decode()))
        assert json.loads(sent["variables"]) == {"input": {"message": {"text": TEXT}, "thread_id": "100042"}}
        assert sent["doc_id"] == "7241726279" and int(seen.headers["content-length"]) == len(seen.body)

    def test_gzip_encoded_request_re_encoded(self, env):
        up, proxy = env
        body = graphql({"t": KEYS})
        r = request(proxy.port, "POST", "https://www.facebook.com/api/graphql/", gzip.compress(body),
                    {"content-encoding": "gzip"}, cafile=proxy.cafile)
        assert r.status == 200
        seen = up.seen[-1]
        assert seen.headers["content-encoding"] == "gzip"
        sent = dict(parse_qsl(gzip.decompress(seen.body).decode()))
        assert "t" not in json.loads(sent["variables"])["input"]

    def test_functional_byte_for_byte(self, env):
        up, proxy = env
        body = graphql()
        r = request(proxy.port, "POST", "https://www.facebook.com/api/graphql/", body, cafile=proxy.cafile)
        assert r.status == 200 and up.seen[-1].body == body

    def test_non_meta_http_untouched(self, env):
        up, proxy = env
        body = b"q=" + json.dumps([{"posts": [["falco:x", {"k": KEYS}, 1, 0, 1]]}]).encode()
        r = request(proxy.port, "POST", "http://example.org/ajax/bz", body)
        assert r.status == 200 and up.seen[-1].body == body and up.seen[-1].host == "example.org"

    def test_non_meta_tls_not_intercepted(self, env, tmp_path):
        _, proxy = env
        up, cert = tls_upstream(tmp_path)
        try:
            ctx = ssl.create_default_context(cafile=str(cert))  # trusts the upstream only, not keyveil's CA
            port = int(up.address.rsplit(":", 1)[1])
            r = request(proxy.port, "POST", f"https://127.0.0.1:{port}/x", b"abc", context=ctx)
            assert r.status == 200 and up.seen[-1].body == b"abc"
        finally:
            up.stop()

    def test_journal_counts_every_meta_flow(self, env, fixture_bodies):
        _, proxy = env
        out = proxy.stop()
        assert "Traceback" not in out
        recs = list(read_records([proxy.journal]))
        actions = [r["action"] for r in recs]
        assert actions.count("dropped") == len(fixture_bodies)
        assert actions.count("stripped") == 2 and actions.count("passed") == 1
        assert all(r["host"] != "example.org" for r in recs)
        raw = b"".join(p.read_bytes() for p in proxy.journal.rglob("*") if p.is_file())
        assert TEXT.encode() not in raw and str(KEYS[0]).encode() not in raw


class TestAuditMode:
    def test_audit_passes_everything_and_journals_the_would_be(self, tmp_path, fixture_bodies):
        up = Upstream().start()
        proxy = start_proxy(tmp_path, up.address, mode="audit")
        try:
            ct, body = fixture_bodies[0]
            r = request(proxy.port, "POST", "https://www.facebook.com/ajax/bz", body, {"content-type": ct}, cafile=proxy.cafile)
            assert r.status == 200 and up.seen[-1].body == body
            gql = graphql({"t": KEYS})
            request(proxy.port, "POST", "https://www.facebook.com/api/graphql/", gql, cafile=proxy.cafile)
            assert up.seen[-1].body == gql
        finally:
            proxy.stop()
            up.stop()
        recs = list(read_records([proxy.journal]))
        assert [(r["action"], r["mode"]) for r in recs] == [("dropped", "audit"), ("stripped", "audit")]


class TestScriptAndPassthrough:
    def test_mitmdump_script_loads_the_same_addon(self, tmp_path, fixture_bodies):
        """People who run mitmproxy themselves: `mitmdump -s addons/keyveil_addon.py --set keyveil_*`."""
        import os
        import subprocess
        import sys

        from support.servers import REPO, free_port, wait_port

        up = Upstream().start()
        port = free_port()
        env = {**os.environ, "KEYVEIL_TEST_UPSTREAM": up.address}
        cmd = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
               "--listen-host", "127.0.0.1", "--listen-port", str(port), "-s", str(REPO / "addons" / "keyveil_addon.py"),
               "-s", str(REPO / "tests" / "support" / "route_addon.py"), "--set", f"confdir={tmp_path}",
               "--set", f"keyveil_log={tmp_path / 'j'}", "--set", "keyveil_mode=enforce", "--set", "connection_strategy=lazy"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            wait_port(port)
            ct, body = fixture_bodies[0]
            r = request(port, "POST", "http://www.facebook.com/ajax/bz", body, {"content-type": ct})
            assert r.status == 200 and r.headers.get("x-keyveil") == "dropped" and up.seen == []
        finally:
            proc.terminate()
            proc.wait(10)
            up.stop()
        assert [r["action"] for r in read_records([tmp_path / "j"])] == ["dropped"]

    def test_passthrough_args_reach_mitmdump(self, tmp_path):
        up = Upstream().start()
        other = tmp_path / "other.py"
        other.write_text("from mitmproxy import http\n"
                         "class Tag:\n    def response(self, flow: http.HTTPFlow):\n"
                         "        flow.response.headers['x-other'] = 'yes'\naddons = [Tag()]\n")
        confdir = tmp_path / "elsewhere"
        proxy = start_proxy(tmp_path, up.address, passthrough=("-s", str(other), "--set", f"confdir={confdir}"),
                            confdir=confdir)
        try:
            r = request(proxy.port, "GET", "http://example.org/")
            assert r.headers.get("x-other") == "yes"
            assert (confdir / "mitmproxy-ca.pem").exists() and (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
        finally:
            proxy.stop()
            up.stop()
