"""mitmproxy script: `mitmdump -s addons/keyveil_addon.py` loads keyveil.

Works from a checkout without installation: mitmproxy puts this script's folder on sys.path, and the
`keyveil` package sits beside it.
"""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

from keyveil.addon import Keyveil  # noqa: E402

addons = [Keyveil()]
