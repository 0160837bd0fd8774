"""The `keyveil` command: one subcommand per module under keyveil.commands."""

from __future__ import annotations

import argparse
import importlib
import sys

from keyveil import __version__

# Each module has register(subparsers) which adds a parser with `func=callable(args) -> int`.
COMMANDS = ["run", "report", "scan", "discover", "certs", "pac"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyveil",
        description="A local proxy that keeps Meta's apps from collecting your keystroke timing, "
        "clicks, pointer and scroll behaviour.",
    )
    parser.add_argument("--version", action="version", version=f"keyveil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"keyveil.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # everything after "--" goes to mitmdump unchanged
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.passthrough = passthrough
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
