"""Targets: ``MODULE://HOST:PORT`` specs, their resolution into endpoints (one per address),
DNS failures by reason, and the /probe allow list."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

MODULES = ("udp", "tcp-framed", "tcp-connect")
#: Why a name did not resolve: the ``reason`` of probe_resolve_errors_total.
RESOLVE_REASONS = ("nxdomain", "temporary", "timeout", "error")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, order=True)
class Spec:
    module: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.module}://{host}:{self.port}"


@dataclass(frozen=True, order=True)
class Endpoint:
    """One address of a spec: what a runner probes and what its series are labelled with."""

    module: str
    name: str  # the host as configured (a name, or the address itself)
    address: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET

    @property
    def target(self) -> str:
        """The ``target`` label: ``address:port``, IPv6 in brackets."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-address]:port``; ValueError with a one-line reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 target is written [ADDRESS]:PORT, got {text!r}")
    return host, int(port)


def parse_spec(text: str, module: str | None = None) -> Spec:
    """``MODULE://HOST:PORT`` (or ``HOST:PORT`` with ``module`` given)."""
    if "://" in text:
        module, _, text = text.partition("://")
    if module not in MODULES:
        raise ValueError(f"unknown module {module!r} (one of {', '.join(MODULES)})")
    host, port = split_host_port(text)
    return Spec(module, host, port)


def parse_allow(entries: Iterable[str]) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """The /probe allow list: networks, and names (anything that is not a network)."""
    networks: list[IPNetwork] = []
    names: set[str] = set()
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            if not entry or "/" in entry or " " in entry:
                raise ValueError(f"probe_allow: not a network or a name: {entry!r}") from None
            names.add(entry.lower().rstrip("."))
    return tuple(networks), frozenset(names)


def dns_reason(exc: OSError) -> str:
    """The ``reason`` label of a failed resolution."""
    if isinstance(exc, socket.gaierror):
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return "nxdomain"
        if exc.errno == socket.EAI_AGAIN:
            return "temporary"
    return "error"


async def resolve(spec: Spec) -> list[Endpoint]:
    """Every address of ``spec`` (A and AAAA), sorted; OSError when it does not resolve."""
    kind = socket.SOCK_DGRAM if spec.module == "udp" else socket.SOCK_STREAM
    infos = await asyncio.get_running_loop().getaddrinfo(spec.host, spec.port, type=kind)
    addresses = {str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)}
    return sorted(Endpoint(spec.module, spec.host, a, spec.port) for a in addresses)


def allowed(
    spec: Spec, addresses: Iterable[str], networks: tuple[IPNetwork, ...], names: frozenset[str]
) -> bool:
    """/probe's rule: the name is listed, or every address lies in a listed network."""
    if spec.host.lower().rstrip(".") in names:
        return True
    found = list(addresses)
    return bool(found) and all(
        any(ipaddress.ip_address(a.split("%", 1)[0]) in net for net in networks) for a in found
    )
