"""The journal: an append-only, length-framed, checksummed msgpack log of keyveil's decisions.

Pure: no mitmproxy, no numpy. See docs/journal.md for the record schema and the file format.

A file is `MAGIC` followed by frames `c6 <len:u32 BE> <payload> ce <crc32(payload):u32 BE>`. Both the
magic and every frame are valid msgpack objects (a str, a bin32 and a uint32), so a healthy file is one
msgpack stream a C unpacker reads in bulk, while the length and the checksum let a reader stop cleanly at
a torn tail. The first frame is a header map; frames holding maps with int keys define interned strings
(per file); all other frames are records encoded as positional arrays (see `Encoder`).

The writer never raises into its caller and never blocks it: `write()` puts the record on a bounded
queue; a background thread redacts, encodes and appends it, at least once a second.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import heapq
import hmac
import itertools
import logging
import math
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import msgpack

from keyveil.config import default_state_dir

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # the logical record (docs/journal.md)
FORMAT_VERSION = 1  # the file encoding
MAGIC = b"\xb0keyveil-journal" + b"1"  # msgpack fixstr of 16 chars: "keyveil-journal1"
SUFFIX = ".kvj"
MAX_FRAME = 1 << 20  # a record larger than this is corruption, not data

CATEGORIES = ("keystroke", "click", "pointer", "scroll", "touch", "activity", "fingerprint", "other")
ACTIONS = ("dropped", "stripped", "rewritten", "passed", "allowed", "failed")
MODES = ("enforce", "audit")
KINDS = ("telemetry", "functional", "uncataloged")
DETAILS = ("summary", "full")

_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}

# The encoded record: a msgpack array of 20 whose first 57 bytes have a fixed layout (fixed-width
# msgpack types), so a reader can slice columns out of many records at once with numpy:
#   0 dc 00 14 (array16)  3 v (fixint)  4 cb ts:f64  13+3k cd sid:u16 for the 11 string fields (k=0..10,
#   0xffff = null)  46 ce size_in:u32  51 ce size_out:u32  56 detail (fixint 0|1)
#   57 c4 <n> categories: n/9 x (u8 category index, u32 events, u32 samples)
#   then c5 <n:u16> routes: n/6 x (u16 sid, u32 count); then stats [sid, number, ...]; then extra map|nil
# Decoded positions:
(I_V, I_TS, I_APP, I_ENDPOINT, I_HOST, I_PATH, I_METHOD, I_KIND, I_ACTION, I_MODE, I_LAYERS, I_REASON,
 I_SESSION, I_SIZE_IN, I_SIZE_OUT, I_DETAIL, I_CATS, I_ROUTES, I_STATS, I_EXTRA) = range(20)  # fmt: skip
RECORD_LEN = 20
STR_FIELDS = (
    "app",
    "endpoint",
    "host",
    "path",
    "method",
    "kind",
    "action",
    "mode",
    "layers",
    "reason",
    "session",
)
HEAD = struct.Struct(">BHBBd" + "BH" * len(STR_FIELDS) + "BIBIB")
HEAD_LEN = HEAD.size  # 57
SID_NONE = 0xFFFF
MAX_SIDS = 0xFF00  # a file's string table stops growing here: the writer rotates
_CAT = struct.Struct(">BII")
_ROUTE = struct.Struct(">HI")
U32 = 0xFFFFFFFF

MiB = 1 << 20


def default_journal_dir() -> Path:
    return default_state_dir() / "journal"


# -- privacy ---------------------------------------------------------------------------------------

# Runs that look like ids, tokens, timestamps, hashes, emails. Matched inside free text.
_SENSITIVE = re.compile(
    r"\d{6,}"  # user ids, epoch timestamps, phone numbers
    r"|[0-9a-fA-F]{16,}"  # hashes, device ids
    r"|eyJ[A-Za-z0-9_-]{6,}"  # JWT
    r"|[^\s@/]+@[^\s@/]+\.[A-Za-z]{2,}"  # email
    r"|[A-Za-z0-9+/_=:-]{16,}"  # tokens, uuids, web session ids ("ovkhzw:8w3ptf:b0wm93"): see _token_like
)
_TOKENISH = re.compile(r"[A-Za-z0-9+/_=:-]{16,}")
_NAMEISH = re.compile(r"[0-9a-fA-F]{16,}|\d{6,}")
_IDENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HOST = re.compile(r"^[a-z0-9.-]{1,253}$")
_HASH = re.compile(r"^[0-9a-f]{16}$")
_STAT_KEY = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Keys never journaled, whatever the detail level.
_SECRET_KEYS = re.compile(
    r"(cookie|token|auth|passw|secret|dtsg|^lsd$|jazoest|session_?id|^sid$|user_?id|^uid$|^c_user$|^xs$|"
    r"^datr$|device_?id|email|phone|^_*user$|fbid|actor_?id|account|^asid$|^ip$|address)",
    re.I,
)
REDACTED = "[redacted]"


def _matches_sensitive(m: re.Match[str]) -> bool:
    run = m.group(0)
    if _TOKENISH.fullmatch(run) and not _NAMEISH.fullmatch(run):
        # a long run of token characters is a token when it mixes letters and digits; Meta's event and
        # logger names (falco:bd_pdc_signals, logger:WebPixelRatioLoggerConfig) have no digits
        return any(c.isdigit() for c in run) and any(c.isalpha() for c in run)
    return True


@functools.lru_cache(maxsize=8192)  # the same names and paths come back all the time
def looks_sensitive(text: str) -> bool:
    """True when `text` holds something shaped like an id, token, timestamp, hash or email."""
    return any(_matches_sensitive(m) for m in _SENSITIVE.finditer(text))


@functools.lru_cache(maxsize=8192)  # the same names and paths come back all the time
def scrub_text(text: str, limit: int = 120) -> str:
    """Replace every id- or token-shaped run in free text, and cap its length."""
    out = _SENSITIVE.sub(lambda m: REDACTED if _matches_sensitive(m) else m.group(0), text)
    return out[:limit]


@functools.lru_cache(maxsize=8192)  # the same names and paths come back all the time
def clean_path(path: str) -> str:
    """A URL path without query or fragment, its id-shaped segments replaced by `:id`."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    segs = [":id" if looks_sensitive(s) or len(s) > 64 else s for s in path.split("/")]
    return "/".join(segs)[:200] or "/"


