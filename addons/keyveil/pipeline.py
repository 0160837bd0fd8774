"""The pipeline: one request in (method, URL, headers, bytes), one decision and new bytes out.

Sans-I/O: no sockets, no mitmproxy. The addon, `keyveil scan` and the benchmarks all go through
`Pipeline.process`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from keyveil import apply
from keyveil.catalog import Answer, Catalog, Endpoint, Match, load_catalog
from keyveil.codecs import DecodeError, Decoder, Layer, LimitError, Limits
from keyveil.detect import Detection, Detector, Finding, Rules, load_rules
from keyveil.policy import JOURNAL_ACTION, Plan, Policy, load_policy

SCHEMA_VERSION = 1
# a 1x1 transparent GIF, what the Pixel's image GET expects
GIF_1X1 = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


@dataclass
class Request:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names are looked up
    body: bytes = b""
    ts: float | None = None

    def header(self, name: str) -> str:
        h = self.headers
        v = h.get(name) if hasattr(h, "get") else None
        if v is None and isinstance(h, dict):
            v = next((val for k, val in h.items() if k.lower() == name), None)
        return v or ""


@dataclass
class LocalAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Outcome:
    """What to do with a request. `action` is the journal's action word."""

    action: str  # dropped stripped rewritten passed allowed failed, or "ignored" (not Meta)
    body: bytes | None = None  # new body (content-decoded) when it changed
    url: str | None = None  # new URL when the query changed
    answer: LocalAnswer | None = None  # set when the request is answered locally
    record: dict[str, Any] | None = None
    detection: Detection | None = None

    @property
    def changed(self) -> bool:
        return self.body is not None or self.url is not None


IGNORED = Outcome("ignored")


def _flow_route(req: Request, body: Layer | None) -> str | None:
    """The name of the request as a whole: GraphQL's friendly name (form field, or header)."""
    if body is not None and isinstance(body.value, list):
        for f in body.value:
            if getattr(f, "name", None) == "fb_api_req_friendly_name" and isinstance(f.value, str) and f.value:
                return f.value[:100]
    return req.header("x-fb-friendly-name")[:100] or None


def _whole_unit_stripped(findings: list[Finding], plan: Plan) -> bool:
    """A finding that is the whole request (a Pixel hit, a body the catalog classes) is to be stripped:
    nothing can be cut out of it, so the request must go."""
    return any(
        a in ("strip", "drop") and f.container is None and f.unit in ("hit", "body") and f.behavioral
        for f, a in zip(findings, plan.actions, strict=True)
    )


