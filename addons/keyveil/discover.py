"""Discovery: Meta endpoints the catalog does not list yet, found in the journal.

The pipeline journals a flow on a Meta host whose path no catalog entry matches with kind
`uncataloged` (and handles it by policy `[defaults] uncataloged`). This module groups those records
by host and path, sums what detection found in them, and writes a ready `[[endpoint]]` entry for
config/endpoints.toml. Pure: records in, text out.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from keyveil.catalog import Catalog

BEHAVIORAL = ("keystroke", "touch", "pointer", "click", "scroll", "activity", "fingerprint")
# paths that read like loggers: suggested as pure telemetry (droppable); anything else as functional
_LOGGER_PATH = re.compile(
    r"log|/bz\b|bnzai|metric|track|telemetry|falco|beacon|/tr\b|stats?\b|/si/|events?\b", re.I
)


@dataclass
class Discovered:
    host: str
    path: str
    app: str = ""
    requests: int = 0
    behavioral: int = 0  # requests in which detection found behavioral data
    methods: Counter[str] = field(default_factory=Counter)
    categories: dict[str, dict[str, int]] = field(default_factory=dict)
    actions: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    layers: Counter[str] = field(default_factory=Counter)
    first: float = 0.0
    last: float = 0.0

    @property
    def top_category(self) -> str | None:
        beh = {c: v["samples"] for c, v in self.categories.items() if c in BEHAVIORAL}
        return max(beh, key=lambda c: (beh[c], c)) if beh else None


def is_behavioral(record: dict[str, Any]) -> bool:
    cats = record.get("categories") or {}
    return any(c in BEHAVIORAL and (v or {}).get("events", 0) for c, v in cats.items())


def discover(
    records: Iterable[dict[str, Any]], catalog: Catalog | None = None, include_all: bool = False
) -> list[Discovered]:
    """Uncataloged endpoints, most behavioral first. With `catalog`, endpoints it now covers (an entry
    was pasted since) are left out. `include_all` also lists those without any behavioral finding."""
    found: dict[tuple[str, str], Discovered] = {}
    for r in records:
        if r.get("kind") != "uncataloged" or r.get("method") in ("WS", "TLS"):
            continue
        host, path, method = str(r.get("host", "")), str(r.get("path", "/")), str(r.get("method", ""))
        if catalog is not None:
            m = catalog.match(host, path, method)
            if m is None or m.endpoint is not None:
                continue
        beh = is_behavioral(r)
        d = found.get((host, path))
        if d is None:
            d = found[(host, path)] = Discovered(host, path, str(r.get("app", "")), first=r.get("ts", 0.0))
        d.requests += 1
        d.behavioral += beh
        d.methods[method] += 1
        d.actions[str(r.get("action", ""))] += 1
        d.layers.update(r.get("layers") or [])
        d.routes.update({k: v for k, v in (r.get("routes") or {}).items() if isinstance(v, int)})
        for cat, v in (r.get("categories") or {}).items():
            slot = d.categories.setdefault(cat, {"events": 0, "samples": 0})
            slot["events"] += int((v or {}).get("events", 0))
            slot["samples"] += int((v or {}).get("samples", 0))
        ts = float(r.get("ts", 0.0))
        d.first = min(d.first or ts, ts)
        d.last = max(d.last, ts)
    out = [d for d in found.values() if include_all or d.behavioral]
    out.sort(key=lambda d: (-d.behavioral, -d.requests, d.host, d.path))
    return out


# -- the catalog entry -------------------------------------------------------------------------


def entry_name(d: Discovered, taken: set[str]) -> str:
    host = d.host.removeprefix("www.")
    host = re.sub(r"\.(com|net|org)$", "", host)
    path = d.path.replace(":id", "id")
    slug = re.sub(r"[^a-z0-9]+", "_", f"{host} {path}".lower()).strip("_")[:60].rstrip("_")
    name, n = f"discovered_{slug}", 2
    while name in taken:
        name, n = f"discovered_{slug}_{n}", n + 1
    taken.add(name)
    return name


def _answer_for(d: Discovered) -> str:
    if "graphql" in d.path:
        return "graphql"
    if d.host.startswith(("graph.", "b-graph.")):
        return "graph_logging"
    if d.path.startswith("/ajax/"):
        return "ajax_logging"
    return "banzai"  # a plain empty 200


def _codec_for(d: Discovered) -> str:
    for codec in ("multipart", "form", "json", "msgpack"):
        if codec in d.layers:
            return "form" if codec == "multipart" else codec
    return "auto"


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings


def _summary(d: Discovered) -> str:
    cats = ", ".join(
        f"{c} {v['events']}/{v['samples']}" for c, v in sorted(d.categories.items()) if c in BEHAVIORAL
    )
    return cats or "nothing behavioral"


def catalog_entry(d: Discovered, taken: set[str] | None = None) -> str:
    """A `[[endpoint]]` table for config/endpoints.toml that matches `d`'s host and path."""
    taken = set() if taken is None else taken
    kind = "telemetry" if _LOGGER_PATH.search(d.path) else "functional"
    lines = ["[[endpoint]]", f"name = {_toml_str(entry_name(d, taken))}", f"hosts = [{_toml_str(d.host)}]"]
    if ":id" in d.path.split("/"):  # the journal hid an id-shaped segment: match any value there
        glob = "/".join("*" if s == ":id" else s for s in d.path.split("/"))
        lines.append(f"path_globs = [{_toml_str(glob)}]")
    else:
        lines.append(f"paths = [{_toml_str(d.path)}]")
    methods = sorted(m for m in d.methods if re.fullmatch(r"[A-Z]{1,10}", m))
    if methods:
        lines.append("methods = [" + ", ".join(_toml_str(m) for m in methods) + "]")
    lines.append(f"codec = {_toml_str(_codec_for(d))}")
    lines.append(f"kind = {_toml_str(kind)}")
    if kind == "telemetry" and d.top_category:
        lines.append(f"category = {_toml_str(d.top_category)}")
    lines.append(f"answer = {_toml_str(_answer_for(d))}")
    when = time.strftime("%Y-%m-%d", time.gmtime(d.first)) if d.first else "?"
    note = f"found by keyveil discover: {d.requests} requests since {when}, {d.behavioral} behavioral ({_summary(d)})"
    lines.append(f"note = {_toml_str(note)}")
    return "\n".join(lines) + "\n"


