"""Group-bys over `Columns` with numpy, into `Tallies` (plain counters) and then the report document.

`Tallies` is also what `LiveSummary` keeps up to date one record at a time, so the live page and the
offline report share `assemble()` and show the same numbers for the same records.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from keyveil.journal import ACTIONS, CATEGORIES, MODES
from keyveil.report.columns import Columns

REPORT_SCHEMA = "keyveil-report/1"
UNCATALOGED = "(uncataloged)"
NO_CATEGORY = "none"  # CSV rows of flows in which nothing behavioral was found
TOP_HOSTS = 20
TOP_ROUTES = 25
TOP_BUSIEST = 5


@dataclass
class AppTally:
    flows: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)  # events


@dataclass
class EndpointTally:
    flows: int = 0
    events: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    apps: Counter[str] = field(default_factory=Counter)


@dataclass
class Tallies:
    flows: int = 0
    ts_min: float | None = None
    ts_max: float | None = None
    full_records: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    cat_events: Counter[str] = field(default_factory=Counter)
    cat_samples: Counter[str] = field(default_factory=Counter)
    cat_flows: Counter[str] = field(default_factory=Counter)
    apps: dict[str, AppTally] = field(default_factory=dict)
    endpoints: dict[str, EndpointTally] = field(default_factory=dict)
    hosts: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    hours: dict[int, Counter[str]] = field(default_factory=dict)  # hour start (epoch s) -> actions
    hour_of_day: list[int] = field(default_factory=lambda: [0] * 24)
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Report:
    """The report document (`summary`, the JSON) and, for CSV, rows per (hour, app, category, action)."""

    summary: dict[str, Any]
    rows: list[tuple[str, str, str, str, int, int, int]] | None = None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- numpy group-bys -------------------------------------------------------------------------------


def _dense(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, inverse codes 0..k-1). Ids are small non-negative ints here (string ids,
    hours since the first one), so a bincount and a lookup table replace np.unique's sort."""
    if ids.size == 0:
        return ids[:0], np.zeros(0, dtype=np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi - lo > 1 << 24:
        u, inv = np.unique(ids, return_inverse=True)
        return u, inv.reshape(-1)
    shifted = ids - lo if lo else ids
    present = np.bincount(shifted, minlength=hi - lo + 1) > 0
    u = np.flatnonzero(present)
    lut = np.zeros(hi - lo + 1, dtype=np.int64)
    lut[u] = np.arange(u.size)
    return (u + lo).astype(ids.dtype, copy=False), lut[shifted]


def _dense_by_name(ids: np.ndarray, strings: list[str | None]) -> tuple[list[str], np.ndarray]:
    """Like _dense, but the codes follow the names' alphabetical order."""
    u, inv = _dense(ids)
    names = ["" if strings[int(i)] is None else str(strings[int(i)]) for i in u]
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    return [names[i] for i in order], rank[inv]


def _grid(a: np.ndarray, na: int, b: np.ndarray, nb: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Counts (or sums of `weights`) for each (a, b) pair of dense codes, as an na x nb int array."""
    flat = np.bincount(a * nb + b, weights=weights, minlength=na * nb)
    return flat.astype(np.int64).reshape(na, nb)


def tallies_from_columns(c: Columns) -> Tallies:
    t = Tallies()
    n = len(c)
    t.flows = n
    if n == 0:
        return t
    s = c.strings

    def name(i: int) -> str:
        v = s[int(i)]
        return "" if v is None else v

    t.ts_min, t.ts_max = float(c.ts.min()), float(c.ts.max())
    t.full_records = int(np.count_nonzero(c.detail))
    t.bytes_in, t.bytes_out = int(c.size_in.sum()), int(c.size_out.sum())

    act_u, act = _dense(c.action)
    act_names = [name(i) for i in act_u]
    na = len(act_u)
    for k, v in zip(act_names, np.bincount(act, minlength=na).tolist(), strict=True):
        t.actions[k] += v
    for col, counter in ((c.mode, t.modes), (c.kind, t.kinds)):
        u, inv = _dense(col)
        for i, v in zip(u, np.bincount(inv, minlength=len(u)).tolist(), strict=True):
            counter[name(i)] += v

    nc = len(CATEGORIES)
    ev = np.bincount(c.cat_id, weights=c.cat_events, minlength=nc).astype(np.int64)
    sa = np.bincount(c.cat_id, weights=c.cat_samples, minlength=nc).astype(np.int64)
    fl = np.bincount(c.cat_id, minlength=nc)
    for j, cat in enumerate(CATEGORIES):
        t.cat_events[cat], t.cat_samples[cat], t.cat_flows[cat] = int(ev[j]), int(sa[j]), int(fl[j])

    app_u, app = _dense(c.app)
    nap = len(app_u)
    app_flows = np.bincount(app, minlength=nap)
    app_act = _grid(app, nap, act, na)
    app_cat = _grid(app[c.cat_row], nap, c.cat_id, nc, c.cat_events)
    for i, aid in enumerate(app_u):
        at = t.apps.setdefault(name(aid), AppTally())
        at.flows += int(app_flows[i])
        for j, k in enumerate(act_names):
            if app_act[i, j]:
                at.actions[k] += int(app_act[i, j])
        for j, cat in enumerate(CATEGORIES):
            if app_cat[i, j]:
                at.categories[cat] += int(app_cat[i, j])

    ep_u, ep = _dense(c.endpoint)
    ne = len(ep_u)
    ep_flows = np.bincount(ep, minlength=ne)
    ep_events = np.bincount(ep[c.cat_row], weights=c.cat_events, minlength=ne).astype(np.int64)
    ep_act = _grid(ep, ne, act, na)
    ep_app = _grid(ep, ne, app, nap)
    for i, eid in enumerate(ep_u):
        et = t.endpoints.setdefault(s[int(eid)] or UNCATALOGED, EndpointTally())
        et.flows += int(ep_flows[i])
        et.events += int(ep_events[i])
        for j, k in enumerate(act_names):
            if ep_act[i, j]:
                et.actions[k] += int(ep_act[i, j])
        for j in np.flatnonzero(ep_app[i]):
            et.apps[name(app_u[j])] += int(ep_app[i, j])

    host_u, host = _dense(c.host)
    for i, v in zip(host_u, np.bincount(host, minlength=len(host_u)).tolist(), strict=True):
        t.hosts[name(i)] += v
    if c.route_id.size:
        rsum = np.bincount(c.route_id, weights=c.route_count, minlength=len(s)).astype(np.int64)
        for i in np.flatnonzero(rsum):
            t.routes[name(i)] += int(rsum[i])

    hour = np.floor_divide(c.ts, 3600).astype(np.int64)
    h0 = int(hour.min())
    hour_u, hr = _dense(hour - h0)
    hour_u = hour_u + h0
    hour_act = _grid(hr, len(hour_u), act, na)
    for i, h in enumerate(hour_u.tolist()):
        ctr = t.hours.setdefault(h * 3600, Counter())
        for j in np.flatnonzero(hour_act[i]):
            ctr[act_names[j]] += int(hour_act[i, j])
    t.hour_of_day = np.bincount(hour % 24, minlength=24).tolist()
    return t


def csv_rows(c: Columns) -> list[tuple[str, str, str, str, int, int, int]]:
    """(hour, app, category, action, flows, events, samples), sorted; `none` for flows without findings."""
    n = len(c)
    if n == 0:
        return []
    hours = np.floor_divide(c.ts, 3600).astype(np.int64)
    h0 = int(hours.min())
    hour_u, hr = _dense(hours - h0)
    app_names, app = _dense_by_name(c.app, c.strings)
    act_names, act = _dense_by_name(c.action, c.strings)
    nh, nap, na, nc = len(hour_u), len(app_names), len(act_names), len(CATEGORIES) + 1

    has_cat = np.bincount(c.cat_row, minlength=n) > 0
    bare = np.flatnonzero(~has_cat)
    rows = np.concatenate([c.cat_row, bare])
    cats = np.concatenate([c.cat_id.astype(np.int64), np.full(bare.size, nc - 1, dtype=np.int64)])
    events = np.concatenate([c.cat_events, np.zeros(bare.size, dtype=c.cat_events.dtype)])
    samples = np.concatenate([c.cat_samples, np.zeros(bare.size, dtype=c.cat_samples.dtype)])
    # one key per (hour, app, category, action), in that sort order
    key = ((hr[rows] * nap + app[rows]) * nc + cats) * na + act[rows]
    if nh * nap * nc * na <= 1 << 26:
        flows_all = np.bincount(key, minlength=nh * nap * nc * na)
        ku = np.flatnonzero(flows_all)
        flows = flows_all[ku]
        lut = np.zeros(flows_all.size, dtype=np.int64)
        lut[ku] = np.arange(ku.size)
        kinv = lut[key]
    else:
        ku, kinv = np.unique(key, return_inverse=True)
        flows = np.bincount(kinv, minlength=ku.size)
    ev = np.bincount(kinv, weights=events, minlength=ku.size).astype(np.int64)
    sa = np.bincount(kinv, weights=samples, minlength=ku.size).astype(np.int64)

    a_i = ku % na
    rest = ku // na
    c_i = rest % nc
    rest //= nc
    p_i = rest % nap
    h_i = rest // nap
    cat_names = [*CATEGORIES, NO_CATEGORY]
    hour_names = [iso(float(h + h0) * 3600) for h in hour_u.tolist()]
    return list(
        zip(
            [hour_names[i] for i in h_i.tolist()],
            [app_names[i] for i in p_i.tolist()],
            [cat_names[i] for i in c_i.tolist()],
            [act_names[i] for i in a_i.tolist()],
            flows.tolist(),
            ev.tolist(),
            sa.tolist(),
            strict=True,
        )
    )


# -- the document ----------------------------------------------------------------------------------


def _ordered_actions(counter: Counter[str]) -> dict[str, int]:
    out = {a: int(counter.get(a, 0)) for a in ACTIONS}
    for k in sorted(counter):
        if k not in out:
            out[k] = int(counter[k])
    return out


def assemble(
    t: Tallies,
    *,
    filters: dict[str, Any] | None = None,
    journal: dict[str, Any] | None = None,
    generated: float | None = None,
) -> dict[str, Any]:
    """The report document. Keys and their meaning are documented in docs/reports.md."""
    hours = sorted(t.hours)
    period_hours = 0 if t.ts_min is None else int((t.ts_max - t.ts_min) // 3600) + 1  # type: ignore[operator]
    apps = sorted(t.apps.items(), key=lambda kv: (-kv[1].flows, kv[0]))
    eps = sorted(t.endpoints.items(), key=lambda kv: (-kv[1].flows, kv[0]))
    busiest = sorted(((sum(t.hours[h].values()), h) for h in hours), key=lambda x: (-x[0], x[1]))
    jmeta = {"files": 0, "torn_bytes": 0, **(journal or {})}
    jmeta["full_records"] = t.full_records
    jmeta["detail"] = "summary" if not t.full_records else ("full" if t.full_records == t.flows else "mixed")
    return {
        "schema": REPORT_SCHEMA,
        "generated": iso(generated if generated is not None else time.time()),
        "period": {
            "start": iso(t.ts_min),
            "end": iso(t.ts_max),
            "start_ts": t.ts_min,
            "end_ts": t.ts_max,
            "hours": period_hours,
        },
        "filters": filters or {},
        "journal": jmeta,
        "flows": t.flows,
        "actions": _ordered_actions(t.actions),
        "modes": {
            **{m: int(t.modes.get(m, 0)) for m in MODES},
            **{k: v for k, v in t.modes.items() if k not in MODES},
        },
        "kinds": dict(sorted(t.kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "categories": {
            cat: {
                "events": int(t.cat_events.get(cat, 0)),
                "samples": int(t.cat_samples.get(cat, 0)),
                "flows": int(t.cat_flows.get(cat, 0)),
            }
            for cat in CATEGORIES
        },
        "apps": {
            name: {
                "flows": at.flows,
                "actions": _ordered_actions(at.actions),
                "categories": {cat: int(at.categories.get(cat, 0)) for cat in CATEGORIES},
            }
            for name, at in apps
        },
        "endpoints": {
            name: {
                "app": et.apps.most_common(1)[0][0] if et.apps else None,
                "flows": et.flows,
                "events": et.events,
                "actions": _ordered_actions(et.actions),
            }
            for name, et in eps
        },
        "hosts": dict(sorted(t.hosts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_HOSTS]),
        "routes": dict(sorted(t.routes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ROUTES]),
        "timeline": {
            "bucket_seconds": 3600,
            "buckets": [
                {
                    "start": iso(h),
                    "ts": h,
                    "flows": sum(t.hours[h].values()),
                    "actions": _ordered_actions(t.hours[h]),
                }
                for h in hours
            ],
        },
        "busiest_hours": [{"start": iso(h), "flows": f} for f, h in busiest[:TOP_BUSIEST]],
        "hour_of_day": list(t.hour_of_day),
        "bytes": {"in": t.bytes_in, "out": t.bytes_out},
    }


# -- filters ---------------------------------------------------------------------------------------


def filter_columns(
    c: Columns,
    *,
    since: float | None = None,
    until: float | None = None,
    apps: list[str] | None = None,
    categories: list[str] | None = None,
    detail: str | None = None,
) -> Columns:
    """Rows in [since, until), of the given apps, carrying any of the given categories, of a detail."""
    n = len(c)
    mask = np.ones(n, dtype=bool)
    if since is not None:
        mask &= c.ts >= since
    if until is not None:
        mask &= c.ts < until
    if apps:
        mask &= np.isin(c.app, c.ids_of(apps))
    if detail in ("summary", "full"):
        mask &= c.detail == (1 if detail == "full" else 0)
    if categories:
        wanted = [CATEGORIES.index(x) for x in categories if x in CATEGORIES]
        has = np.zeros(n, dtype=bool)
        has[c.cat_row[np.isin(c.cat_id, wanted)]] = True
        mask &= has
    return c.select(mask)


def build_report(
    c: Columns,
    *,
    since: float | None = None,
    until: float | None = None,
    apps: list[str] | None = None,
    categories: list[str] | None = None,
    detail: str | None = None,
    with_rows: bool = False,
) -> Report:
    files = c.files
    sel = filter_columns(c, since=since, until=until, apps=apps, categories=categories, detail=detail)
    summary = assemble(
        tallies_from_columns(sel),
        filters={
            "since": iso(since),
            "until": iso(until),
            "apps": list(apps or []),
            "categories": list(categories or []),
            "detail": detail or "any",
        },
        journal={
            "files": len(files),
            "records_read": len(c),
            "torn_bytes": sum(f.torn_bytes for f in files),
            "skipped_records": c.skipped,
        },
    )
    return Report(summary, csv_rows(sel) if with_rows else None)
