"""upterm: instant, secure terminal sharing over SSH (host, per-user daemon, relay)."""

import warnings

__version__ = "0.1.0"

# asyncssh 2.10 (Debian 12) imports ciphers that cryptography 38 marks deprecated; the
# warning would land in users' terminals and logs, and nobody but asyncssh can act on it.
warnings.filterwarnings("ignore", module=r"asyncssh\.crypto\.cipher")
