"""upterm/adminproto.py: framing under any split, limits, and schema validation."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upterm import adminproto as ap
from upterm.errors import LocalProtocolError, RemoteProtocolError

KNOWN_TYPES = ["hello", "create", "accept", "list", "info", "attach", "stop", "input", "resize"]
FIELD_NAMES = [
    "id",
    "version",
    "argv",
    "env",
    "cwd",
    "term",
    "cols",
    "rows",
    "server",
    "authorized_keys",
    "accept",
    "known_hosts",
    "session",
    "primary",
    "stream",
    "data",
]

# Values that survive a msgpack round trip unchanged (no floats: NaN != NaN; no tuples).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
messages = st.dictionaries(st.text(max_size=10), values, max_size=6)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- Framing --------------------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    frame = ap.encode_frame({"type": "list", "id": 1})
    body = b"\x82\xa4type\xa4list\xa2id\x01"
    assert frame == b"\x00\x00\x00\x0f" + body
    assert frame == _frame(body)


def test_encode_frame_bytes_are_bin_and_str_is_str() -> None:
    frame = ap.encode_frame({"d": b"\x00", "s": "x"})
    assert frame[4:] == b"\x82\xa1d\xc4\x01\x00\xa1s\xa1x"


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(messages, max_size=8), data=st.data())
def test_any_split_yields_messages_in_order(
    msgs: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = b"".join(ap.encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert b"".join(pieces) == stream
    dec = ap.FrameDecoder()
    got: list[Any] = []
    for piece in pieces:
        got.extend(dec.feed(piece))
    assert got == msgs
    assert dec.pending == 0


def test_byte_by_byte() -> None:
    msgs = [{"type": "list", "id": 1}, {"type": "output", "stream": 2, "data": b"\x00\xff"}]
    stream = b"".join(ap.encode_frame(m) for m in msgs)
    dec = ap.FrameDecoder()
    got: list[Any] = []
    for i in range(len(stream)):
        got.extend(dec.feed(stream[i : i + 1]))
    assert got == msgs


@given(msg=messages, data=st.data())
def test_truncated_frame_yields_nothing(msg: dict[str, Any], data: st.DataObject) -> None:
    frame = ap.encode_frame(msg)
    n = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    dec = ap.FrameDecoder()
    assert list(dec.feed(frame[:n])) == []
    assert dec.pending == n
    assert list(dec.feed(frame[n:])) == [msg]
    assert dec.pending == 0


def test_empty_frame_is_bad_frame() -> None:
    got = list(ap.FrameDecoder().feed(b"\x00\x00\x00\x00"))
    assert len(got) == 1
    assert isinstance(got[0], ap.BadFrame)


def test_oversized_header_raises_before_body() -> None:
    dec = ap.FrameDecoder()
    with pytest.raises(ap.FrameTooLarge):
        list(dec.feed(struct.pack(">I", ap.MAX_FRAME_BYTES + 1)))
    assert issubclass(ap.FrameTooLarge, RemoteProtocolError)


def test_oversized_header_after_good_frame() -> None:
    dec = ap.FrameDecoder()
    it = dec.feed(ap.encode_frame({"a": 1}) + b"\xff\xff\xff\xff")
    assert next(it) == {"a": 1}
    with pytest.raises(ap.FrameTooLarge):
        next(it)


def test_max_size_header_is_not_refused() -> None:
    dec = ap.FrameDecoder()
    assert list(dec.feed(struct.pack(">I", ap.MAX_FRAME_BYTES))) == []
    assert dec.pending == 4


def test_encode_frame_limit_edges() -> None:
    # fixmap(1) + fixstr "data" (5) + bin32 header (5) = 11 bytes of overhead.
    at_limit = {"data": b"x" * (ap.MAX_FRAME_BYTES - 11)}
    frame = ap.encode_frame(at_limit)
    assert len(frame) == 4 + ap.MAX_FRAME_BYTES
    assert list(ap.FrameDecoder().feed(frame)) == [at_limit]
    with pytest.raises(LocalProtocolError):
        ap.encode_frame({"data": b"x" * (ap.MAX_FRAME_BYTES - 10)})


def test_smaller_decoder_limit() -> None:
    dec = ap.FrameDecoder(max_frame=8)
    with pytest.raises(ap.FrameTooLarge):
        list(dec.feed(ap.encode_frame({"data": b"123456789"})))


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_body_never_raises(body: bytes) -> None:
    got = list(ap.FrameDecoder().feed(_frame(body)))
    assert len(got) == 1
    assert isinstance(got[0], dict | ap.BadFrame)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([1, 2]),
        msgpack.packb("str"),
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"a": 1}) + b"\x01",  # trailing data
        b"\xc1",  # never-used byte
        b"\x82\xa1a",  # truncated map
    ],
)
def test_bad_bodies_are_bad_frames_and_stream_goes_on(body: bytes) -> None:
    dec = ap.FrameDecoder()
    got = list(dec.feed(_frame(body) + ap.encode_frame({"ok": True})))
    assert len(got) == 2
    assert isinstance(got[0], ap.BadFrame)
    assert got[1] == {"ok": True}


# --- parse_request --------------------------------------------------------------------------

fields_st = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), values, max_size=8)


def _check_parse(obj: dict[str, Any]) -> None:
    try:
        got = ap.parse_request(obj)
    except RemoteProtocolError:
        return
    assert isinstance(
        got,
        ap.Hello
        | ap.CreateSession
        | ap.Accept
        | ap.ListSessions
        | ap.Info
        | ap.Attach
        | ap.Stop
        | ap.Input
        | ap.Resize
        | ap.UnknownType,
    )


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=8), values, max_size=8))
def test_parse_request_arbitrary_dicts(obj: dict[str, Any]) -> None:
    _check_parse(obj)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KNOWN_TYPES), obj=fields_st)
def test_parse_request_known_types_random_fields(kind: str, obj: dict[str, Any]) -> None:
    _check_parse({**obj, "type": kind})


def _well_typed_values() -> st.SearchStrategy[Any]:
    return (
        st.integers(min_value=-2, max_value=10_002)
        | st.text(max_size=5)
        | st.binary(max_size=5)
        | st.booleans()
        | st.none()
        | st.lists(st.text(max_size=3) | st.integers(), max_size=3)
        | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=3)
    )


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(KNOWN_TYPES),
    obj=st.dictionaries(st.sampled_from(FIELD_NAMES), _well_typed_values(), max_size=12),
)
def test_parse_request_nearly_valid(kind: str, obj: dict[str, Any]) -> None:
    _check_parse({**obj, "type": kind})


def test_missing_type() -> None:
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"id": 1})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": None, "id": 1})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": 5, "id": 1})


def test_unknown_type() -> None:
    assert ap.parse_request({"type": "frobnicate", "id": 7}) == ap.UnknownType(7, "frobnicate")
    assert ap.parse_request({"type": "frobnicate"}) == ap.UnknownType(None, "frobnicate")
    assert ap.parse_request({"type": "x", "id": True}) == ap.UnknownType(None, "x")
    assert ap.parse_request({"type": "y" * 100, "id": 1}) == ap.UnknownType(1, "y" * 64)


def test_hello_and_list() -> None:
    assert ap.parse_request({"type": "hello", "id": 0, "version": 1}) == ap.Hello(0, 1)
    assert ap.parse_request({"type": "list", "id": 2**53}) == ap.ListSessions(2**53)


@pytest.mark.parametrize("bad_id", [True, False, -1, 2**53 + 1, "1", 1.0, None])
def test_bad_ids_rejected(bad_id: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "list", "id": bad_id})


def test_bool_is_not_an_int_anywhere() -> None:
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "resize", "stream": 1, "cols": True, "rows": 24})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "input", "stream": False, "data": b""})


def _create(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "type": "create",
        "id": 3,
        "argv": ["bash", "-l"],
        "env": {"A": "b"},
        "cwd": "/tmp",
        "cols": 80,
        "rows": 24,
    }
    obj.update(over)
    return obj


def test_create_parsed_with_defaults() -> None:
    got = ap.parse_request(_create())
    assert got == ap.CreateSession(
        id=3,
        argv=("bash", "-l"),
        env={"A": "b"},
        cwd="/tmp",
        term="xterm-256color",
        cols=80,
        rows=24,
        server=None,
        authorized_keys=(),
        accept=False,
        known_hosts=None,
    )


def test_create_all_fields_and_unknown_extra_fields_ignored() -> None:
    got = ap.parse_request(
        _create(
            term="screen",
            server="ssh://uptermd.upterm.dev:22",
            authorized_keys=["ssh-ed25519 AAAA x"],
            accept=True,
            known_hosts="/k",
            future_field={"x": [1, 2]},
            another=b"\x00",
        )
    )
    assert isinstance(got, ap.CreateSession)
    assert got.term == "screen"
    assert got.server == "ssh://uptermd.upterm.dev:22"
    assert got.authorized_keys == ("ssh-ed25519 AAAA x",)
    assert got.accept is True
    assert got.known_hosts == "/k"


@pytest.mark.parametrize(
    "over",
    [
        {"argv": []},
        {"argv": None},
        {"argv": [1]},
        {"argv": "bash"},
        {"cols": 0},
        {"rows": 0},
        {"rows": 10_001},
        {"cols": 10_001},
        {"cols": -1},
        {"cols": "80"},
        {"cols": None},
        {"env": {"A": 1}},
        {"env": ["A=b"]},
        {"cwd": None},
        {"cwd": 5},
        {"accept": 1},
        {"authorized_keys": "ssh-ed25519 AAAA"},
        {"argv": ["x" * (ap.MAX_STRING_CHARS + 1)]},
        {"argv": ["x"] * (ap.MAX_LIST_ITEMS + 1)},
        {"term": "t" * (ap.MAX_STRING_CHARS + 1)},
    ],
)
def test_create_rejects(over: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        ap.parse_request(_create(**over))


def test_dims_edges_accepted() -> None:
    got = ap.parse_request(_create(cols=1, rows=10_000))
    assert isinstance(got, ap.CreateSession)
    assert (got.cols, got.rows) == (1, 10_000)


def test_attach() -> None:
    base = {"type": "attach", "id": 4, "session": "abc", "cols": 80, "rows": 24}
    assert ap.parse_request(base) == ap.Attach(4, "abc", 80, 24, primary=False)
    assert ap.parse_request({**base, "primary": True}) == ap.Attach(4, "abc", 80, 24, True)
    assert ap.parse_request({**base, "session": None}) == ap.Attach(4, None, 80, 24)
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({**base, "primary": "yes"})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({**base, "rows": 10_001})


def test_accept_info_stop() -> None:
    assert ap.parse_request({"type": "accept", "id": 1, "session": "s"}) == ap.Accept(1, "s")
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "accept", "id": 1})
    assert ap.parse_request({"type": "info", "id": 1}) == ap.Info(1, None)
    assert ap.parse_request({"type": "stop", "id": 1, "session": "s"}) == ap.Stop(1, "s")
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "stop", "id": 1, "session": 3})


def test_input() -> None:
    chunk = b"x" * ap.MAX_DATA_CHUNK_BYTES
    assert ap.parse_request({"type": "input", "stream": 5, "data": chunk}) == ap.Input(5, chunk)
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "input", "stream": 5, "data": chunk + b"x"})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "input", "stream": 5, "data": "text"})
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({"type": "input", "data": b"x"})


def test_resize() -> None:
    msg = {"type": "resize", "stream": 2, "cols": 100, "rows": 50}
    assert ap.parse_request(msg) == ap.Resize(2, 100, 50)
    with pytest.raises(RemoteProtocolError):
        ap.parse_request({**msg, "cols": 0})


def test_request_id_of() -> None:
    assert ap.request_id_of({"id": 9}) == 9
    assert ap.request_id_of({"id": True}) is None
    assert ap.request_id_of({"id": -1}) is None
    assert ap.request_id_of({"id": "9"}) is None
    assert ap.request_id_of({}) is None


# --- Replies --------------------------------------------------------------------------------


def test_reply_shapes() -> None:
    assert ap.ok(3) == {"type": "ok", "id": 3}
    assert ap.ok(3, session={"sessionId": "x"}, warnings=[]) == {
        "type": "ok",
        "id": 3,
        "session": {"sessionId": "x"},
        "warnings": [],
    }
    assert ap.error(None, "bad_frame", "m") == {
        "type": "error",
        "id": None,
        "code": "bad_frame",
        "message": "m",
    }
    assert ap.error(4, "not_found", "no") == {
        "type": "error",
        "id": 4,
        "code": "not_found",
        "message": "no",
    }
    assert ap.output(2, b"hi") == {"type": "output", "stream": 2, "data": b"hi"}
    assert ap.exited(2, 130) == {"type": "exit", "stream": 2, "status": 130}


def test_replies_survive_framing() -> None:
    msgs = [ap.ok(1, x=1), ap.error(None, "c", "m"), ap.output(1, b"\x00"), ap.exited(1, 0)]
    stream = b"".join(ap.encode_frame(m) for m in msgs)
    assert list(ap.FrameDecoder().feed(stream)) == msgs


@given(data=st.binary(max_size=3 * 1024), size=st.integers(min_value=1, max_value=1024))
def test_chunks_small(data: bytes, size: int) -> None:
    parts = list(ap.chunks(data, size))
    assert b"".join(parts) == data
    assert all(0 < len(p) <= size for p in parts)


def test_chunks_default_size() -> None:
    data = bytes(range(256)) * 600  # 153600 bytes
    parts = list(ap.chunks(data))
    assert [len(p) for p in parts] == [65536, 65536, 22528]
    assert b"".join(parts) == data
    assert list(ap.chunks(b"")) == []
    assert list(ap.chunks(b"x" * 65536)) == [b"x" * 65536]
