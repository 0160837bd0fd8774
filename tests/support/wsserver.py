"""A recording WebSocket server and a client that reaches it through the proxy (wsproto, 127.0.0.1).

The server plays a `gateway.*` realtime endpoint: it accepts any handshake, records every message it
receives (text or binary), and right after the handshake sends the client one server -> client frame
(`GREETING`), so tests can check that server traffic passes untouched.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

GREETING = '{"events":[{"name":"server_side_click","extra":"{\\"clientX\\":[1,2,3]}","time":1}]}'


@dataclass
class WsSeen:
    path: str
    host: str
    text: bool
    data: bytes


@dataclass
class WsServer:
    seen: list[WsSeen] = field(default_factory=list)
    sock: socket.socket | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def address(self) -> str:
        assert self.sock is not None
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def start(self) -> WsServer:
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def wait_for(self, data: bytes, timeout: float = 15) -> None:
        """Block until a message with exactly `data` arrived (messages keep their order)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(s.data == data for s in self.seen):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server never got {data!r}; got {[s.data for s in self.seen]}")
                self._cond.wait(left)

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        path = host = ""
        parts: list[bytes | str] = []
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                ws.receive_data(data or None)
                for ev in ws.events():
                    if isinstance(ev, Request):
                        path, host = ev.target, ev.host
                        offered = [
                            e for e in ev.extensions if isinstance(e, str) and "permessage-deflate" in e
                        ]
                        exts = [PerMessageDeflate()] if offered else []
                        conn.sendall(ws.send(AcceptConnection(extensions=exts)))
                        conn.sendall(ws.send(TextMessage(GREETING)))
                    elif isinstance(ev, Message):
                        parts.append(ev.data)
                        if ev.message_finished:
                            text = isinstance(ev, TextMessage)
                            whole = "".join(parts).encode() if text else b"".join(parts)  # type: ignore[arg-type]
                            parts = []
                            with self._cond:
                                self.seen.append(WsSeen(path, host, text, whole))
                                self._cond.notify_all()
                    elif isinstance(ev, Ping):
                        conn.sendall(ws.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        conn.sendall(ws.send(ev.response()))
                        return
                if not data:
                    return


class WsClient:
    """A wss:// client through the proxy: CONNECT, TLS with the proxy's CA, WebSocket handshake."""

    def __init__(self, proxy_port: int, host: str, path: str, cafile: Path, deflate: bool = False) -> None:
        raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=15)
        raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed the CONNECT")
            head += chunk
        assert head.split(b" ", 2)[1] == b"200", head
        ctx = ssl.create_default_context(cafile=str(cafile))
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.ws = WSConnection(ConnectionType.CLIENT)
        exts = [PerMessageDeflate()] if deflate else []
        self.sock.sendall(self.ws.send(Request(host=host, target=path, extensions=exts)))
        self.received: list[str | bytes] = []
        self.accepted = False
        deadline = time.monotonic() + 15
        while not self.accepted:
            if time.monotonic() > deadline:
                raise TimeoutError("no WebSocket handshake answer")
            self._pump()

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        for ev in self.ws.events():
            if isinstance(ev, AcceptConnection):
                self.accepted = True
            elif isinstance(ev, Message) and ev.message_finished:
                self.received.append(ev.data)
            elif isinstance(ev, Ping):
                self.sock.sendall(self.ws.send(ev.response()))
        if not data:
            raise ConnectionError("socket closed")

    def wait_received(self, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(self.received)} server messages, wanted {n}")
            self._pump()

    def send_text(self, text: str) -> None:
        self.sock.sendall(self.ws.send(TextMessage(text)))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self.ws.send(BytesMessage(data)))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        self.sock.close()
