"""Golden byte vectors for upterm/wire.py: every format pinned independently of the code."""

from __future__ import annotations

import base64
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    SSHCertificateBuilder,
    SSHCertificateType,
)

from upterm import wire
from upterm.errors import RemoteProtocolError

UPSTREAM_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN0EWrjdcHcuMfI8bGAyHPcGsAc/vd/gl5673pRkRBGY"


def _fixed_key(seed: int) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes((seed + i) % 256 for i in range(32)))


def _raw_pub(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _blob(key: ed25519.Ed25519PrivateKey) -> bytes:
    # ssh-ed25519 wire blob, written out by hand: string "ssh-ed25519", string pk (32 bytes).
    return b"\x00\x00\x00\x0bssh-ed25519" + b"\x00\x00\x00\x20" + _raw_pub(key)


def _line(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)


# --- Session id -----------------------------------------------------------------------------


def test_session_id_upstream_vector() -> None:
    key = wire.parse_public_key_line(UPSTREAM_KEY)
    assert key is not None
    assert wire.derive_session_id(key.blob, bytes(range(1, 17))) == "wtMmTSFPYXAIXO7cXhhP"


def test_session_id_shape_and_sensitivity() -> None:
    key = wire.parse_public_key_line(UPSTREAM_KEY)
    assert key is not None
    a = wire.derive_session_id(key.blob, bytes(range(1, 17)))
    b = wire.derive_session_id(key.blob, bytes(range(2, 18)))
    assert a != b
    assert len(b) == 20
    assert all(c in wire.BASE62_ALPHABET for c in b)


def test_random_session_id_shape() -> None:
    sid = wire.random_session_id()
    assert len(sid) == 20
    assert all(c in wire.BASE62_ALPHABET for c in sid)


# --- Tokens ---------------------------------------------------------------------------------


def test_encode_token_vector() -> None:
    token = wire.encode_token("AbCdEfGhIjKlMnOpQrSt", "10.0.0.5:2222")
    assert token == "AbCdEfGhIjKlMnOpQrSt:MTAuMC4wLjU6MjIyMg=="


def test_decode_token_round_trip() -> None:
    tok = wire.decode_token("AbCdEfGhIjKlMnOpQrSt:MTAuMC4wLjU6MjIyMg==")
    assert tok == wire.Token("AbCdEfGhIjKlMnOpQrSt", "10.0.0.5:2222")


def test_decode_bare_session_id() -> None:
    tok = wire.decode_token("SESSIONID")
    assert tok.session_id == "SESSIONID"
    assert tok.node_addr is None


def test_token_url_alphabet_round_trip() -> None:
    # ">?" and "~~" encode to base64 text with '-' in the URL alphabet ('+' in the standard one).
    node = "relay>?.x:1"
    token = wire.encode_token("abc", node)
    encoded = token.split(":", 1)[1]
    assert encoded == "cmVsYXk-Py54OjE="
    assert "-" in encoded or "_" in encoded
    assert wire.decode_token(token) == wire.Token("abc", node)
    node2 = "a\u00ff?:9"  # UTF-8 61 c3 bf -> "YcO_": '_' in the URL alphabet ('/' otherwise)
    token2 = wire.encode_token("abc", node2)
    assert "_" in token2.split(":", 1)[1]
    assert wire.decode_token(token2) == wire.Token("abc", node2)


@pytest.mark.parametrize(
    "user",
    [
        "",
        "a" * 513,
        "A" * 20 + ":" + "QUFB" * 123,  # 513 characters in all
        "../x",
        "a b",
        "a/b",
        "abc\x00",
        ":MTAuMC4wLjU6MjIyMg==",
        "a" * 65,
        "abc:abc",  # bad padding
        "abc:YQ",  # missing padding
        "abc:_w==",  # decodes to b"\xff": not UTF-8
        "abc:" + base64.urlsafe_b64encode(b"\x01node").decode(),  # non-printable
        "abc:" + base64.urlsafe_b64encode(b"node\n").decode(),  # non-printable
    ],
)
def test_decode_token_refuses_hostile_names(user: str) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.decode_token(user)


@pytest.mark.parametrize("user", ["abc:!!!", "abc:MTAu*MC4wLjU6MjIyMg=="])
def test_decode_token_refuses_non_base64url_characters(user: str) -> None:
    # Characters outside the base64url alphabet are not base64 (Go's DecodeString refuses them).
    with pytest.raises(RemoteProtocolError):
        wire.decode_token(user)


def test_decode_token_length_limit_is_inclusive() -> None:
    user = "A" * 19 + ":" + "QUFB" * 122 + "QUE="  # 512 characters
    assert len(user) == 512
    assert wire.decode_token(user) == wire.Token("A" * 19, "A" * 368)


# --- Protobuf payloads ----------------------------------------------------------------------

CSR = wire.CreateSessionRequest(
    host_user="alice",
    host_public_keys=(b"hk1", b"hk2"),
    client_authorized_keys=(b"ck",),
    session_secret=bytes(range(16)),
    generation=300,
    host_key_proof=b"proof",
)
CSR_BYTES = (
    b"\x0a\x05alice"  # 1: hostUser
    b"\x12\x03hk1"  # 2: hostPublicKeys[0]
    b"\x12\x03hk2"  # 2: hostPublicKeys[1]
    b"\x1a\x02ck"  # 3: clientAuthorizedKeys[0]
    b"\x22\x10\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f"  # 4: secret
    b"\x28\xac\x02"  # 5: generation = 300 (varint ac 02)
    b"\x32\x05proof"  # 6: hostKeyProof
)

CSRESP = wire.CreateSessionResponse(
    session_id="AbC", node_addr="10.0.0.5:2222", ssh_user="AbC:xyz", session_key_redial=True
)
CSRESP_BYTES = (
    b"\x0a\x03AbC"  # 1: sessionID
    b"\x12\x0d10.0.0.5:2222"  # 2: nodeAddr
    b"\x1a\x07AbC:xyz"  # 3: ssh_user
    b"\x20\x01"  # 4: sessionKeyRedial = true
)

AUTH = wire.AuthRequest(
    client_version="SSH-2.0-x",
    remote_addr="1.2.3.4:5",
    authorized_key=b"ssh-ed25519 AAAA",
    local_addr="10.0.0.1:22",
)
AUTH_BYTES = (
    b"\x0a\x09SSH-2.0-x"  # 1: client_version
    b"\x12\x091.2.3.4:5"  # 2: remote_addr
    b"\x1a\x10ssh-ed25519 AAAA"  # 3: authorized_key
    b"\x22\x0b10.0.0.1:22"  # 4: local_addr
)

UNKNOWN_FIELD_15 = b"\x78\x01"  # tag (15 << 3) | 0, varint 1


def test_create_session_request_golden() -> None:
    assert CSR.encode() == CSR_BYTES
    assert CSR.encode().hex() == (
        "0a05616c696365"
        "1203686b31"
        "1203686b32"
        "1a02636b"
        "2210000102030405060708090a0b0c0d0e0f"
        "28ac02"
        "320570726f6f66"
    )
    assert wire.CreateSessionRequest.decode(CSR_BYTES) == CSR


def test_create_session_response_golden() -> None:
    assert CSRESP.encode() == CSRESP_BYTES
    assert wire.CreateSessionResponse.decode(CSRESP_BYTES) == CSRESP


def test_auth_request_golden() -> None:
    assert AUTH.encode() == AUTH_BYTES
    assert wire.AuthRequest.decode(AUTH_BYTES) == AUTH


def test_default_fields_are_omitted() -> None:
    assert wire.CreateSessionRequest(host_user="u").encode() == b"\n\x01u"
    assert wire.CreateSessionRequest(host_user="").encode() == b""
    assert wire.CreateSessionResponse("s", "", "").encode() == b"\x0a\x01s"
    assert wire.AuthRequest("", "", b"").encode() == b""
    assert wire.CreateSessionRequest.decode(b"") == wire.CreateSessionRequest(host_user="")


@pytest.mark.parametrize(
    ("cls", "payload", "expected"),
    [
        (wire.CreateSessionRequest, CSR_BYTES, CSR),
        (wire.CreateSessionResponse, CSRESP_BYTES, CSRESP),
        (wire.AuthRequest, AUTH_BYTES, AUTH),
    ],
)
def test_unknown_fields_are_ignored(cls, payload: bytes, expected) -> None:
    assert cls.decode(payload + UNKNOWN_FIELD_15) == expected
    # An unknown length-delimited field (16, wire type 2) in the middle is skipped too.
    assert cls.decode(b"\x82\x01\x03xyz" + payload) == expected


@pytest.mark.parametrize(
    "cls", [wire.CreateSessionRequest, wire.CreateSessionResponse, wire.AuthRequest]
)
@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff", b"\x0a\x05ab", b"\x00", b"\x28", b"\x0a\x01\xff"],
)
def test_decode_garbage_raises(cls, garbage: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        cls.decode(garbage)


# --- Proofs ---------------------------------------------------------------------------------


def test_proof_payload_golden() -> None:
    expected = (
        b"\x00\x00\x00\x11upterm-session-v1"
        + b"\x00\x00\x00\x20"
        + b"H" * 32
        + b"\x00\x00\x00\x10"
        + bytes(range(16))
        + b"\x00\x00\x00\x00\x00\x00\x00\x07"
    )
    assert wire.proof_payload(b"H" * 32, bytes(range(16)), 7) == expected


def test_proof_payload_generation_is_uint64() -> None:
    payload = wire.proof_payload(b"", b"", 0x0102030405060708)
    assert payload.endswith(b"\x00\x00\x00\x00" * 2 + b"\x01\x02\x03\x04\x05\x06\x07\x08")


def test_sign_proof_deterministic_and_verifies() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    payload = wire.proof_payload(b"H" * 32, bytes(range(16)), 7)
    sig = wire.sign_proof(key, payload)
    assert sig[:19] == b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x40"
    assert len(sig) == 19 + 64
    key.public_key().verify(sig[19:], payload)  # raises InvalidSignature if wrong
    assert wire.sign_proof(key, payload) == sig


def _valid_request(**over) -> wire.CreateSessionRequest:
    fields = {
        "host_user": "u",
        "host_public_keys": (_line(_fixed_key(1)),),
        "session_secret": bytes(16),
        "generation": 1,
    }
    fields.update(over)
    return wire.CreateSessionRequest(**fields)


def test_check_proof_fields_accepts_and_returns_key() -> None:
    key = wire.check_proof_fields(_valid_request())
    assert key.blob == _blob(_fixed_key(1))


@pytest.mark.parametrize(
    "over",
    [
        {"host_public_keys": ()},
        {"host_public_keys": (_line(_fixed_key(1)), _line(_fixed_key(2)))},
        {"session_secret": bytes(15)},
        {"session_secret": bytes(17)},
        {"session_secret": b""},
        {"generation": 0},
        {"host_public_keys": (b"",)},
        {"host_public_keys": (b"garbage",)},
    ],
)
def test_check_proof_fields_refuses(over) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.check_proof_fields(_valid_request(**over))
    assert str(info.value).startswith("upterm: session proof refused")


# --- Banners --------------------------------------------------------------------------------


def test_banners() -> None:
    assert wire.relay_banner("1.2.3") == "SSH-2.0-uptermd-1.2.3"
    assert wire.parse_relay_banner(wire.relay_banner("1.2.3")) == "1.2.3"
    assert wire.parse_relay_banner("SSH-2.0-uptermd-v0.14.3\r\n") == "v0.14.3"
    assert wire.parse_relay_banner("SSH-2.0-OpenSSH_9.2") is None
    assert wire.parse_relay_banner("SSH-2.0-uptermd-") is None
    assert wire.HOST_CLIENT_VERSION == "SSH-2.0-upterm-host-client"


# --- Guest certificates ---------------------------------------------------------------------

NOW = 1_000_000
RELAY = _fixed_key(0)


def _read_string(data: bytes, off: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", data, off)
    return data[off + 4 : off + 4 + n], off + 4 + n


def _parse_ed25519_cert(blob: bytes) -> dict[str, object]:
    """Walk an ssh-ed25519-cert-v01@openssh.com blob (OpenSSH PROTOCOL.certkeys)."""
    out: dict[str, object] = {}
    off = 0
    out["type"], off = _read_string(blob, off)
    out["nonce"], off = _read_string(blob, off)
    out["pk"], off = _read_string(blob, off)
    (out["serial"],) = struct.unpack_from(">Q", blob, off)
    off += 8
    (out["cert_type"],) = struct.unpack_from(">I", blob, off)
    off += 4
    out["key_id"], off = _read_string(blob, off)
    out["principals"], off = _read_string(blob, off)
    (out["valid_after"],) = struct.unpack_from(">Q", blob, off)
    off += 8
    (out["valid_before"],) = struct.unpack_from(">Q", blob, off)
    off += 8
    out["critical_options"], off = _read_string(blob, off)
    out["extensions"], off = _read_string(blob, off)
    out["reserved"], off = _read_string(blob, off)
    out["signature_key"], off = _read_string(blob, off)
    out["signature"], off = _read_string(blob, off)
    assert off == len(blob), "trailing bytes after the signature"
    return out


def _cert_blob(line: bytes) -> bytes:
    alg, b64 = line.split()[:2]
    assert alg == b"ssh-ed25519-cert-v01@openssh.com"
    return base64.b64decode(b64)


def _guest_cert(key: ed25519.Ed25519PrivateKey = RELAY, now: int = NOW) -> bytes:
    return _cert_blob(
        wire.build_guest_certificate(key, principal="tok", key_id=b"kid", auth=AUTH, now=now)
    )


def test_guest_certificate_layout() -> None:
    cert = _parse_ed25519_cert(_guest_cert())
    assert cert["type"] == b"ssh-ed25519-cert-v01@openssh.com"
    assert cert["pk"] == _raw_pub(RELAY)
    assert cert["cert_type"] == 1  # SSH_CERT_TYPE_USER
    assert cert["key_id"] == b"kid"
    assert cert["principals"] == b"\x00\x00\x00\x03tok"
    assert cert["valid_after"] == NOW - 60
    assert cert["valid_before"] == NOW + 60
    assert cert["critical_options"] == b""
    inner = AUTH_BYTES
    n = len(inner)
    assert cert["extensions"] == (
        b"\x00\x00\x00\x13upterm-auth-request"
        + struct.pack(">I", n + 4)
        + struct.pack(">I", n)
        + inner
    )
    assert cert["reserved"] == b""
    assert cert["signature_key"] == _blob(RELAY)
    sig = cert["signature"]
    assert isinstance(sig, bytes)
    assert sig[:19] == b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x40"


def test_guest_certificate_valid_after_clamped_at_zero() -> None:
    cert = _parse_ed25519_cert(_guest_cert(now=10))
    assert cert["valid_after"] == 0
    assert cert["valid_before"] == 70


def test_verify_guest_certificate_accepts() -> None:
    got = wire.verify_guest_certificate(_guest_cert(), _blob(RELAY), "tok", NOW)
    assert got.auth == AUTH
    assert got.certified_blob == _blob(RELAY)
    assert got.signer_blob == _blob(RELAY)
    assert got.principals == ("tok",)
    assert got.key_id == b"kid"
    assert (got.valid_after, got.valid_before) == (NOW - 60, NOW + 60)


@pytest.mark.parametrize("now", [NOW - 60, NOW + 59])
def test_verify_guest_certificate_window_edges_accepted(now: int) -> None:
    wire.verify_guest_certificate(_guest_cert(), _blob(RELAY), "tok", now)


@pytest.mark.parametrize("now", [NOW - 61, NOW + 60, NOW + 3600, 0])
def test_verify_guest_certificate_refuses_outside_window(now: int) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_guest_cert(), _blob(RELAY), "tok", now)


def test_verify_guest_certificate_refuses_other_trusted_signer() -> None:
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_guest_cert(), _blob(_fixed_key(5)), "tok", NOW)