def render_text(found: list[Discovered], taken: set[str] | None = None, records: int = 0) -> str:
    """The listing, then the entries ready to paste."""
    if not found:
        return (
            f"keyveil discover: no uncataloged Meta endpoint with behavioral data ({records} records read)\n"
        )
    out = [f"keyveil discover: {len(found)} uncataloged Meta endpoint(s) ({records} records read)", ""]
    for d in found:
        methods = ",".join(sorted(d.methods))
        actions = ", ".join(f"{a} {n}" for a, n in d.actions.most_common())
        out.append(
            f"{d.host}{d.path}  [{methods}]  {d.requests} requests, {d.behavioral} behavioral  ({actions})"
        )
        out.append(f"    categories (events/samples): {_summary(d)}")
        routes = [r for r, _ in d.routes.most_common(5)]
        if routes:
            out.append(f"    names seen: {', '.join(routes)}")
    out += [
        "",
        "# Ready to paste into config/endpoints.toml (check kind: telemetry entries may be dropped whole):",
        "",
    ]
    taken = set() if taken is None else set(taken)
    out += [catalog_entry(d, taken) for d in found]
    return "\n".join(out)


def as_json(found: list[Discovered], taken: set[str] | None = None) -> list[dict[str, Any]]:
    taken = set() if taken is None else set(taken)
    return [
        {
            "host": d.host,
            "path": d.path,
            "app": d.app,
            "methods": dict(d.methods),
            "requests": d.requests,
            "behavioral": d.behavioral,
            "categories": d.categories,
            "actions": dict(d.actions),
            "routes": dict(d.routes.most_common(20)),
            "first": d.first,
            "last": d.last,
            "entry": catalog_entry(d, taken),
        }  # fmt: skip
        for d in found
    ]
