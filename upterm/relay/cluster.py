"""Sessions shared by several uptermd nodes: a lease registry in Redis.

Each registration is a Redis hash ``{prefix}:{SESSIONID}`` (the braces are a Redis Cluster
hash tag, so one session's key lives in one slot) holding the session's generation, the
owning node's id and what other nodes need to admit a joiner (host user, host keys,
authorized keys, invite digests). It expires unless its owner renews it:

- a claim succeeds only if the key is absent, held by an older generation, or is the same
  (generation, node) rebuilding itself; legacy generation-0 sessions (random ids, no proof)
  are never taken over. All of it runs in one Lua script, so two nodes racing for one id
  cannot both win;
- every later write (renew, update, release) names the generation and node it believes it
  holds, and the script refuses it unless the key says exactly that: the generation is the
  fencing token, and a node that was superseded cannot extend, change or delete its
  successor's lease;
- the owner renews every lease at a third of the TTL and re-checks ownership at each
  renewal (no notification is trusted alone). A renewal that finds the key gone (Redis
  restarted, ``FLUSHALL``) or held by an older generation (a failover lost the last write)
  claims it again; one that finds a newer generation loses the session at once;
- when renewals fail, the node drops the session's streams before the lease could expire
  in Redis (``deadline - margin`` after the last renewal it *sent*), watched by a task that
  never waits for Redis;
- a release leaves a tombstone (the generation, no node) for a TTL, so an older generation
  cannot bring a finished session back.

Exclusivity rests on the generation: a newer one takes the session at once (a host that
redialled elsewhere), and the old owner learns it at its next renewal or, for a new
joiner, at once (it checks the registry before admitting one).

Nodes register themselves too (``{prefix}:node:{NODEID}``, same TTL): a node only ever
dials a member that is registered now and owns the session it asks for (no open relay, no
port-scan oracle). Nothing here speaks SSH; :mod:`upterm.relay.server` wires it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from upterm.errors import ConfigError, UptermError

log = logging.getLogger(__name__)

#: Default lease TTL. Short enough that a dead node's sessions are gone within half a
#: minute even if their hosts never redial; long enough to ride out a Redis failover.
DEFAULT_LEASE_TTL_S = 30.0
#: Key prefix of everything uptermd writes.
DEFAULT_PREFIX = "uptermd"
#: Bounds on a stored record (our own data, but Redis is shared: never trust it blindly).
MAX_RECORD_BYTES = 1 << 20
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class RegistryUnavailable(UptermError):
    """The session registry (Redis) cannot be reached or answered in time."""

    code = "registry_unavailable"


class LeaseHeld(UptermError):
    """The session is held by a registration at least as new (a claim was refused)."""

    code = "superseded"

    def __init__(self, generation: int, node_id: str) -> None:
        super().__init__(f"held by generation {generation} on node {node_id}")
        self.generation = generation
        self.node_id = node_id


@dataclass(frozen=True)
class SessionRecord:
    """A session as every node of the cluster sees it."""

    session_id: str
    generation: int
    node_id: str
    host_user: str = ""
    host_key_blobs: tuple[bytes, ...] = ()
    client_key_blobs: frozenset[bytes] = frozenset()
    invites: frozenset[bytes] = frozenset()

    def data(self) -> bytes:
        """The msgpack body stored beside the generation and node."""
        return msgpack.packb(
            {
                "u": self.host_user,
                "hk": list(self.host_key_blobs),
                "ck": sorted(self.client_key_blobs),
                "inv": sorted(self.invites),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_hash(cls, session_id: str, gen: bytes, node: bytes, data: bytes) -> SessionRecord:
        """Decode what :meth:`data` stored; raises ValueError on anything malformed."""
        if len(data) > MAX_RECORD_BYTES:
            raise ValueError("record too large")
        body = msgpack.unpackb(data, raw=False, max_bin_len=MAX_RECORD_BYTES)
        if not isinstance(body, dict):
            raise ValueError("record is not a map")

        def blobs(name: str) -> list[bytes]:
            items = body.get(name, [])
            if not isinstance(items, list) or not all(isinstance(b, bytes) for b in items):
                raise ValueError(f"record field {name} is not a list of bytes")
            return items

        user = body.get("u", "")
        if not isinstance(user, str):
            raise ValueError("record field u is not text")
        return cls(
            session_id=session_id,
            generation=int(gen),
            node_id=node.decode("ascii"),
            host_user=user,
            host_key_blobs=tuple(blobs("hk")),
            client_key_blobs=frozenset(blobs("ck")),
            invites=frozenset(blobs("inv")),
        )


# -- the scripts: every decision about a lease is made inside Redis, atomically ----------

#: KEYS[1] session key; ARGV gen, node, data, ttl_ms -> {1} or {0, cur_gen, cur_node}.
_CLAIM = """
local cur = redis.call('HMGET', KEYS[1], 'gen', 'node')
if cur[1] then
  local cgen, gen = tonumber(cur[1]), tonumber(ARGV[1])
  local rebuild = (cur[1] == ARGV[1] and cur[2] == ARGV[2])
  if not rebuild and (cgen == 0 or gen <= cgen) then
    return {0, cur[1], cur[2]}
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'node', ARGV[2], 'data', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1}
"""
#: KEYS[1]; ARGV gen, node, ttl_ms -> {1} renewed, {0} absent, {-1, cur_gen, cur_node}.
_RENEW = """
local cur = redis.call('HMGET', KEYS[1], 'gen', 'node')
if not cur[1] then return {0} end
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1}
end
return {-1, cur[1], cur[2]}
"""
#: KEYS[1]; ARGV gen, node, data -> 1 if this (gen, node) holds it and it was updated.
_UPDATE = """
local cur = redis.call('HMGET', KEYS[1], 'gen', 'node')
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'data', ARGV[3])
  return 1
