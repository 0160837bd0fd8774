"""Where keyveil's data files live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent.parent


def default_config_dir() -> Path:
    """`$KEYVEIL_CONFIG`, else the `config/` folder of the checkout keyveil runs from."""
    env = os.environ.get("KEYVEIL_CONFIG")
    if env:
        return Path(env)
    return REPO_DIR / "config"


def default_state_dir() -> Path:
    """Where the journal and the salt live by default: `$KEYVEIL_HOME` or `~/.local/share/keyveil`."""
    env = os.environ.get("KEYVEIL_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "keyveil"


def default_certs_dir() -> Path:
    """mitmproxy's confdir for keyveil: the checkout's `certs/` (git-ignored)."""
    env = os.environ.get("KEYVEIL_CERTS")
    if env:
        return Path(env)
    return REPO_DIR / "certs"
