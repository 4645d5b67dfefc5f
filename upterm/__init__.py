"""upterm: instant, secure terminal sharing over SSH (host, per-user daemon, relay)."""

__version__ = "0.1.0"
