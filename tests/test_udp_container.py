"""The udp image through its published UDP port; Prometheus sees its counters."""

from __future__ import annotations

import os
from collections.abc import Callable

from testcontainers.core.container import DockerContainer
from wirekit_testkit import Prometheus, hardened, host_port, wait_ready, wait_until

from wirekit_udp.client import UdpEchoClient

Start = Callable[[DockerContainer], DockerContainer]


def test_udp_echo_through_the_published_port_and_prometheus(
    images: dict[str, str], start: Start, prometheus_for: Callable[[dict[str, int]], Prometheus]
) -> None:
    container = start(hardened(images["udp"], "7200/udp", "9720/tcp"))
    wait_ready(container, "9720/tcp")
    udp_port = host_port(container, "7200/udp")
    prom = prometheus_for({"wirekit-udp": host_port(container, "9720/tcp")})

    client = UdpEchoClient("127.0.0.1", udp_port, timeout=1.0, retries=3)
    # Not 0 bytes here: Docker's userland proxy does not forward empty datagrams (the
    # in-process tests cover them).
    payloads = [os.urandom(n) for n in (1, 100, 1000, 1472)]
    try:
        assert [client.echo(p) for p in payloads] == payloads
        # Oversize: dropped, counted, no answer.
        client.sock.settimeout(0.5)
        client.sock.send(b"z" * 1473)
        try:
            extra = client.sock.recv(2048)
        except TimeoutError:
            extra = None
        assert extra is None
    finally:
        client.close()
    answered = sum(len(p) for p in payloads)
    wait_until(lambda: prom.value('up{job="wirekit-udp"}') == 1.0, 60, "up == 1")
    for expr, want in {
        "udp_sent_bytes_total": answered,
        'udp_datagrams_dropped_total{reason="oversize"}': 1,
    }.items():
        wait_until(prom.equals(expr, float(want)), 30, f"{expr} == {want}")
    assert client.sent >= len(payloads)
