"""Phones and tablets through keyveil with a stock WireGuard app (mitmproxy's `--mode wireguard`).

mitmproxy keeps the tunnel's keys in `<confdir>/wireguard.conf`, a JSON file
`{"server_key": ..., "client_key": ...}` (base64 X25519 private keys), creating it on first start
(mitmproxy/proxy/mode_servers.py, WireGuardServerInstance). `client_config` builds the client's
.conf the way mitmproxy logs it; when the file does not exist yet we create it in the same format
(0600), so mitmproxy then uses our keys and the configuration can be shown before the first start.

Also here: `is_pinning_failure`, which reads mitmproxy's client TLS handshake errors.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

DEFAULT_PORT = 51820  # mitmproxy's WireGuardMode.default_port
CONF_NAME = "wireguard.conf"
# fixed by mitmproxy's WireGuard server: the client's tunnel address and the DNS it answers
CLIENT_ADDRESS = "10.0.0.1/32"
CLIENT_DNS = "10.0.0.53"


@dataclass(frozen=True)
class WireGuardKeys:
    server_key: str  # base64 X25519 private keys, as WireGuard writes them
    client_key: str

    @property
    def server_public(self) -> str:
        return pubkey(self.server_key)

    @property
    def client_public(self) -> str:
        return pubkey(self.client_key)


def genkey() -> str:
    """A new private key in WireGuard's format (base64 of 32 bytes), like `wg genkey`."""
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def pubkey(private_key: str) -> str:
    """The public key of a base64 private key, like `wg pubkey`. ValueError if it is not a key."""
    try:
        raw = base64.b64decode(private_key, validate=True)
    except binascii.Error:
        raise ValueError("WireGuard key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"WireGuard key must be 32 bytes, not {len(raw)}")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(pub).decode()


def keys_path(confdir: str | Path, data: str | None = None) -> Path:
    """Where mitmproxy reads the keys: `wireguard:PATH` mode data, else `<confdir>/wireguard.conf`."""
    if data:
        return Path(data).expanduser()
    return Path(confdir).expanduser() / CONF_NAME


def load_or_create_keys(path: str | Path) -> WireGuardKeys:
    """Read mitmproxy's key file, creating it (0600, in mitmproxy's format) if it is missing."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps({"server_key": genkey(), "client_key": genkey()}, indent=4)
        # O_EXCL: if mitmproxy (or another keyveil) created it meanwhile, keep theirs
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(text)
    try:
        data = json.loads(path.read_text())
        keys = WireGuardKeys(server_key=data["server_key"], client_key=data["client_key"])
        # fail early on bad keys, as mitmproxy does
        keys.server_public, keys.client_public  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid WireGuard configuration file ({path}): {e}") from None
    return keys


def default_endpoint_host() -> str:
    """This machine's address on its default route, which is what mitmproxy puts in `Endpoint`.

    A UDP connect() only selects a route: no packet is sent.
    """
    for family, target in ((socket.AF_INET, "8.8.8.8"), (socket.AF_INET6, "2001:4860:4860::8888")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((target, 80))
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def _endpoint(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]:{port}"
    except ValueError:
        pass  # a host name
    return f"{host}:{port}"


def render_client_config(keys: WireGuardKeys, endpoint_host: str, port: int = DEFAULT_PORT) -> str:
    """The client .conf, field for field what mitmproxy's WireGuardServerInstance.client_conf() gives."""
    return (
        "[Interface]\n"
        f"PrivateKey = {keys.client_key}\n"
        f"Address = {CLIENT_ADDRESS}\n"
        f"DNS = {CLIENT_DNS}\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {keys.server_public}\n"
        "AllowedIPs = 0.0.0.0/0\n"
        f"Endpoint = {_endpoint(endpoint_host, port)}"
    )


def client_config(
    confdir: str | Path,
    endpoint_host: str | None = None,
    port: int = DEFAULT_PORT,
    *,
    keys_file: str | Path | None = None,
) -> str:
    """The WireGuard client configuration for the phone. Creates the key file if needed.

    `endpoint_host`: the address the phone reaches this machine on (default: the address on the
    default route, as mitmproxy does). `keys_file`: the PATH of `--mode wireguard:PATH`, if given.
    """
    keys = load_or_create_keys(keys_path(confdir, str(keys_file) if keys_file else None))
    if not endpoint_host or endpoint_host.strip("[]") in _WILDCARDS:
        endpoint_host = default_endpoint_host()
    return render_client_config(keys, endpoint_host, port)


_WILDCARDS = ("", "0.0.0.0", "::")


def client_config_for_mode(
    spec: str,
    confdir: str | Path,
    listen_host: str | None = None,
    listen_port: int | None = None,
) -> str:
    """The client configuration for mitmproxy mode `spec` (`wireguard[:PATH][@[HOST:]PORT]`),
    resolving host and port as mitmproxy does: the spec's own, else `listen_host`/`listen_port`
    (mitmproxy's global options), else all interfaces and 51820. A wildcard or missing host becomes
    this machine's address on its default route."""
    data, host, port = parse_mode(spec)
    if "@" not in spec and listen_port is not None:
        port = listen_port
    if host is None:
        host = listen_host
    return client_config(confdir, host, port, keys_file=data)


def parse_mode(spec: str) -> tuple[str | None, str | None, int]:
    """Split mitmproxy's `wireguard[:PATH][@[HOST:]PORT]` into (PATH, HOST, PORT).

    Raises ValueError if `spec` is not a wireguard mode.
    """
    m = re.fullmatch(r"wireguard(?::(?P<data>[^@]*))?(?:@(?:(?P<host>.*):)?(?P<port>\d+))?", spec.strip())
    if not m:
        raise ValueError(f"not a WireGuard mode: {spec!r}")
    host = m["host"] or None
    return (m["data"] or None, host.strip("[]") if host else None, int(m["port"] or DEFAULT_PORT))


# -- QR code ---------------------------------------------------------------------------------------


def qr_text(conf: str, *, dark_terminal: bool = True) -> str:
    """The configuration as a QR code drawn with Unicode half blocks (two modules per character).

    `dark_terminal=True` paints the light modules, which is right for light-on-dark terminals;
    use False on a dark-on-light terminal. Returns a one-line explanation if `qrcode` is missing.
    """
    try:
        import qrcode
    except ImportError:
        return "(no QR code: install the `qrcode` package, or copy the configuration above by hand)"
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=4)
    qr.add_data(conf)
    qr.make(fit=True)
    matrix: list[list[bool]] = qr.get_matrix()  # True = dark module, quiet zone included
    painted = [[cell != dark_terminal for cell in row] for row in matrix]
    if len(painted) % 2:
        painted.append([dark_terminal] * len(painted[0]))  # one more row of quiet zone
    glyphs = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}
    out = io.StringIO()
    for top, bottom in zip(painted[0::2], painted[1::2], strict=True):
        out.write("".join(glyphs[(t, b)] for t, b in zip(top, bottom, strict=True)).rstrip() + "\n")
    return out.getvalue()


