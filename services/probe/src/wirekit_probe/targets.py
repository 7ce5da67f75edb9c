"""Targets: ``MODULE://HOST:PORT`` and ``MODULE+srv://NAME`` specs, their resolution into
endpoints (one per address, and per port of an SRV record), DNS failures by reason, and the
/probe allow list."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

MODULES = ("udp", "tcp-framed", "tcp-connect")
#: ``MODULE+srv://NAME``: the targets are what the SRV records of NAME say (host and port each).
SRV_SUFFIX = "+srv"
#: Why a name did not resolve: the ``reason`` of probe_resolve_errors_total.
RESOLVE_REASONS = ("nxdomain", "temporary", "timeout", "error")
#: dnspython's failures as reasons; the first class that matches wins, anything else is "error".
DNS_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (dns.resolver.NXDOMAIN, "nxdomain"),
    (dns.resolver.NoAnswer, "nxdomain"),  # the name exists, but has no record of the type
    (dns.exception.Timeout, "timeout"),  # LifetimeTimeout too
    (dns.resolver.NoNameservers, "temporary"),  # every server failed: SERVFAIL, REFUSED
)
#: How long one DNS lookup of an SRV spec (the SRV records; then each target's A and AAAA,
#: together) may take, every retry and nameserver included. The caller's deadline caps the whole.
DNS_LIFETIME_S = 5.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, order=True)
class Spec:
    module: str
    host: str  # a name or an address; an SRV spec's: the name whose SRV records are asked
    port: int  # 0 in an SRV spec: each record gives its own
    srv: bool = False

    def __str__(self) -> str:
        if self.srv:
            return f"{self.module}{SRV_SUFFIX}://{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.module}://{host}:{self.port}"


@dataclass(frozen=True, order=True)
class Endpoint:
    """One address of a spec: what a runner probes and what its series are labelled with."""

    module: str
    name: str  # the host as configured (a name, or the address itself); an SRV record's target
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
    """``MODULE://HOST:PORT`` or ``MODULE+srv://NAME`` (or ``HOST:PORT``, ``NAME`` with
    ``module`` given)."""
    if "://" in text:
        module, _, text = text.partition("://")
    srv = module is not None and module.endswith(SRV_SUFFIX)
    if srv and module is not None:
        module = module.removesuffix(SRV_SUFFIX)
    if module not in MODULES:
        raise ValueError(f"unknown module {module!r} (one of {', '.join(MODULES)})")
    if srv:
        return Spec(module, srv_name(text), 0, srv=True)
    host, port = split_host_port(text)
    return Spec(module, host, port)


def srv_name(text: str) -> str:
    """The name of an SRV spec: a DNS name (the records give the ports), not an address."""
    name = text.rstrip(".")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"an SRV target is a name (_SERVICE._PROTO.NAME), got {text!r}")
    if not name or any(c in name for c in ":/[] "):
        raise ValueError(f"an SRV target is a name without a port (_SERVICE._PROTO.NAME), "
                         f"got {text!r}")  # fmt: skip
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ValueError(f"not a DNS name: {text!r} ({exc})") from None
    return name


def parse_nameserver(text: str) -> tuple[str, int]:
    """An entry of dns_servers: ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
    try:
        return str(ipaddress.ip_address(text)), 53
    except ValueError:
        pass
    try:
        host, port = split_host_port(text)
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"dns_servers: not IP, IP:PORT or [IPv6]:PORT: {text!r}") from None


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


class ResolveError(OSError):
    """A name that did not resolve through DNS (an SRV spec); ``reason`` is one of
    RESOLVE_REASONS."""

    def __init__(self, name: str, reason: str, detail: str) -> None:
        super().__init__(f"cannot resolve {name!r}: {reason} ({detail})")
        self.name = name
        self.reason = reason


