"""`keyveil scan`: a HAR export and a mitmproxy flow file (real formats, written here) go through the
same pipeline as the proxy and come out as the same reports."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyveil import websocket as ws
from keyveil.commands.scan import ScanStats, scan
from keyveil.pipeline import Pipeline, Request
from keyveil.report import report_from_records

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
FIXTURE = Path(__file__).parent / "fixtures" / "facebook-banzai-2025-01.json"
BZ = "https://www.facebook.com/ajax/bz?__a=1&__user=0"
WS_URL = "wss://gateway.facebook.com/ws/realtime"
T0 = datetime(2025, 1, 20, 0, 42, tzinfo=UTC).timestamp()


def falco_frame() -> bytes:
    t, keys = 1000.0, []
    for i in range(12):
        t += 60 + (i * 37) % 120 + 0.4
        keys.append({"type": "keydown" if i % 2 == 0 else "keyup", "t": round(t, 1)})
    ev = {
        "name": "comet_composer_keystroke",
        "extra": json.dumps({"keys": keys}),
        "rate": 1,
        "time": 1,
        "tags": 0,
    }
    return json.dumps({"events": [ev]}).encode()


def bodies() -> list[tuple[str, bytes]]:
    data = json.loads(FIXTURE.read_text())
    return [(b["content_type"], b["body"].encode()) for b in data["bodies"]]


def expected_records() -> list[dict]:
    """What the pipeline decides on the same inputs, called directly."""
    p = Pipeline.from_config_dir(CONFIG)
    recs = []
    for i, (ct, body) in enumerate(bodies()):
        out = p.process(Request("POST", BZ, {"content-type": ct}, body, T0 + i))
        recs.append(out.record)
    out = p.process(Request("GET", "https://www.facebook.com/tr/?id=1&ev=PageView", {}, b"", T0 + 10))
    recs.append(out.record)
    # the socket's handshake is a request too: the proxy's request hook sees it before any message
    recs.append(p.process(Request("GET", WS_URL, {}, b"", T0 + 20)).record)
    match = p.match("gateway.facebook.com", "/ws/realtime", "GET")
    assert match is not None
    wo = ws.inspect_message(
        p,
        match,
        "gateway.facebook.com",
        "/ws/realtime",
        falco_frame(),
        is_text=True,
        from_client=True,
        ts=T0 + 20,
    )
    recs.append(wo.record)
    assert all(r is not None for r in recs)
    return recs


def har(path: Path) -> Path:
    def entry(
        method: str, url: str, ts: float, ct: str | None = None, body: bytes = b"", **extra: object
    ) -> dict:
        req: dict = {
            "method": method,
            "url": url,
            "httpVersion": "HTTP/2",
            "headers": [{"name": ":authority", "value": "x"}, {"name": "User-Agent", "value": "Chrome"}],
            "queryString": [],
            "cookies": [],
            "headersSize": -1,
            "bodySize": len(body),
        }
        if ct:
            req["headers"].append({"name": "Content-Type", "value": ct})
            req["postData"] = {"mimeType": ct, "text": body.decode()}
        started = datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
        return {"startedDateTime": started, "time": 12, "request": req, "response": {"status": 200}, **extra}

    entries = [entry("POST", BZ, T0 + i, ct, body) for i, (ct, body) in enumerate(bodies())]
    entries.append(entry("GET", "https://www.facebook.com/tr/?id=1&ev=PageView", T0 + 10))
    entries.append(entry("POST", "https://example.com/form", T0 + 11, "text/plain", b"hello"))
    entries.append(
        entry(
            "GET",
            WS_URL,
            T0 + 20,
            _webSocketMessages=[
                {"type": "send", "time": T0 + 20, "opcode": 1, "data": falco_frame().decode()},
                {"type": "receive", "time": T0 + 21, "opcode": 1, "data": '{"events":[]}'},
            ],
        )
    )
    path.write_text(json.dumps({"log": {"version": "1.2", "creator": {"name": "test"}, "entries": entries}}))
    return path


def mitm_file(path: Path) -> Path:
    from mitmproxy import http, io
    from mitmproxy.test import tflow
    from mitmproxy.websocket import WebSocketMessage
    from wsproto.frame_protocol import Opcode

    flows = []
    for i, (ct, body) in enumerate(bodies()):
        f = tflow.tflow(resp=True)
        headers = {"content-type": ct}
        if i % 2:  # sent gzip-encoded: scan must decode it as the proxy does
            headers["content-encoding"] = "gzip"
        f.request = http.Request.make("POST", BZ, b"", headers)
        f.request.content = body  # encoded per content-encoding
        if i % 2:
            assert f.request.raw_content[:2] == b"\x1f\x8b" and gzip.decompress(f.request.raw_content) == body
        f.request.timestamp_start = T0 + i
        flows.append(f)
    f = tflow.tflow(resp=True)
    f.request = http.Request.make("GET", "https://www.facebook.com/tr/?id=1&ev=PageView")
    f.request.timestamp_start = T0 + 10
    flows.append(f)
    f = tflow.tflow(resp=True)
    f.request = http.Request.make("POST", "https://example.com/form", b"hello")
    flows.append(f)
    f = tflow.twebsocketflow()
    f.request = http.Request.make("GET", WS_URL.replace("wss://", "https://"))
    f.request.timestamp_start = T0 + 20
    assert f.websocket is not None
    f.websocket.messages = [
        WebSocketMessage(Opcode.TEXT, True, falco_frame(), T0 + 20),
        WebSocketMessage(Opcode.TEXT, False, b'{"events":[]}', T0 + 21),
    ]
    flows.append(f)
    with open(path, "wb") as fh:
        w = io.FlowWriter(fh)
        for f in flows:
            w.add(f)
    return path


def comparable(records: list[dict]) -> dict:
    s = report_from_records(records).summary
    for k in ("generated", "journal"):
        s.pop(k)
    return s


@pytest.mark.parametrize("maker", [har, mitm_file], ids=["har", "mitm"])
def test_scan_gives_the_pipelines_decisions(tmp_path: Path, maker) -> None:
    src = maker(tmp_path / ("flows.har" if maker is har else "flows.mitm"))
    stats = ScanStats()
    got = scan([src], CONFIG, stats)
    assert stats.requests == 10 and stats.meta == 9 and stats.ws_messages == 1
    want = expected_records()
    assert [(r["endpoint"], r["action"], r["categories"], r["routes"]) for r in got] == [
        (r["endpoint"], r["action"], r["categories"], r["routes"]) for r in want
    ]
    assert [round(r["ts"]) for r in got] == [round(r["ts"]) for r in want]  # the capture's times, not now
    s = comparable(got)
    assert s == comparable(want)
    assert s["categories"]["fingerprint"]["events"] > 0 and s["categories"]["keystroke"]["events"] > 0
    assert s["endpoints"]["banzai"]["flows"] == len(bodies())


@pytest.mark.timeout(120)
def test_scan_cli_writes_the_same_reports(tmp_path: Path) -> None:
    src = har(tmp_path / "flows.har")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyveil.cli",
            "scan",
            str(src),
            "--config",
            str(CONFIG),
            "--format",
            "json",
            "--journal",
            str(tmp_path / "j"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    want = comparable(expected_records())
    assert s["flows"] == want["flows"] == 10
    assert s["actions"] == want["actions"] and s["categories"] == want["categories"]
    assert "10 requests, 9 to Meta, 1 WebSocket" in p.stderr
    # the journal it wrote reads back into the same report
    p2 = subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "report", str(tmp_path / "j"), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    s2 = json.loads(p2.stdout)
    assert s2["flows"] == 10 and s2["categories"] == s["categories"] and s2["actions"] == s["actions"]
    out = tmp_path / "scan.html"
    p3 = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyveil.cli",
            "scan",
            str(mitm_file(tmp_path / "f.mitm")),
            "--config",
            str(CONFIG),
            "-o",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p3.returncode == 0, p3.stderr
    assert f'id="kv-flows" data-value="{want["flows"]}"' in out.read_text()
    p5 = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyveil.cli",
            "scan",
            str(src),
            "--config",
            str(CONFIG),
            "--format",
            "json",
            "--category",
            "fingerprint",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    sel = json.loads(p5.stdout)
    want_sel = report_from_records(expected_records(), categories=["fingerprint"]).summary
    assert 0 < sel["flows"] == want_sel["flows"] < s["flows"]
    assert sel["categories"] == want_sel["categories"]
    bad = tmp_path / "bad.har"
    bad.write_text("{not json")
    p4 = subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "scan", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert p4.returncode == 1 and "cannot read" in p4.stderr
