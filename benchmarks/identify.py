"""Does keyveil's timing rewrite stop a typist from being identified? A measured answer.

Run by hand: `python benchmarks/identify.py` (N=50 typists, well under two minutes on two cores).

1. Simulate N typists typing free English text. Each typist has a tempo, a hold scale, a fixed
   quirk per key pair and per key, and an event-to-event consistency of their own, all around
   population values (keyveil.timing.pair_median_ms, 110 ms holds); each session adds a small drift.
2. Train two identification models on clean sessions: scaled Manhattan (Killourhy & Maxion) and
   k-nearest neighbours (k=3, Manhattan on z-scored features). Features: median log DD of the most
   frequent digraphs, median log hold of the most frequent keys.
3. Test on other sessions of the same typists, untouched and rewritten by each mode at a few
   strengths. "adapted": the attacker also trains on rewritten sessions (the server only ever
   sees rewritten data).
4. Print accuracy against chance (1/N), and the cost: mean shift of the reported times, two-sample
   KS distance of rewritten DD and holds from the clean population's, share of values in the human
   range, series with constant intervals. Write the plot to docs/privacy-identification.png.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keyveil import timing
from keyveil.timing import MODELS, RewriteConfig, pair_median_ms

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PNG = REPO / "docs" / "privacy-identification.png"

TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should america world high every near add food "
    "between own below country plant last school father keep tree never start city earth eye light thought"
)
WORDS = TEXT.split()

# Simulator realism (log SDs unless said otherwise). Between-person spread of tempo and holds,
# per-person quirks per digraph and per key, per-person consistency, per-session drift.
TEMPO_SD = 0.22
HOLD_SD = 0.15
PAIR_QUIRK_SD = 0.15
KEY_QUIRK_SD = 0.12
EVENT_SD_MEDIAN, EVENT_SD_SPREAD = 0.33, 0.20
HOLD_EVENT_SD = 0.22
SESSION_DRIFT_SD = 0.10
PAUSE_P, PAUSE_MEDIAN_MS = 0.05, 2000.0  # after a space: a thinking pause on top of the digraph


@dataclass
class Typist:
    tempo: float
    hold: float
    event_sd: float
    pair_quirk: dict[tuple[str, str], float] = field(default_factory=dict)
    key_quirk: dict[str, float] = field(default_factory=dict)


@dataclass
class Session:
    who: int
    keys: list[str]
    down: np.ndarray
    up: np.ndarray
    not_after: float

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.keys[:-1], self.keys[1:], strict=True))


def make_typist(rng: np.random.Generator) -> Typist:
    return Typist(
        tempo=math.exp(TEMPO_SD * rng.standard_normal()),
        hold=math.exp(HOLD_SD * rng.standard_normal()),
        event_sd=EVENT_SD_MEDIAN * math.exp(EVENT_SD_SPREAD * rng.standard_normal()),
    )


def quirk(table: dict, key: object, sd: float, rng: np.random.Generator) -> float:
    if key not in table:
        table[key] = sd * rng.standard_normal()
    return table[key]


def type_text(
    who: int, p: Typist, n_keys: int, rng: np.random.Generator, prng: np.random.Generator
) -> Session:
    """One session: about n_keys keystrokes of random words; `prng` draws the person's fixed quirks."""
    text = ""
    while len(text) < n_keys:
        text += ("" if not text else " ") + WORDS[rng.integers(len(WORDS))]
    keys = list(text[:n_keys])
    drift = math.exp(SESSION_DRIFT_SD * rng.standard_normal())
    hold_drift = math.exp(0.5 * SESSION_DRIFT_SD * rng.standard_normal())
    dd = np.array(
        [
            pair_median_ms(a, b)
            * p.tempo
            * drift
            * math.exp(quirk(p.pair_quirk, (a, b), PAIR_QUIRK_SD, prng))
            for a, b in zip(keys[:-1], keys[1:], strict=True)
        ]
    )
    dd *= np.exp(p.event_sd * rng.standard_normal(dd.size))
    pauses = np.array([a == " " for a in keys[:-1]]) & (rng.random(dd.size) < PAUSE_P)
    dd[pauses] += PAUSE_MEDIAN_MS * np.exp(0.6 * rng.standard_normal(int(pauses.sum())))
    hold = np.array(
        [
            MODELS["hold"].median_ms
            * p.hold
            * hold_drift
            * math.exp(quirk(p.key_quirk, k, KEY_QUIRK_SD, prng))
            for k in keys
        ]
    )
    hold *= np.exp(HOLD_EVENT_SD * rng.standard_normal(hold.size))
    start = 1.7e12 + rng.uniform(0, 1e9)
    down = start + np.concatenate(([0.0], np.cumsum(dd)))
    up = down + hold
    # The payload leaves between a few ms and a second after the last key (Banzai "vital" flush).
    return Session(who, keys, down, up, float(up.max() + rng.uniform(20.0, 1000.0)))


