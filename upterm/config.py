"""The user's configuration file: ``$XDG_CONFIG_HOME/upterm/config.toml``.

Precedence, highest first: command-line flags, ``UPTERM_*`` environment variables, this file,
built-in defaults. The file holds defaults for ``upterm host``; keys are the flag names.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from upterm import paths
from upterm.errors import ConfigError

CONFIG_NAME = "config.toml"

#: Keys of the ``[host]`` table (also accepted at the top level) and their types.
HOST_KEYS: dict[str, type] = {
    "server": str,
    "accept": bool,
    "authorized-keys": list,
    "known-hosts": str,
    "keepalive": float,
}

TEMPLATE = """\
# upterm configuration. Flags override UPTERM_* environment variables, which override
# this file. Uncomment what you want to change.

[host]
# Relay to share through; without it the daemon runs a relay on 127.0.0.1:2222.
# server = "ssh://uptermd.example.com:22"

# Share without the "Accept connections?" prompt.
# accept = false

# Only these keys may join (files in authorized_keys format).
# authorized-keys = ["~/.ssh/team_keys"]

# Where relay host keys are checked and recorded.
# known-hosts = "~/.ssh/known_hosts"

# Seconds between probes of the relay; three unanswered ones trigger a reconnect.
# keepalive = 50.0
"""


def config_path() -> Path:
    """Where the configuration file lives (it may not exist)."""
    return paths.config_dir() / CONFIG_NAME


def load(path: Path | None = None) -> dict[str, Any]:
    """Read and validate the file; a missing file is an empty configuration."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML: {exc}; fix it with 'upterm config edit'"
        ) from exc
    host: dict[str, Any] = {k: v for k, v in data.items() if not isinstance(v, dict)}
    host.update(data.get("host", {}))
    for table in data:
        if isinstance(data[table], dict) and table != "host":
            raise ConfigError(f"{path}: unknown table [{table}]; only [host] is used")
    for key, value in host.items():
        expected = HOST_KEYS.get(key)
        if expected is None:
            raise ConfigError(
                f"{path}: unknown setting {key!r}; known: {', '.join(sorted(HOST_KEYS))}"
            )
        ok = isinstance(value, expected) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool)
        )
        if isinstance(value, list):
            ok = ok and all(isinstance(v, str) for v in value)
        if not ok:
            raise ConfigError(f"{path}: {key!r} must be a {expected.__name__}")
    return host


def click_default_map(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings as click's ``default_map`` (option names use underscores)."""
    return {"host": {key.replace("-", "_"): value for key, value in settings.items()}}
