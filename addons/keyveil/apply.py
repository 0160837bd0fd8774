"""Carry out a plan on the decoded tree: remove stripped units, re-time rewritten series.

Changes mark the owning layer dirty, so only the layers that changed are re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from keyveil import bdsignals
from keyveil.detect import Finding, Series, bd_e_layer

try:  # the timing rewriter is optional at import time: without it, rewrite falls back to strip
    from keyveil import timing
except ImportError:  # pragma: no cover
    timing = None  # type: ignore[assignment]


@dataclass
class ApplyResult:
    stripped: int = 0
    rewritten: int = 0


class Rewriter:
    """Re-times the timing series of a finding with keyveil.timing (config from policy [rewrite])."""

    def __init__(self, cfg: dict[str, Any] | None = None, session_seed: bytes | None = None) -> None:
        self.cfg = None
        self.session_seed = session_seed
        if timing is None:
            return
        cfg = dict(cfg or {})
        fields = getattr(timing.RewriteConfig, "__dataclass_fields__", {})
        self.cfg = timing.RewriteConfig(**{k: v for k, v in cfg.items() if k in fields})

    @property
    def available(self) -> bool:
        return self.cfg is not None

    def new_rng(self) -> Any:
        """One generator per request, so every series in a payload shares one synthetic typist."""
        return timing.make_rng(self.cfg, self.session_seed) if self.cfg is not None else None

    def rewrite(self, finding: Finding, not_after_ms: float | None = None, rng: Any = None) -> bool:
        if self.cfg is None or not (finding.series or "decrypted" in finding.signals):
            return False
        rng = rng if rng is not None else self.new_rng()
        if finding.route and finding.route.endswith("bd_pdc_signals"):
            return self._bd(finding, rng, not_after_ms)
        done = False
        for s in finding.series:
            done |= self._series(s, rng, not_after_ms)
        return done

    def _bd(self, finding: Finding, rng: Any, not_after_ms: float | None) -> bool:
        """Re-time the 30100 key records inside the encrypted signals and re-encrypt them."""
        e = bd_e_layer(finding.data[1])
        if e is None:
            return False

        def retime(series: bdsignals.KeystrokeSeries) -> list[float | None]:
            # key records carry no key identity: releases pair with the earliest open press
            keys = (bdsignals.KEY_DOWN, bdsignals.KEY_UP)
            idx = [i for i, (t, a) in enumerate(zip(series.times, series.actions, strict=True))
                   if t is not None and a in keys]
            out: list[float | None] = [None] * len(series.times)
            if len(idx) < 2:
                return out
            old = np.asarray([series.times[i] for i in idx], dtype=np.float64) * 1000.0
            is_down = np.asarray([series.actions[i] == bdsignals.KEY_DOWN for i in idx])
            new = timing.rewrite_key_stream(old, is_down, self.cfg, rng, not_after=not_after_ms)
            for i, v in zip(idx, np.asarray(new) / 1000.0, strict=True):
                out[i] = float(v)
            return out

        try:
            res = bdsignals.process_bd_post(e.value, retime=retime)
        except (bdsignals.SignalsError, ValueError):
            return False
        if not res.changed or res.e is None:
            return False
        e.value = res.e
        e.dirty = True
        return True

    def _series(self, s: Series, rng: Any, not_after_ms: float | None) -> bool:
        if s.category not in timing.KINDS:
            return False
        old = s.values_ms()
        if old.size < 2:
            return False
        # the request time bounds epoch series only; page-relative clocks have no known origin
        bound = not_after_ms if float(old[0]) > 1e11 else None
        try:
            if s.category == "pointer" and s.column is not None and isinstance(s.container[0], list):
                xs = np.asarray([t[0] for t in s.container], dtype=np.float64)
                ys = np.asarray([t[1] for t in s.container], dtype=np.float64)
                new = timing.rewrite_path(xs, ys, old, self.cfg, rng, not_after=bound)
            else:
                new = timing.rewrite_times(old, self.cfg, rng, kind=s.category, not_after=bound)
        except ValueError:  # not a series the rewriter accepts: the caller strips it instead
            return False
        _write_back(s, np.asarray(new, dtype=np.float64) / s.scale)
        return True


def _write_back(s: Series, values: np.ndarray) -> None:
    """Store new values in place, keeping ints as ints and the precision of the originals."""
    def conv(old: Any, new: float) -> Any:
        if type(old) is int:
            return int(round(new))
        return round(float(new), 3)

    if s.column is None:
        for i, v in enumerate(values):
            s.container[i] = conv(s.container[i], v)
    else:
        for item, v in zip(s.container, values, strict=True):
            item[s.column] = conv(item[s.column], v)


def _bd_strip(f: Finding, ids: frozenset[int]) -> bool | None:
    """Strip chosen signal ids from a bd_pdc_signals post. True: changed in place; None: the post
    is left with nothing and must go; False: not applicable."""
    e = bd_e_layer(f.data[1]) if isinstance(f.data, list) else None
    if e is None:
        return False
    try:
        res = bdsignals.process_bd_post(e.value, strip_ids=ids)
    except bdsignals.SignalsError:
        return False
    if res.e is None:
        return None
    if res.changed:
        e.value = res.e
        e.dirty = True
    return True


def apply_plan(
    findings: list[Finding],
    actions: list[str],
    rewriter: Rewriter,
    not_after_ms: float | None = None,
    bd_strip_ids: frozenset[int] = frozenset(),
) -> ApplyResult:
    result = ApplyResult()
    removals: dict[int, tuple[Any, Any, list[Any]]] = {}
    rng = rewriter.new_rng() if "rewrite" in actions else None
    for f, act in zip(findings, actions, strict=True):
        if act == "strip" and bd_strip_ids and f.route and f.route.endswith("bd_pdc_signals"):
            done = _bd_strip(f, bd_strip_ids)
            if done:
                result.stripped += 1
                continue
            # None (nothing left) or False (not decryptable): remove the whole post
        if act == "rewrite":
            if rewriter.rewrite(f, not_after_ms, rng):
                if f.owner is not None:
                    f.owner.dirty = True
                result.rewritten += 1
                continue
            act = "strip"  # nothing we can re-time: remove it rather than leak it
        if act not in ("strip", "drop") or f.container is None or f.owner is None:
            continue
        slot = removals.setdefault(id(f.container), (f.container, f.owner, []))
        slot[2].append(f.key)
    for container, owner, keys in removals.values():
        if isinstance(container, list):
            for k in sorted(set(keys), reverse=True):
                del container[k]
        else:
            for k in keys:
                container.pop(k, None)
        owner.dirty = True
        result.stripped += len(keys)
    return result
