"""Benchmark: `keyveil report` over a 1,000,000-record journal.

    python benchmarks/report_bench.py [--records 1000000] [--via-writer] [--keep DIR]

Generates the journal in a temporary folder (16 MiB rotated files, the writer's defaults), then runs
`keyveil report` end to end (a fresh process: read + aggregate + render) once per format and reports
the wall time and the peak resident memory of that process (`wait4` rusage), plus an in-process
breakdown. Targets: under 5 s and under 500 MiB.

By default the journal is written by encoding records straight into frames with the journal's own
`Encoder` and `frame` (the writer's code path minus its thread and redaction, which would take minutes
in pure Python); `--via-writer` uses `JournalWriter` itself. The report's work is the same either way.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from keyveil import journal as J

TARGET_S = 5.0
TARGET_MIB = 500.0

SITES = [
    ("facebook", "www.facebook.com", "banzai", "/ajax/bz", "telemetry"),
    ("messenger", "www.messenger.com", "banzai", "/ajax/bz", "telemetry"),
    ("instagram", "www.instagram.com", "banzai", "/ajax/bz", "telemetry"),
    ("facebook", "gateway.facebook.com", "falco_ws", "/ws/realtime", "telemetry"),
    ("pixel", "www.facebook.com", "pixel", "/tr/", "telemetry"),
    ("instagram", "graph.instagram.com", "logging_client_events", "/logging_client_events", "telemetry"),
    ("facebook", "www.facebook.com", None, "/ajax/qm/", "uncataloged"),
    ("facebook", "www.facebook.com", "graphql", "/api/graphql/", "functional"),
    ("threads", "www.threads.net", "banzai", "/ajax/bz", "telemetry"),
]
ROUTES = [
    "falco:bd_pdc_signals", "falco:web_time_spent_bit_array", "time_spent_bit_array", "click_ref_logger",
    "falco:ods_web_batch", "perfx_custom_logger_endpoint", "comet_composer_keystroke",
    "feed_coreinteractionmouseover_augl", "pixel:PageView", "pixel:SubscribedButtonClick",
]  # fmt: skip
ACTIONS = ["dropped"] * 5 + ["stripped"] * 2 + ["rewritten"] * 2 + ["passed", "allowed", "failed"]


def make_pool(n: int, rnd: random.Random) -> list[dict]:
    """Distinct clean records (categories, routes, stats, sizes vary); time is set per use."""
    pool = []
    for _ in range(n):
        app, host, ep, path, kind = rnd.choice(SITES)
        cats = {
            c: {"events": rnd.randint(1, 8), "samples": rnd.randint(1, 500)}
            for c in rnd.sample(J.CATEGORIES, rnd.choice([0, 1, 1, 2, 2, 3]))
        }
        rec = {
            "ts": 0.0,
            "app": app,
            "endpoint": ep,
            "host": host,
            "path": path,
            "method": "POST",
            "kind": kind,
            "action": "allowed" if kind == "functional" else rnd.choice(ACTIONS),
            "mode": rnd.choice(["enforce"] * 9 + ["audit"]),
            "categories": cats,
            "routes": {r: rnd.randint(1, 5) for r in rnd.sample(ROUTES, rnd.randint(0, 3))},
            "size_in": rnd.randint(200, 64000),
            "size_out": 0,
            "layers": rnd.choice([["multipart", "json"], ["multipart", "json", "snappy_base64"], ["query"]]),
            "reason": rnd.choice([""] * 20 + ["limit:body_size"]),
            "stats": {"keystroke_median_gap_ms": rnd.randint(5, 40) * 10} if "keystroke" in cats else {},
        }
        clean, _ = J.redact(rec)
        pool.append(clean)
    return pool


def generate_direct(d: Path, n: int, seed: int = 1, max_bytes: int = 16 * J.MiB) -> None:
    rnd = random.Random(seed)
    pool = make_pool(20_000, rnd)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    t = 1733300000.0
    i, part = 0, 0
    while i < n:
        part += 1
        enc = J.Encoder()
        header = msgpack.packb({"format": J.FORMAT_VERSION, "schema": J.SCHEMA_VERSION, "created": time.time(),
                                "pid": os.getpid(), "detail": "summary"})  # fmt: skip
        buf = bytearray(J.MAGIC + J.frame(header))
        while i < n and len(buf) < max_bytes:
            rec = pool[rnd.randrange(len(pool))]
            t += rnd.expovariate(1 / 2.6)  # about a month for a million records
            rec["ts"] = float(round(t))
            payload = enc.encode(rec)
            defs = enc.take_defs()
            if defs is not None:
                buf += J.frame(defs)
            buf += J.frame(payload)
            i += 1
        path = d / f"journal-bench-{part:03d}{J.SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(buf)


def generate_writer(d: Path, n: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    pool = make_pool(20_000, rnd)
    w = J.JournalWriter(d, retention_days=None)
    t = 1733300000.0
    for i in range(n):
        t += rnd.expovariate(1 / 2.6)
        w.write(dict(pool[rnd.randrange(len(pool))], ts=t))
        if i % 10_000 == 9_999:
            w.flush(120)  # the queue is bounded: let the writer catch up instead of dropping
    w.close(120)
    assert w.stats.failed == 0, w.stats


def run_report(d: Path, fmt: str, out: Path) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MiB) of one `keyveil report` process."""
    cmd = [sys.executable, "-m", "keyveil.cli", "report", str(d), "--format", fmt, "-o", str(out)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if status != 0:
        raise SystemExit(f"keyveil report failed: {err}")
    return wall, usage.ru_maxrss / 1024, err.strip()


def in_process(d: Path) -> None:
    import gc

    from keyveil.report import render
    from keyveil.report.aggregate import build_report
    from keyveil.report.columns import ColumnBuilder

    gc.disable()
    t0 = time.perf_counter()
    b = ColumnBuilder()
    b.add_paths([d])
    cols = b.finish()
    t1 = time.perf_counter()
    rep = build_report(cols, with_rows=True)
    t2 = time.perf_counter()
    for fmt in ("text", "json", "csv", "md", "html"):
        render(rep, fmt)
    t3 = time.perf_counter()
    gc.enable()
    print(
        f"in-process: read+columns {t1 - t0:.2f} s ({len(cols):,} records, "
        f"{(t1 - t0) / max(len(cols), 1) * 1e6:.2f} us/record), aggregate+CSV rows {t2 - t1:.2f} s, "
        f"render all five formats {t3 - t2:.2f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--via-writer", action="store_true", help="generate with JournalWriter (minutes)")
    ap.add_argument("--keep", type=Path, help="generate into (or reuse) this folder and keep it")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="keyveil-bench-"))
    d = args.keep or tmp / "journal"
    try:
        if not (args.keep and any(d.glob("*.kvj"))):
            t0 = time.perf_counter()
            (generate_writer if args.via_writer else generate_direct)(d, args.records)
            size = sum(f.stat().st_size for f in d.glob("*.kvj"))
            print(
                f"generated {args.records:,} records in {time.perf_counter() - t0:.1f} s: "
                f"{len(list(d.glob('*.kvj')))} files, {size / J.MiB:.1f} MiB ({size / args.records:.0f} bytes/record)"
            )
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        ok = True
        for fmt in ("text", "json", "csv", "html"):
            out = tmp / f"report.{fmt}"
            wall, mib, msg = run_report(d, fmt, out)
            good = wall < TARGET_S and mib < TARGET_MIB
            ok &= good
            print(
                f"keyveil report --format {fmt:<5} {wall:6.2f} s  peak {mib:6.1f} MiB  "
                f"{'ok' if good else 'OVER TARGET'}  ({out.stat().st_size / 1024:.0f} KiB; {msg})"
            )
        in_process(d)
        print(f"targets: < {TARGET_S} s and < {TARGET_MIB:.0f} MiB per run: {'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
