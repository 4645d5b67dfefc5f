"""Key files: create-once persistent host keys, and fresh per-session keys.

ed25519 is every hop's own key (it signs proofs and certificates); ECDSA P-256 and RSA 3072
keys sit beside it for SSH clients limited to those host key types.

Uses cryptography only, so the thin client can import it without asyncssh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_ssh_private_key,
)

from upterm.errors import ConfigError
from upterm.wire import PublicKey, parse_public_key_line

#: A host key of any type we serve.
PrivateHostKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: The host key types offered beside ed25519, each with the file name OpenSSH uses.
EXTRA_KEY_TYPES = {"ecdsa": "ssh_host_ecdsa_key", "rsa": "ssh_host_rsa_key"}

#: RSA modulus size: OpenSSH's default, above FIPS 186-5's minimum.
RSA_BITS = 3072


def _openssh(private: PrivateHostKey) -> bytes:
    return private.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())


def _public_line(private: PrivateHostKey) -> bytes:
    return private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)


def _public(line: bytes) -> PublicKey:
    key = parse_public_key_line(line)
    assert key is not None
    return key


def generate_private_key(kind: str) -> PrivateHostKey:
    """A fresh key of ``kind`` ("ed25519", "ecdsa" or "rsa")."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"unknown key type {kind!r}")


@dataclass(frozen=True)
class KeyPair:
    """A private key of any host key type, with its OpenSSH encodings."""

    private: PrivateHostKey

    @classmethod
    def generate(cls, kind: str) -> KeyPair:
        """A fresh random key of ``kind`` (see :func:`generate_private_key`)."""
        return cls(generate_private_key(kind))

    def private_openssh(self) -> bytes:
        """The private key in OpenSSH PEM form (unencrypted)."""
        return _openssh(self.private)

    def public_line(self) -> bytes:
        """``TYPE AAAA...`` without a trailing newline."""
        return _public_line(self.private)

    def private_pkcs8(self) -> bytes:
        """The private key as PKCS#8 PEM: how it is handed to asyncssh (2.10, Debian 12's,
        cannot read the OpenSSH form of an ECDSA key that cryptography 38 writes)."""
        return self.private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @property
    def public(self) -> PublicKey:
        """The public half as a :class:`PublicKey`."""
        return _public(self.public_line())


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
        return _openssh(self.private)

    def public_line(self) -> bytes:
        """``ssh-ed25519 AAAA...`` without a trailing newline."""
        return _public_line(self.private)

    @property
    def public(self) -> PublicKey:
        """The public half as a :class:`PublicKey`."""
        return _public(self.public_line())


def load_or_create_host_key(path: Path) -> Ed25519Key:
    """Load the ed25519 key at ``path``, creating it (0600, atomically) on first use.

    A relay must keep its host key across restarts: hosts pin it, and a key that changes
    trains users to accept changed keys.
    """
    private = load_or_create_key(path, "ed25519")
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"{path} must be an ed25519 key (generate one with ssh-keygen -t ed25519)"
        )
    return Ed25519Key(private)


def load_or_create_key(path: Path, kind: str) -> PrivateHostKey:
    """Load the private key at ``path``, creating one of ``kind`` (0600, atomically) if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        created = KeyPair.generate(kind)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(created.private_openssh())
        try:
            # link() fails if another process created the key meanwhile: use theirs.
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_key(path, kind)
        finally:
            tmp.unlink()
        path.with_name(path.name + ".pub").write_bytes(created.public_line() + b"\n")
        return created.private
    except OSError as exc:
        raise ConfigError(
            f"cannot read host key {path}: {exc.strerror}; check its permissions"
        ) from exc
    return load_any_private_key(data, str(path))


def load_any_private_key(data: bytes, where: str) -> PrivateHostKey:
    """Parse an unencrypted OpenSSH private key of a host key type we serve."""
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where} is not a usable OpenSSH private key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise ConfigError(f"{where}: ECDSA keys must use NIST P-256, P-384 or P-521")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ConfigError(f"{where}: RSA keys must have at least 2048 bits")
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise ConfigError(f"{where} must be an ed25519, ECDSA or RSA key")
    return key


def load_private_key_bytes(data: bytes, where: str) -> Ed25519Key:
    """Parse an unencrypted OpenSSH ed25519 private key."""
    key = load_any_private_key(data, where)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"{where} must be an ed25519 key (generate one with ssh-keygen -t ed25519)"
        )
    return Ed25519Key(key)
