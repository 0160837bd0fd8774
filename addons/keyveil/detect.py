"""Detection: find behavioral telemetry in a decoded tree and say where it sits.

Three signals, combined per *event unit* (a Banzai post, a Falco or client event, a Pixel hit) and
per *field* (a behavioral field inside a functional request, e.g. GraphQL `variables`):

1. names: Banzai routes and event names matched against config/detection.toml;
2. vocabulary: field names (`clientX`, `dwell`, `tos_array`...) and DOM event words (`keydown`);
3. shape: numeric series that look like human input timing (monotonic epoch or high-resolution
   timestamps, gaps of tens to hundreds of ms, not constant), and x/y/t tuples, whatever the names.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyveil import bdsignals
from keyveil.catalog import ConfigError, located, read_config
from keyveil.codecs.tree import Field, Layer, LimitError

BEHAVIORAL = ("keystroke", "touch", "pointer", "click", "scroll", "activity", "fingerprint")
CATEGORIES = (*BEHAVIORAL, "other")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}  # most identifying first
# Decoding already bounds nesting (Limits.max_depth, 64); the walk's own cap keeps hand-built trees
# and raised limits off Python's stack: past it, the flow gets the max_depth limit outcome.
MAX_WALK_DEPTH = 128
_EVENT_KEYS = ("extra", "time", "module", "tags", "rate", "sampling_rate")


@dataclass
class Rules:
    names: dict[str, re.Pattern[str]]
    keys: dict[str, str]
    events: dict[str, str]
    features: frozenset[str]
    # route/event name -> categories: a batch repeats a few dozen names, each costs 7 regex matches
    _name_cache: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)

    def name_categories(self, name: str) -> list[str]:
        hit = self._name_cache.get(name)
        if hit is not None:
            return list(hit)
        n = name.lower()
        for prefix in ("falco:", "logger:", "ods:", "pixel:"):
            if n.startswith(prefix):
                n = n[len(prefix) :]
                break
        cats = [c for c, rx in self.names.items() if rx.match(n)]
        if len(self._name_cache) >= 4096:  # names come from the client: keep the cache bounded
            self._name_cache.clear()
        self._name_cache[name] = tuple(cats)
        return cats


def parse_rules(text: str, source: str = "<string>") -> Rules:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    names: dict[str, re.Pattern[str]] = {}
    for cat, pats in data.get("names", {}).items():
        if cat not in BEHAVIORAL:
            loc = located(text, source, r"^\s*" + re.escape(cat) + r"\s*=")
            raise ConfigError(f"{loc}: [names] unknown category {cat!r}")
        names[cat] = re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in pats))
    vocab = data.get("vocabulary", {})
    keys: dict[str, str] = {}
    events: dict[str, str] = {}
    for table, out in (("keys", keys), ("events", events)):
        for cat, words in vocab.get(table, {}).items():
            if cat not in BEHAVIORAL:
                loc = located(text, source, rf"^\s*{table}\.{re.escape(cat)}\s*=")
                raise ConfigError(f"{loc}: [vocabulary.{table}] unknown category {cat!r}")
            for w in words:
                out.setdefault(w.lower(), cat)
    features = frozenset(w.lower() for w in vocab.get("features", []))
    return Rules(names=names, keys=keys, events=events, features=features)


def load_rules(path: str | Path) -> Rules:
    return parse_rules(*read_config(path))


# -- findings ----------------------------------------------------------------------------------


@dataclass
class Series:
    """A numeric timing series inside a payload, in place, for statistics and rewriting."""

    category: str
    container: Any  # list of numbers, or list of dicts/tuples
    column: Any  # None: the container itself; else the dict key / tuple index holding the time
    scale: float  # multiply values by this to get milliseconds

    def values_ms(self) -> np.ndarray:
        vals = self.container if self.column is None else [item[self.column] for item in self.container]
        return np.asarray(vals, dtype=np.float64) * self.scale


@dataclass
class Finding:
    unit: str  # post | event | hit | field | body
    route: str | None
    categories: dict[str, int]  # category -> samples
    signals: set[str]
    owner: Layer | None  # the layer whose value holds `container`
    container: Any
    key: Any
    series: list[Series] = field(default_factory=list)
    data: Any = None  # the unit itself, for format-specific handlers (bd_pdc_signals...)
    stats: dict[str, int] = field(default_factory=dict)  # coarse, from format handlers

    @property
    def category(self) -> str:
        return min(self.categories, key=_RANK.__getitem__) if self.categories else "other"

    @property
    def behavioral(self) -> bool:
        return any(c != "other" for c in self.categories)


@dataclass
class Detection:
    findings: list[Finding]
    layers: list[str]

    def categories(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for f in self.findings:
            for cat, samples in f.categories.items():
                slot = out.setdefault(cat, {"events": 0, "samples": 0})
                slot["events"] += 1
                slot["samples"] += samples
        return out

    def routes(self) -> dict[str, int]:
        return dict(Counter(f.route for f in self.findings if f.route))

    def stats(self) -> dict[str, int]:
        """Coarse statistics for the journal: never raw values."""
        gaps = [np.diff(np.sort(s.values_ms())) for f in self.findings for s in f.series if s.category == "keystroke"]
        gaps = [g for g in gaps if g.size]
        out: dict[str, int] = {}
        for f in self.findings:
            out.update(f.stats)
        if gaps:
            med = float(np.median(np.concatenate(gaps)))
            out["keystroke_median_gap_ms"] = int(round(med / 10.0) * 10)
        return out

    @property
    def behavioral(self) -> bool:
        return any(f.behavioral for f in self.findings)


# -- shape -------------------------------------------------------------------------------------


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float


def timing_shape(values: list, *, relative_ok: bool = False, min_cv: float = 0.1) -> tuple[str, float] | None:
    """(category, scale to ms) if `values` look like human input timestamps, else None.

    Human input: monotonic, at least 4 events, median gap 8 ms - 3 s, gaps that vary (constant
    intervals are timers, not people). Epoch ms, epoch seconds with ms precision, or (when
    `relative_ok` or the values are fractional) high-resolution page-relative milliseconds.
    `min_cv` is the least variation of the gaps; x/y paths, sampled at the display rate, pass a lower one.
    """
    n = len(values)
    if n < 4 or not all(type(v) is int or type(v) is float for v in values):
        return None
    if n > _NUMPY_FROM:
        return _timing_shape_np(values, relative_ok, min_cv)
    # short series (nearly all of them): plain floats beat numpy's per-call overhead by 5-8x
    try:
        a = [float(v) for v in values]
    except OverflowError:  # an int beyond float range is no timestamp
        return None
    if not all(map(math.isfinite, a)):
        return None
    scale = _clock_scale(a[0], relative_ok, lambda: not all(x.is_integer() for x in a))
    if scale is None:
        return None
    d = [(y - x) * scale for x, y in zip(a, a[1:], strict=False)]
    if min(d) < 0 or len(d) - d.count(0.0) < 3:
        return None
    s = sorted(d)
    m = len(s)
    med = s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2
    mean = math.fsum(d) / m
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / m)
    return _verdict(med, s[-1], mean, std, min_cv, scale)


def _clock_scale(first: float, relative_ok: bool, fractional: Callable[[], bool]) -> float | None:
    """Milliseconds per unit of a series starting at `first`: epoch ms, epoch s, or page-relative
    high-resolution ms (fractional values, or `relative_ok`). None: not a clock."""
    if 1e12 <= first <= 4e12:
        return 1.0
    if 1e9 <= first <= 4e9:
        return 1000.0
    if 0 <= first < 1e8 and (relative_ok or fractional()):
        return 1.0
    return None


def _verdict(med: float, top: float, mean: float, std: float, min_cv: float, scale: float) -> tuple[str, float] | None:
    """Human gaps: median 8 ms - 3 s, none over 10 minutes, varying (timers are constant)."""
    if not 8.0 <= med <= 3000.0 or top > 600_000.0:
        return None
    if mean <= 0 or std == 0.0 or std / mean < min_cv:
        return None
    return ("pointer" if med < 35.0 else "keystroke"), scale


_NUMPY_FROM = 256  # series longer than this go through numpy


def _timing_shape_np(values: list, relative_ok: bool, min_cv: float) -> tuple[str, float] | None:
    """timing_shape for long series, vectorised."""
    try:
        a = np.asarray(values, dtype=np.float64)
    except OverflowError:
        return None
    if not np.isfinite(a).all():
        return None
    scale = _clock_scale(float(a[0]), relative_ok, lambda: bool(np.any(a != np.floor(a))))
    if scale is None:
        return None
    d = np.diff(a) * scale
    if (d < 0).any() or np.count_nonzero(d) < 3:
        return None
    return _verdict(float(np.median(d)), float(d.max()), float(d.mean()), float(d.std()), min_cv, scale)


# -- the walk ----------------------------------------------------------------------------------


class Detector:
    def __init__(self, rules: Rules, max_nodes: int = 2_000_000) -> None:
        self.rules = rules
        self.max_nodes = max_nodes

    def detect(self, root: Layer | None, check: Callable[[], None] | None = None) -> Detection:
        """Findings in `root`. `check` is called every few hundred nodes (a time budget raises there)."""
        findings: list[Finding] = []
        if root is None:
            return Detection(findings, [])
        _Walk(self.rules, findings, check).visit(root, None, None, None, 0)
        return Detection(findings, [lay.codec for lay in root.layers()])


class _Walk:
    def __init__(self, rules: Rules, out: list[Finding], check: Callable[[], None] | None = None) -> None:
        self.rules = rules
        self.out = out
        self.check = check
        self.visits = 0

    def visit(self, value: Any, owner: Layer | None, container: Any, key: Any, depth: int) -> None:
        if depth > MAX_WALK_DEPTH:
            raise LimitError("max_depth", f"detection walk deeper than {MAX_WALK_DEPTH}")
        if self.check is not None:
            self.visits += 1
            if not self.visits & 255:
                self.check()
        if isinstance(value, Layer):
            self.visit(value.value, value, container, key, depth + 1)
            return
        if isinstance(value, dict):
            self._dict(value, owner, container, key, depth)
        elif isinstance(value, list):
            if value and isinstance(value[0], Field):
                self._fields(value, owner, depth)
            else:
                self._list(value, owner, container, key, depth)

    # a form or multipart body
    def _fields(self, fields: list[Field], owner: Layer | None, depth: int) -> None:
        names = {f.name for f in fields}
        if "ev" in names and "id" in names:  # a Meta Pixel hit
            ev = next(str(f.value) for f in fields if f.name == "ev")
            # the button/form/page descriptions are page structure ("tag": "input"), not input events
            scanned = [f.value for f in fields if _pixel_field(f.name) not in _PIXEL_COUNTED]
            cats, signals, series = self._classify_unit(f"pixel:{ev}", scanned)
            hit = Finding("hit", f"pixel:{ev}", cats, signals, owner, None, None, series, fields)
            hit.stats = pixel_stats(fields)
            self.out.append(hit)
            return
        for i, f in enumerate(fields):
            lname = f.name.lower()
            cat = self.rules.keys.get(lname)
            if cat and lname not in self.rules.features:
                cats, signals, series = self._named_field(cat, f.value)
                self.out.append(Finding("field", f.name, cats, signals, owner, fields, i, series))
                continue
            self.visit(f.value, owner, fields, i, depth + 1)

    def _dict(self, d: dict, owner: Layer | None, container: Any, key: Any, depth: int) -> None:
        name = d.get("name")
        if isinstance(name, str) and any(k in d for k in _EVENT_KEYS):
            cats, signals, series = self._classify_unit(name, d)
            event = Finding("event", name, cats, signals, owner, container, key, series, d)
            if name.endswith("bd_pdc_signals"):  # a Falco event on a socket: its extra is the post's `e`
                _bd_classify(event, {"e": d.get("extra")})
            self.out.append(event)
            return
        for k, v in d.items():
            lk = k.lower() if isinstance(k, str) else k
            if lk in self.rules.features:
                continue
            cat = self.rules.keys.get(lk) if isinstance(lk, str) else None
            if cat:
                cats, signals, series = self._named_field(cat, v)
                self.out.append(Finding("field", str(k), cats, signals, owner, d, k, series))
                continue
            if isinstance(v, list):
                shaped = self._series(v)
                if shaped is not None:
                    found, series = shaped
                    self.out.append(Finding("field", str(k), found, {"shape"}, owner, d, k, series))
                    continue
            self.visit(v, owner, d, k, depth + 1)

    def _list(self, lst: list, owner: Layer | None, container: Any, key: Any, depth: int) -> None:
        if _is_post(lst):
            route = lst[0]
            cats, signals, series = self._classify_unit(route, lst[1])
            finding = Finding("post", route, cats, signals, owner, container, key, series, lst)
            if route.endswith("bd_pdc_signals"):
                _bd_classify(finding, lst[1])
            self.out.append(finding)
            return
        for i, item in enumerate(lst):
            if isinstance(item, list):
                if _is_post(item) or item and isinstance(item[0], (dict, list, Layer)):
                    self.visit(item, owner, lst, i, depth + 1)
                    continue
                shaped = self._series(item)
                if shaped is not None:
                    found, series = shaped
                    self.out.append(Finding("field", None, found, {"shape"}, owner, lst, i, series))
                    continue
            self.visit(item, owner, lst, i, depth + 1)

    # -- classification of one unit ----------------------------------------------------------
    def _classify_unit(self, name: str | None, data: Any) -> tuple[dict[str, int], set[str], list[Series]]:
        cats: dict[str, int] = {}
        signals: set[str] = set()
        series: list[Series] = []
        if name:
            for c in self.rules.name_categories(name):
                cats[c] = cats.get(c, 0)
                signals.add("name")
        self._scan(data, cats, signals, series, 0)
        for c in cats:
            if cats[c] == 0:
                cats[c] = 1
        if not cats:
            cats["other"] = 1
        return cats, signals, series

    def _named_field(self, cat: str, value: Any) -> tuple[dict[str, int], set[str], list[Series]]:
        """A field whose name is in the vocabulary: what is inside it, or the field itself."""
        cats: dict[str, int] = {}
        signals = {"vocab"}
        series: list[Series] = []
        if isinstance(value, (dict, list, Layer)):
            self._scan_value(value, cats, signals, series, 0, named=cat)
        _top_up(cats, cat, value, 0)
        return cats, signals, series

    def _scan(self, v: Any, cats: dict[str, int], signals: set[str], series: list[Series], depth: int) -> None:
        """Collect vocabulary and shape evidence anywhere below a unit.

        Samples count timing values (or records) once: a list named in the vocabulary that is also a
        timing series counts its values once, and a named container counts what is found inside it.
        """
        if depth > MAX_WALK_DEPTH:
            raise LimitError("max_depth", f"detection walk deeper than {MAX_WALK_DEPTH}")
        if isinstance(v, (Layer, Field)):
            self._scan(v.value, cats, signals, series, depth + 1)
        elif isinstance(v, dict):
            if "tos_array" in v:
                cats["activity"] = cats.get("activity", 0) + _popcount(v["tos_array"])
                signals.add("vocab")
            for k, x in v.items():
                lk = k.lower() if isinstance(k, str) else None
                if lk in self.rules.features:
                    continue
                cat = self.rules.keys.get(lk) if lk and lk != "tos_array" else None
                if cat:
                    signals.add("vocab")
                    before = sum(cats.values())
                    if isinstance(x, (dict, list, Layer)):
                        self._scan_value(x, cats, signals, series, depth, named=cat)
                    _top_up(cats, cat, x, before)
                    continue
                if isinstance(x, str):
                    self._event_word(x, cats, signals)
                elif isinstance(x, (dict, list, Layer)):
                    self._scan_value(x, cats, signals, series, depth)
        elif isinstance(v, list):
            self._scan_value(v, cats, signals, series, depth)

    def _scan_value(self, x: Any, cats: dict[str, int], signals: set[str], series: list[Series], depth: int,
                    named: str | None = None) -> None:
        if isinstance(x, list):
            shaped = self._series(x)
            if shaped is not None:
                found, s = shaped
                if named and set(found) <= {"keystroke", "pointer"}:
                    found = {named: sum(found.values())}  # the name knows better than the rate
                    for one in s:
                        one.category = named
                for c, n in found.items():
                    cats[c] = cats.get(c, 0) + n
                series.extend(s)
                signals.add("shape")
                return
            if named and x and all(_is_num(e) for e in x):
                cats[named] = cats.get(named, 0) + len(x)  # a named list of durations (dwell, flight)
                return
            for e in x:
                if isinstance(e, str):
                    self._event_word(e, cats, signals)
                elif isinstance(e, (dict, list, Layer, Field)):
                    self._scan(e, cats, signals, series, depth + 1)
        else:
            self._scan(x, cats, signals, series, depth + 1)

    def _event_word(self, x: str, cats: dict[str, int], signals: set[str]) -> None:
        ecat = self.rules.events.get(x.lower()) if len(x) < 20 else None
        if ecat:
            cats[ecat] = cats.get(ecat, 0) + 1
            signals.add("vocab")

    def _series(self, lst: list) -> tuple[dict[str, int], list[Series]] | None:
        """A timing series in `lst`: plain numbers, x/y/t tuples, or records sharing a time field.
        Returns samples per category (records of mixed DOM types count per type) and the series."""
        n = len(lst)
        if n < 4:
            return None
        first = lst[0]
        if _is_num(first):
            shaped = timing_shape(lst)
            if shaped:
                return {shaped[0]: n}, [Series(shaped[0], lst, None, shaped[1])]
            return None
        if isinstance(first, list) and 3 <= len(first) <= 4 and all(
            isinstance(t, list) and len(t) == len(first) for t in lst
        ):
            col = len(first) - 1
            shaped = timing_shape([t[col] for t in lst], relative_ok=True, min_cv=0.02)
            if shaped and all(_is_num(t[0]) and _is_num(t[1]) for t in lst):
                return {"pointer": n}, [Series("pointer", lst, col, shaped[1])]
            return None
        if isinstance(first, dict):
            if not all(isinstance(x, dict) for x in lst):
                return None
            for k, v in first.items():
                if not _is_num(v) or not all(k in x and _is_num(x[k]) for x in lst):
                    continue
                xy = any({"x", "y"} <= x.keys() or {"clientX", "clientY"} <= x.keys() for x in lst)
                shaped = timing_shape([x[k] for x in lst], relative_ok=True, min_cv=0.02 if xy else 0.1)
                if not shaped:
                    continue
                found: dict[str, int] = {}
                for x in lst:
                    c = self.rules.events.get(str(x.get("type", "")).lower())
                    if c is None:
                        c = "pointer" if xy else shaped[0]
                    found[c] = found.get(c, 0) + 1
                main = max(found, key=found.__getitem__)
                return found, [Series(main, lst, k, shaped[1])]
        return None


# Pixel custom-data fields that describe what the visitor clicked: journaled only as counts
_PIXEL_COUNTED = {"buttonfeatures": "pixel_button_features", "buttontext": "pixel_button_text_chars",
                  "formfeatures": "pixel_form_features", "pagefeatures": "pixel_page_features"}


def _pixel_field(name: str) -> str:
    name = name.lower()
    return name[3:-1] if name.startswith("cd[") and name.endswith("]") else name


def pixel_stats(fields: list[Field]) -> dict[str, int]:
    """Counts, never content: features described (keys or items), characters of the button text."""
    out: dict[str, int] = {}
    for f in fields:
        key = _PIXEL_COUNTED.get(_pixel_field(f.name))
        if key is None:
            continue
        v = f.value.value if isinstance(f.value, Layer) else f.value
        out[key] = out.get(key, 0) + (len(v) if isinstance(v, (str, list, dict)) else 1)
    return out


def bd_e_layer(data: Any) -> Layer | None:
    """The decoded `e` of a bd_pdc_signals post: {"asid", "sjd", ...}, or None."""
    e = data.get("e") if isinstance(data, dict) else None
    if isinstance(e, Layer) and isinstance(e.value, dict) and "asid" in e.value and "sjd" in e.value:
        return e
    return None


def _bd_classify(finding: Finding, data: Any) -> None:
    """Decrypt Meta's bot-detection signals: what they hold decides the categories."""
    e = bd_e_layer(data)
    if e is None:
        return
    try:
        summary = bdsignals.process_bd_post(e.value).summary
    except bdsignals.SignalsError:
        finding.signals.add("undecryptable")
        return
    cats = {c: n for c, n in summary.categories.items() if n}
    if cats:
        finding.categories = cats
    finding.signals.add("decrypted")
    finding.stats = summary.stats()


