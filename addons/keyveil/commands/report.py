"""`keyveil report [PATH...]`: summarize the journal in the terminal or export it."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from keyveil.journal import CATEGORIES, default_journal_dir
from keyveil.report import FORMATS, format_for, render, report_from_paths, write_text

_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Epoch seconds from `1733300000`, `2024-12-04`, `2024-12-04T10:00[:00][Z|+01:00]` (naive means
    UTC) or a duration back from now: `90m`, `24h`, `7d`, `2w`."""
    text = text.strip()
    now = time.time() if now is None else now
    m = _REL.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    if re.fullmatch(r"\d{9,11}(\.\d+)?", text):
        return float(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use 2024-12-04, 2024-12-04T10:00, epoch seconds or 24h / 7d"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _categories(text: str) -> list[str]:
    cats = _list(text)
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown category {', '.join(bad)}; known: {', '.join(CATEGORIES)}")
    return cats


def add_filter_args(p: argparse.ArgumentParser) -> None:
    """--since, --until, --app, --category, --journal-detail (shared with `keyveil scan`)."""
    p.add_argument(
        "--since", type=parse_time, metavar="TIME", help="from TIME (inclusive): date, epoch or 24h/7d"
    )
    p.add_argument("--until", type=parse_time, metavar="TIME", help="up to TIME (exclusive)")
    p.add_argument(
        "--app",
        type=_list,
        action="extend",
        default=[],
        metavar="APP",
        help="only these apps (repeat or comma-separate)",
    )
    p.add_argument(
        "--category",
        type=_categories,
        action="extend",
        default=[],
        metavar="CAT",
        help="only flows that carried these categories: " + ", ".join(CATEGORIES),
    )
    p.add_argument(
        "--journal-detail",
        choices=("any", "summary", "full"),
        default="any",
        help="only records journaled at this detail level (the report always says when any were 'full')",
    )


def filters_of(args: argparse.Namespace) -> dict:
    return {
        "since": args.since,
        "until": args.until,
        "apps": args.app or None,
        "categories": args.category or None,
        "detail": None if args.journal_detail == "any" else args.journal_detail,
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="summarize the journal (terminal, JSON, CSV, Markdown or a self-contained HTML page)",
        description="Summarize what Meta's apps tried to collect and what keyveil did about it. "
        "Times are UTC.",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help=f"journal files or folders (default: {default_journal_dir()})",
    )
    p.add_argument("--format", "-f", choices=FORMATS, default=None, help="default: text, or from -o's suffix")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    add_filter_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fmt = format_for(args.output, args.format)
    paths = [Path(p) for p in args.paths] or [default_journal_dir()]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"keyveil report: no journal at {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    report = report_from_paths(paths, with_rows=fmt == "csv", **filters_of(args))
    text = render(report, fmt)
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return 0
    out = write_text(text, args.output)
    print(f"keyveil report: wrote {out} ({fmt}, {report.summary['flows']:,} flows)", file=sys.stderr)
    return 0
