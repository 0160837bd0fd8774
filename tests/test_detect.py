"""Detection: true positives by name, vocabulary and shape; no false positives on functional traffic."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import pytest

from keyveil.codecs import decode_body
from keyveil.detect import Detector, load_rules, timing_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(load_rules(ROOT / "config" / "detection.toml"))


def detect_json(detector: Detector, obj) -> dict:
    return detector.detect(decode_body(json.dumps(obj).encode(), "application/json")).categories()


def detect_form(detector: Detector, pairs: dict) -> dict:
    return detector.detect(decode_body(urlencode(pairs).encode(), "application/x-www-form-urlencoded")).categories()


KEY_TIMES = [1737333755506, 1737333755618, 1737333755790, 1737333755901, 1737333756133, 1737333756240]


class TestShape:
    def test_epoch_ms_keystrokes(self):
        assert timing_shape(KEY_TIMES) == ("keystroke", 1.0)

    def test_epoch_seconds(self):
        assert timing_shape([t / 1000 for t in KEY_TIMES]) == ("keystroke", 1000.0)

    def test_pointer_rate(self):
        t = [1737333755000 + i * 16 + (i % 3) * 3 for i in range(30)]
        assert timing_shape(t)[0] == "pointer"

    def test_high_resolution_relative(self):
        assert timing_shape([1034.5, 1150.2, 1301.9, 1380.0, 1502.7])[0] == "keystroke"

    @pytest.mark.parametrize(
        "values",
        [
            [1, 2, 3, 4, 5, 6],  # indices
            [1737333755000 + i * 100 for i in range(10)],  # a timer: constant intervals
            [100000000001, 100000000007, 100000000100, 100000000310],  # sorted ids
            [5, 120, 250, 380, 401],  # small integers: relative series need fractional (hi-res) values
            list(reversed(KEY_TIMES)),  # not monotonic
            [1737333755506, 1737333755618, 1737333755790],  # too short
            [1737333755506, 1737334755618, 1737335755790, 1737336755790],  # minutes apart
            [True, False, True, True],
            [1.5, float("nan"), 2.5, 3.5],
        ],
    )
    def test_not_human_timing(self, values):
        assert timing_shape(values) is None


class TestNames:
    @pytest.mark.parametrize(
        "route,category",
        [
            ("falco:web_time_spent_bit_array", "activity"),
            ("time_spent_bit_array", "activity"),
            ("click_ref_logger", "click"),
            ("falco:business_inbox_thread_click", "click"),
            ("falco:accountquality_coreinteractionmouseover_augl", "pointer"),
            ("falco:ls_bot_composer_quick_reply_tapped", "touch"),
            ("falco:room_button_tap", "touch"),
            ("comment_vpvd", "scroll"),
            ("falco:bd_pdc_signals", "fingerprint"),
            ("falco:web_perf_device_info_log", "fingerprint"),
        ],
    )
    def test_behavioral_routes(self, detector, route, category):
        assert category in detector.rules.name_categories(route)

    @pytest.mark.parametrize(
        "route", ["falco:ods_web_batch", "js_error_logging", "ads_payments_flow", "falco:perf", "video_waterfall"]
    )
    def test_non_behavioral_routes(self, detector, route):
        assert detector.rules.name_categories(route) == []

    def test_reference_event_list(self, detector):
        """Every name in Meta's JS dump that says mouseover/tap/click/time_spent/vpvd is caught; most
        others are not behavioral and must not be labelled."""
        lines = (ROOT / "tests" / "fixtures" / "meta-event-names.txt").read_text().splitlines()
        names = [ln.split()[1] for ln in lines if ln and not ln.startswith("#")]
        labelled = {n for n in names if detector.rules.name_categories(n)}
        for n in names:
            if any(w in n for w in ("mouseover", "_click", "time_spent", "vpvd", "tapped")):
                assert n in labelled, n
        assert len(labelled) < len(names) / 2  # most of Meta's events are not behavioral


class TestUnits:
    def test_minified_keystroke_series_in_banzai_post(self, detector):
        cats = detect_json(detector, [{"posts": [["falco:zq", {"a": KEY_TIMES, "b": "x"}, 1737333756300, 0, 99]]}])
        assert cats["keystroke"] == {"events": 1, "samples": len(KEY_TIMES)}

    def test_xy_t_tuples_are_pointer(self, detector):
        path = [[10 + i, 200 - i, 1737333755000 + i * 17 + (i % 4)] for i in range(20)]
        cats = detect_json(detector, {"events": [{"name": "q1", "extra": {"p": path}, "time": 1}]})
        assert cats["pointer"]["samples"] == 20

    def test_dom_event_records(self, detector):
        recs = [{"type": "keydown" if i % 2 == 0 else "keyup", "ts": 1737333755000 + i * 60 + i * i} for i in range(8)]
        cats = detect_json(detector, {"q": [{"name": "zz", "extra": {"r": recs}, "time": 5}]})
        assert "keystroke" in cats

    def test_click_ref_logger_positional_array(self, detector):
        data = ["s1", 1737333755506, "act", 1737333755500, 3, "-", "ctx", "click1", "ref", "r", "/home",
                {"ft": {"click_type": "left"}, "gt": {}}, 412, 233, 0, 0, "p1", "top"]
        cats = detect_json(detector, [{"posts": [["zz_minified", data, 1737333755506, 0, 120]]}])
        assert "click" in cats

    def test_time_spent_bitmap_samples_are_active_seconds(self, detector):
        post = ["falco:web_time_spent_bit_array", {"e": json.dumps({"tos_array": [7, 1], "tos_len": 64})}, 1, 0, 5]
        cats = detect_json(detector, [{"posts": [post]}])
        assert cats["activity"]["samples"] == 4

    def test_fixture_bodies(self, detector, fixture_bodies):
        total: dict[str, int] = {}
        for ct, body in fixture_bodies:
            for cat, v in detector.detect(decode_body(body, ct)).categories().items():
                total[cat] = total.get(cat, 0) + v["events"]
        # 3 bd_pdc_signals (2 heartbeat = other, 1 with 17 fingerprint signals), 1 device info,
        # 1 navigation, 2 time-spent bitmaps, 4 ods batches
        assert total == {"fingerprint": 2, "other": 6, "activity": 3}

    def test_accessibility_form(self, detector):
        assert "keystroke" in detect_form(detector, {"eventName": "kb_users", "times_pressed": "12"})

    def test_mobile_client_events(self, detector):
        msg = {"data": [{"name": "instagram_organic_time_spent", "time": 1.7e9, "extra": {"timespent_in_ms": 9000}},
                        {"name": "ig_feed_request", "time": 1.7e9, "extra": {"count": 1}}], "app_id": "567"}
        cats = detect_form(detector, {"message": json.dumps(msg), "format": "json"})
        assert cats["activity"]["events"] == 1 and cats["other"]["events"] == 1


class TestPrecision:
    """Functional requests must come out with no behavioral finding."""

    @pytest.mark.parametrize(
        "variables",
        [
            {"scale": 2, "feedLocation": "NEWSFEED", "count": 10, "cursor": "AQHR", "useDefaultActor": False},
            {"input": {"feedback_id": "ZmVlZGJhY2s6MTIz", "feedback_reaction_id": "1635855486666999",
                       "client_mutation_id": "3", "actor_id": "100001234567890"}},
            {"input": {"message": {"text": "I clicked the link and scrolled down, typing now"},
                       "thread_id": "123", "offline_threading_id": "7265471234567890123",
                       "client_mutation_id": "1", "timestamp": 1737333755506}},
            {"ids": [100000000001, 100000000007, 100000000100, 100000000310, 100000000999]},
            {"photo_ids": ["1", "2"], "upload_ts": [1737333755000, 1737333755000, 1737333755000, 1737333755000]},
            {"prices": [1.5, 2.5, 10.0, 11.0, 12.99], "ranks": [1, 2, 3, 4, 5, 6, 7]},
            {"is_typing": True, "thread_key": "123"},
        ],
    )
    def test_graphql_variables(self, detector, variables):
        pairs = {"doc_id": "6219730524801219", "fb_api_req_friendly_name": "CometUFIFeedbackReactMutation",
                 "variables": json.dumps(variables), "server_timestamps": "true", "fb_dtsg": "NAcN8x:123"}
        assert detect_form(detector, pairs) == {}

    def test_upload_multipart(self, detector):
        boundary = "----b"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="farr"; filename="a.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + bytes(range(256)) * 4 + f"\r\n--{boundary}--\r\n".encode()
        layer = decode_body(body, f"multipart/form-data; boundary={boundary}")
        assert detector.detect(layer).findings == []


class TestCounting:
    """Samples are timing values or records, each counted once."""

    def test_named_timing_list_counted_once(self, detector):
        ts = [1034.5 + i * 97.25 + (i % 3) * 11.5 for i in range(10)]
        cats = detect_json(detector, {"input": {"typing_metrics": {"keydown_ts": ts, "dwell": [80, 95, 120, 101]}}})
        assert cats == {"keystroke": {"events": 1, "samples": 14}}

    def test_mixed_dom_records_count_per_type(self, detector):
        recs = []
        for i in range(8):
            t = 1737333755000 + i * 100 + (i % 3) * 17
            recs.append({"type": "scroll", "t": t, "y": i * 40} if i % 2 == 0 else
                        {"type": "pointermove", "t": t, "clientX": 5 * i, "clientY": 9})
        cats = detect_json(detector, [{"posts": [["falco:zz", {"r": recs}, 1, 0, 9]]}])
        assert cats == {"scroll": {"events": 1, "samples": 4}, "pointer": {"events": 1, "samples": 4}}

    def test_client_timing_is_keystroke(self, detector):
        cats = detect_json(detector, {"input": {"text": "hi", "client_timing": {"compose_start": 1737333755000,
                                                                           "send_clicked": 1737333759000}}})
        assert "keystroke" in cats