def _is_post(lst: list) -> bool:
    """Banzai post: [route, data, time_ms, retry_count, size_bytes]."""
    return (
        4 <= len(lst) <= 6
        and isinstance(lst[0], str)
        and isinstance(lst[1], (dict, list, Layer, str))
        and _is_num(lst[2])
        and _is_num(lst[3])
    )


def _top_up(cats: dict[str, int], cat: str, value: Any, before: int) -> None:
    """A named field counts at least its numeric values (or 1): what the walk inside it found
    (since `before`) is topped up to that, so every value counts once."""
    found = sum(cats.values()) - before
    want = max(_numbers(value, 0), 1)
    if want > found:
        cats[cat] = cats.get(cat, 0) + want - found


def _numbers(v: Any, depth: int) -> int:
    if depth > 32:
        return 0
    if isinstance(v, Layer):
        return _numbers(v.value, depth + 1)
    if isinstance(v, (dict, list)):
        n = 0
        for x in v.values() if isinstance(v, dict) else v:
            if type(x) is int or type(x) is float:  # counted here, not in a call per number (3x faster)
                n += 1
            elif isinstance(x, (dict, list, Layer)):
                n += _numbers(x, depth + 1)
        return n
    return 1 if _is_num(v) else 0


def _popcount(v: Any) -> int:
    if isinstance(v, list):
        return sum(bin(int(x) & 0xFFFFFFFF).count("1") for x in v if _is_num(x))
    return 1
