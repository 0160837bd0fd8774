"""One WebSocket message in, one decision out: Falco event frames and realtime tasks on gateway.* sockets.

Pure: no mitmproxy. The addon's `websocket_message` hook calls `inspect_message` for every message of a
flow whose handshake matched a `falco_ws` endpoint, and carries out the `WsOutcome` (drop the message
or replace its content).

What is inspected: client -> server messages that hold JSON, either as the whole message (text
frames such as `{"events":[{"name","extra","rate","time",...}]}`) or as the payload of an MQTT
PUBLISH packet in a binary frame (Messenger's lightspeed `/ls_req` tasks). Server -> client traffic
and anything that is not JSON pass untouched and unjournaled.

Behavioral events go through the same detector and policy as HTTP bodies. A frame left without any
event after stripping is dropped whole; a mixed frame is re-encoded without the behavioral events.
Typing indicators (a key named in detection.toml `features`, e.g. `is_typing`, or a realtime task
with label "3") are a feature the user sees: they pass unless policy `[defaults] features = "strip"`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyveil import apply
from keyveil.codecs import DecodeError, Decoder, Layer, LimitError
from keyveil.detect import Detection
from keyveil.policy import JOURNAL_ACTION

if TYPE_CHECKING:
    from keyveil.catalog import Match
    from keyveil.pipeline import Pipeline

WS_CODEC = "falco_ws"
# Messenger's realtime task label for "typing..." (lightspeed task "3" carries is_typing)
TYPING_TASK_LABELS = frozenset({"3"})


@dataclass
class WsOutcome:
    """`action` is the journal's word, or "ignored" for a message that was not inspected."""

    action: str
    drop: bool = False  # do not forward the message
    content: bytes | None = None  # new content, when it changed and is still forwarded
    record: dict[str, Any] | None = None
    detection: Detection | None = None


IGNORED = WsOutcome("ignored")


@dataclass
class _Mqtt:
    """An MQTT PUBLISH packet, split so the payload can be replaced."""

    first: int  # fixed header byte (type 3, flags)
    head: bytes  # variable header: topic (and packet id)
    payload: bytes

    def encode(self, payload: bytes) -> bytes:
        body = self.head + payload
        return bytes([self.first]) + _varint(len(body)) + body


def is_ws_match(match: Match | None) -> bool:
    """True for a handshake that matched a WebSocket endpoint of the catalog."""
    return match is not None and match.endpoint is not None and match.endpoint.codec == WS_CODEC


def inspect_message(
    pipeline: Pipeline,
    match: Match,
    host: str,
    path: str,
    content: bytes,
    *,
    is_text: bool,
    from_client: bool,
    ts: float | None = None,
) -> WsOutcome:
    """Decide what happens to one message. Never changes `content`; the caller applies the outcome."""
    if not from_client or not is_ws_match(match) or not content:
        return IGNORED
    ep = match.endpoint
    assert ep is not None
    mqtt = None
    if is_text or content[:1] in (b"{", b"["):
        raw = content
    else:
        mqtt = parse_mqtt_publish(content)
        if mqtt is None or mqtt.payload[:1] not in (b"{", b"["):
            return IGNORED
        raw = mqtt.payload
    ts = ts if ts is not None else time.time()
    record = _record(pipeline, match, host, path, content, ts)
    try:
        root = Decoder(pipeline.limits).json(raw)
    except LimitError as e:
        record["reason"] = f"limit:{e.limit}"
        return WsOutcome("passed", record=record)  # a functional socket fails open
    except (DecodeError, RecursionError):
        return IGNORED  # not JSON: nothing we know how to read
    record["layers"] = (["mqtt"] if mqtt else []) + [lay.codec for lay in root.layers()]

    policy = pipeline.policy
    if policy.allowed(match.app, ep.name, host):
        record["action"], record["reason"] = "allowed", "allowlist"
        return WsOutcome("allowed", record=record)

    detection = pipeline.detector.detect(root)
    findings = detection.findings
    features = _feature_units(root, pipeline.rules.features)
    record["categories"] = detection.categories()
    record["routes"] = detection.routes()
    if features:
        record["routes"]["typing_indicator"] = len(features)
    record["stats"] = detection.stats()
    plan = policy.decide(match.app, ep, host, findings)
    strip_features = bool(features) and policy.features == "strip"
    if plan.flow in ("pass", "allowed") and not strip_features:
        record["action"] = "passed"
        return WsOutcome("passed", record=record, detection=detection)

    events = _events_list(root)
    had_events = bool(events)
    result = apply.ApplyResult()
    if pipeline.mode != "audit":
        result = apply.apply_plan(
            findings,
            plan.actions,
            pipeline.rewriter,
            not_after_ms=ts * 1000,
            bd_strip_ids=policy.bd_strip_ids,
        )
    drop = False
    if strip_features:
        if pipeline.mode == "audit":
            drop = any(slot is None for slot in features)
        else:
            drop = _remove_units(features)
            result.stripped += len(features)
    if pipeline.mode == "audit":
        action = (
            "dropped"
            if drop or _strips_all(plan.actions, findings, events)
            else JOURNAL_ACTION.get(plan.flow, "stripped")
        )
        if strip_features and action == "passed":
            action = "stripped"
        record["action"] = action
        return WsOutcome(action, record=record, detection=detection)
    if drop or (had_events and not _events_list(root) and (result.stripped or result.rewritten)):
        record["action"], record["size_out"] = "dropped", 0
        return WsOutcome("dropped", drop=True, record=record, detection=detection)
    if not root.changed():
        record["action"] = "passed"
        return WsOutcome("passed", record=record, detection=detection)
    out = root.encode()
    new = out if isinstance(out, bytes) else out.encode("utf-8", "surrogateescape")
    if mqtt is not None:
        new = mqtt.encode(new)
    action = "rewritten" if result.rewritten and not result.stripped else "stripped"
    record["action"], record["size_out"] = action, len(new)
    return WsOutcome(action, content=new, record=record, detection=detection)


