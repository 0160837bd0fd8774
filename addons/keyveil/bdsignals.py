"""Meta's bot-detection signals: the `falco:bd_pdc_signals` post.

Pure: no mitmproxy. The post's `e` is `{"asid", "ct", "rt"?, "sjd", "sid"}`; `sjd` is
base64(Blowfish-CBC(JSON of signals, zero-padded)) with key and IV derived from `asid`, which travels
in clear beside it. This module decrypts, classifies, strips or retimes the signals and re-encrypts
them the way Meta's client (`BDClientSignalCollectionTrigger` + `javascript-blowfish`) does, so an
unchanged plaintext gives back the identical `sjd`. See docs/bdsignals.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
import re
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:  # cryptography >= 43 moved Blowfish to "decrepit"; 45 removes the old name.
    from cryptography.hazmat.decrepit.ciphers.algorithms import Blowfish
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import Blowfish  # type: ignore[no-redef]

KEYSTROKE_ID = 30100
POINTER_ID = 30106
TOUCH_ID = 30107
HEARTBEAT_IDS = frozenset({38000, 38001})
FINGERPRINT_IDS = range(30000, 30096)
KEY_DOWN, KEY_UP = 2, 1

# Names from Meta's SignalCollectorMap (2023-2025 web bundle); unknown ids still classify by range.
SIGNAL_NAMES: dict[int, str] = {
    30000: "webdriver",
    30001: "plugin_count",
    30002: "mime_type_count",
    30003: "languages",
    30004: "connection_rtt",
    30005: "window_inner_size",
    30007: "notification_permission",
    30008: "navigator_notification_permission",
    30012: "vendor",
    30013: "app_version",
    30015: "platform",
    30018: "hardware_concurrency",
    30019: "plugin_file_extensions",
    30040: "timezone_offset",
    30093: "max_touch_points",
    30094: "user_agent",
    30095: "history_length",
    30100: "key_down_up",
    30106: "mouse_presence",
    30107: "touch_presence",
    38000: "heartbeat",
    38001: "heartbeat_v2",
}

_BLOCK = 8
_ASID_LEN = 36
_MAX_EPOCH_S = 1e11  # year 5138: anything larger is not a Date.now()/1000


class SignalsError(ValueError):
    """A bd_pdc_signals payload cannot be decoded or encoded (bad base64, length, key, JSON, shape)."""


# --- crypto -----------------------------------------------------------------------------------


def derive_key_iv(asid: str) -> tuple[bytes, bytes]:
    """key = asid[19:23] + asid[24:36] (16 ASCII chars); IV[i] = key[i] ^ key[8 + i]."""
    if not isinstance(asid, str):
        raise SignalsError(f"asid must be a string, not {type(asid).__name__}")
    # The client checks only the length (and sends sjd in clear when it is wrong).
    if len(asid) != _ASID_LEN or not asid.isascii():
        raise SignalsError(f"asid must be 36 ASCII characters, got {len(asid)}")
    key = (asid[19:23] + asid[24:36]).encode("ascii")
    iv = bytes(key[i] ^ key[8 + i] for i in range(8))
    return key, iv


def _cipher(asid: str) -> Cipher:
    key, iv = derive_key_iv(asid)
    return Cipher(Blowfish(key), modes.CBC(iv))


_ECB_CACHE = threading.local()  # per thread: an OpenSSL context is not safe to share across threads
_ECB_CACHE_SIZE = 64


def _ecb_decryptor(key: bytes) -> Any:
    """A Blowfish-ECB decryptor for `key`, reused: making an OpenSSL context costs more than
    decrypting a whole post. ECB keeps no state between blocks, so it is never finalized."""
    cache: dict[bytes, Any] | None = getattr(_ECB_CACHE, "d", None)
    if cache is None:
        cache = _ECB_CACHE.d = {}
    dec = cache.get(key)
    if dec is None:
        if len(cache) >= _ECB_CACHE_SIZE:
            cache.clear()
        dec = cache[key] = Cipher(Blowfish(key), modes.ECB()).decryptor()
    return dec


def _decrypt_raw(sjd_b64: str, asid: str) -> bytes:
    if not isinstance(sjd_b64, str):
        raise SignalsError(f"sjd must be a string, not {type(sjd_b64).__name__}")
    key, iv = derive_key_iv(asid)
    try:
        data = base64.b64decode(sjd_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignalsError(f"sjd is not base64: {e}") from None
    if not data or len(data) % _BLOCK:
        raise SignalsError(f"sjd ciphertext is {len(data)} bytes, not a positive multiple of 8")
    # CBC by hand over ECB: P_i = D(C_i) xor C_(i-1), with C_0 = IV, as one big-integer xor
    blocks = _ecb_decryptor(key).update(data)
    plain = (int.from_bytes(blocks, "big") ^ int.from_bytes(iv + data[:-_BLOCK], "big")).to_bytes(len(data), "big")
    # Zero padding, as javascript-blowfish's trimZeros: JSON text never ends in NUL.
    return plain.rstrip(b"\x00")


def decrypt_sjd(sjd_b64: str, asid: str) -> bytes:
    """The JSON text inside `sjd` (padding removed). Raises SignalsError unless it is a JSON object."""
    plaintext = _decrypt_raw(sjd_b64, asid)
    parse_signals(plaintext)
    return plaintext


def encrypt_sjd(plaintext: bytes, asid: str) -> str:
    """base64 (standard alphabet, `=` padded) of Blowfish-CBC over `plaintext` zero-padded to 8 bytes.

    Like the client, a plaintext that is already a multiple of 8 bytes gets no padding block."""
    if not isinstance(plaintext, bytes | bytearray):
        raise SignalsError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    if not plaintext:
        raise SignalsError("empty plaintext: the client never sends an empty sjd")
    if plaintext.endswith(b"\x00"):
        raise SignalsError("plaintext ends in NUL: zero padding would not round-trip")
    enc = _cipher(asid).encryptor()
    padded = bytes(plaintext) + b"\x00" * (-len(plaintext) % _BLOCK)
    return base64.b64encode(enc.update(padded) + enc.finalize()).decode("ascii")


# --- JSON as the browser writes it ---------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise SignalsError(f"not JSON: {name}")


def _text_from_bytes(data: bytes) -> str:
    # The client's utf8Decode writes each UTF-16 unit separately (surrogates as 3 bytes, CESU-8).
    try:
        s = data.decode("utf-8", "surrogatepass")
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    except UnicodeError as e:
        raise SignalsError(f"not JSON: invalid UTF-8 ({e.reason})") from None


def _bytes_from_text(s: str) -> bytes:
    if s.isascii() or all(ord(c) < 0x10000 for c in s):
        return s.encode("utf-8", "surrogatepass")
    units = s.encode("utf-16-le", "surrogatepass")
    pieces = (units[i : i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(units), 2))
    return "".join(pieces).encode("utf-8", "surrogatepass")


def parse_signals(plaintext: bytes) -> dict[str, Any]:
    """The decrypted JSON object {signal id (str): [record, ...]}. Raises SignalsError otherwise."""
    try:
        obj = json.loads(_text_from_bytes(plaintext), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # ValueError also covers over-long integer literals
        raise SignalsError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SignalsError(f"not a JSON object of signals but {type(obj).__name__}")
    return obj


def _js_number(x: float) -> str:
    """Number.prototype.toString for a finite double (JSON.stringify writes null otherwise)."""
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "0"
    sign, digit_tuple, exp = Decimal(repr(abs(x))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = k + int(exp)  # position of the decimal point relative to the digits
    minus = "-" if x < 0 else ""
    if k <= n <= 21:
        return minus + digits + "0" * (n - k)
    if 0 < n <= 21:
        return minus + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return minus + "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{minus}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"


class _Slow(Exception):
    """A value the C encoder would write differently from JSON.stringify."""


_INT_EXACT = 2.0**53
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_array_index(key: str) -> bool:
    return key.isdigit() and key.isascii() and (key == "0" or key[0] != "0") and int(key) < 2**32 - 1


def _js_items(obj: Mapping[Any, Any]) -> list[tuple[str, Any]]:
    """Items in JavaScript property order: array-index keys ascending, then the rest as inserted."""
    items = [(str(k), v) for k, v in obj.items()]
    index = [kv for kv in items if _is_array_index(kv[0])]
    if not index:
        return items
    index.sort(key=lambda kv: int(kv[0]))
    return index + [kv for kv in items if not _is_array_index(kv[0])]


def _for_c_encoder(obj: Any) -> Any:
    # Python's repr and JS agree on plain decimals; they differ on exponents and on "2.0" vs "2".
    if isinstance(obj, float):
        if not math.isfinite(obj) or "e" in repr(obj):
            raise _Slow
        if obj.is_integer():
            if abs(obj) >= _INT_EXACT:  # JS prints the shortest digits, not the exact integer
                raise _Slow
            return int(obj)
        return obj
    if isinstance(obj, str | int) or obj is None:
        return obj
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise _Slow
        return {k: _for_c_encoder(v) for k, v in _js_items(obj)}
    if isinstance(obj, list):
        return [_for_c_encoder(v) for v in obj]
    raise _Slow


def _js_dumps_slow(obj: Any) -> str:
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return _js_number(obj)
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, Mapping):
        return "{" + ",".join(f"{_js_dumps_slow(k)}:{_js_dumps_slow(v)}" for k, v in _js_items(obj)) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(_js_dumps_slow(v) for v in obj) + "]"
    raise SignalsError(f"cannot serialize {type(obj).__name__}")


def js_dumps(obj: Any) -> str:
    """JSON.stringify(obj): compact, JS key order (integer keys first, ascending), JS number formatting,
    no ASCII escaping except lone surrogates. Uses the C encoder when every number prints the same in both languages."""
    try:
        text = json.dumps(_for_c_encoder(obj), ensure_ascii=False, separators=(",", ":"))
    except _Slow:
        text = _js_dumps_slow(obj)
    # Only strings can hold surrogates; after parsing, any left are unpaired: JS escapes those.
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def dumps_signals(signals: Mapping[str, Any]) -> bytes:
    """Signals as the client serializes them before encryption (byte-identical for its own output)."""
    try:
        return _bytes_from_text(js_dumps(signals))
    except RecursionError:
        raise SignalsError("signals nested too deeply to serialize") from None


# --- classification ----------------------------------------------------------------------------


def signal_id(key: Any) -> int | None:
    """The numeric id of a signals key ("30100" -> 30100); None when it is not an integer."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def category_of(sid: int | None) -> str:
    if sid == KEYSTROKE_ID:
        return "keystroke"
    if sid == POINTER_ID:
        return "pointer"
    if sid == TOUCH_ID:
        return "touch"
    if sid is not None and sid in FINGERPRINT_IDS:
        return "fingerprint"
    return "other"  # heartbeats (38000/38001) and ids nobody has described yet


