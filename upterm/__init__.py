"""upterm: instant, secure terminal sharing over SSH (host, per-user daemon, relay)."""

import warnings

__version__ = "0.1.0"

# asyncssh 2.10 (Debian 12) imports ciphers that cryptography 38 marks deprecated; the
# warning would land in users' terminals and logs, and nobody but asyncssh can act on it.
# Matched by name, not by a regex: compiling one would import re in every ``upterm`` run,
# including the shell prompt's fast path (upterm.ctl.prompt).


class _ModuleNamed:
    """What ``warnings`` needs of a module pattern: ``match``, here an exact name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def match(self, module: str) -> bool:
        return module == self.name


warnings.filters.insert(0, ("ignore", None, Warning, _ModuleNamed("asyncssh.crypto.cipher"), 0))  # type: ignore[attr-defined]
getattr(warnings, "_filters_mutated", lambda: None)()