def dns_reason(exc: OSError) -> str:
    """The ``reason`` label of a failed resolution."""
    if isinstance(exc, ResolveError):
        return exc.reason
    if isinstance(exc, socket.gaierror):
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return "nxdomain"
        if exc.errno == socket.EAI_AGAIN:
            return "temporary"
    return "error"


async def resolve(
    spec: Spec, dns_servers: Sequence[str] = (), lifetime_s: float = DNS_LIFETIME_S
) -> list[Endpoint]:
    """Every address of ``spec`` (A and AAAA), sorted; OSError when it does not resolve.
    A name goes through the system's resolver (getaddrinfo: /etc/hosts, then DNS); an SRV spec
    through :func:`resolve_srv`."""
    if spec.srv:
        return await resolve_srv(spec, dns_servers, lifetime_s)
    kind = socket.SOCK_DGRAM if spec.module == "udp" else socket.SOCK_STREAM
    infos = await asyncio.get_running_loop().getaddrinfo(spec.host, spec.port, type=kind)
    addresses = {str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)}
    return sorted(Endpoint(spec.module, spec.host, a, spec.port) for a in addresses)


def dns_resolver(servers: Sequence[str]) -> dns.asyncresolver.Resolver:
    """A resolver asking ``servers`` (see :func:`parse_nameserver`), or with none the system's
    /etc/resolv.conf -- read again at every resolution, as glibc does, so that a changed file
    counts at the next one."""
    if not servers:
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(s)) for s in servers]
    return resolver


async def resolve_srv(
    spec: Spec, dns_servers: Sequence[str] = (), lifetime_s: float = DNS_LIFETIME_S
) -> list[Endpoint]:
    """The endpoints of an SRV spec: each record's target host (its addresses from the
    answer's additional section, else asked as A and AAAA of the same nameservers) with the
    record's port; one endpoint per (address, port), every record whatever its priority and
    weight (a prober wants the full mesh). :class:`ResolveError` when the lookup fails or no
    record has an address (reason "nxdomain": a failed resolution, as for a plain name)."""
    try:
        resolver = dns_resolver(dns_servers)
        answer = await resolver.resolve(spec.host, "SRV", search=True, lifetime=lifetime_s)
        records = sorted((r.target, r.port) for r in answer if r.target != dns.name.root)
        addresses = _addresses(answer.response.additional)
        missing = sorted({target for target, _ in records} - set(addresses))
        asked = [(target, kind) for target in missing for kind in ("A", "AAAA")]
        found = await asyncio.gather(*(_lookup(resolver, t, k, lifetime_s) for t, k in asked))
        for (target, _), got in zip(asked, found, strict=True):
            addresses.setdefault(target, []).extend(got)
    except dns.exception.DNSException as exc:
        reason = next((r for kind, r in DNS_REASONS if isinstance(exc, kind)), "error")
        raise ResolveError(spec.host, reason, str(exc)) from None
    endpoints: dict[tuple[str, int], str] = {}
    for target, port in records:  # sorted: the first name of an (address, port) keeps it
        for address in addresses.get(target, []):
            endpoints.setdefault((address, port), target.to_text(omit_final_dot=True))
    if not endpoints:
        raise ResolveError(spec.host, "nxdomain", "no SRV record with an address")
    return sorted(Endpoint(spec.module, n, a, p) for (a, p), n in endpoints.items())


def _addresses(section: Iterable[dns.rrset.RRset]) -> dict[dns.name.Name, list[str]]:
    """The A and AAAA records of a response's additional section, by name."""
    found: dict[dns.name.Name, list[str]] = {}
    for rrset in section:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found.setdefault(rrset.name, []).extend(r.address for r in rrset)
    return found


async def _lookup(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, kind: str, lifetime_s: float
) -> list[str]:
    """The ``kind`` (A or AAAA) addresses of an SRV record's target; none is no failure."""
    try:
        answer = await resolver.resolve(name, kind, search=False, lifetime=lifetime_s)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return [r.address for r in answer]


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
