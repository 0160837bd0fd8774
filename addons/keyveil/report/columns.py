"""Journal records as numpy column arrays: built once, then every aggregate is a vectorized group-by.

Reading a journal never builds a Python object per record beyond the payload bytes the C unpacker
hands over: encoded records (see `keyveil.journal.Encoder`) have a fixed-layout head, so each column is
one numpy gather at a fixed offset from every record's start, and the categories and routes are packed
binary tables gathered the same way. Strings are ids into one table shared by all files
(`Columns.strings`, id 0 is None).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from keyveil import journal as J

# string columns the reports group by: name -> index among journal.STR_FIELDS (path, method, layers,
# reason and session are not reported on, so they are not extracted)
_STR_COLS = {name: J.STR_FIELDS.index(name) for name in ("app", "endpoint", "host", "kind", "action", "mode")}
_UNKNOWN = "?"


@dataclass
class Columns:
    """One row per record; `cat_*` and `route_*` are exploded tables pointing at rows."""

    strings: list[str | None]
    index: dict[str | None, int]
    ts: np.ndarray  # float64 epoch seconds
    str_cols: dict[str, np.ndarray]  # int32 ids into `strings`
    size_in: np.ndarray
    size_out: np.ndarray
    detail: np.ndarray  # uint8, 1 = written with journal detail "full"
    cat_row: np.ndarray  # int32 row
    cat_id: np.ndarray  # int8 index into journal.CATEGORIES
    cat_events: np.ndarray
    cat_samples: np.ndarray
    route_row: np.ndarray
    route_id: np.ndarray  # ids into `strings`
    route_count: np.ndarray
    files: list[J.FileInfo] = field(default_factory=list)
    skipped: int = 0  # records with a layout this reader does not know (a newer writer, or damage)

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["str_cols"][name]
        except KeyError:
            raise AttributeError(name) from None

    def ids_of(self, names: Iterable[str | None]) -> np.ndarray:
        return np.array([self.index[n] for n in names if n in self.index], dtype=np.int64)

    def select(self, mask: np.ndarray) -> Columns:
        """The rows where `mask` is true, with the exploded tables renumbered."""
        if mask.all():
            return self
        newpos = np.cumsum(mask) - 1
        ck = mask[self.cat_row]
        rk = mask[self.route_row]
        return Columns(
            strings=self.strings,
            index=self.index,
            ts=self.ts[mask],
            str_cols={k: v[mask] for k, v in self.str_cols.items()},
            size_in=self.size_in[mask],
            size_out=self.size_out[mask],
            detail=self.detail[mask],
            cat_row=newpos[self.cat_row[ck]],
            cat_id=self.cat_id[ck],
            cat_events=self.cat_events[ck],
            cat_samples=self.cat_samples[ck],
            route_row=newpos[self.route_row[rk]],
            route_id=self.route_id[rk],
            route_count=self.route_count[rk],
            files=self.files,
            skipped=self.skipped,
        )


class ColumnBuilder:
    """Accumulates chunks of encoded records into column arrays."""

    def __init__(self) -> None:
        self.strings: list[str | None] = [None]
        self.index: dict[str | None, int] = {None: 0}
        self.n = 0
        self.parts: dict[str, list[np.ndarray]] = {}
        self.files: list[J.FileInfo] = []
        self._remap_cache: tuple[int, int, np.ndarray] | None = None
        self.skipped = 0  # records whose layout this reader does not know

    def gid(self, s: str | None) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.strings)
            self.strings.append(s)
        return i

    def _remap(self, table: dict[int, str]) -> np.ndarray:
        """Per-file string id -> global id (0xffff, null, lands on 0; unknown ids on "?")."""
        key = (id(table), len(table))
        if self._remap_cache is not None and self._remap_cache[:2] == key:
            return self._remap_cache[2]
        remap = np.full(J.SID_NONE + 1, self.gid(_UNKNOWN), dtype=np.int32)
        remap[J.SID_NONE] = 0
        for sid, s in table.items():
            if 0 <= sid < J.SID_NONE:
                remap[sid] = self.gid(s)
        self._remap_cache = (key[0], key[1], remap)
        return remap

    def _put(self, name: str, arr: np.ndarray) -> None:
        self.parts.setdefault(name, []).append(arr)

    def add_chunk(self, table: dict[int, str], payloads: list[bytes]) -> None:
        """Encoded records (journal.Encoder) -> columns, without decoding them one by one: the heads
        have a fixed layout, so they stack into one structured numpy array; the categories and routes
        tables are gathered from the joined payloads with computed offsets."""
        if not payloads:
            return
        lens = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        short = lens < _MIN_LEN
        if short.any():  # cannot be ours: skip them, say so
            self.skipped += int(short.sum())
            payloads = [p for p, bad in zip(payloads, short.tolist(), strict=True) if not bad]
            lens = lens[~short]
        heads = np.frombuffer(b"".join(map(_HEAD_SLICE, payloads)), dtype=_HEAD_DTYPE)
        raw = heads.view(np.uint8).reshape(-1, _HEAD_DTYPE.itemsize)
        ok = (raw[:, _MARK_OFFS] == _MARK_VALS).all(axis=1)
        buf = np.frombuffer(b"".join(payloads) + bytes(64), dtype=np.uint8)  # padding keeps gathers in bounds
        starts = np.cumsum(lens) - lens
        clen = heads["clen"].astype(np.int64)
        rpos = np.minimum(starts + 59 + clen, buf.size - 3)
        rlen = buf[rpos + 1].astype(np.int64) * 256 + buf[rpos + 2]
        ok &= (clen % 9 == 0) & (buf[rpos] == 0xC5) & (rlen % 6 == 0) & (59 + clen + 3 + rlen + 2 <= lens)
        if not ok.all():  # not written by this encoder (a future version, or a bug): skip, say so
            self.skipped += int((~ok).sum())
            heads, starts, clen, rpos, rlen = heads[ok], starts[ok], clen[ok], rpos[ok], rlen[ok]
        n = int(heads.shape[0])
        if not n:
            return
        remap = self._remap(table)
        self._put("ts", heads["ts"].astype(np.float64))
        for name in _STR_COLS:
            self._put(name, remap[heads[name]])
        self._put("size_in", heads["size_in"].astype(np.int64))
        self._put("size_out", heads["size_out"].astype(np.int64))
        self._put("detail", heads["detail"].copy())
        rows = np.arange(self.n, self.n + n, dtype=np.int32)

        cats = _gather(buf, starts + 59, clen).view(_CAT_DTYPE)
        self._put("cat_row", np.repeat(rows, clen // 9))
        self._put("cat_id", np.minimum(cats["cat"], len(J.CATEGORIES) - 1).astype(np.int8))
        self._put("cat_events", cats["events"].astype(np.int64))
        self._put("cat_samples", cats["samples"].astype(np.int64))

        routes = _gather(buf, rpos + 3, rlen).view(_ROUTE_DTYPE)
        self._put("route_row", np.repeat(rows, rlen // 6))
        self._put("route_id", remap[routes["sid"]])
        self._put("route_count", routes["count"].astype(np.int64))
        self.n += n

    def add_paths(self, paths: Iterable[str | Path]) -> None:
        for p in J.journal_files(paths):
            info = J.FileInfo(p)
            for _, payloads in J.iter_file(p, info=info):
                self.add_chunk(info.table, payloads)
            self.files.append(info)

    def add_records(self, records: Iterable[dict[str, Any]], chunk: int = 50_000) -> None:
        """Records as dicts (from the pipeline, or `journal.read_records`): normalized by the journal's
        redaction in full mode (types checked) keeping their own `ts` and `detail`, then encoded as the
        journal would, so that they take the same column path as files."""
        enc = J.Encoder()
        buf: list[bytes] = []
        for rec in records:
            clean, _ = J.redact(rec, "full")
            if isinstance(rec.get("ts"), int | float):
                clean["ts"] = float(rec["ts"])
            if rec.get("detail") != "full":
                clean.pop("detail", None)
            clean.pop("extra", None)
            buf.append(enc.encode(clean))
            if len(buf) >= chunk or enc.full:
                self.add_chunk(enc.table(), buf)
                buf = []
                if enc.full:
                    enc = J.Encoder()
        if buf:
            self.add_chunk(enc.table(), buf)

    def finish(self) -> Columns:
        def cat(name: str, dtype: Any) -> np.ndarray:
            parts = self.parts.pop(name, None)  # freed column by column: peak memory is one column more
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

        return Columns(
            strings=self.strings,
            index=self.index,
            ts=cat("ts", np.float64),
            str_cols={name: cat(name, np.int32) for name in _STR_COLS},
            size_in=cat("size_in", np.int64),
            size_out=cat("size_out", np.int64),
            detail=cat("detail", np.uint8),
            cat_row=cat("cat_row", np.int32),
            cat_id=cat("cat_id", np.int8),
            cat_events=cat("cat_events", np.int32),
            cat_samples=cat("cat_samples", np.int32),
            route_row=cat("route_row", np.int32),
            route_id=cat("route_id", np.int32),
            route_count=cat("route_count", np.int32),
            files=self.files,
            skipped=self.skipped,
        )


def _gather(buf: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The concatenation of buf[starts[i] : starts[i] + lens[i]] for all i, in one fancy index."""
    total = int(lens.sum())
    if not total:
        return buf[:0]
    ends = np.cumsum(lens)
    idx = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lens), lens)
    return buf[idx]


