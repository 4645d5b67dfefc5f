"""Where joiners' keys come from: authorized_keys files and forge accounts.

Every source fails closed: an unreadable file, an HTTP error, a network failure or a source
with no key at all is an error before anything is shared, never an open session.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from upterm import keyopts, wire
from upterm.errors import AuthorizedKeysError, UsageError

FETCH_TIMEOUT_S = 10
#: Largest key list accepted from a forge (a real account has a few hundred bytes).
MAX_KEYS_BYTES = 1 << 20
_USER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,99})")


@dataclass(frozen=True)
class Forge:
    """A forge that publishes users' public keys at ``<base>/<prefix><user>.keys``."""

    name: str
    default_base: str
    user_prefix: str = ""

    @property
    def env_var(self) -> str:
        """The variable that overrides the base URL (for mirrors and tests)."""
        return f"UPTERM_{self.name.upper()}_KEYS_URL"

    def url(self, user: str) -> str:
        """The URL of ``user``'s key list."""
        base = os.environ.get(self.env_var) or self.default_base
        return f"{base.rstrip('/')}/{self.user_prefix}{urllib.parse.quote(user)}.keys"


FORGES = {
    f.name: f
    for f in (
        Forge("github", "https://github.com"),
        Forge("gitlab", "https://gitlab.com"),
        Forge("srht", "https://meta.sr.ht", "~"),
        Forge("codeberg", "https://codeberg.org"),
    )
}


@dataclass(frozen=True)
class KeySource:
    """One source and the keys it gave."""

    label: str
    keys: tuple[wire.PublicKey, ...]


def parse_authorized_user(spec: str) -> tuple[Forge, str]:
    """``forge:name`` → (forge, name); raises :class:`UsageError` naming what is wrong."""
    forge_name, sep, user = spec.partition(":")
    forge = FORGES.get(forge_name.lower())
    if not sep or forge is None:
        raise UsageError(
            f"--authorized-user {spec!r}: use FORGE:NAME with FORGE one of {', '.join(FORGES)}"
        )
    return forge, check_user(forge, user)


def check_user(forge: Forge, user: str) -> str:
    """Refuse names that are not forge user names (they end up in a URL path)."""
    if not _USER_RE.fullmatch(user):
        raise UsageError(f"{user!r} is not a valid {forge.name} user name")
    return user


def _fetch(url: str) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "upterm"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as resp:  # noqa: S310
            body: bytes = resp.read(MAX_KEYS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise AuthorizedKeysError(
            f"fetching {url} failed: HTTP {exc.code} {exc.reason}; check the user name "
            "(refusing to share without those keys)"
        ) from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AuthorizedKeysError(
            f"fetching {url} failed: {reason}; refusing to share without those keys"
        ) from exc
    if len(body) > MAX_KEYS_BYTES:
        raise AuthorizedKeysError(f"{url} returned more than 1 MiB; that is not a key list")
    return body.decode("utf-8", "replace")


def from_forge(forge: Forge, user: str, fetch: Callable[[str], str] = _fetch) -> KeySource:
    """Fetch a forge user's keys."""
    url = forge.url(check_user(forge, user))
    try:
        keys = wire.parse_public_keys(fetch(url))
    except ValueError as exc:
        raise AuthorizedKeysError(f"{url} did not return SSH keys: {exc}") from exc
    if not keys:
        raise AuthorizedKeysError(
            f"{forge.name} user {user} has no SSH keys ({url}); refusing to open the session "
            "to everyone"
        )
    return KeySource(f"{forge.name}:{user}", tuple(keys))


def from_file(name: str) -> KeySource:
    """Read an authorized_keys file."""
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise AuthorizedKeysError(
            f"cannot read authorized keys file {path}: {exc.strerror}; fix the path or "
            "its permissions (refusing to share without it)"
        ) from exc
    keys: list[wire.PublicKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            key = wire.parse_public_key_line(line)
            if key is not None:
                keyopts.parse_options(key.options)
        except ValueError as exc:
            raise AuthorizedKeysError(
                f"{path} line {number}: {exc}; fix or remove the line (refusing to share "
                "with a key whose limits would not hold)"
                if isinstance(exc, keyopts.KeyOptionError)
                else f"{path} line {number}: {exc}"
            ) from exc
        if key is not None:
            keys.append(key)
    if not keys:
        raise AuthorizedKeysError(
            f"authorized keys file {path} holds no key; refusing to open the session to everyone"
        )
    return KeySource(str(path), tuple(keys))


def as_lines(sources: list[KeySource]) -> list[str]:
    """Key lines for the daemon; each line's comment names its source."""
    return [
        (k.options + " " if k.options else "")
        + k.authorized_key_line().decode().strip()
        + " "
        + source.label
        for source in sources
        for k in source.keys
    ]
