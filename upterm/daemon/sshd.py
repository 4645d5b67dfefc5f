"""The host's inner SSH server: one per channel the relay forwards, one per joiner.

Its host key is the session key the relay pinned at registration. It accepts only user
certificates signed by exactly the relay key this host pinned when it connected (never a
self-signed or foreign certificate, unlike upstream before v0.35), whose principal is the
joiner's token and whose ``upterm-auth-request`` extension names a key the host authorized.
The joiner then attaches to the shared terminal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import itertools
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from upterm import sshcompat, wire
from upterm.daemon import consent, forward, transfer
from upterm.daemon.consent import Activity, Decision, Question
from upterm.daemon.direct import DirectChannel, DirectTable, release_direct
from upterm.daemon.escapes import Escape, JoinerEscapes
from upterm.daemon.pty import PtyProcess
from upterm.daemon.session import FOLLOW_HIGH_WATER_BYTES, ClientInfo, Session
from upterm.errors import RemoteProtocolError, UptermError
from upterm.keyopts import KeyRules
from upterm.text import printable

log = logging.getLogger(__name__)

PTY_REQUIRED_MESSAGE = b"PTY is required.\r\n"
RECORDED_BANNER = "this session is being recorded"
RECORDED_WITH_INPUT_BANNER = "this session is being recorded, including what you type"
READ_ONLY_BANNER = "attached to a read-only session: what you type is dropped"
MODERATED_BANNER = "a moderated session: input only while its moderators are here"
COMMAND_REFUSED = (
    "this session shares a terminal and runs no commands (ssh TOKEN@HOST COMMAND); "
    "join with a plain ssh line and type them there"
)
LEGACY_SCP_REFUSED = (
    "this session transfers files over SFTP only: use scp without -O (or sftp, pscp, psftp)"
)
SUBSYSTEM_REFUSED = "this session shares a terminal and has no {} subsystem"
KEY_COMMAND_ONLY = "your key is authorized only for its own command (command=), not file transfer"
#: The source a browser joiner's role is looked up by (``--role web=typist``).
WEB_SOURCE = "web"
KEY_NOT_ALLOWED = (
    "your key {} is not allowed in this session; ask the host to authorize it, or for an invite"
)
INVITE_INVALID = (
    "this invite is no longer valid (used up, revoked or expired); ask the host for a new one"
)
INVITE_NOT_YOURS = "this invite is for someone else's key, not {}"
E2E_ONLY = "this session takes end-to-end joins only; join with:\r\n  {}"
E2E_ONLY_NO_LINE = "this session takes end-to-end joins only; ask the host for its -J line"
#: Input a joiner may type before the host decided on it (kept, then played).
EARLY_INPUT_BYTES = 64 * 1024
#: Refusals kept for ``upterm session info``.
MAX_REFUSALS_KEPT = 16
WAITING_MESSAGE = b"[upterm: waiting for the host to let you in]\r\n"
NOT_APPROVED = "the host did not let you in"
NOT_ANSWERED = "the host did not answer in time; ask them, then join again"
TOO_MANY_WAITING = "too many joiners are waiting for the host's answer; try again in a minute"
INVITE_USED_UP = "this invite has been used up; ask the host for a new join line"
#: Window sizes beyond this are clamped (a hostile joiner cannot make the PTY huge).
MAX_DIM = 10_000
#: Joiners that may wait for the host's approval at once (per session); one per key. More
#: are refused at once: each holds a connection on the relay and a line in the host's view.
MAX_PENDING_APPROVALS = 8
#: A joiner with this much output unsent skips ahead (output dropped until it catches up).
SKIP_AHEAD_BYTES = 512 * 1024
#: After skipping, the joiner gets this much recent output (the end of what it missed).
CATCH_UP_BYTES = 16 * 1024
SKIPPED_NOTICE = "your connection fell behind; output skipped to catch up"
#: While the output runs on faster than a joiner that fell behind takes it, the joiner gets
#: the current screen at most this often instead of the stream (in the title meanwhile,
#: SKIPPED_NOTICE) ...
FRAME_INTERVAL_S = 0.1
#: ... until less output than this came in one interval: then a last clean screen (no
#: notice line left on it), a repaint for full-screen programs, and it is live again.
STREAMING_BYTES_PER_FRAME = 16 * 1024
#: A frame waits until the joiner's unsent output is below this.
FRAME_BACKLOG_BYTES = 64 * 1024
#: After skipping, SKIPPED_NOTICE stays in the joiner's title this long.
SKIPPED_TITLE_S = 3.0
#: A removed joiner's connection closes this long after it was told.
KICK_CLOSE_DELAY_S = 1.0
#: A joiner's window changes reach the shared terminal at most once per this interval (the
#: latest size wins): a flood of them must not become a SIGWINCH storm for the program.
RESIZE_INTERVAL_S = 0.1
#: Steps of the hang-up sequence for a forced command whose joiner left.
HANGUP_STEP_S = 1.0
#: Joiners arriving before the host accepted connections wait this long, then are refused.
ACCEPT_WAIT_S = 60
_client_counter = itertools.count(1)
#: Hang-up sequences still running (kept referenced until they finish).
_background: set[asyncio.Task[None]] = set()


@dataclass
class Invite:
    """A join line that works ``uses_left`` more times until ``expires_at`` (wall clock)."""

    code: str
    keys: frozenset[bytes]
    label: str
    expires_at: float
    uses_left: int

    def valid(self, now: float) -> bool:
        """Whether it can still be used."""
        return self.uses_left > 0 and now < self.expires_at


def _invite_code(username: str) -> str | None:
    try:
        return wire.decode_token(username).invite
    except RemoteProtocolError:
        return None


@dataclass(frozen=True)
class Refusal:
    """A joiner refused after it proved its key."""

    fingerprint: str
    addr: str
    reason: str
    at: float = field(default_factory=time.time)


@dataclass
class GuestPolicy:
    """What the inner server needs to know about its hosted session."""

    session: Session
    #: Wire blob of the relay key pinned when the host connected; the only trusted signer.
    relay_key_blob: bytes
    #: Wire blobs of authorized joiner keys; empty means any key the relay let through.
    authorized: frozenset[bytes]
    accepting: asyncio.Event
    on_join: Callable[[ClientInfo], None]
    on_leave: Callable[[str], None]
    hide_client_ip: bool = False
    read_only: bool = False
    force_command: tuple[str, ...] = ()
    #: Refuse relay-certificate joins: only joiners whose own key reaches us end to end.
    e2e_only: bool = False
    #: "" (not recorded), "output", or "input" (keystrokes too): joiners are told.
    recorded: str = ""
    #: Where each authorized key came from ("github:octocat", a file path).
    sources: dict[bytes, str] = field(default_factory=dict)
    #: What each key's authorized_keys options allow (keys without options: anything).
    key_rules: dict[bytes, KeyRules] = field(default_factory=dict)
    #: The rules of each admitted joiner's key, by client id.
    client_rules: dict[str, KeyRules] = field(default_factory=dict)
    #: Invites by code: join lines that work for a while, a few times, maybe one identity.
    invites: dict[str, Invite] = field(default_factory=dict)
    #: Role of each admitted joiner ("typist" or "viewer"), changed live by the host.
    roles: dict[str, str] = field(default_factory=dict)
    default_role: str = "typist"
    #: Roles by authorized-keys source label, overriding the default.
    source_roles: dict[str, str] = field(default_factory=dict)
    #: Ask the host before letting each joiner in (--approve).
    approve: bool = False
    approve_timeout_s: float = 60.0
    #: Questions waiting for the host's answer, oldest first: joiners (keyed by client id)
    #: and their transfers and forwards.
    pending: dict[str, Question] = field(default_factory=dict)
    on_pending: Callable[[Question], None] | None = None
    #: Called when a joiner stops waiting (answered, timed out, gone).
    on_pending_done: Callable[[], None] | None = None
    #: Open channels of each joiner, to tell or remove them.
    by_client: dict[str, set[GuestSession]] = field(default_factory=dict)
    #: Joiners the host removed: no new channel for them while their connection closes.
    removed: set[str] = field(default_factory=set)
    #: The end-to-end join line for a user name (shown to relay joiners of --e2e-only).
    e2e_line: Callable[[str], str] | None = None
    #: The last joiners refused after proving their key, and why (for the host).
    refusals: collections.deque[Refusal] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_REFUSALS_KEPT)
    )
    #: File transfer (SFTP, scp) offered at all (--no-sftp turns it off).
    sftp: bool = True
    #: Transfers go ahead without asking the host (--accept-transfers, --full-access).
    accept_transfers: bool = False
    #: ``ssh -L`` through the session: "" (refused), "loopback" or "any" destination.
    allow_forwarding: str = ""
    #: Forwards go ahead without asking the host (--accept-forwards, --full-access).
    accept_forwards: bool = False
    #: Whether someone can answer a question now (a host terminal is attached).
    can_ask: Callable[[], bool] = lambda: False
    #: (client id, "transfer" or "forward"): the host allowed everything of that kind.
    allowed_all: set[tuple[str, str]] = field(default_factory=set)
    #: (client id, destination): forwards the host allowed; the next connection there
    #: does not ask again (a web page opens many).
    allowed_destinations: set[tuple[str, str]] = field(default_factory=set)
    #: The last transfers and forwards, for ``upterm session info``.
    activity: collections.deque[Activity] = field(
        default_factory=lambda: collections.deque(maxlen=consent.MAX_ACTIVITY_KEPT)
    )
    #: Told of each activity when decided and again when it ends (log, notice, recording).
    on_activity: Callable[[Activity], None] | None = None
    #: Moderators needed for input (--moderators; 0: not moderated), and what happens
    #: when fewer are present ("pause" or "end"); on_moderation re-judges it.
    moderators: int = 0
    on_moderator_leave: str = "pause"
    on_moderation: Callable[[], None] | None = None
    #: A moderator's command from its own terminal (~: kick 3): the answer to show it.
    on_command: Callable[[ClientInfo, str], str] | None = None
    #: The web link browsers join with (``--web``): its credential and expiry (epoch s);
    #: None: no web joiners (never had one, or revoked).
    web: tuple[wire.WebCredential, int] | None = None
    #: Joiner channels still open; the tunnel stays up until they have said goodbye.
    open_channels: set[object] = field(default_factory=set)
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Direct channels from the relay waiting for the joiner terminal that names them.
    direct: DirectTable = field(default_factory=DirectTable)

    def web_link_valid(self, presented: str, now: float | None = None) -> bool:
        """Whether ``presented`` is this session's web link, not expired nor revoked (the
        host checks the secret itself: the relay keeps only its digest)."""
        if self.web is None or not presented:
            return False
        credential, expires = self.web
        now = time.time() if now is None else now
        return hmac.compare_digest(presented.encode(), str(credential).encode()) and now < expires

    def viewer_only(self, client_id: str) -> bool:
        """Whether this joiner's key may only watch (``restrict``)."""
        rules = self.client_rules.get(client_id)
        return rules is not None and rules.viewer_only

    def key_refusal(self, username: str, blob: bytes, addr: str | None = None) -> tuple[str, str]:
        """Whether this key may join under this user name: (its source label, "") if so,
        else ("", why not, in words for the joiner).

        A token with an invite code is judged by the invite alone: unknown, expired or used
        up means no, and an invite for an identity admits only that identity's keys.
        """
        code = _invite_code(username)
        if code is not None:
            invite = self.invites.get(code)
            if invite is None or not invite.valid(time.time()):
                return "", INVITE_INVALID
            if invite.keys and blob not in invite.keys:
                return "", INVITE_NOT_YOURS.format(wire.fingerprint_sha256(blob))
            return f"invite {code}" + (f" for {invite.label}" if invite.label else ""), ""
        if self.authorized and blob not in self.authorized:
            return "", KEY_NOT_ALLOWED.format(wire.fingerprint_sha256(blob))
        rules = self.key_rules.get(blob)
        if rules is not None:
            refusal = rules.refusal(addr)
            if refusal:
                return "", refusal
        return self.sources.get(blob, ""), ""

    def refused(self, client: ClientInfo, reason: str) -> None:
        """Note a refusal for the host (its log and ``upterm session info``)."""
        log.info("refused joiner %s from %s: %s", client.fingerprint, client.addr, reason)
        self.refusals.append(Refusal(client.fingerprint, client.addr, reason))

    def use_invite(self, username: str) -> bool:
        """Spend one use of the invite in ``username`` (True if there is none to spend)."""
        code = _invite_code(username)
        if code is None:
            return True
        invite = self.invites.get(code)
        if invite is None or not invite.valid(time.time()):
            return False
        invite.uses_left -= 1
        if invite.uses_left <= 0:
            del self.invites[code]
        return True

    async def admit(self, client: ClientInfo) -> str | None:
        """Decide on a joiner who proved its key: its role, and the host's approval if
        asked. Returns None to let it in, else what to tell it."""
        if self.approve:
            waiting = [q.client for q in self.pending.values() if q.waiting and q.kind == "join"]
            if len(waiting) >= MAX_PENDING_APPROVALS or any(
                c.fingerprint == client.fingerprint for c in waiting
            ):
                log.info(
                    "joiner %s refused: %d joiners already wait for approval",
                    client.fingerprint,
                    len(waiting),
                )
                return TOO_MANY_WAITING
            reply = await self._put(client.client_id, client, "join", "")
            if reply is None:
                log.info("joiner %s: the host did not answer", client.fingerprint)
                return NOT_ANSWERED
            if reply in ("no", "gone"):
                log.info("joiner %s not approved", client.fingerprint)
                return NOT_APPROVED
        # Browsers watch unless the host says otherwise (--role web=typist, session role).
        default = "viewer" if client.mode == "web" else self.default_role
        role = self.source_roles.get(client.source, default)
        if self.viewer_only(client.client_id):
            role = "viewer"
        self.roles[client.client_id] = role
        return None

    async def _put(self, qid: str, client: ClientInfo, kind: str, what: str) -> str | None:
        """Ask the host and wait: "once", "all" or "no"; None if nobody answered in time."""
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending[qid] = Question(qid, client, kind, what, answer)
        if self.on_pending is not None:
            self.on_pending(self.pending[qid])
        try:
            return await asyncio.wait_for(answer, self.approve_timeout_s)
        except TimeoutError:
            return None
        finally:
            self.pending.pop(qid, None)
            if self.on_pending_done is not None:
                self.on_pending_done()

    def answer(
        self, client_id: str | None, approved: bool, everything: bool = False
    ) -> Question | None:
        """The host's answer to the oldest question waiting (of this joiner, if given).

        ``everything`` allows this and every later request of the same group (transfers,
        or forwards) from the joiner, for as long as it stays connected.
        """
        question = next(
            (
                q
                for q in self.pending.values()
                if q.waiting and (client_id is None or q.client.client_id == client_id)
            ),
            None,
        )
        if question is None:
            return None
        if approved and everything and question.kind != "join":
            self.allowed_all.add((question.client.client_id, consent.group_of(question.kind)))
        question.answer.set_result(("all" if everything else "once") if approved else "no")
        return question

    async def ask(
        self,
        client: ClientInfo,
        kind: str,
        what: str,
        asking: Callable[[], None] | None = None,
    ) -> Activity:
        """May this joiner do this (a transfer or a forward)? Asks the host unless allowed
        up front (``asking`` is called when it does); refused if nobody can answer. The
        decision is recorded and reported."""
        decision = await self._decide(client, kind, what, asking)
        activity = Activity(
            client, kind, what, decision.allowed, decision.by, ended=not decision.allowed
        )
        self.activity.append(activity)
        self.report(activity)
        return activity

    def report(self, activity: Activity) -> None:
        """Tell the host's side (log, terminal, recording) about an activity's news."""
        if self.on_activity is not None:
            self.on_activity(activity)

    async def _decide(
        self, client: ClientInfo, kind: str, what: str, asking: Callable[[], None] | None
    ) -> Decision:
        group = consent.group_of(kind)
        if group == "transfer" and self.accept_transfers:
            return Decision(True, "--accept-transfers")
        if group == "forward" and self.accept_forwards:
            return Decision(True, "--accept-forwards")
        if (client.client_id, group) in self.allowed_all:
            return Decision(True, consent.BY_HOST_ALL)
        if kind == "forward" and (client.client_id, what) in self.allowed_destinations:
            return Decision(True, consent.BY_HOST_BEFORE)
        if not self.can_ask():
            return Decision(False, consent.BY_NOBODY)
        waiting = [q for q in self.pending.values() if q.waiting and q.kind != "join"]
        # Per key, not per connection: more connections must not mean more questions.
        mine = [q for q in waiting if q.client.fingerprint == client.fingerprint]
        if (
            len(waiting) >= consent.MAX_WAITING_QUESTIONS
            or len(mine) >= consent.MAX_WAITING_PER_JOINER
        ):
            return Decision(False, consent.BY_TOO_MANY)
        qid = f"{client.client_id}.{next(_client_counter)}"
        if asking is not None:
            asking()
        reply = await self._put(qid, client, kind, what)
        if reply is None:
            return Decision(False, consent.BY_TIMEOUT)
        if reply == "gone":
            return Decision(False, consent.BY_JOINER_GONE)
        if reply == "no":
            return Decision(False, consent.BY_HOST)
        if kind == "forward":
            self.allowed_destinations.add((client.client_id, what))
        return Decision(True, consent.BY_HOST_ALL if reply == "all" else consent.BY_HOST)

    def forget(self, client_id: str) -> None:
        """A joiner's connection closed: what the host allowed it goes with it."""
        self.allowed_all.discard((client_id, "transfer"))
        self.allowed_all.discard((client_id, "forward"))
        self.allowed_destinations = {d for d in self.allowed_destinations if d[0] != client_id}
        for question in list(self.pending.values()):
            if question.client.client_id == client_id and question.waiting:
                question.answer.set_result("gone")

    def can_type(self, client_id: str) -> bool:
        """Whether this joiner's keystrokes reach the terminal."""
        return not self.read_only and self.roles.get(client_id) in ("typist", "moderator")

    def moderators_present(self) -> int:
        """Moderators on the shared terminal now: distinct keys with a terminal channel
        (one person connected twice is one moderator)."""
        return len(
            {
                channel.fingerprint
                for cid, channels in self.by_client.items()
                if self.roles.get(cid) == "moderator"
                for channel in channels
                if channel.attached
            }
        )

    def moderation_changed(self) -> None:
        """Who is on the terminal changed: a moderated session may be held or released."""
        if self.moderators and self.on_moderation is not None:
            self.on_moderation()

    def channel_opened(self, chan: object) -> None:
        """Track a joiner channel."""
        self.open_channels.add(chan)
        self.all_closed.clear()

    def channel_closed(self, chan: object) -> None:
        """Forget a joiner channel."""
        self.open_channels.discard(chan)
        if not self.open_channels:
            self.all_closed.set()


