"""The client side of SSH over WebSocket: dialling ``ws://`` and ``wss://`` relays, and the
``upterm proxy`` byte pipe that OpenSSH runs as a ProxyCommand.

Upstream's conventions: the URL's user and password (the session id and node of a token)
travel as Basic auth, ``Upterm-Client-Version`` says who dials, and every write is one binary
message. ``wss://`` certificates are verified against the system store.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from upterm import wsproto
from upterm.banners import CLIENT_CLIENT_VERSION
from upterm.errors import ConfigError, UptermError
from upterm.wsconn import WebSocketCarrier

CONNECT_TIMEOUT_S = 15
READ_CHUNK = 65536


class WebSocketRefused(UptermError):
    """The relay answered the upgrade with something other than 101."""

    code = "websocket_refused"


@dataclass(frozen=True)
class WebSocketURL:
    """A ``ws://`` or ``wss://`` relay address, with the credentials it carries."""

    secure: bool
    host: str
    port: int
    path: str
    user: str
    password: str

    @classmethod
    def parse(cls, text: str) -> WebSocketURL:
        """Parse a URL; raises :class:`ConfigError` naming what is wrong."""
        parts = urlsplit(text)
        if parts.scheme not in ("ws", "wss"):
            raise ConfigError(f"{text!r} is not a ws:// or wss:// URL")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{text!r} has a bad port") from None
        if not parts.hostname:
            raise ConfigError(f"{text!r} needs a host, e.g. wss://relay.example.com")
        secure = parts.scheme == "wss"
        return cls(
            secure,
            parts.hostname,
            port or (443 if secure else 80),
            parts.path or "/",
            unquote(parts.username or ""),
            unquote(parts.password or ""),
        )

    @property
    def authority(self) -> str:
        """``host[:port]`` as the Host header gives it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass
class WebSocketStream:
    """An upgraded connection: its streams, its framer, and bytes read past the upgrade."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    framer: wsproto.Framer
    pending: bytes


@dataclass(frozen=True)
class HTTPProxy:
    """An HTTP proxy that tunnels with CONNECT (``http://[user:password@]host:port``)."""

    host: str
    port: int
    user: str
    password: str

    @classmethod
    def parse(cls, text: str, where: str) -> HTTPProxy:
        """Parse a proxy URL; ``where`` names its source in errors (a flag or variable)."""
        parts = urlsplit(text if "://" in text else "http://" + text)
        if parts.scheme != "http":
            raise ConfigError(
                f"{where} {text!r}: only http:// proxies (with CONNECT) are supported"
            )
        try:
            port = parts.port or 80
        except ValueError:
            raise ConfigError(f"{where} {text!r} has a bad port") from None
        if not parts.hostname:
            raise ConfigError(f"{where} {text!r} needs a host")
        return cls(
            parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or "")
        )

    @property
    def authority(self) -> str:
        """``host:port`` of the proxy."""
        return f"{self.host}:{self.port}"


def proxy_for(
    url: WebSocketURL, flag: str | None, env: Mapping[str, str] | None = None
) -> HTTPProxy | None:
    """The proxy to go through: ``--proxy``, else ``HTTPS_PROXY`` (wss) or ``HTTP_PROXY``
    (ws) from ``env`` (default: ours), upper or lower case, unless ``NO_PROXY`` lists the
    host; None for a direct dial."""
    if flag:
        return HTTPProxy.parse(flag, "--proxy")
    env = os.environ if env is None else env
    if _no_proxy(url.host, url.port, env):
        return None
    name = "HTTPS_PROXY" if url.secure else "HTTP_PROXY"
    value = env.get(name) or env.get(name.lower())
    if not value:
        return None
    return HTTPProxy.parse(value, name)