def salted_hash(value: str | bytes, salt: bytes) -> str:
    """A 16 hex digit keyed hash: groups equal values without journaling them."""
    data = value.encode() if isinstance(value, str) else value
    return hmac.new(salt, data, hashlib.sha256).hexdigest()[:16]


def load_salt(state_dir: str | Path | None = None) -> bytes:
    """The per-install salt (`<state dir>/salt`, 32 random bytes, mode 0600), created on first use."""
    d = Path(state_dir) if state_dir is not None else default_state_dir()
    _ensure_dir(d)
    path = d / "salt"
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    salt = os.urandom(32)
    tmp = d / f".salt.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, salt)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic: the first instance to get here wins
    except FileExistsError:
        salt = path.read_bytes()
    finally:
        tmp.unlink()
    return salt


def _int(v: Any, lo: int = 0, hi: int = U32) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return 0
    return int(min(max(int(v), lo), hi))


def _ident(v: Any, default: str = "") -> str:
    if not isinstance(v, str) or not v:
        return default
    if not _IDENT.match(v) or looks_sensitive(v):
        return REDACTED
    return v


def _clean_value(v: Any, depth: int = 0) -> Any:
    """Full-detail extra fields: plain data only, token-shaped strings and secret-named keys removed."""
    if v is None or isinstance(v, bool | int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, str):
        return scrub_text(v, 500)
    if depth >= 4:
        return None
    if isinstance(v, list | tuple):
        return [_clean_value(x, depth + 1) for x in v[:256]]
    if isinstance(v, dict):
        return {
            str(k)[:64]: _clean_value(x, depth + 1)
            for k, x in itertools.islice(v.items(), 256)
            if not _SECRET_KEYS.search(str(k)) and not looks_sensitive(str(k))
        }
    return None


