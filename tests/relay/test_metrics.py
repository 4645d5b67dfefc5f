"""uptermd's metrics, lag monitor and HTTP endpoint, over real loopback sockets."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from upterm.relay.metrics import (
    HTTP_MAX_HEADER_BYTES,
    LoopLagMonitor,
    RelayMetrics,
    serve_http,
)

pytestmark = pytest.mark.timeout(30)

UPSTREAM_NAMES = (
    "upterm_uptermd_routing_connections_count",
    "upterm_uptermd_routing_errors_count",
    "upterm_uptermd_routing_active_connections_count",
    "upterm_uptermd_routing_connection_duration_seconds",
    "upterm_uptermd_routing_connection_timeout_count",
)
# Families as the exposition names them (prometheus_client's parser drops "_total").
OUR_FAMILIES = (
    "uptermd_sessions",
    "uptermd_joiners",
    "uptermd_connections",
    "uptermd_connections_accepted",
    "uptermd_relayed_bytes",
    "uptermd_auth_failures",
    "uptermd_refusals",
    "uptermd_penalties_active",
    "uptermd_penalties_added",
    "uptermd_loop_lag_seconds",
    "uptermd_accept_errors",
    "uptermd_keepalive_drops",
    "uptermd_open_fds",
    "uptermd_max_fds",
    "process_open_fds",
    "process_cpu_seconds",
)


class Endpoint:
    def __init__(self, server: asyncio.Server, metrics: RelayMetrics) -> None:
        self.server = server
        self.metrics = metrics
        self.ready = True
        self.port: int = server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start(header_timeout_s: float = 10.0, max_connections: int = 64) -> Endpoint:
    metrics = RelayMetrics()
    holder: list[Endpoint] = []
    server = await serve_http(
        "127.0.0.1",
        0,
        metrics,
        lambda: holder[0].ready,
        header_timeout_s=header_timeout_s,
        max_connections=max_connections,
    )
    holder.append(Endpoint(server, metrics))
    return holder[0]


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = await start()
    yield ep
    ep.server.close()
    await ep.server.wait_closed()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


async def get(url: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(_get, url)


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and end our side, then read the whole answer (until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def samples(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> labels -> value, with names exactly as on the wire.

    prometheus_client's parser would rename upstream's counters to ..._total, which is
    what must not happen on the wire, so the sample lines are read here by hand.
    """
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labelstr = series.partition("{")
        labels = tuple(
            sorted(
                (k, v.strip('"'))
                for k, _, v in (pair.partition("=") for pair in labelstr.rstrip("}").split(","))
                if k
            )
        )
        out.setdefault(name, {})[labels] = float(value)
    return out


def families(body: bytes) -> set[str]:
    """The metric families, as prometheus_client's parser reads them (so: it parses)."""
    return {f.name for f in text_string_to_metric_families(body.decode())}


