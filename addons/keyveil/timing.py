"""Re-timing of human input series: keystrokes, clicks, pointer paths, scroll and touch.

Pure numpy: no mitmproxy, no knowledge of payload formats. Every function takes and returns event
timestamps in milliseconds (epoch or relative: same base out as in); callers holding epoch seconds
multiply by 1000 first.

Three modes (see `RewriteConfig` and docs/privacy.md for what each one measurably hides):

- `delay`: Kloak's bounded random delay. Each event is moved later by a delay drawn uniformly from
  [the lower bound that keeps the order, the maximum delay]. The person's rhythm survives, blurred.
- `resample`: the person's intervals are replaced by draws from a population model shared by
  everyone (log-normal, per key pair when pairs are known), with a synthetic "persona" (tempo, hold
  scale, per-pair quirks) drawn fresh per payload, or once per session. Output does not depend on
  the person's intervals at strength 1.
- `quantize`: timestamps floored onto a coarse grid. Weak: it keeps the rhythm at grid resolution.

Entry points: `rewrite_times` (one series of one kind), `rewrite_keystrokes` (press/release per key),
`rewrite_key_stream` (keydown/keyup records without key identity, e.g. Meta's 30100 records),
`rewrite_hold_flight` (dwell/flight lists), `rewrite_path` (x/y/t pointer or touch paths); all take a
`RewriteConfig` and a generator from `make_rng`.

Invariants every mode keeps (tests/test_timing.py checks them with hypothesis):
order of events kept; every release after its press; DD = H + UD (times are returned, the
intervals derive from them); the last timestamp never after `not_after`; no constant intervals;
intervals inside the human range of their kind (`MODELS`) whenever the input was (resample:
always); long pauses stay pauses.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Mode = Literal["delay", "resample", "quantize"]
SeedScope = Literal["payload", "session"]
MODES: tuple[str, ...] = ("delay", "resample", "quantize")
SEED_SCOPES: tuple[str, ...] = ("payload", "session")
KINDS: tuple[str, ...] = ("keystroke", "click", "pointer", "scroll", "touch")

# Interval spread below which a series counts as constant: 3 ms survives rounding to whole ms.
MIN_SPREAD_MS = 3.0
# Resampled pauses keep their length up to this log-jitter (times strength).
PAUSE_JITTER = 0.25
# Per-pair quirk of a synthetic persona (log SD), so it looks like one person, not an average.
PAIR_SIGMA = 0.12


@dataclass(frozen=True)
class RewriteConfig:
    """How timing series are rewritten. Each field becomes the mitmproxy option `keyveil_rewrite_<name>`."""

    mode: Mode = "resample"
    """`delay` (bounded random delay, Kloak), `resample` (draws from a population model: the strong
    one), or `quantize` (coarse grid: weak, kept for comparison)."""
    strength: float = 1.0
    """0..1, how far from the person's own timing. delay: fraction of `max_delay_ms`; resample:
    weight of the population draw against the person's interval (log space; 1 = person-independent);
    quantize: fraction of `grid_ms` (floored at 1 ms)."""
    max_delay_ms: float = 100.0
    """delay mode: largest delay added to one event (Kloak's published setting is 100 ms)."""
    grid_ms: float = 50.0
    """quantize mode: grid step in ms (1..1000). Rounding to 10-15 ms is known to hide almost nothing."""
    seed_scope: SeedScope = "payload"
    """`payload`: a fresh synthetic persona per payload (payloads cannot be linked by timing);
    `session`: one persona per session seed (consistent within a session, linkable inside it;
    without a session seed, make_rng falls back to a fresh persona)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rewrite mode must be one of {MODES}, not {self.mode!r}")
        if self.seed_scope not in SEED_SCOPES:
            raise ValueError(f"rewrite seed_scope must be one of {SEED_SCOPES}, not {self.seed_scope!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"rewrite strength must be within 0..1, not {self.strength}")
        if not 0.0 <= self.max_delay_ms <= 10_000.0:
            raise ValueError(f"rewrite max_delay_ms must be within 0..10000, not {self.max_delay_ms}")
        if not 1.0 <= self.grid_ms <= 1000.0:
            raise ValueError(f"rewrite grid_ms must be within 1..1000, not {self.grid_ms}")

    @property
    def delay_ms(self) -> float:
        return self.max_delay_ms * self.strength

    @property
    def step_ms(self) -> float:
        return max(1.0, self.grid_ms * self.strength)


@dataclass(frozen=True)
class IntervalModel:
    """Population model of one kind of interval: log-normal around `median_ms`, kept to [lo, hi].

    Intervals above `hi_ms` are pauses (thinking, reading), not rhythm: they are kept, jittered."""

    median_ms: float
    sigma: float
    """log SD of one event around the persona's median (within-person noise)."""
    between: float
    """log SD of the persona's tempo around the population median (between-person spread)."""
    lo_ms: float
    hi_ms: float


# Keystroke values: Aalto 136M-keystroke study, inter-key mean ~239 ms, SD ~112 ms: log-normal with
# total log SD sqrt(0.38^2 + 0.22^2) = 0.44 and median 217 ms has that mean and SD. Holds: CMU
# and Aalto report means of 90-150 ms. Pointer/touch: browsers deliver moves at the frame rate.
MODELS: dict[str, IntervalModel] = {
    "keystroke": IntervalModel(217.0, 0.38, 0.22, 40.0, 1500.0),
    "hold": IntervalModel(110.0, 0.25, 0.15, 50.0, 350.0),
    "click": IntervalModel(900.0, 0.70, 0.30, 100.0, 10_000.0),
    "pointer": IntervalModel(16.0, 0.35, 0.10, 4.0, 200.0),
    "scroll": IntervalModel(40.0, 0.50, 0.20, 8.0, 500.0),
    "touch": IntervalModel(16.0, 0.35, 0.10, 8.0, 200.0),
}


class VeilGenerator(np.random.Generator):
    """A numpy Generator that also carries the seed of a session-wide persona (seed_scope=session).

    Event noise comes from the generator itself (fresh per payload); the persona (tempo, quirks)
    comes from `persona_seed`, so it stays the same across the payloads of one session."""

    def __init__(self, bit_generator: np.random.BitGenerator, persona_seed: bytes | None = None) -> None:
        super().__init__(bit_generator)
        self.persona_seed = persona_seed


def make_rng(cfg: RewriteConfig, session_seed: bytes | None = None) -> np.random.Generator:
    """A generator seeded from `secrets` (never from time or content). With seed_scope=session and a
    session seed, the persona is derived from the session seed while event noise stays fresh."""
    bits = np.random.PCG64(np.random.SeedSequence(secrets.randbits(128)))
    if cfg.seed_scope == "session" and session_seed:
        return VeilGenerator(bits, hashlib.sha256(b"keyveil-persona\0" + session_seed).digest())
    # One persona for every series of this payload, so they agree with each other.
    return VeilGenerator(bits, secrets.token_bytes(32))


@dataclass(frozen=True)
class Persona:
    """A synthetic typist/mover: standard-normal draws scaled per model when used."""

    tempo_z: float
    hold_z: float
    quirk_seed: int

    def median(self, model: IntervalModel) -> float:
        return model.median_ms * math.exp(model.between * self.tempo_z)

    def hold_median(self) -> float:
        hold = MODELS["hold"]
        return hold.median_ms * math.exp(hold.between * self.hold_z)

    def pair_quirk(self, a: str, b: str) -> float:
        """This persona's fixed log offset for one key pair."""
        h = zlib.crc32(f"{_norm_key(a)}\0{_norm_key(b)}".encode())
        return float(np.random.default_rng([self.quirk_seed, h]).normal(0.0, PAIR_SIGMA))


def persona_of(rng: np.random.Generator) -> Persona:
    seed = getattr(rng, "persona_seed", None)
    src = np.random.default_rng(np.frombuffer(seed, dtype=np.uint32)) if seed else rng
    tempo_z, hold_z = src.standard_normal(2)
    return Persona(float(tempo_z), float(hold_z), int(src.integers(0, 2**63 - 1)))


# QWERTY finger of each key (0-3 left pinky..index, 6-9 right index..pinky), for the pair model.
_FINGER: dict[str, int] = {}
for _keys, _finger in (
    ("1qaz`", 0), ("2wsx", 1), ("3edc", 2), ("4rfv5tgb", 3),
    ("6yhn7ujm", 6), ("8ik,", 7), ("9ol.", 8), ("0p;/-=[]'\\", 9),
):  # fmt: skip
    for _k in _keys:
        _FINGER[_k] = _finger


def _norm_key(key: str) -> str:
    k = key.lower()
    if k in (" ", "space", "spacebar"):
        return " "
    if k.startswith("key") and len(k) == 4:
        return k[3]
    if k.startswith("digit") and len(k) == 6:
        return k[5]
    return k


# DD of a key pair relative to the overall median, by how the fingers move (QWERTY). Chosen so the
# geometric mean over English digraphs is 1.0: the pair model and the pair-less model agree overall.
PAIR_FACTOR = {"space": 1.0, "alternate": 0.9, "same_hand": 1.12, "same_finger": 1.4, "repeat": 0.95}


def pair_class(a: str, b: str) -> str | None:
    """How key `b` follows key `a`: space, alternate (hands), same_hand, same_finger, repeat; None
    when a key is not on the letter/digit block."""
    a, b = _norm_key(a), _norm_key(b)
    if a == " " or b == " ":
        return "space"
    fa, fb = _FINGER.get(a), _FINGER.get(b)
    if fa is None or fb is None:
        return None
    if a == b:
        return "repeat"
    if (fa < 5) != (fb < 5):
        return "alternate"
    return "same_finger" if fa == fb else "same_hand"


def pair_median_ms(a: str, b: str) -> float:
    """Population median DD for key `a` then `b`: alternating hands are fastest, the same finger on
    another key slowest, as digraph studies report. Unknown keys get the overall median."""
    cls = pair_class(a, b)
    return MODELS["keystroke"].median_ms * (PAIR_FACTOR[cls] if cls else 1.0)


# --- small helpers ---------------------------------------------------------------------------


def _as_series(t: np.ndarray | Sequence[float], name: str = "t") -> np.ndarray:
    a = np.array(t, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite values")
    if a.size > 1 and np.any(np.diff(a) < 0):
        raise ValueError(f"{name} is not in time order")
    return a


def _truncated_lognormal(
    mu: np.ndarray, sigma: float, lo: float, hi: float, rng: np.random.Generator
) -> np.ndarray:
    """Log-normal draws redrawn until inside [lo, hi] (a few rounds, then clipped)."""
    x = np.exp(mu + sigma * rng.standard_normal(mu.shape))
    for _ in range(8):
        bad = (x < lo) | (x > hi)
        if not bad.any():
            break
        x[bad] = np.exp(mu[bad] + sigma * rng.standard_normal(int(bad.sum())))
    return np.clip(x, lo, hi)


def _blend(orig: np.ndarray, draw: np.ndarray, strength: float, lo: float, hi: float) -> np.ndarray:
    """Geometric mix of the person's interval (clipped to human range) and a population draw."""
    if strength >= 1.0:
        return draw
    own = np.clip(orig, lo, hi)
    return np.exp((1.0 - strength) * np.log(own) + strength * np.log(draw))


def _vary(intervals: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Break a constant run (a bot signature) so the spread is MIN_SPREAD_MS: lengthen the
    second-to-last interval and shorten the last (both ends kept), else shorten the last, else
    lengthen it."""
    if intervals.size < 2 or np.ptp(intervals) >= MIN_SPREAD_MS:
        return intervals
    out = intervals.copy()
    top, bottom = float(out.max()), float(out.min())
    up = top + MIN_SPREAD_MS - out[-2]
    if out[-1] - up >= lo and top + MIN_SPREAD_MS <= hi:
        out[-2] += up
        out[-1] -= up
    elif bottom - MIN_SPREAD_MS >= lo:
        out[-1] = bottom - MIN_SPREAD_MS
    else:
        out[-1] = top + MIN_SPREAD_MS
    return out


def _cap_end(times: np.ndarray, last: float, not_after: float | None) -> np.ndarray:
    """Last resort: shift everything earlier so the latest event is not after the request."""
    if not_after is None or last <= not_after:
        return times
    return np.minimum(times - (last - not_after), not_after)  # minimum: the subtraction may round up


def _scale_floor(intervals: np.ndarray, lo: float) -> float:
    """Smallest uniform scale that keeps every interval >= lo and a non-constant series non-constant."""
    if intervals.size == 0:
        return 1.0
    floor = lo / float(intervals.min())
    if intervals.size >= 2:
        floor = max(floor, MIN_SPREAD_MS / max(float(np.ptp(intervals)), MIN_SPREAD_MS))
    return floor


def _place(
    rel_end: float, t0: float, span0: float, not_after: float | None, floor: float
) -> tuple[float, float]:
    """Start and scale for a synthetic series whose latest event is `rel_end` after its first.

    Keep the original start if the series fits before `not_after`; else start earlier, by at most
    the original span (so a fast typist's series may take twice as long, ending at the request);
    else compress it uniformly, but not below `floor` (see _scale_floor)."""
    if not_after is None or t0 + rel_end <= not_after:
        return t0, 1.0
    earliest = t0 - max(span0, 0.0)
    start = not_after - rel_end
    if start >= earliest:
        return start, 1.0
    scale = max((not_after - earliest) / rel_end, floor) if rel_end > 0 else 1.0
    return earliest, min(scale, 1.0)


# --- generic series --------------------------------------------------------------------------


def rewrite_times(
    t: np.ndarray | Sequence[float],
    cfg: RewriteConfig,
    rng: np.random.Generator,
    *,
    kind: str = "keystroke",
    not_after: float | None = None,
) -> np.ndarray:
    """Re-time a series of event timestamps (ms) of one `kind` (see `MODELS`)."""
    if kind not in MODELS:
        raise ValueError(f"unknown timing kind {kind!r}; known: {sorted(MODELS)}")
    a = _as_series(t)
    model = MODELS[kind]
    if a.size == 0:
        return a
    if cfg.mode == "delay":
        out = _delay_series(a, model, cfg.delay_ms, rng, not_after)
    elif cfg.mode == "quantize":
        out = _quantize_series(a, model, cfg.step_ms)
    else:
        out = _resample_series(a, model, cfg.strength, rng, persona_of(rng), not_after)
    return _cap_end(out, float(out[-1]), not_after)


def _delay_series(
    a: np.ndarray, model: IntervalModel, max_delay: float, rng: np.random.Generator, not_after: float | None
) -> np.ndarray:
    gaps = np.diff(a)
    # Room the events after i need at least, so no event is pushed past not_after by the ones before.
    room = np.concatenate((np.cumsum(np.minimum(gaps, model.lo_ms)[::-1])[::-1], [0.0]))
    out = np.empty_like(a)
    u = rng.random(a.size)
    for i, ti in enumerate(a):
        lb, ub = ti, ti + max_delay
        if not_after is not None:
            ub = min(ub, max(not_after - room[i], ti))
        if i:
            gap = gaps[i - 1]
            lb = max(lb, out[i - 1] + min(gap, model.lo_ms))  # order, and no shorter than human
            ub = min(ub, out[i - 1] + (model.hi_ms if gap <= model.hi_ms else gap + max_delay))
        out[i] = lb + u[i] * (ub - lb) if ub > lb else lb
    return _retime(
        out, _vary(np.diff(out), min(model.lo_ms, float(gaps.min()) if gaps.size else 0.0), model.hi_ms)
    )


def _retime(times: np.ndarray, intervals: np.ndarray) -> np.ndarray:
    return np.concatenate(([times[0]], times[0] + np.cumsum(intervals)))


def _grid_steps(k: np.ndarray, gaps: np.ndarray, lo: float, hi: float, g: float) -> np.ndarray:
    """Sequential clamp of grid indices: each step at least min(lo, gap) and at most max(hi, gap)."""
    out = k.copy()
    for i in range(1, out.size):
        low = math.ceil(min(lo, gaps[i - 1]) / g - 1e-9) if gaps[i - 1] > 0 else 0
        high = max(low, math.floor(max(hi, gaps[i - 1]) / g + 1e-9))
        out[i] = min(max(out[i], out[i - 1] + low), out[i - 1] + high)
    return out


def _vary_grid(k: np.ndarray, gaps: np.ndarray, lo: float, g: float) -> np.ndarray:
    """Constant grid steps: move the last event one step (earlier when the range allows)."""
    d = np.diff(k)
    if d.size < 2 or np.ptp(d) > 0:
        return k
    out = k.copy()
    last = d[-1]
    low = math.ceil(min(lo, gaps[-1]) / g - 1e-9) if gaps[-1] > 0 else 0
    if last - 1 >= max(low, 1):
        out[-1] -= 1
    else:
        out[-1] += 1  # inside the range for grids up to 100 ms; coarser grids may leave it
    return out


def _quantize_series(a: np.ndarray, model: IntervalModel, g: float) -> np.ndarray:
    k = np.floor(a / g)
    gaps = np.diff(a)
    k = _grid_steps(k, gaps, model.lo_ms, model.hi_ms, g)
    k = _vary_grid(k, gaps, model.lo_ms, g)
    return k * g


def _pause_intervals(
    gaps: np.ndarray, model: IntervalModel, strength: float, rng: np.random.Generator
) -> np.ndarray:
    return gaps * np.exp(rng.uniform(-PAUSE_JITTER, PAUSE_JITTER, gaps.size) * strength)


def _resample_series(
    a: np.ndarray,
    model: IntervalModel,
    strength: float,
    rng: np.random.Generator,
    persona: Persona,
    not_after: float | None,
    medians: np.ndarray | None = None,
) -> np.ndarray:
    if a.size == 1:
        return a.copy()
    gaps = np.diff(a)
    pause = gaps > model.hi_ms
    mu = np.log(medians if medians is not None else np.full(gaps.size, persona.median(model)))
    draw = _truncated_lognormal(mu, model.sigma, model.lo_ms, model.hi_ms, rng)
    new = np.where(
        pause,
        _pause_intervals(gaps, model, strength, rng),
        _blend(gaps, draw, strength, model.lo_ms, model.hi_ms),
    )
    new = _vary(new, model.lo_ms, model.hi_ms)
    rel = np.concatenate(([0.0], np.cumsum(new)))
    start, scale = _place(
        float(rel[-1]), float(a[0]), float(a[-1] - a[0]), not_after, _scale_floor(new, model.lo_ms)
    )
    return start + rel * scale


# --- keystrokes ------------------------------------------------------------------------------


def rewrite_keystrokes(
    down: np.ndarray | Sequence[float],
    up: np.ndarray | Sequence[float],
    cfg: RewriteConfig,
    rng: np.random.Generator,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    not_after: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-time key events: `down[i]`/`up[i]` are the press and release (ms) of the i-th key, presses
    in time order. `pairs[i]` names the keys of the interval down[i] -> down[i+1] when known.

    Returns new (down, up): presses in the same order, each release after its press, holds and DD in
    human ranges. UD (release to next press, negative on rollover) follows as DD - H."""
    d = _as_series(down, "down")
    u = np.array(up, dtype=np.float64).reshape(-1)
    if u.shape != d.shape:
        raise ValueError(f"down and up differ in length ({d.size} vs {u.size})")
    if not np.all(np.isfinite(u)):
        raise ValueError("up holds NaN or infinite values")
    if np.any(u < d):
        raise ValueError("a release comes before its press")
    if pairs is not None and len(pairs) != max(d.size - 1, 0):
        raise ValueError(f"pairs must name the {max(d.size - 1, 0)} intervals, got {len(pairs)}")
    if d.size == 0:
        return d, u
    return _rewrite_keys(d, u, cfg, rng, pairs, not_after, None)


def _rewrite_keys(
    d: np.ndarray,
    u: np.ndarray,
    cfg: RewriteConfig,
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]] | None,
    not_after: float | None,
    overlap: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    if cfg.mode == "delay":
        nd, nu = _delay_keys(d, u, cfg.delay_ms, rng, not_after)
    elif cfg.mode == "quantize":
        nd, nu = _quantize_keys(d, u, cfg.step_ms)
    else:
        nd, nu = _resample_keys(d, u, cfg.strength, rng, pairs, not_after, overlap)
    last = float(max(nd[-1], nu.max()))
    return _cap_end(nd, last, not_after), _cap_end(nu, last, not_after)


def _delay_keys(
    d: np.ndarray, u: np.ndarray, max_delay: float, rng: np.random.Generator, not_after: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Kloak on the merged press/release stream: the stream order is kept when it can be, press order
    and release-after-press always, and DD/H never drop below min(original, human minimum)."""
    dd, hold = MODELS["keystroke"], MODELS["hold"]
    n = d.size
    times = np.concatenate((d, u))
    # Stream order: by time, a press before a release at the same instant, then by key index.
    order = np.lexsort((np.r_[np.arange(n), np.arange(n)], np.r_[np.zeros(n), np.ones(n)], times))
    gaps = np.diff(d)
    min_hold = np.maximum(np.minimum(u - d, hold.lo_ms), 1.0)
    # Room each press needs after it (its release, later presses and their releases) before not_after.
    room = min_hold.copy()
    for i in range(n - 2, -1, -1):
        room[i] = max(min_hold[i], min(gaps[i], dd.lo_ms) + room[i + 1])
    nd, nu = np.empty(n), np.empty(n)
    rnd = rng.random(2 * n)
    prev = -math.inf
    for j, e in enumerate(order):
        is_up, i = e >= n, e % n
        t = times[e]
        ub = t + max_delay
        if not_after is not None:
            ub = min(ub, max(not_after - (0.0 if is_up else room[i]), t))
        if is_up:
            hard = nd[i] + min_hold[i]  # a release strictly after its press
            ub = min(ub, nd[i] + max(hold.hi_ms, u[i] - d[i]))
        elif i:
            gap = gaps[i - 1]
            hard = nd[i - 1] + min(gap, dd.lo_ms)
            ub = min(ub, nd[i - 1] + (dd.hi_ms if gap <= dd.hi_ms else gap + max_delay))
        else:
            hard = -math.inf
        lb = max(t, hard, prev)
        if lb > ub:  # keeping the stream order would leave a human range: keep the hard bounds only
            lb = max(t, hard)
        new = lb + rnd[j] * (ub - lb) if ub > lb else lb
        (nu if is_up else nd)[i] = new
        prev = max(prev, new)
    return _vary_keys(nd, nu, d, u)


def _vary_keys(nd: np.ndarray, nu: np.ndarray, d: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dd, hold = MODELS["keystroke"], MODELS["hold"]
    gaps = np.diff(nd)
    varied = _vary(gaps, min(dd.lo_ms, float(np.diff(d).min()) if d.size > 1 else dd.lo_ms), dd.hi_ms)
    if varied is not gaps:  # move the nudged presses with their releases: holds stay
        moved = _retime(nd, varied)
        nd, nu = moved, nu + (moved - nd)
    holds = nu - nd
    varied_h = _vary(holds, min(hold.lo_ms, float((u - d).min())), hold.hi_ms)
    if varied_h is not holds:
        nu = nd + varied_h
    return nd, nu


def _quantize_keys(d: np.ndarray, u: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    dd, hold = MODELS["keystroke"], MODELS["hold"]
    gaps = np.diff(d)
    kd = _vary_grid(_grid_steps(np.floor(d / g), gaps, dd.lo_ms, dd.hi_ms, g), gaps, dd.lo_ms, g)
    h = u - d
    low = np.array([max(1, math.ceil(min(hold.lo_ms, x) / g - 1e-9)) for x in h], dtype=np.float64)
    high = np.maximum(low, np.floor(np.maximum(hold.hi_ms, h) / g + 1e-9))
    ku = np.clip(np.floor(u / g), kd + low, kd + high)
    steps = ku - kd
    if steps.size >= 2 and np.ptp(steps) == 0:  # constant holds: one step shorter, or longer
        ku[-1] += -1 if steps[-1] - 1 >= max(low[-1], 1) else 1
    return kd * g, ku * g


def _resample_keys(
    d: np.ndarray,
    u: np.ndarray,
    strength: float,
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]] | None,
    not_after: float | None,
    overlap: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    dd, hold = MODELS["keystroke"], MODELS["hold"]
    persona = persona_of(rng)
    n = d.size
    gaps = np.diff(d)
    tempo = persona.median(dd) / dd.median_ms
    if pairs is not None:
        named = [(str(a), str(b)) for a, b in pairs]  # lists from JSON work too
        per_pair = {p: pair_median_ms(*p) * tempo * math.exp(persona.pair_quirk(*p)) for p in set(named)}
        medians = np.array([per_pair[p] for p in named])
    else:
        medians = np.full(gaps.size, persona.median(dd))
    pause = gaps > dd.hi_ms
    draw = _truncated_lognormal(np.log(medians), dd.sigma, dd.lo_ms, dd.hi_ms, rng)
    new_dd = np.where(
        pause, _pause_intervals(gaps, dd, strength, rng), _blend(gaps, draw, strength, dd.lo_ms, dd.hi_ms)
    )
    new_dd = _vary(new_dd, dd.lo_ms, dd.hi_ms)
    h_draw = _truncated_lognormal(
        np.full(n, math.log(persona.hold_median())), hold.sigma, hold.lo_ms, hold.hi_ms, rng
    )
    new_h = _blend(u - d, h_draw, strength, hold.lo_ms, hold.hi_ms)
    if overlap is not None:
        _align_overlap(new_dd, new_h, overlap, rng)
    new_h = _vary(new_h, hold.lo_ms, hold.hi_ms)
    rel_d = np.concatenate(([0.0], np.cumsum(new_dd)))
    rel_u = rel_d + new_h
    end = float(rel_u.max())
    span0 = float(u.max() - d[0])
    start, scale = _place(end, float(d[0]), span0, not_after, _scale_floor(new_dd, dd.lo_ms))
    if scale < 1.0:  # compress intervals, keep holds: holds do not make the series longer than DD
        rel_d = rel_d * scale
        rel_u = rel_d + new_h
    return start + rel_d, start + rel_u


ROLLOVER_MARGIN_MS = 5.0


def _align_overlap(
    new_dd: np.ndarray, new_h: np.ndarray, overlap: np.ndarray, rng: np.random.Generator
) -> None:
    """In place: make each key's release fall on the same side of the next press as it did
    (`overlap[i]`: released after key i+1 was pressed, i.e. rollover), inside the human ranges."""
    dd, hold = MODELS["keystroke"], MODELS["hold"]
    m = ROLLOVER_MARGIN_MS
    for i in range(new_dd.size):
        gap, h = new_dd[i], new_h[i]
        if overlap[i] and h <= gap + m:
            if gap + 2 * m <= hold.hi_ms:  # hold on past the next press, by a typical rollover
                new_h[i] = rng.uniform(gap + m, min(hold.hi_ms, gap + m + 60.0))
            else:  # press the next key sooner instead
                new_dd[i] = rng.uniform(dd.lo_ms, max(dd.lo_ms, h - m))
        elif not overlap[i] and h >= gap - m:
            if gap - m >= hold.lo_ms + m:  # let go before the next press
                new_h[i] = rng.uniform(hold.lo_ms, gap - m)
            else:  # press the next key later instead
                new_dd[i] = h + rng.uniform(m, 6 * m)


def rewrite_key_stream(
    t: np.ndarray | Sequence[float],
    is_down: np.ndarray | Sequence[bool],
    cfg: RewriteConfig,
    rng: np.random.Generator,
    *,
    not_after: float | None = None,
) -> np.ndarray:
    """Re-time per-event key records that carry no key identity (e.g. one record per keydown/keyup
    with `key_code: 0`), given in record order. Returns one new time per record.

    Releases are paired with the earliest open press (FIFO), the keys are rewritten as by
    `rewrite_keystrokes`, and the records keep their order in time (ties by record index): a
    release that came before the next press still does, so records never need reordering.
    Releases without a press in the series keep their time (their press was in an earlier payload);
    presses without a release still count in the rhythm."""
    a = np.array(t, dtype=np.float64).reshape(-1)
    down_mask = np.array(is_down, dtype=bool).reshape(-1)
    if a.shape != down_mask.shape:
        raise ValueError(f"t and is_down differ in length ({a.size} vs {down_mask.size})")
    if not np.all(np.isfinite(a)):
        raise ValueError("t holds NaN or infinite values")
    if a.size == 0:
        return a
    order = np.lexsort((np.arange(a.size), a))  # the stream: by time, ties by record index
    open_downs: deque[int] = deque()
    pairs: list[tuple[int, int]] = []  # (down record, up record), FIFO
    for rec in order:
        if down_mask[rec]:
            open_downs.append(int(rec))
        elif open_downs:
            pairs.append((open_downs.popleft(), int(rec)))
    keys_down = [dn for dn, _ in pairs] + list(open_downs)  # FIFO: the unreleased presses are the latest
    out = a.copy()
    if keys_down:
        pos = np.empty(a.size, dtype=np.int64)
        pos[order] = np.arange(a.size)
        d = a[keys_down]
        held = MODELS["hold"].median_ms
        u = np.array(
            [a[up] for _, up in pairs]
            + [
                max(a[dn], min(a[dn] + held, not_after if not_after is not None else math.inf))
                for dn in open_downs
            ]
        )
        up_pos = np.array([pos[up] for _, up in pairs] + [a.size + 1] * len(open_downs))
        overlap = up_pos[:-1] > pos[keys_down[1:]]
        nd, nu = _rewrite_keys(d, u, cfg, rng, None, not_after, overlap)
        out[keys_down] = nd
        out[[up for _, up in pairs]] = nu[: len(pairs)]
    # Repair: records keep their order in time; 1 ms apart survives rounding to whole ms.
    last = -math.inf
    for rec in order:
        out[rec] = max(out[rec], last + 1.0)
        last = out[rec]
    return _cap_end(out, float(out.max()), not_after)


def rewrite_hold_flight(
    hold: np.ndarray | Sequence[float],
    flight: np.ndarray | Sequence[float],
    cfg: RewriteConfig,
    rng: np.random.Generator,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For formats that carry dwell (H, one per key) and flight (UD, one per pair) lists instead of
    times: rebuild times from 0, rewrite, and return new (H, UD) with DD = H + UD exactly."""
    h = np.array(hold, dtype=np.float64).reshape(-1)
    f = np.array(flight, dtype=np.float64).reshape(-1)
    if h.size == 0:
        return h, f
    if f.size != h.size - 1:
        raise ValueError(f"flight must hold one value per pair ({h.size - 1}), got {f.size}")
    down = np.concatenate(([0.0], np.cumsum(h[:-1] + f)))
    nd, nu = rewrite_keystrokes(down, down + h, cfg, rng, pairs=pairs)
    return nu - nd, nd[1:] - nu[:-1]


def key_features(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, DD, UD) of a key series: H per key, DD and UD per consecutive pair; DD = H[:-1] + UD."""
    d, u = np.asarray(down, dtype=np.float64), np.asarray(up, dtype=np.float64)
    return u - d, np.diff(d), d[1:] - u[:-1]


# --- pointer paths ---------------------------------------------------------------------------

# Fitts' law for a pointing movement (Shannon form): MT = a + b log2(D/W + 1), with a target width
# of 20 px; a and b near the values mouse studies report.
FITTS_A_MS, FITTS_B_MS, FITTS_W_PX = 100.0, 150.0, 20.0


def _min_jerk_inverse(s: np.ndarray) -> np.ndarray:
    """tau in [0, 1] with 10 tau^3 - 15 tau^4 + 6 tau^5 = s (the minimum-jerk position profile)."""
    lo, hi = np.zeros_like(s), np.ones_like(s)
    for _ in range(40):
        mid = (lo + hi) / 2
        pos = mid**3 * (10 - 15 * mid + 6 * mid**2)
        below = pos < s
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


def rewrite_path(
    x: np.ndarray | Sequence[float],
    y: np.ndarray | Sequence[float],
    t: np.ndarray | Sequence[float],
    cfg: RewriteConfig,
    rng: np.random.Generator,
    not_after: float | None = None,
    *,
    kind: str = "pointer",
) -> np.ndarray:
    """New timestamps for a pointer (or touch) path; x and y are not touched, so every point, the
    endpoints and the click at the end stay where they were. resample re-times each movement (the
    stretch between pauses) as a minimum-jerk stroke whose duration follows Fitts' law for a persona."""
    xs = np.array(x, dtype=np.float64).reshape(-1)
    ys = np.array(y, dtype=np.float64).reshape(-1)
    a = _as_series(t)
    if not (xs.size == ys.size == a.size):
        raise ValueError(f"x, y and t differ in length ({xs.size}, {ys.size}, {a.size})")
    if cfg.mode != "resample" or a.size < 3:
        return rewrite_times(a, cfg, rng, kind=kind, not_after=not_after)
    model = MODELS[kind]
    persona = persona_of(rng)
    gaps = np.diff(a)
    step = np.hypot(np.diff(xs), np.diff(ys))
    pause = gaps > model.hi_ms
    new = np.empty_like(gaps)
    new[pause] = _pause_intervals(gaps[pause], model, cfg.strength, rng)
    tempo = persona.median(model) / model.median_ms
    bounds = np.flatnonzero(pause)
    for lo_i, hi_i in zip(np.r_[0, bounds + 1], np.r_[bounds, gaps.size], strict=True):
        if hi_i <= lo_i:
            continue
        seg = slice(lo_i, hi_i)
        new[seg] = _stroke_intervals(step[seg], model, tempo, rng)
    new = np.where(
        pause,
        new,
        _blend(gaps, np.clip(new, model.lo_ms, model.hi_ms), cfg.strength, model.lo_ms, model.hi_ms),
    )
    new = _vary(new, model.lo_ms, model.hi_ms)
    rel = np.concatenate(([0.0], np.cumsum(new)))
    start, scale = _place(
        float(rel[-1]), float(a[0]), float(a[-1] - a[0]), not_after, _scale_floor(new, model.lo_ms)
    )
    return _cap_end(start + rel * scale, float(start + rel[-1] * scale), not_after)


def _stroke_intervals(
    step: np.ndarray, model: IntervalModel, tempo: float, rng: np.random.Generator
) -> np.ndarray:
    """Intervals for one movement of per-sample distances `step`: minimum-jerk timing over its length."""
    dist = float(step.sum())
    n = step.size
    if dist <= 0.0:  # pointer at rest: frame-rate-like draws
        return _truncated_lognormal(
            np.full(n, math.log(model.median_ms * tempo)), model.sigma, model.lo_ms, model.hi_ms, rng
        )
    duration = (FITTS_A_MS + FITTS_B_MS * math.log2(dist / FITTS_W_PX + 1.0)) * tempo
    duration *= math.exp(0.2 * rng.standard_normal())
    tau = _min_jerk_inverse(np.cumsum(step) / dist)
    out = np.diff(np.concatenate(([0.0], tau))) * duration
    # Sampling jitter, as real event delivery has; then the range of this kind.
    out *= np.exp(0.1 * rng.standard_normal(n))
    return np.clip(out, model.lo_ms, model.hi_ms)
