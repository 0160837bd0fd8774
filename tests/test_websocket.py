"""WebSocket Falco streams and realtime tasks on gateway.* sockets: the pure decision, then a real
WebSocket through `keyveil run` to a local server."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from keyveil import bdsignals
from keyveil import websocket as ws
from keyveil.journal import read_records
from keyveil.pipeline import Pipeline
from support.servers import start_proxy
from support.wsserver import GREETING, WsClient, WsServer

CONFIG = Path(__file__).resolve().parents[1] / "config"
HOST, PATH = "gateway.facebook.com", "/ws/realtime"


def event(name: str, extra: dict, t: int = 1737333755490) -> dict:
    return {"name": name, "extra": json.dumps(extra, separators=(",", ":")), "rate": 1, "time": t, "tags": 0}


def keys(n: int = 12) -> list[dict]:
    # key down/up records with page-relative times: gaps of ~60-180 ms, not constant
    t, out = 1000.0, []
    for i in range(n):
        t += 60 + (i * 37) % 120 + 0.4
        out.append({"type": "keydown" if i % 2 == 0 else "keyup", "t": round(t, 1)})
    return out


KEYSTROKE = event("comet_composer_keystroke", {"keys": keys()})
MOUSEOVER = event("feed_coreinteractionmouseover_augl", {"surface": "feed"})
PAGE_LOAD = event("comet_page_load", {"route": "home", "ms": 412})
TYPING = event("messenger_typing_state", {"is_typing": True, "thread_key": "t1"})


def frame(*events: dict) -> bytes:
    return json.dumps({"events": list(events)}, separators=(",", ":")).encode()


def lightspeed(tasks: list[dict] | None = None, typing: bool = False, request_id: int = 5) -> bytes:
    """A Messenger lightspeed /ls_req message as an MQTT PUBLISH packet (QoS 1)."""
    if typing:
        inner = {
            "label": "3",
            "payload": json.dumps(
                {
                    "thread_key": 123,
                    "is_group_thread": 0,
                    "is_typing": 1,
                    "attribution": 0,
                    "sync_group": 1,
                    "thread_type": 1,
                }
            ),
            "version": "6243569662359088",
        }
        outer = {
            "app_id": "2220391788200892",
            "payload": json.dumps(inner),
            "request_id": request_id,
            "type": 4,
        }
    else:
        inner = {"epoch_id": 7241726279209872, "tasks": tasks, "version_id": "6243569662359088"}
        outer = {
            "app_id": "2220391788200892",
            "payload": json.dumps(inner),
            "request_id": request_id,
            "type": 3,
        }
    payload = json.dumps(outer).encode()
    topic = b"/ls_req"
    body = len(topic).to_bytes(2, "big") + topic + request_id.to_bytes(2, "big") + payload
    return bytes([0x32]) + ws._varint(len(body)) + body


def send_task(text: str) -> dict:
    return {
        "label": "46",
        "payload": json.dumps({"thread_id": 123, "otid": "7123", "source": 0, "send_type": 1, "text": text}),
        "queue_name": "123",
        "task_id": 0,
        "failure_count": None,
    }


TYPING_TASK = {
    "label": "3",
    "payload": json.dumps({"thread_key": 123, "is_typing": 1}),
    "queue_name": "typing",
    "task_id": 1,
    "failure_count": None,
}


@pytest.fixture(scope="module")
def strip_features(pipeline: Pipeline) -> Pipeline:
    return Pipeline(pipeline.catalog, pipeline.rules, dataclasses.replace(pipeline.policy, features="strip"))


def inspect(
    p: Pipeline, content: bytes, text: bool = True, from_client: bool = True, host: str = HOST
) -> ws.WsOutcome:
    match = p.match(host, PATH, "GET")
    return ws.inspect_message(p, match, host, PATH, content, is_text=text, from_client=from_client, ts=1.0e9)


# -- the pure decision ---------------------------------------------------------------------------


def test_only_behavioral_events_drop_the_frame(pipeline: Pipeline) -> None:
    out = inspect(pipeline, frame(KEYSTROKE, MOUSEOVER))
    assert out.drop and out.action == "dropped"
    rec = out.record
    assert rec["method"] == "WS" and rec["endpoint"] == "falco_ws" and rec["action"] == "dropped"
    assert rec["categories"]["keystroke"] == {"events": 1, "samples": 12}
    assert rec["categories"]["pointer"]["events"] == 1
    assert rec["routes"] == {"comet_composer_keystroke": 1, "feed_coreinteractionmouseover_augl": 1}
    assert rec["size_out"] == 0 and rec["size_in"] == len(frame(KEYSTROKE, MOUSEOVER))


def test_mixed_frame_is_reencoded_without_behavioral_events(pipeline: Pipeline) -> None:
    raw = frame(PAGE_LOAD, KEYSTROKE, MOUSEOVER, TYPING)
    out = inspect(pipeline, raw)
    assert not out.drop and out.action == "stripped"
    assert out.content == frame(PAGE_LOAD, TYPING)  # the kept events byte for byte, typing included
    assert out.record["routes"]["typing_indicator"] == 1
    assert out.record["size_out"] == len(out.content)


def test_frames_without_behavioral_events_pass_untouched(pipeline: Pipeline) -> None:
    for raw in (frame(PAGE_LOAD), frame(TYPING), frame(), b'{"type":"ping"}'):
        out = inspect(pipeline, raw)
        assert out.action == "passed" and not out.drop and out.content is None, raw


def test_typing_indicators_pass_by_default_and_go_with_features_strip(
    pipeline: Pipeline, strip_features: Pipeline
) -> None:
    assert inspect(pipeline, frame(TYPING)).action == "passed"
    out = inspect(strip_features, frame(TYPING))
    assert out.drop and out.record["routes"]["typing_indicator"] == 1
    out = inspect(strip_features, frame(PAGE_LOAD, TYPING))
    assert out.content == frame(PAGE_LOAD)


def test_lightspeed_typing_task_over_mqtt(pipeline: Pipeline, strip_features: Pipeline) -> None:
    packet = lightspeed(typing=True)
    assert ws.parse_mqtt_publish(packet) is not None
    out = inspect(pipeline, packet, text=False)
    assert out.action == "passed" and out.content is None and out.record["layers"][0] == "mqtt"
    out = inspect(strip_features, packet, text=False)
    assert out.drop and out.action == "dropped"


def test_lightspeed_mixed_tasks_keep_the_message_send_byte_for_byte(strip_features: Pipeline) -> None:
    send = send_task("see you at 8 \u00e9\u00e8 \U0001f370")
    packet = lightspeed([send, TYPING_TASK])
    out = inspect(strip_features, packet, text=False)
    assert out.action == "stripped" and out.content is not None
    mqtt = ws.parse_mqtt_publish(out.content)
    assert mqtt is not None and mqtt.head == ws.parse_mqtt_publish(packet).head  # topic and packet id kept
    outer = json.loads(mqtt.payload)
    tasks = json.loads(outer["payload"])["tasks"]
    assert tasks == [send]  # the send task's payload string is the original (an unchanged layer)


def test_mqtt_roundtrip_and_rejects() -> None:
    packet = lightspeed([send_task("hi")])
    m = ws.parse_mqtt_publish(packet)
    assert m is not None and m.encode(m.payload) == packet
    big = m.encode(m.payload + b" " * 300)  # a remaining length over 127 takes two varint bytes
    assert ws.parse_mqtt_publish(big).payload == m.payload + b" " * 300
    assert ws.parse_mqtt_publish(packet[:-1]) is None  # truncated
    assert ws.parse_mqtt_publish(b"\xc0\x00") is None  # PINGREQ
    assert ws.parse_mqtt_publish(packet + packet) is None  # two packets: not one publish


def test_not_inspected(pipeline: Pipeline) -> None:
    raw = frame(KEYSTROKE)
    assert inspect(pipeline, raw, from_client=False) is ws.IGNORED  # server -> client
    assert inspect(pipeline, b"hello", text=True) is ws.IGNORED  # not JSON
    assert inspect(pipeline, b"\x00\x01binary", text=False) is ws.IGNORED
    edge = pipeline.match("edge-chat.facebook.com", "/chat", "GET")
    assert not ws.is_ws_match(edge)  # a socket the catalog does not mark falco_ws
    assert (
        ws.inspect_message(
            pipeline, edge, "edge-chat.facebook.com", "/chat", raw, is_text=True, from_client=True
        )
        is ws.IGNORED
    )


def test_audit_mode_changes_nothing(pipeline: Pipeline) -> None:
    audit = Pipeline(pipeline.catalog, pipeline.rules, pipeline.policy, mode="audit")
    out = inspect(audit, frame(KEYSTROKE))
    assert out.action == "dropped" and not out.drop and out.content is None
    assert out.record["mode"] == "audit"
    out = inspect(audit, frame(PAGE_LOAD, KEYSTROKE))
    assert out.action == "stripped" and out.content is None


def test_broken_json_frames_are_not_inspected(pipeline: Pipeline) -> None:
    assert inspect(pipeline, b'{"events":[{"name":"x"', text=True) is ws.IGNORED


# -- through the proxy ---------------------------------------------------------------------------


def _run_socket(tmp: Path, config: Path | None, sends: list[tuple[str, bytes]], deflate: bool = False):
    server = WsServer().start()
    proxy = start_proxy(tmp, server.address, config=config)
    try:
        client = WsClient(
            proxy.port, HOST, PATH + "?x-dgw-appid=2220391788200892", proxy.cafile, deflate=deflate
        )
        try:
            client.wait_received(1)
            for kind, data in sends:
                client.send_text(data.decode()) if kind == "text" else client.send_bytes(data)
            client.send_text("bye")  # not JSON: passes, and marks the end (messages keep their order)
            server.wait_for(b"bye")
        finally:
            client.close()
    finally:
        log = proxy.stop()
        server.stop()
    records = [r for r in read_records(proxy.journal) if r["method"] == "WS"]
    return server, client, records, log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
def test_real_websocket_through_keyveil_run(tmp_path: Path, deflate: bool) -> None:
    sends = [
        ("text", frame(KEYSTROKE, MOUSEOVER)),  # dropped
        ("text", frame(PAGE_LOAD, KEYSTROKE, TYPING)),  # stripped to PAGE_LOAD, TYPING
        ("text", frame(PAGE_LOAD)),  # passed
        ("text", frame(TYPING)),  # passed: a feature
        ("bytes", lightspeed(typing=True)),  # passed
    ]
    server, client, records, log = _run_socket(tmp_path, None, sends, deflate)
    got = [s.data for s in server.seen]
    assert got == [
        frame(PAGE_LOAD, TYPING),
        frame(PAGE_LOAD),
        frame(TYPING),
        lightspeed(typing=True),
        b"bye",
    ], log
    assert [s.text for s in server.seen] == [True, True, True, False, True]
    assert all(s.host == HOST and s.path.startswith(PATH) for s in server.seen)
    assert client.received == [GREETING]  # server -> client is never touched
    assert [r["action"] for r in records] == ["dropped", "stripped", "passed", "passed", "passed"]
    assert records[0]["categories"]["keystroke"]["samples"] == 12
    assert {r["endpoint"] for r in records} == {"falco_ws"} and {r["path"] for r in records} == {PATH}
    assert "Traceback" not in log


@pytest.mark.timeout(60)
def test_features_strip_through_keyveil_run(tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    policy = (config / "policy.toml").read_text()
    assert 'features = "pass"' in policy
    (config / "policy.toml").write_text(policy.replace('features = "pass"', 'features = "strip"', 1))
    send = send_task("typed by a person")
    sends = [
        ("text", frame(TYPING)),  # dropped
        ("text", frame(PAGE_LOAD, TYPING)),  # stripped to PAGE_LOAD
        ("bytes", lightspeed(typing=True)),  # dropped
        ("bytes", lightspeed([send, TYPING_TASK], request_id=9)),  # typing task removed
    ]
    server, _, records, log = _run_socket(tmp_path, config, sends)
    got = [s.data for s in server.seen]
    assert len(got) == 3, log
    assert got[0] == frame(PAGE_LOAD) and got[2] == b"bye"
    mqtt = ws.parse_mqtt_publish(got[1])
    assert mqtt is not None
    assert json.loads(json.loads(mqtt.payload)["payload"])["tasks"] == [send]
    assert [r["action"] for r in records] == ["dropped", "stripped", "dropped", "stripped"]
    assert all(r["routes"].get("typing_indicator") == 1 for r in records)


def fixture_events(bodies: list[tuple[str, bytes]]) -> list[dict]:
    """The real Falco posts of the Banzai fixture, as the events a gateway socket would carry."""
    from keyveil.codecs import Decoder, plain

    events = []
    for ct, body in bodies:
        q = next(f for f in Decoder().body(body, ct).value if f.name == "q")
        for wad in plain(q.value):
            for route, data, *_ in wad["posts"]:
                if route.startswith("falco:"):
                    extra = json.dumps(data["e"], separators=(",", ":"))
                    events.append({"name": route[6:], "extra": extra, "rate": data["r"], "time": data["t"]})
    return events


def signal_ids(event: dict) -> set[str] | None:
    if event["name"] != "bd_pdc_signals":
        return None
    e = json.loads(event["extra"])
    return set(bdsignals.parse_signals(bdsignals.decrypt_sjd(e["sjd"], e["asid"])))


def test_fixture_falco_events_as_a_socket_frame(pipeline: Pipeline, fixture_bodies) -> None:
    events = fixture_events(fixture_bodies)
    names = [e["name"] for e in events]
    assert len(events) == 11 and names.count("ods_web_batch") == 4 and names.count("bd_pdc_signals") == 3
    out = inspect(pipeline, json.dumps({"events": events}, separators=(",", ":")).encode())
    assert out.action == "stripped"
    kept = json.loads(out.content)["events"]
    # counters about other events and the two heartbeat-only bd_pdc_signals stay, byte for byte
    assert kept == [e for e in events if e["name"] == "ods_web_batch" or signal_ids(e) == {"38001"}]
    assert len(kept) == 6
    cats = out.record["categories"]  # the same yield as the Banzai bodies over HTTP
    assert cats["activity"] == {
        "events": 3,
        "samples": 29,
    }  # two time-spent bit arrays, navigation time spent
    assert cats["fingerprint"] == {"events": 2, "samples": 20}  # 17 decrypted signals, 3 device fields
    assert cats["other"]["events"] == 6


def test_bd_pdc_signals_event_on_a_socket_is_decrypted(pipeline: Pipeline) -> None:
    asid = "3f2c9a10-5b7d-4e21-9c44-0a1b2c3d4e5f"  # made up
    t, recs = 1737333755.0, []
    for i in range(8):
        t += 0.06 + (i * 0.037) % 0.12
        recs.append({"t": round(t, 3), "ctx": {"cn": "https://www.messenger.com/t/1"},
                     "v": {"action": 2 - i % 2, "key_code": 0}})  # fmt: skip
    plain = bdsignals.dumps_signals({"30100": recs, "38001": [{"t": round(t, 3), "v": {"f": True}}]})
    extra = {"asid": asid, "ct": 1659080345, "sjd": bdsignals.encrypt_sjd(plain, asid), "sid": "s1"}
    ev = {"name": "bd_pdc_signals", "extra": json.dumps(extra, separators=(",", ":")), "rate": 1, "time": 1}
    out = inspect(pipeline, frame(PAGE_LOAD, ev))
    assert out.record["categories"]["keystroke"]["samples"] == 8
    assert out.content == frame(PAGE_LOAD)
