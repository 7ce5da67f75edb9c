"""SRV targets (``MODULE+srv://NAME``): the spec, and its resolution against a real DNS server
(dnsmasq on loopback, tests/wirekit_dns.py) -- the endpoints, failures by reason, the monitor
following the records, /probe's allow rule."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from wirekit_dns import ZONE, DnsServer, dns_server, host, srv, srv_bare

from wirekit_probe.monitor import Monitor, budget_bucket
from wirekit_probe.series import SeriesCollector
from wirekit_probe.settings import ProbeSettings
from wirekit_probe.targets import (
    Endpoint,
    ResolveError,
    Spec,
    allowed,
    dns_reason,
    parse_allow,
    parse_nameserver,
    parse_spec,
    resolve,
)

ECHO = f"_echo._udp.{ZONE}"
#: Two records, on two hosts: a (127.0.0.1, in the additional section) and b (127.0.0.2 and
#: ::1, asked by the resolver: its record is opaque data, answered without addresses).
RECORDS = [
    srv(ECHO, f"a.{ZONE}", 7001),
    f"srv-host=_none._udp.{ZONE}",  # target "." alone: "decidedly not available" (RFC 2782)
    host(f"a.{ZONE}", "127.0.0.1"),
    host(f"b.{ZONE}", "127.0.0.2", "::1"),
    host(f"c.{ZONE}", "127.0.0.3"),
]
BARE = srv_bare(ECHO, f"b.{ZONE}", 7002)


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with dns_server(tmp_path_factory.mktemp("dns"), [*RECORDS, BARE]) as server:
        yield server


SPECS = {
    "udp": ("udp+srv://_echo._udp.example", Spec("udp", "_echo._udp.example", 0, True)),
    "tcp-framed-absolute": (
        "tcp-framed+srv://_framed._tcp.echo.ns.svc.cluster.local.",
        Spec("tcp-framed", "_framed._tcp.echo.ns.svc.cluster.local", 0, True),
    ),
    "consul": (
        "tcp-connect+srv://web.service.consul",
        Spec("tcp-connect", "web.service.consul", 0, True),
    ),
    "plain": ("udp://tasks.udp:7200", Spec("udp", "tasks.udp", 7200)),
}


@pytest.mark.parametrize(("text", "spec"), list(SPECS.values()), ids=list(SPECS))
def test_a_spec_is_parsed_and_written_back(text: str, spec: Spec) -> None:
    assert parse_spec(text) == spec
    assert parse_spec(str(spec)) == spec
    assert str(spec) == text.rstrip(".")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("udp+srv://_echo._udp.example:7200", "without a port", id="port"),
        pytest.param("udp+srv://", "without a port", id="empty"),
        pytest.param("udp+srv://127.0.0.1", "is a name", id="v4"),
        pytest.param("udp+srv://[::1]", "is a name", id="v6"),
        pytest.param("icmp+srv://_echo._udp.example", "unknown module 'icmp'", id="module"),
        pytest.param("udp+srv://" + "x" * 64 + ".example", "not a DNS name", id="label"),
    ],
)
def test_a_bad_srv_spec_is_refused_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_spec(text)


def test_the_module_may_carry_the_srv_suffix() -> None:
    """/probe?target=NAME&module=udp+srv is the same as target=udp+srv://NAME."""
    assert parse_spec("_echo._udp.example", "udp+srv") == parse_spec("udp+srv://_echo._udp.example")


@pytest.mark.parametrize(
    ("text", "want"),
    [("10.0.0.53", ("10.0.0.53", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
     ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353))],
    ids=["v4", "v4-port", "v6", "v6-port"],
)  # fmt: skip
def test_dns_servers_are_ip_and_port(text: str, want: tuple[str, int]) -> None:
    assert parse_nameserver(text) == want


@pytest.mark.parametrize("text", ["ns.example", "ns.example:53", "127.0.0.1:0", "[::1]", ""])
def test_dns_servers_refuse_names_and_bad_ports(text: str) -> None:
    with pytest.raises(ValueError, match="dns_servers"):
        ProbeSettings(dns_servers=[text])


async def test_every_record_is_an_endpoint_with_its_port(dns: DnsServer) -> None:
    found = await resolve(parse_spec(f"udp+srv://{ECHO}"), [dns.address])
    assert found == [
        Endpoint("udp", f"a.{ZONE}", "127.0.0.1", 7001),
        Endpoint("udp", f"b.{ZONE}", "127.0.0.2", 7002),
        Endpoint("udp", f"b.{ZONE}", "::1", 7002),
    ]