# --- features and models ---------------------------------------------------------------------


def feature_space(sessions: list[Session], n_pairs: int = 40, n_keys: int = 20) -> tuple[list, list]:
    pc: Counter = Counter()
    kc: Counter = Counter()
    for s in sessions:
        pc.update(s.pairs)
        kc.update(s.keys)
    return [p for p, _ in pc.most_common(n_pairs)], [k for k, _ in kc.most_common(n_keys)]


def features(keys: list[str], down: np.ndarray, up: np.ndarray, space: tuple[list, list]) -> np.ndarray:
    top_pairs, top_keys = space
    dd = np.diff(down)
    hold = up - down
    by_pair: dict[tuple[str, str], list[float]] = {}
    for (a, b), v in zip(zip(keys[:-1], keys[1:], strict=True), dd, strict=True):
        if v <= MODELS["keystroke"].hi_ms:  # pauses are not rhythm
            by_pair.setdefault((a, b), []).append(v)
    by_key: dict[str, list[float]] = {}
    for k, v in zip(keys, hold, strict=True):
        by_key.setdefault(k, []).append(v)
    f = [np.log(np.median(by_pair[p])) if p in by_pair else np.nan for p in top_pairs]
    f += [np.log(np.median(by_key[k])) if k in by_key else np.nan for k in top_keys]
    return np.array(f)


