"""Test-only mitmproxy script: send requests for Meta hosts (and example.org) to a local upstream.

The upstream address comes from $KEYVEIL_TEST_UPSTREAM ("127.0.0.1:PORT"). The Host header is kept, so
the upstream sees which host the client asked for. Nothing ever leaves 127.0.0.1.
"""

import os

from mitmproxy import http

UPSTREAM = os.environ.get("KEYVEIL_TEST_UPSTREAM", "")
ROUTED = ("facebook.com", "messenger.com", "instagram.com", "threads.net", "threads.com", "example.org")


class Route:
    def request(self, flow: http.HTTPFlow) -> None:
        if not UPSTREAM or flow.response:
            return
        host = flow.request.pretty_host
        if not any(host == s or host.endswith("." + s) for s in ROUTED):
            return
        h, _, p = UPSTREAM.rpartition(":")
        flow.request.headers["x-original-scheme"] = flow.request.scheme
        flow.request.scheme = "http"
        flow.request.host = h
        flow.request.port = int(p)
        flow.request.headers["host"] = host


addons = [Route()]
