"""OpenSSH certificates (PROTOCOL.certkeys), encoded and verified here, sans-I/O.

Written out rather than taken from cryptography's ``SSHCertificateBuilder`` (40+) so upterm
runs on Debian 12's cryptography 38; only primitive sign/verify operations are used. Builds
ed25519 certificates signed by an ed25519 key (all a relay needs); parses and verifies
ed25519, RSA and ECDSA certificates (what Go relays may present).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from upterm.errors import RemoteProtocolError

CERT_TYPE_USER = 1
CERT_TYPE_HOST = 2
CERT_SUFFIX = b"-cert-v01@openssh.com"
_ECDSA_CURVES = {
    b"nistp256": (ec.SECP256R1(), hashes.SHA256()),
    b"nistp384": (ec.SECP384R1(), hashes.SHA384()),
    b"nistp521": (ec.SECP521R1(), hashes.SHA512()),
}
_RSA_HASHES = {
    b"ssh-rsa": hashes.SHA1(),  # noqa: S303 - what older Go relays sign with
    b"rsa-sha2-256": hashes.SHA256(),
    b"rsa-sha2-512": hashes.SHA512(),
}


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def string(self) -> bytes:
        if self.pos + 4 > len(self.data):
            raise RemoteProtocolError("truncated certificate")
        (n,) = struct.unpack_from(">I", self.data, self.pos)
        end = self.pos + 4 + n
        if end > len(self.data):
            raise RemoteProtocolError("truncated certificate")
        value = self.data[self.pos + 4 : end]
        self.pos = end
        return value

    def uint(self, size: int) -> int:
        if self.pos + size > len(self.data):
            raise RemoteProtocolError("truncated certificate")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def mpint(self) -> int:
        return int.from_bytes(self.string(), "big", signed=True)

    def done(self) -> bool:
        return self.pos == len(self.data)


def _tuples(pairs: dict[bytes, bytes]) -> bytes:
    # Sorted by name; a non-empty value is itself an SSH string inside the data string.
    return b"".join(
        _string(name) + _string(_string(value) if value else b"")
        for name, value in sorted(pairs.items())
    )


def _parse_tuples(data: bytes) -> dict[bytes, bytes]:
    reader = _Reader(data)
    out: dict[bytes, bytes] = {}
    while not reader.done():
        name = reader.string()
        value = reader.string()
        out[name] = _Reader(value).string() if value else b""
    return out


def ed25519_blob(key: ed25519.Ed25519PublicKey) -> bytes:
    """The SSH wire blob of an ed25519 public key."""
    return _string(b"ssh-ed25519") + _string(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def build(
    signer: ed25519.Ed25519PrivateKey,
    certified: ed25519.Ed25519PublicKey,
    *,
    cert_type: int,
    key_id: bytes,
    principals: list[bytes],
    valid_after: int,
    valid_before: int,
    extensions: dict[bytes, bytes],
    serial: int | None = None,
) -> bytes:
    """An ed25519 certificate signed by an ed25519 key; returns its wire blob."""
    body = (
        _string(b"ssh-ed25519" + CERT_SUFFIX)
        + _string(os.urandom(32))
        + _string(certified.public_bytes(Encoding.Raw, PublicFormat.Raw))
        + struct.pack(">Q", serial if serial is not None else int.from_bytes(os.urandom(8), "big"))
        + struct.pack(">I", cert_type)
        + _string(key_id)
        + _string(b"".join(_string(p) for p in principals))
        + struct.pack(">QQ", valid_after, valid_before)
        + _string(b"")
        + _string(_tuples(extensions))
        + _string(b"")
        + _string(ed25519_blob(signer.public_key()))
    )
    signature = _string(b"ssh-ed25519") + _string(signer.sign(body))
    return body + _string(signature)


@dataclass(frozen=True)
class Certificate:
    """A parsed, signature-checked certificate."""

    cert_type: int
    key_id: bytes
    principals: tuple[bytes, ...]
    valid_after: int
    valid_before: int
    extensions: dict[bytes, bytes]
    #: Wire blobs of the certified key and of the key that signed the certificate.
    key_blob: bytes
    signer_blob: bytes


def _read_key(kind: bytes, reader: _Reader) -> bytes:
    """Read the certified key's fields after the nonce; return its plain key blob."""
    if kind == b"ssh-ed25519":
        return _string(kind) + _string(reader.string())
    if kind == b"ssh-rsa":
        e, n = reader.string(), reader.string()
        return _string(kind) + _string(e) + _string(n)
    if kind.startswith(b"ecdsa-sha2-"):
        curve, point = reader.string(), reader.string()
        return _string(kind) + _string(curve) + _string(point)
    raise RemoteProtocolError(f"unsupported certificate key type {kind!r}")


def verify_signature(key_blob: bytes, data: bytes, signature: bytes) -> bool:
    """Check an SSH signature (``string alg, string sig``) by the key in ``key_blob``."""
    key = _Reader(key_blob)
    kind = key.string()
    sig = _Reader(signature)
    alg, raw = sig.string(), sig.string()
    try:
        if kind == b"ssh-ed25519" and alg == b"ssh-ed25519":
            ed25519.Ed25519PublicKey.from_public_bytes(key.string()).verify(raw, data)
            return True
        if kind == b"ssh-rsa" and alg in _RSA_HASHES:
            e, n = key.mpint(), key.mpint()
            public = rsa.RSAPublicNumbers(e, n).public_key()
            public.verify(raw, data, padding.PKCS1v15(), _RSA_HASHES[alg])
            return True
        if kind.startswith(b"ecdsa-sha2-") and alg == kind:
            curve_name, point = key.string(), key.string()
            curve, digest = _ECDSA_CURVES[curve_name]
            public_ec = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
            rs = _Reader(raw)
            der = encode_dss_signature(rs.mpint(), rs.mpint())
            public_ec.verify(der, data, ec.ECDSA(digest))
            return True
    except (InvalidSignature, ValueError, KeyError, RemoteProtocolError):
        return False
    return False


def parse(blob: bytes) -> Certificate:
    """Parse a certificate blob and check its signature; raises :class:`RemoteProtocolError`."""
    reader = _Reader(blob)
    alg = reader.string()
    if not alg.endswith(CERT_SUFFIX):
        raise RemoteProtocolError("not an OpenSSH certificate")
    kind = alg[: -len(CERT_SUFFIX)]
    reader.string()  # nonce
    key_blob = _read_key(kind, reader)
    reader.uint(8)  # serial
    cert_type = reader.uint(4)
    key_id = reader.string()
    principals_data = reader.string()
    valid_after, valid_before = reader.uint(8), reader.uint(8)
    if reader.string():
        # PROTOCOL.certkeys: unrecognised critical options must make a certificate unusable,
        # and upterm recognises none (relays set none).
        raise RemoteProtocolError("certificate has critical options")
    extensions = _parse_tuples(reader.string())
    reader.string()  # reserved
    signer_blob = reader.string()
    signed = blob[: reader.pos]
    signature = reader.string()
    if not reader.done():
        raise RemoteProtocolError("trailing data after certificate")
    if not verify_signature(signer_blob, signed, signature):
        raise RemoteProtocolError("certificate signature is invalid")
    principals_reader = _Reader(principals_data)
    principals: list[bytes] = []
    while not principals_reader.done():
        principals.append(principals_reader.string())
    return Certificate(
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        extensions=extensions,
        key_blob=key_blob,
        signer_blob=signer_blob,
    )
