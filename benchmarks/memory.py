"""Does keyveil's memory stay flat over many flows? Prints the resident-set curve (VmRSS).

    python benchmarks/memory.py                      # 100,000 flows in-process through the addon
    python benchmarks/memory.py --flows 20000        # fewer
    python benchmarks/memory.py --proxy 20000        # through a real `keyveil run` subprocess

In-process (the default): 100,000 real mitmproxy HTTPFlow objects (mitmproxy.test.tflow) go through the
addon's request hook the way mitmproxy dispatches it (AddonManager.invoke_addon), with the journal on
(a temporary folder, background writer thread), then are dropped, as mitmdump drops finished flows.
`--proxy N` measures the real `keyveil run` process instead: VmRSS read from /proc/PID/status between
chunks of 2,000 requests of the proxy_throughput.py workload. At ~300-400 requests/s on 2 cores,
`--proxy 100000` takes about 5 minutes, which is why it is not the default.

Mix, as in proxy_throughput.py: 80% non-Meta, 10% 16 KiB Banzai batches (dropped), 10% 4 KiB GraphQL
sends (stripped). Growth is reported from the sample after the first 10% (warm: imports, caches,
certificates) to the end, in total and per 1,000 flows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _payloads import BANZAI_URL, GRAPHQL_URL, KIB, banzai_batch, graphql_send  # noqa: E402


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def report(samples: list[tuple[int, int]], what: str) -> None:
    print(f"\n{what}: VmRSS over flows")
    peak = max(r for _, r in samples)
    for n, r in samples:
        bar = "#" * max(1, int(60 * r / peak))
        print(f"  {n:8d} flows {r / 1024:8.1f} MiB {bar}")
    warm = next(((n, r) for n, r in samples if n >= samples[-1][0] * 0.1), samples[0])
    n_end, r_end = samples[-1]
    grow = r_end - warm[1]
    per_k = grow / max(1, (n_end - warm[0]) / 1000)
    print(f"  peak {peak / 1024:.1f} MiB; from {warm[0]} to {n_end} flows: {grow / 1024:+.1f} MiB "
          f"({per_k:+.1f} KiB per 1,000 flows)")


def in_process(flows: int, every: int) -> None:
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import taddons, tflow

    from keyveil.addon import Keyveil

    rng = random.Random(1)
    banzai = [banzai_batch(16 * KIB, seed=s) for s in range(8)]
    gql = [graphql_send(4 * KIB, seed=s) for s in range(8)]
    hosts = ["www.example.org", "cdn.example.net", "static.example.co.uk", "api.example.com"]

    def make(i: int):
        f = tflow.tflow()
        r = rng.random()
        if r < 0.10:
            body, ct = rng.choice(banzai)
            f.request.url = BANZAI_URL + f"&__req={i}"
        elif r < 0.20:
            body, ct = rng.choice(gql)
            f.request.url = GRAPHQL_URL
        else:
            body, ct = b"", ""
            f.request.url = f"https://{rng.choice(hosts)}/page/{i}?q={rng.random()}"
            f.request.method = "GET"
        if body:
            f.request.method = "POST"
            f.request.headers["content-type"] = ct
            f.request.content = body
        f.request.headers["host"] = f.request.host
        return f

    with tempfile.TemporaryDirectory() as tmp:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.options.update(keyveil_log=str(Path(tmp) / "journal"))
            tctx.configure(kv)
            mgr = tctx.master.addons

            async def run() -> list[tuple[int, int]]:
                samples = [(0, rss_kib())]
                for i in range(1, flows + 1):
                    f = make(i)
                    await mgr.invoke_addon(kv, HttpRequestHook(f))
                    if i % every == 0:
                        gc.collect()
                        samples.append((i, rss_kib()))
                return samples

            t0 = time.perf_counter()
            samples = loop.run_until_complete(run())
            secs = time.perf_counter() - t0
            counts = dict(kv.counts)
            kv.done()
    print(f"{flows} flows in {secs:.0f} s; keyveil counts {counts}")
    report(samples, "in-process, real HTTPFlows through the addon")


def through_proxy(flows: int, chunk: int) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from proxy_throughput import drive, upstream_conn, workload

    from support.servers import start_proxy

    async def run() -> None:
        server = await asyncio.start_server(upstream_conn, "127.0.0.1", 0)
        up = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        jobs = workload(chunk, 7)
        with tempfile.TemporaryDirectory() as t:
            proxy = await asyncio.to_thread(start_proxy, Path(t), up, "--intercept-all",
                                            passthrough=("--set", "flow_detail=0"))
            pid = proxy.proc.pid
            samples = [(0, rss_kib(pid))]
            done = errors = 0
            t0 = time.perf_counter()
            try:
                while done < flows:
                    res = await drive(proxy.port, proxy.cafile, jobs, done)
                    done += res.count
                    errors += res.errors
                    samples.append((done, rss_kib(pid)))
                    print(f"  {done} flows, {res.count / res.elapsed:.0f} req/s, VmRSS {samples[-1][1] / 1024:.1f} MiB",
                          flush=True)
            finally:
                proxy.stop()
                await asyncio.sleep(0.3)
                server.close()
        print(f"{done} flows ({errors} errors) in {time.perf_counter() - t0:.0f} s")
        report(samples, "keyveil run process (/proc/PID/status)")

    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--proxy", type=int, metavar="N", help="through a real keyveil run, N flows")
    args = ap.parse_args()
    if args.proxy:
        through_proxy(args.proxy, chunk=2000)
    else:
        in_process(args.flows, every=max(1, args.flows // 20))


if __name__ == "__main__":
    main()
