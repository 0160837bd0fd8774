"""The mitmproxy addon: a thin adapter between mitmproxy's hooks and keyveil's pipeline.

Load it with `mitmdump -s addons/keyveil_addon.py` or through `keyveil run`. Every option is a
`--set keyveil_*=...` option; `mitmdump --options` lists them with their help.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import time
from pathlib import Path

from mitmproxy import command, ctx, exceptions, http, tls
from mitmproxy import types as mtypes

from keyveil.apply import Rewriter
from keyveil.catalog import ConfigError
from keyveil.codecs import DecodeError, LimitError, Limits
from keyveil.codecs.compress import decode_content
from keyveil.config import default_config_dir
from keyveil.journal import default_journal_dir
from keyveil.pipeline import Outcome, Pipeline, Request

log = logging.getLogger("keyveil")

LIVE_HOST = "keyveil"  # http://keyveil/ through the proxy shows the live summary
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are decoded in a worker thread
# While that thread runs, the event loop waits for the GIL at every wake-up. Python's default switch
# interval (5 ms) made a concurrent small request ~10-20 ms slower; 0.5 ms keeps it to ~1-2 ms
# (tests/test_event_loop.py, benchmarks/README.md).
GIL_SWITCH_INTERVAL = 0.0005
REWRITE_OPTIONS = ("keyveil_rewrite_mode", "keyveil_rewrite_strength", "keyveil_rewrite_max_delay_ms",
                   "keyveil_rewrite_grid_ms", "keyveil_rewrite_seed_scope")
LIMIT_OPTIONS = (
    "keyveil_max_body", "keyveil_max_decompressed", "keyveil_max_ratio", "keyveil_max_depth",
    "keyveil_max_nodes", "keyveil_time_budget_ms",
)


class Keyveil:
    def __init__(self) -> None:
        self.pipeline: Pipeline | None = None
        self.journal = None
        self.live = _live_summary()
        self.counts: dict[str, int] = {}
        self._journal_path: str | None = None
        self._pipeline_key: tuple = ()
        self._session_seed = secrets.token_bytes(32)

    # -- options -------------------------------------------------------------------------------
    def load(self, loader) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        loader.add_option(
            "keyveil_config", str, str(default_config_dir()),
            "Folder with keyveil's endpoints.toml, detection.toml and policy.toml.",
        )
        loader.add_option(
            "keyveil_mode", str, "",
            "enforce: drop, strip or rewrite as the policy says. audit: change nothing and journal what "
            "would have happened. Empty: the mode written in policy.toml.",
        )
        loader.add_option(
            "keyveil_log", str, str(default_journal_dir()),
            "The journal: a folder (rotated files) or a file path. Empty disables journaling.",
        )
        loader.add_option(
            "keyveil_journal_detail", str, "summary",
            "summary: counts, categories and coarse statistics only. full: also keep per-event detail "
            "(reports say so).",
        )
        loader.add_option(
            "keyveil_intercept_all", bool, False,
            "Intercept TLS for every host. By default only the catalog's Meta hosts are intercepted and all "
            "other traffic is tunnelled untouched.",
        )
        loader.add_option(
            "keyveil_rewrite_mode", str, "",
            "How the rewrite action re-times keystroke, click, pointer, scroll and touch series: resample "
            "(replace the person's intervals by draws from a population model: the strong one), delay "
            "(bounded random delay, Kloak), quantize (coarse grid: weak). Empty: policy.toml [rewrite].",
        )
        loader.add_option(
            "keyveil_rewrite_strength", str, "",
            "0..1, how far from the person's own timing the rewrite goes (1: independent of the person). "
            "Empty: policy.toml [rewrite].",
        )
        loader.add_option(
            "keyveil_rewrite_max_delay_ms", str, "",
            "Largest added delay of the delay mode, in ms. Empty: policy.toml [rewrite].",
        )
        loader.add_option(
            "keyveil_rewrite_grid_ms", str, "",
            "Grid of the quantize mode, in ms. Empty: policy.toml [rewrite].",
        )
        loader.add_option(
            "keyveil_rewrite_seed_scope", str, "",
            "payload: a fresh synthetic typing profile per payload (sessions cannot be linked by it); "
            "session: one per proxy run. Empty: policy.toml [rewrite].",
        )
        loader.add_option("keyveil_max_body", int, Limits.max_body, "Largest request body inspected, in bytes.")
        loader.add_option(
            "keyveil_max_decompressed", int, Limits.max_decompressed,
            "Largest output of any one decompression inside a payload, in bytes.",
        )
        loader.add_option("keyveil_max_depth", int, Limits.max_depth, "Deepest nesting of containers and encodings.")
        loader.add_option(
            "keyveil_max_ratio", int, int(Limits.max_ratio),
            "Largest decompressed/compressed size ratio accepted for outputs over 64 KiB.",
        )
        loader.add_option("keyveil_max_nodes", int, Limits.max_nodes, "Most values walked in one payload.")
        loader.add_option(
            "keyveil_time_budget_ms", int, Limits.time_budget_ms,
            "Wall time for decoding and inspecting one request, in ms (0: no budget). Past any limit a "
            "pure telemetry request is dropped and a functional one passes unchanged.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if not updated or updated & {"keyveil_config", "keyveil_mode", *REWRITE_OPTIONS, *LIMIT_OPTIONS}:
            mode = opts.keyveil_mode or None
            if mode not in (None, "enforce", "audit"):
                raise exceptions.OptionsError(f"keyveil_mode must be enforce or audit, not {mode!r}")
            for name in LIMIT_OPTIONS:
                if getattr(opts, name) < (0 if name == "keyveil_time_budget_ms" else 1):
                    raise exceptions.OptionsError(f"{name} must be positive, not {getattr(opts, name)}")
            limits = Limits(
                max_body=opts.keyveil_max_body,
                max_decompressed=opts.keyveil_max_decompressed,
                max_ratio=float(opts.keyveil_max_ratio),
                max_depth=opts.keyveil_max_depth,
                max_nodes=opts.keyveil_max_nodes,
                time_budget_ms=opts.keyveil_time_budget_ms,
            )
            key = (opts.keyveil_config, mode, limits, self._rewrite_overrides())
            if self.pipeline is None or key != self._pipeline_key:
                self._load_pipeline(key)
        if not updated or updated & {"keyveil_log", "keyveil_journal_detail"}:
            if opts.keyveil_journal_detail not in ("summary", "full"):
                raise exceptions.OptionsError("keyveil_journal_detail must be summary or full")
            self._open_journal(opts.keyveil_log, opts.keyveil_journal_detail)
        if not updated or updated & {"keyveil_intercept_all", "keyveil_config"}:
            self._scope_interception()

    def _rewrite_overrides(self) -> tuple[tuple[str, object], ...]:
        """keyveil_rewrite_* options that are set, validated, as (field, value) pairs."""
        from keyveil import timing

        opts = ctx.options
        out: list[tuple[str, object]] = []
        mode = opts.keyveil_rewrite_mode
        if mode:
            if mode not in timing.MODES:
                raise exceptions.OptionsError(f"keyveil_rewrite_mode must be one of {', '.join(timing.MODES)}")
            out.append(("mode", mode))
        scope = opts.keyveil_rewrite_seed_scope
        if scope:
            if scope not in timing.SEED_SCOPES:
                raise exceptions.OptionsError("keyveil_rewrite_seed_scope must be payload or session")
            out.append(("seed_scope", scope))
        for name, field, lo, hi in (("keyveil_rewrite_strength", "strength", 0.0, 1.0),
                                    ("keyveil_rewrite_max_delay_ms", "max_delay_ms", 1.0, 5000.0),
                                    ("keyveil_rewrite_grid_ms", "grid_ms", 1.0, 5000.0)):
            raw = getattr(opts, name)
            if not raw:
                continue
            try:
                val = float(raw)
            except ValueError:
                raise exceptions.OptionsError(f"{name} must be a number") from None
            if not lo <= val <= hi:
                raise exceptions.OptionsError(f"{name} must be between {lo:g} and {hi:g}")
            out.append((field, val))
        return tuple(out)

    def _load_pipeline(self, key: tuple) -> None:
        config, mode, limits, rewrite = key
        try:
            # a bad (re)load raises here; mitmproxy rolls the option back and the old pipeline stays
            pipeline = Pipeline.from_config_dir(config, limits=limits, mode=mode)
        except ConfigError as e:
            raise exceptions.OptionsError(f"keyveil: {e}") from None
        # one secret per proxy run, used only when the rewrite seed scope is "session"
        pipeline.rewriter = Rewriter({**pipeline.policy.rewrite, **dict(rewrite)}, self._session_seed)
        self.pipeline = pipeline
        self._pipeline_key = key

    @command.command("keyveil.reload")
    def reload(self) -> None:
        """Re-read endpoints.toml, detection.toml and policy.toml; on an error the old config stays."""
        try:
            self._load_pipeline(self._pipeline_key)
        except exceptions.OptionsError as e:
            log.error("%s (keeping the previous configuration)", e)
        else:
            log.info("keyveil: configuration reloaded from %s", self._pipeline_key[0])

    def _open_journal(self, path: str, detail: str) -> None:
        if self.journal is not None and path == self._journal_path:
            return
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self._journal_path = path
        if not path:
            return
        from keyveil.journal import JournalWriter

        self.journal = JournalWriter(path, detail=detail)

    def _scope_interception(self) -> None:
        opts = ctx.options
        if self.pipeline is None or opts.keyveil_intercept_all:
            return
        if opts.ignore_hosts or (opts.allow_hosts and not getattr(self, "_set_allow", False)):
            return  # the user scoped interception themselves
        regex = self.pipeline.catalog.intercept_regex()
        if list(opts.allow_hosts) != [regex]:
            self._set_allow = True
            opts.update(allow_hosts=[regex])

    def _ensure(self) -> Pipeline:
        """State for hosts that add the addon without sending configure (master.addons.add)."""
        if self.pipeline is None:
            self.pipeline = Pipeline.from_config_dir(default_config_dir())
        return self.pipeline

    def running(self) -> None:
        p = self._ensure()
        eps = p.catalog.endpoints
        log.info(
            "keyveil: protecting %d Meta endpoints on %d host suffixes (%s mode)",
            len(eps), len(p.catalog.host_suffixes()), p.mode,
        )

    # -- hooks ---------------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A functional Meta request announcing a body over keyveil_max_body would pass uninspected
        anyway: stream it through instead of letting mitmproxy buffer it (uploads). Telemetry is
        left to `request`, which answers it locally (mitmproxy reads that body either way)."""
        try:
            self._requestheaders(flow)
        except Exception:  # a hook must never raise into mitmproxy
            log.exception("keyveil: internal error on the headers of %s", flow.request.pretty_url)
            self._count("failed")

    def _requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        pipeline = self.pipeline or self._ensure()
        host = _flow_host(req)
        if pipeline.catalog.app_for(host) is None:  # not Meta (checked before the header: cheaper)
            return  # mitmproxy's own body settings apply
        match = pipeline.match(host, req.path, req.method)
        if match is None:
            return
        size = req.headers.get("content-length", "")
        if not size.isdigit() or int(size) <= pipeline.limits.max_body or flow.response:
            return
        preq = Request(req.method, req.pretty_url, req.headers, b"", time.time())
        outcome = pipeline.refuse(preq, match, LimitError("max_body", f"{size} bytes announced"))
        if outcome.answer is not None:
            return  # telemetry: dropped by `request` once the body is in
        if outcome.record is not None:
            outcome.record["size_in"] = outcome.record["size_out"] = int(size)
        req.stream = True  # never held in memory, never changed
        self._apply(flow, outcome)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.request.stream:
            return
        try:
            await self._request(flow)
        except Exception:  # a hook must never raise into mitmproxy: pass the flow unchanged
            log.exception("keyveil: internal error on %s; passing the request unchanged", flow.request.pretty_url)
            self._count("failed")

    async def _request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        host = _flow_host(req)
        if host == LIVE_HOST:
            self._live_page(flow)
            return
        pipeline = self.pipeline or self._ensure()
        if pipeline.catalog.app_for(host) is None:
            return  # not Meta: not even looked at (a few dict lookups, before decoding path and method)
        match = pipeline.match(host, req.path, req.method)
        if match is None:
            return
        # never `req.content`: mitmproxy would inflate a gzip bomb whole (and cache it)
        body = req.raw_content or b""
        coding = req.headers.get("content-encoding", "")
        preq = Request(req.method, req.pretty_url, req.headers, body, time.time())
        if coding and body:
            try:
                preq.body = body = await asyncio.to_thread(decode_content, body, coding, pipeline.limits)
            except LimitError as e:  # a bomb: the documented outcome, without inflating it
                self._apply(flow, pipeline.refuse(preq, match, e))
                return
            except DecodeError:  # broken content-encoding: inspect the raw bytes, the pipeline decides
                pass
        if len(body) > OFF_LOOP_BYTES:
            outcome = await asyncio.to_thread(pipeline.process, preq, match)
        else:
            outcome = pipeline.process(preq, match)
        self._apply(flow, outcome)

    def _apply(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        flow.metadata["keyveil"] = outcome.action
        if outcome.record is not None:
            self._emit(outcome.record, outcome.action)
        if outcome.answer is not None:
            a = outcome.answer
            flow.response = http.Response.make(a.status, a.body, a.headers)
            return
        if outcome.url is not None:
            flow.request.url = outcome.url
        if outcome.body is not None:
            flow.request.content = outcome.body

    def _count(self, action: str) -> None:
        self.counts[action] = self.counts.get(action, 0) + 1

    def _live_page(self, flow: http.HTTPFlow) -> None:
        if self.live is None:
            body = _plain_summary(self.counts).encode()
            flow.response = http.Response.make(200, body, {"content-type": "text/html; charset=utf-8"})
            return
        flow.response = http.Response.make(
            200, self.live.render_html(), {"content-type": "text/html; charset=utf-8", "cache-control": "no-store"}
        )

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Falco event frames and realtime tasks on the catalog's sockets (keyveil.websocket)."""
        try:
            await self._websocket_message(flow)
        except Exception:  # never raise into mitmproxy: the message goes through unchanged
            log.exception("keyveil: internal error on a WebSocket message of %s", flow.request.pretty_url)
            self._count("failed")

    async def _websocket_message(self, flow: http.HTTPFlow) -> None:
        from keyveil import websocket

        if flow.websocket is None or not flow.websocket.messages:
            return
        msg = flow.websocket.messages[-1]
        if not msg.from_client or msg.dropped or msg.injected:
            return
        pipeline = self.pipeline or self._ensure()
        req = flow.request
        match = pipeline.match(req.pretty_host, req.path, "GET")  # the handshake's: a few dict lookups
        if not websocket.is_ws_match(match):
            return
        args = (pipeline, match, req.pretty_host.lower(), req.path.split("?", 1)[0], msg.content)
        kw = {"is_text": msg.is_text, "from_client": True, "ts": time.time()}
        if len(msg.content) > OFF_LOOP_BYTES:
            out = await asyncio.to_thread(websocket.inspect_message, *args, **kw)
        else:
            out = websocket.inspect_message(*args, **kw)
        if out.record is not None:
            self._emit(out.record, out.action)
        if out.drop:
            msg.drop()
        elif out.content is not None:
            msg.content = out.content

    def tls_failed_client(self, data: tls.TlsData) -> None:
        """A client refused our certificate for a Meta host: an app that pins its certificates.
        Its traffic cannot be inspected; journal it as `pinned` so the user knows."""
        try:
            from keyveil.wireguard import is_pinning_failure

            sni = data.conn.sni or ""
            p = self.pipeline
            if p is None or not sni or not is_pinning_failure(data.conn.error):
                return
            app = p.catalog.app_for(sni)
            if app is None:
                return
            record = {
                "v": 1, "ts": round(time.time(), 3), "app": app, "endpoint": None, "host": sni.lower(), "path": "",
                "method": "TLS", "kind": "pinned", "action": "pinned", "mode": p.mode, "categories": {},
                "routes": {}, "size_in": 0, "size_out": 0, "layers": [], "reason": "client refused the proxy CA",
                "stats": {},
            }
            self._emit(record, "pinned")
        except Exception:
            log.exception("keyveil: tls_failed_client")

    def _emit(self, record: dict, action: str) -> None:
        self._count(action)
        if self.journal is not None:
            self.journal.write(record)
        if self.live is not None:
            self.live.add(record)

    def done(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    # -- commands ------------------------------------------------------------------------------
    @command.command("keyveil.report")
    def report_cmd(self, path: mtypes.Path) -> str:
        """Write a report of the journal to PATH; the format follows the extension (.html, .json,
        .csv, .md, .txt). Returns the path written."""
        from keyveil.report import format_for, write_report

        fmt = format_for(path)
        if not self._journal_path:
            raise exceptions.CommandError("keyveil.report: journaling is off (keyveil_log is empty)")
        if self.journal is not None:
            self.journal.flush()
        out = write_report(self._journal_path, fmt, path)  # a path takes the fast column reader
        log.info("keyveil: report written to %s", out)
        return str(out)

    @command.command("keyveil.counts")
    def counts_cmd(self) -> str:
        """What keyveil has done since the proxy started, as action=count pairs."""
        return " ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing yet"


def _live_summary():
    try:
        from keyveil.report import LiveSummary
    except ImportError:  # pragma: no cover - reports are part of the package; keep the proxy up anyway
        return None
    return LiveSummary()


def _flow_host(req: http.Request) -> str:
    """The connection's host: where the bytes go, and what interception is scoped by. Only an IP
    (transparent and WireGuard modes) needs the Host header: pretty_host parses it (~6 us a flow)."""
    host = req.host
    if not host or host[-1].isdigit() or ":" in host:
        return req.pretty_host
    return host


def _plain_summary(counts: dict[str, int]) -> str:
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in sorted(counts.items()))
    return f"<!doctype html><title>keyveil</title><h1>keyveil</h1><table>{rows}</table>"


def journal_path_of(addon: Keyveil) -> Path | None:
    return Path(addon._journal_path) if addon._journal_path else None