# -- helpers -----------------------------------------------------------------------------------


def _record(
    pipeline: Pipeline, match: Match, host: str, path: str, content: bytes, ts: float
) -> dict[str, Any]:
    from keyveil.pipeline import Request

    record = pipeline._record(Request("WS", f"wss://{host}{path}", {}, content, ts), match, host, path, ts)
    record["method"] = "WS"
    return record


def _events_list(root: Layer) -> list | None:
    value = root.value
    if isinstance(value, dict) and isinstance(value.get("events"), list):
        return value["events"]
    return None


def _strips_all(actions: list[str], findings: list, events: list | None) -> bool:
    """Audit mode: would every event of the frame have been removed?"""
    if not events:
        return False
    removed = {
        id(f.container[f.key])
        for f, a in zip(findings, actions, strict=True)
        if a in ("strip", "drop") and f.container is events
    }
    return len(removed) == len(events)


# A feature unit: (owner layer, list, element) = the innermost list element holding it; None = the
# whole message is the feature (e.g. a lone typing task).
_Slot = tuple[Layer, list, Any] | None


def _feature_units(root: Layer, keys: frozenset[str]) -> list[_Slot]:
    found: list[_Slot] = []
    seen: set[int] = set()

    def visit(v: Any, owner: Layer, slot: _Slot, depth: int) -> None:
        if depth > 256:
            return
        if isinstance(v, Layer):
            visit(v.value, v, slot, depth + 1)
        elif isinstance(v, dict):
            if _is_feature(v, keys):
                if slot is None or id(slot[2]) not in seen:
                    if slot is not None:
                        seen.add(id(slot[2]))
                    found.append(slot)
                return
            for x in v.values():
                visit(x, owner, slot, depth + 1)
        elif isinstance(v, list):
            for x in v:
                if isinstance(x, (dict, list, Layer)):
                    visit(x, owner, (owner, v, x), depth + 1)

    visit(root, root, None, 0)
    return found


def _is_feature(d: dict, keys: frozenset[str]) -> bool:
    if any(isinstance(k, str) and k.lower() in keys for k in d):
        return True
    return str(d.get("label")) in TYPING_TASK_LABELS and "payload" in d


def _remove_units(slots: list[_Slot]) -> bool:
    """Remove feature units from their lists. True: the whole message is one and must go."""
    if any(s is None for s in slots):
        return True
    by_list: dict[int, tuple[Layer, list, set[int]]] = {}
    for owner, lst, elem in slots:  # type: ignore[misc]
        by_list.setdefault(id(lst), (owner, lst, set()))[2].add(id(elem))
    for owner, lst, ids in by_list.values():
        lst[:] = [x for x in lst if id(x) not in ids]
        owner.dirty = True
    return False


def parse_mqtt_publish(data: bytes) -> _Mqtt | None:
    """An MQTT PUBLISH packet that fills the whole message, or None."""
    if len(data) < 4 or data[0] >> 4 != 3:
        return None
    qos = (data[0] >> 1) & 3
    if qos == 3:
        return None
    length = shift = 0
    i = 1
    while True:
        if i >= len(data) or i > 4:
            return None
        b = data[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    if i + length != len(data) or length < 2:
        return None
    topic_len = int.from_bytes(data[i : i + 2], "big")
    head_len = 2 + topic_len + (2 if qos else 0)
    if head_len > length:
        return None
    return _Mqtt(data[0], data[i : i + head_len], data[i + head_len :])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
