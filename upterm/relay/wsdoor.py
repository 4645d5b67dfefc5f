"""uptermd's WebSocket listener: HTTP first, then SSH in WebSocket frames.

Each accepted connection passes the same gate as the SSH listener's (per-source caps,
penalties, the handshake deadline, fair turns on the event loop); behind the gate a
:class:`WebSocketDoor` reads one HTTP request:

- ``GET /health``: ``OK`` (load balancers; not penalised).
- Behind a trusted HTTP proxy (``--ws-forwarded-from``): the client address comes from
  ``X-Forwarded-For`` and is judged once the head is read (see :meth:`Gate.forwarded`).
- ``GET /`` or ``/getting-started``: a short plain-text page saying how to join.
- ``GET /join``, ``/assets/...`` and the upgrade at ``/join/ws``: browser joiners
  (upterm.relay.web), their upgrade refused unless ``Origin`` is this origin.
- anything else: upstream's upgrade, which needs ``Upterm-Client-Version`` and Basic auth
  carrying the token (``user:password`` = session id and node). A joiner's token must name a
  session on this node: any other is refused before the upgrade, and nothing is ever dialled
  for it. After ``101`` the connection is the same asyncssh server as the SSH listener's,
  its bytes carried in binary messages (upterm.wsproto frames them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from upterm import wire, wsproto
from upterm.relay.gate import GATE_INFO, GatedListener
from upterm.relay.policy import Refusal
from upterm.relay.web import WS_PATH, WebJoiner, WebService, same_origin
from upterm.wsconn import WebSocketCarrier

log = logging.getLogger(__name__)

#: Upstream's texts for a bad upgrade (HTTP 400).
MISSING_VERSION = "missing upterm client version"
BASIC_AUTH_FAILED = "basic auth failed"


def getting_started(host: str) -> str:
    """The plain-text page at ``/``: how to host and join over WebSocket."""
    host = host if host.isprintable() and " " not in host else "YOUR_SERVER"
    return (
        "upterm relay (uptermd): terminal sharing over SSH, here over WebSocket.\n\n"
        "1. Host a terminal:\n"
        f"     upterm host --server wss://{host} -- YOUR_COMMAND\n"
        "2. Give the join line it prints to whoever joins.\n"
        "3. Join from any SSH client, through this WebSocket listener:\n"
        f"     ssh -o ProxyCommand='upterm proxy wss://TOKEN@{host}' TOKEN@{host}:443\n"
    )


class WebSocketDoor(WebSocketCarrier):
    """One gated connection of the WebSocket listener (see the module docstring)."""

    def __init__(
        self,
        ssh_factory: Callable[[], asyncio.Protocol],
        refuse_user: Callable[[str, bool], str | None],
        web: WebService | None = None,
        peer: str = "",
    ) -> None:
        super().__init__(client=False)
        self._ssh_factory = ssh_factory
        self._refuse_user = refuse_user
        self._web_service = web
        self._peer = peer
        #: A browser joiner, once its upgrade at /join/ws was accepted.
        self._web: WebJoiner | None = None
        #: The request came from a web page (it has an Origin).
        self._from_page = False

    def refused(self, exc: wsproto.HandshakeError) -> None:
        # A request with an Origin comes from a web page, which any site can make a
        # visitor's browser send: penalising it would let that site lock its visitors out
        # of this relay. upterm's own clients never send one.
        self._answer(exc.status, exc.text + "\n", penalise=not self._from_page)

    # -- HTTP --

    def handshake(self, head: wsproto.Head, rest: bytes) -> None:
        self._from_page = bool(head.header("origin"))
        _method, target, _ = head.start
        try:
            path = urlsplit(target).path
        except ValueError:  # e.g. "//[": an unclosed IPv6 bracket
            raise wsproto.HandshakeError(400, "upterm: malformed request target") from None
        upgrade = head.has_token("upgrade", "websocket")
        if path == "/health" and not upgrade:
            self._answer(200, "OK", penalise=False)
            return
        if (path == "/" or path.startswith("/getting-started")) and not upgrade:
            self._answer(200, getting_started(head.header("host")), penalise=False)
            return
        web = self._web_service
        if web is not None and not upgrade:
            page = web.response(path, head)
            if page is not None:
                self._send_raw(page)
                return
        gate = self._transport.get_extra_info(GATE_INFO) if self._transport else None
        if gate is not None and gate.deferred:
            # From a trusted HTTP proxy: the client is who X-Forwarded-For says, and is
            # judged (caps, penalties) only now.
            refusal = gate.forwarded(head.header("x-forwarded-for"))
            if refusal is not None:
                self._answer(429, f"upterm: {refusal.message}\n", penalise=False)
                return
        if path == WS_PATH:
            self._start_web(head, rest)
            return
        version = head.header("upterm-client-version")
        if not version:
            raise wsproto.HandshakeError(400, MISSING_VERSION)
        user = _basic_user(head.header("authorization"))
        if user is None:
            raise wsproto.HandshakeError(400, BASIC_AUTH_FAILED)
        key = wsproto.check_upgrade(head)
        refusal = self._refuse_user(user, version == wire.HOST_CLIENT_VERSION)
        if refusal is not None:
            raise wsproto.HandshakeError(404, refusal)
        assert self._transport is not None
        self._transport.write(wsproto.upgrade_response(key))
        self.start_ssh(self._ssh_factory(), rest)

    def _answer(self, status: int, body: str, *, penalise: bool) -> None:
        """Answer a plain HTTP request and close (a health check costs no penalty)."""
        self._send_raw(wsproto.http_response(status, body), penalise=penalise)

    def _send_raw(self, response: bytes, *, penalise: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        if not penalise:
            gate = transport.get_extra_info(GATE_INFO)
            if gate is not None:
                gate.no_penalty = True
        self.closed = True
        with contextlib.suppress(Exception):
            transport.write(response)
        transport.close()

    # -- browser joiners --

    def _start_web(self, head: wsproto.Head, rest: bytes) -> None:
        web = self._web_service
        if web is None or not web.available:
            raise wsproto.HandshakeError(404, "this relay serves no web page")
        key = wsproto.check_upgrade(head)
        if not same_origin(head.header("origin"), head.header("host")):
            raise wsproto.HandshakeError(403, "the page must be this relay's own (Origin)")
        transport = self._transport
        assert transport is not None
        gate = transport.get_extra_info(GATE_INFO)

        def authenticated(ok: bool | None) -> None:
            if gate is None:
                return
            if ok:
                gate.auth_completed()
            elif ok is None:
                gate.no_penalty = True
            else:
                gate.auth_attempted = True

        def close() -> None:
            self.closed = True
            transport.close()

        def abort() -> None:
            self.closed = True
            transport.abort()

        def pause_input(paused: bool) -> None:
            if paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

        self._web = WebJoiner(
            web,
            gate.addr if gate is not None else self._peer,
            send=transport.write,
            close=close,
            abort=abort,
            pause_input=pause_input,
            buffered=transport.get_write_buffer_size,
            authenticated=authenticated,
        )
        transport.write(wsproto.upgrade_response(key))
        if rest:
            self._web.feed(rest)

    def data_received(self, data: bytes) -> None:
        if self._web is not None:
            self._web.feed(data)
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._web is not None:
            self._web.connection_lost()
        super().connection_lost(exc)

    def resume_writing(self) -> None:
        if self._web is not None:
            self._web.writable()
        super().resume_writing()


def _basic_user(header: str) -> str | None:
    """``user:password`` from a Basic ``Authorization`` header ("user" alone when the password
    is empty, as upstream's hosts send); None when there is none or it is malformed."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return f"{user}:{password}" if password else user


class WebSocketListener(GatedListener):
    """The WebSocket listener: a gated listener whose connections start as HTTP."""

    def __init__(
        self,
        *args: Any,
        refuse_user: Callable[[str, bool], str | None],
        web: WebService | None = None,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self._refuse_user = refuse_user
        self._web = web

    async def create_server(
        self, session_factory: Callable[[str, int], Any], host: str, port: int
    ) -> GatedListener:
        """Bind and accept; each connection gets a :class:`WebSocketDoor` in front of SSH."""
        refuse, web = self._refuse_user, self._web

        def door(peer_host: str, peer_port: int) -> WebSocketDoor:
            return WebSocketDoor(
                lambda: session_factory(peer_host, peer_port), refuse, web, peer_host
            )

        return await super().create_server(door, host, port)

    def refusal_bytes(self, refusal: Refusal) -> bytes:
        """Refusals at this listener's gate (caps, penalties, a bad PROXY header) as HTTP:
        a proxy in front passes them on instead of answering 502."""
        status = 400 if refusal.reason == "proxy-header" else 429
        return wsproto.http_response(status, f"upterm: {refusal.message}\n")