def test_verify_guest_certificate_refuses_other_principal() -> None:
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_guest_cert(), _blob(RELAY), "tok2", NOW)
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_guest_cert(), _blob(RELAY), "", NOW)


def test_verify_guest_certificate_refuses_self_signed_forgery() -> None:
    # An attacker mints the same kind of certificate with its own key.
    forged = _guest_cert(key=_fixed_key(9))
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(forged, _blob(RELAY), "tok", NOW)


def test_verify_guest_certificate_refuses_relay_key_certified_by_other_ca() -> None:
    # The relay's public key, certified (with the extension) by a CA that is not the relay.
    other_ca = _fixed_key(7)
    cert = (
        SSHCertificateBuilder()
        .public_key(RELAY.public_key())
        .serial(1)
        .type(SSHCertificateType.USER)
        .key_id(b"kid")
        .valid_principals([b"tok"])
        .valid_after(NOW - 60)
        .valid_before(NOW + 60)
        .add_extension(b"upterm-auth-request", AUTH.encode())
        .sign(other_ca)
    )
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_cert_blob(cert.public_bytes()), _blob(RELAY), "tok", NOW)


def test_verify_guest_certificate_refuses_tampered_body() -> None:
    blob = bytearray(_guest_cert())
    i = blob.index(b"kid")
    blob[i : i + 3] = b"KID"
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(bytes(blob), _blob(RELAY), "tok", NOW)