def impute(train: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    mean = np.nanmean(train, axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    return [np.where(np.isnan(x), mean, x) for x in (train, *xs)]


class ScaledManhattan:
    def fit(self, x: np.ndarray, y: np.ndarray) -> ScaledManhattan:
        self.labels = np.unique(y)
        self.mu = np.array([x[y == c].mean(axis=0) for c in self.labels])
        mad = np.array([np.abs(x[y == c] - self.mu[i]).mean(axis=0) for i, c in enumerate(self.labels)])
        self.mad = np.maximum(mad, 0.1 * np.median(mad))  # no division by a lucky zero
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        score = (np.abs(x[:, None, :] - self.mu[None]) / self.mad[None]).sum(axis=2)
        return self.labels[score.argmin(axis=1)]


class KNN:
    def __init__(self, k: int = 3) -> None:
        self.k = k

    def fit(self, x: np.ndarray, y: np.ndarray) -> KNN:
        self.mean, self.sd = x.mean(axis=0), x.std(axis=0) + 1e-9
        self.x, self.y = (x - self.mean) / self.sd, y
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.sd
        dist = np.abs(z[:, None, :] - self.x[None]).sum(axis=2)
        near = np.argsort(dist, axis=1)[:, : self.k]
        out = []
        for row in near:
            votes = Counter(self.y[row].tolist())
            best = max(votes.values())
            out.append(next(self.y[j] for j in row if votes[self.y[j]] == best))  # tie: nearest wins
        return np.array(out)


# --- conditions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    name: str
    cfg: RewriteConfig | None
    use_pairs: bool = False
    persona_per_typist: bool = False
    """seed_scope=session at its worst: one persona for all sessions of a typist (never rotated)."""
    keep_span: bool = False
    """Not a keyveil option: stretch the output back to the typist's own span, to measure what
    keeping the rewritten series aligned with the original times would leak (the typist's tempo)."""


CONDITIONS: tuple[Condition, ...] = (
    Condition("clean", None),
    Condition("quantize 15 ms", RewriteConfig(mode="quantize", grid_ms=15)),
    Condition("quantize 50 ms", RewriteConfig(mode="quantize", grid_ms=50)),
    Condition("quantize 100 ms", RewriteConfig(mode="quantize", grid_ms=100)),
    Condition("delay 25 ms", RewriteConfig(mode="delay", max_delay_ms=25)),
    Condition("delay 50 ms", RewriteConfig(mode="delay", max_delay_ms=50)),
    Condition("delay 100 ms", RewriteConfig(mode="delay", max_delay_ms=100)),
    Condition("delay 200 ms", RewriteConfig(mode="delay", max_delay_ms=200)),
    Condition("resample s=0.25", RewriteConfig(mode="resample", strength=0.25)),
    Condition("resample s=0.5", RewriteConfig(mode="resample", strength=0.5)),
    Condition("resample s=0.75", RewriteConfig(mode="resample", strength=0.75)),
    Condition("resample s=1", RewriteConfig(mode="resample", strength=1.0)),
    Condition("resample s=1 +pairs", RewriteConfig(mode="resample", strength=1.0), use_pairs=True),
    Condition(
        "resample s=1, 1 persona/typist",
        RewriteConfig(mode="resample", strength=1.0, seed_scope="session"),
        persona_per_typist=True,
    ),
    Condition("resample s=1, span kept (not offered)", RewriteConfig(mode="resample"), keep_span=True),
)


def rewrite(s: Session, c: Condition, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if c.cfg is None:
        return s.down, s.up
    # Benchmark runs are reproducible: a seeded generator stands in for make_rng's secrets seed.
    rng: np.random.Generator = np.random.default_rng([seed, zlib.crc32(c.name.encode())])
    if c.persona_per_typist:
        bits = np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(c.name.encode())]))
        rng = timing.VeilGenerator(bits, hashlib.sha256(f"typist {s.who}".encode()).digest())
    d, u = timing.rewrite_keystrokes(
        s.down, s.up, c.cfg, rng, pairs=s.pairs if c.use_pairs else None, not_after=s.not_after
    )
    if c.keep_span:
        k = (s.down[-1] - s.down[0]) / (d[-1] - d[0])
        d, u = s.down[0] + (d - d[0]) * k, s.down[0] + (d - d[0]) * k + (u - d)
    return d, u


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate((a, b))
    return float(
        np.max(
            np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size)
        )
    )


@dataclass
class Row:
    name: str
    sm: float
    knn: float
    sm_adapted: float
    knn_adapted: float
    shift_ms: float
    ks_dd: float
    ks_hold: float
    in_range: float
    constant: int
    seconds: float


