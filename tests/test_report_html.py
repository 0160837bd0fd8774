"""The HTML report, rendered by a real headless Chromium: the numbers on the page are the JSON's, the
charts are drawn, and the page needs no network."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import make_records  # tests/ is on sys.path (no __init__.py: rootdir-relative imports)

from keyveil.journal import JournalWriter
from keyveil.report import LiveSummary, render, report_from_paths

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason="Chromium not installed (apt-get install -y chromium)"),
]


class DomIndex(HTMLParser):
    """Elements of the rendered DOM: by id, their data-value and their text; every tag and attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.tags: list[tuple[str, dict]] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if "id" in a:
            el = {"tag": tag, "attrs": a, "text": ""}
            self.by_id[a["id"]] = el
            if tag not in ("meta", "link", "img", "br"):
                self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1]["tag"] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for el in self._open:
            el["text"] += data


def dump_dom(path: Path, tmp: Path) -> str:
    """Chromium's DOM after layout; the network is mapped to nowhere so any fetch would fail."""
    p = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom",
            path.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "<body" in p.stdout
    return p.stdout


def value(dom: DomIndex, elem_id: str) -> int:
    el = dom.by_id[elem_id]
    shown = int(el["text"].strip().replace(",", ""))
    assert shown == int(el["attrs"]["data-value"]), elem_id
    return shown


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, DomIndex, str]:
    tmp = tmp_path_factory.mktemp("html")
    d = tmp / "j"
    w = JournalWriter(d)
    for r in make_records(2500, seed=11):
        w.write(r)
    w.close()
    w = JournalWriter(d, detail="full")  # some records at full detail: the page must say so
    for r in make_records(40, seed=12):
        w.write(r)
    w.close()
    rep = report_from_paths([d])
    summary = json.loads(render(rep, "json"))
    page = tmp / "report.html"
    page.write_text(render(rep, "html"))
    return summary, DomIndex_from(dump_dom(page, tmp)), page.read_text()


def DomIndex_from(html: str) -> DomIndex:  # noqa: N802 - reads like a constructor
    dom = DomIndex()
    dom.feed(html)
    return dom


@pytest.mark.timeout(120)
def test_numbers_on_the_page_match_the_json(rendered: tuple[dict, DomIndex, str]) -> None:
    s, dom, _ = rendered
    assert value(dom, "kv-flows") == s["flows"] == 2540
    for act, n in s["actions"].items():
        assert value(dom, f"kv-action-{act}") == n
    for cat, c in s["categories"].items():
        for k in ("events", "samples", "flows"):
            assert value(dom, f"kv-cat-{cat}-{k}") == c[k]
    for app, a in s["apps"].items():
        assert value(dom, f"kv-app-{app}-flows") == a["flows"]
        for act, n in a["actions"].items():
            assert value(dom, f"kv-app-{app}-{act}") == n
    for ep, e in s["endpoints"].items():
        assert value(dom, f"kv-ep-{ep}-flows") == e["flows"]
        assert value(dom, f"kv-ep-{ep}-events") == e["events"]
    for i, b in enumerate(s["busiest_hours"]):
        assert value(dom, f"kv-busiest-{i}") == b["flows"]
    assert value(dom, "kv-bytes-in") == s["bytes"]["in"]
    assert value(dom, "kv-period-hours") == s["period"]["hours"]
    assert dom.by_id["kv-period-start"]["attrs"]["data-value"] == s["period"]["start"]
    assert dom.by_id["kv-period-end"]["attrs"]["data-value"] == s["period"]["end"]
    assert int(dom.by_id["kv-detail-full"]["attrs"]["data-value"]) == s["journal"]["full_records"] == 40
    assert "--journal-detail full" in dom.by_id["kv-detail-full"]["text"]


@pytest.mark.timeout(120)
def test_charts_are_drawn_inline_and_nothing_is_fetched(rendered: tuple[dict, DomIndex, str]) -> None:
    s, dom, source = rendered
    hour_bars = [a for t, a in dom.tags if t == "rect" and "data-hour" in a]
    assert sum(int(a["data-value"]) for a in hour_bars) == s["flows"]
    assert {int(a["data-hour"]): int(a["data-value"]) for a in hour_bars} == {
        h: v for h, v in enumerate(s["hour_of_day"]) if v
    }
    for chart in (
        "kv-chart-timeline",
        "kv-chart-apps",
        "kv-chart-categories",
        "kv-chart-endpoints",
        "kv-chart-hours",
    ):
        assert dom.by_id[chart]["tag"] == "svg"
    rects = [a for t, a in dom.tags if t == "rect"]
    assert len(rects) > 50
    # the timeline's bars add up to the flows: read the counts back from their tooltips
    m = re.search(r'<svg[^>]*id="kv-chart-timeline".*?</svg>', source, re.S)
    assert m
    bars = re.findall(r"UTC \((?:hour|day|week)\): ([\d,]+) (\w+)</title>", m.group(0))
    assert sum(int(n.replace(",", "")) for n, _ in bars) == s["flows"]
    # self-contained: no script, no stylesheet link, no external URL in any src/href
    assert not [t for t, _ in dom.tags if t in ("script", "link", "iframe", "img")]
    for _, a in dom.tags:
        for k in ("src", "href"):
            assert not a.get(k, "").startswith(("http:", "https:", "//")), a
    assert "http://" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", source)


@pytest.mark.timeout(120)
def test_live_page_renders_with_auto_refresh(tmp_path: Path) -> None:
    live = LiveSummary(refresh=3)
    recs = make_records(300, seed=5)
    for r in recs:
        live.add(r)
    page = tmp_path / "live.html"
    page.write_bytes(live.render_html())
    dom = DomIndex_from(dump_dom(page, tmp_path))
    assert value(dom, "kv-flows") == 300
    assert value(dom, "kv-action-dropped") == sum(r["action"] == "dropped" for r in recs)
    assert value(dom, "kv-cat-keystroke-events") == sum(
        r["categories"].get("keystroke", {}).get("events", 0) for r in recs
    )
    refresh = [a for t, a in dom.tags if t == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh and refresh[0]["content"] == "3"
    empty = LiveSummary()
    assert b"No records yet" in empty.render_html()
