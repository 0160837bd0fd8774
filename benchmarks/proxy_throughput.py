"""Plain mitmdump and `keyveil run`, side by side, on the same mixed workload. Loopback only.

    python benchmarks/proxy_throughput.py               # 4 rounds x 2000 requests per proxy
    python benchmarks/proxy_throughput.py --requests 500 --rounds 1

Both proxies run as subprocesses with the same route addon (tests/support/route_addon.py sends every
request to a local upstream on 127.0.0.1) and the same options (connection_strategy=lazy,
flow_detail=0). keyveil runs with --intercept-all, so it intercepts non-Meta HTTPS like mitmdump does
and its request hook sees every flow; by default it would only tunnel non-Meta TLS, which costs less.

The workload (seeded, identical for both): 80% non-Meta (www.example.org, HTTPS and plain HTTP GETs),
10% telemetry (16 KiB Banzai batches POSTed to www.facebook.com/ajax/bz; keyveil answers them itself,
mitmdump forwards them), 10% functional Meta (4 KiB GraphQL sends with typing metrics; keyveil strips
and forwards). 8 concurrent clients on keep-alive connections; 10% of requests open a new connection
(CONNECT + TLS handshake for HTTPS). Client and upstream share one asyncio loop in this process; the
proxy gets its own process. Rounds alternate between the two proxies so drift hits both alike.
Besides requests/s (wall clock, sensitive to anything else running on the machine) it prints the CPU
time each proxy process spent per request (/proc/PID/stat), which other load disturbs much less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from _payloads import KIB, banzai_batch, graphql_send  # noqa: E402

from support.servers import free_port, start_proxy, wait_port  # noqa: E402

ROUTE = REPO / "tests" / "support" / "route_addon.py"
COMMON = ("--set", "connection_strategy=lazy", "--set", "flow_detail=0")
CLIENTS = 8
NEW_CONN = 0.10


# -- upstream ----------------------------------------------------------------------------------


async def upstream_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    n = int(line[15:])
            if n:
                await reader.readexactly(n)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nupstream-ok")
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass  # the proxy went away (or the benchmark ends)
    finally:
        writer.close()


# -- client ------------------------------------------------------------------------------------


@dataclass
class Job:
    method: str
    scheme: str
    host: str
    path: str
    body: bytes = b""
    ctype: str = ""
    kind: str = "other"


def workload(n: int, seed: int, telemetry: float = 0.10, functional: float = 0.10) -> list[Job]:
    rng = random.Random(seed)
    banzai = [banzai_batch(16 * KIB, seed=s) for s in range(4)]
    gql = [graphql_send(4 * KIB, seed=s) for s in range(4)]
    jobs = []
    for i in range(n):
        r = rng.random()
        if r < telemetry:
            body, ct = rng.choice(banzai)
            jobs.append(Job("POST", "https", "www.facebook.com", "/ajax/bz?__a=1&__req=" + str(i), body, ct, "telemetry"))
        elif r < telemetry + functional:
            body, ct = rng.choice(gql)
            jobs.append(Job("POST", "https", "www.facebook.com", "/api/graphql/", body, ct, "functional"))
        else:
            scheme = "https" if rng.random() < 0.75 else "http"
            jobs.append(Job("GET", scheme, "www.example.org", f"/page/{i % 97}?q={i}", kind="non-meta"))
    return jobs


@dataclass
class Result:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    count: int = 0
    cpu: float = 0.0  # CPU seconds the proxy process spent on the round


class Client:
    def __init__(self, port: int, ctx: ssl.SSLContext, rng: random.Random) -> None:
        self.port = port
        self.ctx = ctx
        self.rng = rng
        self.conns: dict[tuple[str, str], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def _open(self, scheme: str, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        if scheme == "https":
            writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200" not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head[:80])
            await writer.start_tls(self.ctx, server_hostname=host)
        return reader, writer

    async def run(self, job: Job) -> None:
        key = (job.scheme, job.host)
        conn = self.conns.get(key)
        if conn is not None and self.rng.random() < NEW_CONN:
            conn[1].close()
            conn = None
        if conn is None:
            conn = self.conns[key] = await self._open(job.scheme, job.host)
        reader, writer = conn
        target = job.path if job.scheme == "https" else f"http://{job.host}{job.path}"
        head = f"{job.method} {target} HTTP/1.1\r\nhost: {job.host}\r\n"
        if job.body:
            head += f"content-type: {job.ctype}\r\ncontent-length: {len(job.body)}\r\norigin: https://www.facebook.com\r\n"
        writer.write(head.encode() + b"\r\n" + job.body)
        resp = await reader.readuntil(b"\r\n\r\n")
        if not resp.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(resp[:80])
        n = 0
        for line in resp.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                n = int(line[15:])
        if n:
            await reader.readexactly(n)

    def close(self) -> None:
        for _, w in self.conns.values():
            w.close()


async def drive(port: int, cafile: Path, jobs: list[Job], seed: int) -> Result:
    ctx = ssl.create_default_context(cafile=str(cafile))
    res = Result()
    queue = iter(jobs)

    async def worker(i: int) -> None:
        client = Client(port, ctx, random.Random(seed * 100 + i))
        for job in queue:
            t0 = time.perf_counter()
            try:
                await client.run(job)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
                res.errors += 1
                client.conns.pop((job.scheme, job.host), None)
                continue
            res.latencies.setdefault(job.kind, []).append(time.perf_counter() - t0)
            res.count += 1
        client.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CLIENTS)))
    res.elapsed = time.perf_counter() - t0
    return res


# -- proxies -----------------------------------------------------------------------------------


class Mitmdump:
    def __init__(self, tmp: Path, upstream: str, confdir: Path) -> None:
        self.port = free_port()
        self.cafile = confdir / "mitmproxy-ca-cert.pem"
        cmd = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
               "--listen-host", "127.0.0.1", "--listen-port", str(self.port), "--set", f"confdir={confdir}",
               "-s", str(ROUTE), *COMMON]
        env = {**os.environ, "KEYVEIL_TEST_UPSTREAM": upstream}
        self.log = (tmp / "mitmdump.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))]


async def main_async(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(upstream_conn, "127.0.0.1", 0)
    up = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    jobs = workload(args.requests, args.seed, args.telemetry, args.functional)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        kv_dir = tmp / "keyveil"
        kv_dir.mkdir()
        # keyveil first: it creates the CA that mitmdump then shares (same certificates for both)
        extra = ("--intercept-all", "--log", "") if args.no_journal else ("--intercept-all",)
        kv = await asyncio.to_thread(start_proxy, kv_dir, up, *extra, passthrough=COMMON[2:])
        md = await asyncio.to_thread(Mitmdump, tmp, up, kv.confdir)
        proxies = {"mitmdump": (md.port, md.cafile), "keyveil": (kv.port, kv.cafile)}
        pids = {"mitmdump": md.proc.pid, "keyveil": kv.proc.pid}
        results: dict[str, list[Result]] = {"mitmdump": [], "keyveil": []}
        try:
            for port, cafile in proxies.values():  # warm-up: imports, certificates, first flows
                await drive(port, cafile, jobs[:200], args.seed)
            for r in range(args.rounds):
                order = ("mitmdump", "keyveil") if r % 2 == 0 else ("keyveil", "mitmdump")
                for name in order:
                    port, cafile = proxies[name]
                    cpu0 = cpu_seconds(pids[name])
                    res = await drive(port, cafile, jobs, args.seed + r)
                    res.cpu = cpu_seconds(pids[name]) - cpu0
                    results[name].append(res)
                    print(f"  round {r + 1} {name:9s} {res.count / res.elapsed:7.0f} req/s, proxy CPU "
                          f"{res.cpu / res.count * 1e6:6.0f} us/request ({res.count} ok, {res.errors} errors, "
                          f"{res.elapsed:.1f} s)", flush=True)
        finally:
            md.stop()
            kv_log = kv.stop()
            await asyncio.sleep(0.3)  # let the upstream see the proxies' connections close
            server.close()
    if "Traceback" in kv_log:
        print("keyveil log has a traceback:\n" + kv_log[-2000:])
    print(f"\n{args.requests} requests x {args.rounds} rounds per proxy, {CLIENTS} clients, "
          f"{int(NEW_CONN * 100)}% new connections, {args.telemetry:.0%} telemetry, {args.functional:.0%} functional"
          f"{', keyveil journal off' if args.no_journal else ''}")
    print(f"{'':10s} {'req/s':>7s} {'CPU us/req':>10s} {'median ms':>10s} {'p99 ms':>8s}   {'non-Meta med':>12s} "
          f"{'telemetry med':>13s} {'functional med':>14s}")
    rps = {}
    cpu = {}
    for name, runs in results.items():
        rps[name] = statistics.median(r.count / r.elapsed for r in runs)
        cpu[name] = statistics.median(r.cpu / r.count * 1e6 for r in runs)
        lat = {k: [x * 1000 for r in runs for x in r.latencies.get(k, [])] for k in ("non-meta", "telemetry", "functional")}
        every = [x for v in lat.values() for x in v]
        print(f"{name:10s} {rps[name]:7.0f} {cpu[name]:10.0f} {statistics.median(every):10.2f} {pct(every, 0.99):8.2f}   "
              f"{med(lat['non-meta']):12.2f} {med(lat['telemetry']):13.2f} {med(lat['functional']):14.2f}")
    print(f"keyveil / mitmdump throughput: {rps['keyveil'] / rps['mitmdump'] * 100:.1f}% (goal >= 95%)")
    print(f"mitmdump / keyveil proxy CPU per request (capacity when the proxy is the bottleneck): "
          f"{cpu['mitmdump'] / cpu['keyveil'] * 100:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--telemetry", type=float, default=0.10, help="share of Banzai batches (default 0.10)")
    ap.add_argument("--functional", type=float, default=0.10, help="share of GraphQL sends (default 0.10)")
    ap.add_argument("--no-journal", action="store_true", help="run keyveil with its journal off")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
