"""The host's own SSH keys for logging in to the relay: -i files, default files, passphrases.

The client resolves them (it has the terminal to ask for passphrases) and hands the daemon
paths with their passphrases over the private admin socket; ssh-agent keys are used by the
daemon through ``SSH_AUTH_SOCK``. With none at all the daemon uses an ephemeral key.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import struct
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)

from upterm.errors import UsageError

DEFAULT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
PASSPHRASE_ATTEMPTS = 3


def _load(data: bytes, passphrase: bytes | None) -> None:
    """Raise TypeError if a passphrase is needed, ValueError if it is wrong or no key."""
    if b"BEGIN OPENSSH PRIVATE KEY" in data:
        load_ssh_private_key(data, passphrase)
    else:
        load_pem_private_key(data, passphrase)


def _needs_passphrase(data: bytes) -> bool:
    """Whether the key file is encrypted (read from its header: every cryptography version
    reports a missing passphrase differently)."""
    if b"BEGIN OPENSSH PRIVATE KEY" in data:
        lines = data.strip().splitlines()
        body = base64.b64decode(b"".join(lines[1:-1]))
        magic = b"openssh-key-v1\0"
        if not body.startswith(magic) or len(body) < len(magic) + 4:
            raise ValueError("not an OpenSSH private key")
        (n,) = struct.unpack_from(">I", body, len(magic))
        cipher = body[len(magic) + 4 : len(magic) + 4 + n]
        encrypted = cipher != b"none"
    else:
        encrypted = b"ENCRYPTED" in data.split(b"\n\n", 1)[0]
    if not encrypted:
        _load(data, None)  # raises ValueError if it is no key at all
    return encrypted


def resolve(explicit: tuple[str, ...], can_prompt: bool) -> list[dict[str, str | None]]:
    """Identity files to use, each with the passphrase it needs (asked for now)."""
    chosen: list[tuple[Path, bool]] = [(Path(p).expanduser(), True) for p in explicit]
    if not explicit:
        ssh_dir = Path.home() / ".ssh"
        chosen = [(ssh_dir / n, False) for n in DEFAULT_KEY_NAMES if (ssh_dir / n).exists()]
    out: list[dict[str, str | None]] = []
    for path, required in chosen:
        try:
            data = path.read_bytes()
            needs = _needs_passphrase(data)
        except OSError as exc:
            if required:
                raise UsageError(f"cannot read private key {path}: {exc.strerror}") from exc
            continue
        except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
            if required:
                raise UsageError(f"{path} is not a private key this upterm can use") from exc
            continue
        passphrase = None
        if needs:
            if not can_prompt:
                if required:
                    raise UsageError(
                        f"private key {path} is encrypted and there is no terminal to ask for "
                        "its passphrase; load it into ssh-agent instead"
                    )
                continue
            passphrase = _ask(path, data)
        out.append({"path": str(path.resolve()), "passphrase": passphrase})
    return out


def _ask(path: Path, data: bytes) -> str:
    for _ in range(PASSPHRASE_ATTEMPTS):
        text = getpass.getpass(f"Enter passphrase for key '{path}': ", stream=sys.stderr)
        try:
            _load(data, text.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return text
    raise UsageError(f"error decrypting private key {path}: wrong passphrase")
