"""The HTML report: one self-contained file (inline CSS, inline SVG charts drawn here, no script, no
network). Every number a test or a reader may check carries a stable `id` and a raw `data-value`."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import jinja2
from markupsafe import Markup, escape

from keyveil.journal import ACTIONS, CATEGORIES
from keyveil.report.aggregate import Report
from keyveil.report.render_text import detail_notice

ACTION_COLORS = {
    "dropped": "#c92a2a",
    "stripped": "#e67700",
    "rewritten": "#7048e8",
    "passed": "#868e96",
    "allowed": "#2b8a3e",
    "failed": "#343a40",
}
CATEGORY_COLORS = {
    "keystroke": "#1971c2",
    "click": "#e8590c",
    "pointer": "#0ca678",
    "scroll": "#f59f00",
    "touch": "#d6336c",
    "activity": "#7048e8",
    "fingerprint": "#495057",
    "other": "#adb5bd",
}
_OTHER_COLOR = "#a5d8ff"

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("keyveil", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _color(action: str) -> str:
    return ACTION_COLORS.get(action, _OTHER_COLOR)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _fmt(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _gridlines(x0: float, x1: float, mt: float, ph: float, top: float, steps: int) -> list[str]:
    """Horizontal grid lines with their value labels, from 0 to `top` in `steps` steps."""
    out = []
    for k in range(steps + 1):
        y = mt + ph - ph * k / steps
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(top * k / steps)}</text>')
    return out


def timeline_svg(s: dict[str, Any], width: int = 900, height: int = 240) -> Markup:
    """Stacked bars of flows per time bucket, coloured by action."""
    buckets = s["timeline"]["buckets"]
    if not buckets:
        return Markup('<p class="empty">No records in this period.</p>')
    first, last = buckets[0]["ts"], buckets[-1]["ts"]
    span_h = (last - first) // 3600 + 1
    step = 3600 if span_h <= 24 * 7 else 86400 if span_h <= 24 * 180 else 7 * 86400
    start = first - first % step
    nb = int((last - start) // step) + 1
    actions = list(s["actions"].keys())
    grid = [[0] * len(actions) for _ in range(nb)]
    for b in buckets:
        i = int((b["ts"] - start) // step)
        for j, a in enumerate(actions):
            grid[i][j] += b["actions"].get(a, 0)
    ml, mr, mt, mb = 56, 10, 10, 34
    pw, ph = width - ml - mr, height - mt - mb
    top = _nice_max(max(sum(r) for r in grid))
    bw = pw / nb
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="chart" '
        f'role="img" aria-label="Flows over time" id="kv-chart-timeline" data-buckets="{nb}" data-step="{step}">'
    ]
    parts += _gridlines(ml, width - mr, mt, ph, top, 4)
    unit = {3600: "hour", 86400: "day"}.get(step, "week")
    for i, row in enumerate(grid):
        total = sum(row)
        if not total:
            continue
        x = ml + i * bw
        y = mt + ph
        label = datetime.fromtimestamp(start + i * step, UTC).strftime("%Y-%m-%d %H:%M")
        for j, v in enumerate(row):
            if not v:
                continue
            h = ph * v / top
            y -= h
            parts.append(
                f'<rect x="{x + bw * 0.1:.2f}" y="{y:.2f}" width="{max(bw * 0.8, 0.6):.2f}" height="{h:.2f}" '
                f'fill="{_color(actions[j])}"><title>{escape(label)} UTC ({unit}): {v:,} {escape(actions[j])}'
                "</title></rect>"
            )
    nticks = min(nb, 6)
    for k in range(nticks):
        i = round(k * (nb - 1) / max(nticks - 1, 1))
        x = ml + (i + 0.5) * bw
        fmt = "%m-%d %H:%M" if step == 3600 else "%Y-%m-%d"
        label = datetime.fromtimestamp(start + i * step, UTC).strftime(fmt)
        anchor = "start" if k == 0 and nticks > 1 else "end" if k == nticks - 1 and nticks > 1 else "middle"
        x = ml if anchor == "start" else width - mr if anchor == "end" else x
        parts.append(
            f'<text x="{x:.1f}" y="{height - 12}" text-anchor="{anchor}" class="tick">{label}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def hours_svg(s: dict[str, Any], width: int = 900, height: int = 160) -> Markup:
    """Flows per hour of the day (UTC), all days together."""
    counts = s["hour_of_day"]
    if not any(counts):
        return Markup("")
    ml, mr, mt, mb = 56, 10, 8, 24
    pw, ph = width - ml - mr, height - mt - mb
    top = _nice_max(max(counts))
    bw = pw / 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="chart" role="img" '
        f'aria-label="Flows by hour of the day" id="kv-chart-hours">'
    ]
    parts += _gridlines(ml, width - mr, mt, ph, top, 2)
    for h, v in enumerate(counts):
        x = ml + h * bw
        if v:
            bh = ph * v / top
            parts.append(
                f'<rect x="{x + bw * 0.15:.2f}" y="{mt + ph - bh:.2f}" width="{bw * 0.7:.2f}" height="{bh:.2f}" '
                f'fill="#1971c2" data-hour="{h}" data-value="{v}"><title>{h:02d}:00 UTC: {v:,} flows</title></rect>'
            )
        if h % 3 == 0:
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{height - 8}" text-anchor="middle" class="tick">{h:02d}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def hbar_svg(
    rows: list[tuple[str, list[tuple[int, str, str]]]], chart_id: str, label: str, width: int = 900
) -> Markup:
    """Horizontal bars: (label, [(value, colour, tooltip), ...]) stacked per row, total at the end."""
    if not rows:
        return Markup('<p class="empty">Nothing to show.</p>')
    rh, ml, mr = 24, 190, 90
    height = rh * len(rows) + 8
    pw = width - ml - mr
    top = max(sum(v for v, _, _ in segs) for _, segs in rows) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" class="chart" role="img" '
        f'aria-label="{escape(label)}" id="{escape(chart_id)}">'
    ]
    for i, (name, segs) in enumerate(rows):
        y = 4 + i * rh
        parts.append(
            f'<text x="{ml - 8}" y="{y + rh * 0.65:.1f}" text-anchor="end" class="label">{escape(name[:28])}</text>'
        )
        x = float(ml)
        total = 0
        for v, color, tip in segs:
            if v <= 0:
                continue
            w = pw * v / top
            parts.append(
                f'<rect x="{x:.2f}" y="{y + 3}" width="{max(w, 0.8):.2f}" height="{rh - 6}" fill="{color}">'
                f"<title>{escape(name)}: {v:,} {escape(tip)}</title></rect>"
            )
            x += w
            total += v
        parts.append(f'<text x="{x + 6:.1f}" y="{y + rh * 0.65:.1f}" class="value">{total:,}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _charts(s: dict[str, Any]) -> dict[str, Markup]:
    acts = list(s["actions"].keys())
    apps = [
        (name, [(a["actions"].get(x, 0), _color(x), x) for x in acts])
        for name, a in list(s["apps"].items())[:15]
    ]
    cats = [
        (name, [(c["events"], CATEGORY_COLORS.get(name, _OTHER_COLOR), "events")])
        for name, c in s["categories"].items()
    ]
    eps = [
        (name, [(e["actions"].get(x, 0), _color(x), x) for x in acts])
        for name, e in list(s["endpoints"].items())[:10]
    ]
    return {
        "timeline": timeline_svg(s),
        "apps": hbar_svg(apps, "kv-chart-apps", "Flows by app"),
        "categories": hbar_svg(cats, "kv-chart-categories", "Events by category"),
        "endpoints": hbar_svg(eps, "kv-chart-endpoints", "Top endpoints"),
        "hours": hours_svg(s),
    }


def num(value: int, elem_id: str | None = None) -> Markup:
    """A number with its raw value in `data-value` and, when given, a stable id."""
    attr = f' id="{escape(elem_id)}"' if elem_id else ""
    return Markup(f'<span class="num"{attr} data-value="{int(value)}">{int(value):,}</span>')


def render_html(
    report: Report, *, refresh: int | None = None, live: bool = False, title: str | None = None
) -> str:
    s = report.summary
    tpl = _env.get_template("report.html.j2")
    return tpl.render(
        s=s,
        charts=_charts(s),
        notice=detail_notice(s),
        refresh=refresh,
        live=live,
        title=title or ("keyveil: live" if live else "keyveil report"),
        num=num,
        action_colors={a: _color(a) for a in s["actions"]},
        category_colors=CATEGORY_COLORS,
        known_actions=ACTIONS,
        categories=CATEGORIES,
    )