class Pipeline:
    def __init__(
        self,
        catalog: Catalog,
        rules: Rules,
        policy: Policy,
        limits: Limits | None = None,
        mode: str | None = None,
        rewriter: apply.Rewriter | None = None,
    ) -> None:
        self.catalog = catalog
        self.detector = Detector(rules)
        self.rules = rules
        self.policy = policy
        self.limits = limits or Limits()
        self.mode = mode or policy.mode
        self.rewriter = rewriter or apply.Rewriter(policy.rewrite)

    @classmethod
    def from_config_dir(cls, path: str | Path, **kw: Any) -> Pipeline:
        path = Path(path)
        return cls(
            load_catalog(path / "endpoints.toml"),
            load_rules(path / "detection.toml"),
            load_policy(path / "policy.toml"),
            **kw,
        )

    # -- the fast path the addon calls first --------------------------------------------------
    def match(self, host: str, path: str, method: str) -> Match | None:
        return self.catalog.match(host, path, method)

    # -- the whole decision -------------------------------------------------------------------
    def process(self, req: Request, match: Match | None = None) -> Outcome:
        """Never raises: an error nobody foresaw gets the same outcome as a limit (reason error:<type>)."""
        try:
            return self._process(req, match)
        except Exception as e:
            if match is None:
                try:
                    parts = urlsplit(req.url)
                    match = self.catalog.match((parts.hostname or "").lower(), parts.path or "/", req.method)
                except ValueError:  # not a URL at all (mitmproxy never sends one): nothing to protect
                    match = None
                if match is None:
                    return IGNORED
            return self.refuse(req, match, e)

    def refuse(self, req: Request, match: Match, err: BaseException) -> Outcome:
        """The outcome for a request that cannot be inspected (a limit, undecodable, an error):
        dropped on a pure telemetry endpoint (fail closed), passed unchanged otherwise (fail open)."""
        parts = urlsplit(req.url)
        host = (parts.hostname or "").lower()
        record = self._record(req, match, host, parts.path or "/", req.ts if req.ts is not None else time.time())
        if self.policy.allowed(match.app, match.endpoint.name if match.endpoint else None, host):
            record["action"] = "allowed"
            record["reason"] = "allowlist"
            return Outcome("allowed", record=record)
        return self._undecodable(req, match, record, err)

    def _process(self, req: Request, match: Match | None) -> Outcome:
        parts = urlsplit(req.url)
        host = (parts.hostname or "").lower()
        if match is None:
            match = self.catalog.match(host, parts.path or "/", req.method)
            if match is None:
                return IGNORED
        ep = match.endpoint
        ts = req.ts if req.ts is not None else time.time()
        record = self._record(req, match, host, parts.path or "/", ts)

        if self.policy.allowed(match.app, ep.name if ep else None, host):
            record["action"] = "allowed"
            record["reason"] = "allowlist"
            return Outcome("allowed", record=record)

        decoder = Decoder(self.limits)
        roots: list[Layer] = []
        try:
            body_layer = decoder.body(req.body, req.header("content-type"), ep.codec if ep else "auto")
            if body_layer is not None:
                roots.append(body_layer)
            query_layer = None
            if parts.query and (ep is not None and ep.codec == "pixel" or not req.body):
                query_layer = decoder.query(parts.query)
                roots.append(query_layer)
        except (DecodeError, RecursionError, MemoryError) as e:
            return self._undecodable(req, match, record, e)

        findings: list[Finding] = []
        layers: list[str] = []
        for root in roots:
            budget = decoder.check_time if decoder.deadline != float("inf") else None
            det = self.detector.detect(root, budget)
            findings.extend(det.findings)
            layers.extend(det.layers)
        if ep is not None and ep.category and not any(f.behavioral for f in findings) and ep.kind == "telemetry":
            findings.append(Finding("body", ep.name, {ep.category: 1}, {"catalog"}, None, None, None))
        try:
            decoder.check_time()  # detection shares the flow's budget with decoding
        except LimitError as e:
            return self._undecodable(req, match, record, e)
        detection = Detection(findings, layers)
        record["layers"] = layers
        record["categories"] = detection.categories()
        record["routes"] = detection.routes()
        record["stats"] = detection.stats()
        if ep is None and not detection.behavioral:
            # a Meta request the catalog does not list and that carries nothing behavioral
            record["action"] = "passed"
            return Outcome("passed", record=record, detection=detection)

        route = _flow_route(req, body_layer)
        if route:
            record["routes"][route] = record["routes"].get(route, 0) + 1
        plan = self.policy.decide(match.app, ep, host, findings, route)
        if plan.flow == "strip" and ep is not None and ep.kind == "telemetry" and _whole_unit_stripped(findings, plan):
            plan = Plan("drop", plan.actions, plan.reason)  # a Pixel hit is one event: it goes as a whole
        record["action"] = JOURNAL_ACTION.get(plan.flow, plan.flow)
        if plan.reason:
            record["reason"] = plan.reason
        if self.mode == "audit" or plan.flow in ("pass", "allowed"):
            return Outcome(record["action"], record=record, detection=detection)
        if plan.flow == "drop":
            answer = self._answer(req, ep)
            record["size_out"] = 0
            return Outcome("dropped", answer=answer, record=record, detection=detection)
        return self._modify(req, parts, plan, findings, roots, body_layer, query_layer, record, detection)

    # -- helpers --------------------------------------------------------------------------------
    def _modify(
        self,
        req: Request,
        parts: Any,
        plan: Plan,
        findings: list[Finding],
        roots: list[Layer],
        body_layer: Layer | None,
        query_layer: Layer | None,
        record: dict[str, Any],
        detection: Detection,
    ) -> Outcome:
        result = apply.apply_plan(
            findings,
            plan.actions,
            self.rewriter,
            not_after_ms=(req.ts or time.time()) * 1000,
            bd_strip_ids=self.policy.bd_strip_ids,
        )
        new_body = new_url = None
        if body_layer is not None and body_layer.changed():
            out = body_layer.encode()
            new_body = out if isinstance(out, bytes) else out.encode()
        if query_layer is not None and query_layer.changed():
            q = query_layer.encode()
            new_url = urlunsplit(parts._replace(query=q if isinstance(q, str) else q.decode("latin-1")))
        if new_body is None and new_url is None:
            record["action"] = "passed"
            return Outcome("passed", record=record, detection=detection)
        action = "rewritten" if result.rewritten and not result.stripped else "stripped"
        record["action"] = action
        record["size_out"] = len(new_body) if new_body is not None else record["size_in"]
        return Outcome(action, body=new_body, url=new_url, record=record, detection=detection)

    def _undecodable(self, req: Request, match: Match, record: dict[str, Any], err: BaseException) -> Outcome:
        """Fail closed on pure telemetry (drop), open on functional requests (pass unchanged)."""
        ep = match.endpoint
        if isinstance(err, LimitError):
            record["reason"] = f"limit:{err.limit}"
        elif isinstance(err, RecursionError):
            record["reason"] = "limit:max_depth"
        elif isinstance(err, DecodeError):
            record["reason"] = f"decode:{type(err).__name__}"
        else:
            record["reason"] = f"error:{type(err).__name__}"
        if ep is not None and ep.kind == "telemetry" and self.policy.telemetry == "drop":
            record["action"] = "dropped"
            if self.mode == "audit":
                return Outcome("dropped", record=record)
            record["size_out"] = 0
            return Outcome("dropped", answer=self._answer(req, ep), record=record)
        record["action"] = "passed"
        return Outcome("passed", record=record)

    def _answer(self, req: Request, ep: Endpoint | None) -> LocalAnswer:
        ans: Answer = self.catalog.answer_for(ep)
        headers = {"content-type": ans.content_type, "cache-control": "no-store", "x-keyveil": "dropped"}
        origin = req.header("origin")
        if origin:
            headers["access-control-allow-origin"] = origin
            headers["access-control-allow-credentials"] = "true"
        body = ans.body
        if ans.gif:
            if req.method.upper() == "GET":
                body = GIF_1X1
            else:  # a beacon or fetch POST gets an empty 200, not an empty "image"
                headers["content-type"] = "text/plain; charset=utf-8"
        return LocalAnswer(ans.status, headers, body)

    def _record(self, req: Request, match: Match, host: str, path: str, ts: float) -> dict[str, Any]:
        ep = match.endpoint
        return {
            "v": SCHEMA_VERSION,
            "ts": round(ts, 3),
            "app": match.app,
            "endpoint": ep.name if ep else None,
            "host": host,
            "path": path,
            "method": req.method.upper(),
            "kind": ep.kind if ep else "uncataloged",
            "action": "passed",
            "mode": self.mode,
            "categories": {},
            "routes": {},
            "size_in": len(req.body),
            "size_out": len(req.body),
            "layers": [],
            "reason": "",
            "stats": {},
        }
