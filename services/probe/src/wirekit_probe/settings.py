"""Every setting of the prober: flags, ``WIREKIT_PROBE_*`` variables, ``*_FILE``."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from wirekit_servicekit import ServiceSettings
from wirekit_servicekit.settings import metrics_port_field

from .targets import parse_allow, parse_nameserver, parse_spec
from .wire import MAX_SIZE, MIN_SIZE


class ProbeSettings(ServiceSettings):
    """wirekit probe: continuous loss, RTT, jitter, reordering and hop count against echo
    targets, as Prometheus metrics; and /probe?target=...&module=... for one burst on demand."""

    model_config = SettingsConfigDict(env_prefix="WIREKIT_PROBE_", cli_prog_name="wirekit-probe")

    metrics_port: int = metrics_port_field(9730)
    targets: list[str] = Field(
        default_factory=list,
        description="Targets probed continuously, each MODULE://HOST:PORT with MODULE udp, "
        "tcp-framed or tcp-connect, or MODULE+srv://NAME: every host and port the SRV records "
        "of NAME give (JSON list). A name is resolved again every resolve_interval_s and each "
        "of its addresses (A and AAAA) is a target of its own: tasks.<service> in Docker "
        "Swarm, a headless Service in Kubernetes.",
    )  # fmt: skip
    dns_servers: list[str] = Field(
        default_factory=list,
        description="Nameservers the SRV targets (MODULE+srv://NAME) are asked, each IP or "
        "IP:PORT ([IPv6]:PORT) (JSON list). Empty: the system's, from /etc/resolv.conf.",
    )  # fmt: skip
    limit_endpoints: int = Field(
        1024, ge=1, le=100_000,
        description="Endpoints probed at most, every target's addresses and SRV records "
        "together (each costs a task, a socket and ~40 KiB): a name that resolves to more "
        "(a huge headless Service, a hostile DNS answer) has the rest left out, counted in "
        "probe_endpoints_dropped and logged. Endpoints already probed keep their place.",
    )  # fmt: skip
    resolve_interval_s: float = Field(
        30.0, gt=0, description="Seconds between two resolutions of the targets' names."
    )
    rate_per_target: float = Field(
        1.0, gt=0, le=1000,
        description="Probes per second to each target, at Poisson intervals (RFC 2330).",
    )  # fmt: skip
    packet_budget: float = Field(
        1000.0, gt=0,
        description="Probe packets per second in all (targets and /probe): a token bucket "
        "with a burst of a tenth of it (no second holds more than 1.1 x); when the targets "
        "ask for more, each target's rate is scaled down to its share.",
    )  # fmt: skip
    timeout_s: float = Field(
        1.0, gt=0, le=60, description="Seconds a probe is waited for; after that it is lost."
    )
    size: int = Field(
        64, ge=MIN_SIZE, le=MAX_SIZE, description="Bytes per udp or tcp-framed probe."
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Seconds a TCP handshake (tcp-framed, tcp-connect) may take."
    )
    up_window_s: float = Field(
        10.0, gt=0,
        description="probe_up is 1 while a reply (or a handshake) came within this many seconds.",
    )  # fmt: skip
    probe_allow: list[str] = Field(
        default_factory=list,
        description="What /probe may probe (JSON list): networks (CIDR, e.g. 10.0.0.0/8) that "
        "every address of the target must lie in, or exact names. Empty: /probe refuses every "
        "target, so that it cannot be turned into a packet cannon or a port scanner.",
    )  # fmt: skip
    probe_count: int = Field(10, ge=1, le=1000, description="Packets of one /probe burst.")
    probe_interval_s: float = Field(
        0.02, gt=0, le=10, description="Mean seconds between the packets of a /probe burst."
    )
    probe_concurrency: int = Field(
        4, ge=1, le=64, description="/probe bursts at once; more are answered 429."
    )

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_spec(text)  # a ValueError names the bad one
        return value

    @field_validator("dns_servers")
    @classmethod
    def _dns_servers(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_nameserver(text)
        return value

    @field_validator("probe_allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        parse_allow(value)
        return value