# -- certificate pinning -----------------------------------------------------------------------------

# What mitmproxy puts in `conn.error` (and logs) when the client refuses its certificate
# (mitmproxy/proxy/layers/tls.py, ClientTLSLayer.on_handshake_error): the TLS alert the client sent.
_REFUSAL = re.compile(
    r"unknown ca|bad certificate|certificate unknown|unsupported certificate|"
    r"does not trust the proxy's certificate",
    re.IGNORECASE,
)
# QUIC carries the TLS alert as CRYPTO_ERROR 0x100 + alert code; mitmproxy shows unnamed codes as
# "unknown error (0x12a)": 0x12a bad_certificate .. 0x12e certificate_unknown, 0x130 unknown_ca.
_QUIC_REFUSAL = re.compile(r"\(0x1(?:2[a-e]|30)\)")
_DISCONNECT = "The client disconnected during the handshake"


def is_pinning_failure(error_message: str | None, *, include_disconnects: bool = False) -> bool:
    """Did the client refuse keyveil's certificate (pinning, or a CA it does not trust)?

    Feed it `data.conn.error` in mitmproxy's `tls_failed_client` hook. A client that just hangs up
    mid-handshake is ambiguous (browsers drop spare connections all the time), so it only counts
    with `include_disconnects=True`. Apps that pin after a completed handshake (OkHttp's
    CertificatePinner) close the connection without any TLS error and cannot be told apart here.
    """
    if not error_message:
        return False
    if _DISCONNECT in error_message:  # its text also says "does not trust": decide on it first
        return include_disconnects
    return bool(_REFUSAL.search(error_message) or _QUIC_REFUSAL.search(error_message))
