"""Local servers and clients for end-to-end tests: everything on 127.0.0.1."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Seen:
    method: str
    path: str
    host: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A recording HTTP/1.1 server that answers 200 to everything."""

    seen: list[Seen] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Upstream:
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive; Nagle is disabled below

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                seen.append(Seen(self.command, self.path, self.headers.get("host", ""),
                                {k.lower(): v for k, v in self.headers.items()}, body))
                out = b"upstream-ok"
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclass
class Proxy:
    """`keyveil run` as a subprocess, routed to a local upstream by tests/support/route_addon.py."""

    port: int
    confdir: Path
    journal: Path
    proc: subprocess.Popen
    output: Path

    @property
    def cafile(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.output.read_text(errors="replace")


def start_proxy(tmp: Path, upstream: str, *extra: str, mode: str | None = None, config: Path | None = None,
                passthrough: tuple[str, ...] = (), confdir: Path | None = None) -> Proxy:
    """Start `keyveil run`; `confdir` is where the CA ends up (tmp/certs unless the passthrough moves it)."""
    port = free_port()
    journal, out = tmp / "journal", tmp / "proxy.log"
    confdir = confdir or tmp / "certs"
    cmd = [sys.executable, "-m", "keyveil.cli", "run", "--listen-port", str(port), "--log", str(journal),
           "--confdir", str(tmp / "certs"), *extra]
    if mode:
        cmd += ["--mode", mode]
    if config:
        cmd += ["--config", str(config)]
    cmd += ["--", "-s", str(REPO / "tests" / "support" / "route_addon.py"),
            "--set", "connection_strategy=lazy", *passthrough]
    env = {**os.environ, "KEYVEIL_TEST_UPSTREAM": upstream, "PYTHONUNBUFFERED": "1"}
    fh = out.open("wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_port(port)
        deadline = time.monotonic() + 20
        while not (confdir / "mitmproxy-ca-cert.pem").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("proxy did not start:\n" + out.read_text(errors="replace"))
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    return Proxy(port, confdir, journal, proc, out)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def request(proxy_port: int, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None,
            cafile: Path | None = None, context: ssl.SSLContext | None = None, timeout: float = 15) -> Reply:
    """One request through the proxy: CONNECT + TLS for https, absolute-form for http."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    hdrs = {"content-type": "application/x-www-form-urlencoded", **(headers or {})}
    if u.scheme == "https":
        ctx = context or ssl.create_default_context(cafile=str(cafile) if cafile else None)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", proxy_port, timeout=timeout, context=ctx)
        conn.set_tunnel(u.hostname or "", u.port or 443)
        target = u.path + ("?" + u.query if u.query else "")
    else:
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=timeout)
        target = url
    try:
        conn.request(method, target or "/", body=body if body or method != "GET" else None, headers=hdrs)
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def self_signed(tmp: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway certificate and key for a local TLS server (not the proxy's CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "upstream-cert.pem", tmp / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_upstream(tmp: Path) -> tuple[Upstream, Path]:
    """A recording HTTPS server on 127.0.0.1 with its own self-signed certificate."""
    up = Upstream().start()
    cert, key = self_signed(tmp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    assert up.server is not None
    up.server.socket = ctx.wrap_socket(up.server.socket, server_side=True)
    return up, cert
