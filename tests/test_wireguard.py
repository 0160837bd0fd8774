"""WireGuard client configuration (checked against mitmproxy's own WireGuard server), its QR code
(decoded back), and pinning detection (on mitmproxy's real error strings, and live)."""

from __future__ import annotations

import asyncio
import base64
import configparser
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import MagicMock

import mitmproxy_rs
import pytest

from keyveil import certs, wireguard


def parse_conf(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.optionxform = str  # keep WireGuard's key case
    cp.read_string(text)
    return cp


def raw_key(b64: str) -> bytes:
    raw = base64.b64decode(b64, validate=True)
    assert len(raw) == 32
    return raw


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_config_parses_back_with_valid_matching_keys(tmp_path: Path) -> None:
    conf = wireguard.client_config(tmp_path, "192.168.1.20", 51821)
    keyfile = tmp_path / "wireguard.conf"
    stored = json.loads(keyfile.read_text())
    assert set(stored) == {"server_key", "client_key"}
    if os.name != "nt":
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600

    cp = parse_conf(conf)
    assert cp.sections() == ["Interface", "Peer"]
    iface, peer = cp["Interface"], cp["Peer"]
    assert iface["Address"] == "10.0.0.1/32" and iface["DNS"] == "10.0.0.53"
    assert peer["AllowedIPs"] == "0.0.0.0/0" and peer["Endpoint"] == "192.168.1.20:51821"
    raw_key(iface["PrivateKey"])
    raw_key(peer["PublicKey"])
    assert iface["PrivateKey"] == stored["client_key"]
    # the phone's peer is the server: its public key must derive from the stored server key,
    # computed by mitmproxy's own (Rust) WireGuard implementation as an independent check
    assert peer["PublicKey"] == mitmproxy_rs.wireguard.pubkey(stored["server_key"])
    assert wireguard.pubkey(stored["client_key"]) == mitmproxy_rs.wireguard.pubkey(stored["client_key"])
    assert wireguard.pubkey(stored["client_key"]) != peer["PublicKey"]

    # stable: a second call reuses the keys
    assert wireguard.client_config(tmp_path, "192.168.1.20", 51821) == conf


def test_keys_interoperate_with_mitmproxy_rs() -> None:
    for _ in range(5):
        ours = wireguard.genkey()
        assert wireguard.pubkey(ours) == mitmproxy_rs.wireguard.pubkey(ours)
        theirs = mitmproxy_rs.wireguard.genkey()
        assert wireguard.pubkey(theirs) == mitmproxy_rs.wireguard.pubkey(theirs)


def test_ipv6_endpoint_and_bad_key_files(tmp_path: Path) -> None:
    conf = wireguard.client_config(tmp_path, "fd00::5", 51820)
    assert parse_conf(conf)["Peer"]["Endpoint"] == "[fd00::5]:51820"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"server_key": "AAAA", "client_key": wireguard.genkey()}))
    with pytest.raises(ValueError, match="bad.json"):
        wireguard.client_config(tmp_path, "10.1.1.1", keys_file=bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="Invalid WireGuard configuration file"):
        wireguard.load_or_create_keys(bad)
    with pytest.raises(ValueError):
        wireguard.pubkey("!!!")


def test_parse_mode() -> None:
    assert wireguard.parse_mode("wireguard") == (None, None, 51820)
    assert wireguard.parse_mode("wireguard@51821") == (None, None, 51821)
    assert wireguard.parse_mode("wireguard:~/wg.json@0.0.0.0:5000") == ("~/wg.json", "0.0.0.0", 5000)
    assert wireguard.parse_mode("wireguard@[::]:5000") == (None, "::", 5000)
    with pytest.raises(ValueError):
        wireguard.parse_mode("socks5@1080")