_KNOWN = frozenset(
    ("v", "ts", "app", "endpoint", "host", "path", "method", "kind", "action", "mode", "categories",
     "routes", "size_in", "size_out", "layers", "reason", "stats", "detail", "session")
)  # fmt: skip


def redact(record: dict[str, Any], detail: str = "summary") -> tuple[dict[str, Any], int]:
    """The last line of defence before bytes hit the disk. Returns (clean record, fields removed).

    Summary: only schema fields, each type-checked; identifiers must look like names; free text is
    scrubbed of id- and token-shaped runs; stats are numbers, `*_ms` rounded to 10 ms; `ts` rounded to
    the second (request timing is itself a weak keystroke signal). Full: same for schema fields, finer
    stats and `ts`, plus extra fields that pass `_clean_value`.
    """
    full = detail == "full"
    removed = 0
    out: dict[str, Any] = {"v": SCHEMA_VERSION}
    ts = record.get("ts")
    ts = float(ts) if isinstance(ts, int | float) and math.isfinite(ts) else time.time()
    out["ts"] = round(ts, 3) if full else float(round(ts))
    out["app"] = _ident(record.get("app"), "unknown")
    ep = record.get("endpoint")
    out["endpoint"] = None if ep is None else _ident(ep, REDACTED)
    host = record.get("host")
    host = host.lower().rstrip(".") if isinstance(host, str) else ""
    out["host"] = host if _HOST.match(host) and not looks_sensitive(host) else REDACTED
    path = record.get("path")
    out["path"] = clean_path(path) if isinstance(path, str) else "/"
    method = record.get("method")
    method = method.upper() if isinstance(method, str) else ""
    out["method"] = method if re.fullmatch(r"[A-Z]{1,10}", method) else "OTHER"
    out["kind"] = _ident(record.get("kind"), "uncataloged")
    out["action"] = _ident(record.get("action"), "passed")
    out["mode"] = _ident(record.get("mode"), "enforce")
    out["size_in"] = _int(record.get("size_in"))
    out["size_out"] = _int(record.get("size_out"))
    layers = record.get("layers")
    if isinstance(layers, list | tuple):
        out["layers"] = [_ident(x, REDACTED).replace(",", "_") for x in layers[:16]]
    else:
        out["layers"] = []
    reason = record.get("reason")
    out["reason"] = scrub_text(reason) if isinstance(reason, str) else ""

    cats: dict[str, dict[str, int]] = {}
    raw_cats = record.get("categories")
    if isinstance(raw_cats, dict):
        for k, v in raw_cats.items():
            name = k if k in _CAT_INDEX else "other"
            if isinstance(v, dict):
                ev, sa = _int(v.get("events")), _int(v.get("samples"))
            else:
                ev, sa = _int(v), 0
            slot = cats.setdefault(name, {"events": 0, "samples": 0})
            # unknown names fold into "other": the sum must stay inside the u32 the file stores
            slot["events"] = min(slot["events"] + ev, U32)
            slot["samples"] = min(slot["samples"] + sa, U32)
    out["categories"] = cats

    routes: dict[str, int] = {}
    raw_routes = record.get("routes")
    if isinstance(raw_routes, dict):
        for k, v in raw_routes.items():
            name = str(k)[:100]
            if looks_sensitive(name) or not name.isprintable():
                name = REDACTED
            if len(routes) >= 64 and name not in routes:
                name = "(more)"
            routes[name] = routes.get(name, 0) + _int(v)
    out["routes"] = routes

    stats: dict[str, int | float] = {}
    raw_stats = record.get("stats")
    if isinstance(raw_stats, dict):
        for k, v in itertools.islice(raw_stats.items(), 32):
            if not isinstance(k, str) or not _STAT_KEY.match(k) or _SECRET_KEYS.search(k):
                removed += 1
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                removed += 1
                continue
            if not full:
                if abs(v) >= 1e6:  # a coarse statistic is never this large: likely a raw timestamp
                    removed += 1
                    continue
                v = (
                    int(round(v / 10.0) * 10)
                    if k.endswith("_ms")
                    else (round(v, 2) if isinstance(v, float) else v)
                )
            stats[k] = v
    out["stats"] = stats

    sess = record.get("session")
    if isinstance(sess, str) and _HASH.match(sess):
        out["session"] = sess
    elif sess is not None:
        removed += 1

    if full:
        out["detail"] = "full"
    extra = {k: v for k, v in record.items() if k not in _KNOWN}
    if extra:
        if full:
            cleaned = _clean_value(extra)
            removed += len(extra) - len(cleaned)
            if cleaned:
                out["extra"] = cleaned
        else:
            removed += len(extra)
    return out, removed


