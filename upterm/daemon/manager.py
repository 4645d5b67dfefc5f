"""The daemon's sessions: create, list, describe, attach, accept and stop them.

A hosted session joins three parts: the shared terminal (:mod:`upterm.daemon.session`),
the connection to the relay with its inner SSH server (:mod:`upterm.daemon.tunnel`) and the
session's own admin socket. This module answers admin requests about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from upterm import __version__, adminproto, keyopts, paths, wire, wsclient
from upterm.daemon.admin import AdminConnection, AdminServer
from upterm.daemon.consent import Activity, Question
from upterm.daemon.knownhosts import RelayTrust, known_hosts_name
from upterm.daemon.localrelay import LocalRelay
from upterm.daemon.recording import Recorder
from upterm.daemon.session import PACE_HIGH_WATER_BYTES, ClientInfo, Session
from upterm.daemon.sshd import GuestPolicy, Invite
from upterm.daemon.tunnel import RelayURL, Tunnel
from upterm.errors import (
    AuthorizedKeysError,
    RemoteProtocolError,
    SessionNotFound,
    UptermError,
    UsageError,
)
from upterm.keys import Ed25519Key
from upterm.text import printable

log = logging.getLogger(__name__)

#: A stopped command gets SIGHUP, then SIGKILL after this long.
STOP_GRACE_S = 3
DAEMON_STOPPING_MESSAGE = "the host's upterm daemon is shutting down; this session ends now"
#: How long a web link lives unless the host says (``--web-ttl``).
DEFAULT_WEB_TTL_S = 12 * 3600


def _who(client: ClientInfo) -> str:
    """A joiner in the host's notices: its key, or "web browser" (a browser has none)."""
    return f"web browser {client.client_id}" if client.mode == "web" else client.fingerprint