@contextlib.contextmanager
def udp_sockets(n: int) -> Iterator[list[int]]:
    """``n`` bound UDP sockets on 127.0.0.1 that nobody reads: their ports are ours (a
    nameserver that never answers; targets that swallow their probes)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        yield ports


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param(f"_nope._udp.{ZONE}", "nxdomain", id="nxdomain"),
        pytest.param(f"a.{ZONE}", "nxdomain", id="no-srv-record"),  # a name with only an A
        pytest.param(f"_none._udp.{ZONE}", "nxdomain", id="target-dot"),
        pytest.param("_echo._udp.elsewhere.test", "temporary", id="refused"),  # not its zone
        pytest.param(ECHO, "timeout", id="dead-nameserver"),
    ],
)
async def test_failures_have_their_reason(dns: DnsServer, name: str, reason: str) -> None:
    started = time.monotonic()
    with udp_sockets(1) as (dead,):
        servers = [f"127.0.0.1:{dead}" if reason == "timeout" else dns.address]
        with pytest.raises(ResolveError) as failed:
            await resolve(parse_spec(f"udp+srv://{name}"), servers, lifetime_s=0.5)
    assert dns_reason(failed.value) == reason
    assert time.monotonic() - started < 5  # the lifetime holds


def settings(dns: DnsServer, *names: str) -> ProbeSettings:
    return ProbeSettings(targets=[f"udp+srv://{n}" for n in names], dns_servers=[dns.address],
                         resolve_interval_s=0.1, rate_per_target=20.0, timeout_s=0.2)  # fmt: skip


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def scrape(monitor: Monitor) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor)
    registry.register(SeriesCollector(monitor.series_now, monitor.settings.up_window_s))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples}  # fmt: skip


async def test_the_monitor_follows_the_records(tmp_path: Path) -> None:
    """A record that leaves takes its endpoint and series with it; one that joins starts; a
    name that stops resolving keeps the last answer and counts nxdomain."""
    hosts = RECORDS[2:]
    with (
        udp_sockets(3) as (p1, p2, p3),
        dns_server(
            tmp_path, [srv(ECHO, f"a.{ZONE}", p1), srv(ECHO, f"b.{ZONE}", p2), *hosts]
        ) as dns,
    ):
        config = settings(dns, ECHO)
        monitor = Monitor(config, budget_bucket(config))
        running = asyncio.create_task(monitor.run())
        try:
            targets: Callable[[], set[str]] = lambda: {e.target for e in monitor.series}  # noqa: E731
            await wait_for(lambda: targets() == {f"127.0.0.1:{p1}", f"127.0.0.2:{p2}",
                                                 f"[::1]:{p2}"}, 10, "three")  # fmt: skip
            await wait_for(lambda: all(s.tracker.sent for s in monitor.series.values()), 10,
                           "probes to every endpoint")  # fmt: skip
            dns.serve([srv(ECHO, f"b.{ZONE}", p2), srv(ECHO, f"c.{ZONE}", p3), *hosts])
            moved = {f"127.0.0.2:{p2}", f"[::1]:{p2}", f"127.0.0.3:{p3}"}
            await wait_for(lambda: targets() == moved, 10, "a left, c joined")
            got = scrape(monitor)
            assert not [k for k in got if ("name", f"a.{ZONE}") in k[1]]  # nothing stale
            assert got[("probe_targets", ())] == 3
            dns.serve(hosts)  # the SRV records are gone: NXDOMAIN
            nxdomain = ("probe_resolve_errors_total", (("name", ECHO), ("reason", "nxdomain")))
            await wait_for(lambda: scrape(monitor)[nxdomain] > 0, 10, "a failed resolution")
            assert targets() == moved  # the last answer holds
            timeouts = ("probe_resolve_errors_total", (("name", ECHO), ("reason", "timeout")))
            assert scrape(monitor)[timeouts] == 0
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        assert not monitor.tasks  # every runner stopped


@pytest.mark.parametrize(
    ("allow", "ok"),
    [
        pytest.param([ECHO], True, id="the-srv-name"),
        pytest.param(["127.0.0.0/8", "::1/128"], True, id="every-address"),
        pytest.param(["127.0.0.0/8"], False, id="not-the-v6-one"),
        pytest.param([f"a.{ZONE}", f"b.{ZONE}"], False, id="target-names-are-not-the-name"),
    ],
)
async def test_probe_allows_an_srv_name_by_name_or_by_every_address(
    dns: DnsServer, allow: list[str], ok: bool
) -> None:
    spec = parse_spec(f"udp+srv://{ECHO}")
    found = await resolve(spec, [dns.address])
    assert allowed(spec, [e.address for e in found], *parse_allow(allow)) is ok