def evaluate(
    c: Condition,
    train: list[Session],
    test: list[Session],
    space: tuple[list, list],
    clean_models: tuple[Callable, ...],
    clean_train_x: np.ndarray,
    clean_dd: np.ndarray,
    clean_hold: np.ndarray,
) -> Row:
    t0 = time.perf_counter()
    y_test = np.array([s.who for s in test])
    rewritten = [rewrite(s, c, 10_000 + i) for i, s in enumerate(test)]
    x_test = np.array([features(s.keys, d, u, space) for s, (d, u) in zip(test, rewritten, strict=True)])
    _, x_imp = impute(clean_train_x, x_test)
    sm, knn = (float((m.predict(x_imp) == y_test).mean()) for m in clean_models)
    # Adapted attacker: trains on rewritten sessions too.
    if c.cfg is None:
        sm_a, knn_a = sm, knn
    else:
        rw_train = [rewrite(s, c, i) for i, s in enumerate(train)]
        x_tr = np.array([features(s.keys, d, u, space) for s, (d, u) in zip(train, rw_train, strict=True)])
        y_tr = np.array([s.who for s in train])
        x_tr, x_te = impute(x_tr, x_test)
        sm_a = float((ScaledManhattan().fit(x_tr, y_tr).predict(x_te) == y_test).mean())
        knn_a = float((KNN().fit(x_tr, y_tr).predict(x_te) == y_test).mean())
    dd_lo, dd_hi = MODELS["keystroke"].lo_ms, MODELS["keystroke"].hi_ms
    h_lo, h_hi = MODELS["hold"].lo_ms, MODELS["hold"].hi_ms
    shifts, dds, holds, ok, total, constant = [], [], [], 0, 0, 0
    for s, (d, u) in zip(test, rewritten, strict=True):
        shifts.append(np.abs(d - s.down).mean())
        dd, hold = np.diff(d), u - d
        rhythm = np.diff(s.down) <= dd_hi  # pauses stay pauses; the range applies to rhythm
        dds.append(dd[rhythm])
        holds.append(hold)
        ok += int(
            ((dd[rhythm] >= dd_lo) & (dd[rhythm] <= dd_hi)).sum() + ((hold >= h_lo) & (hold <= h_hi)).sum()
        )
        total += int(rhythm.sum() + hold.size)
        constant += int(np.ptp(dd) < timing.MIN_SPREAD_MS or np.ptp(hold) < timing.MIN_SPREAD_MS)
    return Row(
        c.name,
        sm,
        knn,
        sm_a,
        knn_a,
        float(np.mean(shifts)),
        ks_distance(np.concatenate(dds), clean_dd),
        ks_distance(np.concatenate(holds), clean_hold),
        ok / total,
        constant,
        time.perf_counter() - t0,
    )


def simulate(
    n: int, n_train: int, n_test: int, n_keys: int, seed: int
) -> tuple[list[Session], list[Session]]:
    rng = np.random.default_rng(seed)
    train: list[Session] = []
    test: list[Session] = []
    for who in range(n):
        p = make_typist(rng)
        prng = np.random.default_rng([seed, who, 7])
        train += [type_text(who, p, n_keys, rng, prng) for _ in range(n_train)]
        test += [type_text(who, p, n_keys, rng, prng) for _ in range(n_test)]
    return train, test


def run(args: argparse.Namespace) -> list[Row]:
    train, test = simulate(args.typists, args.train, args.test, args.keys, args.seed)
    space = feature_space(train)
    x_train = np.array([features(s.keys, s.down, s.up, space) for s in train])
    y_train = np.array([s.who for s in train])
    (x_imp,) = impute(x_train)
    models = (ScaledManhattan().fit(x_imp, y_train), KNN().fit(x_imp, y_train))
    clean_dd = np.concatenate([np.diff(s.down)[np.diff(s.down) <= MODELS["keystroke"].hi_ms] for s in test])
    clean_hold = np.concatenate([s.up - s.down for s in test])
    print(
        f"simulated population: DD mean {clean_dd.mean():.0f} ms, SD {clean_dd.std():.0f} ms "
        f"(published ~239/112); hold mean {clean_hold.mean():.0f} ms, SD {clean_hold.std():.0f} ms"
    )
    print(
        f"{args.typists} typists, {args.train} training and {args.test} test sessions each, "
        f"{args.keys} keystrokes per session; chance = {1 / args.typists:.1%}"
    )
    rows = []
    for c in CONDITIONS:
        rows.append(evaluate(c, train, test, space, models, x_train, clean_dd, clean_hold))
    return rows