def test_verify_guest_certificate_refuses_missing_extension() -> None:
    cert = (
        SSHCertificateBuilder()
        .public_key(RELAY.public_key())
        .serial(1)
        .type(SSHCertificateType.USER)
        .key_id(b"kid")
        .valid_principals([b"tok"])
        .valid_after(NOW - 60)
        .valid_before(NOW + 60)
        .add_extension(b"permit-pty", b"")
        .sign(RELAY)
    )
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_cert_blob(cert.public_bytes()), _blob(RELAY), "tok", NOW)


def test_verify_guest_certificate_refuses_host_certificate() -> None:
    cert = (
        SSHCertificateBuilder()
        .public_key(RELAY.public_key())
        .serial(1)
        .type(SSHCertificateType.HOST)
        .key_id(b"kid")
        .valid_principals([b"tok"])
        .valid_after(NOW - 60)
        .valid_before(NOW + 60)
        .add_extension(b"upterm-auth-request", AUTH.encode())
        .sign(RELAY)
    )
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(_cert_blob(cert.public_bytes()), _blob(RELAY), "tok", NOW)


@pytest.mark.parametrize("blob", [b"", b"\x00\x00\x00\x05abc", _blob(RELAY), b"\xff" * 40])
def test_verify_guest_certificate_refuses_non_certificates(blob: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.verify_guest_certificate(blob, _blob(RELAY), "tok", NOW)


# --- Public key lines -----------------------------------------------------------------------


def test_parse_public_key_line_with_options() -> None:
    b64 = UPSTREAM_KEY.split()[1]
    line = f'from="1.2.3.4",command="echo hi there" ssh-ed25519 {b64} my comment'
    key = wire.parse_public_key_line(line)
    assert key is not None
    assert key.blob == base64.b64decode(b64)
    assert key.algorithm == "ssh-ed25519"
    assert key.comment == "my comment"
    assert wire.parse_public_key_line(line.encode()) == key


def test_parse_public_key_line_plain() -> None:
    key = wire.parse_public_key_line(UPSTREAM_KEY + "\n")
    assert key is not None
    assert key.comment == ""
    assert key.authorized_key_line() == UPSTREAM_KEY.encode() + b"\n"


@pytest.mark.parametrize("line", ["", "   ", "\n", "# a comment", "   # indented comment"])
def test_parse_public_key_line_blank_and_comments(line: str) -> None:
    assert wire.parse_public_key_line(line) is None


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "ssh-ed25519",
        "ssh-ed25519 !!!notbase64",
        "ssh-rsa " + UPSTREAM_KEY.split()[1],  # algorithm does not match the blob
        "ssh-ed25519 AAAA",
    ],
)
def test_parse_public_key_line_garbage(line: str) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.parse_public_key_line(line)