def _records(value: Any) -> list[Any]:
    # The client always sends a list per id; count anything else as one record.
    return value if isinstance(value, list) else [value]


def _record_time(rec: Any) -> float | None:
    if isinstance(rec, dict):
        t = rec.get("t")
        if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t):
            return float(t)
    return None


def _record_action(rec: Any) -> int | None:
    if isinstance(rec, dict) and isinstance(rec.get("v"), dict):
        action = rec["v"].get("action")
        if isinstance(action, int) and not isinstance(action, bool):
            return action
    return None


@dataclass(frozen=True)
class KeystrokeSeries:
    """The 30100 records in record order: epoch seconds and action (2 down, 1 up, None unknown)."""

    times: list[float | None]
    actions: list[int | None]

    @property
    def down(self) -> list[float]:
        return [t for t, a in zip(self.times, self.actions, strict=True) if a == KEY_DOWN and t is not None]

    @property
    def up(self) -> list[float]:
        return [t for t, a in zip(self.times, self.actions, strict=True) if a == KEY_UP and t is not None]

    def __len__(self) -> int:
        return len(self.times)


def keystroke_series(signals: Mapping[str, Any]) -> KeystrokeSeries:
    times: list[float | None] = []
    actions: list[int | None] = []
    for key, value in signals.items():
        if signal_id(key) != KEYSTROKE_ID:
            continue
        for rec in _records(value):
            times.append(_record_time(rec))
            actions.append(_record_action(rec))
    return KeystrokeSeries(times, actions)


