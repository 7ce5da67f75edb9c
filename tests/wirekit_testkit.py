"""Helpers for the integration tests (importable: ``tests/`` is on pytest's pythonpath)."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from testcontainers.core.container import DockerContainer


def hardened(image: str, *ports: str, **env: str) -> DockerContainer:
    """A container run as a careful operator would: read-only, no capabilities, no privilege
    escalation, the image's non-root user, ports published on 127.0.0.1 only."""
    container = (
        DockerContainer(image)
        .with_kwargs(
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            # Keep the image's HEALTHCHECK command; check every second instead of every 10 s.
            healthcheck={"interval": 1_000_000_000, "start_period": 1_000_000_000},
        )
        .with_tmpfs_mount("/tmp", "size=16m")
    )
    for port in ports:
        # docker-py accepts (host_ip, host_port); None picks a free port.
        container.ports[port] = ("127.0.0.1", None)  # type: ignore[assignment]
    for key, value in env.items():
        container.with_env(key, value)
    return container


def host_port(container: DockerContainer, port: str) -> int:
    return int(container.get_exposed_port(port))  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], Any], limit_s: float, what: str) -> Any:
    """Poll (bounded) until ``predicate()`` is truthy; return its value."""
    end = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes (``MSG_WAITALL`` is not reliable on sockets with a timeout)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def free_port() -> int:
    """A currently free TCP port on loopback (for servers that cannot report their own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200. (A TCP connect proves nothing: docker-proxy accepts first.)"""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_ready(container: DockerContainer, metrics_port: str = "9700/tcp") -> None:
    port = host_port(container, metrics_port)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 30, "the service's /readyz")
