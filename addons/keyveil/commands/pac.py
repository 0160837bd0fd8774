"""`keyveil pac`: print or write the proxy auto-config file that sends only Meta's hosts to keyveil."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyveil.catalog import ConfigError, load_catalog
from keyveil.config import default_config_dir
from keyveil.pac import pac_script


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pac",
        help="print the PAC file (only Meta's hosts through keyveil)",
        description="Print (or write) a proxy auto-config file generated from endpoints.toml: "
        "Meta's hosts go through keyveil, everything else goes direct. `keyveil run` also serves it "
        "over HTTP and prints its address.",
    )
    p.add_argument("--config", type=Path, default=None, help="config folder holding endpoints.toml")
    p.add_argument("--proxy-host", default="127.0.0.1", help="address browsers reach keyveil on")
    p.add_argument("--proxy-port", type=int, default=8080, help="keyveil's listen port (default 8080)")
    p.add_argument(
        "--fallback-direct",
        action="store_true",
        help="when keyveil is down, let Meta's hosts go direct (unprotected) instead of failing",
    )
    p.add_argument("-o", "--output", type=Path, default=None, help="write to FILE instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config_dir: Path = args.config or default_config_dir()
    try:
        catalog = load_catalog(config_dir / "endpoints.toml")
        text = pac_script(catalog, args.proxy_host, args.proxy_port, fallback_direct=args.fallback_direct)
    except (ConfigError, ValueError) as e:
        print(f"keyveil pac: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"keyveil pac: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
