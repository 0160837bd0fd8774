"""Meta Pixel /tr hits: automatic click events classified, button descriptions journaled only as
counts, drop all hits (default) or only behavioral ones (a rule), a 1x1 GIF for GETs, an empty 200
for POST and beacons; through `keyveil run`."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from keyveil.journal import JournalWriter, read_records
from keyveil.pipeline import Pipeline, Request
from keyveil.policy import parse_policy
from support.servers import Upstream, request, start_proxy

CONFIG = Path(__file__).resolve().parents[1] / "config"
# what a visitor clicked: must never reach the journal
SECRET_TEXT = "Pay Dr Quimby invoice"
SECRET_CLASS = "btn-quimby-checkout"
FEATURES = {"classList": SECRET_CLASS, "destination": "https://shop.example/checkout", "id": "pay-now",
            "imageUrl": "", "innerText": SECRET_TEXT, "numChildButtons": 0, "tag": "button", "type": "submit"}  # fmt: skip
FORM_FEATURES = [{"id": "email", "name": "email", "tag": "input", "placeholder": "you@example.com", "inputType": "email"},
                 {"id": "card", "name": "card", "tag": "input", "placeholder": "", "inputType": "text"}]  # fmt: skip
STRIP_RULE = '\n[[rule]]\nendpoint = "pixel"\naction = "strip"\n'


def hit(ev: str, rqm: str = "GET", **extra: str) -> list[tuple[str, str]]:
    pairs = [("id", "1234567890123456"), ("ev", ev), ("dl", "https://shop.example/cart"),
             ("rl", "https://shop.example/"), ("if", "false"), ("ts", "1737333755490")]  # fmt: skip
    if ev == "SubscribedButtonClick":
        pairs += [("cd[buttonFeatures]", json.dumps(FEATURES)), ("cd[buttonText]", SECRET_TEXT),
                  ("cd[formFeatures]", json.dumps(FORM_FEATURES)),
                  ("cd[pageFeatures]", json.dumps({"title": "Cart - Shop"}))]  # fmt: skip
    pairs += [("sw", "1920"), ("sh", "1080"), ("v", "2.9.179"), ("r", "stable"), ("ec", "1"), ("o", "4126"),
              ("fbp", "fb.1.1737333700123.1234567890"), ("it", "1737333700100"), ("coo", "false"), ("rqm", rqm)]  # fmt: skip
    pairs += list(extra.items())
    return pairs


def query(ev: str) -> str:
    return urlencode(hit(ev))


def multipart(
    pairs: list[tuple[str, str]], boundary: str = "----formdata-undici-0712345678"
) -> tuple[str, bytes]:
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in pairs
        )
        + f"--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


def gif_size(data: bytes) -> tuple[int, int]:
    assert data[:6] in (b"GIF87a", b"GIF89a") and data.endswith(b";")
    return struct.unpack("<HH", data[6:10])


@pytest.fixture(scope="module")
def behavioral_only(pipeline: Pipeline) -> Pipeline:
    policy = parse_policy((CONFIG / "policy.toml").read_text() + STRIP_RULE)
    return Pipeline(pipeline.catalog, pipeline.rules, policy)


def get(p: Pipeline, ev: str, host: str = "www.facebook.com"):
    return p.process(Request("GET", f"https://{host}/tr/?{query(ev)}", {}, b"", ts=1737333755.0))


# -- the pure pipeline ---------------------------------------------------------------------------


def test_automatic_click_event_is_a_click(pipeline: Pipeline) -> None:
    out = get(pipeline, "SubscribedButtonClick")
    rec = out.record
    assert out.action == "dropped" and rec["app"] == "pixel" and rec["endpoint"] == "pixel"
    assert rec["categories"] == {"click": {"events": 1, "samples": 1}}
    assert rec["routes"] == {"pixel:SubscribedButtonClick": 1}
    # counts only: 8 button features, the text's length, 2 described form fields, 1 page feature
    assert rec["stats"] == {"pixel_button_features": len(FEATURES), "pixel_button_text_chars": len(SECRET_TEXT),
                            "pixel_form_features": len(FORM_FEATURES), "pixel_page_features": 1}  # fmt: skip
    assert out.answer.status == 200 and out.answer.headers["content-type"] == "image/gif"
    assert gif_size(out.answer.body) == (1, 1)


def test_page_view_is_not_behavioral(pipeline: Pipeline) -> None:
    out = get(pipeline, "PageView", host="pixel.facebook.com")
    assert out.record["categories"] == {"other": {"events": 1, "samples": 1}}
    assert out.action == "dropped"  # default: every Pixel hit goes


def test_rule_drops_only_behavioral_hits(behavioral_only: Pipeline) -> None:
    out = get(behavioral_only, "PageView")
    assert out.action == "passed" and out.url is None and out.answer is None
    out = get(behavioral_only, "SubscribedButtonClick")
    assert out.action == "dropped" and gif_size(out.answer.body) == (1, 1)
    ct, body = multipart(hit("SubscribedButtonClick", rqm="beacon"))
    out = behavioral_only.process(Request("POST", "https://www.facebook.com/tr/", {"content-type": ct}, body))
    assert out.action == "dropped" and out.answer.body == b"" and out.answer.status == 200
    ct, body = multipart(hit("ViewContent", rqm="beacon"))
    assert (
        behavioral_only.process(
            Request("POST", "https://www.facebook.com/tr/", {"content-type": ct}, body)
        ).action
        == "passed"
    )


def test_post_and_beacon_get_an_empty_200(pipeline: Pipeline) -> None:
    form = urlencode(hit("SubscribedButtonClick", rqm="formPOST")).encode()
    out = pipeline.process(
        Request(
            "POST",
            "https://www.facebook.com/tr/",
            {"content-type": "application/x-www-form-urlencoded"},
            form,
        )
    )
    assert out.action == "dropped" and out.answer.status == 200 and out.answer.body == b""
    assert out.record["categories"]["click"]["events"] == 1
    ct, body = multipart(hit("SubscribedButtonClick", rqm="beacon"))
    out = pipeline.process(Request("POST", "https://www.facebook.com/tr", {"content-type": ct}, body))
    assert (
        out.action == "dropped"
        and out.answer.body == b""
        and out.record["stats"]["pixel_button_features"] == 8
    )


def test_journal_bytes_hold_counts_not_button_text(pipeline: Pipeline, tmp_path: Path) -> None:
    ct, body = multipart(hit("SubscribedButtonClick", rqm="beacon"))
    outs = [get(pipeline, "SubscribedButtonClick"),
            pipeline.process(Request("POST", "https://www.facebook.com/tr/", {"content-type": ct}, body))]  # fmt: skip
    for detail in ("summary", "full"):
        w = JournalWriter(tmp_path / detail, detail=detail)
        for o in outs:
            w.write(dict(o.record))
        w.close()
        raw = b"".join(p.read_bytes() for p in (tmp_path / detail).iterdir())
        for secret in (SECRET_TEXT, SECRET_CLASS, "pay-now", "shop.example", "you@example.com", "Quimby"):
            assert secret.encode() not in raw, (detail, secret)
        recs = list(read_records(tmp_path / detail))
        assert [r["stats"]["pixel_button_text_chars"] for r in recs] == [len(SECRET_TEXT)] * 2


# -- through the proxy ---------------------------------------------------------------------------


def _pixel_run(tmp: Path, extra_policy: str = ""):
    config = tmp / "config"
    shutil.copytree(CONFIG, config)
    (config / "policy.toml").write_text((config / "policy.toml").read_text() + extra_policy)
    up = Upstream().start()
    return up, start_proxy(tmp, up.address, config=config)


@pytest.mark.timeout(60)
def test_pixel_through_keyveil_run(tmp_path: Path) -> None:
    up, proxy = _pixel_run(tmp_path)
    try:
        r = request(
            proxy.port,
            "GET",
            f"https://www.facebook.com/tr/?{query('SubscribedButtonClick')}",
            cafile=proxy.cafile,
        )
        assert r.status == 200 and r.headers["content-type"] == "image/gif" and gif_size(r.body) == (1, 1)
        r = request(
            proxy.port, "GET", f"https://pixel.facebook.com/tr?{query('PageView')}", cafile=proxy.cafile
        )
        assert r.status == 200 and gif_size(r.body) == (1, 1)
        ct, body = multipart(hit("SubscribedButtonClick", rqm="beacon"))
        r = request(proxy.port, "POST", "https://www.facebook.com/tr/", body,
                    {"content-type": ct, "origin": "https://shop.example"}, cafile=proxy.cafile)  # fmt: skip
        assert r.status == 200 and r.body == b""
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        assert up.seen == []  # no hit reached Meta
    finally:
        proxy.stop()
        up.stop()
    raw = b"".join(p.read_bytes() for p in proxy.journal.iterdir())
    assert SECRET_TEXT.encode() not in raw and SECRET_CLASS.encode() not in raw
    recs = list(read_records(proxy.journal))
    assert [r["action"] for r in recs] == ["dropped"] * 3
    assert [sorted(r["categories"]) for r in recs] == [["click"], ["other"], ["click"]]
    assert recs[0]["stats"]["pixel_form_features"] == 2


@pytest.mark.timeout(60)
def test_behavioral_only_rule_through_keyveil_run(tmp_path: Path) -> None:
    up, proxy = _pixel_run(tmp_path, STRIP_RULE)
    try:
        url = f"https://www.facebook.com/tr/?{query('PageView')}"
        r = request(proxy.port, "GET", url, cafile=proxy.cafile)
        assert r.status == 200 and r.body == b"upstream-ok"
        assert urlsplit(up.seen[-1].path).query == urlsplit(url).query  # byte for byte
        r = request(
            proxy.port,
            "GET",
            f"https://www.facebook.com/tr/?{query('SubscribedButtonClick')}",
            cafile=proxy.cafile,
        )
        assert r.status == 200 and gif_size(r.body) == (1, 1) and len(up.seen) == 1
    finally:
        proxy.stop()
        up.stop()
    assert [r["action"] for r in read_records(proxy.journal)] == ["passed", "dropped"]
