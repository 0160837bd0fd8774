"""Text renderings of a report: terminal summary, JSON, CSV, Markdown."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from keyveil.report.aggregate import Report

CSV_HEADER = ("hour", "app", "category", "action", "flows", "events", "samples")


def _n(v: int) -> str:
    return f"{v:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def _period(s: dict[str, Any]) -> str:
    p = s["period"]
    if not p["start"]:
        return "no records"
    start, end = p["start"].replace("T", " ")[:16], p["end"].replace("T", " ")[:16]
    return f"{start} to {end} UTC ({p['hours']} h)"


def detail_notice(s: dict[str, Any]) -> str | None:
    full = s["journal"].get("full_records", 0)
    if not full:
        return None
    return (
        f"{_n(full)} of {_n(s['flows'])} records were journaled with --journal-detail full "
        "(more than the privacy-preserving default)."
    )


def render_text(report: Report, width: int = 78) -> str:
    s = report.summary
    flows = s["flows"]
    out: list[str] = []
    add = out.append
    add(f"keyveil report: {_period(s)}")
    j = s["journal"]
    add(f"{_n(flows)} flows from {j.get('files', 0)} journal file(s)")
    if j.get("torn_bytes"):
        add(f"note: {_n(j['torn_bytes'])} bytes of torn or damaged journal tail were skipped")
    notice = detail_notice(s)
    if notice:
        add(f"NOTE: {notice}")
    f = s["filters"]
    active = [
        f"{k}={','.join(v) if isinstance(v, list) else v}"
        for k, v in f.items()
        if v and v != "any" and k != "live"
    ]
    if active:
        add("filters: " + ", ".join(active))
    if not flows:
        return "\n".join(out) + "\n"

    add("")
    add(f"{'Actions':<14}{'flows':>10}  share")
    for k, v in s["actions"].items():
        if v:
            add(f"  {k:<12}{_n(v):>10}  {_pct(v, flows)}")

    add("")
    add(f"{'Categories':<14}{'events':>12}{'samples':>14}{'flows':>10}")
    for k, v in s["categories"].items():
        if v["events"] or v["flows"]:
            add(f"  {k:<12}{_n(v['events']):>12}{_n(v['samples']):>14}{_n(v['flows']):>10}")

    add("")
    acts = [a for a, v in s["actions"].items() if v]
    add(f"{'Apps':<14}{'flows':>10}" + "".join(f"{a[:9]:>10}" for a in acts))
    for name, a in s["apps"].items():
        add(
            f"  {name[:12]:<12}{_n(a['flows']):>10}"
            + "".join(f"{_n(a['actions'].get(x, 0)):>10}" for x in acts)
        )

    add("")
    add(f"{'Endpoints':<26}{'app':<12}{'flows':>10}{'events':>10}{'dropped':>10}")
    for name, e in list(s["endpoints"].items())[:15]:
        add(
            f"  {name[:24]:<24}{(e['app'] or '')[:11]:<12}{_n(e['flows']):>10}{_n(e['events']):>10}"
            f"{_n(e['actions'].get('dropped', 0)):>10}"
        )
    if len(s["endpoints"]) > 15:
        add(f"  ... and {len(s['endpoints']) - 15} more")

    if s["busiest_hours"]:
        add("")
        add("Busiest hours (UTC)")
        top = s["busiest_hours"][0]["flows"] or 1
        for b in s["busiest_hours"]:
            bar = "#" * max(1, round(30 * b["flows"] / top))
            add(f"  {b['start'].replace('T', ' ')[:16]}{_n(b['flows']):>10}  {bar}")

    if s["routes"]:
        add("")
        add("Top routes (Meta's event names)")
        for name, v in list(s["routes"].items())[:10]:
            add(f"  {name[:50]:<50}{_n(v):>10}")
    add("")
    b = s["bytes"]
    add(f"Bytes: {_n(b['in'])} in, {_n(b['out'])} out ({_n(b['in'] - b['out'])} kept from Meta)")
    return "\n".join(out) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(report.summary, indent=2, ensure_ascii=False) + "\n"


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    w.writerows(report.rows or [])
    return buf.getvalue()


def _md_escape(v: Any) -> str:
    return str(v).replace("|", "\\|")


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|",
    ]
    out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return out


def render_md(report: Report) -> str:
    s = report.summary
    out = ["# keyveil report", "", f"**Period:** {_period(s)}  ", f"**Flows:** {_n(s['flows'])}"]
    notice = detail_notice(s)
    if notice:
        out += ["", f"> **Note:** {notice}"]
    out += ["", "## Actions", ""]
    out += _md_table(["action", "flows"], [[k, _n(v)] for k, v in s["actions"].items()])
    out += ["", "## Categories", ""]
    out += _md_table(
        ["category", "events", "samples", "flows"],
        [[k, _n(v["events"]), _n(v["samples"]), _n(v["flows"])] for k, v in s["categories"].items()],
    )
    out += ["", "## Apps", ""]
    out += _md_table(
        ["app", "flows", *s["actions"].keys()],
        [
            [k, _n(a["flows"]), *(_n(a["actions"].get(x, 0)) for x in s["actions"])]
            for k, a in s["apps"].items()
        ],
    )
    out += ["", "## Endpoints", ""]
    out += _md_table(
        ["endpoint", "app", "flows", "events", "dropped"],
        [
            [k, e["app"] or "", _n(e["flows"]), _n(e["events"]), _n(e["actions"].get("dropped", 0))]
            for k, e in s["endpoints"].items()
        ],
    )
    if s["busiest_hours"]:
        out += ["", "## Busiest hours (UTC)", ""]
        out += _md_table(["hour", "flows"], [[b["start"], _n(b["flows"])] for b in s["busiest_hours"]])
    if s["routes"]:
        out += ["", "## Top routes", ""]
        out += _md_table(["route", "count"], [[f"`{k}`", _n(v)] for k, v in s["routes"].items()])
    return "\n".join(out) + "\n"