def test_client_config_for_mode_resolves_like_mitmproxy(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(wireguard, "default_endpoint_host", lambda: "192.0.2.7")

    def endpoint(spec: str, host: str | None = None, port: int | None = None) -> str:
        return parse_conf(wireguard.client_config_for_mode(spec, tmp_path, host, port))["Peer"]["Endpoint"]

    assert endpoint("wireguard") == "192.0.2.7:51820"
    assert endpoint("wireguard", "0.0.0.0", 8080) == "192.0.2.7:8080"  # global listen options apply
    assert endpoint("wireguard@51999", "10.9.9.9", 8080) == "10.9.9.9:51999"
    assert endpoint("wireguard@[::]:5000") == "192.0.2.7:5000"
    custom = tmp_path / "elsewhere" / "wg.json"
    conf = wireguard.client_config_for_mode(f"wireguard:{custom}@10.0.0.2:5001", tmp_path)
    keys = json.loads(custom.read_text())
    assert parse_conf(conf)["Interface"]["PrivateKey"] == keys["client_key"]
    assert parse_conf(conf)["Peer"]["Endpoint"] == "10.0.0.2:5001"


async def _mitmproxy_client_conf(confdir: Path, port: int) -> str:
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.proxy.mode_servers import ServerInstance
    from mitmproxy.test import taddons

    with taddons.context(Proxyserver()) as tctx:
        tctx.options.confdir = str(confdir)
        inst = ServerInstance.make(f"wireguard@127.0.0.1:{port}", MagicMock())
        await inst.start()
        try:
            conf = inst.client_conf()
        finally:
            await inst.stop()
    assert conf
    return conf


@pytest.mark.timeout(30)
def test_same_config_as_a_real_mitmproxy_wireguard_server(tmp_path: Path) -> None:
    port = free_udp_port()
    # keyveil first: mitmproxy must pick up the keys keyveil created
    ours_first = wireguard.client_config(tmp_path / "a", "127.0.0.1", port)
    assert asyncio.run(_mitmproxy_client_conf(tmp_path / "a", port)) == ours_first
    # mitmproxy first: keyveil must read the keys mitmproxy created
    theirs = asyncio.run(_mitmproxy_client_conf(tmp_path / "b", port))
    assert wireguard.client_config(tmp_path / "b", "127.0.0.1", port) == theirs


@pytest.mark.parametrize("dark_terminal", [True, False])
def test_qr_code_decodes_to_the_configuration(tmp_path: Path, dark_terminal: bool) -> None:
    np = pytest.importorskip("numpy")
    zxingcpp = pytest.importorskip("zxingcpp")
    pytest.importorskip("qrcode")
    conf = wireguard.client_config(tmp_path, "192.168.178.31", 51820)
    text = wireguard.qr_text(conf, dark_terminal=dark_terminal)
    lines = text.splitlines()
    width = max(len(ln) for ln in lines)
    assert width <= 80, "must fit an 80-column terminal"
    top = {"█": 1, "▀": 1, "▄": 0, " ": 0}
    bottom = {"█": 1, "▀": 0, "▄": 1, " ": 0}
    rows = []
    for ln in lines:
        ln = ln.ljust(width)
        rows.append([top[c] for c in ln])
        rows.append([bottom[c] for c in ln])
    painted = np.array(rows, dtype=np.uint8)
    # a terminal shows painted cells in the foreground colour: light on dark, or dark on light
    pixels = painted * 255 if dark_terminal else (1 - painted) * 255
    pixels = np.pad(pixels, 4, constant_values=0 if dark_terminal else 255)
    image = np.kron(pixels, np.ones((6, 6), dtype=np.uint8)).astype(np.uint8)
    found = zxingcpp.read_barcodes(image)
    assert [r.text for r in found] == [conf]


def test_qr_text_without_qrcode_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "qrcode", None)
    assert "no QR code" in wireguard.qr_text("[Interface]\n")