class InnerServer(asyncssh.SSHServer):
    """Authenticates one joiner arriving through the relay (or end to end).

    Authentication decides only whether the key may join at all (authorized, invite valid);
    it never asks the host or spends anything, and a key query is answered yes whatever the
    key (see :func:`sshcompat.decide_on_signed_requests`): only a joiner that proved it holds
    its key gets further. The host's approval, and the invite's use, come after, once per
    connection, when the joiner opens its terminal; it is told it waits, and why it is
    refused.
    """

    def __init__(self, policy: GuestPolicy) -> None:
        self._policy = policy
        self._conn: asyncssh.SSHServerConnection | None = None
        self._client: ClientInfo | None = None
        self._username = ""
        self._allowed = False
        #: Why this joiner, who may authenticate, gets no terminal (told on its channel).
        self._refusal = ""
        #: The host's decision on this connection: None (let in) or the refusal's words.
        self._admission: asyncio.Task[str | None] | None = None
        #: What the joiner asked for and never gets (ssh -R), told on its terminal.
        self._notes: set[str] = set()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        sshcompat.judge_kex_guesses(conn)  # Dropbear's dbclient guesses
        sshcompat.skip_config_reload(conn)  # no sshd_config: no per-login options rebuild
        sshcompat.prefer_host_key(conn)  # the session key, when the client takes ed25519
        sshcompat.answer_pings(conn)  # OpenSSH's keystroke-timing chaff needs them
        sshcompat.skip_ignore_padding(conn)  # a packet and a write less per packet sent
        sshcompat.decide_on_signed_requests(conn)
        sshcompat.refuse_sha1_signatures(conn)
        sshcompat.on_client_certificate(conn, self._check_certificate)

    def connection_lost(self, exc: Exception | None) -> None:
        # A joiner's role lives as long as its connection: the relay carries all of one
        # joiner's channels (an OpenSSH ControlMaster reusing one) on this one connection,
        # and a channel opened after another closed types as before.
        if self._admission is not None and not self._admission.done():
            self._admission.cancel()
        if self._client is not None:
            self._policy.roles.pop(self._client.client_id, None)
            self._policy.client_rules.pop(self._client.client_id, None)
            self._policy.forget(self._client.client_id)
            self._policy.removed.discard(self._client.client_id)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # A bare key here means an end-to-end join (ssh -J TOKEN@relay TOKEN@upterm): the
        # relay only spliced bytes and the joiner proved its own key to us directly.
        blob = bytes(key.public_data)
        if blob == self._policy.relay_key_blob:
            return False  # the relay itself must never pass for an end-to-end joiner
        assert self._conn is not None
        version = self._conn.get_extra_info("client_version") or ""
        return await self._authorize(username, blob, "e2e", version, "[end-to-end]")

    async def _authorize(
        self, username: str, blob: bytes, mode: str, version: str, addr: str
    ) -> bool:
        """Whether this key may authenticate (nothing asked, nothing spent).

        A key the session refuses still authenticates once its holder proved it (asyncssh
        checks the signature after this): it then gets a channel that only says why, so
        the joiner reads the reason instead of "Permission denied".
        """
        fingerprint = wire.fingerprint_sha256(blob)
        if self._client is not None and self._client.fingerprint == fingerprint:
            return self._allowed
        if mode == "web":
            # No key of its own (the relay made one up): the web link admitted it.
            source, refusal = WEB_SOURCE, ""
        else:
            source, refusal = self._policy.key_refusal(
                username, blob, addr if mode == "relay" else None
            )
        if not refusal and mode in ("relay", "web") and self._policy.e2e_only:
            line = self._policy.e2e_line(username) if self._policy.e2e_line else ""
            refusal = E2E_ONLY.format(line) if line else E2E_ONLY_NO_LINE
        if not await self._wait_accepting():
            return False
        self._client = ClientInfo(
            client_id=f"{next(_client_counter)}",
            version=printable(version),
            addr="[redacted]"
            if self._policy.hide_client_ip and mode in ("relay", "web")
            else printable(addr),
            fingerprint=fingerprint,
            mode=mode,
            source=source,
        )
        rules = self._policy.key_rules.get(blob)
        if rules is not None:
            self._policy.client_rules[self._client.client_id] = rules
        self._username = username
        self._refusal = refusal
        self._allowed = True
        return True

    def auth_completed(self) -> None:
        # Only now has the joiner proved its key: a refusal is worth the host's attention.
        if self._client is not None and self._refusal:
            self._policy.refused(self._client, self._refusal)

    def admission(self) -> asyncio.Task[str | None]:
        """The host's decision on this joiner (once per connection): None lets it in, else
        what to tell it."""
        if self._admission is None:
            self._admission = asyncio.ensure_future(self._admit())
        return self._admission

    async def _admit(self) -> str | None:
        assert self._client is not None
        refusal = await self._policy.admit(self._client)
        if refusal is None and not self._policy.use_invite(self._username):
            refusal = INVITE_USED_UP
        return refusal

    async def _wait_accepting(self) -> bool:
        if self._policy.accepting.is_set():
            return True
        try:
            await asyncio.wait_for(self._policy.accepting.wait(), ACCEPT_WAIT_S)
        except TimeoutError:
            return False
        return True

    async def _check_certificate(self, username: str, blob: bytes) -> bytes | None:
        try:
            cert = wire.verify_guest_certificate(
                blob, self._policy.relay_key_blob, username, int(time.time())
            )
            joiner_key = cert.auth.public_key()
        except RemoteProtocolError as exc:
            log.info("refused a guest certificate: %s", exc)
            return None
        mode = "relay"
        if cert.web:
            # A browser through the relay's page: its link is its credential, checked here
            # again (expired or revoked links stop at once, whatever the relay thinks).
            if not self._policy.web_link_valid(cert.web):
                addr = printable(cert.auth.remote_addr)
                log.info("refused a web joiner from %s: not this session's web link", addr)
                return None
            mode = "web"
        allowed = await self._authorize(
            username, joiner_key.blob, mode, cert.auth.client_version, cert.auth.remote_addr
        )
        return cert.certified_blob if allowed else None

    def session_requested(self) -> Any:
        if self._client is None or not self._allowed:
            return False
        if self._refusal:
            return _RefusedSession(self._refusal, self._policy.direct)
        if self._client.client_id in self._policy.removed:
            return False
        return GuestSession(self._policy, self._client, self)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        """``ssh -L``: refused unless the host allows forwarding, and then asked about."""
        if self._client is None or not self._allowed or self._client.mode == "web":
            return False
        if self._refusal:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"upterm: {self._refusal}"
            )
        return self._forward(dest_host, dest_port)

    async def _forward(self, dest_host: str, dest_port: int) -> asyncssh.SSHTCPSession[bytes]:
        client, policy = self._client, self._policy
        assert client is not None
        if policy.allow_forwarding:
            # The host's decision on the joiner comes first (--approve, invites), as for
            # a terminal: a connection that only forwards is a joiner too.
            refusal = await self.admission()
            if refusal is not None:
                raise asyncssh.ChannelOpenError(
                    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"upterm: {refusal}"
                )
        rules = policy.client_rules.get(client.client_id)
        may_forward = ""
        if rules is not None and rules.no_port_forwarding:
            may_forward = forward.KEY_NO_FORWARDING
        elif not policy.can_type(client.client_id):
            may_forward = forward.NOT_FOR_VIEWERS
        session = await forward.open_forward(
            mode=policy.allow_forwarding,
            may_forward=may_forward,
            client=client,
            dest_host=dest_host,
            dest_port=dest_port,
            ask=policy.ask,
            report=policy.report,
        )
        if self._conn is None or self._conn.is_closed():
            # The joiner left while the host was asked or the destination dialled:
            # asyncssh then never opens the channel, so nothing else would close it.
            session.abandon()
        return session

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self.note(wire.REMOTE_FORWARDING_REFUSED)
        return False

    def note(self, text: str) -> None:
        """Something the joiner asked for and never gets: told once, on its terminal's
        stderr when it has one (now, or once it opens)."""
        if text in self._notes:
            return
        self._notes.add(text)
        client_id = self._client.client_id if self._client else ""
        for guest in self._policy.by_client.get(client_id, ()):
            guest.write_note(text, joined_only=True)

    def notes(self) -> set[str]:
        """What :meth:`note` was told so far."""
        return self._notes