# -- encoding --------------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return (
        b"\xc6" + len(payload).to_bytes(4, "big") + payload + b"\xce" + zlib.crc32(payload).to_bytes(4, "big")
    )


class Encoder:
    """Encodes clean records (see `redact`) with fixed-width heads, interning strings per file."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pending: dict[int, str] = {}
        self.pack = msgpack.Packer(use_bin_type=True).pack

    @property
    def full(self) -> bool:
        return len(self.ids) >= MAX_SIDS

    def sid(self, s: str | None) -> int:
        if s is None:
            return SID_NONE
        i = self.ids.get(s)
        if i is None:
            if len(self.ids) >= SID_NONE:
                raise OverflowError("string table full")
            i = self.ids[s] = len(self.ids)
            self.pending[i] = s
        return i

    def encode(self, r: dict[str, Any]) -> bytes:
        sid = self.sid
        strs = [
            r["app"], r["endpoint"], r["host"], r["path"], r["method"], r["kind"], r["action"], r["mode"],
            ",".join(r["layers"]), r["reason"], r.get("session"),
        ]  # fmt: skip
        head_vals: list[int | float] = [0xDC, RECORD_LEN, r["v"], 0xCB, float(r["ts"])]
        for x in strs:
            head_vals += (0xCD, sid(x))
        head_vals += (
            0xCE,
            min(r["size_in"], U32),
            0xCE,
            min(r["size_out"], U32),
            1 if r.get("detail") == "full" else 0,
        )
        cats = b"".join(
            _CAT.pack(_CAT_INDEX[name], min(v["events"], U32), min(v["samples"], U32))
            for name, v in r["categories"].items()
        )
        routes = b"".join(_ROUTE.pack(sid(name), min(n, U32)) for name, n in r["routes"].items())
        stats: list[int | float] = []
        for name, n in r["stats"].items():
            stats += (sid(name), n)
        return b"".join(
            (
                HEAD.pack(*head_vals),
                b"\xc4", len(cats).to_bytes(1, "big"), cats,
                b"\xc5", len(routes).to_bytes(2, "big"), routes,
                self.pack(stats),
                self.pack(r.get("extra")),
            )
        )  # fmt: skip

    def table(self) -> dict[int, str]:
        return {i: s for s, i in self.ids.items()}

    def take_defs(self) -> bytes | None:
        if not self.pending:
            return None
        payload = self.pack(self.pending)
        self.pending = {}
        return payload


def decode_record(payload: bytes, table: dict[int, str]) -> dict[str, Any]:
    """An encoded record back into the schema dict (docs/journal.md)."""
    arr = msgpack.unpackb(payload, raw=False, strict_map_key=False)

    def s(i: int) -> str | None:
        return None if i == SID_NONE else table.get(i, "?")

    layers = s(arr[I_LAYERS]) or ""
    cats = {
        CATEGORIES[c] if c < len(CATEGORIES) else "other": {"events": ev, "samples": sa}
        for c, ev, sa in _CAT.iter_unpack(arr[I_CATS])
    }
    stats = arr[I_STATS]
    rec: dict[str, Any] = {
        "v": arr[I_V],
        "ts": float(arr[I_TS]),
        "app": s(arr[I_APP]),
        "endpoint": s(arr[I_ENDPOINT]),
        "host": s(arr[I_HOST]),
        "path": s(arr[I_PATH]),
        "method": s(arr[I_METHOD]),
        "kind": s(arr[I_KIND]),
        "action": s(arr[I_ACTION]),
        "mode": s(arr[I_MODE]),
        "categories": cats,
        "routes": {s(i): n for i, n in _ROUTE.iter_unpack(arr[I_ROUTES])},
        "size_in": arr[I_SIZE_IN],
        "size_out": arr[I_SIZE_OUT],
        "layers": layers.split(",") if layers else [],
        "reason": s(arr[I_REASON]) or "",
        "stats": {s(stats[j]): stats[j + 1] for j in range(0, len(stats) - 1, 2)},
    }
    if arr[I_DETAIL]:
        rec["detail"] = "full"
    if arr[I_SESSION] != SID_NONE:
        rec["session"] = s(arr[I_SESSION])
    if isinstance(arr[I_EXTRA], dict):
        rec.update({k: v for k, v in arr[I_EXTRA].items() if k not in rec})
    return rec


# -- reading ---------------------------------------------------------------------------------------


@dataclass
class FileInfo:
    """What a reader learnt about one journal file."""

    path: Path
    header: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    torn_bytes: int = 0  # bytes after the last good frame (a torn tail or corruption)
    valid: bool = True  # False when it is not a keyveil journal at all
    table: dict[int, str] = field(default_factory=dict)


def journal_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (their `*.kvj` files, not recursive) into a sorted list of files."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix == SUFFIX and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            logger.warning("journal: %s does not exist", p)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]


def _strict_frames(data: bytes | memoryview, off: int) -> tuple[list[bytes], int]:
    """Frame by frame from `off`; stops at the first frame that is torn or fails its checksum."""
    out: list[bytes] = []
    n = len(data)
    while off + 10 <= n:
        if data[off] != 0xC6:
            break
        length = int.from_bytes(data[off + 1 : off + 5], "big")
        end = off + 5 + length
        if length > MAX_FRAME or end + 5 > n or data[end] != 0xCE:
            break
        payload = bytes(data[off + 5 : end])
        if zlib.crc32(payload) != int.from_bytes(data[end + 1 : end + 5], "big"):
            break
        out.append(payload)
        off = end + 5
    return out, off


_MAP_FIRST = re.compile(rb"[\x80-\x8f\xde]")


def _bulk_check(objs: list[Any]) -> tuple[list[bytes], list[Any]] | None:
    """Split decoded outer objects into verified payloads and a carry (a payload awaiting its crc).
    None when anything is off: not (bytes, int) pairs, or a checksum that does not match."""
    k = len(objs) - (len(objs) % 2)
    payloads, crcs, carry = objs[0:k:2], objs[1:k:2], objs[k:]
    if carry and not isinstance(carry[0], bytes):
        return None
    try:
        if list(map(zlib.crc32, payloads)) != crcs:  # crc32 refuses anything but bytes in C
            return None
    except TypeError:
        return None
    return payloads, carry


def iter_file(
    path: str | Path, chunk_bytes: int = 8 * MiB, info: FileInfo | None = None
) -> Iterator[tuple[FileInfo, list[bytes]]]:
    """Yield (info, encoded record payloads) chunk by chunk; `info.table` grows as definitions arrive.

    The bulk path hands the stream to msgpack's C unpacker and checks every checksum with `zlib.crc32`
    in C; any anomaly (a torn or corrupt frame) switches to `_strict_frames` from the last good offset,
    which stops at the first bad frame. Pass `info` to learn about files that yield no record.
    """
    info = info if info is not None else FileInfo(Path(path))
    try:
        f = open(path, "rb")  # noqa: SIM115 - a generator: closed by the with below
    except OSError as e:
        logger.warning("journal: cannot read %s: %s", path, e.strerror)
        info.valid = False
        return
    first = True

    def emit(payloads: list[bytes]) -> list[bytes] | None:
        nonlocal first
        if first and payloads:
            first = False
            hdr = msgpack.unpackb(payloads[0], raw=False)
            if not isinstance(hdr, dict) or "format" not in hdr:
                return None
            info.header = hdr
            payloads = payloads[1:]
        if not payloads:
            return []
        # string definitions are map frames (first byte 0x80-0x8f or 0xde): take them out before the bulk
        # decode so that it yields record arrays only
        firsts = bytes(map(itemgetter(0), payloads))
        for i in reversed([m.start() for m in _MAP_FIRST.finditer(firsts)]):
            table = msgpack.unpackb(payloads.pop(i), raw=False, strict_map_key=False)
            if isinstance(table, dict):
                info.table.update(table)
        info.records += len(payloads)
        return payloads

    with f:
        head = f.read(len(MAGIC))
        if head != MAGIC:
            if head:  # an empty file is a writer that died before its header: nothing lost
                logger.warning("journal: %s is not a keyveil journal, skipped", path)
                info.valid = False
            return
        good = len(MAGIC)  # file offset just past the last verified frame
        unp = msgpack.Unpacker(raw=True, max_bin_len=MAX_FRAME, max_buffer_size=MAX_FRAME * 2 + chunk_bytes)
        carry: list[Any] = []
        while True:
            data = f.read(chunk_bytes)
            if not data:
                break
            unp.feed(data)
            try:
                checked = _bulk_check(carry + list(unp))
            except Exception:  # garbage the unpacker refuses
                checked = None
            if checked is None:
                f.seek(good)
                payloads, used = _strict_frames(f.read(), 0)
                good += used
                carry = []
            else:
                payloads, carry = checked
                good += sum(map(len, payloads)) + 10 * len(payloads)
            records = emit(payloads)
            if records is None:
                logger.warning("journal: %s has no valid header, skipped", path)
                info.valid = False
                return
            if records:
                yield info, records
            if checked is None:
                break
        info.torn_bytes = os.fstat(f.fileno()).st_size - good
        if info.torn_bytes:
            logger.info("journal: %s: %d bytes after the last complete record ignored", path, info.torn_bytes)


def scan_files(paths: Iterable[str | Path]) -> list[FileInfo]:
    """Read every file fully for its FileInfo (counts, torn tails), discarding the records."""
    infos: list[FileInfo] = []
    for p in journal_files(paths):
        info = FileInfo(p)
        for _ in iter_file(p, info=info):
            pass
        infos.append(info)
    return infos


def _file_records(path: Path, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
    ts_of = struct.Struct(">d").unpack_from
    for info, payloads in iter_file(path):
        for p in payloads:
            if len(p) < HEAD_LEN:
                continue
            ts = ts_of(p, 5)[0]
            if (since is not None and ts < since) or (until is not None and ts >= until):
                continue
            try:
                rec = decode_record(p, info.table)
            except (ValueError, TypeError, IndexError, KeyError, struct.error) as e:
                logger.debug("journal: %s: a record in an unknown layout skipped: %s", path, e)
                continue
            yield rec


def read_records(
    paths: str | Path | Iterable[str | Path] | None = None,
    since: float | None = None,
    until: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Every record of the given files and folders as one stream, merged in time order.

    `since` is inclusive, `until` exclusive (epoch seconds). A torn tail ends its file quietly.
    """
    if paths is None:
        paths = [default_journal_dir()]
    elif isinstance(paths, str | Path):
        paths = [paths]
    files = journal_files(paths)
    streams = [_file_records(p, since, until) for p in files]
    if len(streams) == 1:
        yield from streams[0]
    else:
        yield from heapq.merge(*streams, key=lambda r: r["ts"])


