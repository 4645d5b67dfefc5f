"""uptermd's Prometheus metrics, its event-loop lag monitor, and its /metrics, /health and
/ready HTTP endpoint.

Every metric lives in a :class:`RelayMetrics` of its own (never prometheus_client's global
registry): tests run several relays in one process, and a relay's numbers must be its own.

The HTTP endpoint is a few dozen lines of asyncio rather than a framework or
prometheus_client's threaded server: uptermd is one event loop, the endpoint must share its
limits (a scraper that never finishes its request, or a thousand of them, cost a bounded
amount), and the relay's counters are only ever touched from that loop.

Only long-standing prometheus_client API is used (Debian 12 ships 0.16).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from upterm.relay.policy import PenaltyKind

log = logging.getLogger(__name__)

NAMESPACE = "uptermd"

#: Registry round trips: a LAN Redis answers in well under a millisecond; seconds mean
#: trouble (a request's bound is at most 2 s).
REGISTRY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Event-loop lag buckets: from "nothing to see" (1 ms) to "every peer noticed" (5 s).
LOOP_LAG_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: How often the lag monitor wakes up by default. A stall of L seconds is recorded as a lag
#: between L minus this and L (it depends on where in the interval the stall began).
LOOP_LAG_INTERVAL_S = 0.25
#: :attr:`LoopLagMonitor.worst_recent_s` looks this far back.
LOOP_LAG_WINDOW_S = 10.0

#: The connection states counted by ``uptermd_connections``.
CONNECTION_STATES: tuple[str, ...] = ("preauth", "host", "joiner")
#: The directions counted by ``uptermd_relayed_bytes_total``.
BYTE_DIRECTIONS: tuple[str, ...] = (
    "joiner_to_host",
    "host_to_joiner",
    "splice_joiner_to_host",
    "splice_host_to_joiner",
)

#: Request line plus headers of one HTTP request; more and the connection is closed.
HTTP_MAX_HEADER_BYTES = 8 * 1024
#: Time the request line and headers have to arrive, in all (not per read: a client
#: dripping a byte a second is bounded too).
HTTP_HEADER_TIMEOUT_S = 10.0
#: Time the client has to take the response.
HTTP_WRITE_TIMEOUT_S = 10.0
#: HTTP connections open at once; further ones are closed as soon as they are accepted.
HTTP_MAX_CONNECTIONS = 64

_UPSTREAM_PREFIX = "upterm_uptermd_routing_"


class _DescriptorCollector:
    """``uptermd_open_fds`` and ``uptermd_max_fds``, read at scrape time.

    These duplicate ProcessCollector's ``process_*_fds`` under uptermd's own names so that
    a dashboard of uptermd_* metrics can show how close the relay is to EMFILE.
    """

    def collect(self) -> Iterable[Metric]:
        try:
            # The listing itself holds one descriptor while it runs; it is not the relay's.
            open_fds: int | None = sum(1 for _ in Path("/proc/self/fd").iterdir()) - 1
        except OSError:  # no /proc (a chroot, or not Linux): say nothing rather than 0
            open_fds = None
        if open_fds is not None:
            yield GaugeMetricFamily(
                f"{NAMESPACE}_open_fds", "File descriptors the relay has open now.", open_fds
            )
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = float("inf") if soft == resource.RLIM_INFINITY else float(soft)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_max_fds",
            "File descriptors the relay may open (RLIMIT_NOFILE, soft).",
            limit,
        )

    def describe(self) -> Iterable[Metric]:
        # Names only, so registering does not read /proc.
        yield GaugeMetricFamily(f"{NAMESPACE}_open_fds", "File descriptors open now.")
        yield GaugeMetricFamily(f"{NAMESPACE}_max_fds", "File descriptor limit.")


class Count:
    """One series of a :class:`PacketCounter`: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (never negative: callers count bytes)."""
        self.value += amount


class PacketCounter:
    """A counter family incremented for every packet the relay carries.

    prometheus_client's counters take a lock and check their arguments on every increment;
    on the path of each keystroke that was a few percent of the relay's CPU. The relay
    counts in one event-loop thread and the exposition reads at scrape time (same thread),
    so plain numbers are exact here.
    """

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self._name = name
        self._doc = documentation
        self._label = label
        self._series: dict[str, Count] = {}

    def labels(self, **labels: str) -> Count:
        """The series for this label value (made at 0 on first use)."""
        (value,) = labels.values()
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = Count()
        return series

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=[self._label])
        for value, series in self._series.items():
            family.add_metric([value], series.value)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=[self._label])


class RelayMetrics:
    """All of uptermd's metrics, in a registry of its own (tests make several relays in one
    process).

    The server updates the ``uptermd_*`` metrics directly (they are ordinary prometheus_client
    objects) and connection lifecycles through :meth:`connection_opened`,
    :meth:`connection_closed` and :meth:`routing_error`, which also keep the five series
    upstream's Go uptermd exports, under its names, for dashboards built for it.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        ns = NAMESPACE
        #: Sessions registered now.
        self.sessions = Gauge("sessions", "Sessions registered now.", namespace=ns, registry=reg)
        #: Joiner connections authenticated now.
        self.joiners = Gauge(
            "joiners", "Joiner connections authenticated now.", namespace=ns, registry=reg
        )
        #: SSH connections open now, by state: preauth, host, joiner.
        self.connections = Gauge(
            "connections",
            "SSH connections open now, by state (preauth, host, joiner).",
            ["state"],
            namespace=ns,
            registry=reg,
        )
        #: TCP connections accepted.
        self.connections_accepted = Counter(
            "connections_accepted", "TCP connections accepted.", namespace=ns, registry=reg
        )
        #: Bytes relayed, by direction.
        self.bytes = PacketCounter(
            f"{ns}_relayed_bytes",
            "Bytes relayed between joiners and hosts, by direction.",
            "direction",
        )
        reg.register(self.bytes)
        #: Failed authentications, by reason.
        self.auth_failures = Counter(
            "auth_failures",
            "Failed authentications, by reason.",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        #: Connections or requests refused by a limit or policy, by reason.
        self.refusals = Counter(
            "refusals",
            "Connections or requests refused by a limit or policy, by reason.",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        #: Sources under penalty (refused at once) now.
        self.penalties_active = Gauge(
            "penalties_active", "Sources under penalty now.", namespace=ns, registry=reg
        )
        #: Penalties imposed, by kind of offence.
        self.penalties_added = Counter(
            "penalties_added",
            "Penalties imposed on sources, by kind of offence (OpenSSH's names).",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        #: How late the event loop ran a wake-up scheduled by :class:`LoopLagMonitor`.
        self.loop_lag = Histogram(
            "loop_lag_seconds",
            "How late the event loop ran a scheduled wake-up.",
            namespace=ns,
            registry=reg,
            buckets=LOOP_LAG_BUCKETS_S,
        )
        #: accept() failures, by errno name (EMFILE, ENFILE, ...).
        self.accept_errors = Counter(
            "accept_errors",
            "accept() failures, by errno name.",
            ["errno"],
            namespace=ns,
            registry=reg,
        )
        #: Hosts and joiners dropped for not answering keepalives.
        self.keepalive_drops = Counter(
            "keepalive_drops",
            "Hosts and joiners dropped for not answering keepalives.",
            namespace=ns,
            registry=reg,
        )
        #: Round trips to the session registry (Redis), by operation.
        self.registry_latency = Histogram(
            "registry_seconds",
            "Round trips to the session registry (Redis), by operation.",
            ["op"],
            namespace=ns,
            registry=reg,
            buckets=REGISTRY_BUCKETS_S,
        )
        #: Lease events of this node's sessions: renewed, reclaimed (Redis had lost it),
        #: lost (superseded or not renewable in time).
        self.leases = Counter(
            "lease_events",
            "Lease events of this node's sessions (renewed, reclaimed, lost).",
            ["event"],
            namespace=ns,
            registry=reg,
        )
        #: Joiners carried to the node that owns their session, by outcome.
        self.hops = Counter(
            "hops",
            "Joiner connections carried to the node owning their session, by outcome "
            "(out: dialled from here, in: accepted here, failed).",
            ["direction"],
            namespace=ns,
            registry=reg,
        )
        # Series of fixed label sets exist from the start at 0, so that rate() sees their
        # first increment and dashboards show 0 rather than "no data".
        for state in CONNECTION_STATES:
            self.connections.labels(state=state)
        for direction in BYTE_DIRECTIONS:
            self.bytes.labels(direction=direction)
        for kind in PenaltyKind:
            self.penalties_added.labels(kind=kind.value)
        for event in ("renewed", "reclaimed", "lost"):
            self.leases.labels(event=event)
        for direction in ("out", "in", "failed"):
            self.hops.labels(direction=direction)

        reg.register(_DescriptorCollector())
        ProcessCollector(registry=reg)

        # Upstream's series: plain numbers rendered by hand in render(), because
        # prometheus_client would expose a counter named ..._count as ..._count_total.
        self._up_connections = 0
        self._up_errors = 0
        self._up_active = 0
        self._up_duration_sum_s = 0.0
        self._up_duration_count = 0

    def connection_opened(self) -> None:
        """A TCP connection was accepted."""
        self.connections_accepted.inc()
        self._up_connections += 1
        self._up_active += 1

    def connection_closed(self, duration_s: float) -> None:
        """A connection counted by :meth:`connection_opened` closed after ``duration_s``."""
        self._up_active -= 1
        self._up_duration_sum_s += duration_s
        self._up_duration_count += 1

    def routing_error(self) -> None:
        """A connection ended in an error (upstream's routing_errors_count)."""
        self._up_errors += 1

    def render(self) -> tuple[bytes, str]:
        """The exposition of every metric: (body, content type)."""
        return generate_latest(self.registry) + self._render_upstream(), CONTENT_TYPE_LATEST

    def _timeouts(self) -> float:
        # Upstream counts connections that did not finish their SSH handshake in time; ours
        # are the gate's "handshake-timeout" refusals, so this is derived, never counted twice.
        for metric in self.refusals.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels == {
                    "reason": "handshake-timeout"
                }:
                    return sample.value
        return 0.0

    def _render_upstream(self) -> bytes:
        p = _UPSTREAM_PREFIX
        families = (
            (
                f"{p}connections_count",
                "counter",
                "Connections accepted (upstream uptermd's name).",
                [("", self._up_connections)],
            ),
            (
                f"{p}errors_count",
                "counter",
                "Connections that ended in an error (upstream uptermd's name).",
                [("", self._up_errors)],
            ),
            (
                f"{p}active_connections_count",
                "gauge",
                "Connections open now (upstream uptermd's name).",
                [("", self._up_active)],
            ),
            (
                f"{p}connection_duration_seconds",
                "summary",
                "How long connections lasted (upstream uptermd's name).",
                [("_sum", self._up_duration_sum_s), ("_count", self._up_duration_count)],
            ),
            (
                f"{p}connection_timeout_count",
                "counter",
                "Connections closed for not logging in in time (upstream uptermd's name).",
                [("", self._timeouts())],
            ),
        )
        lines: list[str] = []
        for name, kind, doc, samples in families:
            lines.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
            lines.extend(f"{name}{suffix} {float(value)!r}\n" for suffix, value in samples)
        return "".join(lines).encode()


class LoopLagMonitor:
    """Measures event-loop lag: schedules a wake-up every interval and records how late it
    ran.

    A timer handle rather than a task: nothing to own or cancel but the next wake-up, and it
    keeps measuring whatever the relay's tasks do.
    """

    def __init__(self, histogram: Histogram, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self._histogram = histogram
        self._interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        # Sliding-window maximum: (monotonic time, lag) with lags strictly decreasing, so the
        # worst recent lag is the first entry once the stale ones are dropped.
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    def start(self) -> None:
        """Start measuring on the running event loop (again after :meth:`stop` is fine)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def stop(self) -> None:
        """Stop measuring."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def worst_recent_s(self) -> float:
        """The largest lag seen in the last ~10 s (for logs and tests)."""
        self._forget(time.monotonic())
        return self._recent[0][1] if self._recent else 0.0

    def _schedule(self) -> None:
        assert self._loop is not None
        # From now rather than from the previous due time: a long stall is one late
        # wake-up, not a burst of catch-up ones that would each count it again.
        self._due = self._loop.time() + self._interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        # asyncio runs timers up to its clock resolution early: that is no lag.
        lag_s = max(0.0, self._loop.time() - self._due)
        self._histogram.observe(lag_s)
        now = time.monotonic()
        while self._recent and self._recent[-1][1] <= lag_s:
            self._recent.pop()
        self._recent.append((now, lag_s))
        self._forget(now)
        self._schedule()

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - LOOP_LAG_WINDOW_S:
            self._recent.popleft()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


def _response(status: int, body: bytes, content_type: str = _TEXT, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _HttpEndpoint:
    """One request per connection, every step bounded; see :func:`serve_http`."""

    def __init__(
        self,
        metrics: RelayMetrics,
        ready: Callable[[], bool],
        header_timeout_s: float,
        max_connections: int,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections
        self._active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self._max_connections:
            writer.transport.abort()
            return
        self._active += 1
        done = False
        try:
            try:
                async with asyncio.timeout(self._header_timeout_s):
                    request_line = await self._read_head(reader)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                # Too slow, too big or cut short: close without a word; nothing to answer.
                log.debug("metrics endpoint: dropped a request: %r", exc)
                return
            response = self._respond(request_line)
            async with asyncio.timeout(HTTP_WRITE_TIMEOUT_S):
                writer.write(response)
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            done = True
        except (TimeoutError, OSError) as exc:
            log.debug("metrics endpoint: connection lost: %r", exc)
        except asyncio.CancelledError:
            # Shutting down: the request is dropped (finally). Not re-raised: on Python
            # 3.11 asyncio logs a cancelled client callback as an error with a traceback.
            log.debug("metrics endpoint: request dropped at shutdown")
        except Exception:
            # Our bug, not the client's: say so once, keep serving.
            log.exception("metrics endpoint: unexpected error")
        finally:
            self._active -= 1
            if not done:
                # Never wait on a peer that is not reading: drop the connection outright.
                writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """The request line, once the whole header block arrived within bounds."""
        total = 0
        request_line = b""
        while True:
            # The reader's limit (HTTP_MAX_HEADER_BYTES) makes readline raise ValueError on
            # a longer line, so one line can never be buffered beyond the budget.
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            total += len(line)
            if total > HTTP_MAX_HEADER_BYTES:
                raise ValueError(f"header block over {HTTP_MAX_HEADER_BYTES} bytes")
            if not request_line:
                if line.strip():
                    request_line = line
                continue  # RFC 9112 2.2: ignore empty lines before the request line
            if line in (b"\r\n", b"\n"):
                return request_line

    def _respond(self, request_line: bytes) -> bytes:
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, b"bad request\n")
        method, target, _version = parts
        if method != "GET":
            return _response(405, b"method not allowed\n", extra="Allow: GET\r\n")
        # Absolute-form targets ("http://host/metrics") and query strings are both legal.
        path = urllib.parse.urlsplit(target).path
        try:
            if path == "/metrics":
                body, content_type = self._metrics.render()
                return _response(200, body, content_type)
            if path == "/health":
                return _response(200, b"ok\n")
            if path == "/ready":
                if self._ready():
                    return _response(200, b"ready\n")
                return _response(503, b"draining\n")
        except Exception:
            log.exception("metrics endpoint: cannot answer %s", path)
            return _response(500, b"internal error\n")
        return _response(404, b"not found\n")


async def serve_http(
    host: str,
    port: int,
    metrics: RelayMetrics,
    ready: Callable[[], bool],
    *,
    header_timeout_s: float = HTTP_HEADER_TIMEOUT_S,
    max_connections: int = HTTP_MAX_CONNECTIONS,
) -> asyncio.Server:
    """Serve ``metrics`` over HTTP/1.1 on ``host:port`` until the returned server is closed.

    ``GET /metrics`` is the Prometheus exposition; ``GET /health`` answers 200 while the
    process serves; ``GET /ready`` answers 200 while ``ready()`` is true and 503 (draining)
    after. Other paths are 404, other methods 405. One request per connection; the request
    line and headers must fit in :data:`HTTP_MAX_HEADER_BYTES` and arrive within
    ``header_timeout_s``, and at most ``max_connections`` are served at once, or the
    connection is closed. Bad input never raises; nothing is logged per request above DEBUG.
    """
    endpoint = _HttpEndpoint(metrics, ready, header_timeout_s, max_connections)
    return await asyncio.start_server(endpoint.handle, host, port, limit=HTTP_MAX_HEADER_BYTES)
