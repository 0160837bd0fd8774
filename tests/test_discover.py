"""Discovery: behavioral data on a Meta path the catalog does not list is handled by `[defaults]
uncataloged` and journaled `uncataloged`; `keyveil discover` lists those endpoints with a catalog entry
that parses and matches."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import pytest

from keyveil.catalog import parse_catalog
from keyveil.discover import Discovered, catalog_entry, discover
from keyveil.journal import JournalWriter, read_records
from keyveil.pipeline import Pipeline, Request
from support.servers import Upstream, request, start_proxy

CONFIG = Path(__file__).resolve().parents[1] / "config"
FORM = {"content-type": "application/x-www-form-urlencoded"}
NEW_PATH = "/ajax/typeahead/record_metrics/"
QUIET_PATH = "/ajax/home/badges/"


def keys(n: int = 10, t0: float = 5021.7) -> list[dict]:
    out, t = [], t0
    for i in range(n):
        t += 70 + (i * 53) % 140 + 0.3
        out.append({"type": "keydown" if i % 2 == 0 else "keyup", "timeStamp": round(t, 1)})
    return out


def metrics_body(n: int = 10) -> bytes:
    return urlencode({"q": json.dumps({"session": "ta:1", "query_len": 14, "keys": keys(n)}),
                      "__a": "1", "lsd": "AVq0HgW8M9c"}).encode()  # fmt: skip


def badges_body() -> bytes:
    return urlencode({"__a": "1", "badge_types": json.dumps(["notifications", "messages"])}).encode()


def process(p: Pipeline, path: str, body: bytes, host: str = "www.facebook.com"):
    return p.process(Request("POST", f"https://{host}{path}", FORM, body, ts=1737333755.0))


def test_uncataloged_behavioral_flow_is_stripped_and_journaled(pipeline: Pipeline) -> None:
    assert pipeline.match("www.facebook.com", NEW_PATH, "POST").endpoint is None
    out = process(pipeline, NEW_PATH, metrics_body())
    rec = out.record
    assert rec["kind"] == "uncataloged" and rec["endpoint"] is None and rec["action"] == "stripped"
    assert rec["categories"]["keystroke"]["samples"] == 10
    q = json.loads(dict(parse_qsl(out.body.decode()))["q"])
    assert q == {"session": "ta:1", "query_len": 14}  # only the key events left
    # policy [defaults] uncataloged decides: pass keeps the body but still journals what was there
    passing = Pipeline(
        pipeline.catalog, pipeline.rules, dataclasses.replace(pipeline.policy, uncataloged="pass")
    )
    out = process(passing, NEW_PATH, metrics_body())
    assert out.action == "passed" and out.body is None and out.record["kind"] == "uncataloged"
    assert out.record["categories"]["keystroke"]["samples"] == 10
    # nothing behavioral: passed, journaled as uncataloged without behavioral categories
    out = process(pipeline, QUIET_PATH, badges_body())
    assert out.action == "passed" and out.record["kind"] == "uncataloged"
    assert not set(out.record["categories"]) - {"other"}


def _records(pipeline: Pipeline, tmp: Path) -> list[dict]:
    w = JournalWriter(tmp / "j")
    for i in range(3):
        w.write(process(pipeline, NEW_PATH, metrics_body(8 + i)).record)
    w.write(process(pipeline, QUIET_PATH, badges_body()).record)
    w.write(process(pipeline, "/ajax/bz", b"").record)  # cataloged: never listed
    w.close()
    return list(read_records(tmp / "j"))


def test_discover_groups_and_writes_an_entry_that_matches(pipeline: Pipeline, tmp_path: Path) -> None:
    records = _records(pipeline, tmp_path)
    [d] = discover(records, pipeline.catalog)
    assert (d.host, d.path, dict(d.methods), d.requests, d.behavioral) == ("www.facebook.com", NEW_PATH,
                                                                           {"POST": 3}, 3, 3)  # fmt: skip
    assert d.categories["keystroke"] == {"events": 3, "samples": 8 + 9 + 10}
    assert [x.path for x in discover(records, pipeline.catalog, include_all=True)] == [NEW_PATH, QUIET_PATH]

    entry = catalog_entry(d, {e.name for e in pipeline.catalog.endpoints})
    alone = parse_catalog(entry)
    assert alone.match("www.facebook.com", NEW_PATH, "POST").endpoint.name == alone.endpoints[0].name
    ep = alone.endpoints[0]
    assert ep.kind == "telemetry" and ep.category == "keystroke" and ep.answer == "ajax_logging"
    # pasted at the end of the real catalog: the path is now cataloged, and discover no longer lists it
    text = (CONFIG / "endpoints.toml").read_text() + "\n" + entry
    merged = parse_catalog(text)
    assert merged.match("www.facebook.com", NEW_PATH + "?__a=1", "POST").endpoint.name == ep.name
    assert merged.match("www.facebook.com", QUIET_PATH, "POST").endpoint is None
    assert discover(records, merged) == []


def test_entry_for_an_id_segment_and_a_functional_path() -> None:
    d = Discovered("i.instagram.com", "/api/v2/media/:id/seen/", "instagram", requests=2, behavioral=2)
    d.methods["POST"] = 2
    d.categories["scroll"] = {"events": 2, "samples": 9}
    entry = catalog_entry(d, {"discovered_i_instagram_api_v2_media_id_seen"})
    data = tomllib.loads(entry)["endpoint"][0]
    assert data["name"] == "discovered_i_instagram_api_v2_media_id_seen_2"  # unique
    assert data["path_globs"] == ["/api/v2/media/*/seen/"] and data["kind"] == "functional"
    cat = parse_catalog(entry)
    assert cat.match("i.instagram.com", "/api/v2/media/3141592653589793/seen/", "POST").endpoint is not None
    assert cat.match("i.instagram.com", "/api/v2/media/3141592653589793/like/", "POST").endpoint is None


@pytest.mark.timeout(60)
def test_discover_command_on_a_journal_written_by_keyveil_run(tmp_path: Path) -> None:
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address)
    try:
        for i in range(3):
            r = request(proxy.port, "POST", f"https://www.facebook.com{NEW_PATH}?__a=1", metrics_body(10 + i),
                        cafile=proxy.cafile)  # fmt: skip
            assert r.status == 200 and r.body == b"upstream-ok"
            assert "keys" not in json.loads(dict(parse_qsl(up.seen[-1].body.decode()))["q"])
        r = request(
            proxy.port, "POST", f"https://www.facebook.com{QUIET_PATH}", badges_body(), cafile=proxy.cafile
        )
        assert up.seen[-1].body == badges_body()
    finally:
        proxy.stop()
        up.stop()
    recs = [r for r in read_records(proxy.journal) if r["kind"] == "uncataloged"]
    assert [r["action"] for r in recs] == ["stripped"] * 3 + ["passed"]

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "keyveil.cli", "discover", str(proxy.journal), *args],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert res.returncode == 0, res.stderr
        return res.stdout

    text = cli()
    assert f"www.facebook.com{NEW_PATH}  [POST]  3 requests, 3 behavioral  (stripped 3)" in text
    assert "keystroke 3/33" in text and QUIET_PATH not in text
    toml = cli("--toml")
    assert toml.startswith("[[endpoint]]") and toml in text
    merged = parse_catalog((CONFIG / "endpoints.toml").read_text() + "\n" + toml)
    assert merged.match("www.facebook.com", NEW_PATH, "POST").endpoint.name.startswith("discovered_")
    assert QUIET_PATH in cli("--all")
    assert [e["path"] for e in json.loads(cli("--json"))] == [NEW_PATH]