def median_gap_ms(times: Iterable[float]) -> int | None:
    """Median gap between successive times (seconds), in ms rounded to 10 ms: coarse on purpose."""
    ordered = sorted(times)
    if len(ordered) < 2:
        return None
    gap = statistics.median(b - a for a, b in zip(ordered, ordered[1:], strict=False)) * 1000
    return int(round(gap / 10.0)) * 10


@dataclass(frozen=True)
class SignalSummary:
    """Counts only (never timings or values): what one sjd held."""

    signals: dict[int, int] = field(default_factory=dict)  # signal id -> records
    categories: dict[str, int] = field(default_factory=dict)  # category -> records
    keys_down: int = 0
    keys_up: int = 0
    keystroke_median_gap_ms: int | None = None
    unnamed_keys: int = 0  # keys that are not integer ids (counted under "other")

    @property
    def records(self) -> int:
        return sum(self.categories.values())

    def journal_categories(self) -> dict[str, dict[str, int]]:
        """The journal's category map: events = distinct signal ids, samples = records."""
        events: dict[str, int] = {}
        for sid in self.signals:
            cat = category_of(sid)
            events[cat] = events.get(cat, 0) + 1
        if self.unnamed_keys:
            events["other"] = events.get("other", 0) + self.unnamed_keys
        return {cat: {"events": events.get(cat, 0), "samples": n} for cat, n in self.categories.items()}

    def stats(self) -> dict[str, int]:
        return (
            {}
            if self.keystroke_median_gap_ms is None
            else {"keystroke_median_gap_ms": self.keystroke_median_gap_ms}
        )