async def test_metrics_exposes_every_name_and_helpers_move_counters(endpoint: Endpoint) -> None:
    m = endpoint.metrics
    status, ctype, body = await get(endpoint.url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    assert families(body) >= set(OUR_FAMILIES)
    text = body.decode()
    for name in UPSTREAM_NAMES:
        kind = {
            "upterm_uptermd_routing_active_connections_count": "gauge",
            "upterm_uptermd_routing_connection_duration_seconds": "summary",
        }.get(name, "counter")
        # Exactly upstream's names and types (no "_total" appended to its counters).
        assert f"# TYPE {name} {kind}\n" in text
    before = samples(body)
    open_fds = before["uptermd_open_fds"][()]
    max_fds = before["uptermd_max_fds"][()]
    assert 3 <= open_fds <= max_fds
    assert before["upterm_uptermd_routing_connections_count"][()] == 0
    # Fixed label sets exist at 0 before anything happened.
    assert before["uptermd_connections"][(("state", "preauth"),)] == 0
    assert before["uptermd_relayed_bytes_total"][(("direction", "splice_host_to_joiner"),)] == 0
    assert before["uptermd_penalties_added_total"][(("kind", "grace-exceeded"),)] == 0

    m.connection_opened()
    m.connection_opened()
    m.connection_closed(1.5)
    m.routing_error()
    m.refusals.labels(reason="handshake-timeout").inc()
    m.refusals.labels(reason="startups-full").inc(2)
    m.auth_failures.labels(reason="bad-key").inc()
    m.bytes.labels(direction="joiner_to_host").inc(100)
    m.accept_errors.labels(errno="EMFILE").inc()
    m.penalties_added.labels(kind="authfail").inc()
    m.keepalive_drops.inc()
    m.sessions.set(3)
    m.joiners.inc()
    m.connections.labels(state="host").inc()
    m.penalties_active.set(1)

    status, _, body = await get(endpoint.url + "/metrics")
    assert status == 200
    after = samples(body)
    assert after["uptermd_connections_accepted_total"][()] == 2
    assert after["upterm_uptermd_routing_connections_count"][()] == 2
    assert after["upterm_uptermd_routing_active_connections_count"][()] == 1
    assert after["upterm_uptermd_routing_connection_duration_seconds_sum"][()] == 1.5
    assert after["upterm_uptermd_routing_connection_duration_seconds_count"][()] == 1
    assert after["upterm_uptermd_routing_errors_count"][()] == 1
    # Upstream's timeouts are our handshake-timeout refusals.
    assert after["upterm_uptermd_routing_connection_timeout_count"][()] == 1
    assert after["uptermd_refusals_total"][(("reason", "startups-full"),)] == 2
    assert after["uptermd_auth_failures_total"][(("reason", "bad-key"),)] == 1
    assert after["uptermd_relayed_bytes_total"][(("direction", "joiner_to_host"),)] == 100
    assert after["uptermd_accept_errors_total"][(("errno", "EMFILE"),)] == 1
    assert after["uptermd_penalties_added_total"][(("kind", "authfail"),)] == 1
    assert after["uptermd_keepalive_drops_total"][()] == 1
    assert after["uptermd_sessions"][()] == 3
    assert after["uptermd_joiners"][()] == 1
    assert after["uptermd_connections"][(("state", "host"),)] == 1
    assert after["uptermd_penalties_active"][()] == 1
    # A query string (Prometheus scrape "params") is still /metrics.
    status, _, _ = await get(endpoint.url + "/metrics?module=relay")
    assert status == 200


async def test_open_fds_follows_descriptors_opened() -> None:
    m = RelayMetrics()
    base = m.registry.get_sample_value("uptermd_open_fds")
    assert base is not None
    files = [open("/dev/null") for _ in range(10)]  # noqa: SIM115
    try:
        assert m.registry.get_sample_value("uptermd_open_fds") == base + 10
    finally:
        for f in files:
            f.close()


def test_two_relays_do_not_share_metrics() -> None:
    a, b = RelayMetrics(), RelayMetrics()
    assert a.registry is not b.registry
    a.connection_opened()
    a.sessions.set(5)
    a.refusals.labels(reason="penalty").inc()
    assert a.registry.get_sample_value("uptermd_connections_accepted_total") == 1
    assert b.registry.get_sample_value("uptermd_connections_accepted_total") == 0
    assert b.registry.get_sample_value("uptermd_sessions") == 0
    assert b.registry.get_sample_value("uptermd_refusals_total", {"reason": "penalty"}) is None
    assert b"upterm_uptermd_routing_connections_count 0.0\n" in b.render()[0]
    assert b"upterm_uptermd_routing_connections_count 1.0\n" in a.render()[0]


async def test_health_and_ready(endpoint: Endpoint) -> None:
    assert await get(endpoint.url + "/health") == (200, "text/plain; charset=utf-8", b"ok\n")
    assert (await get(endpoint.url + "/ready"))[::2] == (200, b"ready\n")
    endpoint.ready = False
    assert (await get(endpoint.url + "/ready"))[::2] == (503, b"draining\n")
    # Draining is not dead.
    assert (await get(endpoint.url + "/health"))[0] == 200


async def test_unknown_path_and_other_methods(endpoint: Endpoint) -> None:
    assert (await get(endpoint.url + "/nope"))[::2] == (404, b"not found\n")
    answer = await raw(endpoint.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET\r\n" in answer
    assert b"\r\nConnection: close\r\n" in answer
    answer = await raw(endpoint.port, b"HEAD /health HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ")
    answer = await raw(endpoint.port, b"nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    # Bare LF line ends and HTTP/1.0 are answered too.
    answer = await raw(endpoint.port, b"GET /health HTTP/1.0\n\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(b"\r\n\r\nok\n")


async def test_garbage_closed_without_answer(endpoint: Endpoint) -> None:
    # Cut short before the blank line: nothing to answer.
    assert await raw(endpoint.port, b"GET /health HTTP/1.1\r\nHost") == b""
    assert await raw(endpoint.port, b"\xff\x00\xfe" * 100) == b""
    # Still serving.
    assert (await get(endpoint.url + "/health"))[0] == 200


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


REQUEST_LINE = b"GET /metrics HTTP/1.1\r\n"


@pytest.mark.parametrize(
    "data",
    [
        # Many short headers: only their total gives them away.
        REQUEST_LINE + (b"X-Pad: " + b"a" * 100 + b"\r\n") * (HTTP_MAX_HEADER_BYTES // 100 + 2),
        # One header line longer than the whole budget.
        REQUEST_LINE + b"X-Pad: " + b"a" * (HTTP_MAX_HEADER_BYTES + 10) + b"\r\n",
    ],
    ids=["many-headers", "one-long-line"],
)
async def test_oversized_header_block_is_closed(endpoint: Endpoint, data: bytes) -> None:
    assert len(data) > HTTP_MAX_HEADER_BYTES
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    try:
        scrape = asyncio.create_task(get(endpoint.url + "/metrics"))
        writer.write(data)  # and no blank line: only the size can end this
        t0 = time.monotonic()
        assert await _closed_by_server(reader)
        assert time.monotonic() - t0 < 2  # not the 10 s header timeout
        status, _, body = await scrape
        assert status == 200
        assert b"uptermd_sessions" in body
    finally:
        writer.close()


async def test_slow_client_is_closed_and_does_not_block_a_scrape() -> None:
    ep = await start(header_timeout_s=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
        dribbler_r, dribbler_w = await asyncio.open_connection("127.0.0.1", ep.port)
        t0 = time.monotonic()
        # Meanwhile a good scrape is answered at once.
        status, _, body = await get(ep.url + "/metrics")
        assert status == 200
        assert b"uptermd_open_fds" in body
        assert time.monotonic() - t0 < 0.5
        # A client dripping its request is bounded by the same total deadline.
        for chunk in (b"GET ", b"/health ", b"HTTP/1.1\r\n", b"Host: x\r\n"):
            dribbler_w.write(chunk)
            await asyncio.sleep(0.1)
        assert await _closed_by_server(reader)
        assert await _closed_by_server(dribbler_r)
        assert 0.4 < time.monotonic() - t0 < 3
        writer.close()
        dribbler_w.close()
    finally:
        ep.server.close()
        await ep.server.wait_closed()


async def test_default_header_timeout_is_ten_seconds(endpoint: Endpoint) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    try:
        # Not closed early: a slow network gets its 10 s.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(), 1)
    finally:
        writer.close()


async def test_connections_over_the_cap_are_closed_at_once() -> None:
    ep = await start(max_connections=2, header_timeout_s=20)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", ep.port) for _ in range(2)]
        await asyncio.sleep(0.1)  # both accepted and counted
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
        assert await _closed_by_server(reader)
        assert time.monotonic() - t0 < 2
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        # Capacity is back once they are gone.
        assert (await get(ep.url + "/health"))[0] == 200
    finally:
        ep.server.close()
        await ep.server.wait_closed()


async def test_loop_lag_monitor_records_a_blocked_loop() -> None:
    m = RelayMetrics()
    # A short interval so the stall is measured whatever phase it starts in.
    monitor = LoopLagMonitor(m.loop_lag, interval_s=0.02)
    monitor.start()
    monitor.start()  # idempotent
    try:
        await asyncio.sleep(0.1)
        assert monitor.worst_recent_s < 0.2
        time.sleep(0.3)  # block the event loop on purpose
        await asyncio.sleep(0.1)
    finally:
        monitor.stop()
    reg = m.registry
    count = reg.get_sample_value("uptermd_loop_lag_seconds_count")
    total = reg.get_sample_value("uptermd_loop_lag_seconds_sum")
    under_100ms = reg.get_sample_value("uptermd_loop_lag_seconds_bucket", {"le": "0.1"})
    assert count is not None
    assert total is not None
    assert under_100ms is not None
    assert count >= 3
    assert total >= 0.2
    assert count - under_100ms >= 1  # the stall is one observation, in a bucket above 0.1 s
    assert 0.2 <= monitor.worst_recent_s < 1.0
    # Stopped means stopped.
    await asyncio.sleep(0.1)
    assert reg.get_sample_value("uptermd_loop_lag_seconds_count") == count


async def test_loop_lag_monitor_idle_loop_has_little_lag() -> None:
    m = RelayMetrics()
    monitor = LoopLagMonitor(m.loop_lag, interval_s=0.01)
    monitor.start()
    await asyncio.sleep(0.2)
    monitor.stop()
    assert monitor.worst_recent_s < 0.1
    count = m.registry.get_sample_value("uptermd_loop_lag_seconds_count")
    assert count is not None
    assert count >= 5


def test_loop_lag_monitor_rejects_a_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLagMonitor(RelayMetrics().loop_lag, interval_s=0)


async def test_render_failure_is_a_500_and_the_endpoint_survives(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> tuple[bytes, str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(endpoint.metrics, "render", broken)
    assert (await get(endpoint.url + "/metrics"))[0] == 500
    assert (await get(endpoint.url + "/health"))[0] == 200


def test_no_request_logging_at_info(caplog: pytest.LogCaptureFixture) -> None:
    async def scrape() -> None:
        ep = await start()
        try:
            await get(ep.url + "/metrics")
            await get(ep.url + "/nope")
            await raw(ep.port, b"garbage")
        finally:
            ep.server.close()
            await ep.server.wait_closed()

    with caplog.at_level("INFO", logger="upterm.relay.metrics"):
        asyncio.run(scrape())
    assert [r for r in caplog.records if r.name == "upterm.relay.metrics"] == []
