"""keyveil.timing: every invariant of every mode, on random series (hypothesis), plus measured checks.

Invariants: order kept; every release after its press; DD = H + UD; nothing after `not_after`;
first timestamp kept or moved within the mode's bound; no constant intervals; intervals inside the
human range of their kind (resample: always; delay and quantize: whenever the input was).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyveil import timing
from keyveil.timing import MIN_SPREAD_MS, MODELS, MODES, SEED_SCOPES, RewriteConfig

pytestmark = pytest.mark.timeout(120)

EPS = 1e-3  # ms: float error of differences at epoch-ms magnitudes (1.9e12 has 2.4e-4 ms spacing)
# KEYVEIL_EXAMPLES=1000 for a deeper search than the quick default.
PROPS = settings(
    max_examples=int(os.environ.get("KEYVEIL_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KD, KH = MODELS["keystroke"], MODELS["hold"]

starts = st.one_of(st.just(0.0), st.floats(0.0, 1e6), st.floats(1.6e12, 1.9e12))


def cfgs(mode: str) -> st.SearchStrategy[RewriteConfig]:
    """Any valid config of one mode (quantize grids up to 100 ms, where a grid step fits a range)."""
    return st.builds(
        RewriteConfig,
        mode=st.just(mode),
        strength=st.floats(0.0, 1.0),
        max_delay_ms=st.floats(0.0, 300.0),
        grid_ms=st.floats(1.0, 100.0),
        seed_scope=st.sampled_from(SEED_SCOPES),
    )


@st.composite
def human_times(draw: st.DrawFn, kind: str = "keystroke") -> np.ndarray:
    """Intervals inside the human range of `kind`, a quarter of them pauses above it."""
    m = MODELS[kind]
    n = draw(st.integers(1, 40))
    gap = st.one_of(*[st.floats(m.lo_ms, m.hi_ms)] * 3, st.floats(m.hi_ms * 1.01, m.hi_ms * 8))
    gaps = draw(st.lists(gap, min_size=n - 1, max_size=n - 1))
    return draw(starts) + np.concatenate(([0.0], np.cumsum(gaps)))


@st.composite
def any_times(draw: st.DrawFn) -> np.ndarray:
    """Anything in time order: ties, bursts far faster than a human, long gaps, constant runs."""
    n = draw(st.integers(1, 40))
    if draw(st.booleans()):
        gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.5, 5000.0)), min_size=n - 1, max_size=n - 1))
    else:
        gaps = [draw(st.one_of(st.just(0.0), st.floats(0.5, 3000.0)))] * (n - 1)
    return draw(starts) + np.concatenate(([0.0], np.cumsum(gaps)))


@st.composite
def human_keys(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    down = draw(human_times("keystroke"))
    holds = draw(st.lists(st.floats(KH.lo_ms, KH.hi_ms), min_size=down.size, max_size=down.size))
    return down, down + np.array(holds)  # rollover (a release after the next press) happens often


@st.composite
def any_keys(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    down = draw(any_times())
    holds = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(0.5, 2000.0)), min_size=down.size, max_size=down.size)
    )
    return down, down + np.array(holds)


def slack() -> st.SearchStrategy[float | None]:
    return st.one_of(st.none(), st.floats(0.0, 3000.0))


def not_after_of(last: float, extra: float | None) -> float | None:
    return None if extra is None else last + extra


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def spread_floor(cfg: RewriteConfig) -> float:
    """Smallest spread a non-constant series has: MIN_SPREAD_MS, or one grid step in quantize."""
    return min(MIN_SPREAD_MS, cfg.step_ms) if cfg.mode == "quantize" else MIN_SPREAD_MS


def assert_order(t: np.ndarray, out: np.ndarray) -> None:
    assert out.shape == t.shape
    gaps = np.diff(out)
    assert np.all(gaps >= 0), "order lost"
    assert np.all(gaps[np.diff(t) > 0] > 0), "distinct events merged"


def assert_not_constant(gaps: np.ndarray, floor: float) -> None:
    if gaps.size >= 2:
        assert np.ptp(gaps) >= floor - EPS, f"constant intervals {gaps}"


def assert_rhythm_in_range(orig_gaps: np.ndarray, gaps: np.ndarray, lo: float, hi: float) -> None:
    rhythm = orig_gaps <= hi
    assert np.all(gaps[rhythm] >= lo - EPS) and np.all(gaps[rhythm] <= hi + EPS), gaps[rhythm]


def assert_first(
    mode: str, cfg: RewriteConfig, t0: float, out0: float, end: float, not_after: float | None, n: int
) -> None:
    """The mode's bound on the first timestamp (inputs ending before not_after)."""
    if mode == "delay":
        assert t0 - MIN_SPREAD_MS - EPS <= out0 <= t0 + cfg.delay_ms + EPS
    elif mode == "quantize":
        assert t0 - n * cfg.step_ms - EPS <= out0 <= t0 + EPS
    else:  # resample keeps the start unless the synthetic series must end at the request time
        assert out0 <= t0 + EPS
        if out0 < t0 - EPS:
            assert not_after is not None and abs(end - not_after) < 1e-2


