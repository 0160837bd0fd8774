"""`keyveil scan FILE...`: run the proxy's detection over a browser HAR export or a mitmproxy flow
file (`.mitm`), offline, and print the same reports as `keyveil report`. Nothing is sent anywhere."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from keyveil.commands.report import add_filter_args, filters_of
from keyveil.config import default_config_dir
from keyveil.report import FORMATS, format_for, render, report_from_records, write_text


@dataclass
class HttpItem:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes  # as sent: content-encoded when `content-encoding` says so
    ts: float | None


@dataclass
class WsItem:
    url: str  # the handshake's URL
    content: bytes
    is_text: bool
    ts: float | None


def _headers(pairs: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in pairs or ():
        name, value = str(h.get("name", "")).lower(), str(h.get("value", ""))
        if name and not name.startswith(":"):  # HTTP/2 pseudo headers are not headers
            out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _har_time(v: Any) -> float | None:
    if not isinstance(v, str):
        return None
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def iter_har(path: Path) -> Iterator[HttpItem | WsItem]:
    """Requests of a HAR 1.2 file (Chromium and Firefox exports), and Chromium's WebSocket messages."""
    data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    for e in data.get("log", {}).get("entries", []):
        req = e.get("request") or {}
        url = req.get("url") or ""
        ts = _har_time(e.get("startedDateTime"))
        post = req.get("postData") or {}
        text = post.get("text") or ""
        body = base64.b64decode(text) if post.get("encoding") == "base64" else text.encode("utf-8")
        if not body and post.get("params"):  # Firefox may give a form's fields only
            body = urlencode(
                [(str(p.get("name", "")), str(p.get("value", ""))) for p in post["params"]]
            ).encode()
        headers = _headers(req.get("headers"))
        if post.get("mimeType") and "content-type" not in headers:
            headers["content-type"] = post["mimeType"]
        # HAR keeps the decoded text: the encoding header would lie about it
        headers.pop("content-encoding", None)
        yield HttpItem(str(req.get("method") or "GET"), url, headers, body, ts)
        for m in e.get("_webSocketMessages") or ():
            if m.get("type") != "send":
                continue
            is_text = m.get("opcode", 1) == 1
            payload = str(m.get("data") or "")
            content = payload.encode("utf-8") if is_text else base64.b64decode(payload)
            yield WsItem(url, content, is_text, m.get("time"))


def iter_mitm(path: Path) -> Iterator[HttpItem | WsItem]:
    """Requests (and client WebSocket messages) of a mitmproxy flow file."""
    from mitmproxy import http, io

    with open(path, "rb") as f:
        for flow in io.FlowReader(f).stream():
            if not isinstance(flow, http.HTTPFlow):
                continue
            r = flow.request
            headers = {k.lower(): v for k, v in r.headers.items()}
            yield HttpItem(r.method, r.pretty_url, headers, r.raw_content or b"", r.timestamp_start)
            if flow.websocket is not None:
                for m in flow.websocket.messages:
                    if m.from_client:
                        yield WsItem(r.pretty_url, m.content, m.is_text, m.timestamp)


def iter_items(path: Path) -> Iterator[HttpItem | WsItem]:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if path.suffix.lower() == ".har" or head.startswith(b"{"):
        return iter_har(path)
    return iter_mitm(path)


@dataclass
class ScanStats:
    requests: int = 0
    meta: int = 0
    ws_messages: int = 0


def scan(
    paths: list[Path], config_dir: Path | None = None, stats: ScanStats | None = None
) -> list[dict[str, Any]]:
    """Journal records for every Meta request and WebSocket message in the files, as the proxy would
    have written them (the pipeline decides; nothing is changed or sent)."""
    from keyveil import websocket
    from keyveil.codecs import DecodeError, LimitError
    from keyveil.codecs.compress import decode_content
    from keyveil.pipeline import Pipeline, Request

    pipeline = Pipeline.from_config_dir(config_dir or default_config_dir())
    stats = stats if stats is not None else ScanStats()
    records: list[dict[str, Any]] = []
    for path in paths:
        for item in iter_items(path):
            try:
                parts = urlsplit(item.url)
                host = (parts.hostname or "").lower()
            except ValueError:
                continue
            if isinstance(item, WsItem):
                match = pipeline.match(host, parts.path or "/", "GET")
                if not websocket.is_ws_match(match):
                    continue
                stats.ws_messages += 1
                assert match is not None
                ws = websocket.inspect_message(
                    pipeline, match, host, parts.path or "/", item.content,
                    is_text=item.is_text, from_client=True, ts=item.ts,
                )  # fmt: skip
                if ws.record is not None:
                    records.append(ws.record)
                continue
            stats.requests += 1
            match = pipeline.match(host, parts.path or "/", item.method)
            if match is None:
                continue
            stats.meta += 1
            req = Request(item.method, item.url, item.headers, item.body, item.ts)
            coding = item.headers.get("content-encoding", "")
            if coding and item.body:
                try:
                    req.body = decode_content(item.body, coding, pipeline.limits)
                except LimitError as e:
                    out = pipeline.refuse(req, match, e)
                    if out.record is not None:
                        records.append(out.record)
                    continue
                except DecodeError:
                    pass  # as the proxy does: the pipeline sees the raw bytes
            out = pipeline.process(req, match)
            if out.record is not None:
                records.append(out.record)
    return records


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "scan",
        help="run the detection over a HAR export or a mitmproxy .mitm file, offline",
        description="Find Meta's behavioral telemetry in a browser HAR export or a mitmproxy flow file "
        "and report what keyveil would have done, without a proxy.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="HAR (.har) or mitmproxy flow (.mitm) files")
    p.add_argument("--format", "-f", choices=FORMATS, default=None, help="default: text, or from -o's suffix")
    p.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    p.add_argument(
        "--config", type=Path, metavar="DIR", help=f"config folder (default: {default_config_dir()})"
    )
    p.add_argument("--journal", type=Path, metavar="DIR", help="also append the records to a journal folder")
    add_filter_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fmt = format_for(args.output, args.format)
    paths = [Path(f) for f in args.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"keyveil scan: no such file: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    stats = ScanStats()
    try:
        records = scan(paths, args.config, stats)
    except (OSError, ValueError) as e:  # unreadable, not JSON, not a flow file
        print(f"keyveil scan: cannot read input: {e}", file=sys.stderr)
        return 1
    if args.journal:
        from keyveil.journal import JournalWriter

        with JournalWriter(args.journal) as w:
            for r in records:
                w.write(dict(r))
    report = report_from_records(records, with_rows=fmt == "csv", **filters_of(args))
    text = render(report, fmt)
    print(
        f"keyveil scan: {stats.requests} requests, {stats.meta} to Meta, {stats.ws_messages} WebSocket "
        f"messages on Meta sockets, {len(records)} decisions",
        file=sys.stderr,
    )
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return 0
    out = write_text(text, args.output)
    print(f"keyveil scan: wrote {out} ({fmt})", file=sys.stderr)
    return 0