def table(rows: list[Row], n: int) -> str:
    base_sm, base_knn = rows[0].sm, rows[0].knn
    head = (
        "| condition | scaled Manhattan | kNN (k=3) | drop SM / kNN | adapted SM / kNN | time shift ms | "
        "KS DD | KS hold | in human range | constant series |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        drop = f"{1 - r.sm / base_sm:+.0%} / {1 - r.knn / base_knn:+.0%}" if base_sm and base_knn else "-"
        lines.append(
            f"| {r.name} | {r.sm:.1%} | {r.knn:.1%} | {drop} | {r.sm_adapted:.1%} / {r.knn_adapted:.1%} | "
            f"{r.shift_ms:.0f} | {r.ks_dd:.3f} | {r.ks_hold:.3f} | {r.in_range:.1%} | {r.constant} |"
        )
    lines.append(f"\nchance = 1/N = {1 / n:.1%}; within 2x chance = at most {2 / n:.1%}")
    return "\n".join(lines)


def plot(rows: list[Row], n: int, path: Path) -> str:
    """The accuracy bars to `path`, with matplotlib when installed, else a plain numpy+zlib PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plain_png(rows, n, path)
        return "plain PNG (matplotlib not installed: bars only, no labels)"
    names = [r.name for r in rows]
    x = np.arange(len(rows))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 7.5), height_ratios=[3, 1.3], sharex=True)
    ax.bar(x - 0.3, [r.sm for r in rows], 0.2, label="scaled Manhattan", color="#3b6ea8")
    ax.bar(x - 0.1, [r.knn for r in rows], 0.2, label="kNN (k=3)", color="#7fa7d6")
    ax.bar(
        x + 0.1, [r.sm_adapted for r in rows], 0.2, label="SM, attacker trained on rewritten", color="#c0504d"
    )
    ax.bar(
        x + 0.3,
        [r.knn_adapted for r in rows],
        0.2,
        label="kNN, attacker trained on rewritten",
        color="#e6a09e",
    )
    ax.axhline(1 / n, color="black", lw=1, ls="--", label=f"chance (1/{n})")
    ax.axhline(2 / n, color="gray", lw=1, ls=":", label="2x chance")
    ax.set_ylabel("identification accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Identifying {n} simulated typists from keystroke timing, before and after rewriting")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax2.bar(x - 0.15, [r.ks_dd for r in rows], 0.3, label="KS distance, DD", color="#8064a2")
    ax2.bar(x + 0.15, [r.ks_hold for r in rows], 0.3, label="KS distance, hold", color="#b3a2c7")
    ax2.set_ylabel("KS vs clean\npopulation")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "matplotlib"


def _plain_png(rows: list[Row], n: int, path: Path) -> None:
    """Bars of SM (dark) and kNN (light) accuracy per condition, chance as a line; RGB, no text."""
    h, bar, gap = 300, 14, 10
    w = len(rows) * (2 * bar + gap) + gap
    img = np.full((h, w, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        x0 = gap + i * (2 * bar + gap)
        for j, (acc, color) in enumerate(((r.sm, (59, 110, 168)), (r.knn, (127, 167, 214)))):
            top = h - int(round(acc * (h - 10)))
            img[top:h, x0 + j * bar : x0 + (j + 1) * bar] = color
    img[h - int(round((h - 10) / n)), :] = (0, 0, 0)
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes((8, 2, 0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--typists", type=int, default=50)
    ap.add_argument("--train", type=int, default=10, help="clean training sessions per typist")
    ap.add_argument("--test", type=int, default=5, help="test sessions per typist")
    ap.add_argument("--keys", type=int, default=200, help="keystrokes per session")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--png", type=Path, default=DEFAULT_PNG)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args)
    print(table(rows, args.typists))
    if not args.no_plot:
        how = plot(rows, args.typists, args.png)
        print(f"plot: {args.png} ({how})")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
