"""The defences, sans-I/O and with a fake transport (addresses a real socket cannot send from)."""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket
from wirekit_udp import _hot
from wirekit_udp.defences import is_broadcast_or_multicast
from wirekit_udp.protocol import UdpContext, UdpEcho, UdpMetrics
from wirekit_udp.settings import UdpSettings


@pytest.mark.parametrize(
    ("host", "bad"),
    [
        ("127.0.0.1", False), ("192.0.2.7", False), ("::1", False), ("2001:db8::5", False),
        ("255.255.255.255", True), ("224.0.0.1", True), ("239.255.255.250", True),
        ("0.0.0.0", True), ("240.0.0.9", True), ("ff02::1", True), ("::", True),
        ("::ffff:224.0.0.251", True), ("::ffff:10.1.2.3", False), ("fe80::1%eth0", False),
        ("not-an-address", True),
    ],
)  # fmt: skip
def test_broadcast_and_multicast_sources_are_recognised(host: str, bad: bool) -> None:
    assert is_broadcast_or_multicast(host) is bad


def test_token_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True  # one token after 100 ms
    assert bucket.take(100.0) is True  # refill is capped at the burst
    assert sum(bucket.take(100.0) for _ in range(10)) == 4


def test_source_table_is_bounded_and_counts_limited_sources() -> None:
    limiter = SourceLimiter(rate=1, burst=1, limit=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(limiter) == 100
    assert limiter.limited == 0
    assert limiter.allow("10.9.9.9", 0.0) is True
    assert limiter.allow("10.9.9.9", 0.0) is False
    assert limiter.limited == 1
    assert limiter.allow("10.9.9.9", 5.0) is True  # refilled: no longer limited
    assert limiter.limited == 0
    assert limiter.allow("10.9.9.9", 5.0) is False
    for i in range(200):  # evicted while limited: the gauge follows
        limiter.allow(f"10.8.0.{i}", 5.0)
    assert limiter.limited == 0
    assert len(limiter) == 100


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str) -> None:
        return None


def _echo(**overrides: object) -> tuple[UdpEcho, FakeTransport, UdpMetrics]:
    settings = UdpSettings(**overrides)  # type: ignore[arg-type]
    ctx = UdpContext.build(
        settings, CollectorRegistry(), TracerProvider().get_tracer("t"), clock=lambda: 0.0
    )
    proto = UdpEcho(ctx)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, ctx.metrics


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        (("224.0.0.1", 5000), "broadcast_multicast"),
        (("255.255.255.255", 5000), "broadcast_multicast"),
        (("ff02::1", 5000), "broadcast_multicast"),
        (("127.0.0.1", 19), "privileged_port"),
        (("127.0.0.1", 2049), "denied_port"),
        (("127.0.0.1", 7200), "denied_port"),
    ],
)
def test_forbidden_sources_get_no_answer(addr: tuple[str, int], reason: str) -> None:
    proto, transport, stats = _echo()
    proto.datagram_received(b"ping", addr)
    assert transport.sent == []
    assert stats.dropped[reason].n == 1
    proto.datagram_received(b"ping", ("127.0.0.1", 40000))
    assert transport.sent == [(b"ping", ("127.0.0.1", 40000))]


def test_global_rate_limit_bounds_what_many_sources_get() -> None:
    proto, transport, stats = _echo(rate_global=1, burst_global=50, rate_per_source=1000,
                                    burst_per_source=1000)  # fmt: skip
    for i in range(1000):
        proto.datagram_received(b"x", (f"10.1.{i // 256}.{i % 256}", 40000))
    assert len(transport.sent) <= 51
    assert stats.dropped["rate_limit_global"].n >= 949


def test_deny_privileged_ports_can_be_turned_off() -> None:
    proto, transport, _ = _echo(deny_privileged_ports=False)
    proto.datagram_received(b"x", ("127.0.0.1", 999))
    proto.datagram_received(b"x", ("127.0.0.1", 19))  # still in the deny list
    assert transport.sent == [(b"x", ("127.0.0.1", 999))]


def test_forty_thousand_distinct_sources_keep_every_table_bounded() -> None:
    """A spray from 40,000 addresses (every one answered once, within one loop window): the
    rate-limit table and the loop defence's answers stay within limit_sources each window, and
    what they hold does not grow with the number of sources."""
    import tracemalloc

    settings = UdpSettings(limit_sources=1000, rate_global=1e9, burst_global=10**9)
    now = [0.0]
    ctx = UdpContext.build(settings, CollectorRegistry(), TracerProvider().get_tracer("t"),
                           clock=lambda: now[0])  # fmt: skip
    proto = UdpEcho(ctx)
    transport = FakeTransport()
    transport.sendto = lambda data, addr: None  # type: ignore[method-assign]  # keep nothing
    proto.connection_made(transport)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        held = []
        for i in range(40_000):
            now[0] = i * 1e-6  # 40 ms in all: one loop window
            proto.datagram_received(
                b"spray", (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 40000)
            )
            if i in (9_999, 39_999):
                held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(ctx.limiter) == 1000
    assert len(ctx.loop) <= 1000
    assert held[1] <= held[0] * 1.2 + 65536  # 30,000 more sources, no more memory


def _answered(stats: UdpMetrics) -> tuple[float, float]:
    datagrams, octets = (family.samples[0].value for family in stats.answered.collect())
    return datagrams, octets


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.binary(max_size=40), st.sampled_from([40000, 40001, 19, 2049]),
                  st.booleans()),
        max_size=40,
    )
)  # fmt: skip
def test_answers_counted_at_scrape_time_are_exact_and_never_go_down(
    steps: list[tuple[bytes, int, bool]],
) -> None:
    """udp_datagrams_sent_total and udp_sent_bytes_total are computed when scraped (received
    less dropped before an answer). A scrape may come between any two lines of the datagram's
    path (the scrape thread takes the GIL between bytecodes): here one comes at every line
    (the C build's: at every line of the Python it calls, _drop and the transport's sendto).
    Each sees at most what was answered so far, never less than the scrape before it, and
    once a datagram is done, exactly what was answered; a send error is an answer all the same."""
    proto, transport, stats = _echo(rate_per_source=5, burst_per_source=3, max_datagram_size=32)
    proto.sends_empty = True  # this transport sends empty datagrams itself, as PktinfoTransport
    seen = [(0.0, 0.0)]
    # the C build's path has no lines of its own: a scrape can come in the Python it calls
    watched = {UdpEcho._drop.__code__, FakeTransport.sendto.__code__}
    if _hot.BUILD == "pure":
        watched.add(UdpEcho.datagram_received.__code__)

    def answered_so_far() -> tuple[int, int]:
        return len(transport.sent), sum(len(data) for data, _ in transport.sent)

    def scrape(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            now = _answered(stats)
            most = answered_so_far()
            assert now[0] <= most[0]
            assert now[1] <= most[1]
            assert now[0] >= seen[-1][0]
            assert now[1] >= seen[-1][1]
            seen.append(now)
        return scrape

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return scrape if frame.f_code in watched else None

    for data, port, icmp_error in steps:
        sys.settrace(calls)
        try:
            proto.datagram_received(data, ("127.0.0.1", port))
        finally:
            sys.settrace(None)
        if icmp_error:
            proto.error_received(ConnectionRefusedError())
        assert _answered(stats) == answered_so_far()
    assert len(seen) > 1 or not steps
