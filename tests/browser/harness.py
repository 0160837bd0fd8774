"""Drives the browser test: a proxy subprocess, headless Chromium through it, and the scripted visit.

Used by tests/test_browser_e2e.py; runnable by hand for debugging:
    python tests/browser/harness.py            # plain mitmdump + route addon (no keyveil)
    python tests/browser/harness.py --keyveil  # through `keyveil run`
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

BROWSER_DIR = Path(__file__).resolve().parent
REPO_DIR = BROWSER_DIR.parent.parent
ROUTE_ADDON = BROWSER_DIR / "route_addon.py"
CHROMIUM = "/usr/bin/chromium"

MESSENGER_URL = "https://www.facebook.com/messages/t/100000000000100/"
SHOP_URL = "https://shop.keyveil.test/"
SENTENCE = "See you at 8, I will bring the cake!"

# What the proxy must never do in a test: connect anywhere by itself, or sniff upstream certificates.
OFFLINE_SETS = ["connection_strategy=lazy", "upstream_cert=false", "ssl_insecure=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spki_sha256_b64(cert_pem: bytes) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list wants: base64(sha256(SubjectPublicKeyInfo))."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    confdir: Path
    log_path: Path

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def proxy_command(kind: str, port: int, confdir: Path, fixture_port: int, journal: Path | None) -> list[str]:
    """`keyveil run` (the product) or plain mitmdump (the control), both with the route addon."""
    passthrough = ["-s", str(ROUTE_ADDON), "--set", f"kvtest_upstream=127.0.0.1:{fixture_port}"]
    for opt in OFFLINE_SETS:
        passthrough += ["--set", opt]
    if kind == "keyveil":
        assert journal is not None
        run = ["run", "--listen-port", str(port), "--confdir", str(confdir), "--log", str(journal)]
        run += ["--pac-port", "-1"]  # no PAC server: the browser is given the proxy directly
        return [sys.executable, "-m", "keyveil.cli", *run, "--", *passthrough]
    mitmdump = shutil.which("mitmdump") or str(Path(sys.executable).with_name("mitmdump"))
    return [
        mitmdump,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        *passthrough,
    ]


@contextmanager
def run_proxy(
    kind: str, workdir: Path, fixture_port: int, journal: Path | None = None, timeout: float = 30.0
) -> Iterator[Proxy]:
    """Start the proxy, wait until it listens and its CA exists; stop it with SIGINT (journal flush)."""
    port = free_port()
    confdir = workdir / f"{kind}-confdir"
    confdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}.log"
    cmd = proxy_command(kind, port, confdir, fixture_port, journal)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    proxy = Proxy(proc, port, confdir, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode}:\n{proxy.output()}")
            if proxy.ca_cert.exists() and _listening(port):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} not ready after {timeout}s:\n{proxy.output()}")
            time.sleep(0.1)
        yield proxy
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def chromium_args(proxy_port: int, spki: str) -> list[str]:
    """`spki`: comma-separated pins; keyveil's CA, and the fixture's own certificate for the hosts that
    keyveil does not intercept (the shop: its TLS is tunnelled to the fixture untouched)."""
    return [
        "--no-sandbox",
        "--headless",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=HttpsUpgrades,MediaRouter,OptimizationHints",
        f"--proxy-server=127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>",
        f"--ignore-certificate-errors-spki-list={spki}",
    ]


@dataclass
class Visit:
    """What the pages said they sent, read from their own counters."""

    messenger: dict[str, int] = field(default_factory=dict)  # at the moment the page was left
    message_state: str = ""
    message_id: str = ""
    shop: dict[str, int] = field(default_factory=dict)
    screenshots: list[Path] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def expected(self, category: str) -> int:
        """Events of `category` the Messenger page emitted: sent by fetch (answered 200) + left for the beacon."""
        m = self.messenger
        return m[f"{category}Sent"] + m[f"pending{category.capitalize()}"]


def type_like_a_person(page: Any, text: str, seed: int = 8) -> None:
    """Type with varied hold and gap times: keyboard.type()'s fixed delay is a metronome, which keyveil's
    shape detector rightly does not take for a person. Seeded: the same rhythm every run."""
    rng = random.Random(seed)
    for ch in text:
        page.keyboard.down(ch)
        page.wait_for_timeout(rng.randint(45, 95))  # hold (dwell)
        page.keyboard.up(ch)
        page.wait_for_timeout(rng.randint(25, 120))  # until the next key


def _dataset(page: Any, selector: str) -> dict[str, Any]:
    raw: dict[str, str] = page.eval_on_selector(selector, "el => Object.assign({}, el.dataset)")
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in raw.items()}


def visit(proxy_port: int, spki: str, artifacts: Path | None, tag: str, profile: Path) -> Visit:
    """Type, click, scroll and send on the Messenger fixture, leave it (beacon), then click on the shop."""
    from playwright.sync_api import sync_playwright

    out = Visit()
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=chromium_args(proxy_port, spki),
            viewport={"width": 1100, "height": 640},
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(15_000)
            page.on("console", lambda m: out.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: out.console.append(f"pageerror: {e}"))
            page.goto(MESSENGER_URL)
            page.wait_for_selector("#kv-status[data-ready='1']")

            # typing: real key events (CDP Input.dispatchKeyEvent), one keydown + keyup per character
            page.click("#message")
            type_like_a_person(page, SENTENCE)
            # pointer moves and scrolling over the thread
            box = page.locator("#feed").bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + 20, box["y"] + 20)
            page.mouse.move(box["x"] + box["width"] - 40, box["y"] + box["height"] - 30, steps=12)
            for _ in range(3):
                page.mouse.wheel(0, 240)
                page.wait_for_timeout(120)
            page.click("[data-reaction='like']")
            page.click("[data-reaction='love']")
            page.click("#send")
            page.wait_for_selector("#message-status:not([data-state='sending']):not([data-state='idle'])")
            # let the vital queue flush (every second) and every send finish
            page.wait_for_function(
                "() => { const d = document.getElementById('kv-status').dataset;"
                " return d.pendingKeystroke === '0' && d.pendingClick === '0' && d.inflight === '0'; }"
            )
            # a last gesture that the page can only report by beacon when it is left
            page.mouse.move(box["x"] + 60, box["y"] + 40, steps=6)
            page.wait_for_function("() => document.getElementById('kv-status').dataset.inflight === '0'")
            out.messenger = _dataset(page, "#kv-status")
            status = _dataset(page, "#message-status")
            out.message_state = str(status.get("state", ""))
            out.message_id = str(status.get("messageId", ""))
            if artifacts:
                shot = artifacts / f"{tag}-messenger.png"
                page.screenshot(path=str(shot), full_page=True)
                out.screenshots.append(shot)

            # leaving the page fires pagehide: what is still queued goes by navigator.sendBeacon
            page.goto(SHOP_URL)
            page.wait_for_selector("#pixel-status[data-ready='1']")
            page.wait_for_function("() => document.getElementById('pixel-status').dataset.pending === '0'")
            page.click("#subscribe")
            page.wait_for_function(
                "() => { const d = document.getElementById('pixel-status').dataset;"
                " return d.hits === '2' && d.pending === '0'; }"
            )
            out.shop = _dataset(page, "#pixel-status")
            if artifacts:
                shot = artifacts / f"{tag}-shop.png"
                page.screenshot(path=str(shot))
                out.screenshots.append(shot)
        finally:
            ctx.close()
    return out


def screenshot_file(html: Path, png: Path, profile: Path) -> None:
    """Open a local file (the HTML report) in Chromium, no proxy, and save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=<-loopback>",
            ],
            viewport={"width": 1100, "height": 800},
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(html.resolve().as_uri())
            page.wait_for_load_state("load")
            page.screenshot(path=str(png), full_page=True)
        finally:
            ctx.close()


def main() -> int:  # manual run: prints what the page sent and what arrived
    sys.path.insert(0, str(BROWSER_DIR))
    from fixture_server import FixtureServer, analyze

    kind = "keyveil" if "--keyveil" in sys.argv else "mitmdump"
    artifacts = REPO_DIR / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kv-browser-") as tmp, FixtureServer() as fx:
        work = Path(tmp)
        journal = work / "journal.kvj"
        with run_proxy(kind, work, fx.port, journal) as proxy:
            spki = spki_sha256_b64(proxy.ca_cert.read_bytes()) + "," + spki_sha256_b64(fx.shop_cert_pem)
            t = time.monotonic()
            v = visit(proxy.port, spki, artifacts, f"manual-{kind}", work / "profile")
            fx.wait_for(lambda a: any(x.path == "/ajax/bz" and b"beacon" in x.body for x in a), 3.0)
            print(f"visit took {time.monotonic() - t:.1f}s")
        print("page:", v.messenger, v.message_state, v.message_id)
        print("shop:", v.shop)
        print("console:", v.console)
        print("arrived:", analyze(fx.snapshot()))
        print("proxy log tail:\n", proxy.output()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