def summarize(signals: Mapping[str, Any]) -> SignalSummary:
    per_id: dict[int, int] = {}
    per_cat: dict[str, int] = {}
    unnamed = 0
    for key, value in signals.items():
        sid = signal_id(key)
        n = len(_records(value))
        if sid is None:
            unnamed += 1
        else:
            per_id[sid] = per_id.get(sid, 0) + n
        cat = category_of(sid)
        per_cat[cat] = per_cat.get(cat, 0) + n
    series = keystroke_series(signals)
    down = series.down
    # Inter-key gap between key downs; fall back to every key record when actions are missing.
    gap_times = down if len(down) >= 2 else [t for t in series.times if t is not None]
    return SignalSummary(
        signals=per_id,
        categories=per_cat,
        keys_down=len(down),
        keys_up=len(series.up),
        keystroke_median_gap_ms=median_gap_ms(gap_times),
        unnamed_keys=unnamed,
    )


# --- rewriting ---------------------------------------------------------------------------------

IdSelector = Iterable[int] | Callable[[int], bool]


def _selector(ids: IdSelector) -> Callable[[int | None], bool]:
    if callable(ids):
        pred = ids
        return lambda sid: sid is not None and bool(pred(sid))
    chosen = frozenset(ids)
    return lambda sid: sid in chosen


def strip_signals(signals: Mapping[str, Any], ids: IdSelector) -> dict[str, Any]:
    """A copy of `signals` without the chosen ids (a set of ints or a predicate on the int id)."""
    drop = _selector(ids)
    return {k: v for k, v in signals.items() if not drop(signal_id(k))}


