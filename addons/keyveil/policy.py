"""Policy: config/policy.toml -> what to do with a flow and with each finding."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from keyveil.catalog import ConfigError, Endpoint, located, read_config
from keyveil.detect import CATEGORIES, Finding

ACTIONS = ("drop", "strip", "rewrite", "pass")
# a plan's flow action -> the journal's word for what happened
JOURNAL_ACTION = {"drop": "dropped", "strip": "stripped", "rewrite": "rewritten", "pass": "passed", "allowed": "allowed"}
MODES = ("enforce", "audit")
_RULE_KEYS = {"app", "endpoint", "kind", "category", "route", "action", "note"}


@dataclass(frozen=True)
class Rule:
    action: str
    app: str | None = None
    endpoint: str | None = None
    kind: str | None = None
    category: str | None = None
    route: str | None = None

    def matches(self, app: str, endpoint: str | None, kind: str, category: str | None, route: str | None) -> bool:
        if self.app is not None and self.app != app:
            return False
        if self.endpoint is not None and self.endpoint != endpoint:
            return False
        if self.kind is not None and self.kind != kind:
            return False
        if self.category is not None and self.category != category:
            return False
        return self.route is None or (route is not None and fnmatch.fnmatchcase(route.lower(), self.route.lower()))


@dataclass
class Plan:
    """The decision for one flow: `flow` is drop/strip/rewrite/pass/allowed; `actions` per finding."""

    flow: str
    actions: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class Policy:
    mode: str = "enforce"
    telemetry: str = "drop"
    uncataloged: str = "strip"
    features: str = "pass"
    categories: dict[str, str] = field(default_factory=lambda: {c: ("pass" if c == "other" else "strip") for c in CATEGORIES})
    rules: list[Rule] = field(default_factory=list)
    allow_apps: frozenset[str] = frozenset()
    allow_endpoints: frozenset[str] = frozenset()
    allow_hosts: tuple[str, ...] = ()
    rewrite: dict = field(default_factory=dict)
    bd_strip_ids: frozenset[int] = frozenset()  # empty: a stripped bd_pdc_signals post goes whole

    def allowed(self, app: str, endpoint: str | None, host: str) -> bool:
        if app in self.allow_apps or (endpoint and endpoint in self.allow_endpoints):
            return True
        return any(host == h or host.endswith("." + h) for h in self.allow_hosts)

    def _rule(self, app: str, endpoint: str | None, kind: str, category: str | None, route: str | None) -> str | None:
        for r in self.rules:
            if r.matches(app, endpoint, kind, category, route):
                return r.action
        return None

    def decide(
        self, app: str, endpoint: Endpoint | None, host: str, findings: list[Finding], route: str | None = None
    ) -> Plan:
        """`route` names the request as a whole (a GraphQL friendly name): a rule with that route and
        no category decides the flow, and may drop it even on a functional endpoint (pure-logging
        mutations get the endpoint's answer)."""
        name = endpoint.name if endpoint else None
        kind = endpoint.kind if endpoint else "uncataloged"
        if self.allowed(app, name, host):
            return Plan("allowed", ["pass"] * len(findings), "allowlist")
        if route is not None and endpoint is not None:
            by_route = next(
                (r.action for r in self.rules if r.category is None and r.route is not None
                 and r.matches(app, name, kind, None, route)),
                None,
            )
            if by_route in ("drop", "pass"):
                return Plan(by_route, [by_route] * len(findings), f"route:{route}" if by_route == "drop" else "")
        flow_rule = next(
            (r.action for r in self.rules if r.category is None and r.route is None and r.matches(app, name, kind, None, None)),
            None,
        )
        if kind == "telemetry":
            flow = flow_rule or self.telemetry
            if flow == "drop":
                return Plan("drop", ["drop"] * len(findings))
            if flow == "pass":
                return Plan("pass", ["pass"] * len(findings))
        elif kind == "uncataloged":
            flow = flow_rule or self.uncataloged
            if flow == "pass" or flow == "drop" and not findings:
                return Plan("pass", ["pass"] * len(findings))
        actions: list[str] = []
        for f in findings:
            act = self._rule(app, name, kind, f.category, f.route) or self.categories.get(f.category, "pass")
            if act == "drop" and (kind != "telemetry" or endpoint is None):
                act = "strip"  # never drop a functional request for one field: remove the field
            actions.append(act)
        if any(a in ("strip", "drop") for a in actions):
            flow = "strip"
        elif "rewrite" in actions:
            flow = "rewrite"
        else:
            flow = "pass"
        return Plan(flow, actions)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None

    def at(pattern: str, nth: int = 0) -> str:
        return located(text, source, pattern, nth)

    def action(value: object, where: str, allowed: tuple[str, ...] = ACTIONS, loc: str = source) -> str:
        if value not in allowed:
            raise ConfigError(f"{loc}: {where} must be one of {', '.join(allowed)}, not {value!r}")
        return str(value)

    mode = data.get("mode", "enforce")
    if mode not in MODES:
        loc = at(r"^\s*mode\s*=")
        raise ConfigError(f"{loc}: mode must be enforce or audit, not {mode!r}")
    defaults = data.get("defaults", {})
    cats = Policy().categories
    for cat, act in data.get("categories", {}).items():
        loc = at(rf"^\s*{re.escape(cat)}\s*=")
        if cat not in CATEGORIES:
            raise ConfigError(f"{loc}: [categories] unknown category {cat!r}")
        cats[cat] = action(act, f"[categories] {cat}", loc=loc)
    rules: list[Rule] = []
    for i, raw in enumerate(data.get("rule", [])):
        where = f"[[rule]] #{i + 1}"
        loc = at(r"^\s*\[\[rule\]\]", i)
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"{loc}: {where} unknown key(s) {', '.join(sorted(unknown))}")
        if raw.get("category") is not None and raw["category"] not in CATEGORIES:
            raise ConfigError(f"{loc}: {where} unknown category {raw['category']!r}")
        rules.append(
            Rule(
                action=action(raw.get("action"), f"{where} action", loc=loc),
                app=raw.get("app"),
                endpoint=raw.get("endpoint"),
                kind=raw.get("kind"),
                category=raw.get("category"),
                route=raw.get("route"),
            )
        )
    allow = data.get("allowlist", {})
    return Policy(
        mode=mode,
        telemetry=action(defaults.get("telemetry", "drop"), "[defaults] telemetry"),
        uncataloged=action(defaults.get("uncataloged", "strip"), "[defaults] uncataloged"),
        features=action(defaults.get("features", "pass"), "[defaults] features", ("pass", "strip")),
        categories=cats,
        rules=rules,
        allow_apps=frozenset(allow.get("apps", [])),
        allow_endpoints=frozenset(allow.get("endpoints", [])),
        allow_hosts=tuple(h.lower() for h in allow.get("hosts", [])),
        rewrite=dict(data.get("rewrite", {})),
        bd_strip_ids=frozenset(int(i) for i in data.get("bd_pdc_signals", {}).get("strip_ids", [])),
    )


def load_policy(path: str | Path) -> Policy:
    return parse_policy(*read_config(path))
