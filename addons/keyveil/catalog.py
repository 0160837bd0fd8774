"""The endpoint catalog: which hosts and paths carry Meta telemetry, compiled into a fast matcher.

Pure: no mitmproxy. The cost of `Catalog.match` on a host outside the catalog is a handful of
dict lookups (one per label of the host name), whatever the size of the catalog.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("telemetry", "functional")
CODECS = ("banzai", "form", "json", "msgpack", "graph_logging", "pixel", "falco_ws", "auto")


class ConfigError(ValueError):
    """A config file is invalid. The message names the file and the line."""


def located(text: str, source: str, pattern: str, nth: int = 0) -> str:
    """`source, line N` for the nth line matching `pattern` (a regex, multiline), else `source`."""
    for i, m in enumerate(re.finditer(pattern, text, re.M)):
        if i == nth:
            return f"{source}, line {text.count(chr(10), 0, m.start()) + 1}"
    return source


@dataclass(frozen=True)
class Answer:
    """The local success answer a dropped request gets, per endpoint family."""

    status: int = 200
    content_type: str = "text/plain"
    body: bytes = b""
    gif: bool = False


@dataclass(frozen=True)
class Endpoint:
    name: str
    hosts: tuple[str, ...]
    kind: str = "telemetry"
    app: str | None = None
    paths: frozenset[str] = frozenset()
    path_prefixes: tuple[str, ...] = ()
    path_globs: tuple[str, ...] = ()
    methods: frozenset[str] = frozenset()
    codec: str = "auto"
    answer: str = "banzai"
    category: str | None = None  # what the whole body counts as when nothing finer is found
    note: str = ""

    @property
    def droppable(self) -> bool:
        return self.kind == "telemetry"

    def matches_path(self, path: str) -> bool:
        if path in self.paths:
            return True
        if any(path.startswith(p) for p in self.path_prefixes):
            return True
        return any(fnmatch.fnmatchcase(path, g) for g in self.path_globs)


@dataclass(frozen=True)
class Match:
    """Result of a catalog lookup for a Meta host. `endpoint` is None for a Meta host and path
    that the catalog does not list (an "uncataloged" flow: detection still runs on it)."""

    app: str
    endpoint: Endpoint | None


@dataclass
class Catalog:
    apps: dict[str, str]
    endpoints: list[Endpoint]
    answers: dict[str, Answer]
    source: str = "<memory>"
    _by_host: dict[str, list[Endpoint]] = field(default_factory=dict, repr=False)
    # host suffix -> exact path -> endpoints in file order; and the prefix/glob endpoints per suffix
    _exact: dict[str, dict[str, list[Endpoint]]] = field(default_factory=dict, repr=False)
    _patterned: dict[str, list[Endpoint]] = field(default_factory=dict, repr=False)
    _patterns: dict[tuple[str, str], tuple[re.Pattern[str] | None, list[Endpoint]]] = field(
        default_factory=dict, repr=False
    )
    _methods: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        by_host: dict[str, list[Endpoint]] = {}
        for ep in self.endpoints:
            for h in ep.hosts:
                by_host.setdefault(h, []).append(ep)
                if ep.paths:
                    exact = self._exact.setdefault(h, {})
                    for path in ep.paths:
                        exact.setdefault(path, []).append(ep)
                if ep.path_prefixes or ep.path_globs:
                    self._patterned.setdefault(h, []).append(ep)
        self._by_host = by_host
        self._methods = frozenset(m for ep in self.endpoints for m in ep.methods)

    def _pattern(self, host: str, method: str) -> tuple[re.Pattern[str] | None, list[Endpoint]]:
        """One regex for every prefix and glob of the endpoints on `host` that accept `method`,
        alternatives in file order, so the first alternative that matches is the first entry."""
        key = (host, method)
        hit = self._patterns.get(key)
        if hit is not None:
            return hit
        eps = [ep for ep in self._patterned.get(host, ()) if not ep.methods or method in ep.methods]
        alts = [
            f"(?P<e{i}>{'|'.join([re.escape(p) for p in ep.path_prefixes] + [fnmatch.translate(g) for g in ep.path_globs])})"
            for i, ep in enumerate(eps)
        ]
        hit = (re.compile("|".join(alts)) if alts else None, eps)
        self._patterns[key] = hit
        return hit

    # -- lookups -----------------------------------------------------------------------------
    def app_for(self, host: str) -> str | None:
        """The app that owns `host` (longest matching suffix), or None if it is not a Meta host."""
        host = host.lower().rstrip(".")
        apps = self.apps
        while True:
            app = apps.get(host)
            if app is not None:
                return app
            dot = host.find(".")
            if dot < 0:
                return None
            host = host[dot + 1 :]

    def match(self, host: str, path: str, method: str = "POST") -> Match | None:
        """Find the endpoint for a request. None means: not a Meta host, leave it alone."""
        host = host.lower().rstrip(".")
        app = self.app_for(host)
        if app is None:
            return None
        qpos = path.find("?")
        if qpos >= 0:
            path = path[:qpos]
        method = method.upper()
        if method not in self._methods:
            method = ""  # only endpoints without a method list can match (and the cache stays bounded)
        suffixes = [host]
        dot = host.find(".")
        while dot >= 0:
            suffixes.append(suffixes[-1][dot + 1 :])
            dot = suffixes[-1].find(".")
        # an exact path beats a prefix or a glob, whichever entry comes first in the file; longer host
        # suffixes first. Indexed: the cost does not grow with the number of endpoints.
        for h in suffixes:
            for ep in self._exact.get(h, {}).get(path, ()):
                if not ep.methods or method in ep.methods:
                    return Match(app=ep.app or app, endpoint=ep)
        for h in suffixes:
            if h not in self._patterned:
                continue
            rx, eps = self._pattern(h, method)
            m = rx.match(path) if rx is not None else None
            if m is not None:
                ep = eps[int(m.lastgroup[1:])]  # type: ignore[index]
                return Match(app=ep.app or app, endpoint=ep)
        return Match(app=app, endpoint=None)

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)

    def host_suffixes(self) -> list[str]:
        """Every host suffix keyveil cares about (apps and endpoints), for scoping interception."""
        suffixes = set(self.apps)
        for ep in self.endpoints:
            suffixes.update(ep.hosts)
        # keep only the shortest suffixes: facebook.com already covers www.facebook.com
        return sorted(s for s in suffixes if not any(s != o and s.endswith("." + o) for o in suffixes))

    def intercept_regex(self) -> str:
        """A regex for mitmproxy's `allow_hosts`: the catalog's hosts and their subdomains."""
        alts = "|".join(re.escape(s) for s in self.host_suffixes())
        return rf"^(.+\.)?({alts})(:\d+)?$"

    def answer_for(self, endpoint: Endpoint | None) -> Answer:
        if endpoint is None:
            return Answer(status=200, content_type="text/plain")
        return self.answers.get(endpoint.answer, Answer())


# -- loading -----------------------------------------------------------------------------------


def _str_list(raw: dict, key: str, where: str) -> tuple[str, ...]:
    val = raw.get(key, [])
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
        raise ConfigError(f"{where}: '{key}' must be a list of strings")
    return tuple(val)


def parse_catalog(text: str, source: str = "<string>") -> Catalog:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None

    apps_raw = data.get("apps", {})
    if not isinstance(apps_raw, dict) or not all(isinstance(v, str) for v in apps_raw.values()):
        raise ConfigError(f"{source}: [apps] must map host suffixes to app names")
    apps = {k.lower(): v for k, v in apps_raw.items()}

    answers: dict[str, Answer] = {}
    for name, raw in data.get("answers", {}).items():
        loc = located(text, source, r"^\s*\[answers\." + re.escape(name) + r"\]")
        where = f"{loc}: [answers.{name}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        status = raw.get("status", 200)
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ConfigError(f"{where}: status must be an HTTP status code")
        answers[name] = Answer(
            status=status,
            content_type=str(raw.get("content_type", "text/plain")),
            body=str(raw.get("body", "")).encode(),
            gif=bool(raw.get("gif", False)),
        )

    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("endpoint", [])):
        name = raw.get("name")
        loc = located(text, source, r"^\s*\[\[endpoint\]\]", i)
        where = f"{loc}: [[endpoint]] #{i + 1} ({name or 'unnamed'})"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' is required")
        if name in seen:
            raise ConfigError(f"{where}: duplicate endpoint name")
        seen.add(name)
        hosts = tuple(h.lower() for h in _str_list(raw, "hosts", where))
        if not hosts:
            raise ConfigError(f"{where}: 'hosts' must list at least one host suffix")
        paths = _str_list(raw, "paths", where)
        prefixes = _str_list(raw, "path_prefixes", where)
        globs = _str_list(raw, "path_globs", where)
        if not (paths or prefixes or globs):
            raise ConfigError(f"{where}: needs paths, path_prefixes or path_globs")
        kind = raw.get("kind", "telemetry")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        codec = raw.get("codec", "auto")
        if codec not in CODECS:
            raise ConfigError(f"{where}: codec must be one of {', '.join(CODECS)}, not {codec!r}")
        answer = raw.get("answer", "banzai")
        if answers and answer not in answers:
            raise ConfigError(f"{where}: answer {answer!r} is not defined under [answers]")
        endpoints.append(
            Endpoint(
                name=name,
                hosts=hosts,
                kind=kind,
                app=raw.get("app"),
                paths=frozenset(paths),
                path_prefixes=prefixes,
                path_globs=globs,
                methods=frozenset(m.upper() for m in _str_list(raw, "methods", where)),
                codec=codec,
                answer=answer,
                category=raw.get("category"),
                note=str(raw.get("note", "")),
            )
        )
        for h in hosts:
            if not _covered(h, apps):
                # an endpoint host outside [apps] would never be looked up: give it the endpoint's app
                apps[h] = raw.get("app") or name
    return Catalog(apps=apps, endpoints=endpoints, answers=answers, source=source)


def _covered(host: str, apps: dict[str, str]) -> bool:
    while True:
        if host in apps:
            return True
        dot = host.find(".")
        if dot < 0:
            return False
        host = host[dot + 1 :]


def read_config(path: str | Path) -> tuple[str, str]:
    """A config file's text and its name for messages; ConfigError when it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def load_catalog(path: str | Path) -> Catalog:
    return parse_catalog(*read_config(path))
