"""Reports over the journal: aggregation (numpy) and renderings (text, JSON, CSV, Markdown, HTML).

Entry points:
- `report_from_paths(paths, ...)`: journal files/folders -> `Report` (the fast path of `keyveil report`).
- `report_from_records(records, ...)`: record dicts -> `Report`.
- `render(report, fmt)` and `write_report(records, fmt, path)`.
- `LiveSummary`: O(1) per record, for the live page at http://keyveil/ .
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from keyveil.journal import CATEGORIES
from keyveil.report.aggregate import (
    REPORT_SCHEMA,
    UNCATALOGED,
    AppTally,
    EndpointTally,
    Report,
    Tallies,
    assemble,
    build_report,
)
from keyveil.report.columns import ColumnBuilder

FORMATS = ("text", "json", "csv", "md", "html")
_SUFFIXES = {".json": "json", ".csv": "csv", ".md": "md", ".html": "html", ".htm": "html", ".txt": "text"}


def format_for(path: str | Path | None, fmt: str | None = None) -> str:
    """The report format: `fmt` when given, else from the output file's suffix, else text."""
    if fmt:
        return fmt
    return _SUFFIXES.get(Path(path).suffix.lower(), "text") if path else "text"

__all__ = [
    "FORMATS",
    "format_for",
    "REPORT_SCHEMA",
    "LiveSummary",
    "Report",
    "render",
    "report_from_paths",
    "report_from_records",
    "write_report",
    "write_text",
]


def report_from_paths(paths: Iterable[str | Path], *, with_rows: bool = False, **filters: Any) -> Report:
    """Read journal files/folders into columns, filter and aggregate. Filters: since, until (epoch s),
    apps, categories (lists), detail ("summary", "full" or None)."""
    b = ColumnBuilder()
    enabled = gc.isenabled()
    gc.disable()  # millions of short-lived containers: the cycle collector only costs time here
    try:
        b.add_paths(paths)
        cols = b.finish()
    finally:
        if enabled:
            gc.enable()
    return build_report(cols, with_rows=with_rows, **filters)


def report_from_records(
    records: Iterable[dict[str, Any]], *, with_rows: bool = False, **filters: Any
) -> Report:
    b = ColumnBuilder()
    b.add_records(records)
    return build_report(b.finish(), with_rows=with_rows, **filters)


def render(report: Report, fmt: str) -> str:
    from keyveil.report import render_text

    if fmt == "text":
        return render_text.render_text(report)
    if fmt == "json":
        return render_text.render_json(report)
    if fmt == "csv":
        return render_text.render_csv(report)
    if fmt == "md":
        return render_text.render_md(report)
    if fmt == "html":
        from keyveil.report.html import render_html

        return render_html(report)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def write_report(records: Iterable[dict[str, Any]] | str | Path, fmt: str, path: str | Path) -> Path:
    """Aggregate and write the report in `fmt` to `path` (written whole, then renamed).

    `records`: record dicts, or a journal file or folder (`str` or `Path`), which takes the fast column
    path of `keyveil report` instead of building a dict per record."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if isinstance(records, str | Path):
        report = report_from_paths([records], with_rows=fmt == "csv")
    else:
        report = report_from_records(records, with_rows=fmt == "csv")
    return write_text(render(report, fmt), path)


def write_text(text: str, path: str | Path) -> Path:
    """Write a whole report file: to a temporary name beside it, then renamed, so a reader never
    sees half a report."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _num(v: Any) -> int:
    return (
        int(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 else 0
    )


class LiveSummary:
    """Running tallies for the live page. `add` is O(1) per record (bounded work, no history kept)."""

    MAX_KEYS = 2000  # distinct hosts / routes / endpoints kept; the rest are folded into "(more)"

    def __init__(self, keep_hours: int = 72, refresh: int = 5) -> None:
        self.t = Tallies()
        self.keep_hours = keep_hours
        self.refresh = refresh
        self.started = time.time()

    def _key(self, counter: dict[str, Any], key: str) -> str:
        return key if key in counter or len(counter) < self.MAX_KEYS else "(more)"

    def add(self, record: dict[str, Any]) -> None:
        """Count one record. Never raises: a malformed field counts as zero or unknown."""
        try:
            self._add(record)
        except Exception:  # the live page must never take a proxy hook down
            logging.getLogger(__name__).debug("live summary: record skipped", exc_info=True)

    def _add(self, record: dict[str, Any]) -> None:
        t = self.t
        ts = record.get("ts")
        ts = float(ts) if isinstance(ts, int | float) and math.isfinite(ts) else time.time()
        action = str(record.get("action") or "passed")
        app = str(record.get("app") or "unknown")
        ep = record.get("endpoint")
        ep = str(ep) if ep else UNCATALOGED
        t.flows += 1
        t.ts_min = ts if t.ts_min is None else min(t.ts_min, ts)
        t.ts_max = ts if t.ts_max is None else max(t.ts_max, ts)
        if record.get("detail") == "full":
            t.full_records += 1
        t.actions[action] += 1
        t.modes[str(record.get("mode") or "enforce")] += 1
        t.kinds[str(record.get("kind") or "uncataloged")] += 1
        a = t.apps.setdefault(self._key(t.apps, app), AppTally())
        a.flows += 1
        a.actions[action] += 1
        e = t.endpoints.setdefault(self._key(t.endpoints, ep), EndpointTally())
        e.flows += 1
        e.actions[action] += 1
        e.apps[app] += 1
        cats = record.get("categories")
        if isinstance(cats, dict):
            for name, v in cats.items():
                name = name if name in CATEGORIES else "other"
                ev = _num(v.get("events")) if isinstance(v, dict) else _num(v)
                sa = _num(v.get("samples")) if isinstance(v, dict) else 0
                t.cat_events[name] += ev
                t.cat_samples[name] += sa
                t.cat_flows[name] += 1
                a.categories[name] += ev
                e.events += ev
        host = str(record.get("host") or "")
        t.hosts[self._key(t.hosts, host)] += 1
        routes = record.get("routes")
        if isinstance(routes, dict):
            for name, n in list(routes.items())[:64]:
                t.routes[self._key(t.routes, str(name))] += _num(n)
        hour = int(ts // 3600) * 3600
        ctr = t.hours.get(hour)
        if ctr is None:
            ctr = t.hours[hour] = Counter()
            if len(t.hours) > self.keep_hours:
                del t.hours[min(t.hours)]  # a bounded dict: O(keep_hours) once an hour
        ctr[action] += 1
        t.hour_of_day[(hour // 3600) % 24] += 1
        t.bytes_in += _num(record.get("size_in"))
        t.bytes_out += _num(record.get("size_out"))

    def summary(self) -> dict[str, Any]:
        filters = {"since": None, "until": None, "apps": [], "categories": [], "detail": "any", "live": True}
        return assemble(self.t, filters=filters, journal={"files": 0, "torn_bytes": 0})

    def render_html(self) -> bytes:
        from keyveil.report.html import render_html

        return render_html(Report(self.summary()), refresh=self.refresh, live=True).encode("utf-8")
