"""Mixed GraphQL requests (/api/graphql/ forms, Instagram api/v1 forms): behavioral fields leave
`variables`, every other byte stays; per-mutation policy by friendly name; precision on ordinary
requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import parse_qsl, quote

import pytest

from keyveil.journal import read_records
from keyveil.pipeline import Pipeline, Request
from keyveil.policy import parse_policy
from support.servers import Upstream, request, start_proxy

CONFIG = Path(__file__).resolve().parents[1] / "config"
FORM = {"content-type": "application/x-www-form-urlencoded"}
USER = "100089123456789"
TEXT = 'On se voit à 20h? 🍰 & bring the "good" stuff = 100%'


def urlsearchparams(pairs: list[tuple[str, str]]) -> bytes:
    """The browser's application/x-www-form-urlencoded serializer (URLSearchParams)."""
    return (
        "&".join(f"{quote(k, safe='*-._')}={quote(v, safe='*-._')}" for k, v in pairs)
        .replace("%20", "+")
        .encode()
    )


def js_json(obj: object) -> str:
    """JSON.stringify: compact, non-ASCII as is."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def comet(friendly: str, doc_id: str, variables: dict) -> list[tuple[str, str]]:
    return [
        ("av", USER), ("__user", USER), ("__a", "1"), ("__req", "1b"), ("__hs", "20108.HYP:comet_pkg.2.1..2.1"),
        ("dpr", "2"), ("__ccg", "EXCELLENT"), ("__rev", "1019099224"), ("__s", "x9w2ko:hq4m1e:2n0ykd"),
        ("__hsi", "7459104829563928021"), ("__comet_req", "15"), ("fb_dtsg", "NAcNyQbQ7Hh6Ok:40:1737333700"),
        ("jazoest", "25575"), ("lsd", "AVq0HgW8M9c"), ("__spin_r", "1019099224"), ("__spin_b", "trunk"),
        ("__spin_t", "1737333701"), ("fb_api_caller_class", "RelayModern"), ("fb_api_req_friendly_name", friendly),
        ("variables", js_json(variables)), ("server_timestamps", "true"), ("doc_id", doc_id),
    ]  # fmt: skip


KEYDOWN = [1012.3, 1130.8, 1235.1, 1391.6, 1480.2, 1622.9, 1705.4]
KEYUP = [1090.1, 1201.7, 1322.0, 1449.3, 1577.5, 1690.2, 1789.9]
DWELL = [77.8, 70.9, 86.9, 57.7, 97.3, 67.3, 84.5]


def send_input(metrics: bool) -> dict:
    inp: dict = {
        "client_mutation_id": "4", "actor_id": USER, "message": {"text": TEXT}, "thread_id": "100000000000100",
        "offline_threading_id": "7287342910034567890", "source": "www_chat", "reply_metadata": None,
        "attachment_fbids": ["1234567890123456"],
    }  # fmt: skip
    if metrics:
        inp["typing_metrics"] = {"keydown_ts": KEYDOWN, "keyup_ts": KEYUP, "dwell": DWELL}
    return {"input": inp}


def send_body(metrics: bool) -> bytes:
    return urlsearchparams(comet("useMWChatSendMessageMutation", "7241726279209872", send_input(metrics)))


# ordinary requests that carry nothing behavioral: they must pass byte for byte
ORDINARY: dict[str, bytes] = {
    "news feed query": urlsearchparams(comet("CometNewsFeedPaginationQuery", "8734112389945271", {
        "RELAY_INCREMENTAL_DELIVERY": True, "count": 3, "cursor": "Cg8Ob3JnYW5pY19jdXJzb3IJAAAA",
        "feedLocation": "NEWSFEED", "feedStyle": "DEFAULT", "orderby": ["TOP_STORIES"],
        "privacySelectorRenderLocation": "COMET_STREAM", "renderLocation": "homepage_stream", "scale": 2,
        "stream_initial_count": 1, "useDefaultActor": False, "id": "YXBwX2NvbGxlY3Rpb246MTAw",
        "__relay_internal__pv__CometUFIIsRTAEnabledrelayprovider": False,
    })),
    "like": urlsearchparams(comet("CometUFIFeedbackReactMutation", "6623712531077310", {
        "input": {"attribution_id_v2": "CometHomeRoot.react,comet.home,via_cold_start,1737333701843,283104,4748854339,,",
                  "feedback_id": "ZmVlZGJhY2s6MTIzNDU2Nzg5MDEyMzQ1", "feedback_reaction_id": "1635855486666999",
                  "feedback_source": "NEWS_FEED", "is_tracking_encrypted": True,
                  "tracking": ["AZWrN8z0pXb4Cj1yHq6Xk1m2"], "session_id": "0b8a9f64-2f1c-4d5e-9a3b-7c6d5e4f3a2b",
                  "actor_id": USER, "client_mutation_id": "2"},
        "useDefaultActor": False, "__relay_internal__pv__CometUFIReactionsEnableShortNamerelayprovider": False,
    })),
    "message send without metrics": send_body(False),
    "search typeahead": urlsearchparams(comet("useCometSearchTypeaheadLayoutDataSourceQuery", "7187654321098765", {
        "scopeKey": "GLOBAL", "query": "keyboard privacy", "context": "GLOBAL_SEARCH",
        "num_results": 8, "times": [3, 7, 15, 31], "rankingContext": '{"entity_ids":[1,2,3,4,5]}',
    })),
    "story timestamps": urlsearchparams(comet("CometStoriesViewerQuery", "5987654321098765", {
        "bucketIDs": ["100001", "100002", "100003", "100004"], "scale": 1,
        "created_times": [1737300000, 1737303600, 1737307200, 1737310800, 1737314400],
    })),
}  # fmt: skip

JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000") + bytes(range(256)) * 8 + b"\xff\xd9"
BOUNDARY = "----WebKitFormBoundaryx7Yq3kZ8pQmW1vNa"


def upload_body() -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="source"\r\n\r\n8\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="profile_id"\r\n\r\n{USER}\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="waterfallxapp"\r\n\r\ncomet\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="farr"; filename="IMG_2041.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + JPEG
        + b"\r\n",
        f"--{BOUNDARY}--\r\n".encode(),
    ]
    return b"".join(parts)


def process(p: Pipeline, url: str, body: bytes, headers: dict | None = None, method: str = "POST"):
    return p.process(Request(method, url, headers or FORM, body, ts=1737333755.0))


def segments(body: bytes) -> dict[bytes, bytes]:
    return dict(seg.split(b"=", 1) for seg in body.split(b"&"))


# -- the pure pipeline ---------------------------------------------------------------------------


def test_mixed_send_strips_only_the_metrics(pipeline: Pipeline) -> None:
    body = send_body(True)
    out = process(pipeline, "https://www.facebook.com/api/graphql/", body)
    assert out.action == "stripped" and out.body is not None
    before, after = segments(body), segments(out.body)
    assert list(before) == list(after)  # same fields, same order
    for name, raw in before.items():
        if name != b"variables":
            assert after[name] == raw, name  # every other field byte for byte
    sent = dict(parse_qsl(out.body.decode(), keep_blank_values=True))["variables"]
    assert sent == js_json(send_input(False))  # variables minus the metrics, byte for byte
    rec = out.record
    assert rec["kind"] == "functional" and rec["endpoint"] == "graphql"
    # one field removed, each of its timing values counted once
    assert rec["categories"]["keystroke"] == {"events": 1, "samples": len(KEYDOWN) + len(KEYUP) + len(DWELL)}
    assert rec["routes"] == {"typing_metrics": 1, "useMWChatSendMessageMutation": 1}
    assert rec["size_out"] == len(out.body) < rec["size_in"]


@pytest.mark.parametrize("name", list(ORDINARY))
def test_ordinary_requests_are_not_flagged(pipeline: Pipeline, name: str) -> None:
    out = process(pipeline, "https://www.facebook.com/api/graphql/", ORDINARY[name])
    assert out.action == "passed" and out.body is None and out.answer is None, out.record
    behavioral = set(out.record["categories"]) - {"other"}
    assert not behavioral, out.record["categories"]


def test_upload_is_not_flagged(pipeline: Pipeline) -> None:
    body = upload_body()
    hdrs = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    for url in (
        "https://upload.facebook.com/ajax/react_composer/attachments/photo/upload",
        "https://www.facebook.com/api/graphql/",
    ):
        out = process(pipeline, url, body, hdrs)
        assert out.action == "passed" and out.body is None, (url, out.record)


def test_pure_logging_mutation_dropped_with_graphql_answer(pipeline: Pipeline) -> None:
    body = urlsearchparams(comet("CometFeedVPVDLoggingMutation", "5829104729304812", {
        "input": {"client_mutation_id": "9", "actor_id": USER, "vpvd_items": [
            {"feedback_id": "ZmVlZGJhY2s6MQ==", "vpvd_time_ms": 1840}, {"feedback_id": "ZmVlZGJhY2s6Mg==",
                                                                       "vpvd_time_ms": 3120}]}}))  # fmt: skip
    out = process(pipeline, "https://www.facebook.com/api/graphql/", body)
    assert out.action == "dropped" and out.answer is not None
    assert out.answer.status == 200 and out.answer.headers["content-type"] == "application/json"
    assert isinstance(json.loads(out.answer.body)["data"], dict)
    assert out.record["routes"]["CometFeedVPVDLoggingMutation"] == 1
    assert out.record["reason"] == "route:CometFeedVPVDLoggingMutation"
    # the friendly name may come in the header alone
    bare = urlsearchparams([("variables", "{}"), ("doc_id", "5829104729304812")])
    out = process(
        pipeline,
        "https://www.facebook.com/api/graphql/",
        bare,
        {**FORM, "X-FB-Friendly-Name": "CometFeedVPVDLoggingMutation"},
    )
    assert out.action == "dropped"
    # any other mutation, even one that only differs in case, is not dropped
    out = process(pipeline, "https://www.facebook.com/api/graphql/", ORDINARY["like"])
    assert out.action == "passed"


def test_route_rules(pipeline: Pipeline) -> None:
    text = (CONFIG / "policy.toml").read_text() + (
        '\n[[rule]]\nroute = "useMWChatSendMessageMutation"\naction = "pass"\n'
        '\n[[rule]]\nroute = "Comet*LoggingMutation"\naction = "drop"\n'
    )
    p = Pipeline(pipeline.catalog, pipeline.rules, parse_policy(text))
    out = process(p, "https://www.facebook.com/api/graphql/", send_body(True))
    assert out.action == "passed" and out.body is None  # a route rule may let a request through whole
    body = urlsearchparams(comet("CometScrollPerfLoggingMutation", "1", {"input": {}}))
    assert process(p, "https://www.facebook.com/api/graphql/", body).action == "dropped"
    # without a route rule, functional GraphQL is never dropped for its fields: only stripped
    assert process(pipeline, "https://www.facebook.com/api/graphql/", body).action == "passed"


def test_instagram_api_v1_form(pipeline: Pipeline) -> None:
    pairs = [
        ("action", "send_item"), ("is_x_transport_forward", "false"), ("is_shh_mode", "0"),
        ("send_attribution", "direct_thread"), ("client_context", "7287342910034567891"),
        ("text", TEXT), ("device_id", "android-1a2b3c4d5e6f7a8b"), ("mutation_token", "7287342910034567891"),
        ("_uuid", "0b8a9f64-2f1c-4d5e-9a3b-7c6d5e4f3a2b"), ("offline_threading_id", "7287342910034567891"),
        ("thread_ids", '["340282366841710300949128171234567890"]'),
        ("keystroke_timings", js_json({"down": KEYDOWN, "up": KEYUP})),
        ("nav_chain", "DirectThreadFragment:direct_thread:7:button"),
    ]  # fmt: skip
    body = urlsearchparams(pairs)
    url = "https://i.instagram.com/api/v1/direct_v2/threads/broadcast/text/"
    out = process(pipeline, url, body)
    assert out.action == "stripped" and out.record["endpoint"] == "instagram_api"
    kept = [seg for seg in body.split(b"&") if not seg.startswith(b"keystroke_timings=")]
    assert out.body == b"&".join(kept)  # the field gone, every other byte identical
    assert out.record["categories"]["keystroke"]["events"] == 1
    # the same form without the timings passes byte for byte
    plain = urlsearchparams([p for p in pairs if p[0] != "keystroke_timings"])
    assert process(pipeline, url, plain).action == "passed"


# -- through the proxy ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_graphql_through_keyveil_run(tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    up = Upstream().start()
    proxy = start_proxy(tmp_path, up.address, config=config)
    try:
        url = "https://www.facebook.com/api/graphql/"
        r = request(proxy.port, "POST", url, send_body(True), cafile=proxy.cafile)
        assert r.status == 200 and r.body == b"upstream-ok"
        sent = up.seen[-1].body
        assert dict(parse_qsl(sent.decode()))["variables"] == js_json(send_input(False))
        assert [s for s in sent.split(b"&") if not s.startswith(b"variables=")] == [
            s for s in send_body(True).split(b"&") if not s.startswith(b"variables=")
        ]
        for name, body in ORDINARY.items():
            r = request(proxy.port, "POST", url, body, cafile=proxy.cafile)
            assert r.status == 200 and up.seen[-1].body == body, name
        n = len(up.seen)
        vpvd = urlsearchparams(comet("CometFeedVPVDLoggingMutation", "5829104729304812", {"input": {}}))
        r = request(
            proxy.port, "POST", url, vpvd, {**FORM, "origin": "https://www.facebook.com"}, cafile=proxy.cafile
        )
        assert r.status == 200 and len(up.seen) == n  # answered by keyveil
        assert r.headers["content-type"] == "application/json" and "data" in json.loads(r.body)
        assert r.headers["access-control-allow-origin"] == "https://www.facebook.com"
    finally:
        proxy.stop()
        up.stop()
    records = [r for r in read_records(proxy.journal) if r["path"] == "/api/graphql/"]
    assert [r["action"] for r in records] == ["stripped"] + ["passed"] * len(ORDINARY) + ["dropped"]
    assert records[-1]["routes"] == {"CometFeedVPVDLoggingMutation": 1}