def _js_seconds(t: float) -> float | int:
    # Date.now() / 1e3: whole milliseconds; an int when it has no fraction (JS prints no ".0").
    ms = round(t * 1000)
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def replace_keystroke_times(signals: Mapping[str, Any], new_times: Iterable[float]) -> dict[str, Any]:
    """A copy with the 30100 records' `t` replaced in record order (seconds, kept to ms precision).

    `new_times` (a list, tuple, generator or numpy array) must have one entry per 30100 record (see
    keystroke_series); None keeps that record's time. Records without a numeric `t` keep theirs."""
    bad = SignalsError(f"new times must be a sequence of numbers, not {type(new_times).__name__}")
    if isinstance(new_times, str | bytes | Mapping):
        raise bad
    try:
        items = list(new_times)
    except TypeError:
        raise bad from None
    if any(t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real)) for t in items):
        raise SignalsError("new keystroke times must be numbers (or None to keep one)")
    times = [None if t is None else float(t) for t in items]
    series = keystroke_series(signals)
    if len(times) != len(series):
        raise SignalsError(f"{len(times)} new times for {len(series)} keystroke records")
    if not all(t is None or 0 <= t < _MAX_EPOCH_S for t in times):  # also rejects NaN and inf
        raise SignalsError("new keystroke times must be epoch seconds (0 to 1e11)")
    it = iter(times)
    out: dict[str, Any] = {}
    for key, value in signals.items():
        if signal_id(key) != KEYSTROKE_ID:
            out[key] = value
            continue
        recs = []
        for rec in _records(value):
            t = next(it)
            if t is not None and _record_time(rec) is not None:
                rec = {**rec, "t": _js_seconds(t)}
            recs.append(rec)
        out[key] = recs if isinstance(value, list) else recs[0]
    return out


Retimer = Callable[[KeystrokeSeries], Iterable[float]]


class BdResult(NamedTuple):
    """changed: False means keep the original bytes. e: the new `e` dict, or None when nothing is
    left to send (the client itself never posts an empty signal set): drop the post."""

    changed: bool
    e: dict[str, Any] | None
    summary: SignalSummary


def process_bd_post(
    e: Mapping[str, Any], *, strip_ids: IdSelector | None = None, retime: Retimer | None = None
) -> BdResult:
    """Decrypt the parsed `e` of a bd_pdc_signals post, classify it, and optionally strip ids and/or
    retime the 30100 records; a changed result is re-encrypted with the same asid."""
    if not isinstance(e, Mapping):
        raise SignalsError(f"e must be a JSON object, not {type(e).__name__}")
    asid, sjd = e.get("asid"), e.get("sjd")
    if asid is None or sjd is None:
        raise SignalsError("e has no asid or no sjd")
    signals = parse_signals(_decrypt_raw(sjd, asid))
    summary = summarize(signals)
    new = signals
    if strip_ids is not None:
        new = strip_signals(new, strip_ids)
    if retime is not None:
        series = keystroke_series(new)
        if len(series):
            # Errors raised inside the retimer propagate: they are bugs of the caller, not of the data.
            new = replace_keystroke_times(new, retime(series))
    if new == signals:
        return BdResult(False, dict(e), summary)
    if not new:
        return BdResult(True, None, summary)
    return BdResult(True, {**e, "sjd": encrypt_sjd(dumps_signals(new), asid)}, summary)


def process_bd_e_string(
    e_text: str, *, strip_ids: IdSelector | None = None, retime: Retimer | None = None
) -> tuple[bool, str | None, SignalSummary]:
    """process_bd_post on the post's `e` JSON string; a changed `e` is written back as JSON.stringify
    would (compact, same key order). The string is None when the post should be dropped."""
    if not isinstance(e_text, str):
        raise SignalsError(f"e must be a JSON string, not {type(e_text).__name__}")
    try:
        e = json.loads(e_text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise SignalsError(f"e is not JSON: {err}") from None
    res = process_bd_post(e, strip_ids=strip_ids, retime=retime)
    if not res.changed:
        return False, e_text, res.summary
    return True, None if res.e is None else js_dumps(res.e), res.summary