# Messages as mitmproxy 11 builds them in ClientTLSLayer.on_handshake_error (proxy/layers/tls.py)
# from the OpenSSL reasons it lists in TLSLayer.receive_handshake_data, and QUIC's error names.
REFUSED = [
    "The client does not trust the proxy's certificate for www.facebook.com (tlsv1 alert unknown ca)",
    "The client does not trust the proxy's certificate for graph.instagram.com (sslv3 alert bad certificate)",
    "The client does not trust the proxy's certificate for edge-chat.facebook.com (ssl/tls alert bad certificate)",
    "tlsv1 alert unknown ca",
    "unknown error (0x130)",  # QUIC CRYPTO_ERROR + unknown_ca
    "unknown error (0x12e)",  # QUIC CRYPTO_ERROR + certificate_unknown
]
NOT_REFUSED = [
    None,
    "",
    "connection closed early",
    "Cannot parse ClientHello: ValueError('Invalid ClientHello')",
    "Client and mitmproxy cannot agree on a TLS version to use. "
    "You may need to adjust mitmproxy's tls_version_client_min option.",
    "The remote server does not speak TLS.",
    "unknown error (0x10a)",  # QUIC CRYPTO_ERROR + unexpected_message
    "Certificate verify failed: certificate has expired",  # upstream side, not the client
]
DISCONNECT = (
    "The client disconnected during the handshake. If this happens consistently for www.facebook.com, "
    "this may indicate that the client does not trust the proxy's certificate."
)


def test_is_pinning_failure_on_mitmproxy_messages() -> None:
    for msg in REFUSED:
        assert wireguard.is_pinning_failure(msg), msg
    for msg in NOT_REFUSED:
        assert not wireguard.is_pinning_failure(msg), msg
    assert not wireguard.is_pinning_failure(DISCONNECT)
    assert wireguard.is_pinning_failure(DISCONNECT, include_disconnects=True)


RECORDER = """
import json
OUT = {out!r}
def _w(rec):
    with open(OUT, "a") as f:
        f.write(json.dumps(rec) + "\\n")
class Recorder:
    def tls_failed_client(self, data):
        _w({{"sni": data.conn.sni, "error": data.conn.error}})
    def tls_established_client(self, data):
        _w({{"sni": data.conn.sni, "established": True}})
addons = [Recorder()]
"""


def _connect_tls(port: int, host: str, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.do_handshake()


@pytest.mark.skipif(shutil.which("mitmdump") is None, reason="mitmdump is not on PATH")
@pytest.mark.timeout(60)
def test_live_mitmproxy_refusal_is_detected(tmp_path: Path) -> None:
    """A client that does not trust the CA (what a pinning app does) is seen as pinned; one that
    trusts it is not. Real mitmdump, real TLS, 127.0.0.1 only (lazy strategy: no upstream)."""
    paths = certs.ensure_ca(tmp_path / "confdir")
    out = tmp_path / "events.jsonl"
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER.format(out=str(out)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            shutil.which("mitmdump") or "mitmdump",
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "--set",
            f"confdir={paths.confdir}",
            "--set",
            "connection_strategy=lazy",
            "--set",
            "upstream_cert=false",
            "-s",
            str(script),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "mitmdump did not start"
                time.sleep(0.1)

        distrust = ssl.create_default_context(cadata=wireguard_unrelated_ca())
        with pytest.raises(ssl.SSLCertVerificationError):
            _connect_tls(port, "www.facebook.com", distrust)
        trusting = ssl.create_default_context(cafile=str(paths.cert_pem))
        _connect_tls(port, "graph.instagram.com", trusting)

        records: list[dict] = []
        deadline = time.monotonic() + 10
        while len(records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            records = [json.loads(ln) for ln in out.read_text().splitlines()] if out.exists() else []
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    failed = [r for r in records if "error" in r]
    ok = [r for r in records if r.get("established")]
    assert [r["sni"] for r in failed] == ["www.facebook.com"], records
    assert wireguard.is_pinning_failure(failed[0]["error"]), failed[0]["error"]
    assert [r["sni"] for r in ok] == ["graph.instagram.com"]


def wireguard_unrelated_ca() -> str:
    """A CA that has nothing to do with the proxy's: the client trusts only it."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from mitmproxy.certs import create_ca

    _, ca = create_ca(organization="elsewhere", cn="elsewhere", key_size=2048)
    return ca.public_bytes(Encoding.PEM).decode()
