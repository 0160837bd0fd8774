"""`keyveil certs`: where the CA is, its fingerprint, how to trust it; export it in other formats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyveil.certs import (
    default_cert_files,
    describe,
    ensure_ca,
    load_ca_certificate,
    trust_instructions,
    write_formats,
)
from keyveil.config import default_certs_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "certs",
        help="show the CA, its fingerprint and how to trust it on each platform",
        description="Show where keyveil's CA is (creating it, as mitmproxy would, if it does not exist "
        "yet), its SHA-256 fingerprint and the steps to trust it on Linux, macOS, Windows, Firefox, "
        "Chromium, Android and iOS. The private key never leaves its 0600 file.",
    )
    p.add_argument("--confdir", type=Path, default=None, help="mitmproxy confdir holding the CA")
    p.add_argument(
        "--write-formats",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the certificate as keyveil-ca.pem, .crt (PEM), .cer (DER) and .p12 (no key) to DIR",
    )
    p.add_argument("--proxy-port", type=int, default=8080, help="keyveil's listen port, for the examples")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    confdir: Path = args.confdir or default_certs_dir()
    existed = (confdir / "mitmproxy-ca.pem").exists()
    try:
        paths = ensure_ca(confdir)
        cert = load_ca_certificate(paths)
    except (OSError, ValueError) as e:
        print(f"keyveil certs: {e}", file=sys.stderr)
        return 1
    if not existed:
        print(f"created a new CA in {paths.confdir} (mitmproxy will use it)\n")
    print(describe(paths, cert))
    files = default_cert_files(paths)
    if args.write_formats is not None:
        out = args.write_formats.expanduser().resolve()
        if out == paths.confdir.resolve():
            print("keyveil certs: --write-formats must not be the CA's own folder", file=sys.stderr)
            return 1
        try:
            files = write_formats(cert, out)
        except OSError as e:
            print(f"keyveil certs: cannot write to {out}: {e}", file=sys.stderr)
            return 1
        print("wrote the certificate (no private key):")
        for label, path in (
            ("PEM", files.pem),
            ("PEM, .crt", files.crt),
            ("DER", files.der),
            ("PKCS#12, cert only", files.p12),
        ):
            print(f"  {label:<20} {path}")
        print()
    print(trust_instructions(cert, files, proxy_port=args.proxy_port))
    return 0
