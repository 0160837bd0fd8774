"""Reports: numpy aggregation checked against a plain-Python count of the same journal, every format,
filters, the CLI, LiveSummary and write_report."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyveil.journal import ACTIONS, CATEGORIES, JournalWriter, read_records
from keyveil.report import FORMATS, LiveSummary, render, report_from_paths, report_from_records, write_report
from keyveil.report.aggregate import UNCATALOGED

T0 = 1733300000.0  # 2024-12-04 08:13:20 UTC

SITES = [
    ("facebook", "www.facebook.com", "banzai", "/ajax/bz", "telemetry"),
    ("messenger", "www.messenger.com", "banzai", "/ajax/bz", "telemetry"),
    ("instagram", "graph.instagram.com", "logging_client_events", "/logging_client_events", "telemetry"),
    ("facebook", "gateway.facebook.com", "falco_ws", "/ws/realtime", "telemetry"),
    ("pixel", "www.facebook.com", "pixel", "/tr/", "telemetry"),
    ("facebook", "www.facebook.com", None, "/ajax/qm/", "uncataloged"),
    ("facebook", "www.facebook.com", "graphql", "/api/graphql/", "functional"),
]
ROUTES = ["falco:bd_pdc_signals", "time_spent_bit_array", "click_ref_logger", "falco:ods_web_batch"]


def make_records(n: int, seed: int = 7, full_every: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    out = []
    ts = T0
    for i in range(n):
        ts += rnd.choice([1, 5, 30, 400, 3000])  # a few hours-long gaps, busy and quiet hours
        app, host, ep, path, kind = rnd.choice(SITES)
        cats = {
            c: {"events": rnd.randint(1, 6), "samples": rnd.randint(1, 400)}
            for c in rnd.sample(CATEGORIES, rnd.choice([0, 0, 1, 2, 3]))
        }
        out.append(
            {
                "v": 1,
                "ts": ts,
                "app": app,
                "endpoint": ep,
                "host": host,
                "path": path,
                "method": "POST",
                "kind": kind,
                "action": "allowed" if kind == "functional" else rnd.choice(ACTIONS[:4] + ("failed",)),
                "mode": rnd.choice(["enforce", "enforce", "audit"]),
                "categories": cats,
                "routes": {r: rnd.randint(1, 3) for r in rnd.sample(ROUTES, rnd.randint(0, 2))},
                "size_in": rnd.randint(100, 60000),
                "size_out": rnd.choice([0, 50]),
                "layers": ["multipart", "json"],
                "reason": "",
                "stats": {},
                **({"detail": "full"} if full_every and i % full_every == 0 else {}),
            }
        )
    return out


def journal(tmp_path: Path, records: list[dict], detail: str = "summary", name: str = "j") -> Path:
    d = tmp_path / name
    w = JournalWriter(d, detail=detail, max_bytes=64 * 1024)  # several rotated files
    for r in records:
        w.write(r)
    w.close()
    assert w.stats.written == len(records)
    return d


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected(records: list[dict]) -> dict:
    """The same aggregates, counted the obvious way."""
    e: dict = {
        "flows": len(records),
        "actions": Counter(r["action"] for r in records),
        "cat_events": Counter(),
        "cat_samples": Counter(),
        "cat_flows": Counter(),
        "apps": Counter(r["app"] for r in records),
        "app_actions": Counter((r["app"], r["action"]) for r in records),
        "app_cats": Counter(),
        "eps": Counter(r["endpoint"] or UNCATALOGED for r in records),
        "ep_events": Counter(),
        "hosts": Counter(r["host"] for r in records),
        "routes": Counter(),
        "hours": Counter(int(r["ts"] // 3600) * 3600 for r in records),
        "rows": Counter(),
        "bytes_in": sum(r["size_in"] for r in records),
    }
    for r in records:
        hour = iso(int(r["ts"] // 3600) * 3600)
        for c, v in r["categories"].items():
            e["cat_events"][c] += v["events"]
            e["cat_samples"][c] += v["samples"]
            e["cat_flows"][c] += 1
            e["app_cats"][(r["app"], c)] += v["events"]
            e["ep_events"][r["endpoint"] or UNCATALOGED] += v["events"]
            e["rows"][(hour, r["app"], c, r["action"])] += 1
        if not r["categories"]:
            e["rows"][(hour, r["app"], "none", r["action"])] += 1
        for k, v in r["routes"].items():
            e["routes"][k] += v
    return e


def check_summary(s: dict, records: list[dict]) -> None:
    e = expected(records)
    assert s["flows"] == e["flows"]
    assert list(s["actions"])[:6] == list(ACTIONS)
    assert {k: v for k, v in s["actions"].items() if v} == dict(e["actions"])
    for c in CATEGORIES:
        assert s["categories"][c] == {
            "events": e["cat_events"][c],
            "samples": e["cat_samples"][c],
            "flows": e["cat_flows"][c],
        }
    assert {k: a["flows"] for k, a in s["apps"].items()} == dict(e["apps"])
    for (app, act), n in e["app_actions"].items():
        assert s["apps"][app]["actions"][act] == n
    for (app, c), n in e["app_cats"].items():
        assert s["apps"][app]["categories"][c] == n
    assert {k: v["flows"] for k, v in s["endpoints"].items()} == dict(e["eps"])
    assert {k: v["events"] for k, v in s["endpoints"].items() if v["events"]} == dict(e["ep_events"])
    assert list(s["endpoints"].values())[0]["flows"] == max(e["eps"].values())
    assert s["hosts"] == dict(e["hosts"])
    assert s["routes"] == dict(e["routes"])
    assert [(b["ts"], b["flows"]) for b in s["timeline"]["buckets"]] == sorted(e["hours"].items())
    top = max(e["hours"].values())
    assert s["busiest_hours"][0]["flows"] == top
    assert sum(s["hour_of_day"]) == len(records)
    assert s["period"]["start_ts"] == min(r["ts"] for r in records)
    assert s["period"]["end"] == iso(max(r["ts"] for r in records))
    assert s["bytes"]["in"] == e["bytes_in"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("rep")
    recs = make_records(3000)
    d = journal(tmp, recs)
    back = list(read_records(d))  # what the journal kept (ts rounded to the second)
    assert len(back) == 3000
    return d, back


def test_json_matches_a_plain_count(data: tuple[Path, list[dict]]) -> None:
    d, recs = data
    rep = report_from_paths([d])
    s = json.loads(render(rep, "json"))
    check_summary(s, recs)
    assert s["schema"] == "keyveil-report/1"
    assert s["journal"]["files"] >= 3 and s["journal"]["records_read"] == 3000
    assert s["journal"]["detail"] == "summary" and s["journal"]["full_records"] == 0


def test_from_records_equals_from_paths(data: tuple[Path, list[dict]]) -> None:
    d, recs = data
    a = report_from_paths([d]).summary
    b = report_from_records(recs).summary
    for k in ("generated", "journal"):
        a.pop(k), b.pop(k)
    assert a == b


def test_csv_one_row_per_hour_app_category_action(data: tuple[Path, list[dict]]) -> None:
    d, recs = data
    text = render(report_from_paths([d], with_rows=True), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["hour", "app", "category", "action", "flows", "events", "samples"]
    keys = [(r["hour"], r["app"], r["category"], r["action"]) for r in rows]
    assert len(keys) == len(set(keys)) and keys == sorted(
        keys, key=lambda k: (k[0], k[1], [*CATEGORIES, "none"].index(k[2]), k[3])
    )
    assert {k: int(r["flows"]) for k, r in zip(keys, rows, strict=True)} == dict(expected(recs)["rows"])
    ev = Counter()
    for r in rows:
        ev[r["category"]] += int(r["events"])
    assert all(ev[c] == expected(recs)["cat_events"][c] for c in CATEGORIES)


@pytest.mark.parametrize(
    "filters,pred",
    [
        ({"since": T0 + 86400}, lambda r: r["ts"] >= T0 + 86400),
        ({"until": T0 + 86400}, lambda r: r["ts"] < T0 + 86400),
        ({"apps": ["messenger", "pixel"]}, lambda r: r["app"] in ("messenger", "pixel")),
        ({"categories": ["keystroke"]}, lambda r: "keystroke" in r["categories"]),
        (
            {"apps": ["facebook"], "categories": ["click", "scroll"], "since": T0 + 3600},
            lambda r: (
                r["app"] == "facebook" and {"click", "scroll"} & set(r["categories"]) and r["ts"] >= T0 + 3600
            ),
        ),
    ],
)
def test_filters(data: tuple[Path, list[dict]], filters: dict, pred) -> None:
    d, recs = data
    sel = [r for r in recs if pred(r)]
    assert 0 < len(sel) < len(recs)
    check_summary(report_from_paths([d], **filters).summary, sel)


def test_full_detail_is_announced_and_filterable(tmp_path: Path) -> None:
    d1 = journal(tmp_path, make_records(200, seed=1), name="a")
    d2 = journal(tmp_path, make_records(50, seed=2), detail="full", name="b")
    s = report_from_paths([d1, d2]).summary
    assert s["journal"]["full_records"] == 50 and s["journal"]["detail"] == "mixed"
    for fmt in ("text", "md"):
        assert "--journal-detail full" in render(report_from_paths([d1, d2]), fmt)
    assert "journal-detail" not in render(report_from_paths([d1]), "text")
    assert report_from_paths([d1, d2], detail="full").summary["flows"] == 50
    assert report_from_paths([d1, d2], detail="summary").summary["flows"] == 200


def test_text_and_markdown_show_the_numbers(data: tuple[Path, list[dict]]) -> None:
    d, recs = data
    rep = report_from_paths([d])
    s = rep.summary
    e = expected(recs)
    text = render(rep, "text")
    assert text.startswith("keyveil report: 2024-12-04 08:")
    assert f"{len(recs):,} flows" in text and "Busiest hours (UTC)" in text
    for act, n in e["actions"].items():
        assert any(line.split()[:2] == [act, f"{n:,}"] for line in text.splitlines())
    kline = next(line for line in text.splitlines() if line.strip().startswith("keystroke"))
    assert kline.split()[1:] == [f"{e['cat_events']['keystroke']:,}", f"{e['cat_samples']['keystroke']:,}",
                                 f"{e['cat_flows']['keystroke']:,}"]  # fmt: skip
    md = render(rep, "md")
    assert md.startswith("# keyveil report")
    assert f"| dropped | {s['actions']['dropped']:,} |" in md
    assert f"| keystroke | {e['cat_events']['keystroke']:,} |" in md


def test_empty_and_torn_journals(tmp_path: Path) -> None:
    d = journal(tmp_path, [], name="empty")
    for fmt in FORMATS:
        out = render(report_from_paths([d], with_rows=True), fmt)
        assert out
    assert report_from_paths([d]).summary["flows"] == 0
    d = journal(tmp_path, make_records(100), name="torn")
    (f,) = d.glob("*.kvj")
    f.write_bytes(f.read_bytes()[:-7])
    s = report_from_paths([d]).summary
    assert s["flows"] == 99 and s["journal"]["torn_bytes"] > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keyveil.cli", "report", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_formats_filters_and_errors(data: tuple[Path, list[dict]], tmp_path: Path) -> None:
    d, recs = data
    p = run_cli(str(d), "--since", "2024-12-05", "--app", "facebook,instagram", "--format", "json")
    assert p.returncode == 0, p.stderr
    since = datetime(2024, 12, 5, tzinfo=UTC).timestamp()
    sel = [r for r in recs if r["ts"] >= since and r["app"] in ("facebook", "instagram")]
    check_summary(json.loads(p.stdout), sel)
    for suffix, head in (
        (".csv", "hour,app,category"),
        (".md", "# keyveil report"),
        (".html", "<!DOCTYPE html>"),
    ):
        out = tmp_path / f"r{suffix}"
        p = run_cli(str(d), "-o", str(out), "--category", "keystroke")
        assert p.returncode == 0, p.stderr
        assert out.read_text().startswith(head) and "wrote" in p.stderr
    p = run_cli(str(d))
    assert p.returncode == 0 and f"{len(recs):,} flows" in p.stdout
    assert run_cli(str(d), "--since", "yesterday-ish").returncode == 2
    assert run_cli(str(d), "--category", "typing").returncode == 2
    p = run_cli(str(tmp_path / "nothing-here"))
    assert p.returncode == 1 and "no journal" in p.stderr


def test_parse_time() -> None:
    from keyveil.commands.report import parse_time

    assert parse_time("2024-12-04") == datetime(2024, 12, 4, tzinfo=UTC).timestamp()
    assert parse_time("2024-12-04T10:30+01:00") == datetime(2024, 12, 4, 9, 30, tzinfo=UTC).timestamp()
    assert parse_time("1733300000") == T0
    assert parse_time("24h", now=T0) == T0 - 86400
    assert parse_time("90m", now=T0) == T0 - 5400


def test_live_summary_matches_the_offline_report(data: tuple[Path, list[dict]]) -> None:
    d, recs = data
    live = LiveSummary(keep_hours=10_000)
    for r in recs:
        live.add(r)
    a = live.summary()
    b = report_from_records(recs).summary
    for k in ("generated", "journal", "filters"):
        a.pop(k), b.pop(k)
    assert a == b
    page = live.render_html().decode()
    assert '<meta http-equiv="refresh" content="5">' in page
    assert f'id="kv-flows" data-value="{len(recs)}"' in page


def test_live_summary_is_bounded(data: tuple[Path, list[dict]]) -> None:
    _, recs = data
    live = LiveSummary(keep_hours=24)
    for i in range(3000):
        r = dict(recs[i % len(recs)], host=f"h{i}.facebook.com", routes={f"route_{i}": 1})
        live.add(r)
    t = live.t
    assert len(t.hours) <= 24 and len(t.hosts) <= LiveSummary.MAX_KEYS + 1
    assert len(t.routes) <= LiveSummary.MAX_KEYS + 1 and t.routes["(more)"] > 0
    assert t.flows == 3000


def test_write_report_every_format(data: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, recs = data
    for fmt in FORMATS:
        out = write_report(iter(recs), fmt, tmp_path / f"r.{fmt}")
        text = out.read_text()
        if fmt == "json":
            check_summary(json.loads(text), recs)
        elif fmt == "csv":
            assert sum(1 for _ in csv.reader(io.StringIO(text))) == len(expected(recs)["rows"]) + 1
        else:
            assert f"{len(recs):,}" in text
    with pytest.raises(ValueError):
        write_report(recs, "pdf", tmp_path / "r.pdf")
    # a journal folder instead of records: the fast path, the same numbers
    d, _ = data
    fast = json.loads(write_report(d, "json", tmp_path / "fast.json").read_text())
    slow = json.loads((tmp_path / "r.json").read_text())
    for k in ("generated", "journal"):
        fast.pop(k), slow.pop(k)
    assert fast == slow


def test_grouping_per_hour_is_utc_hours(tmp_path: Path) -> None:
    recs = make_records(5)
    for i, r in enumerate(recs):
        r["ts"] = datetime(2024, 12, 4, 23, 59, 59, tzinfo=UTC).timestamp() + i  # across midnight
    s = report_from_records(recs).summary
    assert [b["start"] for b in s["timeline"]["buckets"]] == ["2024-12-04T23:00:00Z", "2024-12-05T00:00:00Z"]
    assert s["hour_of_day"][23] == 1 and s["hour_of_day"][0] == 4
    by_hour = defaultdict(int)
    for b in s["timeline"]["buckets"]:
        by_hour[b["start"]] += b["flows"]
    assert by_hour == {"2024-12-04T23:00:00Z": 1, "2024-12-05T00:00:00Z": 4}


def test_records_in_an_unknown_layout_are_skipped_and_counted(tmp_path: Path) -> None:
    import msgpack

    from keyveil import journal as J

    enc = J.Encoder()
    good = [J.redact(r)[0] for r in make_records(5)]
    frames = [
        J.frame(msgpack.packb({"format": 1, "schema": 1, "created": 0.0, "pid": 1, "detail": "summary"}))
    ]
    payloads = [enc.encode(r) for r in good]
    frames.append(J.frame(enc.take_defs() or b""))
    frames += [J.frame(p) for p in payloads[:3]]
    frames.append(J.frame(msgpack.packb([1, 2, 3])))  # too short to be a record
    frames.append(J.frame(msgpack.packb(list(range(40)))))  # long enough, wrong head
    frames += [J.frame(p) for p in payloads[3:]]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.kvj").write_bytes(J.MAGIC + b"".join(frames))
    s = report_from_paths([tmp_path / "j"]).summary
    assert s["flows"] == 5 and s["journal"]["skipped_records"] == 2
    assert s["categories"] == report_from_records(good).summary["categories"]
    assert [r["ts"] for r in read_records(tmp_path / "j")] == [r["ts"] for r in good]


def test_live_summary_survives_malformed_records() -> None:
    live = LiveSummary()
    live.add({"ts": "soon", "categories": {"keystroke": {"events": "3"}, "weird": 2}, "routes": {"r": None}})
    live.add({"ts": float("nan"), "size_in": "big", "categories": [], "app": 5})
    good = make_records(1)[0]
    live.add(good)
    s = live.summary()
    assert s["flows"] == 3
    assert s["categories"]["other"]["events"] == 2 + good["categories"].get("other", {}).get("events", 0)
    assert b'id="kv-flows" data-value="3"' in live.render_html()
