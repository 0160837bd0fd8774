"""Concurrency and load: a few thousand mixed flows over many keep-alive connections through `keyveil run`.

Checks that every telemetry flow was handled (answered locally, never seen upstream), every functional
flow arrived intact (byte for byte, or stripped of exactly the behavioral fields), non-Meta traffic was
left alone, the journal holds exactly one record per Meta flow, and the proxy's memory stays bounded.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import pytest

from conftest import banzai_fixture
from keyveil.journal import read_records
from support.servers import Upstream, start_proxy

THREADS = 24  # connections, each kept alive for all its requests
PER_THREAD = 125  # 3000 flows
TLS_THREADS = 4  # of THREADS, through CONNECT + TLS with keyveil's CA
KEYS = [1737333755506, 1737333755618, 1737333755790, 1737333755901, 1737333756133, 1737333756240]
MIB = 1024 * 1024
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


def graphql(uid: str, behavioral: bool) -> bytes:
    inp: dict = {"message": {"text": f"hello {uid}"}, "thread_id": "100042"}
    if behavioral:
        inp["typing_metrics"] = {"keydown_ts": KEYS, "dwell": [90, 110, 87, 140, 101, 95]}
    return urlencode({"doc_id": uid, "fb_api_req_friendly_name": "useMWChatSendMessageMutation",
                      "variables": json.dumps({"input": inp})}).encode()


class Client:
    """One keep-alive connection to the proxy; reconnects if the proxy closes it."""

    def __init__(self, port: int, tls: bool, cafile: Path) -> None:
        self.port, self.tls, self.cafile = port, tls, cafile
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.cafile))
            conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=ctx)
            conn.set_tunnel("www.facebook.com", 443)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        return conn

    def send(self, method: str, host: str, path: str, body: bytes, ct: str) -> tuple[int, dict[str, str], bytes]:
        if self.tls and host != "www.facebook.com":
            host = "www.facebook.com"
        target = path if self.tls else f"http://{host}{path}"
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request(method, target, body=body or None, headers={"content-type": ct, "host": host})
                r = self.conn.getresponse()
                return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def workload(tid: int, fixtures: list[tuple[str, bytes]]) -> list[tuple[str, str, str, bytes, str]]:
    """(kind, host, path, body, content type) per request; uid is in the body or query."""
    out = []
    for i in range(PER_THREAD):
        uid = f"{tid}-{i}"
        k = i % 8
        if k in (0, 1, 2):  # Banzai: the real bodies, with a unique marker in the query
            ct, body = fixtures[(tid + i) % len(fixtures)]
            out.append(("telemetry", "www.facebook.com", f"/ajax/bz?__req={uid}", body, ct))
        elif k == 3:  # Pixel image GET
            out.append(("pixel", "www.facebook.com", f"/tr/?id=1&ev=PageView&uid={uid}", b"", "text/plain"))
        elif k in (4, 5):
            out.append(("functional", "www.facebook.com", "/api/graphql/", graphql(uid, False),
                        "application/x-www-form-urlencoded"))
        elif k == 6:
            out.append(("behavioral", "www.facebook.com", "/api/graphql/", graphql(uid, True),
                        "application/x-www-form-urlencoded"))
        else:
            out.append(("other", "example.org", f"/page?uid={uid}", uid.encode(), "text/plain"))
    return out


def test_thousands_of_mixed_flows(tmp_path):
    fixtures = banzai_fixture()
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address, "--pac-port", "-1")
    errors: list[str] = []
    sent: Counter[str] = Counter()
    lock = threading.Lock()
    pid = proxy.proc.pid
    try:
        # warm-up: every kind once, then memory is measured from here
        warm = Client(proxy.port, False, proxy.cafile)
        for kind, host, path, body, ct in workload(999, fixtures)[:40]:
            warm.send("GET" if kind in ("pixel", "other") and not body else "POST", host, path, body, ct)
            with lock:
                sent["warm-" + kind] += 1
        warm.close()
        time.sleep(0.5)
        after_warmup = rss(pid)
        seen_before = len(up.seen)

        def run(tid: int) -> None:
            client = Client(proxy.port, tid < TLS_THREADS, proxy.cafile)
            try:
                for kind, host, path, body, ct in workload(tid, fixtures):
                    method = "GET" if kind == "pixel" else "POST"
                    if client.tls and kind == "other":
                        continue  # a TLS tunnel to facebook.com cannot carry example.org
                    status, headers, content = client.send(method, host, path, body, ct)
                    ok = status == 200
                    if kind in ("telemetry", "pixel"):
                        ok = ok and headers.get("x-keyveil") == "dropped"
                        if kind == "pixel":
                            ok = ok and content.startswith(b"GIF89a")
                    else:
                        ok = ok and content == b"upstream-ok"
                    with lock:
                        sent[kind] += 1
                        if not ok:
                            errors.append(f"{kind} {path}: {status} {headers.get('x-keyveil')}")
            except Exception as e:  # noqa: BLE001 - reported below with the thread id
                with lock:
                    errors.append(f"thread {tid}: {type(e).__name__}: {e}")
            finally:
                client.close()

        t0 = time.monotonic()
        threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        elapsed = time.monotonic() - t0
        end = rss(pid)
        alive = proxy.proc.poll() is None
    finally:
        out = proxy.stop()
        up.stop()

    assert not errors, errors[:10]
    assert alive and "Traceback" not in out
    total = sum(v for k, v in sent.items() if not k.startswith("warm-"))
    assert total >= THREADS * PER_THREAD * 0.95

    # upstream: no telemetry ever, functional bodies intact, behavioral fields gone, others untouched
    seen = up.seen[seen_before:]
    assert not [s for s in seen if s.path.startswith(("/ajax/bz", "/tr"))]
    graph = [s for s in seen if s.path == "/api/graphql/"]
    assert len(graph) == sent["functional"] + sent["behavioral"]
    expected = {}
    for tid in range(THREADS):
        for kind, _, _, body, _ in workload(tid, fixtures):
            if kind in ("functional", "behavioral"):
                expected[dict(parse_qsl(body.decode()))["doc_id"]] = (kind, body)
    for s in graph:
        fields = dict(parse_qsl(s.body.decode()))
        kind, body = expected.pop(fields["doc_id"])
        if kind == "functional":
            assert s.body == body  # byte for byte
        else:
            inp = json.loads(fields["variables"])["input"]
            assert "typing_metrics" not in inp and inp["message"]["text"] == f"hello {fields['doc_id']}"
            assert int(s.headers["content-length"]) == len(s.body)
    assert not expected  # every functional flow arrived, exactly once
    others = [s for s in seen if s.host == "example.org"]
    assert len(others) == sent["other"] and all(s.body.decode() in s.path for s in others)

    # journal: one record per Meta flow (warm-up included), none for example.org
    recs = list(read_records([proxy.journal]))
    meta = sum(v for k, v in sent.items() if not k.endswith("other"))
    assert len(recs) == meta
    actions = Counter((r["endpoint"], r["action"]) for r in recs)
    assert actions[("banzai", "dropped")] == sent["telemetry"] + sent["warm-telemetry"]
    assert actions[("pixel", "dropped")] == sent["pixel"] + sent["warm-pixel"]
    assert actions[("graphql", "stripped")] == sent["behavioral"] + sent["warm-behavioral"]
    assert actions[("graphql", "passed")] == sent["functional"] + sent["warm-functional"]

    grew = end["VmRSS"] - after_warmup["VmRSS"]
    print(f"\n{total} flows over {THREADS} connections in {elapsed:.1f} s ({total / elapsed:.0f}/s); proxy RSS "
          f"{after_warmup['VmRSS'] / MIB:.1f} MiB after warm-up -> {end['VmRSS'] / MIB:.1f} MiB at the end "
          f"(peak {end['VmHWM'] / MIB:.1f} MiB)")
    assert grew < 64 * MIB  # no per-flow state kept
