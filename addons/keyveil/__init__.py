"""keyveil: find, drop, strip or rewrite Meta's behavioral telemetry in a mitmproxy."""

__version__ = "0.1.0"
