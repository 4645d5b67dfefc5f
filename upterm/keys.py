"""Key files: create-once persistent ed25519 keys, and fresh per-session keys.

Uses cryptography only, so the thin client can import it without asyncssh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_ssh_private_key,
)

from upterm.errors import ConfigError
from upterm.wire import PublicKey, parse_public_key_line


@dataclass(frozen=True)
class Ed25519Key:
    """An ed25519 private key with its OpenSSH encodings."""

    private: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Ed25519Key:
        """A fresh random key."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    def private_openssh(self) -> bytes:
        """The private key in OpenSSH PEM form (unencrypted)."""
        return self.private.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())

    def public_line(self) -> bytes:
        """``ssh-ed25519 AAAA...`` without a trailing newline."""
        return self.private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)

    @property
    def public(self) -> PublicKey:
        """The public half as a :class:`PublicKey`."""
        key = parse_public_key_line(self.public_line())
        assert key is not None
        return key


def load_or_create_host_key(path: Path) -> Ed25519Key:
    """Load the ed25519 key at ``path``, creating it (0600, atomically) on first use.

    A relay must keep its host key across restarts: hosts pin it, and a key that changes
    trains users to accept changed keys.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519Key.generate()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_openssh())
        try:
            # link() fails if another process created the key meanwhile: use theirs.
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_host_key(path)
        finally:
            tmp.unlink()
        path.with_name(path.name + ".pub").write_bytes(key.public_line() + b"\n")
        return key
    except OSError as exc:
        raise ConfigError(
            f"cannot read host key {path}: {exc.strerror}; check its permissions"
        ) from exc
    return load_private_key_bytes(data, str(path))


def load_private_key_bytes(data: bytes, where: str) -> Ed25519Key:
    """Parse an unencrypted OpenSSH ed25519 private key."""
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a usable OpenSSH private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"{where} must be an ed25519 key (generate one with ssh-keygen -t ed25519)"
        )
    return Ed25519Key(key)