end
return 0
"""
#: KEYS[1]; ARGV gen, node, ttl_ms -> 1 if this (gen, node) held it and it is gone. What
#: stays for a TTL is a tombstone: the generation with no node, so that an older generation
#: (a node that missed being superseded) cannot claim the finished session back.
_RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 'gen', 'node')
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'node', '')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class _Script:
    """One Lua script, run by its SHA1 and loaded on the server that lacks it (a restarted
    Redis, a promoted replica, another shard of a Redis Cluster): the same on every client."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode(), usedforsecurity=False).hexdigest()

    async def run(self, client: Any, key: str, *args: Any) -> Any:
        import redis.exceptions

        try:
            return await client.evalsha(self.sha, 1, key, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.body, 1, key, *args)


_SCRIPTS = {
    "claim": _Script(_CLAIM),
    "renew": _Script(_RENEW),
    "update": _Script(_UPDATE),
    "release": _Script(_RELEASE),
}


def new_node_id() -> str:
    """A node id unique to this process: host name and 48 random bits."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "node"
    return f"{host}-{secrets.token_hex(6)}"


def parse_redis_url(url: str) -> tuple[str, list[tuple[str, int]], str, dict[str, Any]]:
    """Split ``--redis-url`` into (kind, addresses, service, options).

    ``redis://[user:password@]host:port[/db]`` and ``rediss://`` (TLS) name one server;
    ``redis+sentinel://[:password@]host:port[,host:port...]/SERVICE[/db]`` names Sentinels
    and the monitored service (the master's name); ``redis+cluster://[:password@]host:port
    [,host:port...]`` names some nodes of a Redis Cluster. Raises :class:`ConfigError`.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(f"--redis-url {url!r} names no server; e.g. redis://10.0.0.5:6379")
        return parts.scheme, [], "", {}
    if parts.scheme not in ("redis+sentinel", "sentinel", "redis+cluster"):
        raise ConfigError(
            f"--redis-url {url!r}: use redis://HOST:PORT, rediss://HOST:PORT, "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE or "
            "redis+cluster://HOST:PORT[,HOST:PORT...]"
        )
    cluster = parts.scheme == "redis+cluster"
    netloc = parts.netloc.rpartition("@")[2]
    addrs: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            host, port = item, "6379" if cluster else "26379"
        host = host.strip("[]")
        if not host:
            raise ConfigError(f"--redis-url {url!r}: a server address is empty")
        addrs.append((host, int(port)))
    if cluster:
        opts: dict[str, Any] = {}
        if parts.password:
            opts["password"] = urllib.parse.unquote(parts.password)
        return "cluster", addrs, "", opts
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigError(
            f"--redis-url {url!r} names no service: add /SERVICE, the name the Sentinels "
            "monitor (e.g. redis+sentinel://10.0.0.5:26379/mymaster)"
        )
    opts = {}
    if parts.password:
        opts["password"] = urllib.parse.unquote(parts.password)
    if len(path) > 1:
        if not path[1].isdigit():
            raise ConfigError(f"--redis-url {url!r}: the database must be a number")
        opts["db"] = int(path[1])
    return "sentinel", addrs, path[0], opts


@dataclass
class _Lease:
    record: SessionRecord
    #: When the last renewal that succeeded was sent (monotonic): Redis holds the key at
    #: least ``ttl`` after that.
    confirmed_at: float
    on_lost: Callable[[str], None]
    valid: bool = True


@dataclass
class RegistryStats:
    """What the node reports about its registry (metrics read these)."""

    renewals: int = 0
    losses: int = 0
    reclaims: int = 0
    errors: int = 0


class RedisRegistry:
    """This node's view of the cluster's session registry (redis-py asyncio)."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        member_addr: str,
        ttl_s: float = DEFAULT_LEASE_TTL_S,
        prefix: str = DEFAULT_PREFIX,
        observe: Callable[[str, float], None] | None = None,
        event: Callable[[str], None] | None = None,
    ) -> None:
        if not _NODE_ID_RE.fullmatch(node_id):
            raise ConfigError(f"node id {node_id!r} may hold only letters, digits, '.', '_', '-'")
        if ttl_s < 1.0:
            raise ConfigError("--lease-ttl must be at least 1s")
        self.url = url
        self.node_id = node_id
        self.member_addr = member_addr
        self.ttl_s = ttl_s
        self.prefix = prefix
        #: One socket operation's bound, and one registry call's (a retry included).
        self.op_timeout_s = max(0.2, min(2.0, ttl_s / 10))
        self.call_bound_s = 2 * self.op_timeout_s
        #: The keeper's period: renewals are due every ttl/3; deadlines are watched at this
        #: period by a task of their own, which never waits for Redis.
        self.tick_s = max(0.1, ttl_s / 15)
        #: Streams are dropped this long before Redis could let the lease go: the watcher's
        #: period, twice, and slack for a loop that ran late.
        self.margin_s = self.op_timeout_s + 2 * self.tick_s
        #: Called with (operation, seconds) after each registry round trip.
        self.observe = observe or (lambda _op, _s: None)
        #: Called with "renewed", "reclaimed" or "lost" for each lease event.
        self.event = event or (lambda _e: None)
        self.stats = RegistryStats()
        self._kind, self._sentinels, self._service, self._sentinel_opts = parse_redis_url(url)
        self._client: Any = None
        self._leases: dict[str, _Lease] = {}
        self._member_confirmed = 0.0
        self._keeper: asyncio.Task[None] | None = None
        #: Whether the last round trip to Redis succeeded (the node's readiness).
        self.reachable = False

    # -- keys --

    def session_key(self, session_id: str) -> str:
        """The Redis key of one session (its id is the hash tag)."""
        return f"{self.prefix}:{{{session_id}}}"

    def member_key(self, node_id: str) -> str:
        """The Redis key announcing one node."""
        return f"{self.prefix}:node:{{{node_id}}}"

    # -- lifecycle --

    async def start(self) -> None:
        """Connect and start keeping leases; Redis being down now is not fatal (every
        registration fails closed until it is back)."""
        import redis.asyncio as aioredis  # an uptermd-only dependency, loaded on demand

        common: dict[str, Any] = {
            "socket_timeout": self.op_timeout_s,
            "socket_connect_timeout": self.op_timeout_s,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }
        if self._kind == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                self._sentinels,
                sentinel_kwargs={
                    "socket_timeout": self.op_timeout_s,
                    "socket_connect_timeout": self.op_timeout_s,
                },
                **common,
                **self._sentinel_opts,
            )
            self._client = sentinel.master_for(self._service)
        elif self._kind == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            # Each script touches one key, so it runs on the shard that key hashes to.
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self._sentinels],
                socket_timeout=self.op_timeout_s,
                socket_connect_timeout=self.op_timeout_s,
                **self._sentinel_opts,
            )
        else:
            self._client = aioredis.from_url(self.url, **common)
        with contextlib.suppress(RegistryUnavailable):
            await self._announce()
        self._keeper = asyncio.create_task(self._keep())

    async def close(self, release: bool = True) -> None:
        """Stop renewing; with ``release``, give every lease and the membership back."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if release and self._client is not None:
            leases = list(self._leases.values())

            async def release_all() -> None:
                await asyncio.gather(
                    *(self.release(le.record.session_id, le.record.generation) for le in leases),
                    self._client.delete(self.member_key(self.node_id)),
                    return_exceptions=True,
                )

            # Whatever is not given back in time expires by itself.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release_all(), self.call_bound_s)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def _call(self, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """One round trip, bounded; any failure is :class:`RegistryUnavailable`."""
        import redis.exceptions

        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.call_bound_s):
                try:
                    result = await fn()
                except redis.exceptions.ConnectionError:
                    # A pooled connection to a server that went away (a restart, a Sentinel
                    # failover): the pool drops it, and once more asks a fresh one (which,
                    # with Sentinel, asks where the master is now). Same overall bound.
                    result = await fn()
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self.reachable = False
            self.stats.errors += 1
            log.debug("registry %s failed: %r", op, exc)
            raise RegistryUnavailable(
                f"the session registry did not answer ({type(exc).__name__})"
            ) from exc
        self.reachable = True
        self.observe(op, time.monotonic() - t0)
        return result

    # -- membership --

    async def _announce(self) -> None:
        sent = time.monotonic()
        body = msgpack.packb({"addr": self.member_addr}, use_bin_type=True)
        await self._call(
            "announce",
            lambda: self._client.set(
                self.member_key(self.node_id), body, px=int(self.ttl_s * 1000)
            ),
        )
        self._member_confirmed = sent

    async def member_addr_of(self, node_id: str) -> str | None:
        """The hop address of a node registered now (None: not a member)."""
        if not _NODE_ID_RE.fullmatch(node_id):
            return None
        raw = await self._call("member", lambda: self._client.get(self.member_key(node_id)))
        if not isinstance(raw, bytes) or len(raw) > 4096:
            return None
        try:
            body = msgpack.unpackb(raw, raw=False)
        except ValueError:
            return None
        addr = body.get("addr") if isinstance(body, dict) else None
        return addr if isinstance(addr, str) and addr else None

    # -- sessions --

    async def claim(self, record: SessionRecord, on_lost: Callable[[str], None]) -> None:
        """Take (or rebuild) the lease of ``record`` and keep renewing it.

        Raises :class:`LeaseHeld` if a registration at least as new holds it, and
        :class:`RegistryUnavailable` when Redis does not answer (fail closed).
        """
        sent = time.monotonic()
        await self._claim(record)
        cur = self._leases.get(record.session_id)
        if cur is not None and cur.record.generation > record.generation:
            # A newer generation of this session was claimed here while this claim waited
            # for Redis (a host redialling twice): Redis holds that one, and so do we.
            raise LeaseHeld(cur.record.generation, self.node_id)
        self._leases[record.session_id] = _Lease(record, sent, on_lost)

    async def _claim(self, record: SessionRecord) -> None:
        result = await self._call(
            "claim",
            lambda: _SCRIPTS["claim"].run(
                self._client,
                self.session_key(record.session_id),
                str(record.generation),
                record.node_id,
                record.data(),
                int(self.ttl_s * 1000),
            ),
        )
        if int(result[0]) != 1:
            raise LeaseHeld(int(result[1]), _text(result[2]))

    async def update(self, record: SessionRecord) -> bool:
        """Store new details (invites) of a session this node holds; False if not held."""
        lease = self._leases.get(record.session_id)
        if lease is None or lease.record.generation != record.generation:
            return False
        # What a re-claim writes from now on, whatever becomes of this write.
        lease.record = record
        ok = await self._call(
            "update",
            lambda: _SCRIPTS["update"].run(
                self._client,
                self.session_key(record.session_id),
                str(record.generation),
                self.node_id,
                record.data(),
            ),
        )
        return int(ok) == 1

    async def release(self, session_id: str, generation: int) -> bool:
        """Give a lease back; a successor's registration is never touched."""
        lease = self._leases.get(session_id)
        if lease is not None and lease.record.generation == generation:
            del self._leases[session_id]
        ok = await self._call(
            "release",
            lambda: _SCRIPTS["release"].run(
                self._client,
                self.session_key(session_id),
                str(generation),
                self.node_id,
                int(self.ttl_s * 1000),
            ),
        )
        return int(ok) == 1

    def holds(self, session_id: str, generation: int) -> bool:
        """Whether this node may serve ``session_id`` at ``generation`` right now: it holds
        the lease and its deadline (less the margin) has not passed."""
        lease = self._leases.get(session_id)
        if lease is None or not lease.valid or lease.record.generation != generation:
            return False
        return time.monotonic() < lease.confirmed_at + self.ttl_s - self.margin_s

    async def lookup(self, session_id: str) -> SessionRecord | None:
        """The session's current registration, if any; raises :class:`RegistryUnavailable`."""
        if not _SESSION_ID_RE.fullmatch(session_id):
            return None
        raw = await self._call(
            "lookup",
            lambda: self._client.hmget(self.session_key(session_id), "gen", "node", "data"),
        )
        gen, node, data = raw
        if gen is None or not node or data is None:
            return None  # none, or a finished session's tombstone
        try:
            return SessionRecord.from_hash(session_id, gen, node, data)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("ignored a malformed registration of %s in Redis: %s", session_id, exc)
            return None

    # -- the keeper --

    async def _keep(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            while True:
                await asyncio.sleep(self.tick_s)
                try:
                    await self.renew_due()
                except Exception:  # never let the keeper die: every lease depends on it
                    log.exception("lease keeper pass failed")
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        """Give up leases at their deadline, however long a renewal pass is waiting for
        Redis (a pass may take several bounded calls)."""
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.expire()
            except Exception:
                log.exception("lease watcher pass failed")

    def expire(self) -> None:
        """Lose every lease whose deadline (less the margin) has passed."""
        now = time.monotonic()
        for lease in list(self._leases.values()):
            if now >= lease.confirmed_at + self.ttl_s - self.margin_s:
                self._lose(lease, "its lease could not be renewed (the registry is unreachable)")

    async def renew_due(self, everything: bool = False) -> None:
        """One pass: renew what is due (``everything``: all of it now), re-claim what Redis
        forgot, give up what expired."""
        now = time.monotonic()
        period = 0.0 if everything else self.ttl_s / 3
        # Unreachable since the last round trip: ask again at every tick, so readiness (and
        # new registrations) come back as soon as Redis does.
        if now - self._member_confirmed >= period or not self.reachable:
            with contextlib.suppress(RegistryUnavailable):
                await self._announce()
        due = [lease for lease in self._leases.values() if now - lease.confirmed_at >= period]
        if due:
            await self._renew(due)
        self.expire()

    async def _renew(self, leases: Sequence[_Lease]) -> None:
        sent = time.monotonic()
        script = _SCRIPTS["renew"]
        ttl_ms = int(self.ttl_s * 1000)

        def args(lease: _Lease) -> tuple[Any, ...]:
            rec = lease.record
            return (self.session_key(rec.session_id), str(rec.generation), self.node_id, ttl_ms)

        async def pipelined() -> list[Any]:
            # One round trip for every lease of the node; each answer on its own (an error
            # for one key is that lease's, not the batch's).
            pipe = self._client.pipeline(transaction=False)
            for lease in leases:
                key, *rest = args(lease)
                pipe.evalsha(script.sha, 1, key, *rest)
            return list(await pipe.execute(raise_on_error=False))

        async def batch() -> list[Any]:
            import redis.exceptions

            if self._kind == "cluster":
                # Keys live on several shards: one request each, all in flight at once; a
                # shard that fails costs only its own leases this pass.
                return list(
                    await asyncio.gather(
                        *(script.run(self._client, *args(le)) for le in leases),
                        return_exceptions=True,
                    )
                )
            results = await pipelined()
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                await self._client.script_load(script.body)  # a fresh server
                results = await pipelined()
            return results

        try:
            results = await self._call("renew", batch)
        except RegistryUnavailable:
            return
        for lease, result in zip(leases, results, strict=True):
            if self._leases.get(lease.record.session_id) is not lease:
                continue  # released while the batch ran
            if isinstance(result, BaseException):
                self.stats.errors += 1
                log.debug("renewal of %s failed: %r", lease.record.session_id, result)
                continue  # the watcher gives it up at its deadline unless a renewal succeeds
            code = int(result[0])
            if code == 1:
                lease.confirmed_at = sent
                self.stats.renewals += 1
                self.event("renewed")
                continue
            if code == -1 and int(result[1]) >= lease.record.generation:
                self._lose(lease, f"superseded by generation {int(result[1])}")
                continue
            # Gone (Redis restarted or was flushed) or held by an older generation (a
            # failover lost our last write): ours again, if nothing newer came meanwhile.
            try:
                await self._claim(lease.record)
            except LeaseHeld as exc:
                self._lose(lease, f"superseded by generation {exc.generation}")
            except RegistryUnavailable:
                pass
            else:
                if self._leases.get(lease.record.session_id) is not lease:
                    # Released while the claim ran: give back what the claim just took.
                    with contextlib.suppress(RegistryUnavailable):
                        await self.release(lease.record.session_id, lease.record.generation)
                    continue
                lease.confirmed_at = sent
                self.stats.reclaims += 1
                self.event("reclaimed")
                log.info(
                    "re-registered session %s (the registry had lost it)", lease.record.session_id
                )

    def _lose(self, lease: _Lease, why: str) -> None:
        sid = lease.record.session_id
        if self._leases.get(sid) is lease:
            del self._leases[sid]
        lease.valid = False
        self.stats.losses += 1
        self.event("lost")
        log.warning("lost the lease of session %s: %s", sid, why)
        lease.on_lost(why)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
