"""Faithful success answers, one family at a time, through `keyveil run`: what a client gets back
when keyveil drops its request must read as the real server's success (status, content type, body)."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest

from keyveil.catalog import load_catalog
from support.servers import Reply, Upstream, request, start_proxy

CONFIG = Path(__file__).resolve().parents[1] / "config"
CATALOG = load_catalog(CONFIG / "endpoints.toml")
FORM = "application/x-www-form-urlencoded"
ORIGIN = "https://www.facebook.com"
EVENTS = [
    {"name": "feed_coreinteractionmouseover_augl", "extra": '{"surface":"feed"}', "time": 1737333755490}
]
pytestmark = pytest.mark.timeout(60)


def falco_body() -> bytes:
    return json.dumps({"events": EVENTS}).encode()


def mobile_body() -> bytes:
    message = {"data": [{"name": "instagram_organic_time_spent", "time": 1737333755.4,
                         "extra": {"timespent_in_ms": 1530}}], "app_id": "567067343352427", "seq": 4}  # fmt: skip
    packed = zlib.compress(json.dumps(message).encode())
    return urlencode({"access_token": "567067343352427|f249176f09e26ce54212b472dbab8fa8", "format": "json",
                      "compressed": "1", "sent_time": "1737333755.512", "message": base64.b64encode(packed)}).encode()  # fmt: skip


def gql_body() -> bytes:
    return urlencode({"fb_api_req_friendly_name": "CometFeedVPVDLoggingMutation", "doc_id": "5829104729304812",
                      "variables": json.dumps({"input": {"client_mutation_id": "3"}})}).encode()  # fmt: skip


def check_banzai(r: Reply) -> None:
    assert r.status == 200  # exactly 200: the Comet Banzai adapter retries anything else, 204 included


def check_ajax(r: Reply) -> None:
    guard = b"for (;;);"
    assert r.body.startswith(guard) and json.loads(r.body[len(guard) :])["__ar"] == 1
    assert "javascript" in r.headers["content-type"]


def check_json_ok(key: str, want: object) -> Callable[[Reply], None]:
    def check(r: Reply) -> None:
        assert r.headers["content-type"].startswith("application/json")
        assert json.loads(r.body)[key] == want

    return check


def check_gif(r: Reply) -> None:
    assert r.headers["content-type"] == "image/gif"
    assert r.body[:6] == b"GIF89a" and struct.unpack("<HH", r.body[6:10]) == (1, 1) and r.body.endswith(b";")


def check_empty(r: Reply) -> None:
    assert r.body == b""


def check_graphql(r: Reply) -> None:
    doc = json.loads(r.body)
    assert isinstance(doc["data"], dict) and "errors" not in doc
    assert r.headers["content-type"].startswith("application/json")


# family -> (method, url, body, content-type, shape check)
CASES: dict[str, list[tuple[str, str, bytes, str, Callable[[Reply], None]]]] = {
    "banzai": [
        (
            "POST",
            "https://www.facebook.com/ajax/bz?__a=1&__req=4",
            b"q=%5B%5D&ts=1737333755490",
            FORM,
            check_banzai,
        ),
        ("POST", "https://www.messenger.com/ajax/bnzai?__a=1", b"q=%5B%5D", FORM, check_banzai),
    ],
    "ajax_logging": [
        ("POST", "https://www.facebook.com/ajax/qm/?__a=1", b"ts=1737333755490&q=%5B%5D", FORM, check_ajax),
        (
            "POST",
            "https://www.facebook.com/ajax/accessibilitylogging",
            b"eventName=kb_users&times_pressed=3",
            FORM,
            check_ajax,
        ),
    ],  # fmt: skip
    "graph_logging": [
        (
            "POST",
            "https://graph.facebook.com/logging_client_events",
            mobile_body(),
            FORM,
            check_json_ok("success", True),
        ),
    ],  # fmt: skip
    "falco": [
        (
            "POST",
            "https://www.instagram.com/logging/falco",
            falco_body(),
            "application/json",
            check_json_ok("status", "ok"),
        )
    ],  # fmt: skip
    "pixel": [
        (
            "GET",
            "https://www.facebook.com/tr/?id=1234567890&ev=PageView&dl=https%3A%2F%2Fshop.example%2F",
            b"",
            "",
            check_gif,
        ),
        (
            "POST",
            "https://www.facebook.com/tr/",
            b"id=1234567890&ev=PageView&rqm=formPOST",
            FORM,
            check_empty,
        ),
    ],  # fmt: skip
    "graphql": [("POST", "https://www.facebook.com/api/graphql/", gql_body(), FORM, check_graphql)],
    "wam": [
        ("POST", "https://web.whatsapp.com/wam", bytes(range(64)), "application/octet-stream", check_empty)
    ],
}


def test_every_answer_family_is_tested() -> None:
    assert set(CASES) == set(CATALOG.answers)
    for name, ep in ((e.name, e) for e in CATALOG.endpoints):
        assert ep.answer in CATALOG.answers, name


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("answers")
    up = Upstream().start()
    proxy = start_proxy(tmp, up.address)
    yield proxy, up
    proxy.stop()
    up.stop()


@pytest.mark.parametrize("family", list(CASES))
def test_answer_through_keyveil_run(proxy, family: str) -> None:
    p, up = proxy
    want = CATALOG.answers[family]
    for method, url, body, ctype, check in CASES[family]:
        before = len(up.seen)
        headers = {"origin": ORIGIN} | ({"content-type": ctype} if ctype else {})
        r = request(p.port, method, url, body, headers, cafile=p.cafile)
        assert len(up.seen) == before, f"{url} reached the upstream"
        assert r.headers.get("x-keyveil") == "dropped", (url, r.headers)
        assert r.status == want.status == 200, url
        if want.gif and method != "GET":  # a beacon/fetch POST gets an empty text answer, not an "image"
            assert r.headers["content-type"].startswith("text/plain")
        else:
            assert r.headers["content-type"] == want.content_type
        assert r.headers["access-control-allow-origin"] == ORIGIN  # fetch() with credentials can read it
        assert r.headers["access-control-allow-credentials"] == "true"
        assert int(r.headers["content-length"]) == len(r.body)
        if not want.gif:
            assert r.body == want.body, url
        check(r)