# --- generic series ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), kind=st.sampled_from(timing.KINDS), seed=st.integers(0, 2**32))
def test_times_order_end_and_no_constant_intervals(
    mode: str, data: st.DataObject, kind: str, seed: int
) -> None:
    t = data.draw(any_times())
    cfg = data.draw(cfgs(mode))
    # not_after may even fall before the input's end (client clock ahead of the proxy's).
    not_after = data.draw(st.one_of(st.none(), st.floats(-2000.0, 3000.0).map(lambda x: float(t[-1] + x))))
    out = timing.rewrite_times(t, cfg, rng_for(seed), kind=kind, not_after=not_after)
    assert_order(t, out)
    if not_after is not None:
        assert out[-1] <= not_after
    assert_not_constant(np.diff(out), spread_floor(cfg))


@PROPS
@given(data=st.data(), kind=st.sampled_from(timing.KINDS), seed=st.integers(0, 2**32))
def test_resample_times_always_in_human_range(data: st.DataObject, kind: str, seed: int) -> None:
    t = data.draw(any_times())
    cfg = data.draw(cfgs("resample"))
    not_after = not_after_of(float(t[-1]), data.draw(slack()))
    out = timing.rewrite_times(t, cfg, rng_for(seed), kind=kind, not_after=not_after)
    m = MODELS[kind]
    assert_rhythm_in_range(np.diff(t), np.diff(out), m.lo_ms, m.hi_ms)
    assert_first("resample", cfg, float(t[0]), float(out[0]), float(out[-1]), not_after, t.size)


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), kind=st.sampled_from(timing.KINDS), seed=st.integers(0, 2**32))
def test_times_human_input_stays_human(mode: str, data: st.DataObject, kind: str, seed: int) -> None:
    t = data.draw(human_times(kind))
    cfg = data.draw(cfgs(mode))
    not_after = not_after_of(float(t[-1]), data.draw(slack()))
    out = timing.rewrite_times(t, cfg, rng_for(seed), kind=kind, not_after=not_after)
    m = MODELS[kind]
    assert_rhythm_in_range(np.diff(t), np.diff(out), m.lo_ms, m.hi_ms)
    assert_first(mode, cfg, float(t[0]), float(out[0]), float(out[-1]), not_after, t.size)
    # Long pauses stay longer than any rhythm interval could make them disappear.
    pauses = np.diff(t) > m.hi_ms
    assert np.all(np.diff(out)[pauses] >= m.lo_ms - EPS)


