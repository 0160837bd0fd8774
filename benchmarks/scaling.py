"""How keyveil's cost grows: with the body size (should be linear) and with the catalog (should be flat).

    python benchmarks/scaling.py           # body 1 KiB .. 1 MiB, catalog 14 .. 1,000 endpoints
    python benchmarks/scaling.py --quick

In-process, CPU time of the process (time.process_time_ns), median of rounds.

1. Pipeline.process per flow and per KiB for a Banzai batch (drop) and a GraphQL send (strip) from
   1 KiB to 1 MiB (benchmarks/_payloads.py). Linear means a flat us/KiB column.
2. The bundled catalog plus generated endpoints up to 1,000 (a TOML file written like
   config/endpoints.toml: exact paths, prefixes and globs on Meta's hosts, in the order a maintainer
   would append them): Catalog.match for a non-Meta host, for /ajax/bz (an early entry), for the last
   generated entry, for an uncataloged path on a Meta host (falls through every entry), and the whole
   Pipeline.process of a 16 KiB Banzai batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _payloads import BANZAI_URL, GRAPHQL_URL, KIB, banzai_batch, graphql_send  # noqa: E402

from keyveil.catalog import load_catalog  # noqa: E402
from keyveil.config import default_config_dir  # noqa: E402
from keyveil.pipeline import Pipeline, Request  # noqa: E402

CONFIG = default_config_dir()


def cpu_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        t0 = time.process_time_ns()
        for _ in range(n):
            fn()
        samples.append((time.process_time_ns() - t0) / 1000 / n)
    return statistics.median(samples)


def body_scaling(rounds: int, quick: bool) -> None:
    p = Pipeline.from_config_dir(CONFIG)
    print("1. body size (Pipeline.process, CPU us)")
    print(f"   {'KiB':>5s}  {'Banzai drop us':>14s} {'us/KiB':>7s}   {'GraphQL strip us':>16s} {'us/KiB':>7s}")
    sizes = (1, 4, 16, 64, 256) if quick else (1, 4, 16, 64, 256, 1024)
    for kib in sizes:
        row = []
        for make, url in ((banzai_batch, BANZAI_URL), (graphql_send, GRAPHQL_URL)):
            body, ct = make(kib * KIB)
            req = Request("POST", url, {"content-type": ct}, body, time.time())
            out = p.process(req)
            assert out.action in ("dropped", "stripped"), out.record
            us = cpu_us(lambda req=req: p.process(req), max(1, 256 // kib), rounds)
            row.append((us, us / (len(body) / KIB)))
        print(f"   {kib:5d}  {row[0][0]:14.0f} {row[0][1]:7.1f}   {row[1][0]:16.0f} {row[1][1]:7.1f}")


def generated_catalog(n_total: int, base: str, seed: int = 0) -> str:
    """The bundled endpoints.toml plus endpoints up to n_total, as a maintainer would append them."""
    rng = random.Random(seed)
    n_base = base.count("[[endpoint]]")
    hosts = ["facebook.com", "messenger.com", "instagram.com", "threads.net", "www.facebook.com",
             "graph.facebook.com", "web.facebook.com", "i.instagram.com"]
    out = [base]
    for i in range(max(0, n_total - n_base)):
        kind = rng.choice(("telemetry", "telemetry", "functional"))
        shape = rng.random()
        if shape < 0.6:
            where = f'paths = ["/ajax/gen{i}/log", "/ajax/gen{i}/log/"]'
        elif shape < 0.85:
            where = f'path_prefixes = ["/api/gen{i}/"]'
        else:
            where = f'path_globs = ["/ajax/gen{i}/*logging*"]'
        out.append(
            f'\n[[endpoint]]\nname = "gen{i}"\nhosts = {rng.sample(hosts, rng.randint(1, 3))!r}\n{where}\n'
            f'methods = ["POST"]\ncodec = "form"\nkind = "{kind}"\nanswer = "ajax_logging"\n'.replace("'", '"')
        )
    return "".join(out)


def catalog_scaling(rounds: int) -> None:
    base = (CONFIG / "endpoints.toml").read_text()
    body, ct = banzai_batch(16 * KIB)
    req = Request("POST", BANZAI_URL, {"content-type": ct}, body, time.time())
    print("\n2. catalog size (CPU us per call)")
    print(f"   {'endpoints':>9s} {'non-Meta':>9s} {'/ajax/bz':>9s} {'last entry':>11s} {'uncataloged':>12s} "
          f"{'16 KiB Banzai process':>22s}")
    with tempfile.TemporaryDirectory() as t:
        cfg = Path(t)
        for name in ("detection.toml", "policy.toml"):
            (cfg / name).write_text((CONFIG / name).read_text())
        for n in (14, 100, 300, 1000):
            (cfg / "endpoints.toml").write_text(generated_catalog(n, base))
            p = Pipeline.from_config_dir(cfg)
            cat = p.catalog
            n_eps = len(cat.endpoints)
            last = cat.endpoints[-1]
            last_path = next(iter(last.paths), None) or (last.path_prefixes[0] + "x" if last.path_prefixes
                                                        else last.path_globs[0].replace("*", "a"))
            last_host = "www." + last.hosts[0] if last.hosts[0].count(".") == 1 else last.hosts[0]
            assert cat.match(last_host, last_path, "POST").endpoint is last
            assert cat.match("www.facebook.com", "/nothing/here", "POST").endpoint is None
            f = 20000
            cols = [
                cpu_us(lambda cat=cat: cat.match("static.example.co.uk", "/a/b.css", "GET"), f, rounds),
                cpu_us(lambda cat=cat: cat.match("www.facebook.com", "/ajax/bz", "POST"), f, rounds),
                cpu_us(lambda cat=cat, h=last_host, pa=last_path: cat.match(h, pa, "POST"), f // 4, rounds),
                cpu_us(lambda cat=cat: cat.match("www.facebook.com", "/nothing/here", "POST"), f // 4, rounds),
                cpu_us(lambda p=p: p.process(req), 50, rounds),
            ]
            print(f"   {n_eps:9d} {cols[0]:9.2f} {cols[1]:9.2f} {cols[2]:11.2f} {cols[3]:12.2f} {cols[4]:22.0f}")
    _ = load_catalog  # the same loader Pipeline.from_config_dir uses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 3 if args.quick else 7
    body_scaling(rounds, args.quick)
    catalog_scaling(rounds)


if __name__ == "__main__":
    main()