class _RefusedSession(asyncssh.SSHServerSession[bytes]):
    """The only channel a refused joiner gets: it says why and closes (exit status 1)."""

    def __init__(self, reason: str, direct: DirectTable) -> None:
        self._reason = reason
        self._direct = direct
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        if self._chan is not None:
            # A direct channel the relay opened for this terminal goes first (the relay
            # passes the status on once it closed).
            release_direct(self._direct, self._chan.get_environment())
            with contextlib.suppress(OSError, asyncssh.Error):
                self._chan.write_stderr(f"upterm: {self._reason}.\r\n".encode())
                self._chan.exit(1)
            # The connection goes too, once the reason had time to arrive: a refused joiner
            # must not keep an authenticated connection open (or open channel after channel).
            conn = self._chan.get_extra_info("connection")
            asyncio.get_running_loop().call_later(KICK_CLOSE_DELAY_S, conn.close)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        return  # a refused joiner's keys go nowhere


class GuestSession(asyncssh.SSHServerSession[bytes]):
    """A joiner's session channel: a viewer (and typist) of the shared terminal, or, with a
    forced command, the joiner's own process on its own PTY."""

    def __init__(self, policy: GuestPolicy, client: ClientInfo, server: InnerServer) -> None:
        self._policy = policy
        self._client = client
        self._server = server
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        #: The direct channel carrying this terminal's bytes (upterm.daemon.direct), if the
        #: relay opened one; and whether the channel's close waits for it to flush.
        self._direct: DirectChannel | None = None
        self._closing = False
        self._pty: tuple[int, int] | None = None
        self._term = "xterm-256color"
        self._attached = False
        self._forced: PtyProcess | None = None
        self._skipping = False
        #: While skipping: the next frame, and the output count at the last one.
        self._frame_timer: asyncio.TimerHandle | None = None
        self._frame_mark = 0
        self._frames = False
        self._title_timer: asyncio.TimerHandle | None = None
        self._resize_timer: asyncio.TimerHandle | None = None
        self._resize_pending: tuple[int, int] | None = None
        #: Why this channel is refused (an exec or subsystem request), once it starts.
        self._refusal = ""
        #: What the joiner typed before the host's decision (None once decided), and
        #: whether it closed its input meanwhile: played once it is let in.
        self._early: bytearray | None = bytearray()
        self._early_eof = False
        #: An SFTP channel's server session (asyncssh's), which gets the channel's data.
        self._files: Any = None
        self._escapes = JoinerEscapes()
        self.viewer_id = f"guest-{client.client_id}-{next(_client_counter)}"

    @property
    def paces(self) -> bool:
        """Joiners never hold the shared PTY back."""
        return False

    @property
    def attached(self) -> bool:
        """Whether this channel is on the shared terminal now."""
        return self._attached

    @property
    def fingerprint(self) -> str:
        """The joiner's key."""
        return self._client.fingerprint

    @property
    def _out(self) -> Any:
        """The channel this joiner's output goes on: its direct channel once claimed."""
        return self._direct.chan if self._direct is not None else self._chan

    def _claim_direct(self) -> None:
        """Take the direct channel the relay opened for this terminal, if it named one."""
        if self._chan is None or self._client.mode != "relay":
            return  # only the relay opens direct channels, for the joiners it certifies
        direct = self._policy.direct.claim_named(self._chan.get_environment())
        if direct is None:
            return
        self._direct = direct
        direct.chan.set_write_buffer_limits(FOLLOW_HIGH_WATER_BYTES)
        direct.attach(self)

    def _exit(self, status: int) -> None:
        """End the channel with ``status``. With a direct channel, the close waits until
        nothing of the output waits here: at once if all of it went to the tunnel (whose
        packets keep their order), else once the direct channel has flushed and closed.
        The status itself goes at once either way (a channel request, which flow control
        does not hold): the relay keeps it until the end, so a joiner far behind still
        gets it when the connection is closed before then (a kick, the session's end)."""
        if self._chan is None:
            return
        direct = self._direct
        if direct is None:
            self._chan.exit(status)
            return
        if self._closing:
            return
        direct.chan.close()  # sent after what waits for the relay's window
        if direct.chan.get_write_buffer_size():
            self._closing = True
            sshcompat.send_channel_request(
                self._chan, "exit-status", wire.ssh_uint32(status & 0xFF)
            )
            return  # closed by direct_closed
        direct.detach()
        self._direct = None
        self._chan.exit(status)

    # The direct channel's traffic (upterm.daemon.direct.DirectSink)

    def direct_data(self, data: bytes, datatype: int | None) -> None:
        """Input through the direct channel: as if it came on the session channel."""
        self.data_received(data, datatype)

    def direct_eof(self) -> None:
        """The joiner closed its input, through the direct channel."""
        self.eof_received()

    def direct_paused(self) -> None:
        """The relay's window on the direct channel is full."""
        self._writing_paused()

    def direct_resumed(self) -> None:
        """The direct channel drained."""
        self._writing_resumed()

    def direct_closed(self) -> None:
        """The direct channel closed: the session channel's close waiting for it goes;
        or (the relay closed it first) output goes on the session channel again."""
        self._direct = None
        if self._closing and self._chan is not None:
            self._chan.close()  # its status went already
        elif self._skipping:
            self._writing_resumed()  # it waited for the closed channel to drain

    # asyncssh callbacks

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        # Output waiting for a joiner that does not read is held merged, not an entry per
        # PTY read (a program printing a byte at a time would make that quadratic).
        sshcompat.merge_channel_buffers(chan)
        chan.set_write_buffer_limits(FOLLOW_HIGH_WATER_BYTES)
        self._policy.channel_opened(self)
        self._policy.by_client.setdefault(self._client.client_id, set()).add(self)
        sshcompat.on_refused_forwarding(chan, self._note_refused)

    def _note_refused(self, what: str) -> None:
        text = wire.AGENT_FORWARDING_REFUSED if what == "agent" else wire.X11_FORWARDING_REFUSED
        self._server.note(text)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], _m: Any) -> bool:
        cols, rows = term_size[0] or 80, term_size[1] or 24
        self._pty = (min(cols, MAX_DIM), min(rows, MAX_DIM))
        if term_type and term_type.isprintable() and len(term_type) <= 64:
            self._term = term_type
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        # Accepted only to say why nothing runs: a refused request reaches the joiner as a
        # bare "exec request failed" (or, through the relay, "upstream unavailable").
        legacy_scp = command.startswith("scp ") and ("-t" in command or "-f" in command)
        self._refusal = LEGACY_SCP_REFUSED if legacy_scp else COMMAND_REFUSED
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        rules = self._policy.client_rules.get(self._client.client_id)
        if subsystem != "sftp" or self._client.mode == "web":
            # A browser only watches or types: the relay's page never asks for files.
            self._refusal = SUBSYSTEM_REFUSED.format(subsystem)
        elif not self._policy.sftp:
            self._refusal = transfer.TRANSFERS_OFF
        elif rules is not None and rules.command is not None:
            self._refusal = KEY_COMMAND_ONLY
        else:
            assert self._chan is not None
            self._files = sshcompat.sftp_session(self._host_files)
            self._files.connection_made(self._chan)
        return True

    def _host_files(self, chan: asyncssh.SSHServerChannel[bytes]) -> transfer.HostFiles:
        env = self._policy.session.env
        client_id = self._client.client_id
        return transfer.HostFiles(
            chan,
            home=env.get("HOME") or str(Path.home()),
            client=self._client,
            ask=self._policy.ask,
            report=self._policy.report,
            may_write=lambda: self._policy.can_type(client_id),
        )

    def session_started(self) -> None:
        assert self._chan is not None
        if self._refusal:
            log.info("joiner %s: %s", self._client.fingerprint, self._refusal)
            self._chan.write_stderr(f"upterm: {self._refusal}\r\n".encode())
            self._chan.exit(1)
            return
        if self._files is not None:
            # File transfer waits for the host's decision on the joiner, as a terminal does.
            self._server.admission().add_done_callback(self._files_admitted)
            return
        if self._pty is None:
            self._chan.write(PTY_REQUIRED_MESSAGE)
            self._chan.exit(1)
            return
        self._claim_direct()
        admission = self._server.admission()
        if admission.done():
            self._admitted(admission)
            return
        if self._policy.approve:
            self._out.write(WAITING_MESSAGE)
        admission.add_done_callback(self._admitted)

    def _files_admitted(self, admission: asyncio.Task[str | None]) -> None:
        chan = self._chan
        if chan is None or admission.cancelled():
            return
        refusal = admission.result()
        if refusal is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                chan.write_stderr(f"upterm: {refusal}.\r\n".encode())
                chan.exit(1)
            return
        self._policy.on_join(self._client)
        self._files.session_started()

    def _admitted(self, admission: asyncio.Task[str | None]) -> None:
        """The host decided: join, or be told why not."""
        chan = self._chan
        if chan is None or admission.cancelled():
            return
        refusal = admission.result()
        early, self._early = self._early, None
        if refusal is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._out.write(f"upterm: {refusal}.\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)
                self._exit(1)
            return
        self._join()
        if early:
            self.data_received(bytes(early), None)
        if self._early_eof:
            self.eof_received()

    def write_note(self, text: str, joined_only: bool = False) -> None:
        """One line of ours on the joiner's stderr (not on the shared screen); with
        ``joined_only``, only if it is on the shared terminal already (else it is told when
        it gets there)."""
        if joined_only and not self._attached:
            return
        if self._chan is not None and self._files is None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._out.write(f"upterm: {text}\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)

    def _join(self) -> None:
        for text in sorted(self._server.notes()):
            self.write_note(text)
        self._policy.on_join(self._client)
        assert self._pty is not None
        rules = self._policy.client_rules.get(self._client.client_id)
        if rules is not None and rules.command is not None:
            # The key's own command="...", as sshd runs it: through the user's shell.
            shell = self._policy.session.env.get("SHELL") or "/bin/sh"
            self._start_forced(*self._pty, argv=(shell, "-c", rules.command))
            return
        if self._policy.force_command:
            self._start_forced(*self._pty)
            return
        self._attached = True
        self._tell_role()
        # Only those who may type shape the shared terminal; a viewer does not shrink it.
        session = self._policy.session
        session.attach(self, *self._pty, sized=self._policy.can_type(self._client.client_id))
        # Told after the catch-up (which starts from a clean screen), as notices: above the
        # shell's line, or in the title until a full-screen program is left.
        if self._policy.read_only:
            session.notice([self.viewer_id], READ_ONLY_BANNER)
        if self._policy.recorded:
            session.notice(
                [self.viewer_id],
                RECORDED_WITH_INPUT_BANNER if self._policy.recorded == "input" else RECORDED_BANNER,
                urgent=True,
            )
        if self._policy.moderators:
            role = self._policy.roles.get(self._client.client_id, "")
            session.notice([self.viewer_id], f"{MODERATED_BANNER}; you are a {role} (~? helps)")
        self._policy.moderation_changed()

    def _tell_role(self) -> None:
        """A browser's page shows its role: the relay's web joiner passes this on."""
        if self._client.mode != "web" or self._chan is None:
            return
        role = self._policy.roles.get(self._client.client_id, "viewer")
        if not self._policy.can_type(self._client.client_id):
            role = "viewer"
        with contextlib.suppress(OSError, asyncssh.Error):
            sshcompat.send_channel_request(
                self._chan, wire.WEB_ROLE_REQUEST, wire.ssh_string(role.encode())
            )

    def _tell_removed(self, message: bytes) -> None:
        """A browser's page says why it was removed, even while output waits for it."""
        if self._client.mode != "web" or self._chan is None:
            return
        text = printable(message.decode("utf-8", "replace").strip().strip("[]"))
        with contextlib.suppress(OSError, asyncssh.Error):
            sshcompat.send_channel_request(
                self._chan, wire.WEB_REMOVED_REQUEST, wire.ssh_string(text[:200].encode())
            )

    def role_changed(self) -> None:
        """The host changed this joiner's role: its size counts only while it may type."""
        self._tell_role()
        if self._attached:
            self._policy.session.set_sized(
                self.viewer_id, self._policy.can_type(self._client.client_id)
            )

    def _start_forced(self, cols: int, rows: int, argv: tuple[str, ...] = ()) -> None:
        assert self._chan is not None
        env = self._policy.session.env
        env.pop(wire.ADMIN_SOCKET_ENV, None)
        env["TERM"] = self._term
        try:
            procs: list[PtyProcess] = []
            self._forced = PtyProcess(
                argv or self._policy.force_command,
                env=env,
                cwd=self._policy.session.cwd,
                cols=cols,
                rows=rows,
                on_output=self.send,
                # Closes this process's PTY even after the joiner left (then _forced is None).
                on_exit=lambda status: self._forced_exited(procs[0], status),
            )
            procs.append(self._forced)
        except UptermError as exc:
            self._out.write(f"upterm: {exc}\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)
            self._exit(1)

    def _forced_exited(self, proc: PtyProcess, status: int) -> None:
        proc.close()
        if self._chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._exit(status)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self._files is not None:
            self._files.data_received(data, datatype)
            return
        if datatype is not None:
            return
        if self._early is not None:  # the host has not decided yet: kept, bounded
            self._early += data[: max(0, EARLY_INPUT_BYTES - len(self._early))]
            return
        data, escapes = self._escapes.feed(data)
        for escape in escapes:
            self._escape(escape)
        if not data or not self._policy.can_type(self._client.client_id):
            return  # viewers' keystrokes are read and dropped, whatever the relay does
        if self._forced is not None:
            self._forced.write(data)
        elif self._attached:
            self._policy.session.input(data, self._client.fingerprint)

    def _escape(self, escape: Escape) -> None:
        """The joiner's own prompt (~:): shown on its terminal only."""
        chan = self._chan
        if chan is None:
            return
        if escape.kind == "open":
            text = "\r\nupterm> "
        elif escape.kind == "echo":
            text = escape.text
        elif escape.kind == "cancel":
            text = "\r\n"
        elif escape.kind == "help" or escape.text in ("help", "?"):
            text = "\r\n" + self._help() + "\r\n"
        else:
            answer = ""
            if self._policy.on_command is not None:
                answer = self._policy.on_command(self._client, escape.text)
            text = "\r\n" + (f"upterm: {answer}\r\n" if answer else "")
        with contextlib.suppress(OSError, asyncssh.Error):
            self._out.write(text.encode())

    def _help(self) -> str:
        role = self._policy.roles.get(self._client.client_id, "")
        lines = [
            f"upterm: you are a {role}. At the start of a line, ~: opens this prompt; then:",
            "  help          this list",
            "  who           who is here: ids, addresses, keys, roles",
        ]
        if role == "moderator":
            lines += [
                "  kick ID       remove a joiner",
                "  role ID ROLE  typist, viewer or moderator",
                "  end           end the session for everyone",
            ]
        return "\r\n".join(lines)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if not (width and height):
            return
        size = (min(width, MAX_DIM), min(height, MAX_DIM))
        if self._resize_timer is not None:
            self._resize_pending = size  # applied when the interval ends
            return
        self._apply_resize(size)
        self._resize_timer = asyncio.get_running_loop().call_later(
            RESIZE_INTERVAL_S, self._resize_interval_over
        )

    def _resize_interval_over(self) -> None:
        self._resize_timer = None
        size, self._resize_pending = self._resize_pending, None
        if size is not None:
            self.terminal_size_changed(size[0], size[1], 0, 0)

    def _apply_resize(self, size: tuple[int, int]) -> None:
        if self._forced is not None:
            self._forced.resize(*size)
        elif self._attached:
            self._policy.session.resize(self.viewer_id, *size)
        elif self._pty is not None:
            # Not on the shared terminal yet (waiting for the host): it joins at this size.
            self._pty = size

    def pause_writing(self) -> None:
        if self._files is not None:
            self._files.pause_writing()
        elif self._direct is None:  # else the direct channel's flow is what counts
            self._writing_paused()

    def resume_writing(self) -> None:
        if self._files is not None:
            self._files.resume_writing()
        elif self._direct is None:
            self._writing_resumed()

    def _writing_paused(self) -> None:
        # A forced command is the joiner's own: it may wait for its joiner.
        if self._forced is not None:
            self._forced.pause_output()

    def _writing_resumed(self) -> None:
        if self._forced is not None:
            self._forced.resume_output()
        elif self._attached:
            if self._skipping and self._frame_timer is None:
                self._frame()
            self._policy.session.drained(self.viewer_id)

    def _frame(self) -> None:
        """After skipping: the current screen, and live output again. For a joiner that is
        not the only viewer (``_frames``): the current screen now and then until the output
        calms down, then once more, clean, and live (FRAME_INTERVAL_S).

        Sending every joiner that cannot keep up the whole stream again each time it drained
        would make the daemon and the relay encrypt the flood once per joiner, slowing the
        command itself; the screen ten times a second costs a few KiB each.
        """
        self._frame_timer = None
        chan = self._chan
        if chan is None or not self._attached or not self._skipping:
            return
        loop = asyncio.get_running_loop()
        if self.backlog() > FRAME_BACKLOG_BYTES:  # the last frame is still on its way
            self._frame_timer = loop.call_later(FRAME_INTERVAL_S, self._frame)
            return
        session = self._policy.session
        self._frames = self._frames and session.viewer_count > 1  # alone now: followed
        streaming = (
            self._frames and session.output_bytes - self._frame_mark > STREAMING_BYTES_PER_FRAME
        )
        self._frame_mark = session.output_bytes
        # The notice goes in the title, not on a line: the screen stays the host's.
        frame = session.catch_up(CATCH_UP_BYTES)
        frame += session.title_notice(self.viewer_id, SKIPPED_NOTICE)
        if self._title_timer is not None:
            self._title_timer.cancel()
            self._title_timer = None
        if streaming:
            self._frame_timer = loop.call_later(FRAME_INTERVAL_S, self._frame)
        else:
            self._skipping = False
            self._title_timer = loop.call_later(SKIPPED_TITLE_S, self._restore_title)
        with contextlib.suppress(OSError, asyncssh.Error):
            self._out.write(frame)
        if not streaming:
            session.redraw()  # full-screen programs repaint for it

    def _restore_title(self) -> None:
        self._title_timer = None
        if self._chan is not None and self._attached and not self._skipping:
            with contextlib.suppress(OSError, asyncssh.Error):
                self._out.write(self._policy.session.title_restored(self.viewer_id))

    def eof_received(self) -> bool:
        if self._files is not None:
            return bool(self._files.eof_received())
        if self._early is not None:
            self._early_eof = True  # acted on once the host decided
            return True
        if self._forced is not None:
            return True  # its own command runs on, to its own end and exit status
        # The joiner closed its input: it leaves (status 0, as upstream); the session goes on.
        self._leave()
        with contextlib.suppress(OSError, asyncssh.Error):
            self._exit(0)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._files is not None:
            self._files.connection_lost(exc)
        self._policy.channel_closed(self)
        direct, self._direct = self._direct, None
        if direct is not None:  # the joiner is gone: what waits for it goes too
            direct.detach()
            direct.close()
        for timer in (self._frame_timer, self._title_timer):
            if timer is not None:
                timer.cancel()
        self._frame_timer = self._title_timer = None
        if self._resize_timer is not None:
            self._resize_timer.cancel()
            self._resize_timer = None
        self._leave()
        # The joiner has left when its last channel has: a second channel keeps it listed.
        channels = self._policy.by_client.get(self._client.client_id)
        if channels is not None:
            channels.discard(self)
            if not channels:
                del self._policy.by_client[self._client.client_id]
                self._policy.on_leave(self._client.client_id)

    def tell(self, text: str) -> None:
        """A notice for this joiner only."""
        if self._attached:
            self._policy.session.notice([self.viewer_id], text)

    def remove(self, message: bytes) -> None:
        """The host removed this joiner: say so and close its connection."""
        self._policy.removed.add(self._client.client_id)
        if self._chan is not None:
            self._tell_removed(message)
            with contextlib.suppress(OSError, asyncssh.Error):
                if self._attached:
                    self._out.write(self._policy.session.screen.restore_sequence())
                self._out.write(message, asyncssh.EXTENDED_DATA_STDERR)
                self._exit(1)
            # Then the whole connection, once the message and exit status had time to go.
            conn = self._chan.get_extra_info("connection")
            asyncio.get_running_loop().call_later(KICK_CLOSE_DELAY_S, conn.close)

    def _leave(self) -> None:
        """This channel stops viewing (and its forced command is hung up)."""
        if self._attached:
            self._attached = False
            self._policy.session.detach(self.viewer_id)
            # A moderator leaving holds the session before anything else runs.
            self._policy.moderation_changed()
        forced, self._forced = self._forced, None
        if forced is not None and forced.returncode is None:
            task = asyncio.ensure_future(hang_up(forced))
            _background.add(task)
            task.add_done_callback(_background.discard)

    # Viewer protocol

    def send(self, data: bytes) -> None:
        """Queue output to the joiner; while it is too far behind, skip ahead instead.

        A joiner on a slow link must neither hold the command back nor make the daemon
        buffer without bound: past ``SKIP_AHEAD_BYTES`` unsent, output to it is dropped
        until asyncssh reports its buffer drained (``resume_writing``).
        """
        if self._chan is None or self._skipping:
            return
        out = self._out
        with contextlib.suppress(OSError, asyncssh.Error):
            out.write(data)
            if out.get_write_buffer_size() > SKIP_AHEAD_BYTES:
                self.skip_ahead()

    def skip_ahead(self) -> None:
        """Stop sending this joiner the stream: it fell behind, or the session is flooded
        with several terminals watching (Session._output). Frames where someone else sets
        the pace (another joiner, the host's terminal); a lone joiner is what the PTY
        follows: once drained, it catches up and goes on live."""
        if self._forced is not None or self._skipping or self._chan is None:
            return
        if not self._attached:
            return
        self._skipping = True
        session = self._policy.session
        self._frame_mark = session.output_bytes
        self._frames = session.viewer_count > 1
        if self._frames:
            # What waits for its window is about to be replaced by a whole screen: the first
            # frame comes after one interval, as soon as the socket takes it.
            self._frame_timer = asyncio.get_running_loop().call_later(FRAME_INTERVAL_S, self._frame)
            with contextlib.suppress(OSError, asyncssh.Error):
                sshcompat.discard_unsent(self._out)

    def backlog(self) -> int:
        """Output asyncssh holds for this joiner."""
        out = self._out
        return int(out.get_write_buffer_size()) if out is not None else 0

    def finish(self, status: int) -> None:
        """The shared command ended: give the joiner's terminal back, pass the status on."""
        was_attached, self._attached = self._attached, False
        if self._chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                if was_attached:
                    session = self._policy.session
                    self._out.write(session.screen.restore_sequence() + session.farewell)
                self._exit(status)

    def cut_off(self, message: bytes) -> None:
        """Disconnect a joiner that fell behind."""
        self._attached = False
        if self._chan is not None:
            self._tell_removed(message)
            with contextlib.suppress(OSError, asyncssh.Error):
                self._out.write(message, asyncssh.EXTENDED_DATA_STDERR)
                self._exit(1)


async def hang_up(proc: PtyProcess) -> None:
    """End a joiner's forced command as a closed terminal would, then insist.

    SIGHUP first (as a terminal hang-up), SIGTERM a second later, SIGKILL a second after.
    """
    proc.hangup()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for _ in range(int(HANGUP_STEP_S / 0.05)):
            if proc.returncode is not None:
                return
            await asyncio.sleep(0.05)
        proc.send_signal(sig)