# The fixed head of an encoded record (journal.Encoder), plus the categories' bin8 marker and length.
_HEAD_DTYPE = np.dtype(
    {
        "names": ["ts", *J.STR_FIELDS, "size_in", "size_out", "detail", "clen"],
        "formats": [">f8"] + [">u2"] * len(J.STR_FIELDS) + [">u4", ">u4", "u1", "u1"],
        "offsets": [5] + [14 + 3 * k for k in range(len(J.STR_FIELDS))] + [47, 52, 56, 58],
        "itemsize": 59,
    }
)
_HEAD_SLICE = itemgetter(slice(0, 59))
_MIN_LEN = 59 + 3 + 2  # head, the routes bin16 header, empty stats and a nil
_CAT_DTYPE = np.dtype(
    {
        "names": ["cat", "events", "samples"],
        "formats": ["u1", ">u4", ">u4"],
        "offsets": [0, 1, 5],
        "itemsize": 9,
    }
)
_ROUTE_DTYPE = np.dtype(
    {"names": ["sid", "count"], "formats": [">u2", ">u4"], "offsets": [0, 2], "itemsize": 6}
)
# marker bytes every head carries at fixed offsets
_MARKS = [(0, 0xDC), (1, 0), (2, J.RECORD_LEN), (4, 0xCB)]
_MARKS += [(13 + 3 * k, 0xCD) for k in range(len(J.STR_FIELDS))]
_MARKS += [(46, 0xCE), (51, 0xCE), (57, 0xC4)]
_MARK_OFFS = np.array([o for o, _ in _MARKS])
_MARK_VALS = np.array([v for _, v in _MARKS], dtype=np.uint8)


def columns_from_paths(paths: Iterable[str | Path]) -> Columns:
    b = ColumnBuilder()
    b.add_paths(paths)
    return b.finish()


def columns_from_records(records: Iterable[dict[str, Any]]) -> Columns:
    b = ColumnBuilder()
    b.add_records(records)
    return b.finish()
