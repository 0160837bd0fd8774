"""Rewrite mode end to end: keystroke payloads go through `keyveil run` and arrive re-timed, with
every other field intact and the bot-detection signals still decrypting with the same asid."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from keyveil import bdsignals
from keyveil.journal import read_records
from support.servers import Upstream, request, start_proxy

ROOT = Path(__file__).resolve().parents[1]
ASID = "97ef8a51-9623-49fa-a700-db1bf6671c8d"
BOUNDARY = "----WebKitFormBoundaryRewrite0001"
pytestmark = pytest.mark.timeout(90)


def key_records(start_s: float, n: int = 12) -> list[dict]:
    """Alternating key down/up records, human-like: holds ~100 ms, presses ~230 ms apart."""
    recs, t = [], start_s
    for i in range(n):
        hold = 0.085 + (i % 4) * 0.013
        recs.append({"t": round(t, 3), "v": {"action": 2, "key_code": 0}})
        recs.append({"t": round(t + hold, 3), "v": {"action": 1, "key_code": 0}})
        t += 0.19 + (i % 5) * 0.037
    return recs


def banzai_body(now_ms: int) -> tuple[bytes, list]:
    recs = key_records(now_ms / 1000 - 20)
    signals = {"30100": recs, "30001": [{"t": recs[0]["t"], "v": 3}]}
    e = {"asid": ASID, "ct": 1659080345, "sjd": bdsignals.encrypt_sjd(bdsignals.dumps_signals(signals), ASID), "sid": -1}
    keys = [now_ms - 15000]
    for gap in (212, 145, 301, 188, 260, 99, 175, 340, 230):  # a typist's inter-key gaps
        keys.append(keys[-1] + gap)
    posts = [
        ["falco:bd_pdc_signals", {"e": json.dumps(e, separators=(",", ":")), "r": 1, "s": "sess"}, now_ms - 100, 0, 512],
        ["falco:composer_zq", {"k": keys, "len": 10, "surface": "chat"}, now_ms - 90, 0, 200],
        ["falco:ods_web_batch", {"e": '{"counters":{"x":1}}'}, now_ms - 80, 0, 40],
    ]
    q = json.dumps([{"app_id": "256281040558", "posts": posts, "trigger": "falco:bd_pdc_signals",
                     "send_method": "ajax", "compression": ""}], separators=(",", ":"))
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="ts"\r\n\r\n{now_ms}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="q"\r\n\r\n{q}\r\n--{BOUNDARY}--\r\n').encode()
    return body, posts


def parse(body: bytes) -> tuple[str, list]:
    parts = body.split(f"--{BOUNDARY}".encode())
    ts = parts[1].split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n").decode()
    q = json.loads(parts[2].split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"))
    return ts, q


@pytest.fixture()
def rewrite_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config"
    cfg.mkdir()
    for n in ("endpoints.toml", "detection.toml"):
        shutil.copy(ROOT / "config" / n, cfg / n)
    (cfg / "policy.toml").write_text(
        '[defaults]\ntelemetry = "strip"\n'
        '[[rule]]\ncategory = "keystroke"\naction = "rewrite"\n'
        '[rewrite]\nmode = "resample"\nstrength = 1.0\n'
    )
    return cfg


def test_keystroke_payload_arrives_retimed(tmp_path, rewrite_config):
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address, config=rewrite_config)
    now_ms = int(time.time() * 1000)
    body, posts = banzai_body(now_ms)
    try:
        r = request(proxy.port, "POST", "https://www.facebook.com/ajax/bz", body,
                    {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}, cafile=proxy.cafile)
        assert r.status == 200
    finally:
        proxy.stop()
        up.stop()
    [seen] = up.seen
    ts, q = parse(seen.body)
    assert ts == str(now_ms) and int(seen.headers["content-length"]) == len(seen.body)
    sent = q[0]["posts"]
    assert [p[0] for p in sent] == [p[0] for p in posts]
    assert {k: v for k, v in q[0].items() if k != "posts"} == {"app_id": "256281040558", "trigger": "falco:bd_pdc_signals",
                                                               "send_method": "ajax", "compression": ""}

    # 1. the encrypted key records: same asid, same records and actions, new times, still human
    e = json.loads(sent[0][1]["e"])
    old_e = json.loads(posts[0][1]["e"])
    assert {k: v for k, v in e.items() if k != "sjd"} == {k: v for k, v in old_e.items() if k != "sjd"}
    signals = bdsignals.parse_signals(bdsignals.decrypt_sjd(e["sjd"], ASID))
    old = bdsignals.parse_signals(bdsignals.decrypt_sjd(old_e["sjd"], ASID))
    assert signals["30001"] == old["30001"]
    new_t = [r["t"] for r in signals["30100"]]
    old_t = [r["t"] for r in old["30100"]]
    assert [r["v"] for r in signals["30100"]] == [r["v"] for r in old["30100"]]
    assert new_t != old_t and len(new_t) == len(old_t)
    assert new_t[-1] <= now_ms / 1000 + 1
    downs, ups = new_t[0::2], new_t[1::2]
    assert all(u > d for d, u in zip(downs, ups, strict=True))  # every release after its press
    assert downs == sorted(downs)
    holds = [u - d for d, u in zip(downs, ups, strict=True)]
    assert all(0.02 < h < 0.5 for h in holds) and len({round(h, 3) for h in holds}) > 1

    # 2. a minified keystroke series in plain JSON: re-timed in place, the rest unchanged
    assert sent[1][1]["len"] == 10 and sent[1][1]["surface"] == "chat"
    k, old_k = sent[1][1]["k"], posts[1][1]["k"]
    assert k != old_k and len(k) == len(old_k) and k == sorted(k) and all(isinstance(x, int) for x in k)
    gaps = [b - a for a, b in zip(k, k[1:], strict=False)]
    assert all(20 <= g <= 3000 for g in gaps) and len(set(gaps)) > 1
    assert sent[1][2:] == posts[1][2:]

    # 3. what is not behavioral passes untouched
    assert sent[2] == posts[2]

    recs = list(read_records([proxy.journal]))
    assert [r["action"] for r in recs] == ["rewritten"]
    raw = b"".join(p.read_bytes() for p in proxy.journal.rglob("*") if p.is_file())
    assert str(old_k[3]).encode() not in raw and str(k[3]).encode() not in raw