# --- keystrokes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_keystroke_invariants_any_input(mode: str, data: st.DataObject, seed: int) -> None:
    down, up = data.draw(any_keys())
    cfg = data.draw(cfgs(mode))
    last = float(up.max())
    not_after = data.draw(st.one_of(st.none(), st.floats(-2000.0, 3000.0).map(lambda x: last + x)))
    nd, nu = timing.rewrite_keystrokes(down, up, cfg, rng_for(seed), not_after=not_after)
    assert_order(down, nd)
    assert np.all(nu > nd), "a release before or at its press"
    hold, dd, ud = timing.key_features(nd, nu)
    np.testing.assert_allclose(dd, hold[:-1] + ud, atol=EPS)
    if not_after is not None:
        assert max(nd.max(), nu.max()) <= not_after
    assert_not_constant(dd, spread_floor(cfg))
    assert_not_constant(hold, spread_floor(cfg))
    if mode == "resample":  # whatever came in, what goes out is human
        assert_rhythm_in_range(np.diff(down), dd, KD.lo_ms, KD.hi_ms)
        assert np.all(hold >= KH.lo_ms - EPS) and np.all(hold <= KH.hi_ms + EPS)


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_keystrokes_human_input_stays_human(mode: str, data: st.DataObject, seed: int) -> None:
    down, up = data.draw(human_keys())
    cfg = data.draw(cfgs(mode))
    not_after = not_after_of(float(up.max()), data.draw(slack()))
    with_pairs = mode == "resample" and data.draw(st.booleans())
    pairs = [("t", "h")] * (down.size - 1) if with_pairs else None
    nd, nu = timing.rewrite_keystrokes(down, up, cfg, rng_for(seed), pairs=pairs, not_after=not_after)
    hold, dd, _ = timing.key_features(nd, nu)
    assert_rhythm_in_range(np.diff(down), dd, KD.lo_ms, KD.hi_ms)
    assert np.all(hold >= KH.lo_ms - EPS) and np.all(hold <= KH.hi_ms + EPS)
    end = float(max(nd.max(), nu.max()))
    assert_first(mode, cfg, float(down[0]), float(nd[0]), end, not_after, down.size)


@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_delay_moves_each_event_by_at_most_the_max_delay(data: st.DataObject, seed: int) -> None:
    down, up = data.draw(human_keys())
    cfg = RewriteConfig(mode="delay", max_delay_ms=data.draw(st.floats(0.0, 300.0)))
    nd, nu = timing.rewrite_keystrokes(down, up, cfg, rng_for(seed))
    # A constant run gets nudged by MIN_SPREAD_MS (press) and again (its hold): twice at most.
    nudge = 2 * MIN_SPREAD_MS + EPS
    for before, after in ((down, nd), (up, nu)):
        shift = after - before
        assert np.all(shift >= -nudge) and np.all(shift <= cfg.max_delay_ms + nudge)


@PROPS
@given(data=st.data())
def test_quantize_puts_times_on_the_grid(data: st.DataObject) -> None:
    down, up = data.draw(human_keys())
    g = float(data.draw(st.integers(5, 100)))
    nd, nu = timing.rewrite_keystrokes(down, up, RewriteConfig(mode="quantize", grid_ms=g), rng_for(0))
    for x in (nd, nu):
        assert np.allclose(x / g, np.round(x / g), rtol=0, atol=1e-6)


def test_resample_at_full_strength_does_not_depend_on_the_person() -> None:
    """Two different typists, same random draws: identical output relative to the first press."""
    rng = np.random.default_rng(5)
    outs = []
    for tempo in (120.0, 400.0):
        down = 1.7e12 + np.cumsum(rng.lognormal(math.log(tempo), 0.3, 60).clip(50, 1400))
        up = down + rng.lognormal(math.log(tempo / 2), 0.2, 60).clip(60, 300)
        nd, nu = timing.rewrite_keystrokes(down, up, RewriteConfig(), np.random.default_rng(99))
        outs.append((nd - nd[0], nu - nd[0]))
    np.testing.assert_allclose(outs[0][0], outs[1][0])
    np.testing.assert_allclose(outs[0][1], outs[1][1])
    # ...and it is not the input: the slow typist's series got a typical tempo.
    assert 100 < float(np.median(np.diff(outs[1][0]))) < 350


