"""The shell prompt's fast path: ``upterm session current -o template=...`` in a session.

A prompt runs it before every command line, so it must cost no more than a blink. The full
client imports asyncio, click and the admin protocol's schema (about 150 ms); this path
imports only what one request on the session's admin socket needs, and answers in a few
milliseconds (``bench/prompt.py`` measures it). Anything it does not recognise, and every
error it cannot answer quietly, goes to the full client, which says the same as ever.
"""

from __future__ import annotations

import _socket  # socket without its enum wrappers: the prompt pays for every import
import os
import stat
import struct
import sys

# No typing import at run time (it imports re): annotations here are strings.

_HEADER = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")
#: Largest reply read (the admin protocol's frame limit).
_MAX_FRAME = 1 << 20
_TIMEOUT_S = 2.0
ADMIN_SOCKET_ENV = "UPTERM_ADMIN_SOCKET"


def parse(argv: list[str]) -> tuple[str, bool] | None:
    """``session current [-q] -o template=FMT`` (and the aliases) → (template, quiet)."""
    if len(argv) < 2 or argv[0] not in ("session", "se") or argv[1] not in ("current", "c"):
        return None
    quiet = False
    output = None
    rest = argv[2:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-q", "--quiet"):
            quiet = True
        elif arg in ("-o", "--output") and i + 1 < len(rest):
            i += 1
            output = rest[i]
        elif arg.startswith("--output="):
            output = arg.removeprefix("--output=")
        elif arg.startswith("-o") and len(arg) > 2:
            output = arg[2:]
        else:
            return None
        i += 1
    if output is None or not output.startswith("template="):
        return None
    return output.removeprefix("template=").strip("'\""), quiet


def _session_info(path: str) -> dict[str, object] | None:
    """The session's info from its admin socket; None if the socket is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise OSError("not our socket")  # the full client says what is wrong
    import msgpack

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(_TIMEOUT_S)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        peer = _PEERCRED.unpack(
            sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
        )
        if peer[1] != os.getuid():
            raise OSError("served by another user")
        body = msgpack.packb({"type": "info", "id": 1}, use_bin_type=True)
        sock.sendall(_HEADER.pack(len(body)) + body)
        data = b""
        while True:
            if len(data) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(data)
                if length > _MAX_FRAME:
                    raise OSError("frame too large")
                if len(data) >= _HEADER.size + length:
                    break
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("closed")
            data += chunk
    finally:
        sock.close()
    reply = msgpack.unpackb(data[_HEADER.size : _HEADER.size + length], raw=False)
    if not isinstance(reply, dict) or reply.get("type") != "ok":
        raise OSError("no answer")
    session = reply.get("session")
    if not isinstance(session, dict):
        raise OSError("no session")
    return session


def answer(argv: list[str]) -> int | None:
    """Answer the prompt's question and return the exit status, or None to let the full
    client do it (another command, an unexpected error)."""
    parsed = parse(argv)
    if parsed is None:
        return None
    template, quiet = parsed
    path = os.environ.get(ADMIN_SOCKET_ENV)
    if not path:
        return 0 if quiet else None
    try:
        info = _session_info(path)
    except (OSError, ValueError):
        return None
    if info is None:
        return 0 if quiet else None
    from upterm.ctl.template import render_template

    try:
        text = render_template(template, info)
    except ValueError:
        return None
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def parse_proxy(argv: list[str]) -> tuple[str, str | None, str | None] | None:
    """``proxy [--ca-file PEM] [--proxy URL] URL`` → (url, ca_file, proxy); None for
    anything else (``--help``, a typo), which the full client answers."""
    if not argv or argv[0] != "proxy":
        return None
    found: dict[str, str] = {}
    urls: list[str] = []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        if name in ("--ca-file", "--proxy") and name not in found:
            if not eq:
                if i + 1 >= len(rest):
                    return None
                i += 1
                value = rest[i]
            found[name] = value
        elif arg.startswith("-") or urls:
            return None
        else:
            urls.append(arg)
        i += 1
    if len(urls) != 1:
        return None
    return urls[0], found.get("--ca-file"), found.get("--proxy")


def main() -> None:
    """The ``upterm`` command: the prompt's and ``upterm proxy``'s fast paths (ssh runs
    the proxy at every join: the full client's imports would add 80 ms), else the full
    client."""
    status = answer(sys.argv[1:])
    if status is not None:
        sys.exit(status)
    proxy = parse_proxy(sys.argv[1:])
    if proxy is not None:
        from upterm.wsclient import proxy_main

        sys.exit(proxy_main(*proxy))
    from upterm.ctl.cli import main as full_main

    full_main()
