"""Node-to-node hops: how one uptermd node carries a joiner to the node owning its session.

The node a joiner reached (the *entry*) authenticates the joiner itself against the
session's registration, then dials the owner's cluster listener as an SSH client with a
user certificate that says who the joiner is:

- the certified key is the entry node's own hop key (made at start, never stored); the
  signer is the cluster's key, the ed25519 key every node shares (hosts pin it, and it signs
  their guest certificates). A self-signed certificate, or one from any other signer, is
  refused: only a node holding the cluster key can vouch for a joiner;
- principal: the joiner's SSH user (the token), validity ``now ± 60 s``;
- ``upterm-auth-request``: the joiner as upstream's guest certificates describe it (its key,
  client version, address), which the owner passes on to the host;
- ``permit-pty``, ``permit-port-forwarding``: a terminal and the end-to-end splice;
- ``upterm-hop@upterm.dev``: the session generation the entry node read from the registry,
  its own node id and the owner's (a certificate for one node is refused by any other, say
  one that took over a reused address). The owner serves the hop only if it holds that very
  generation now (the fencing token on the data path: an entry node working from a stale
  record is refused).

This module builds and checks those certificates (no I/O); the dialling is in the server.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives.asymmetric import ed25519

from upterm import sshcert, wire
from upterm.errors import RemoteProtocolError

HOP_EXTENSION = "upterm-hop@upterm.dev"
#: Clock skew tolerated between nodes (as upstream's guest certificates).
HOP_CERT_SKEW_S = 60


@dataclass(frozen=True)
class HopClaim:
    """What a verified hop certificate says."""

    auth: wire.AuthRequest
    generation: int
    from_node: str
    to_node: str


def build_hop_certificate(
    cluster_key: ed25519.Ed25519PrivateKey,
    hop_key: ed25519.Ed25519PublicKey,
    *,
    principal: str,
    auth: wire.AuthRequest,
    generation: int,
    from_node: str,
    to_node: str,
    now: int,
) -> bytes:
    """The OpenSSH one-line certificate an entry node presents to the owning node."""
    body = msgpack.packb({"g": generation, "n": from_node, "t": to_node}, use_bin_type=True)
    blob = sshcert.build(
        cluster_key,
        hop_key,
        cert_type=sshcert.CERT_TYPE_USER,
        key_id=f"hop:{from_node}".encode(),
        principals=[principal.encode()],
        valid_after=max(0, now - HOP_CERT_SKEW_S),
        valid_before=now + HOP_CERT_SKEW_S,
        extensions={
            wire.AUTH_REQUEST_EXTENSION.encode(): auth.encode(),
            HOP_EXTENSION.encode(): body,
            # What the owner's server lets a certificate do: a terminal, and the direct-tcpip
            # channel of an end-to-end join. Nothing else (no agent, no X11).
            b"permit-pty": b"",
            b"permit-port-forwarding": b"",
        },
    )
    alg, _ = wire.read_ssh_string(blob)
    return alg + b" " + base64.b64encode(blob)


def verify_hop_certificate(blob: bytes, cluster_blob: bytes, principal: str, now: int) -> HopClaim:
    """Check a hop certificate completely; raises :class:`RemoteProtocolError`.

    Signer exactly the cluster key, certified key not the signer, user certificate for
    ``principal``, valid now, both extensions well formed.
    """
    cert = wire.verify_guest_certificate(blob, cluster_blob, principal, now)
    if cert.certified_blob == cert.signer_blob:
        raise RemoteProtocolError("a hop certificate must certify a node's hop key, not the signer")
    parsed = sshcert.parse(blob)
    raw = parsed.extensions.get(HOP_EXTENSION.encode())
    if raw is None:
        raise RemoteProtocolError(f"certificate has no {HOP_EXTENSION} extension")
    try:
        body = msgpack.unpackb(raw, raw=False, max_str_len=256)
    except ValueError as exc:
        raise RemoteProtocolError(f"malformed {HOP_EXTENSION}") from exc
    fields = body if isinstance(body, dict) else {}
    gen, node, target = fields.get("g"), fields.get("n"), fields.get("t")
    if not isinstance(gen, int) or gen < 0 or not isinstance(node, str):
        raise RemoteProtocolError(f"malformed {HOP_EXTENSION}")
    if not isinstance(target, str):
        raise RemoteProtocolError(f"malformed {HOP_EXTENSION}")
    return HopClaim(
        auth=cert.auth,
        generation=gen,
        from_node=node,
        to_node=target,
    )
