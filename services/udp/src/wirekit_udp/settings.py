"""Every setting of the UDP echo: flags, ``WIREKIT_UDP_*`` variables, ``*_FILE``, secrets."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wirekit_servicekit import ServiceSettings
from wirekit_servicekit.settings import metrics_port_field

#: Source ports never answered even when privileged ports are allowed: echo (7) and chargen
#: (19), the classic packet-storm pair; NFS (2049), as OpenBSD inetd does; 7200, a peer wirekit
#: udp echo (two echo servers answering each other is the "Loop DoS").
DEFAULT_DENY_PORTS = [7, 19, 2049, 7200]


class UdpSettings(ServiceSettings):
    """wirekit udp: UDP echo (RFC 862). Each datagram is answered byte-exact in one datagram,
    unless a defence drops it: privileged or denied source ports, broadcast or multicast
    sources, per-source and global rate limits."""

    model_config = SettingsConfigDict(env_prefix="WIREKIT_UDP_", cli_prog_name="wirekit-udp")

    per_instance: ClassVar[tuple[str, ...]] = (
        "rate_per_source", "burst_per_source", "limit_sources", "rate_global", "burst_global",
    )  # fmt: skip

    port: int = Field(7200, ge=0, le=65535, description="UDP port.")
    metrics_port: int = metrics_port_field(9720)
    max_datagram_size: int = Field(
        1472, ge=0, le=65507,
        description="Largest datagram answered (bytes); larger ones are dropped. 1472 fits an "
        "Ethernet frame unfragmented.",
    )  # fmt: skip
    deny_privileged_ports: bool = Field(
        True, description="Drop datagrams from source ports below 1024 (as xinetd does)."
    )
    deny_ports: list[int] = Field(
        default=list(DEFAULT_DENY_PORTS),
        description="Source ports always dropped (JSON list).",
    )
    deny_broadcast_multicast: bool = Field(
        True, description="Drop datagrams whose source is broadcast, multicast or unspecified."
    )
    loop_window_s: float = Field(
        0.05, gt=0,
        description="Loop defence: a datagram from the address and port answered within this "
        "time, holding exactly the bytes of that answer, is the answer coming back (another "
        "echo service; a loop started with a spoofed datagram) and is dropped. The same bytes "
        "sent again after this time are answered.",
    )  # fmt: skip
    rate_per_source: float = Field(
        50.0, gt=0, description="Datagrams per second answered per source address (token bucket)."
    )
    burst_per_source: int = Field(100, ge=1, description="Bucket size per source address.")
    limit_sources: int = Field(
        10_000, ge=1,
        description="Source addresses tracked for rate limiting; the least recently seen is "
        "forgotten first, so spoofed floods cannot grow the table.",
    )  # fmt: skip
    rate_global: float = Field(
        20_000.0, gt=0, description="Datagrams per second answered in all (token bucket)."
    )
    burst_global: int = Field(20_000, ge=1, description="Global bucket size.")
    receive_buffer_bytes: int = Field(
        4 * 1024 * 1024, ge=4096,
        description="Socket receive buffer asked of the kernel: what a burst may queue while the "
        "service is busy. The kernel caps it at net.core.rmem_max (unless the process may "
        "override that) and logs nothing: the service logs what was granted.",
    )  # fmt: skip
    send_buffer_bytes: int = Field(
        1024 * 1024, ge=4096,
        description="Socket send buffer asked of the kernel (capped at net.core.wmem_max).",
    )  # fmt: skip
    report_interval_s: float = Field(
        1.0, gt=0,
        description="Drops are logged and traced at most once per reason per interval (counted).",
    )  # fmt: skip
