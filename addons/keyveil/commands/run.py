"""`keyveil run`: start mitmproxy with the keyveil addon."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from keyveil.config import PACKAGE_DIR, default_certs_dir, default_config_dir, default_state_dir

KEYVEIL_MODES = ("enforce", "audit")
SCRIPT = PACKAGE_DIR.parent / "keyveil_addon.py"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start the proxy",
        description="Start mitmproxy with keyveil on 127.0.0.1:8080. Everything after `--` is passed to "
        "mitmdump unchanged, e.g. `keyveil run -- --set confdir=DIR -s other.py`.",
    )
    p.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--listen-port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--log", default=str(default_state_dir() / "journal"), metavar="PATH",
                   help="the journal: a folder (rotated files) or a file (default %(default)s)")
    p.add_argument("--config", default=str(default_config_dir()), metavar="DIR",
                   help="folder with endpoints.toml, detection.toml, policy.toml (default: the bundled config/)")
    p.add_argument("--mode", action="append", default=[], metavar="MODE",
                   help="enforce or audit sets keyveil's mode (audit: change nothing, journal what would "
                   "have happened); any other value (wireguard, socks5, local, transparent, upstream:URL...) "
                   "is passed to mitmproxy as its --mode. May be given more than once.")
    p.add_argument("--confdir", default=str(default_certs_dir()), metavar="DIR",
                   help="where mitmproxy keeps its CA (default: the checkout's certs/)")
    p.add_argument("--journal-detail", choices=("summary", "full"), default="summary",
                   help="summary (default): counts and coarse statistics only; full: keep more detail")
    p.add_argument("--intercept-all", action="store_true",
                   help="intercept TLS for every host, not only the catalog's Meta hosts")
    p.set_defaults(func=run)


def build_args(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The mitmdump command line for `args`, and keyveil's own mode (None: policy.toml's)."""
    kv_mode = None
    proxy_modes: list[str] = []
    for m in args.mode:
        if m in KEYVEIL_MODES:
            kv_mode = m
        else:
            proxy_modes.append(m)
    argv = ["--listen-host", args.listen_host, "--listen-port", str(args.listen_port)]
    for m in proxy_modes:
        argv += ["--mode", m]
    argv += ["-s", str(SCRIPT)]
    sets = {
        "confdir": args.confdir,
        "keyveil_config": args.config,
        "keyveil_log": args.log,
        "keyveil_journal_detail": args.journal_detail,
        "keyveil_intercept_all": "true" if args.intercept_all else "false",
    }
    if kv_mode:
        sets["keyveil_mode"] = kv_mode
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    passthrough = list(getattr(args, "passthrough", []) or [])
    return argv + passthrough, kv_mode


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner(args: argparse.Namespace, kv_mode: str | None) -> str:
    from keyveil.catalog import load_catalog

    cat = load_catalog(Path(args.config) / "endpoints.toml")
    apps = sorted(set(cat.apps.values()) | {e.app for e in cat.endpoints if e.app})
    confdir = Path(args.confdir)
    lines = [
        f"keyveil listening on {args.listen_host}:{args.listen_port} ({kv_mode or 'policy'} mode)",
        f"  protecting: {len(cat.endpoints)} Meta endpoints for {', '.join(apps)}",
        "  only Meta hosts are TLS-intercepted" + ("" if not args.intercept_all else " (overridden: --intercept-all)"),
        f"  journal:    {args.log}",
        f"  CA cert:    {confdir / 'mitmproxy-ca-cert.pem'} (created on first run)",
        "  trust it:   `keyveil certs` prints its fingerprint and the steps for your system and browser;",
        "              or browse to http://mitm.it through the proxy. Live summary: http://keyveil/",
        "  reports:    keyveil report " + args.log,
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    argv, kv_mode = build_args(args)
    confdir = Path(args.confdir)
    confdir.mkdir(parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)  # the CA private key lives here
    passthrough = " ".join(getattr(args, "passthrough", []) or [])
    if not _is_loopback(args.listen_host) and "proxyauth" not in passthrough:
        print(
            f"WARNING: listening on {args.listen_host} without proxy authentication: anyone who can reach "
            "this address can use the proxy. Add `-- --set proxyauth=USER:PASS`.",
            file=sys.stderr,
        )
    try:
        print(banner(args, kv_mode), flush=True)
    except Exception as e:  # a broken config is reported by the addon with file and line
        print(f"keyveil: {e}", file=sys.stderr)
        return 2
    from mitmproxy.tools.main import mitmdump

    mitmdump(argv)
    return 0
