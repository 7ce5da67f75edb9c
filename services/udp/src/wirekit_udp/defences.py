"""Reflection and loop defences, sans-I/O: classify a source (rate limits: servicekit)."""

from __future__ import annotations

import functools
import ipaddress

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@functools.lru_cache(maxsize=4096)
def is_broadcast_or_multicast(host: str) -> bool:
    """True for sources no echo should ever answer: broadcast, multicast, unspecified, reserved
    (IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address) and (addr.is_reserved or addr == _BROADCAST):
        return True  # 240.0.0.0/4 and the limited broadcast address
    return addr.is_multicast or addr.is_unspecified
