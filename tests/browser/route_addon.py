"""Test-only mitmproxy addon: send the Meta hostnames (and the fixture shop) to the local fixture server.

Load it after keyveil's own addon: `keyveil run ... -- -s tests/browser/route_addon.py
--set kvtest_upstream=127.0.0.1:PORT`. It changes only where the upstream TCP connection goes (the
`server_connect` hook), never the request: keyveil still sees https://www.facebook.com/ajax/bz, and the
fixture server still gets `Host: www.facebook.com`. Every other upstream connection is refused, so a
browser test can never reach the internet. It also forces the options that keep the proxy offline
(lazy connections, no upstream certificate sniffing) and accepts the fixture's self-signed certificate.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

ROUTED_SUFFIXES = ("facebook.com", "facebook.net", "messenger.com", "instagram.com", "keyveil.test")
OFFLINE_OPTIONS = {"connection_strategy": "lazy", "upstream_cert": False, "ssl_insecure": True}

log = logging.getLogger(__name__)


def routed(host: str) -> bool:
    host = host.lower().rstrip(".")
    return any(host == s or host.endswith("." + s) for s in ROUTED_SUFFIXES)


class RouteToFixture:
    def __init__(self) -> None:
        self.upstream: tuple[str, int] | None = None
        self.refused: list[str] = []  # hosts whose connection was refused, for the log

    def load(self, loader: Loader) -> None:
        loader.add_option("kvtest_upstream", str, "", "host:port of the browser test's fixture server")

    def configure(self, updated: set[str]) -> None:
        if "kvtest_upstream" in updated and ctx.options.kvtest_upstream:
            host, _, port = ctx.options.kvtest_upstream.rpartition(":")
            if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
                raise exceptions.OptionsError("kvtest_upstream must be a loopback host:port")
            self.upstream = (host, int(port))
        # Guard: whatever the command line said, this proxy must never connect anywhere on its own.
        wrong = {k: v for k, v in OFFLINE_OPTIONS.items() if getattr(ctx.options, k) != v}
        if wrong:
            ctx.options.update(**wrong)

    def server_connect(self, data: ServerConnectionHookData) -> None:
        host, port = data.server.address or ("", 0)
        if host in ("127.0.0.1", "localhost", "::1"):
            return  # the fixture shop reached by address: already local
        if self.upstream and routed(host):
            data.server.address = self.upstream
            return
        self.refused.append(host)
        log.info("kvtest: refused upstream connection to %s:%s", host, port)
        data.server.error = f"kvtest route addon: {host} is not routed to the fixture"


addons = [RouteToFixture()]