def test_parse_public_keys_document() -> None:
    doc = f"# keys\n\n{UPSTREAM_KEY} one\n{_line(RELAY).decode()} two\n"
    keys = wire.parse_public_keys(doc)
    assert [k.comment for k in keys] == ["one", "two"]
    assert keys[1].blob == _blob(RELAY)


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    path = tmp_path / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@test", "-f", str(path)],
        check=True,
    )
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(path) + ".pub"], check=True, capture_output=True, text=True
    ).stdout.split()
    key = wire.parse_public_key_line((tmp_path / "id.pub").read_text())
    assert key is not None
    assert out[1].startswith("SHA256:")
    assert key.fingerprint == out[1]
    assert key.comment == "me@test"
    line = key.authorized_key_line()
    assert line.endswith(b"\n")
    assert line == b" ".join((tmp_path / "id.pub").read_bytes().split()[:2]) + b"\n"


def test_certificate_with_critical_options_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519 as _ed
    from cryptography.hazmat.primitives.serialization import (
        SSHCertificateBuilder,
        SSHCertificateType,
    )

    from upterm import sshcert

    ca = _ed.Ed25519PrivateKey.generate()
    cert = (
        SSHCertificateBuilder()
        .public_key(ca.public_key())
        .serial(1)
        .type(SSHCertificateType.USER)
        .key_id(b"x")
        .valid_principals([b"tok"])
        .valid_after(0)
        .valid_before(2**63)
        .add_critical_option(b"force-command", b"/bin/true")
        .sign(ca)
    )
    blob = base64.b64decode(cert.public_bytes().split()[1])
    with pytest.raises(RemoteProtocolError, match="critical options"):
        sshcert.parse(blob)