def _no_proxy(host: str, port: int, env: Mapping[str, str]) -> bool:
    """Whether ``NO_PROXY`` (or ``no_proxy``) lists ``host``: ``*``, the name, a parent
    domain (``example.com`` or ``.example.com``), optionally with ``:port``."""
    value = env.get("NO_PROXY", env.get("no_proxy", ""))
    host = host.lower().strip("[]")
    for entry in (e.strip().lower() for e in value.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        name = name.strip("[]").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


async def _through_proxy(proxy: HTTPProxy, url: WebSocketURL) -> socket.socket:
    """A connected socket to ``url``'s host through ``proxy``'s CONNECT tunnel."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, addr), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, IndexError) as exc:
        reason = _reason(exc)
        raise UptermError(f"cannot reach the proxy {proxy.authority}: {reason}") from exc
    target = f"{url.host}:{url.port}" if ":" not in url.host else f"[{url.host}]:{url.port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.user:
        basic = base64.b64encode(f"{proxy.user}:{proxy.password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {basic}")
    try:
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = bytearray()
        while (parsed := wsproto.parse_head(buf)) is None:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), CONNECT_TIMEOUT_S)
            if not chunk:
                raise UptermError(f"the proxy {proxy.authority} closed the connection")
            buf += chunk
    except (OSError, TimeoutError, wsproto.HandshakeError) as exc:
        sock.close()
        raise UptermError(f"the proxy {proxy.authority} did not answer CONNECT: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    head, used = parsed
    _version, status, reason = head.start
    if status != "200":
        sock.close()
        # 407 is the standard answer; tinyproxy, for one, says 401.
        hint = " (check the proxy's user and password)" if status in ("401", "407") else ""
        raise UptermError(
            f"the proxy {proxy.authority} refused to connect to {target}: {status} "
            f"{printable_line(reason)}{hint}"
        )
    if used != len(buf):
        sock.close()
        raise UptermError(f"the proxy {proxy.authority} sent data before the tunnel opened")
    return sock


def _reason(exc: BaseException) -> str:
    """Why a dial failed, in the system's words ("Connection refused")."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def printable_line(text: str) -> str:
    """``text`` without control characters (a proxy's words are shown as they are)."""
    return "".join(ch for ch in text if ch.isprintable())[:200]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates checked against ``ca_file``, else the system store (``SSL_CERT_FILE``
    and ``SSL_CERT_DIR`` apply, as in OpenSSL)."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use the CA file {ca_file}: {exc}") from exc


async def open_websocket(
    url: WebSocketURL,
    client_version: str,
    ca_file: str | None = None,
    proxy: HTTPProxy | None = None,
) -> WebSocketStream:
    """Dial (through ``proxy`` if given) and upgrade; raises :class:`UptermError`
    subclasses with one-line reasons."""
    context = tls_context(ca_file) if url.secure else None
    server_hostname = url.host if context else None
    try:
        if proxy is not None:
            sock = await _through_proxy(proxy, url)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=sock, ssl=context, server_hostname=server_hostname),
                CONNECT_TIMEOUT_S,
            )
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    url.host, url.port, ssl=context, server_hostname=server_hostname
                ),
                CONNECT_TIMEOUT_S,
            )
    except ssl.SSLCertVerificationError as exc:
        raise UptermError(
            f"the certificate of {url.authority} is not trusted: {exc.verify_message}"
        ) from exc
    except (OSError, TimeoutError) as exc:
        reason = _reason(exc)
        raise UptermError(f"cannot reach {url.authority}: {reason}") from exc
    key = wsproto.new_key()
    writer.write(_upgrade(url, key, client_version))
    buf = bytearray()
    try:
        while (parsed := wsproto.parse_head(buf)) is None:
            chunk = await asyncio.wait_for(reader.read(READ_CHUNK), CONNECT_TIMEOUT_S)
            if not chunk:
                raise UptermError(f"{url.authority} closed the connection during the upgrade")
            buf += chunk
        head, used = parsed
        try:
            wsproto.check_upgrade_response(head, key)
        except wsproto.HandshakeError as exc:
            raise WebSocketRefused(_refusal_text(url, exc, bytes(buf[used:]))) from exc
    except (OSError, TimeoutError) as exc:
        writer.close()
        raise UptermError(f"the WebSocket upgrade to {url.authority} failed: {exc}") from exc
    except BaseException:
        writer.close()
        raise
    return WebSocketStream(reader, writer, wsproto.Framer(client=True), bytes(buf[used:]))


def proxy_main(url: str, ca_file: str | None, http_proxy: str | None) -> int:
    """``upterm proxy``: check the arguments, carry stdin/stdout over the WebSocket, and
    return the exit status; every failure is one ``upterm:`` line on stderr. Shared by the
    full client and its fast path (which imports little else, so ssh's join starts sooner).
    """
    try:
        target = WebSocketURL.parse(url)
        if not target.user:
            raise ConfigError(f"{url!r} carries no token; use wss://TOKEN@RELAY")
        through = proxy_for(target, http_proxy)
        return asyncio.run(run_proxy(target, CLIENT_CLIENT_VERSION, ca_file, through))
    except UptermError as exc:
        sys.stderr.write(f"upterm: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("upterm: interrupted\n")
        return 130


async def run_proxy(
    url: WebSocketURL,
    client_version: str,
    ca_file: str | None = None,
    proxy: HTTPProxy | None = None,
) -> int:
    """Pipe stdin to the relay and the relay to stdout until either side ends."""
    stream = await open_websocket(url, client_version, ca_file, proxy)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=READ_CHUNK)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin),
        os.fdopen(sys.stdin.fileno(), "rb", 0, closefd=False),
    )
    out_fd = sys.stdout.fileno()

    def emit(chunk: bytes) -> None:
        # stdout is ssh's pipe, blocking: this process has nothing else to do meanwhile.
        view = memoryview(chunk)
        while view:
            view = view[os.write(out_fd, view) :]

    async def upstream() -> None:
        while chunk := await stdin.read(READ_CHUNK):
            stream.writer.write(stream.framer.binary(chunk))
            await stream.writer.drain()
        stream.writer.write(stream.framer.close())
        with contextlib.suppress(OSError):
            await stream.writer.drain()

    async def downstream() -> None:
        data = stream.pending
        while True:
            events = stream.framer.feed(data)
            for chunk in events.data:
                emit(chunk)
            for reply in events.replies:
                stream.writer.write(reply)
            if events.closed is not None:
                return
            data = await stream.reader.read(READ_CHUNK)
            if not data:
                return

    tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, wsproto.FrameError):
                raise UptermError(f"{url.authority} broke the WebSocket framing: {exc}")
    finally:
        for task in tasks:
            task.cancel()
        stream.writer.close()
    return 0


