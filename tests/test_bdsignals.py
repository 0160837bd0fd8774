"""falco:bd_pdc_signals: decrypt the real fixture samples, classify, strip, retime, re-encrypt."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import statistics
import struct
import subprocess
import uuid
from pathlib import Path
from typing import Any

import cramjam
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyveil.bdsignals import (
    KeystrokeSeries,
    SignalsError,
    category_of,
    decrypt_sjd,
    derive_key_iv,
    dumps_signals,
    encrypt_sjd,
    js_dumps,
    keystroke_series,
    parse_signals,
    process_bd_e_string,
    process_bd_post,
    replace_keystroke_times,
    strip_signals,
    summarize,
)

FIXTURE = Path(__file__).parent / "fixtures" / "facebook-banzai-2025-01.json"
ASID = "3f2c9a10-5b7d-4e21-9c44-0a1b2c3d4e5f"  # made up
CN = {"cn": "https://www.facebook.com/login.php"}


def _multipart_fields(content_type: str, body: str) -> dict[str, str]:
    boundary = content_type.split("boundary=", 1)[1]
    fields: dict[str, str] = {}
    for part in body.split("--" + boundary)[1:]:
        if part.startswith("--"):
            break
        head, _, value = part.partition("\r\n\r\n")
        name = re.search(r'name="([^"]+)"', head)
        assert name, head
        fields[name.group(1)] = value.removesuffix("\r\n")
    return fields


def _fixture_posts() -> list[tuple[int, str, Any]]:
    """(body index, route, data) of every post, snappy_base64 wads decompressed."""
    doc = json.loads(FIXTURE.read_text())
    out = []
    for i, b in enumerate(doc["bodies"]):
        q = json.loads(_multipart_fields(b["content_type"], b["body"])["q"])
        for wad in q:
            posts = wad["posts"]
            if wad.get("compression") == "snappy_base64":
                posts = json.loads(bytes(cramjam.snappy.decompress_raw(base64.b64decode(posts))))
            out.extend((i, p[0], p[1]) for p in posts)
    return out


def _bd_samples() -> list[tuple[int, str, dict[str, Any]]]:
    """(body index, raw e string, parsed e) of every falco:bd_pdc_signals post in the fixture."""
    return [(i, d["e"], json.loads(d["e"])) for i, r, d in _fixture_posts() if r == "falco:bd_pdc_signals"]


SAMPLES = _bd_samples()


def _keystrokes(start: float, n_keys: int, seed: int) -> tuple[list[dict[str, Any]], list[float]]:
    """n_keys down/up pairs with human-like gaps, times in whole ms as the client writes them."""
    rng = random.Random(seed)
    recs: list[dict[str, Any]] = []
    downs: list[float] = []
    ms = round(start * 1000)
    for _ in range(n_keys):
        ms += rng.randint(60, 400)
        downs.append(ms / 1000)
        recs.append({"t": ms / 1000, "ctx": CN, "v": {"action": 2, "key_code": 0}})
        recs.append({"t": (ms + rng.randint(40, 140)) / 1000, "ctx": CN, "v": {"action": 1, "key_code": 0}})
    return recs, downs


def _synthetic(n_keys: int = 12, seed: int = 7) -> tuple[dict[str, Any], list[float]]:
    keys, downs = _keystrokes(1737333760.0, n_keys, seed)
    signals = {
        "30001": [{"t": 1737333755.521, "ctx": CN, "v": 5}],
        "30005": [{"t": 1737333755.523, "ctx": CN, "v": {"w": 681, "h": 598}}],
        "30100": keys,
        "30106": [{"t": 1737333756.1, "ctx": CN, "v": True}],
        "30107": [{"t": 1737333756.2, "ctx": CN, "v": False}],
        "31234": [{"t": 1737333756.3, "ctx": CN, "v": "new"}],
        "38001": [{"t": 1737333757, "ctx": CN, "v": {"f": True, "id": "42"}}],
    }
    return signals, downs


def _e_for(signals: dict[str, Any], asid: str = ASID) -> dict[str, Any]:
    return {"asid": asid, "ct": 1659080345, "sjd": encrypt_sjd(dumps_signals(signals), asid), "sid": -1}


# --- the real fixture ----------------------------------------------------------------------------


def test_fixture_has_three_bd_posts_in_plain_wads() -> None:
    assert [i for i, _, _ in SAMPLES] == [0, 1, 3]
    routes = {r for _, r, _ in _fixture_posts()}
    assert "falco:ods_web_batch" in routes  # proves the snappy_base64 wads were opened too
    for _, _, e in SAMPLES:
        assert set(e) == {"asid", "ct", "sjd", "sid"}


@pytest.mark.parametrize("idx", range(len(SAMPLES)))
def test_fixture_sjd_decrypts_to_json_and_reencrypts_identically(idx: int) -> None:
    _, raw_e, e = SAMPLES[idx]
    plaintext = decrypt_sjd(e["sjd"], e["asid"])
    signals = json.loads(plaintext)
    assert isinstance(signals, dict) and signals
    assert encrypt_sjd(plaintext, e["asid"]) == e["sjd"]
    # The browser's JSON.stringify output is reproduced byte for byte, and so is the e string.
    assert dumps_signals(parse_signals(plaintext)) == plaintext
    assert js_dumps(e) == raw_e
    # Nothing asked: nothing changes.
    res = process_bd_post(e)
    assert res.changed is False and res.e == e


def test_fixture_signal_counts() -> None:
    summaries = [summarize(parse_signals(decrypt_sjd(e["sjd"], e["asid"]))) for _, _, e in SAMPLES]
    heartbeat, fingerprint, heartbeat2 = summaries
    assert heartbeat.signals == {38001: 1} and heartbeat.categories == {"other": 1}
    assert heartbeat2.signals == {38001: 1}
    fp_ids = set(range(30000, 30006)) | {30007, 30008, 30012, 30013, 30015, 30018, 30022, 30040}
    fp_ids |= {30093, 30094, 30095}
    assert fingerprint.signals == dict.fromkeys(fp_ids, 1)
    assert fingerprint.categories == {"fingerprint": 17}
    assert fingerprint.journal_categories() == {"fingerprint": {"events": 17, "samples": 17}}
    for s in summaries:
        assert s.keys_down == s.keys_up == 0 and s.keystroke_median_gap_ms is None and s.stats() == {}


def test_fixture_strip_fingerprint_reencrypts_with_same_asid() -> None:
    _, _, e = SAMPLES[1]
    res = process_bd_post(e, strip_ids=lambda sid: sid in range(30000, 30096) and sid != 30000)
    assert res.changed and res.e is not None
    assert res.e["asid"] == e["asid"] and list(res.e) == list(e)
    left = json.loads(decrypt_sjd(res.e["sjd"], e["asid"]))
    assert list(left) == ["30000"]
    assert left["30000"] == json.loads(decrypt_sjd(e["sjd"], e["asid"]))["30000"]


def test_derive_key_iv_from_fixture_asid() -> None:
    key, iv = derive_key_iv("97ef8a51-9623-49fa-a700-db1bf6671c8d")
    assert key == b"a700db1bf6671c8d"
    expect = (int.from_bytes(key[:8], "big") ^ int.from_bytes(key[8:], "big")).to_bytes(8, "big")
    assert iv == expect and len(iv) == 8


# --- synthetic keystrokes ------------------------------------------------------------------------


def test_synthetic_keystrokes_round_trip_and_are_classified() -> None:
    signals, downs = _synthetic(n_keys=12)
    e = _e_for(signals)
    plaintext = decrypt_sjd(e["sjd"], ASID)
    assert json.loads(plaintext) == signals
    assert encrypt_sjd(plaintext, ASID) == e["sjd"]

    res = process_bd_post(e)
    assert res.changed is False
    s = res.summary
    assert s.categories == {"fingerprint": 2, "keystroke": 24, "pointer": 1, "touch": 1, "other": 2}
    assert s.signals == {30001: 1, 30005: 1, 30100: 24, 30106: 1, 30107: 1, 31234: 1, 38001: 1}
    assert (s.keys_down, s.keys_up) == (12, 12)
    gap = statistics.median(b - a for a, b in zip(downs, downs[1:], strict=False)) * 1000
    assert s.keystroke_median_gap_ms == int(round(gap / 10)) * 10
    assert s.keystroke_median_gap_ms % 10 == 0
    assert s.stats() == {"keystroke_median_gap_ms": s.keystroke_median_gap_ms}
    assert s.journal_categories()["keystroke"] == {"events": 1, "samples": 24}
    assert s.journal_categories()["other"] == {"events": 2, "samples": 2}


def test_categories() -> None:
    assert [category_of(i) for i in (30100, 30106, 30107, 30000, 30095, 30096, 38000, 38001, None)] == [
        "keystroke",
        "pointer",
        "touch",
        "fingerprint",
        "fingerprint",
        "other",
        "other",
        "other",
        "other",
    ]


def test_keystroke_series_and_replace() -> None:
    signals, downs = _synthetic(n_keys=5)
    series = keystroke_series(signals)
    assert series.down == downs and len(series.up) == 5 and len(series) == 10
    shifted = [t + 1.2345 for t in series.times]  # sub-ms part must be rounded away
    out = replace_keystroke_times(signals, shifted)
    assert out["30106"] is signals["30106"]
    new = keystroke_series(out)
    assert new.actions == series.actions
    for old_t, new_t in zip(series.times, new.times, strict=True):
        assert round((new_t - old_t) * 1000) == 1235 or round((new_t - old_t) * 1000) == 1234
    text = dumps_signals(out).decode()
    ts = re.findall(r'"t":([0-9.e+-]+)', text)
    assert len(ts) == 16 and all(re.fullmatch(r"\d{10}(\.\d{1,3})?", t) for t in ts)
    with pytest.raises(SignalsError):
        replace_keystroke_times(signals, shifted[:-1])
    with pytest.raises(SignalsError):
        replace_keystroke_times(signals, [float("nan")] * 10)


def test_retime_round_trip_through_process() -> None:
    signals, _ = _synthetic(n_keys=8, seed=3)
    e = _e_for(signals)
    seen: list[KeystrokeSeries] = []

    def retime(series: KeystrokeSeries) -> list[float]:
        seen.append(series)
        # quantize every key event to a 100 ms grid, as a timing rewriter might
        return [round(t * 10) / 10 for t in series.times if t is not None]

    res = process_bd_post(e, retime=retime)
    assert res.changed and res.e is not None and len(seen) == 1
    out = parse_signals(decrypt_sjd(res.e["sjd"], ASID))
    times = keystroke_series(out).times
    assert all(round(t * 1000) % 100 == 0 for t in times if t is not None)
    assert {k: v for k, v in out.items() if k != "30100"} == {
        k: v for k, v in signals.items() if k != "30100"
    }
    assert [r["v"] for r in out["30100"]] == [r["v"] for r in signals["30100"]]
    # Summary describes what the client tried to send, not the rewrite.
    assert res.summary.signals[30100] == 16
    # A retimer that changes nothing leaves the post alone.
    assert process_bd_post(e, retime=lambda s: list(s.times)).changed is False


def test_strip_round_trips() -> None:
    signals, _ = _synthetic()
    e = _e_for(signals)
    res = process_bd_post(e, strip_ids={30100, 30106})
    assert res.changed and res.e is not None
    out = parse_signals(decrypt_sjd(res.e["sjd"], ASID))
    assert out == strip_signals(signals, {30100, 30106})
    assert "30100" not in out and "30106" not in out and out["30107"] == signals["30107"]
    assert summarize(out).categories.get("keystroke") is None
    # Stripping ids that are absent changes nothing.
    assert process_bd_post(e, strip_ids={30999}).changed is False

    # Strip and retime together: retime sees no keystrokes left and is not called.
    def must_not_run(series: KeystrokeSeries) -> list[float]:
        raise AssertionError("retime called without keystrokes")

    assert process_bd_post(e, strip_ids={30100}, retime=must_not_run).changed
    # Stripping everything leaves nothing to send.
    gone = process_bd_post(e, strip_ids=lambda sid: True)
    assert gone.changed and gone.e is None and gone.summary.records == 30


def test_padding_only_when_needed() -> None:
    for n in range(8, 26):
        pt = b'{"1":"' + b"x" * (n - 8) + b'"}'
        assert len(pt) == n
        ct = base64.b64decode(encrypt_sjd(pt, ASID))
        assert len(ct) == -(-n // 8) * 8
        assert decrypt_sjd(encrypt_sjd(pt, ASID), ASID) == pt


def test_non_ascii_is_written_as_the_browser_does() -> None:
    signals = {"30003": [{"t": 1.5, "ctx": {"cn": "https://x/é"}, "v": ["pt-BR", "😀"]}]}
    data = dumps_signals(signals)
    assert "é".encode() in data
    assert b"\xed\xa0\xbd\xed\xb8\x80" in data  # 😀 as two 3-byte surrogates (utf8Decode)
    sjd = encrypt_sjd(data, ASID)
    assert parse_signals(decrypt_sjd(sjd, ASID)) == signals
    # Standard 4-byte UTF-8 from another writer decodes too.
    assert parse_signals(json.dumps(signals, ensure_ascii=False).encode()) == signals


# --- errors --------------------------------------------------------------------------------------


def _fixture_e() -> dict[str, Any]:
    return SAMPLES[0][2]


@pytest.mark.parametrize(
    ("sjd", "asid"),
    [
        ("###not base64###", ASID),  # bad base64
        ("okKgfmYUEqDWglLsPl+E8WOgq3sIYx+n", ASID[:-1]),  # bad key: 35 chars
        ("okKgfmYUEqDWglLsPl+E8WOgq3sIYx+n", "é" * 36),  # bad key: not ASCII
        ("okKgfmYUEqDWglLsPl+E8WOgq3sIYx+n", None),  # bad key: not a string
        (base64.b64encode(b"1234567").decode(), ASID),  # 7 bytes: wrong length
        ("", ASID),  # empty
        (None, ASID),
        ("okKgfmYUEqDWglLsPl+E8WOg", ASID),  # valid blocks, wrong key: garbage, not JSON
    ],
)
def test_decrypt_errors(sjd: Any, asid: Any) -> None:
    with pytest.raises(SignalsError):
        decrypt_sjd(sjd, asid)


def test_wrong_asid_on_real_sample_is_not_json() -> None:
    e = _fixture_e()
    with pytest.raises(SignalsError, match="not JSON|UTF-8"):
        decrypt_sjd(e["sjd"], ASID)


def test_plaintext_errors() -> None:
    with pytest.raises(SignalsError, match="not JSON"):
        decrypt_sjd(encrypt_sjd(b"hello, world", ASID), ASID)
    with pytest.raises(SignalsError, match="object"):
        decrypt_sjd(encrypt_sjd(b"[1,2,3]", ASID), ASID)
    with pytest.raises(SignalsError):
        decrypt_sjd(encrypt_sjd(b'{"a":NaN}', ASID), ASID)
    for bad in (b"", b'{"a":1}\x00', "text"):
        with pytest.raises(SignalsError):
            encrypt_sjd(bad, ASID)  # type: ignore[arg-type]
    for e in ({"sjd": "x"}, {"asid": ASID}, [], {"asid": ASID, "sjd": 5}):
        with pytest.raises(SignalsError):
            process_bd_post(e)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())))
def test_arbitrary_sjd_only_raises_signals_error(sjd: str) -> None:
    try:
        plaintext = decrypt_sjd(sjd, ASID)
    except SignalsError:
        return
    assert isinstance(parse_signals(plaintext), dict)


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_json = st.recursive(
    _json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.integers(30000, 39999).map(str), st.lists(_json, max_size=3), min_size=1, max_size=5),
    st.uuids(),
)
def test_any_signals_round_trip(signals: dict[str, Any], asid: uuid.UUID) -> None:
    data = dumps_signals(signals)
    assert parse_signals(data) == signals or _has_float_int_ambiguity(signals)
    assert decrypt_sjd(encrypt_sjd(data, str(asid)), str(asid)) == data


def _has_float_int_ambiguity(obj: Any) -> bool:
    """JS writes 2.0 as 2 and -0.0 as 0: after parsing, that number is an int (equal in value)."""
    if isinstance(obj, float):
        return obj.is_integer()
    if isinstance(obj, dict):
        return any(_has_float_int_ambiguity(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_float_int_ambiguity(v) for v in obj)
    return False


def test_retimer_may_return_numpy_or_generator() -> None:
    signals, _ = _synthetic(n_keys=4, seed=11)
    e = _e_for(signals)
    arr = process_bd_post(e, retime=lambda s: np.asarray(s.times, dtype=float) + 0.25)
    gen = process_bd_post(e, retime=lambda s: (t + 0.25 for t in s.times if t is not None))
    assert arr.changed and gen.changed and arr.e == gen.e
    assert process_bd_post(e, retime=lambda s: [None] * len(s)).changed is False
    for bad in (lambda s: None, lambda s: "12", lambda s: ["1"] * len(s), lambda s: [1e300] * len(s)):
        with pytest.raises(SignalsError):
            process_bd_post(e, retime=bad)  # type: ignore[arg-type]


def test_e_string_helper_keeps_the_browser_style() -> None:
    _, raw_e, e = SAMPLES[1]
    changed, same, summary = process_bd_e_string(raw_e)
    assert changed is False and same is raw_e and summary.categories == {"fingerprint": 17}
    changed, new_text, _ = process_bd_e_string(raw_e, strip_ids={30094, 30013})
    assert changed and new_text is not None
    new_e = json.loads(new_text)
    assert js_dumps(new_e) == new_text and ", " not in new_text and list(new_e) == list(e)
    left = parse_signals(decrypt_sjd(new_e["sjd"], e["asid"]))
    assert "30094" not in left and "30013" not in left and len(left) == 15
    changed, gone, _ = process_bd_e_string(raw_e, strip_ids=lambda sid: True)
    assert changed and gone is None
    for bad in ("{", "[]", '{"asid": 1, "sjd": "x"}', None):
        with pytest.raises(SignalsError):
            process_bd_e_string(bad)  # type: ignore[arg-type]


def test_over_long_integer_literal_is_a_signals_error() -> None:
    with pytest.raises(SignalsError):
        decrypt_sjd(encrypt_sjd(b'{"1":' + b"9" * 5000 + b"}", ASID), ASID)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["asid", "sjd", "ct", "sid", "rt"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=40), st.just(ASID), st.just(SAMPLES[1][2]["sjd"])
        ),
    ),
    st.one_of(st.none(), st.sets(st.integers(30000, 38001), max_size=3)),
)
def test_process_bd_post_only_raises_signals_error(e: dict[str, Any], strip: set[int] | None) -> None:
    try:
        res = process_bd_post(e, strip_ids=strip, retime=lambda s: list(s.times))
    except SignalsError:
        return
    assert isinstance(res.changed, bool)


@pytest.mark.parametrize(
    ("value", "js"),
    [
        (1.0, "1"),
        (-0.0, "0"),
        (2.5, "2.5"),
        (1737333755.49, "1737333755.49"),
        (1e-7, "1e-7"),
        (1.5e-6, "0.0000015"),
        (1e20, "100000000000000000000"),
        (1.2345678901234568e20, "123456789012345680000"),
        (9007199254740994.0, "9007199254740994"),
        (1e21, "1e+21"),
        (-1.5e300, "-1.5e+300"),
        (float("inf"), "null"),
        ("x\ud800y", '"x\\ud800y"'),
        ("é\u2028\n", '"é\u2028\\n"'),
    ],
)
def test_js_dumps_matches_json_stringify(value: Any, js: str) -> None:
    # Expected strings are what V8's JSON.stringify prints for the same value.
    assert js_dumps([value]) == f"[{js}]"
    assert js_dumps({"k": [value, {"n": None}]}) == f'{{"k":[{js},{{"n":null}}]}}'


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**53), 2**53)
    if kind in (2, 3):  # any finite double, from random bits, or a ms-precision epoch
        if kind == 3:
            return rng.randint(1_600_000_000_000, 1_800_000_000_000) / 1000
        while True:
            x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
            if x == x and abs(x) != float("inf"):
                return x
    if kind == 4:
        return rng.choice([0.1, 1e-7, 1.5e-6, 123e-9, 1e16, 2.0**53 + 2, 1e21, 5e-324, -0.0, 100.0])
    if kind == 5:
        alphabet = 'ab"\\\n\t\x00\x1f\x7fé€\u2028😀\ud800\udfff'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(rng.randrange(40000)): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_dumps_agrees_with_node_json_stringify() -> None:
    rng = random.Random(2025)
    values = [_random_json(rng) for _ in range(600)]
    # Feed node ASCII-escaped JSON (exact for every double); it answers JSON.stringify of each.
    lines = "\n".join(json.dumps(v, ensure_ascii=True) for v in values)
    script = (
        "const lines=require('fs').readFileSync(0,'utf8').split('\\n');"
        "process.stdout.write(lines.map(l=>JSON.stringify(JSON.stringify(JSON.parse(l)))).join('\\n'))"
    )
    out = subprocess.run(
        ["node", "-e", script], input=lines, capture_output=True, text=True, timeout=50, check=True
    )
    # node's answers are themselves JSON strings (so lone surrogates survive the pipe).
    expected = [json.loads(line) for line in out.stdout.split("\n")]
    assert len(expected) == len(values)
    mismatches = [(v, js_dumps(v), e) for v, e in zip(values, expected, strict=True) if js_dumps(v) != e]
    assert mismatches == []
