"""The PAC file routes Meta's hosts to keyveil and everything else DIRECT, evaluated by a real JS engine."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import threading

import pytest

from keyveil import cli
from keyveil.catalog import load_catalog, parse_catalog
from keyveil.config import REPO_DIR
from keyveil.pac import PAC_CONTENT_TYPE, catalog_pac_source, pac_script, serve_pac

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")

# The PAC helper functions browsers provide (Mozilla's ascii_pac_utils.js semantics), run in a bare
# vm context: a PAC that used anything else (or resolved DNS) would throw here.
HARNESS = r"""
const vm = require("vm");
const fs = require("fs");
const input = JSON.parse(fs.readFileSync(0, "utf8"));
const dnsCalls = [];
const sandbox = {
  dnsDomainIs: (host, domain) =>
    host.length >= domain.length && host.substring(host.length - domain.length) === domain,
  shExpMatch: (str, shexp) => {
    const re = "^" + shexp.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$";
    return new RegExp(re).test(str);
  },
  isPlainHostName: (host) => host.indexOf(".") < 0,
  localHostOrDomainIs: (host, hostdom) =>
    host === hostdom || hostdom.lastIndexOf(host + ".", 0) === 0,
  dnsDomainLevels: (host) => host.split(".").length - 1,
  dnsResolve: (host) => { dnsCalls.push(host); return null; },
  isResolvable: (host) => { dnsCalls.push(host); return false; },
  isInNet: (host) => { dnsCalls.push(host); return false; },
  myIpAddress: () => "127.0.0.1",
};
vm.createContext(sandbox);
vm.runInContext(input.pac, sandbox, { filename: "proxy.pac" });
const out = {};
for (const host of input.hosts) {
  const scheme = host.startsWith("edge-chat.") ? "wss" : "https";
  out[host] = sandbox.FindProxyForURL(scheme + "://" + host + "/some/path?q=1", host);
}
process.stdout.write(JSON.stringify({ results: out, dns: dnsCalls }));
"""

PROXIED = ["www.facebook.com", "graph.instagram.com", "edge-chat.facebook.com", "pixel.facebook.com"]
DIRECT = ["example.org", "notfacebook.com", "facebook.com.evil.org"]


def evaluate(pac: str, hosts: list[str]) -> dict[str, str]:
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "-e", HARNESS],
        input=json.dumps({"pac": pac, "hosts": hosts}),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dns"] == [], "the PAC must never resolve names"
    return out["results"]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(REPO_DIR / "config" / "endpoints.toml")


@needs_node
@pytest.mark.timeout(30)
def test_meta_hosts_go_to_proxy_everything_else_direct(catalog) -> None:
    pac = pac_script(catalog, "127.0.0.1", 8080)
    results = evaluate(pac, PROXIED + DIRECT)
    for host in PROXIED:
        assert results[host] == "PROXY 127.0.0.1:8080", host
    for host in DIRECT:
        assert results[host] == "DIRECT", host


@needs_node
@pytest.mark.timeout(30)
def test_every_catalog_suffix_and_its_subdomains_are_proxied(catalog) -> None:
    suffixes = catalog.host_suffixes()
    hosts = [*suffixes, *(f"a.b.{s}" for s in suffixes), *(f"x{s}" for s in suffixes)]
    hosts += ["WWW.FACEBOOK.COM", "www.facebook.com.", "keyveil", "mitm.it", "localhost", "127.0.0.1"]
    results = evaluate(pac_script(catalog, "10.1.2.3", 3128), hosts)
    for s in suffixes:
        assert results[s] == "PROXY 10.1.2.3:3128"
        assert results[f"a.b.{s}"] == "PROXY 10.1.2.3:3128"
        assert results[f"x{s}"] == "DIRECT"  # a longer label is not a subdomain
    assert results["WWW.FACEBOOK.COM"] == results["www.facebook.com."] == "PROXY 10.1.2.3:3128"
    # keyveil's own page and the CA download must reach the proxy too
    assert results["keyveil"] == results["mitm.it"] == "PROXY 10.1.2.3:3128"
    assert results["localhost"] == results["127.0.0.1"] == "DIRECT"


@needs_node
@pytest.mark.timeout(30)
def test_catalog_change_changes_routing_and_fallback_option() -> None:
    toml = """