def test_resample_follows_the_pair_model() -> None:
    """Alternating hands come out faster than the same finger on two keys, as the model says
    (over many personas: each persona also has its own quirk per pair)."""
    n = 60
    down = np.arange(n) * 250.0
    up = down + 100.0
    cfg = RewriteConfig()
    med = {}
    for pair in (("a", "l"), ("d", "e")):
        med[pair] = [
            np.median(
                np.diff(timing.rewrite_keystrokes(down, up, cfg, rng_for(s), pairs=[pair] * (n - 1))[0])
            )
            for s in range(150)
        ]
    ratio = math.exp(np.mean(np.log(med[("d", "e")])) - np.mean(np.log(med[("a", "l")])))
    assert timing.pair_class("a", "l") == "alternate" and timing.pair_class("d", "e") == "same_finger"
    assert ratio == pytest.approx(
        timing.PAIR_FACTOR["same_finger"] / timing.PAIR_FACTOR["alternate"], rel=0.1
    )


def test_resampled_population_has_the_published_inter_key_statistics() -> None:
    """Over many payloads (fresh persona each), DD mean ~239 ms and SD ~112 ms (Aalto study)."""
    down = np.arange(100) * 200.0
    up = down + 100.0
    dd = np.concatenate(
        [np.diff(timing.rewrite_keystrokes(down, up, RewriteConfig(), rng_for(s))[0]) for s in range(300)]
    )
    assert dd.mean() == pytest.approx(239, rel=0.08)
    assert dd.std() == pytest.approx(112, rel=0.2)


def test_hold_flight_lists_keep_dd_equal_h_plus_ud() -> None:
    hold = np.array([95.0, 120.0, 80.0, 140.0, 101.0])
    flight = np.array([60.0, -20.0, 150.0, 90.0])  # -20: rollover
    for mode in MODES:
        h2, f2 = timing.rewrite_hold_flight(hold, flight, RewriteConfig(mode=mode), rng_for(3))
        assert h2.shape == hold.shape and f2.shape == flight.shape
        assert np.all(h2 > 0)
        assert not np.allclose(h2, hold) or not np.allclose(f2, flight)
        down = np.concatenate(([0.0], np.cumsum(h2[:-1] + f2)))
        assert np.all(np.diff(down) > 0)  # DD = H + UD rebuilds presses in order


# --- per-event key records without key identity (Meta's 30100 keydown/keyup) --------------------


