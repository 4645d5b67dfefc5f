"""Browser joiners: the relay's web page and the WebSocket that carries a browser's view.

A host opts in per session (``upterm host --web``): it declares a web link to the relay
(``upterm-web@upterm.dev``: an id, the SHA-256 of the link's secret, its expiry and a label
naming the host). The link is ``BASE/join#ID.SECRET``; what follows ``#`` never leaves the
browser in a request line, a header or a log, only in the WebSocket's first message.

- ``GET /join``: the page (xterm.js, built by ``scripts/build-web.sh`` into
  ``upterm/relay/webpage/``), with a strict Content-Security-Policy (scripts and connections
  only from this origin, no inline script, no eval, no frames).
- ``GET /assets/...``: its script, style sheet and the bundled packages' licences.
- ``GET /join/ws`` (upgrade): refused unless ``Origin`` is this very origin (a page elsewhere
  cannot open it, nor can a client that sends none). The first message must prove the link
  (``{"type": "auth", "credential": ..., "cols": ..., "rows": ...}``) within the handshake
  deadline. The relay then joins the session as any relayed joiner does (an inner SSH
  connection to the host, a certificate it signs), passing the credential itself in the
  certificate so the host checks the secret too; the host decides everything else (approval,
  role, kick, moderation). Output goes to the browser in binary messages, its typing comes
  back the same way, and ``{"type": "resize"}`` changes the terminal's size.

The relay keeps one link per session and forgets a session's link once the session has been
gone for :data:`GONE_GRACE_S` (a host that redials declares it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncssh

from upterm import sshcompat, wire, wsproto
from upterm.errors import RemoteProtocolError

if TYPE_CHECKING:
    from upterm.relay.server import Relay

log = logging.getLogger(__name__)

#: Where ``scripts/build-web.sh`` puts the page (not in git; in the wheel and the package).
PAGE_DIR = Path(__file__).with_name("webpage")
#: Sent with the page and its assets.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    f"Content-Security-Policy: {CSP}",
    "X-Frame-Options: DENY",
    "Referrer-Policy: no-referrer",
    "Cross-Origin-Opener-Policy: same-origin",
    "Cross-Origin-Resource-Policy: same-origin",
)
_FILES = {
    "/join": ("index.html", "text/html; charset=utf-8"),
    "/assets/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/assets/app.css": ("app.css", "text/css; charset=utf-8"),
    "/assets/LICENSES.txt": ("LICENSES.txt", "text/plain; charset=utf-8"),
}
WS_PATH = "/join/ws"
#: The largest message a browser may send (a paste is split by the page's terminal anyway).
MAX_MESSAGE_BYTES = 64 * 1024
#: Output waiting for a browser beyond this pauses the host's channel.
OUTPUT_HIGH_WATER = 256 * 1024
#: A browser's connection is cut off when this much waits for it: output stops at the
#: high-water mark above (what the host's window had in flight comes after), so only a
#: browser that does not read, or a hostile host's unthrottled requests, gets here.
WRITE_CAP_BYTES = 8 * 1024 * 1024
#: A session's link is kept this long after the session left (its host redials).
GONE_GRACE_S = 600.0
#: For this long after the relay starts, a link it does not know may be one whose host has
#: not redialled yet: the page is told to try again rather than that the link is bad.
RESTART_GRACE_S = 120.0
LINK_TAKEN_TEXT = "upterm: that web link id is taken on this relay; make a new link"
#: Replaced or revoked link ids remembered (to refuse them outright during that grace).
MAX_ENDED_KEPT = 4096
#: Largest terminal a browser may ask for (as the host clamps SSH joiners).
MAX_DIM = 1000

#: WebSocket close codes the page takes as final (no reconnect), and their words.
CLOSE_REFUSED = 4001
CLOSE_ENDED = 4002
CLOSE_REMOVED = 4003
REFUSED_TEXT = "this link is wrong, expired or revoked: ask the host for a new one"
REFUSED_CLUSTER_TEXT = (
    "this link is wrong, expired or revoked, or its session is on another relay node"
)
ENDED_TEXT = "the session ended"
#: Not final: the page tries again (the host is away, or the relay is draining).
CLOSE_TRY_AGAIN = 1013
HOST_AWAY_TEXT = "the host is not connected right now"
RESTARTED_TEXT = (
    "the relay does not know this link yet; if it just restarted, the host is reconnecting"
)


@dataclass
class WebLink:
    """A session's web link as the relay keeps it: no secret, only its digest."""

    session_id: str
    web_id: str
    digest: bytes
    expires: int
    host_label: str
    #: When its session left this node (monotonic); None while it is here.
    gone_at: float | None = None


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` is the page's own: an http(s) origin whose host and
    port are exactly the ``Host`` the request was sent to. A missing, ``null`` or foreign
    origin is not (a page elsewhere cannot open the WebSocket with a visitor's browser)."""
    if not origin or not host:
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.username:
        return False
    default = "443" if parts.scheme == "https" else "80"
    return _host_port(parts.netloc, default) == _host_port(host, default)


def _host_port(netloc: str, default: str) -> str:
    netloc = netloc.strip().lower()
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
        return f"{host}:{port}"
    return f"{netloc}:{default}"


class WebService:
    """The web page and the web links of one relay node."""

    def __init__(self, relay: Relay, base_url: str | None, page_dir: Path = PAGE_DIR) -> None:
        self.relay = relay
        #: ``--web-url``: the page's public base URL (else this listener's own address).
        self._base_url = base_url.rstrip("/") if base_url else None
        self._files: dict[str, tuple[bytes, str]] = {}
        for path, (name, ctype) in _FILES.items():
            with contextlib.suppress(OSError):
                self._files[path] = ((page_dir / name).read_bytes(), ctype)
        # Compressed once, at start: the script is 510 KB, 134 KB gzipped.
        self._gzipped = {p: gzip.compress(b, 9, mtime=0) for p, (b, _) in self._files.items()}
        self._etags = {p: hashlib.sha256(b).hexdigest()[:32] for p, (b, _) in self._files.items()}
        self._links: dict[str, WebLink] = {}
        self._by_session: dict[str, str] = {}
        self._started = time.monotonic()
        #: Ids replaced or revoked here (the latest, bounded): never "may yet come".
        self._ended: dict[str, None] = {}
        #: Links of sessions that left, oldest first (for forgetting them).
        self._gone: dict[str, float] = {}

    @property
    def available(self) -> bool:
        """Whether this relay can serve the page (it was built, and a listener serves it)."""
        return "/join" in self._files and "/assets/app.js" in self._files and bool(self.base_url)

    @property
    def base_url(self) -> str:
        """Where the page is served (no trailing slash); "" without a WebSocket listener."""
        if self._base_url:
            return self._base_url
        port = self.relay.ws_port
        if not port:
            return ""
        host = self.relay.node_addr.rsplit(":", 1)[0] or "127.0.0.1"
        return f"{'https' if self.relay.serves_tls else 'http'}://{host}:{port}"

    def __len__(self) -> int:
        return len(self._links)

    # -- links --

    def declare(self, reg: wire.WebRegistration, now: float | None = None) -> str | None:
        """A host's link for its session (replacing the one before; none: revoked).

        Returns why it is refused: an id another session holds, or one that was replaced
        or revoked here (a host must not take over a link someone else was given)."""
        now = time.monotonic() if now is None else now
        self._forget_gone(now)
        if reg.web_id:
            holder = self._links.get(reg.web_id)
            taken = holder is not None and holder.session_id != reg.session_id
            if taken or reg.web_id in self._ended:
                return LINK_TAKEN_TEXT
        old = self._by_session.pop(reg.session_id, None)
        if old is not None and old != reg.web_id:
            self._links.pop(old, None)
            self._gone.pop(old, None)
            self._ended[old] = None
            while len(self._ended) > MAX_ENDED_KEPT:
                del self._ended[next(iter(self._ended))]
        if not reg.web_id:
            return None
        self._links[reg.web_id] = WebLink(
            reg.session_id, reg.web_id, reg.digest, reg.expires, reg.host_label
        )
        self._by_session[reg.session_id] = reg.web_id
        self._gone.pop(reg.web_id, None)
        return None

    def _link_of(self, session_id: str) -> WebLink | None:
        web_id = self._by_session.get(session_id)
        link = self._links.get(web_id) if web_id is not None else None
        return link if link is not None and link.session_id == session_id else None

    def session_left(self, session_id: str, now: float | None = None) -> None:
        """The session's registration is gone from this node: its link is kept a while."""
        link = self._link_of(session_id)
        if link is None:
            return
        now = time.monotonic() if now is None else now
        link.gone_at = now
        self._gone[link.web_id] = now
        self._forget_gone(now)

    def session_back(self, session_id: str) -> None:
        """The session registered again (its host redialled)."""
        link = self._link_of(session_id)
        if link is not None:
            link.gone_at = None
            self._gone.pop(link.web_id, None)

    def _forget_gone(self, now: float) -> None:
        while self._gone:
            web_id, at = next(iter(self._gone.items()))
            if now - at < GONE_GRACE_S:
                break
            del self._gone[web_id]
            link = self._links.pop(web_id, None)
            if link is not None and self._by_session.get(link.session_id) == web_id:
                del self._by_session[link.session_id]

    def may_come(self, credential: str, now: float | None = None) -> bool:
        """Whether ``credential``, unknown here, may yet be declared: a well-formed link
        shortly after this relay started (its host redials)."""
        now = time.monotonic() if now is None else now
        cred = wire.WebCredential.parse(credential)
        return (
            cred is not None
            and cred.web_id not in self._links
            and cred.web_id not in self._ended
            and now - self._started < RESTART_GRACE_S
        )

    def check(self, credential: str, now: float | None = None) -> WebLink | None:
        """The link ``credential`` proves (its secret matches, it has not expired), or None."""
        cred = wire.WebCredential.parse(credential)
        if cred is None:
            return None
        link = self._links.get(cred.web_id)
        if link is None:
            return None
        if not hmac.compare_digest(link.digest, cred.digest()):
            return None
        if (time.time() if now is None else now) >= link.expires:
            return None
        return link

    # -- HTTP --

    def response(self, path: str, head: wsproto.Head | None = None) -> bytes | None:
        """The page or an asset for ``path`` (None: not one of ours): gzipped for browsers
        that take it, and 304 for one that has it already (the same ETag); every copy is
        checked again (``no-cache``), so an upgraded relay's page is never mixed with an old
        script."""
        if path == "/join/":
            path = "/join"
        found = self._files.get(path)
        if found is None:
            if path in _FILES:
                return wsproto.http_response(
                    404, "upterm: this relay was installed without its web page\n"
                )
            return None
        body, ctype = found
        tag = self._etags[path]
        cache = "no-store" if path == "/join" else "no-cache"
        lines = [f"Cache-Control: {cache}", "Vary: Accept-Encoding", *SECURITY_HEADERS]
        if path != "/join":
            lines.append(f'ETag: "{tag}"')
            if head is not None and f'"{tag}"' in head.header("if-none-match"):
                return _head("304 Not Modified", lines) + b"\r\n"
        if head is not None and _takes_gzip(head.header("accept-encoding")):
            body = self._gzipped[path]
            lines.append("Content-Encoding: gzip")
        lines += [f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
        return _head("200 OK", lines) + b"\r\n" + body


def _head(status: str, lines: list[str]) -> bytes:
    all_lines = [f"HTTP/1.1 {status}", "X-Content-Type-Options: nosniff", "Connection: close"]
    return ("\r\n".join(all_lines + lines) + "\r\n").encode("ascii")


def _takes_gzip(accept: str) -> bool:
    """Whether ``Accept-Encoding`` allows gzip (``q=0`` refuses it)."""
    for item in accept.split(","):
        name, *params = item.strip().split(";")
        if name.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


class WebJoiner:
    """One browser on the WebSocket: proves its link, then carries its view of the session.

    ``send`` writes bytes to the browser's connection, ``close`` ends it, ``pause_input``
    stops or restarts reading from it (while the host's channel is full), ``authenticated``
    tells the gate the link was proven (True), was wrong (False: a penalty) or could not be
    judged yet (None: no penalty).
    """

    def __init__(
        self,
        service: WebService,
        peer: str,
        send: Callable[[bytes], None],
        close: Callable[[], None],
        abort: Callable[[], None],
        pause_input: Callable[[bool], None],
        buffered: Callable[[], int],
        authenticated: Callable[[bool | None], None],
    ) -> None:
        self._service = service
        self._peer = peer
        self._send = send
        self._close_transport = close
        self._abort = abort
        self._pause_input = pause_input
        self._buffered = buffered
        self._authenticated = authenticated
        self.framer = wsproto.Framer(client=False, max_message=MAX_MESSAGE_BYTES)
        self._state = "auth"
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._joined: str | None = None
        self._role = ""
        self._host_label = ""
        self._last_error = b""
        self._removed_text = ""
        self._output_paused = False
        #: Keys typed between the proof and the host's channel opening (a few hundred ms),
        #: passed on once it is open, as an SSH joiner's are; bounded, then reading stops.
        self._early = bytearray()
        #: The last resize asked for meanwhile.
        self._early_size: tuple[int, int] | None = None
        self._early_paused = False
        self.closed = False

    # -- from the browser --

    def feed(self, data: bytes) -> None:
        """Bytes the browser sent."""
        if self.closed:
            return
        try:
            events = self.framer.feed(data)
        except wsproto.FrameError as exc:
            log.info("web joiner %s: %s", self._peer, exc)
            self.close(exc.close_code, str(exc))
            return
        for reply in events.owed(self._buffered()):
            self._write(reply)
        for opcode, payload in events.messages:
            if self.closed:
                return
            self._message(opcode, payload)
        if events.closed is not None and not self.closed:
            self._end()

    def _message(self, opcode: int, payload: bytes) -> None:
        if self._state == "auth":
            self._auth(opcode, payload)
        elif self._chan is None:
            self._hold(opcode, payload)  # before the host's channel opened
        # Below, the host may have closed its channel a moment ago (its close is on the
        # way): what the browser sent then goes nowhere, and nothing escapes this callback.
        elif opcode == wsproto.OP_BINARY:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.write(payload)
        elif opcode == wsproto.OP_TEXT:
            size = _resize_of(payload)
            if size is not None:
                with contextlib.suppress(OSError, asyncssh.Error):
                    self._chan.change_terminal_size(*size)

    def _hold(self, opcode: int, payload: bytes) -> None:
        """Keep what the browser sends before the host's channel opens: its keys (up to
        the relay's pending bound, then its socket is not read until the channel opens)
        and its last size."""
        if opcode == wsproto.OP_BINARY:
            self._early += payload
            if len(self._early) >= self._service.relay.limits.pending_bytes:
                self._early_paused = True
                self._pause_input(True)
        elif opcode == wsproto.OP_TEXT:
            size = _resize_of(payload)
            if size is not None:
                self._early_size = size

    def _auth(self, opcode: int, payload: bytes) -> None:
        msg = _json(payload) if opcode == wsproto.OP_TEXT else None
        credential = msg.get("credential") if msg is not None else None
        size = _size(msg) if msg is not None else None
        if msg is None or msg.get("type") != "auth" or not isinstance(credential, str):
            self._authenticated(None)
            self.close(CLOSE_REFUSED, REFUSED_TEXT)
            return
        link = self._service.check(credential)
        if link is None and self._service.may_come(credential):
            self._authenticated(None)  # no fault of the browser's: no penalty
            self.close(CLOSE_TRY_AGAIN, RESTARTED_TEXT)
            return
        if link is None:
            log.info("web joiner %s: refused a link", self._peer)
            # No penalty: 384 random bits are not guessed, and a penalty would let any web
            # site lock its visitors out of this relay by sending them to a wrong link.
            self._authenticated(None)
            # Links live on the node their host registered with: in a cluster, the load
            # balancer must bring a session's browsers there (docs/operating-uptermd.md).
            clustered = self._service.relay.registry is not None
            self.close(CLOSE_REFUSED, REFUSED_CLUSTER_TEXT if clustered else REFUSED_TEXT)
            return
        self._state = "opening"
        self._host_label = link.host_label
        self._task = asyncio.ensure_future(self._open(link, credential, size or (80, 24)))

    # -- towards the host --

    async def _open(self, link: WebLink, credential: str, size: tuple[int, int]) -> None:
        relay = self._service.relay
        live = relay.live_host(link.session_id)
        if live is None or link.gone_at is not None:
            self._authenticated(True)  # a valid link: no penalty for the host's absence
            self.close(CLOSE_TRY_AGAIN, HOST_AWAY_TEXT)
            return
        reg, host_conn = live
        if not relay.guard.joiners_by_session.take(reg.session_id):
            relay.metrics.refusals.labels(reason="joiners-per-session").inc()
            self._authenticated(True)
            self.close(CLOSE_TRY_AGAIN, f"session {reg.session_id} is full")
            return
        self._joined = reg.session_id
        relay.metrics.joiners.inc()
        self._authenticated(True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        auth = wire.AuthRequest(
            client_version=WEB_CLIENT_VERSION,
            remote_addr=self._peer,
            authorized_key=key.export_public_key().strip(),
        )
        try:
            conn = await relay.open_inner(
                host_conn, reg, reg.session_id, auth, secrets.token_hex(16).encode(), credential
            )
            self._conn = conn
            chan, _ = await conn.create_session(
                lambda: _HostView(self),
                term_type="xterm-256color",
                term_size=(size[0], size[1], 0, 0),
                encoding=None,
                max_pktsize=relay.inner_max_packet_bytes,  # as an SSH joiner's channel
            )
        except asyncio.CancelledError:
            raise
        except asyncssh.PermissionDenied:
            self.close(CLOSE_REFUSED, REFUSED_TEXT)  # the host checked the link itself
            return
        except Exception as exc:
            log.info("web joiner %s could not reach its host: %r", self._peer, exc)
            self.close(CLOSE_TRY_AGAIN, HOST_AWAY_TEXT)
            return
        if self.closed:
            chan.close()
            return
        self._chan = chan
        self._state = "open"
        early, self._early = bytes(self._early), bytearray()
        resize, self._early_size = self._early_size, None
        if self._early_paused:
            # Before the write: if that fills the host's window, its pause must stand.
            self._early_paused = False
            self._pause_input(False)
        with contextlib.suppress(OSError, asyncssh.Error):
            if resize is not None:
                chan.change_terminal_size(*resize)
            if early:
                chan.write(early)

    # -- from the host --

    def output(self, data: bytes, datatype: int | None) -> None:
        """The host's output (and its stderr lines: the terminal shows both)."""
        if self.closed:
            return
        if datatype is not None:
            self._last_error = (self._last_error + data)[-512:]
        self._write(self.framer.binary(data))
        if self.closed:
            return
        if not self._output_paused and self._buffered() > OUTPUT_HIGH_WATER:
            self._output_paused = True
            if self._chan is not None:
                self._chan.pause_reading()

    def writable(self) -> None:
        """The browser's connection drained."""
        if self._output_paused:
            self._output_paused = False
            if self._chan is not None:
                self._chan.resume_reading()

    def input_paused(self, paused: bool) -> None:
        """The host's channel is full (or drained): stop (or go on) reading the browser."""
        if not self.closed:
            self._pause_input(paused)

    def role(self, role: str) -> None:
        """The host says what this joiner may do (first time: it was let in)."""
        if self.closed:
            return
        first, previous = not self._role, self._role
        self._role = role
        if first:
            hello = {"type": "hello", "host": self._host_label, "role": role, "relayed": True}
            self._write(self.framer.text(json.dumps(hello)))
        elif role != previous:
            self._write(self.framer.text(json.dumps({"type": "role", "role": role})))

    def removed_because(self, text: str) -> None:
        """The host says why it removes this joiner (told when the channel closes)."""
        self._removed_text = _last_line(text.encode())

    def host_closed(self, status: int | None) -> None:
        """The host closed the channel: the session ended, or this joiner was removed (or
        refused), which the host says on stderr."""
        text = self._removed_text or _last_line(self._last_error)
        if text:
            self.close(CLOSE_REMOVED, text)
        elif status is not None:
            self.close(CLOSE_ENDED, ENDED_TEXT)
        else:
            self.close(CLOSE_TRY_AGAIN, HOST_AWAY_TEXT)  # the host's connection went

    def _write(self, data: bytes) -> None:
        """Send to the browser; one that lets too much wait (it does not read, or a host
        floods it with what flow control does not hold) is cut off."""
        self._send(data)
        if self._buffered() > WRITE_CAP_BYTES and not self.closed:
            log.info(
                "web joiner %s: cut off, %d bytes waiting for it", self._peer, self._buffered()
            )
            self.closed = True
            self._abort()
            self.connection_lost()

    # -- ending --

    def close(self, code: int, reason: str) -> None:
        """Tell the browser why (a close frame) and end everything of this joiner."""
        if self.closed:
            return
        with contextlib.suppress(Exception):
            self._send(self.framer.close(code, reason))
        self._end()

    def _end(self) -> None:
        self.closed = True
        self._close_transport()
        self.connection_lost()

    def connection_lost(self) -> None:
        """The browser's connection is gone."""
        self.closed = True
        self._early = bytearray()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._joined is not None:
            relay = self._service.relay
            relay.guard.joiners_by_session.give(self._joined)
            relay.metrics.joiners.dec()
            self._joined = None


#: The client version a web joiner has at the host (``session current`` shows it).
WEB_CLIENT_VERSION = "upterm-web"


class _HostView(asyncssh.SSHClientSession[bytes]):
    """The host's side of a web joiner's channel."""

    def __init__(self, joiner: WebJoiner) -> None:
        self._joiner = joiner
        self._status: int | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        # The host says the joiner's role on its channel (ours; other hosts never do).
        sshcompat.on_channel_request(chan, wire.WEB_ROLE_REQUEST, self._role)
        sshcompat.on_channel_request(chan, wire.WEB_REMOVED_REQUEST, self._removed)

    def _role(self, payload: bytes) -> bool:
        raw = _only_string(payload)
        role = raw.decode("ascii", "replace") if raw is not None else ""
        if role not in ("viewer", "typist", "moderator"):
            return False
        self._joiner.role(role)
        return True

    def _removed(self, payload: bytes) -> bool:
        raw = _only_string(payload)
        if raw is None:
            return False
        self._joiner.removed_because(raw[:200].decode("utf-8", "replace"))
        return True

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._joiner.output(data, datatype)

    def pause_writing(self) -> None:
        self._joiner.input_paused(True)

    def resume_writing(self) -> None:
        self._joiner.input_paused(False)

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def connection_lost(self, exc: Exception | None) -> None:
        self._joiner.host_closed(self._status)


def _json(payload: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def _size(msg: dict[str, Any]) -> tuple[int, int] | None:
    cols, rows = msg.get("cols"), msg.get("rows")
    if type(cols) is not int or type(rows) is not int:
        return None
    return max(1, min(cols, MAX_DIM)), max(1, min(rows, MAX_DIM))


def _resize_of(payload: bytes) -> tuple[int, int] | None:
    """The size a page's ``{"type": "resize", ...}`` message asks for (None: not one)."""
    msg = _json(payload)
    return _size(msg) if msg is not None and msg.get("type") == "resize" else None


def _only_string(payload: bytes) -> bytes | None:
    """A channel request's payload that is exactly one SSH string (None: anything else)."""
    try:
        raw, end = wire.read_ssh_string(payload)
    except RemoteProtocolError:
        return None
    return raw if end == len(payload) else None


def _last_line(data: bytes) -> str:
    """The last non-empty line of what the host wrote to stderr, printable, short."""
    for raw in reversed(data.decode("utf-8", "replace").splitlines()):
        line = "".join(ch for ch in raw if ch.isprintable()).strip().strip("[]").strip()
        if line:
            return line.removeprefix("upterm: ")[:100]
    return ""
