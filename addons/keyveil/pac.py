"""Proxy auto-config (PAC): send only Meta's hosts to keyveil, everything else direct.

`pac_script` renders the PAC from the catalog; `serve_pac` serves it over HTTP from a daemon thread,
calling `get_text()` on every request so a catalog reload shows up without restarting anything.
Pure stdlib: no mitmproxy.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from keyveil.catalog import Catalog, ConfigError, load_catalog

logger = logging.getLogger(__name__)

PAC_CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
PAC_PATHS = ("/proxy.pac", "/wpad.dat")
# Hosts that are not Meta's but must reach keyveil: its own status page and mitmproxy's CA download.
EXTRA_HOSTS = ("keyveil", "mitm.it")

_TEMPLATE = """\
// keyveil proxy auto-config, generated from {source}.
// Meta's hosts (and their subdomains) go through keyveil at {proxy}; everything else goes DIRECT.
var KEYVEIL_PROXY = {proxy_js};
var KEYVEIL_SUFFIXES = {suffixes_js};

function FindProxyForURL(url, host) {{
  host = host.toLowerCase();
  if (host.charAt(host.length - 1) == ".") {{
    host = host.substring(0, host.length - 1);
  }}
  for (var i = 0; i < KEYVEIL_SUFFIXES.length; i++) {{
    var s = KEYVEIL_SUFFIXES[i];
    // exact host, or a subdomain: ".facebook.com" so that "notfacebook.com" does not match
    if (host == s || dnsDomainIs(host, "." + s)) {{
      return KEYVEIL_PROXY;
    }}
  }}
  return "DIRECT";
}}
"""


def pac_script(
    catalog: Catalog,
    proxy_host: str,
    proxy_port: int,
    *,
    extra_hosts: Iterable[str] = EXTRA_HOSTS,
    fallback_direct: bool = False,
) -> str:
    """The PAC text for `catalog`.

    By default a Meta host gets only `PROXY host:port`: when keyveil is down, Meta's sites fail
    instead of silently sending telemetry unfiltered. `fallback_direct=True` appends `; DIRECT`.
    """
    if not 0 < proxy_port < 65536:
        raise ValueError(f"proxy port out of range: {proxy_port}")
    if not proxy_host or any(c in proxy_host for c in " ;\"'\\\n"):
        raise ValueError(f"invalid proxy host: {proxy_host!r}")
    host = f"[{proxy_host}]" if ":" in proxy_host and not proxy_host.startswith("[") else proxy_host
    proxy = f"PROXY {host}:{proxy_port}"
    if fallback_direct:
        proxy += "; DIRECT"
    suffixes = sorted(
        {s.lower().strip(".") for s in [*catalog.host_suffixes(), *extra_hosts] if s.strip(".")}
    )
    return _TEMPLATE.format(
        source=catalog.source.replace("\n", " "),
        proxy=proxy,
        proxy_js=json.dumps(proxy),
        suffixes_js=json.dumps(suffixes),
    )


def catalog_pac_source(
    endpoints_toml: str | Path, proxy_host: str, proxy_port: int, *, fallback_direct: bool = False
) -> Callable[[], str]:
    """A `get_text` for `serve_pac` that follows edits of endpoints.toml.

    The catalog is re-read when the file's mtime or size changes; a broken edit keeps serving the
    last good PAC (and logs why), so a typo never sends Meta's hosts direct. A wildcard proxy host
    (0.0.0.0, ::) becomes 127.0.0.1, the address local browsers reach.
    """
    path = Path(endpoints_toml)
    if proxy_host in ("", "0.0.0.0", "::"):
        proxy_host = "127.0.0.1"
    lock = threading.Lock()
    state: dict[str, object] = {"stamp": None, "text": None}

    def get_text() -> str:
        with lock:
            try:
                st = path.stat()
                stamp: object = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp != state["stamp"] or state["text"] is None:
                try:
                    catalog = load_catalog(path)
                    state["text"] = pac_script(
                        catalog, proxy_host, proxy_port, fallback_direct=fallback_direct
                    )
                except ConfigError as e:
                    if state["text"] is None:
                        raise
                    logger.warning("keyveil: PAC keeps the last good catalog: %s", e)
                state["stamp"] = stamp
            return str(state["text"])

    return get_text


# -- serving ---------------------------------------------------------------------------------------


class _PacHandler(BaseHTTPRequestHandler):
    # keep-alive clients (browsers) get Content-Length, so HTTP/1.1 is safe
    protocol_version = "HTTP/1.1"
    server: _PacHTTPServer

    def setup(self) -> None:
        super().setup()
        # without this, each keep-alive response waits ~40 ms for the delayed ACK
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in PAC_PATHS:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /proxy.pac\n", with_body)
            return
        try:
            body = self.server.get_text().encode("utf-8")
        except Exception:
            logger.exception("cannot build the PAC file")
            self._send(500, "text/plain; charset=utf-8", b"keyveil: cannot build the PAC file\n", with_body)
            return
        self._send(200, PAC_CONTENT_TYPE, body, with_body)

    def _send(self, status: int, ctype: str, body: bytes, with_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        # browsers cache PAC files; ask them not to, so catalog reloads reach them sooner
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("pac %s " + format, self.address_string(), *args)


class _PacHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], get_text: Callable[[], str]) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _PacHandler)
        self.get_text = get_text


class PacServer:
    """A running PAC server. `url` is what to give browsers; `close()` stops it (idempotent)."""

    def __init__(self, host: str, port: int, get_text: Callable[[], str]) -> None:
        self._httpd = _PacHTTPServer((host, port), get_text)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="keyveil-pac", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        shown = self.host
        if shown in ("", "0.0.0.0"):
            shown = "127.0.0.1"
        elif shown == "::":
            shown = "[::1]"
        elif ":" in shown:
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}/proxy.pac"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PacServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_pac(host: str, port: int, get_text: Callable[[], str]) -> PacServer:
    """Start serving `/proxy.pac` and `/wpad.dat` on host:port (port 0: any free port)."""
    return PacServer(host, port, get_text)
