"""`keyveil discover`: uncataloged Meta endpoints from the journal, with ready catalog entries."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keyveil.catalog import ConfigError, load_catalog
from keyveil.config import default_config_dir
from keyveil.discover import as_json, catalog_entry, discover, render_text
from keyveil.journal import default_journal_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "discover",
        help="list Meta endpoints the catalog misses, with entries to paste",
        description="Read the journal and list the Meta hosts and paths that no catalog entry matches but "
        "where keyveil found behavioral data (journal kind `uncataloged`): methods, counts, categories, "
        "and a ready [[endpoint]] entry for config/endpoints.toml. Endpoints the current catalog already "
        "covers are left out.",
    )
    p.add_argument(
        "journal", nargs="*", type=Path, help="journal files or folders (default: the journal folder)"
    )
    p.add_argument("--config", type=Path, default=None, help="config folder holding endpoints.toml")
    p.add_argument(
        "--all", action="store_true", help="also list uncataloged endpoints without behavioral data"
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--toml", action="store_true", help="print only the [[endpoint]] entries")
    fmt.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from keyveil.journal import read_records

    config_dir: Path = args.config or default_config_dir()
    try:
        catalog = load_catalog(config_dir / "endpoints.toml")
    except ConfigError as e:
        print(f"keyveil discover: {e}", file=sys.stderr)
        return 2
    paths = args.journal or [default_journal_dir()]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"keyveil discover: no journal at {', '.join(missing)}", file=sys.stderr)
        return 2
    count = 0

    def counted():
        nonlocal count
        for r in read_records(paths):
            count += 1
            yield r

    found = discover(counted(), catalog, include_all=args.all)
    taken = {e.name for e in catalog.endpoints}
    if args.json:
        print(json.dumps(as_json(found, taken), indent=2))
    elif args.toml:
        print("\n".join(catalog_entry(d, taken) for d in found), end="")
    else:
        print(render_text(found, taken, count), end="")
    return 0
