"""`keyveil run`: start mitmproxy with the keyveil addon."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from keyveil.config import PACKAGE_DIR, default_certs_dir, default_config_dir
from keyveil.journal import default_journal_dir

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
    p.add_argument("--log", default=str(default_journal_dir()), metavar="PATH",
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
    p.add_argument("--pac-port", type=int, default=0, metavar="PORT",
                   help="serve the proxy auto-config file on this port (default: listen port + 1; -1: off)")
    p.add_argument("--intercept-all", action="store_true",
                   help="intercept TLS for every host, not only the catalog's Meta hosts")
    p.set_defaults(func=run)


def split_modes(modes: list[str]) -> tuple[str | None, list[str]]:
    """keyveil's own mode (enforce/audit, None: policy.toml's) and the mitmproxy modes."""
    kv_mode = None
    proxy_modes: list[str] = []
    for m in modes:
        if m in KEYVEIL_MODES:
            kv_mode = m
        elif m.startswith("wireguard") and "@" not in m:
            # WireGuard is key-authenticated and phones must reach it: all interfaces, its usual port
            proxy_modes.append(f"{m}@0.0.0.0:51820")
        else:
            proxy_modes.append(m)
    return kv_mode, proxy_modes


def build_args(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The mitmdump command line for `args`, and keyveil's own mode (None: policy.toml's)."""
    kv_mode, proxy_modes = split_modes(args.mode)
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
    passthrough = list(getattr(args, "passthrough", []) or [])
    given = _passthrough_sets(passthrough)
    for k, v in sets.items():
        if k not in given:  # mitmproxy refuses an option set twice: the user's own --set wins
            argv += ["--set", f"{k}={v}"]
    return argv + passthrough, kv_mode


def _passthrough_sets(rest: list[str]) -> dict[str, str]:
    """Options the user sets after `--` (`--set name=value` or `--set=name=value`)."""
    out: dict[str, str] = {}
    for i, a in enumerate(rest):
        if a.startswith("--set="):
            val = a[len("--set="):]
        elif a == "--set" and i + 1 < len(rest):
            val = rest[i + 1]
        else:
            continue
        name, _, value = val.partition("=")
        out[name] = value
    return out


def _regular(proxy_modes: list[str]) -> bool:
    return not proxy_modes or any(m == "regular" or m.startswith("regular@") for m in proxy_modes)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _where(args: argparse.Namespace) -> str:
    """Where the proxy listens: the regular proxy's address, and any other mitmproxy mode."""
    _, modes = split_modes(args.mode)
    out = [f"{args.listen_host}:{args.listen_port}"] if _regular(modes) else []
    out += [m if "@" in m else f"{m}@{args.listen_host}:{args.listen_port}" for m in modes if m != "regular"]
    return ", ".join(out)


def _mode(args: argparse.Namespace, kv_mode: str | None) -> str:
    if kv_mode:
        return kv_mode
    from keyveil.policy import load_policy

    return load_policy(Path(args.config) / "policy.toml").mode


def banner(args: argparse.Namespace, kv_mode: str | None, fingerprint: str = "", pac_url: str = "") -> str:
    from keyveil.catalog import load_catalog

    cat = load_catalog(Path(args.config) / "endpoints.toml")
    apps = sorted(set(cat.apps.values()) | {e.app for e in cat.endpoints if e.app})
    confdir = Path(args.confdir)
    lines = [
        f"keyveil listening on {_where(args)} ({_mode(args, kv_mode)} mode)",
        f"  protecting: {len(cat.endpoints)} Meta endpoints for {', '.join(apps)}",
        "  TLS:        " + ("every host is intercepted (--intercept-all)" if args.intercept_all
                            else "only Meta's hosts are intercepted; everything else is tunnelled untouched"),
        f"  journal:    {args.log}",
        f"  CA cert:    {confdir / 'mitmproxy-ca-cert.pem'}",
    ]
    if fingerprint:
        lines.append(f"  CA SHA-256: {fingerprint}")
    lines += [
        "  trust it:   `keyveil certs` prints the steps for your system and browser,",
        "              or browse to http://mitm.it through the proxy",
    ]
    if pac_url:
        lines.append(f"  PAC:        {pac_url}  (send only Meta's hosts through keyveil: docs/setup.md)")
    lines += [
        "  live view:  http://keyveil/ through the proxy",
        "  reports:    keyveil report " + args.log,
    ]
    return "\n".join(lines)


def _passthrough_confdir(args: argparse.Namespace) -> None:
    """`keyveil run -- --set confdir=DIR` wins over --confdir: the CA is prepared where mitmproxy looks."""
    confdir = _passthrough_sets(list(getattr(args, "passthrough", []) or [])).get("confdir")
    if confdir:
        args.confdir = confdir


def run(args: argparse.Namespace) -> int:
    from keyveil import certs, pac, wireguard

    _passthrough_confdir(args)
    try:  # every config file, before anything listens: a clear error naming the file, not a traceback
        from keyveil.pipeline import Pipeline

        Pipeline.from_config_dir(args.config)
    except ValueError as e:  # ConfigError
        print(f"keyveil: {e}", file=sys.stderr)
        return 2
    argv, kv_mode = build_args(args)
    _, proxy_modes = split_modes(args.mode)
    passthrough = " ".join(getattr(args, "passthrough", []) or [])
    if not _is_loopback(args.listen_host) and "proxyauth" not in passthrough:
        print(
            f"WARNING: listening on {args.listen_host} without proxy authentication: anyone who can reach "
            "this address can use the proxy. Add `-- --set proxyauth=USER:PASS`.",
            file=sys.stderr,
        )
    try:
        paths = certs.ensure_ca(args.confdir)  # 0700 folder, 0600 key, before anything listens
        fingerprint = certs.fingerprint_sha256(certs.load_ca_certificate(paths))
    except Exception as e:
        print(f"keyveil: cannot prepare the CA in {args.confdir}: {e}", file=sys.stderr)
        return 2
    pac_server = None
    if _regular(proxy_modes) and args.pac_port >= 0:
        port = args.pac_port or args.listen_port + 1
        try:
            source = pac.catalog_pac_source(Path(args.config) / "endpoints.toml", args.listen_host, args.listen_port)
            pac_server = pac.serve_pac(args.listen_host, port, source)
        except OSError as e:
            print(f"keyveil: PAC server not started on port {port}: {e.strerror}", file=sys.stderr)
    try:
        try:
            print(banner(args, kv_mode, fingerprint, pac_server.url if pac_server else ""), flush=True)
        except Exception as e:  # the addon reports a broken config with file and line
            print(f"keyveil: {e}", file=sys.stderr)
            return 2
        for m in proxy_modes:
            if m.startswith("wireguard"):
                conf = wireguard.client_config_for_mode(m, paths.confdir, args.listen_host, args.listen_port)
                print("\nWireGuard client configuration (phones: scan the QR code in the WireGuard app):\n")
                print(conf)
                print(wireguard.qr_text(conf), flush=True)
        from mitmproxy.tools.main import mitmdump

        mitmdump(argv)
    finally:
        if pac_server is not None:
            pac_server.close()
    return 0
