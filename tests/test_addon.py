"""The mitmproxy adapter, in-process with mitmproxy's own test helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from keyveil.addon import Keyveil
from keyveil.journal import read_records

ROOT = Path(__file__).resolve().parents[1]


def flow(host: str, path: str, body: bytes = b"", method: str = "POST", ct: str = "application/x-www-form-urlencoded"):
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path.encode(), method=method.encode(),
                                    content=body, headers=((b"host", host.encode()), (b"content-type", ct.encode()))))
    f.request.authority = ""
    return f


class TestKeyveil:
    async def test_drop_strip_pass(self, tmp_path, fixture_bodies):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log=str(tmp_path / "j"))
            ct, body = fixture_bodies[2]
            f = flow("www.facebook.com", "/ajax/bz", body, ct=ct)
            await kv.request(f)
            assert f.response.status_code == 200 and f.metadata["keyveil"] == "dropped"

            other = flow("example.org", "/ajax/bz", b"q=1")
            await kv.request(other)
            assert other.response is None and "keyveil" not in other.metadata and other.request.content == b"q=1"

            gql = b"doc_id=1&variables=" + json.dumps({"text": "hi", "k": [1737333755506, 1737333755618, 1737333755790,
                                                                         1737333755901, 1737333756133]}).encode()
            g = flow("www.facebook.com", "/api/graphql/", gql)
            await kv.request(g)
            assert g.response is None and g.metadata["keyveil"] == "stripped"
            assert g.request.content == b'doc_id=1&variables=%7B%22text%22%3A+%22hi%22%7D'.replace(b"%3A+", b"%3A")
            assert g.request.headers["content-length"] == str(len(g.request.content))
            kv.done()
        recs = list(read_records([tmp_path / "j"]))
        assert [r["action"] for r in recs] == ["dropped", "stripped"]

    async def test_interception_scoped_to_catalog(self):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log="")
            assert tctx.options.allow_hosts == [kv.pipeline.catalog.intercept_regex()]
            tctx.configure(kv, keyveil_intercept_all=True)
            kv2 = Keyveil()
        with taddons.context(kv2) as tctx:
            tctx.configure(kv2, keyveil_intercept_all=True, keyveil_log="")
            assert tctx.options.allow_hosts == []

    async def test_bad_reload_keeps_old_config(self, tmp_path):
        bad = tmp_path / "cfg"
        bad.mkdir()
        for n in ("endpoints.toml", "detection.toml"):
            (bad / n).write_text((ROOT / "config" / n).read_text())
        (bad / "policy.toml").write_text('mode = "enforce"\n[categories]\nkeystroke = "explode"\n')
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log="")
            before = kv.pipeline
            with pytest.raises(exceptions.OptionsError, match="policy.toml"):
                tctx.configure(kv, keyveil_config=str(bad))
            assert kv.pipeline is before

    async def test_hook_never_raises(self, monkeypatch):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log="")

            def boom(*a, **k):
                raise RuntimeError("bug")

            monkeypatch.setattr(kv.pipeline, "process", boom)
            f = flow("www.facebook.com", "/ajax/bz", b"q=[]")
            await kv.request(f)
            assert f.response is None and f.request.content == b"q=[]" and kv.counts["failed"] == 1

    async def test_live_page(self):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log="")
            await kv.request(flow("www.facebook.com", "/ajax/bz", b"q=[]&ts=1"))
            f = tflow.tflow(req=tutils.treq(host="keyveil", port=80, scheme=b"http", path=b"/", method=b"GET", content=b""))
            f.request.headers["host"] = "keyveil"
            await kv.request(f)
            assert f.response.status_code == 200 and b"dropped" in f.response.content

    def test_options_have_help(self):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            opts = {k: v for k, v in tctx.options._options.items() if k.startswith("keyveil_")}
            assert {"keyveil_config", "keyveil_mode", "keyveil_log", "keyveil_intercept_all"} <= set(opts)
            assert all(len(o.help) > 20 for o in opts.values())
            assert "audit" in opts["keyveil_mode"].help

    async def test_rewrite_options(self):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log="")
            tctx.configure(kv, keyveil_rewrite_mode="delay", keyveil_rewrite_max_delay_ms="40")
            assert kv.pipeline.rewriter.cfg.mode == "delay" and kv.pipeline.rewriter.cfg.max_delay_ms == 40.0
            for bad in ({"keyveil_rewrite_mode": "scramble"}, {"keyveil_rewrite_strength": "2"},
                        {"keyveil_rewrite_strength": "strong"}):
                with pytest.raises(exceptions.OptionsError):
                    tctx.configure(kv, **bad)
            assert kv.pipeline.rewriter.cfg.mode == "delay"

    async def test_report_command_and_live_summary(self, tmp_path, fixture_bodies):
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(ROOT / "config"), keyveil_log=str(tmp_path / "j"))
            for ct, body in fixture_bodies:
                await kv.request(flow("www.facebook.com", "/ajax/bz", body, ct=ct))
            out = tctx.command(kv.report_cmd, str(tmp_path / "r.json"))
            rep = json.loads(Path(out).read_text())
            assert rep["flows"] == len(fixture_bodies) and rep["actions"]["dropped"] == len(fixture_bodies)
            assert rep["categories"]["activity"]["events"] == 3
            page = flow("keyveil", "/", method="GET")
            page.request.scheme, page.request.port = "http", 80
            await kv.request(page)
            assert page.response.status_code == 200 and b"<svg" in page.response.content
            assert kv.live.summary()["flows"] == len(fixture_bodies)
            kv.done()

    def test_every_option_is_documented(self):
        kv = Keyveil()
        doc = (ROOT / "docs" / "options.md").read_text()
        with taddons.context(kv) as tctx:
            names = [k for k in tctx.options._options if k.startswith("keyveil_")]
        assert names and all(f"`{n}`" in doc for n in names), [n for n in names if f"`{n}`" not in doc]
