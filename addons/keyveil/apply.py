"""Carry out a plan on the decoded tree: remove stripped units, re-time rewritten series.

Changes mark the owning layer dirty, so only the layers that changed are re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from keyveil.detect import Finding, Series

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

    def rewrite(self, finding: Finding, not_after_ms: float | None = None) -> bool:
        if self.cfg is None or not finding.series:
            return False
        rng = timing.make_rng(self.cfg, self.session_seed)
        done = False
        for s in finding.series:
            done |= self._series(s, rng, not_after_ms)
        return done

    def _series(self, s: Series, rng: Any, not_after_ms: float | None) -> bool:
        old = s.values_ms()
        if old.size < 2:
            return False
        if s.category == "pointer" and s.column is not None and isinstance(s.container[0], list):
            xs = np.asarray([t[0] for t in s.container], dtype=np.float64)
            ys = np.asarray([t[1] for t in s.container], dtype=np.float64)
            new = timing.rewrite_path(xs, ys, old, self.cfg, rng, not_after=not_after_ms)
        else:
            new = timing.rewrite_times(old, self.cfg, rng, kind=s.category, not_after=not_after_ms)
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


def apply_plan(findings: list[Finding], actions: list[str], rewriter: Rewriter, not_after_ms: float | None = None) -> ApplyResult:
    result = ApplyResult()
    removals: dict[int, tuple[Any, Any, list[Any]]] = {}
    for f, act in zip(findings, actions, strict=True):
        if act == "rewrite":
            if rewriter.rewrite(f, not_after_ms):
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