class _DialledCarrier(WebSocketCarrier):
    """Our end of a dialled WebSocket: sends the upgrade, then carries asyncssh's client."""

    def __init__(
        self,
        url: WebSocketURL,
        client_version: str,
        ssh_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        super().__init__(client=True)
        self._url = url
        self._version = client_version
        self._ssh_factory = ssh_factory
        self._key = wsproto.new_key()
        self.ready: asyncio.Future[asyncio.Protocol] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._transport is not None
        self._transport.write(_upgrade(self._url, self._key, self._version))

    def handshake(self, head: wsproto.Head, rest: bytes) -> None:
        try:
            wsproto.check_upgrade_response(head, self._key)
        except wsproto.HandshakeError as exc:
            raise wsproto.HandshakeError(exc.status, _refusal_text(self._url, exc, rest)) from exc
        ssh = self._ssh_factory()
        self.start_ssh(ssh, rest)
        if not self.ready.done():
            self.ready.set_result(ssh)

    def refused(self, exc: wsproto.HandshakeError) -> None:
        if not self.ready.done():
            self.ready.set_exception(WebSocketRefused(exc.text))
        super().refused(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                UptermError(f"{self._url.authority} closed the connection during the upgrade")
            )
        super().connection_lost(exc)


class WebSocketTunnel:
    """asyncssh's ``tunnel=`` for ``connect``: the SSH connection runs over a WebSocket."""

    def __init__(
        self,
        url: WebSocketURL,
        client_version: str,
        proxy: HTTPProxy | None = None,
        ca_file: str | None = None,
    ) -> None:
        self._url = url
        self._version = client_version
        self._proxy = proxy
        self._ca_file = ca_file

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], _host: str, _port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        """Dial, upgrade, and hand the upgraded stream to asyncssh's connection."""
        url = self._url
        context = tls_context(self._ca_file) if url.secure else None
        loop = asyncio.get_running_loop()
        proxy = self._proxy
        version = self._version

        def carrier_factory() -> _DialledCarrier:
            return _DialledCarrier(url, version, session_factory)

        hostname = url.host if context else None
        try:
            if proxy is not None:
                sock = await _through_proxy(proxy, url)
                connecting = loop.create_connection(
                    carrier_factory, sock=sock, ssl=context, server_hostname=hostname
                )
            else:
                connecting = loop.create_connection(
                    carrier_factory, url.host, url.port, ssl=context, server_hostname=hostname
                )
            transport, carrier = await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
        except ssl.SSLCertVerificationError as exc:
            raise UptermError(
                f"the certificate of {url.authority} is not trusted: {exc.verify_message}"
            ) from exc
        try:
            ssh = await asyncio.wait_for(carrier.ready, CONNECT_TIMEOUT_S)
        except BaseException:
            transport.close()
            raise
        return transport, ssh


def _upgrade(url: WebSocketURL, key: str, client_version: str) -> bytes:
    credentials = base64.b64encode(f"{url.user}:{url.password}".encode()).decode("ascii")
    return wsproto.upgrade_request(
        url.authority,
        url.path,
        key,
        (("Upterm-Client-Version", client_version), ("Authorization", f"Basic {credentials}")),
    )


def _refusal_text(url: WebSocketURL, exc: wsproto.HandshakeError, body: bytes) -> str:
    """One line: who refused, the status, and the first line of its explanation."""
    text = body[:512].decode("utf-8", "replace").strip()
    first = "".join(ch for ch in text.splitlines()[0] if ch.isprintable()) if text else ""
    return f"{url.authority} refused the WebSocket: {exc.text}" + (f": {first}" if first else "")