@st.composite
def key_streams(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Down/up records in a shuffled record order, maybe with releases whose press came earlier."""
    down, up = draw(st.one_of(human_keys(), any_keys()))
    orphans = draw(st.integers(0, 2))
    t = np.concatenate((down[0] - 10.0 * np.arange(orphans, 0, -1), down, up))
    is_down = np.concatenate((np.zeros(orphans, bool), np.ones(down.size, bool), np.zeros(up.size, bool)))
    perm = np.array(draw(st.permutations(range(t.size))))
    return t[perm], is_down[perm]


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_key_stream_keeps_record_order_in_time(mode: str, data: st.DataObject, seed: int) -> None:
    t, is_down = data.draw(key_streams())
    cfg = data.draw(cfgs(mode))
    not_after = not_after_of(float(t.max()), data.draw(slack()))
    out = timing.rewrite_key_stream(t, is_down, cfg, rng_for(seed), not_after=not_after)
    assert out.shape == t.shape
    order = np.lexsort((np.arange(t.size), t))
    assert np.all(np.diff(out[order]) >= 1.0 - EPS), "records changed their order in time"
    if not_after is not None:
        assert out.max() <= not_after


def test_key_stream_of_real_typing_stays_human_and_keeps_rollover() -> None:
    """Simulated typists (benchmark's simulator), records as a keylogger sees them: after resample,
    the same releases overlap the next press, holds and DD are human, and the timing changed."""
    bench = _identify_module()
    rng = np.random.default_rng(3)
    holds_ok, dd_ok, total_h, total_dd = 0, 0, 0, 0
    for who in range(30):
        s = bench.type_text(who, bench.make_typist(rng), 100, rng, rng)
        t = np.concatenate((s.down, s.up))
        is_down = np.r_[np.ones(s.down.size, bool), np.zeros(s.up.size, bool)]
        order = np.lexsort((np.arange(t.size), t))
        t, is_down = t[order], is_down[order]
        out = timing.rewrite_key_stream(
            t, is_down, RewriteConfig(), rng_for(who), not_after=float(t.max()) + 300
        )
        assert np.all(np.diff(out) > 0)  # records were in time order and still are
        d0, u0, d, u = t[is_down], t[~is_down], out[is_down], out[~is_down]
        np.testing.assert_array_equal(np.diff(d0) < (u0 - d0)[:-1], np.diff(d) < (u - d)[:-1])
        assert not np.allclose(np.diff(d), np.diff(d0))
        rhythm = np.diff(d0) <= KD.hi_ms
        holds_ok += int(((u - d >= KH.lo_ms) & (u - d <= KH.hi_ms)).sum())
        dd_ok += int(((np.diff(d) >= KD.lo_ms) & (np.diff(d) <= KD.hi_ms))[rhythm].sum())
        total_h, total_dd = total_h + d.size, total_dd + int(rhythm.sum())
    assert holds_ok / total_h >= 0.995 and dd_ok / total_dd >= 0.995


def test_key_stream_keeps_releases_of_earlier_presses() -> None:
    t = np.array([1000.0, 1100.0, 1180.0, 1400.0, 1490.0])
    is_down = np.array([False, True, False, True, False])  # the first release belongs to an earlier press
    out = timing.rewrite_key_stream(t, is_down, RewriteConfig(), rng_for(2))
    assert out[0] == 1000.0 and np.all(np.diff(out) > 0)
    with pytest.raises(ValueError, match="differ in length"):
        timing.rewrite_key_stream(t, is_down[:-1], RewriteConfig(), rng_for(2))


# --- pointer paths -----------------------------------------------------------------------------


@st.composite
def paths(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 60))
    steps = st.floats(-40.0, 40.0)
    x = np.cumsum(draw(st.lists(steps, min_size=n, max_size=n)))
    y = np.cumsum(draw(st.lists(steps, min_size=n, max_size=n)))
    gaps = draw(
        st.lists(st.one_of(st.floats(4.0, 40.0), st.floats(250.0, 2000.0)), min_size=n - 1, max_size=n - 1)
    )
    return x, y, draw(starts) + np.concatenate(([0.0], np.cumsum(gaps)))


@pytest.mark.parametrize("mode", MODES)
@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_path_keeps_points_and_order(mode: str, data: st.DataObject, seed: int) -> None:
    x, y, t = data.draw(paths())
    cfg = data.draw(cfgs(mode))
    not_after = not_after_of(float(t[-1]), data.draw(slack()))
    xs, ys = x.copy(), y.copy()
    out = timing.rewrite_path(x, y, t, cfg, rng_for(seed), not_after)
    np.testing.assert_array_equal(x, xs)  # positions untouched: the click lands where it landed
    np.testing.assert_array_equal(y, ys)
    assert_order(t, out)
    if not_after is not None:
        assert out[-1] <= not_after
    assert_not_constant(np.diff(out), spread_floor(cfg))
    m = MODELS["pointer"]
    assert_rhythm_in_range(np.diff(t), np.diff(out), m.lo_ms, m.hi_ms)


def test_path_resample_is_a_minimum_jerk_stroke() -> None:
    """A straight 600 px move sampled evenly: slow start and end, fast middle, Fitts-like length."""
    n = 60
    x, y = np.linspace(0, 600, n), np.zeros(n)
    t = 5000.0 + np.arange(n) * 8.0
    out = timing.rewrite_path(x, y, t, RewriteConfig(), rng_for(11))
    gaps = np.diff(out)
    assert out[0] == t[0]
    assert gaps[:5].mean() > 2 * gaps[25:35].mean() and gaps[-5:].mean() > 2 * gaps[25:35].mean()
    assert 400 < out[-1] - out[0] < 2500  # Fitts: 100 + 150 log2(31) = 843 ms, times a persona


# --- seeding and configuration -----------------------------------------------------------------


def test_make_rng_scopes() -> None:
    payload = RewriteConfig(seed_scope="payload")
    session = RewriteConfig(seed_scope="session")
    assert isinstance(timing.make_rng(payload), np.random.Generator)
    p1, p2 = timing.persona_of(timing.make_rng(payload)), timing.persona_of(timing.make_rng(payload))
    assert p1 != p2  # a fresh persona per payload: payloads cannot be linked by it
    s1 = timing.persona_of(timing.make_rng(session, b"session-a"))
    s2 = timing.persona_of(timing.make_rng(session, b"session-a"))
    s3 = timing.persona_of(timing.make_rng(session, b"session-b"))
    assert s1 == s2 and s1 != s3
    # Same persona, fresh noise: two payloads of one session still differ event by event.
    down = np.arange(30) * 200.0
    a = timing.rewrite_keystrokes(down, down + 90, session, timing.make_rng(session, b"session-a"))[0]
    b = timing.rewrite_keystrokes(down, down + 90, session, timing.make_rng(session, b"session-a"))[0]
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "shuffle"},
        {"seed_scope": "forever"},
        {"strength": 1.5},
        {"strength": -0.1},
        {"max_delay_ms": -1.0},
        {"grid_ms": 0.0},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        RewriteConfig(**bad)


def test_bad_input_is_refused() -> None:
    cfg = RewriteConfig()
    with pytest.raises(ValueError, match="time order"):
        timing.rewrite_times([3.0, 1.0, 2.0], cfg, rng_for(0))
    with pytest.raises(ValueError, match="NaN"):
        timing.rewrite_times([1.0, float("nan")], cfg, rng_for(0))
    with pytest.raises(ValueError, match="release comes before"):
        timing.rewrite_keystrokes([0.0, 100.0], [50.0, 90.0], cfg, rng_for(0))
    with pytest.raises(ValueError, match="pairs"):
        timing.rewrite_keystrokes([0.0, 100.0], [50.0, 150.0], cfg, rng_for(0), pairs=[])
    with pytest.raises(ValueError, match="unknown timing kind"):
        timing.rewrite_times([0.0], cfg, rng_for(0), kind="gaze")
    assert timing.rewrite_times([], cfg, rng_for(0)).size == 0


# --- the measured claim, small ------------------------------------------------------------------


def _identify_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "identify.py"
    spec = importlib.util.spec_from_file_location("keyveil_identify_bench", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(60)
def test_identification_drops_to_chance_after_resample() -> None:
    """The benchmark at 12 typists: clean sessions identify people, resampled ones do not."""
    bench = _identify_module()
    n = 12
    train, test = bench.simulate(n, 6, 4, 150, seed=7)
    space = bench.feature_space(train)
    x = np.array([bench.features(s.keys, s.down, s.up, space) for s in train])
    y = np.array([s.who for s in train])
    (xi,) = bench.impute(x)
    models = (bench.ScaledManhattan().fit(xi, y), bench.KNN().fit(xi, y))
    clean_dd = np.concatenate([np.diff(s.down) for s in test])
    clean_hold = np.concatenate([s.up - s.down for s in test])
    rows = {
        c.name: bench.evaluate(c, train, test, space, models, x, clean_dd, clean_hold)
        for c in bench.CONDITIONS
        if c.name in ("clean", "delay 100 ms", "resample s=1")
    }
    chance = 1 / n
    assert rows["clean"].sm > 5 * chance
    assert rows["resample s=1"].sm < 2.5 * chance and rows["resample s=1"].knn < 2.5 * chance
    assert rows["resample s=1"].in_range == 1.0 and rows["resample s=1"].constant == 0
    assert rows["clean"].sm > rows["delay 100 ms"].sm > rows["resample s=1"].sm


def test_plain_png_fallback_is_a_valid_png(tmp_path: Path) -> None:
    """Without matplotlib the benchmark still writes a PNG: check its structure and CRCs."""
    import struct
    import zlib

    bench = _identify_module()
    rows = [
        bench.Row(f"c{i}", acc, acc / 2, acc, acc, 0.0, 0.0, 0.0, 1.0, 0, 0.0)
        for i, acc in enumerate((0.9, 0.5, 0.02))
    ]
    path = tmp_path / "plot.png"
    bench._plain_png(rows, 50, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(tag + body)
        chunks[tag] = body
        pos += 12 + length
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    pixels = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)
    # The first bar (90%) is drawn far taller than the last (2%).
    dark = np.all(pixels == (59, 110, 168), axis=2)
    heights = dark.sum(axis=0)
    assert heights.max() > 200 and 0 < heights[heights > 0].min() < 20