def _host_label() -> str:
    """Who hosts, as the web page's banner says: user@machine (printable, short)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    label = printable(f"{user}@{socket.gethostname()}")
    return label[: wire.MAX_WEB_LABEL]


#: Length of invite codes (base62: about 60 bits).
INVITE_CODE_LEN = 10
#: After the command exits, joiners get this long to receive its exit status.
EXIT_FLUSH_S = 2


class AttachedTerminal:
    """A terminal attached over the admin socket (``upterm host`` / ``session attach``).

    It paces the command the way a real terminal does: when its socket backs up, the PTY
    is paused until it drains, so the host's own screen never loses output.
    """

    def __init__(
        self, conn: AdminConnection, stream: int, session: Session, answers: bool = True
    ) -> None:
        self._conn = conn
        #: Someone types there who can answer questions (its input is a terminal).
        self.answers = answers
        self.stream = stream
        self.session = session
        self.viewer_id = f"local-{id(conn)}-{stream}"
        self._drain: asyncio.Task[None] | None = None
        self.done = False

    @property
    def paces(self) -> bool:
        """The host's terminal holds the PTY back rather than lose output."""
        return True

    def send(self, data: bytes) -> None:
        """Queue output frames."""
        for chunk in adminproto.chunks(data):
            self._conn.send(adminproto.output(self.stream, chunk))
        if self.backlog() > PACE_HIGH_WATER_BYTES and self._drain is None:
            self._drain = asyncio.ensure_future(self._wait_drained())

    async def _wait_drained(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._conn.writer.drain()
        self._drain = None
        self.session.drained(self.viewer_id)

    def backlog(self) -> int:
        """Bytes not yet written to the client's socket."""
        return self._conn.backlog()

    def finish(self, status: int) -> None:
        """Tell the client the command's exit status; the stream ends."""
        self.done = True
        # The stream is over: a long-lived client attaching again and again must not
        # accumulate ended streams.
        self._conn.streams.pop(self.stream, None)
        self._conn.send(adminproto.exited(self.stream, status))

    def tell_waiting(self, count: int) -> None:
        """How many joiners wait for approval (the client's ~y and ~n act only then)."""
        if not self.done:
            self._conn.send(adminproto.waiting(self.stream, count))

    def cut_off(self, message: bytes) -> None:
        """Local terminals pace instead of being cut off; close if asked anyway."""
        self.done = True
        self._conn.close()


#: Refusals of one joiner's requests reported per window (see Manager._refusal_shown).
REFUSALS_SHOWN = 10
REFUSAL_WINDOW_S = 10.0
#: Joiners whose refusals are counted before quiet ones are forgotten.
MAX_REFUSAL_COUNTS = 256


@dataclass
class HostedSession:
    """Everything the daemon holds for one session."""

    session_id: str
    session: Session
    tunnel: Tunnel
    authorized: list[wire.PublicKey]
    accepting: asyncio.Event
    policy: GuestPolicy
    name: str | None = None
    options: adminproto.CreateSession | None = None
    admin: AdminServer | None = None
    clients: dict[str, ClientInfo] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    #: Set (and replaced) whenever a joiner arrives or leaves, for ``wait``.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    had_joiner: bool = False
    on_change: Callable[[], None] | None = None
    #: Fires when the web link expires (its browsers are removed then).
    web_timer: asyncio.TimerHandle | None = None
    #: The host's terminals attached now (told how many joiners wait for approval).
    terminals: set[AttachedTerminal] = field(default_factory=set)
    #: A moderated session had its moderators at least once (then --on-moderator-leave).
    moderated_once: bool = False
    #: Why the recording stopped (its file could not be written), or "".
    recording_error: str = ""
    #: Per joiner key: (window start, refusals reported, refusals not reported).
    refusal_counts: dict[str, tuple[float, int, int]] = field(default_factory=dict)

    def waiting_changed(self) -> None:
        """Tell every attached terminal how many joiners wait for approval now."""
        count = sum(1 for question in self.policy.pending.values() if question.waiting)
        for terminal in list(self.terminals):
            terminal.tell_waiting(count)

    def notify_change(self) -> None:
        """Wake everyone waiting for a change of joiners."""
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    def web_url(self) -> str:
        """The browser joiners' link (``--web``): the relay's page, the secret after ``#``;
        "" without one (none asked, revoked, or expired)."""
        web, base = self.policy.web, self.tunnel.web_base
        if web is None or not base or time.time() >= web[1]:
            return ""
        return f"{base}/join#{web[0]}"

    def info(self) -> dict[str, Any]:
        """The session as the admin protocol describes it (camelCase, as upstream's JSON)."""
        reg = self.tunnel.registered
        assert reg is not None
        host_key = self.tunnel.session_key.authorized_key_line().decode().strip()
        scp, sftp = self.tunnel.url.transfer_commands(reg.token)
        return {
            "sessionId": self.session_id,
            "name": self.name,
            # Upstream's JSON has the command as one space-joined string; argv is ours.
            "command": shlex.join(self.session.argv),
            "argv": list(self.session.argv),
            "forceCommand": shlex.join(self.policy.force_command),
            "readOnly": self.policy.read_only,
            "sizePolicy": self.options.size_policy if self.options else "smallest",
            "ptySize": list(self.session.size),
            "hideClientIp": self.policy.hide_client_ip,
            "host": str(self.tunnel.url),
            "relayHostKey": wire.PublicKey(self.tunnel.relay_key_blob)
            .authorized_key_line()
            .decode()
            .strip(),
            "nodeAddr": reg.node_addr,
            "sshUser": reg.token,
            "sshCommand": self.tunnel.url.join_command(reg.token),
            "e2eCommand": (
                self.tunnel.url.e2e_join_command(reg.token, host_key) if reg.e2e_supported else ""
            ),
            "scpCommand": scp if self.policy.sftp and not self.policy.e2e_only else "",
            "sftpCommand": sftp if self.policy.sftp and not self.policy.e2e_only else "",
            "hostKey": host_key,
            "hostKeyFingerprint": self.tunnel.session_key.fingerprint,
            # The session key first, then the ECDSA and RSA keys for clients without ed25519.
            "hostKeys": [k.authorized_key_line().decode().strip() for k in self.tunnel.host_keys],
            "e2eOnly": self.policy.e2e_only,
            "recording": self.options.record if self.options else None,
            "recordingError": self.recording_error,
            "recordingRequired": bool(self.options and self.options.record_required),
            "adminSocket": str(paths.session_socket_path(self.session_id)),
            "pid": self.session.pid,
            "accepting": self.accepting.is_set(),
            "relayConnected": self.tunnel.connected,
            "relayState": self.tunnel.state,
            "reconnects": self.tunnel.reconnects,
            "reconnectSupported": reg.reconnect_supported,
            "createdAt": self.created_at,
            "authorizedKeys": [
                {"fingerprint": k.fingerprint, "comment": k.comment} for k in self.authorized
            ],
            "clientCount": len(self.clients),
            "hadJoiner": self.had_joiner,
            "moderators": self.policy.moderators,
            "moderatorsPresent": self.policy.moderators_present(),
            "onModeratorLeave": self.policy.on_moderator_leave,
            "held": self.session.moderation_held,
            "approve": self.policy.approve,
            "sftp": self.policy.sftp,
            "acceptTransfers": self.policy.accept_transfers,
            "allowForwarding": self.policy.allow_forwarding,
            "acceptForwards": self.policy.accept_forwards,
            "webURL": self.web_url(),
            "webExpiresAt": self.policy.web[1] if self.policy.web is not None else None,
            "activity": [a.as_dict() for a in self.policy.activity],
            "invites": [
                {
                    "code": i.code,
                    "for": i.label,
                    "expiresAt": i.expires_at,
                    "usesLeft": i.uses_left,
                }
                for i in self.policy.invites.values()
                if i.valid(time.time())
            ],
            "pending": [
                {
                    "id": q.client.client_id,
                    "version": q.client.version,
                    "addr": q.client.addr,
                    "fingerprint": q.client.fingerprint,
                    "source": q.client.source,
                    "kind": q.kind,
                    "what": q.what,
                }
                for q in self.policy.pending.values()
                if q.waiting
            ],
            "refused": [
                {"fingerprint": r.fingerprint, "addr": r.addr, "reason": r.reason, "at": r.at}
                for r in self.policy.refusals
            ],
            "clients": [
                {
                    "id": c.client_id,
                    "version": c.version,
                    "addr": c.addr,
                    "fingerprint": c.fingerprint,
                    "mode": c.mode,
                    "source": c.source,
                    "role": self.policy.roles.get(c.client_id, ""),
                    "joinedAt": c.joined_at,
                }
                for c in self.clients.values()
            ],
        }


class Manager:
    """Owns every hosted session of the daemon."""

    def __init__(
        self, local_relay: LocalRelay, on_change: Callable[[], None] | None = None
    ) -> None:
        self._local_relay = local_relay
        #: Called when sessions or joiners come or go (the daemon's STATUS= line).
        self._on_change = on_change or (lambda: None)
        self.sessions: dict[str, HostedSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- dispatch --

    async def dispatch(
        self, req: adminproto.Request, conn: AdminConnection
    ) -> dict[str, Any] | None:
        """Answer one admin request."""
        match req:
            case adminproto.Hello():
                return adminproto.ok(
                    req.id,
                    version=adminproto.PROTOCOL_VERSION,
                    daemon=__version__,
                    pid=os.getpid(),
                )
            case adminproto.CreateSession():
                return await self._create(req, conn)
            case adminproto.Accept():
                hosted = self._find(req.session, conn)
                self._accept(hosted)
                return adminproto.ok(req.id)
            case adminproto.ListSessions():
                return adminproto.ok(req.id, sessions=[s.info() for s in self.sessions.values()])
            case adminproto.Info():
                return adminproto.ok(req.id, session=self._find(req.session, conn).info())
            case adminproto.Attach():
                self._attach(req, conn)
                return None
            case adminproto.Stop():
                hosted = self._find(req.session, conn)
                hosted.session.hangup()
                return adminproto.ok(req.id)
            case adminproto.Wait():
                hosted = self._find(req.session, conn)
                return adminproto.ok(req.id, reason=await self._wait(hosted, req.timeout_s))
            case adminproto.ClientAction():
                return self._client_action(self._find(req.session, conn), req)
            case adminproto.CreateInvite():
                return await self._invite(self._find(req.session, conn), req)
            case adminproto.RevokeInvite():
                hosted = self._find(req.session, conn)
                if hosted.policy.invites.pop(req.code, None) is None:
                    raise SessionNotFound(f"no invite {req.code!r} in this session")
                await hosted.tunnel.set_invites(list(hosted.policy.invites))
                return adminproto.ok(req.id)
            case adminproto.WebLinkAction():
                return await self._web_link(self._find(req.session, conn), req)
            case adminproto.Detach():
                viewer = _streams(conn).pop(req.stream, None)
                if viewer is not None:
                    viewer.done = True
                    viewer.session.detach(viewer.viewer_id)
                    for hosted in self.sessions.values():
                        hosted.terminals.discard(viewer)
                return None
            case adminproto.Input():
                viewer = _streams(conn).get(req.stream)
                if viewer is not None and not viewer.done:
                    viewer.session.input(req.data)
                return None
            case adminproto.Resize():
                viewer = _streams(conn).get(req.stream)
                if viewer is not None:
                    viewer.session.resize(viewer.viewer_id, req.cols, req.rows)
                return None
        raise RemoteProtocolError("unhandled request")  # pragma: no cover

    def _find(self, key: str | None, conn: AdminConnection) -> HostedSession:
        key = key or conn.bound_session
        if not key:
            raise UsageError("name a session id or name (see 'upterm session list')")
        hosted = self.sessions.get(key)
        if hosted is None:
            hosted = next((h for h in self.sessions.values() if h.name == key), None)
        if hosted is None:
            raise SessionNotFound(f"no session {key!r}; 'upterm session list' shows them")
        return hosted

    async def _web_link(
        self, hosted: HostedSession, req: adminproto.WebLinkAction
    ) -> dict[str, Any]:
        """A new web link, or none: browsers that joined with the old one are removed."""
        policy = hosted.policy
        if req.op == "new" and not (hosted.options and hosted.options.web):
            raise UsageError(
                "this session was started without --web: browsers cannot join it; start "
                "one with 'upterm host --web'"
            )
        if req.op == "revoke":
            # From now on the host refuses the link, whatever the relay says or knows.
            policy.web = None
            self._remove_web_clients(hosted, "the host withdrew this web link")
            try:
                await hosted.tunnel.set_web(None)
            except UptermError as exc:
                log.info("session %s: the relay was not told of the revoke: %s",
                         hosted.session_id, exc)  # fmt: skip
            self._notice(hosted, "web link revoked")
        else:
            await self._new_web_link(hosted)
            self._remove_web_clients(hosted, "the host replaced this web link")
            self._notice(hosted, "new web link made")
        return adminproto.ok(req.id, session=hosted.info())

    async def _new_web_link(self, hosted: HostedSession) -> None:
        """A fresh web link, declared to the relay first (if it cannot take it, the link
        before stays as it was), then checked by the inner server and timed to expire."""
        ttl = (hosted.options.web_ttl_s if hosted.options else 0) or DEFAULT_WEB_TTL_S
        credential = wire.WebCredential.new()
        expires = int(time.time()) + ttl
        await hosted.tunnel.set_web(credential, expires, _host_label())
        hosted.policy.web = (credential, expires)
        self._arm_web_expiry(hosted)

    def _remove_web_clients(self, hosted: HostedSession, why: str) -> None:
        for client_id, client in list(hosted.clients.items()):
            if client.mode == "web":
                for guest in list(hosted.policy.by_client.get(client_id, ())):
                    guest.remove(f"\r\n[upterm: {why}]\r\n".encode())

    def _arm_web_expiry(self, hosted: HostedSession) -> None:
        """When the link expires, the browsers that joined with it leave too."""
        if hosted.web_timer is not None:
            hosted.web_timer.cancel()
            hosted.web_timer = None
        web = hosted.policy.web
        if web is None:
            return
        credential, expires = web

        def expired() -> None:
            hosted.web_timer = None
            if hosted.policy.web is not None and hosted.policy.web[0] == credential:
                self._remove_web_clients(hosted, "this web link expired")
                self._notice(hosted, "the web link expired")
                hosted.notify_change()

        delay = max(0.0, expires - time.time())
        hosted.web_timer = asyncio.get_running_loop().call_later(delay, expired)

    def _client_action(self, hosted: HostedSession, req: adminproto.ClientAction) -> dict[str, Any]:
        policy = hosted.policy
        if req.action in ("approve", "deny"):
            waiting = [q for q in policy.pending.values() if q.waiting]
            if req.client is None and len(waiting) > 1:
                # ~y typed while several questions wait would answer one the host may not
                # have read (a joiner could keep one waiting for that): name it.
                raise UsageError(
                    f"{len(waiting)} questions wait; answer one by its joiner: 'upterm "
                    f"session approve|deny {hosted.name or hosted.session_id} ID' "
                    "('upterm session info' lists them)"
                )
            question = policy.answer(req.client, req.action == "approve", req.everything)
            if question is None:
                raise SessionNotFound(
                    f"no joiner {req.client} is waiting for approval"
                    if req.client
                    else "no joiner is waiting for approval"
                )
            client = question.client
            if question.kind == "join":
                verb = "let in" if req.action == "approve" else "refused"
                self._notice(hosted, f"{client.fingerprint} {verb}")
            else:
                verb = "allowed" if req.action == "approve" else "refused"
                scope = ", and all like it from this joiner" if req.everything else ""
                self._notice(hosted, f"{question.kind} {question.what} {verb}{scope}")
            return adminproto.ok(req.id, client=client.client_id)
        assert req.client is not None
        if req.client not in hosted.clients:
            raise SessionNotFound(
                f"no joiner {req.client!r} in this session; 'upterm session current' lists them"
            )
        channels = list(policy.by_client.get(req.client, ()))
        if req.action == "kick":
            for guest in channels:
                guest.remove(b"\r\n[upterm: the host removed you from the session]\r\n")
            return adminproto.ok(req.id)
        assert req.role is not None
        if req.role in ("typist", "moderator") and policy.viewer_only(req.client):
            raise UsageError(
                f"joiner {req.client}'s key is restricted to watching (restrict in its "
                "authorized_keys line); it cannot type"
            )
        policy.roles[req.client] = req.role
        text = {
            "typist": "you can type now",
            "viewer": "you are a viewer now",
            "moderator": "you are a moderator now (~: then help)",
        }[req.role]
        for guest in channels:
            guest.role_changed()
            guest.tell(text)
        policy.moderation_changed()
        return adminproto.ok(req.id)

    async def _invite(self, hosted: HostedSession, req: adminproto.CreateInvite) -> dict[str, Any]:
        keys = _parse_authorized(req.keys)
        code = wire.random_session_id()[:INVITE_CODE_LEN]
        invite = Invite(
            code=code,
            keys=frozenset(k.blob for k in keys),
            label=req.label,
            expires_at=time.time() + req.expires_s,
            uses_left=req.uses,
        )
        hosted.policy.invites[code] = invite
        # The relay lets invite tokens past its key check only for codes declared to it.
        await hosted.tunnel.set_invites(list(hosted.policy.invites))
        reg = hosted.tunnel.registered
        assert reg is not None
        token = wire.with_invite(reg.token, code)
        host_key = hosted.tunnel.session_key.authorized_key_line().decode().strip()
        log.info("session %s: invite %s for %s", hosted.session_id, code, req.label or "anyone")
        return adminproto.ok(
            req.id,
            code=code,
            sshCommand=hosted.tunnel.url.join_command(token),
            e2eCommand=(
                hosted.tunnel.url.e2e_join_command(token, host_key) if reg.e2e_supported else ""
            ),
            expiresAt=invite.expires_at,
            uses=invite.uses_left,
        )

    async def _wait(self, hosted: HostedSession, timeout_s: float | None) -> str:
        """Block until the last joiner left, the session ended, or the timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if hosted.session.exited.done():
                return "ended"
            if hosted.had_joiner and not hosted.clients:
                return "last_left"
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return "timeout"
            changed = asyncio.ensure_future(hosted.changed.wait())
            waiters: set[asyncio.Future[Any]] = {changed, hosted.session.exited}
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()

    # -- create --

    async def _create(self, req: adminproto.CreateSession, conn: AdminConnection) -> dict[str, Any]:
        authorized = _parse_authorized(req.authorized_keys)
        if req.name and any(h.name == req.name for h in self.sessions.values()):
            raise UsageError(
                f"a session named {req.name!r} is already running; pick another --name or "
                f"stop it with 'upterm session stop {req.name}'"
            )
        identities = _load_identities(req.identities)
        confirmed = None
        if req.confirmed_host_key:
            confirmed_key = wire.parse_public_key_line(req.confirmed_host_key)
            confirmed = confirmed_key.blob if confirmed_key else None
        if req.server:
            url = RelayURL.parse(req.server)
            known = Path(req.known_hosts) if req.known_hosts else _default_known_hosts()
            trust = RelayTrust(
                name=known_hosts_name(url.host, url.port),
                known_hosts=known,
                accept_new=req.accept_new_host_key,
                confirmed=confirmed,
            )
        else:
            local = await self._local_relay.ensure()
            url = RelayURL("ssh", local.host, local.port)
            trust = RelayTrust(
                name=known_hosts_name(url.host, url.port),
                known_hosts=_default_known_hosts() if local.pinned_key is None else None,
                pinned=local.pinned_key,
                accept_new=req.accept_new_host_key,
                confirmed=confirmed,
            )
        key = Ed25519Key.generate()
        hosted_box: list[HostedSession] = []

        def on_state(state: str) -> None:
            if hosted_box:
                self._relay_state(hosted_box[0], state)

        tunnel = Tunnel(
            url,
            trust,
            key,
            wire.new_session_secret(),
            on_state=on_state,
            keepalive_s=req.keepalive_s,
            identities=identities,
            agent_path=req.env.get("SSH_AUTH_SOCK") or None,
            # The proxy of the terminal that asked, as ssh would use its environment.
            ws_proxy=(
                wsclient.proxy_for(url.websocket_url(""), req.ws_proxy, req.env)
                if url.websocket
                else None
            ),
            # Likewise the CA file of that terminal (the daemon may have been started with
            # another environment).
            ca_file=req.ca_file or req.env.get("SSL_CERT_FILE") or None,
        )
        reg = await tunnel.connect(authorized)
        sid = reg.session_id
        if sid in self.sessions:
            tunnel.close()
            raise UptermError(f"the relay handed out session id {sid} twice; try again")
        if req.e2e_only and not reg.e2e_supported:
            tunnel.close()
            raise UptermError(
                f"the relay at {url} does not carry end-to-end joins (upstream's uptermd "
                "refuses ssh -J), so an --e2e-only session could not be joined; use a relay "
                "running this project's uptermd, or drop --e2e-only"
            )
        try:
            sock_path = paths.session_socket_path(sid)
            env = dict(req.env)
            # Ours wins over an inherited value, so nested sessions see the inner one.
            env[wire.ADMIN_SOCKET_ENV] = str(sock_path)
            env.pop(wire.SESSION_NAME_ENV, None)
            if req.name:
                env[wire.SESSION_NAME_ENV] = req.name
            env["TERM"] = req.term
            session = Session(
                req.argv,
                env=env,
                cwd=req.cwd,
                cols=req.cols,
                rows=req.rows,
                size_policy=req.size_policy,
                pinned_size=req.pty_size,
            )
            # A moderated session is held from the start, until its moderators are here.
            session.set_moderation_hold(req.moderators > 0)
            if req.record:
                session.recorder = Recorder(
                    Path(req.record),
                    cols=req.cols,
                    rows=req.rows,
                    env=env,
                    record_input=req.record_input,
                    on_failure=lambda why: (
                        self._recording_failed(hosted_box[0], why) if hosted_box else None
                    ),
                )
            accepting = asyncio.Event()
            policy = GuestPolicy(
                session=session,
                relay_key_blob=tunnel.relay_key_blob,
                authorized=frozenset(k.blob for k in authorized),
                accepting=accepting,
                on_join=lambda c: self._joined(hosted, c),
                on_leave=lambda cid: self._left(hosted, cid),
                hide_client_ip=req.hide_client_ip,
                read_only=req.read_only,
                force_command=req.force_command,
                e2e_only=req.e2e_only,
                sources={k.blob: k.comment for k in authorized},
                key_rules={
                    k.blob: keyopts.parse_options(k.options) for k in authorized if k.options
                },
                recorded=("input" if req.record_input else "output") if req.record else "",
                default_role=req.default_role,
                source_roles=dict(req.source_roles),
                approve=req.approve,
                approve_timeout_s=req.approve_timeout_s,
                on_pending=lambda q: self._ask_host(hosted, q),
                on_pending_done=lambda: hosted.waiting_changed(),
                sftp=req.sftp,
                accept_transfers=req.accept_transfers,
                allow_forwarding=req.allow_forwarding,
                accept_forwards=req.accept_forwards,
                can_ask=lambda: any(t.answers for t in hosted.terminals),
                on_activity=lambda a: self._activity(hosted, a),
                moderators=req.moderators,
                on_moderator_leave=req.on_moderator_leave,
                on_moderation=lambda: self._moderation(hosted),
                on_command=lambda c, text: self._joiner_command(hosted, c, text),
                e2e_line=lambda user: tunnel.url.e2e_join_command(
                    user, tunnel.session_key.authorized_key_line().decode().strip()
                ),
            )
            policy.all_closed.set()
            hosted = HostedSession(
                sid,
                session,
                tunnel,
                authorized,
                accepting,
                policy,
                name=req.name,
                options=req,
                on_change=self._on_change,
            )
            hosted_box.append(hosted)
            await tunnel.serve(policy)
            if req.web:
                await self._new_web_link(hosted)
            hosted.admin = AdminServer(sock_path, self.dispatch, bound_session=sid)
            await hosted.admin.start()
            self.sessions[sid] = hosted
            if req.accept:
                self._accept(hosted)
            else:
                # Until its creator accepts it, a session lives only as long as the client
                # asking: Ctrl-C at a prompt, or the terminal closing, discards it.
                conn.on_close(lambda: self._discard_unaccepted(hosted))
        except BaseException:
            tunnel.close()
            if hosted_box and hosted_box[0].admin is not None:
                hosted_box[0].admin.close()
            self.sessions.pop(sid, None)
            raise
        task = asyncio.ensure_future(self._reap(hosted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("session %s created for %s via %s", sid, req.argv, url)
        self._on_change()
        return adminproto.ok(req.id, session=hosted.info(), warnings=trust.warnings)

    def _discard_unaccepted(self, hosted: HostedSession) -> None:
        if not hosted.session.started and not hosted.session.exited.done():
            log.info("session %s discarded: its host left before accepting", hosted.session_id)
            hosted.session.hangup()

    def _accept(self, hosted: HostedSession) -> None:
        if not hosted.session.started:
            hosted.session.start()
        hosted.accepting.set()

    async def _reap(self, hosted: HostedSession) -> None:
        await hosted.session.exited
        # Joiners have been sent the exit status; let it reach them before the tunnel goes.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hosted.policy.all_closed.wait(), EXIT_FLUSH_S)
        hosted.tunnel.close()
        if hosted.web_timer is not None:
            hosted.web_timer.cancel()
        if hosted.admin is not None:
            hosted.admin.close()
        self.sessions.pop(hosted.session_id, None)
        log.info("session %s ended", hosted.session_id)
        self._on_change()

    def _relay_state(self, hosted: HostedSession, state: str) -> None:
        if hosted.session.exited.done():
            return
        log.info("session %s: relay %s is %s", hosted.session_id, hosted.tunnel.url, state)
        notices = {
            "reconnecting": "lost the relay; reconnecting (the command keeps running)",
            "connected": "reconnected to the relay; the join line is unchanged",
            "disconnected": "lost the relay, which cannot keep this session's id; the "
            "command keeps running but nobody can join",
        }
        if state in notices:
            hosted.session.notify_host(notices[state])

    def _joined(self, hosted: HostedSession, client: ClientInfo) -> None:
        if client.client_id in hosted.clients:
            return  # another channel of a joiner already here
        hosted.clients[client.client_id] = client
        hosted.had_joiner = True
        hosted.notify_change()
        self._notice(hosted, f"{client.addr} joined ({_who(client)})")
        log.info(
            "session %s: client joined from %s (%s, %s)",
            hosted.session_id,
            client.addr,
            client.version,
            client.fingerprint,
        )

    def _left(self, hosted: HostedSession, client_id: str) -> None:
        client = hosted.clients.pop(client_id, None)
        if client is not None:
            log.info("session %s: client %s left", hosted.session_id, client_id)
            hosted.notify_change()
            self._notice(hosted, f"{client.addr} left ({_who(client)})")

    def _ask_host(self, hosted: HostedSession, question: Question) -> None:
        hosted.waiting_changed()  # before the question: ~y typed on reading it must work
        client = question.client
        source = f", {client.source}" if client.source else ""
        handle = hosted.name or hosted.session_id
        who = (
            f"{client.addr} (a web browser on the relay's page)"
            if client.mode == "web"
            else f"{client.addr} ({client.version}, {client.fingerprint}{source})"
        )
        # Shown even with --quiet: the host has to answer.
        if question.kind == "join":
            log.info(
                "session %s: joiner %s waits for approval", hosted.session_id, client.fingerprint
            )
            text = (
                f"{who} asks to join: ~y lets in, ~n refuses; or 'upterm session approve "
                f"{handle} {client.client_id}'"
            )
        else:
            log.info(
                "session %s: joiner %s asks to %s %s",
                hosted.session_id,
                client.fingerprint,
                question.kind,
                question.what,
            )
            text = (
                f"joiner {client.client_id} {who} asks to {question.kind} {question.what}: "
                "~y allows it, ~a allows all like it from this joiner, ~n refuses; or "
                f"'upterm session approve {handle} {client.client_id} [--all]'"
            )
        hosted.session.notify_host(text, urgent=True)
        hosted.notify_change()

    def _moderation(self, hosted: HostedSession) -> None:
        """Hold a moderated session while it has fewer moderators than it needs (at once,
        in the callback that saw one leave), release it when they are back, or end it
        (--on-moderator-leave end) once it had them."""
        policy, session = hosted.policy, hosted.session
        present, needed = policy.moderators_present(), policy.moderators
        held = present < needed
        if held == session.moderation_held:
            return
        if not held:
            hosted.moderated_once = True
            session.set_moderation_hold(False)
            log.info("session %s: %d moderators here; input open", hosted.session_id, present)
            session.notice(session.viewer_ids, f"{present} of {needed} moderators here: input open")
            return
        session.set_moderation_hold(True)
        log.info("session %s: %d of %d moderators here; held", hosted.session_id, present, needed)
        if policy.on_moderator_leave == "end" and hosted.moderated_once:
            session.broadcast(
                f"fewer moderators than the {needed} this session needs; it ends "
                "(--on-moderator-leave end)"
            )
            session.hangup()
            return
        session.notice(
            session.viewer_ids,
            f"input paused and output held: {present} of {needed} moderators here",
            urgent=True,
        )

    def _joiner_command(self, hosted: HostedSession, client: ClientInfo, text: str) -> str:
        """A command a joiner typed at its ~: prompt; the answer it sees."""
        words = text.split()
        policy = hosted.policy
        role = policy.roles.get(client.client_id, "")
        if not words:
            return ""
        if words[0] == "who":
            return "\r\n".join(
                f"{c.client_id}: {c.addr} {c.fingerprint} [{policy.roles.get(c.client_id, '')}]"
                + (" (you)" if c.client_id == client.client_id else "")
                for c in hosted.clients.values()
            )
        if words[0] not in ("kick", "role", "end"):
            return f"no command {printable(words[0], 40)!r}; help lists them"
        if role != "moderator":
            return f"only moderators may {words[0]}; you are a {role}"
        log.info(
            "session %s: moderator %s: %s", hosted.session_id, client.fingerprint, printable(text)
        )
        if words[0] == "end":
            hosted.session.broadcast(f"moderator {client.fingerprint} ended the session")
            hosted.session.hangup()
            return "ending the session"
        if len(words) != (2 if words[0] == "kick" else 3):
            return "usage: kick ID, or role ID typist|viewer|moderator (ids: who)"
        if words[0] == "role" and words[2] not in adminproto.ROLES:
            return f"no role {printable(words[2], 20)!r}: typist, viewer or moderator"
        action = adminproto.ClientAction(
            0, words[0], None, words[1], words[2] if words[0] == "role" else None
        )
        try:
            self._client_action(hosted, action)
        except UptermError as exc:
            return str(exc)
        self._notice(hosted, f"moderator {client.fingerprint}: {printable(text)}")
        return "done"

    def _recording_failed(self, hosted: HostedSession, why: str) -> None:
        """The recording's file could not be written: end the session if the recording is
        required, else say so to everyone at once (joiners were told it records)."""
        hosted.recording_error = why
        hosted.policy.recorded = ""
        path = hosted.options.record if hosted.options else "?"
        if hosted.options is not None and hosted.options.record_required:
            log.error("session %s: recording failed (%s); ending it", hosted.session_id, why)
            hosted.session.broadcast(
                f"the recording to {path} failed ({why}); --record-required ends the session"
            )
            hosted.session.hangup()
            return
        log.error("session %s: recording stopped (%s)", hosted.session_id, why)
        hosted.session.notify_host(
            f"the recording to {path} stopped: {why}; the session goes on unrecorded",
            urgent=True,
        )
        hosted.session.tell_joiners("this session is no longer being recorded")

    def _activity(self, hosted: HostedSession, activity: Activity) -> None:
        """A transfer or forward was decided, or ended: the log, the recording, the host."""
        if not activity.allowed and not self._refusal_shown(hosted, activity):
            return
        line = activity.describe()
        log.info("session %s: %s", hosted.session_id, line)
        recorder = hosted.session.recorder
        if recorder is not None and activity.ended:
            recorder.marker(line)
        # The host hears of refusals, of each forward allowed, and of each transfer done
        # (not of each forwarded connection's end: a web page opens dozens).
        if activity.kind == "forward":
            told = not activity.ended or not activity.allowed
        else:
            told = activity.ended
        if told:
            self._notice(hosted, line)

    def _refusal_shown(self, hosted: HostedSession, activity: Activity) -> bool:
        """Whether this refusal is reported: a joiner asking again and again (each refused
        at once) gets REFUSALS_SHOWN lines per REFUSAL_WINDOW_S, and then one that counts
        the rest, so it cannot fill the log, the recording or the host's screen."""
        now = time.monotonic()
        cid = activity.client.fingerprint  # per key: new connections start no new window
        if len(hosted.refusal_counts) > MAX_REFUSAL_COUNTS:
            # Keys come and go: forget the quiet windows of the ones seen before.
            hosted.refusal_counts = {
                k: v
                for k, v in hosted.refusal_counts.items()
                if now - v[0] <= REFUSAL_WINDOW_S or v[2]
            }
        start, shown, hidden = hosted.refusal_counts.get(cid, (now, 0, 0))
        if now - start > REFUSAL_WINDOW_S:
            if hidden:
                line = (
                    f"{hidden} more requests of {activity.client.addr} "
                    f"({activity.client.fingerprint}) were refused"
                )
                log.info("session %s: %s", hosted.session_id, line)
                self._notice(hosted, line)
            start, shown, hidden = now, 0, 0
        if shown >= REFUSALS_SHOWN:
            hosted.refusal_counts[cid] = (start, shown, hidden + 1)
            return False
        hosted.refusal_counts[cid] = (start, shown + 1, hidden)
        return True

    @staticmethod
    def _notice(hosted: HostedSession, text: str) -> None:
        """A short line in the host's own terminal (not the joiners'), unless --quiet."""
        if hosted.options is None or not hosted.options.quiet:
            hosted.session.notify_host(text)

    # -- attach --

    def _attach(self, req: adminproto.Attach, conn: AdminConnection) -> None:
        hosted = self._find(req.session, conn)
        if not hosted.session.started:
            raise UsageError(
                "the session is not shared yet: its host has not answered 'Accept "
                "connections?'; answer it there"
            )
        stream = conn.new_stream()
        viewer = AttachedTerminal(conn, stream, hosted.session, req.answers)
        _streams(conn)[stream] = viewer

        def closed() -> None:
            hosted.terminals.discard(viewer)
            hosted.session.detach(viewer.viewer_id)
            if req.primary and not viewer.done:
                # The host's terminal went away without detaching: end the session, as
                # closing a terminal ends the shell in it.
                log.info("session %s: host terminal closed; hanging up", hosted.session_id)
                hosted.session.hangup()

        conn.on_close(closed)
        conn.send(adminproto.ok(req.id, stream=stream, session=hosted.info()))
        hosted.session.attach(viewer, req.cols, req.rows)
        hosted.terminals.add(viewer)
        if hosted.policy.pending:
            hosted.waiting_changed()

    # -- shutdown --

    async def stop_all(self) -> None:
        """Hang up every session and wait for the commands to end."""
        for hosted in list(self.sessions.values()):
            hosted.session.broadcast(DAEMON_STOPPING_MESSAGE)
            hosted.session.hangup()
        waits = [h.session.exited for h in self.sessions.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STOP_GRACE_S)
            if pending:
                for hosted in list(self.sessions.values()):
                    hosted.session.kill()
                await asyncio.wait(pending, timeout=STOP_GRACE_S)
        # Joiners have been sent the exit status; let it reach them before the tunnels go.
        goodbyes = [
            asyncio.ensure_future(h.policy.all_closed.wait()) for h in self.sessions.values()
        ]
        if goodbyes:
            _, unsaid = await asyncio.wait(goodbyes, timeout=EXIT_FLUSH_S)
            for wait in unsaid:
                wait.cancel()
        for hosted in list(self.sessions.values()):
            hosted.tunnel.close()
            if hosted.admin is not None:
                hosted.admin.close()
        self.sessions.clear()


def _streams(conn: AdminConnection) -> dict[int, AttachedTerminal]:
    return conn.streams


def _load_identities(specs: tuple[tuple[str, str | None], ...]) -> list[asyncssh.SSHKey]:
    """Load the host's own keys (the client already asked for passphrases)."""
    keys: list[asyncssh.SSHKey] = []
    for path, passphrase in specs:
        try:
            keys.append(asyncssh.read_private_key(path, passphrase))
        except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            raise UsageError(f"cannot use private key {path}: {exc}") from exc
    return keys


def _default_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def _parse_authorized(lines: tuple[str, ...]) -> list[wire.PublicKey]:
    """Parse the authorized keys the client sent; the client already refused empty sources."""
    keys: list[wire.PublicKey] = []
    for line in lines:
        try:
            key = wire.parse_public_key_line(line)
            if key is not None:
                keyopts.parse_options(key.options)  # refused here too if not enforced
        except (RemoteProtocolError, keyopts.KeyOptionError) as exc:
            raise AuthorizedKeysError(f"authorized keys: {exc}") from exc
        if key is not None:
            keys.append(key)
    if lines and not keys:
        raise AuthorizedKeysError(
            "the authorized keys given contain no key; refusing to open the session to everyone"
        )
    return keys
