"""Journal records as numpy column arrays: built once, then every aggregate is a vectorized group-by.

Reading a journal never builds a dict per record: the encoded record arrays of a file chunk (see
`keyveil.journal.Encoder`) are sliced into columns with `map(itemgetter)` + `np.fromiter`, which run
in C. Strings are ids into one table shared by all files (`Columns.strings`, id 0 is None).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from keyveil import journal as J

# string columns the reports group by: name -> position in the encoded record (path, method, layers and
# reason are not reported on, so they are not extracted)
_STR_COLS = {
    "app": J.I_APP,
    "endpoint": J.I_ENDPOINT,
    "host": J.I_HOST,
    "kind": J.I_KIND,
    "action": J.I_ACTION,
    "mode": J.I_MODE,
}
# all the int fields taken in one pass: the string ids, then size_in, size_out, detail
_INT_FIELDS = (*_STR_COLS.values(), J.I_SIZE_IN, J.I_SIZE_OUT, J.I_DETAIL)
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

    def gid(self, s: str | None) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.strings)
            self.strings.append(s)
        return i

    def _remap(self, table: dict[int, str]) -> np.ndarray:
        """Per-file string id -> global id, shifted by one so that -1 (None) lands on 0."""
        key = (id(table), len(table))
        if self._remap_cache is not None and self._remap_cache[:2] == key:
            return self._remap_cache[2]
        size = (max(table) + 2) if table else 1
        remap = np.full(size + 1, self.gid(_UNKNOWN), dtype=np.int32)  # last slot: ids beyond the table
        remap[0] = 0
        for sid, s in table.items():
            remap[sid + 1] = self.gid(s)
        self._remap_cache = (key[0], key[1], remap)
        return remap

    def _put(self, name: str, arr: np.ndarray) -> None:
        self.parts.setdefault(name, []).append(arr)

    def add_chunk(self, table: dict[int, str], arrs: list[list[Any]]) -> None:
        n = len(arrs)
        if not n:
            return
        remap = self._remap(table)
        top = remap.shape[0] - 1

        ints = np.fromiter(
            itertools.chain.from_iterable(map(itemgetter(*_INT_FIELDS), arrs)),
            dtype=np.int64,
            count=n * len(_INT_FIELDS),
        ).reshape(n, len(_INT_FIELDS))
        self._put("ts", np.fromiter(map(itemgetter(J.I_TS), arrs), dtype=np.float64, count=n))
        for k, name in enumerate(_STR_COLS):
            self._put(name, remap[np.clip(ints[:, k] + 1, 0, top)])
        k = len(_STR_COLS)
        self._put("size_in", ints[:, k].copy())
        self._put("size_out", ints[:, k + 1].copy())
        self._put("detail", ints[:, k + 2].astype(np.uint8))
        del ints
        rows = np.arange(self.n, self.n + n, dtype=np.int32)

        cats = list(map(itemgetter(J.I_CATS), arrs))
        lens = np.fromiter(map(len, cats), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(cats), dtype=np.int64, count=int(lens.sum()))
        triples = flat.reshape(-1, 3)
        self._put("cat_row", np.repeat(rows, lens // 3))
        self._put("cat_id", np.clip(triples[:, 0], 0, len(J.CATEGORIES) - 1).astype(np.int8))
        self._put("cat_events", triples[:, 1].astype(np.int32))
        self._put("cat_samples", triples[:, 2].astype(np.int32))

        routes = list(map(itemgetter(J.I_ROUTES), arrs))
        lens = np.fromiter(map(len, routes), dtype=np.int64, count=n)
        flat = np.fromiter(itertools.chain.from_iterable(routes), dtype=np.int64, count=int(lens.sum()))
        pairs = flat.reshape(-1, 2)
        self._put("route_row", np.repeat(rows, lens // 2))
        self._put("route_id", remap[np.clip(pairs[:, 0] + 1, 0, top)])
        self._put("route_count", pairs[:, 1].astype(np.int32))
        self.n += n

    def add_paths(self, paths: Iterable[str | Path]) -> None:
        for p in J.journal_files(paths):
            info = J.FileInfo(p)
            for _, arrs in J.iter_file(p, info=info):
                self.add_chunk(info.table, arrs)
            self.files.append(info)

    def add_records(self, records: Iterable[dict[str, Any]], chunk: int = 50_000) -> None:
        """Records as dicts (from the pipeline, or `journal.read_records`). They are normalized by the
        journal's redaction in full mode (types checked), keeping their own `detail`."""
        enc = J.Encoder()
        buf: list[list[Any]] = []
        for rec in records:
            clean, _ = J.redact(rec, "full")
            clean["ts"] = float(rec["ts"]) if isinstance(rec.get("ts"), int | float) else clean["ts"]
            if rec.get("detail") != "full":
                clean.pop("detail", None)
            clean.pop("extra", None)
            buf.append(enc.array(clean))
            if len(buf) >= chunk:
                self.add_chunk({i: s for s, i in enc.ids.items()}, buf)
                buf = []
        if buf:
            self.add_chunk({i: s for s, i in enc.ids.items()}, buf)

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
        )


def columns_from_paths(paths: Iterable[str | Path]) -> Columns:
    b = ColumnBuilder()
    b.add_paths(paths)
    return b.finish()


def columns_from_records(records: Iterable[dict[str, Any]]) -> Columns:
    b = ColumnBuilder()
    b.add_records(records)
    return b.finish()