# -- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalStats:
    written: int  # records on disk
    failed: int  # records lost: queue full, unwritable or full disk, unencodable
    queued: int  # accepted, not yet written
    redacted_fields: int  # fields the redaction pass removed
    bytes: int  # bytes written by this writer
    files: int  # files this writer opened
    path: str | None  # the file being written


_STOP = object()


def _ensure_dir(d: Path) -> None:
    """Create `d` (and parents) with mode 0700. An existing folder is left as it is (it may be shared,
    like /tmp): a warning says so when others can read it; the files in it are 0600 anyway."""
    if d.is_dir():
        mode = d.stat().st_mode
        if mode & 0o077 and d not in _WARNED_DIRS:
            _WARNED_DIRS.add(d)
            logger.warning("journal: %s is readable by other users (mode %o); keyveil's files in it are 0600", d,
                           mode & 0o777)  # fmt: skip
        return
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask


_WARNED_DIRS: set[Path] = set()


class JournalWriter:
    """Appends records to `<dir>/<prefix>-<UTC time>-<pid>-<n>.kvj`, rotating by size.

    `path_or_dir`: a folder, or a file path ending in `.kvj` whose folder and stem are used (each
    writer starts its own file: files are never appended to after a restart, so a torn tail stays at
    the end of its file). `None` means `default_journal_dir()`.
    """

    def __init__(
        self,
        path_or_dir: str | Path | None = None,
        *,
        max_bytes: int = 16 * MiB,
        retention_days: float | None = 30.0,
        detail: str = "summary",
        queue_size: int = 65536,
        flush_interval: float = 1.0,
    ) -> None:
        if detail not in DETAILS:
            raise ValueError(f"detail must be one of {', '.join(DETAILS)}, not {detail!r}")
        p = Path(path_or_dir) if path_or_dir is not None else default_journal_dir()
        if p.suffix == SUFFIX:
            self.dir, self.prefix = p.parent, p.stem
        else:
            self.dir, self.prefix = p, "journal"
        self.max_bytes = max(int(max_bytes), 4096)
        self.retention_days = retention_days
        self.detail = detail
        self.flush_interval = flush_interval
        self.gather = min(0.2, flush_interval / 5)  # seconds a batch may gather before it is written
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._dropped = 0  # caller side: queue full or closed
        self._written = 0
        self._failed = 0
        self._redacted = 0
        self._bytes = 0
        self._files = 0
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._enc = Encoder()
        self._warned = False
        self._retry_at = 0.0
        self._dirty_since: float | None = None
        self._next_retention = 0.0
        self._seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="keyveil-journal", daemon=True)
        self._thread.start()

    # -- caller side (never raises, never blocks) --
    def write(self, record: dict[str, Any]) -> None:
        """Queue a record. The writer owns the dict from now on."""
        if self._closed:
            self._drop("journal closed")
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop("journal queue full")

    def _drop(self, why: str) -> None:
        with self._lock:
            self._dropped += 1
        self._warn_once(why)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record queued before this call is on disk (or failed). False on timeout."""
        if self._closed or not self._thread.is_alive():
            return False
        ev = threading.Event()
        try:
            self._queue.put(ev, timeout=timeout)
        except queue.Full:
            return False
        return ev.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> JournalStats:
        return JournalStats(
            written=self._written,
            failed=self._failed + self._dropped,
            queued=self._queue.qsize(),
            redacted_fields=self._redacted,
            bytes=self._bytes,
            files=self._files,
            path=str(self._path) if self._path else None,
        )

    @property
    def path(self) -> Path | None:
        return self._path

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "journal %s: %s; records are being dropped (see JournalWriter.stats)", self.dir, why
            )

    # -- background thread --
    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self.flush_interval)
                except queue.Empty:
                    item = None
                if type(item) is dict and self.gather > 0:
                    # let a burst arrive: one write (and one wake-up) per burst, not one per record
                    time.sleep(self.gather)
                batch: list[dict[str, Any]] = []
                events: list[threading.Event] = []
                stop = False
                while item is not None:
                    if item is _STOP:
                        stop = True
                        break
                    if isinstance(item, threading.Event):
                        events.append(item)
                        break  # honour the flush now: write what came before it
                    batch.append(item)
                    if len(batch) >= 4096:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                if batch:
                    self._write_batch(batch)
                self._housekeeping()
                for ev in events:
                    ev.set()
                if stop:
                    break
        except Exception:  # a bug here must not take the proxy down; count what is lost
            logger.exception("journal writer stopped")
        finally:
            self._close_file()
            self._closed = True
            while True:  # release waiters and count what will never be written
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, threading.Event):
                    item.set()
                elif isinstance(item, dict):
                    self._failed += 1

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._fd is not None and self._dirty_since is not None and now - self._dirty_since >= 1.0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            self._dirty_since = None
        if self.retention_days and now >= self._next_retention:
            self._next_retention = now + 3600
            self._apply_retention()

    def _apply_retention(self) -> None:
        assert self.retention_days
        cutoff = time.time() - self.retention_days * 86400
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            if not e.name.endswith(SUFFIX) or (self._path and e.path == str(self._path)):
                continue
            with contextlib.suppress(OSError):
                if e.is_file(follow_symlinks=False) and e.stat().st_mtime < cutoff:
                    os.unlink(e.path)
                    logger.info("journal: removed %s (older than %s days)", e.name, self.retention_days)

    def _open_file(self) -> bool:
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            _ensure_dir(self.dir)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            while True:
                self._seq += 1
                path = self.dir / f"{self.prefix}-{stamp}-{os.getpid()}-{self._seq:03d}{SUFFIX}"
                try:
                    fd = os.open(
                        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
                    )
                    break
                except FileExistsError:
                    continue
            try:
                os.fchmod(fd, 0o600)
                header = msgpack.packb(
                    {
                        "format": FORMAT_VERSION,
                        "schema": SCHEMA_VERSION,
                        "created": time.time(),
                        "pid": os.getpid(),
                        "detail": self.detail,
                    }  # fmt: skip
                )
                _write_all(fd, MAGIC + frame(header))
            except OSError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
        except OSError as e:
            self._retry_at = now + 5.0
            self._warn_once(f"cannot open a journal file: {e.strerror or e}")
            return False
        self._fd, self._path, self._size = fd, path, len(MAGIC) + 10 + len(header)
        self._enc = Encoder()
        self._files += 1
        self._bytes += self._size
        if self.retention_days:
            self._next_retention = 0.0  # a new file is a good moment to prune old ones
        return True

    def _close_file(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        self._dirty_since = None

    def _write_batch(self, batch: list[dict[str, Any]]) -> None:
        buf = bytearray()
        count = 0  # records encoded into buf
        for i, rec in enumerate(batch):
            if self._fd is None and not self._open_file():
                self._failed += len(batch) - i + count  # the rest of the batch, and what buf holds
                return
            try:
                clean, removed = redact(rec, self.detail)
                payload = self._enc.encode(clean)
                if len(payload) > MAX_FRAME:  # readers take a larger frame for damage: keep the schema part
                    removed += len(clean.pop("extra", None) or ())
                    payload = self._enc.encode(clean)
                    if len(payload) > MAX_FRAME:
                        raise ValueError(f"record of {len(payload)} bytes")
            except Exception as e:  # a record that cannot be encoded is counted, never raised
                self._failed += 1
                logger.debug("journal: unencodable record: %s", e)
                continue
            self._redacted += removed
            defs = self._enc.take_defs()
            if defs is not None:
                buf += frame(defs)
            buf += frame(payload)
            count += 1
            if self._size + len(buf) >= self.max_bytes or self._enc.full:
                self._flush_buf(buf, count)
                buf, count = bytearray(), 0
                self._close_file()  # rotate: the next record opens a new file
        if buf and self._fd is not None:
            self._flush_buf(buf, count)
        else:
            self._failed += count

    def _flush_buf(self, buf: bytearray, count: int) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, buf)
        except OSError as e:
            self._failed += count
            self._warn_once(f"write failed: {e.strerror or e}")
            # cut back to the last whole record, then give up this file: its string table now has
            # entries whose definitions may be gone. A new file is tried after a pause.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._close_file()
            self._retry_at = time.monotonic() + 5.0
            return
        self._size += len(buf)
        self._bytes += len(buf)
        self._written += count
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
