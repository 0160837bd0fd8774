"""Per-flow cost of keyveil in-process, without sockets, in microseconds.

    python benchmarks/hook_cost.py            # all figures
    python benchmarks/hook_cost.py --quick    # fewer repetitions
    python benchmarks/hook_cost.py --profile  # cProfile of the 16 KiB Banzai drop and GraphQL strip

1. The `request` hook on non-Meta flows (real mitmproxy HTTPFlow objects from mitmproxy.test.tflow),
   dispatched the way mitmproxy dispatches it (AddonManager.invoke_addon, awaited), next to an empty
   async hook and an empty sync hook (the floor mitmproxy's dispatch costs on its own). Goal: < 5 us.
2. Pipeline.process on Meta flows of 1, 16 and 64 KiB: a Banzai batch to /ajax/bz (telemetry: drop)
   and a GraphQL message send with typing metrics (functional: strip and re-encode). Also the whole
   addon hook for the same flows (Request built from the flow, the journal write, the local answer or
   the new body set on the flow). Goal: a 16 KiB Banzai batch under 1 ms.

Figures are the median of several rounds of per-call means; `min` shows the best round. Time is the
CPU time of the process (time.process_time_ns: the worker thread that decodes bodies over 64 KiB and
the journal thread included), so other load on a shared machine does not
inflate it; the wall-clock view is benchmarks/proxy_throughput.py.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook
from mitmproxy.test import taddons, tflow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _payloads import BANZAI_URL, GRAPHQL_URL, KIB, banzai_batch, graphql_send  # noqa: E402

from keyveil.addon import Keyveil, _flow_host  # noqa: E402
from keyveil.config import default_config_dir  # noqa: E402
from keyveil.pipeline import Pipeline, Request  # noqa: E402

NON_META = [
    ("www.example.org", "/"), ("cdn.jsdelivr.net", "/npm/react@18/umd/react.production.min.js"),
    ("fonts.gstatic.com", "/s/roboto/v30/KFOmCnqEu92Fr1Mu4mxK.woff2"), ("api.github.com", "/repos/a/b/issues?page=2"),
    ("en.wikipedia.org", "/wiki/Keystroke_dynamics"), ("static.example.co.uk", "/a/b/c/d/e.css"),
    ("notfacebook.com", "/ajax/bz"), ("facebook.com.evil.example", "/ajax/bz"), ("a.b.c.d.e.f.example.net", "/x"),
    ("10.0.0.7", "/health"),
]


class EmptyAsync:
    async def request(self, flow) -> None:
        pass


class EmptySync:
    def request(self, flow) -> None:
        pass


class EmptyBoth:
    """Both hooks keyveil has on a request, empty: requestheaders (sync) and request (async)."""

    def requestheaders(self, flow) -> None:
        pass

    async def request(self, flow) -> None:
        pass


def per_call_us(fn: Callable[[], int], rounds: int) -> tuple[float, float]:
    """fn runs a batch and returns how many calls it made. (median, min) microseconds per call."""
    samples = []
    for _ in range(rounds):
        t0 = time.process_time_ns()
        n = fn()
        samples.append((time.process_time_ns() - t0) / 1000 / n)
    return statistics.median(samples), min(samples)


def non_meta_flows(n: int) -> list:
    flows = []
    for i in range(n):
        host, path = NON_META[i % len(NON_META)]
        f = tflow.tflow()
        f.request.host = host
        f.request.headers["host"] = host
        f.request.path = path
        f.request.method = "GET" if i % 3 else "POST"
        f.request.scheme = "https"
        f.request.port = 443
        flows.append(f)
    return flows


def meta_flows(n: int, url: str, body: bytes, ctype: str) -> list:
    flows = []
    for _ in range(n):
        f = tflow.tflow()
        f.request.url = url
        f.request.method = "POST"
        f.request.headers["host"] = f.request.host
        f.request.headers["content-type"] = ctype
        f.request.headers["origin"] = "https://www.facebook.com"
        f.request.content = body
        flows.append(f)
    return flows


def bench_non_meta(tctx: taddons.context, kv: Keyveil, rounds: int, batch: int) -> None:
    loop = asyncio.get_event_loop()
    flows = non_meta_flows(batch)
    mgr = tctx.master.addons

    def dispatch(addon: object, headers_too: bool = False) -> Callable[[], int]:
        async def run() -> int:
            for f in flows:
                if headers_too:
                    await mgr.invoke_addon(addon, HttpRequestHeadersHook(f))
                await mgr.invoke_addon(addon, HttpRequestHook(f))
            return len(flows)

        return lambda: loop.run_until_complete(run())

    def direct() -> int:
        async def run() -> int:
            for f in flows:
                await kv.request(f)
            return len(flows)

        return loop.run_until_complete(run())

    pipeline = kv.pipeline
    assert pipeline is not None

    def lookup_only() -> int:  # what the hook does before it returns, as addon.py does it
        app_for = pipeline.catalog.app_for
        for f in flows:
            app_for(_flow_host(f.request))
        return len(flows)

    rows = [
        ("empty sync hook (mitmproxy dispatch floor)", dispatch(EmptySync())),
        ("empty async hook (dispatch + coroutine)", dispatch(EmptyAsync())),
        ("keyveil request hook via invoke_addon", dispatch(kv)),
        ("both hooks empty (requestheaders + request)", dispatch(EmptyBoth(), True)),
        ("keyveil requestheaders + request hooks", dispatch(kv, True)),
        ("keyveil request hook, awaited directly", direct),
        ("  of which the host and its catalog suffix lookup", lookup_only),
        ("  (Request.pretty_host alone, which it avoids)", lambda: [f.request.pretty_host for f in flows] and len(flows)),
    ]
    for f in flows:
        assert f.response is None and "keyveil" not in f.metadata  # truly left alone
    print(f"\n1. request hook on non-Meta flows ({len(NON_META)} hosts, {batch} real HTTPFlows per round)")
    print(f"   {'':52s} {'median us':>10s} {'min us':>8s}")
    res = {}
    for name, fn in rows:
        fn()  # warm up
        med, lo = per_call_us(fn, rounds)
        res[name] = med
        print(f"   {name:52s} {med:10.2f} {lo:8.2f}")
    floor = res["empty async hook (dispatch + coroutine)"]
    kvcost = res["keyveil request hook via invoke_addon"]
    both = res["keyveil requestheaders + request hooks"] - res["both hooks empty (requestheaders + request)"]
    print(f"   keyveil above an empty async hook: {kvcost - floor:.2f} us (goal < 5 us); "
          f"both of keyveil's hooks above two empty ones: {both:.2f} us")


def bench_meta(tctx: taddons.context, kv: Keyveil, rounds: int, quick: bool) -> None:
    loop = asyncio.get_event_loop()
    pipeline = kv.pipeline
    assert pipeline is not None
    print("\n2. Meta flows: Pipeline.process (decode + detect + decide [+ apply + encode]) and the whole addon hook")
    print(f"   {'flow':34s} {'bytes':>7s} {'outcome':>9s} {'process us':>11s} {'min':>8s} {'hook us':>9s} {'us/KiB':>7s}")
    for kib in (1, 16, 64):
        for label, make, url in (("Banzai /ajax/bz (drop)", banzai_batch, BANZAI_URL),
                                 ("GraphQL send (strip)", graphql_send, GRAPHQL_URL)):
            body, ctype = make(kib * KIB)
            headers = {"content-type": ctype, "origin": "https://www.facebook.com"}
            req = Request("POST", url, headers, body, time.time())
            outcome = pipeline.process(req)
            n = max(5, (200 if quick else 600) // kib)

            def proc(req: Request = req, n: int = n) -> int:
                for _ in range(n):
                    pipeline.process(req)
                return n

            med, lo = per_call_us(proc, rounds)
            flows = meta_flows(n * rounds + n, url, body, ctype)
            it = iter(flows)

            def hook(n: int = n, it=it) -> int:  # type: ignore[no-untyped-def]
                async def run() -> int:
                    for _ in range(n):
                        await kv.request(next(it))
                    return n

                return loop.run_until_complete(run())

            hook()  # warm up
            hmed, _ = per_call_us(hook, rounds)
            print(f"   {label + f' {kib} KiB':34s} {len(body):7d} {outcome.action:>9s} {med:11.1f} {lo:8.1f} "
                  f"{hmed:9.1f} {med / (len(body) / 1024):7.1f}")
    print("   goal: 16 KiB Banzai batch under 1000 us")


def profile(pipeline: Pipeline) -> None:
    for label, make, url in (("Banzai 16 KiB drop", banzai_batch, BANZAI_URL),
                             ("GraphQL 16 KiB strip", graphql_send, GRAPHQL_URL)):
        body, ctype = make(16 * KIB)
        req = Request("POST", url, {"content-type": ctype}, body, time.time())
        for _ in range(50):
            pipeline.process(req)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            pipeline.process(req)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(f"\n== cProfile: {label}, 500 calls, by own time ==")
        print("\n".join(out.getvalue().splitlines()[4:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.profile:
        profile(Pipeline.from_config_dir(default_config_dir()))
        return
    rounds = 5 if args.quick else 15
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.set_event_loop(asyncio.new_event_loop())
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.options.update(keyveil_log=str(Path(tmp) / "journal"))
            tctx.configure(kv)  # the full initial configure, as `mitmdump -s` sends it
            print(f"Python {sys.version.split()[0]}, catalog {len(kv.pipeline.catalog.endpoints)} endpoints, "
                  f"journal on (background thread)")
            bench_non_meta(tctx, kv, rounds, 2000 if args.quick else 10000)
            bench_meta(tctx, kv, rounds, args.quick)
            kv.done()


if __name__ == "__main__":
    main()