[apps]
"example.net" = "demo"
"""
    pac = pac_script(parse_catalog(toml), "::1", 8080, fallback_direct=True)
    results = evaluate(pac, ["cdn.example.net", "www.facebook.com"])
    assert results["cdn.example.net"] == "PROXY [::1]:8080; DIRECT"
    assert results["www.facebook.com"] == "DIRECT"  # not in this catalog


def test_rejects_bad_proxy_arguments(catalog) -> None:
    with pytest.raises(ValueError):
        pac_script(catalog, "127.0.0.1", 0)
    with pytest.raises(ValueError):
        pac_script(catalog, '127.0.0.1"; alert(1); "', 8080)


@pytest.mark.timeout(30)
def test_served_pac_follows_catalog_edits_and_survives_a_broken_one(tmp_path) -> None:
    toml = tmp_path / "endpoints.toml"
    toml.write_text('[apps]\n"facebook.com" = "facebook"\n')
    with serve_pac("127.0.0.1", 0, catalog_pac_source(toml, "0.0.0.0", 8080)) as server:
        first = _get("127.0.0.1", server.port, "/proxy.pac").body  # type: ignore[attr-defined]
        assert b'"facebook.com"' in first and b"threads.net" not in first
        assert b"PROXY 127.0.0.1:8080" in first  # wildcard listen address: local browsers use loopback
        toml.write_text('[apps]\n"facebook.com" = "facebook"\n"threads.net" = "threads"\n')
        os.utime(toml, ns=(1, 10**18))  # a distinct mtime even on coarse file systems
        second = _get("127.0.0.1", server.port, "/proxy.pac").body  # type: ignore[attr-defined]
        assert b'"threads.net"' in second
        toml.write_text("[apps\n")
        os.utime(toml, ns=(1, 2 * 10**18))
        third = _get("127.0.0.1", server.port, "/proxy.pac")
        assert third.status == 200 and third.body == second  # type: ignore[attr-defined]


def _get(url_host: str, port: int, path: str, method: str = "GET") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(url_host, port, timeout=5)
    conn.request(method, path)
    resp = conn.getresponse()
    resp.body = resp.read()  # type: ignore[attr-defined]
    conn.close()
    return resp


@pytest.mark.timeout(30)
def test_server_serves_current_text_per_request() -> None:
    version = {"n": 0}

    def get_text() -> str:
        version["n"] += 1
        return f"function FindProxyForURL(u, h) {{ return 'DIRECT'; }} // v{version['n']}\n"

    server = serve_pac("127.0.0.1", 0, get_text)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/proxy.pac"
        r1 = _get("127.0.0.1", server.port, "/proxy.pac")
        r2 = _get("127.0.0.1", server.port, "/wpad.dat?x=1")
        assert r1.status == r2.status == 200
        assert r1.getheader("Content-Type") == PAC_CONTENT_TYPE
        assert r1.body.endswith(b"// v1\n") and r2.body.endswith(b"// v2\n")  # type: ignore[attr-defined]
        assert int(r1.getheader("Content-Length")) == len(r1.body)  # type: ignore[attr-defined]
        head = _get("127.0.0.1", server.port, "/proxy.pac", "HEAD")
        assert head.status == 200 and head.body == b""  # type: ignore[attr-defined]
        assert _get("127.0.0.1", server.port, "/etc/passwd").status == 404
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


@pytest.mark.timeout(30)
def test_server_keeps_alive_and_survives_a_failing_builder() -> None:
    calls = {"n": 0}

    def get_text() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("catalog is being rewritten")
        return "function FindProxyForURL(u, h) { return 'DIRECT'; }\n"

    with serve_pac("127.0.0.1", 0, get_text) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        results = []
        for _ in range(3):  # one keep-alive connection, three requests
            conn.request("GET", "/proxy.pac")
            resp = conn.getresponse()
            results.append((resp.status, resp.read()))
        conn.close()
    assert [s for s, _ in results] == [500, 200, 200]
    assert results[1][1].startswith(b"function FindProxyForURL")


@needs_node
@pytest.mark.timeout(30)
def test_served_pac_of_real_catalog_evaluates(catalog) -> None:
    lock = threading.Lock()

    def get_text() -> str:
        with lock:
            return pac_script(catalog, "127.0.0.1", 8080)

    with serve_pac("127.0.0.1", 0, get_text) as server:
        body = _get("127.0.0.1", server.port, "/proxy.pac").body  # type: ignore[attr-defined]
    results = evaluate(body.decode(), PROXIED + DIRECT)
    assert [results[h] for h in PROXIED] == ["PROXY 127.0.0.1:8080"] * len(PROXIED)
    assert [results[h] for h in DIRECT] == ["DIRECT"] * len(DIRECT)


@needs_node
@pytest.mark.timeout(30)
def test_cli_writes_pac_file(tmp_path, capsys) -> None:
    (tmp_path / "endpoints.toml").write_text('[apps]\n"facebook.com" = "facebook"\n')
    out = tmp_path / "proxy.pac"
    rc = cli.main(["pac", "--config", str(tmp_path), "--proxy-port", "9999", "-o", str(out)])
    assert rc == 0
    results = evaluate(out.read_text(), ["m.facebook.com", "instagram.com"])
    assert results == {"m.facebook.com": "PROXY 127.0.0.1:9999", "instagram.com": "DIRECT"}

    assert cli.main(["pac", "--config", str(tmp_path)]) == 0
    assert "PROXY 127.0.0.1:8080" in capsys.readouterr().out

    (tmp_path / "endpoints.toml").write_text("[apps\n")
    assert cli.main(["pac", "--config", str(tmp_path)]) == 1
    assert "endpoints.toml" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Recorder:
    """A local HTTP server that answers every request with its tag and remembers what it saw."""

    def __init__(self, tag: str, seen: list[tuple[str, str, str]]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((tag, self.path, self.headers.get("Host", "")))
                body = f"<html><body>{tag}</body></html>".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
@pytest.mark.timeout(90)
def test_chromium_follows_the_served_pac(catalog, tmp_path) -> None:
    """Real Chromium with --proxy-pac-url: Meta hosts reach the (stand-in) proxy, others go direct.
    Every name resolves to 127.0.0.1 or nowhere: nothing leaves the machine."""
    seen: list[tuple[str, str, str]] = []
    proxy, direct = _Recorder("proxied", seen), _Recorder("direct", seen)
    pac = serve_pac("127.0.0.1", 0, lambda: pac_script(catalog, "127.0.0.1", proxy.port))
    try:
        pages = {}
        for url in ("http://www.facebook.com/x", "http://example.org/y", "http://keyveil/"):
            proc = subprocess.run(
                [
                    str(CHROMIUM),
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}",
                    f"--proxy-pac-url={pac.url}",
                    f"--host-resolver-rules=MAP example.org 127.0.0.1:{direct.port}, MAP * ~NOTFOUND, "
                    "EXCLUDE 127.0.0.1",
                    "--dump-dom",
                    url,
                ],  # fmt: skip
                capture_output=True,
                text=True,
                timeout=60,
            )
            pages[url] = proc.stdout
    finally:
        pac.close()
        proxy.close()
        direct.close()
    assert "<body>proxied</body>" in pages["http://www.facebook.com/x"]
    assert "<body>direct</body>" in pages["http://example.org/y"]
    assert "<body>proxied</body>" in pages["http://keyveil/"]
    # a proxy gets the absolute URL; the direct server only the path
    assert ("proxied", "http://www.facebook.com/x", "www.facebook.com") in seen
    assert ("direct", "/y", "example.org") in seen
    assert not [s for s in seen if s[0] == "direct" and "facebook" in s[2]]
