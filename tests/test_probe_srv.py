"""wirekit-probe finding its targets through DNS SRV records: a real DNS server (dnsmasq,
tests/wirekit_dns.py), real wirekit-udp targets on 127.0.0.1, 127.0.0.2 and ::1, the prober as a
real process, its /metrics and /probe read over HTTP."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wirekit_dns import ZONE, DnsServer, dns_server, host, srv
from wirekit_testkit import ServiceProcess, http_get, service_process, wait_until

ECHO = f"_echo._udp.{ZONE}"
#: What each wirekit-udp listens on; its host name in the zone.
HOSTS = {"a": "127.0.0.1", "b": "127.0.0.2", "c": "::1"}
ADDRESSES = [host(f"{name}.{ZONE}", address) for name, address in HOSTS.items()]


@pytest.fixture(scope="module")
def udp() -> Iterator[dict[str, ServiceProcess]]:
    """One wirekit-udp on each address of HOSTS, by host name."""
    limits = ("--rate-per-source", "100000", "--burst-per-source", "100000")
    with contextlib.ExitStack() as stack:
        procs: dict[str, ServiceProcess] = {}
        for name, address in HOSTS.items():
            ports = ("--port", "0", "--metrics-port", "0")
            procs[name] = stack.enter_context(
                service_process("wirekit_udp", "--host", address, *ports, *limits)
            )
        yield procs
        for proc in procs.values():
            proc.assert_clean_log()


def target(udp: dict[str, ServiceProcess], name: str) -> str:
    """The ``target`` label of host ``name``'s wirekit-udp."""
    address = HOSTS[name]
    return f"{f'[{address}]' if ':' in address else address}:{udp[name].ports['udp']}"


def records(udp: dict[str, ServiceProcess], srv_name: str, *names: str) -> list[str]:
    """SRV records of ``srv_name``: one per host, with its wirekit-udp's port."""
    return [srv(srv_name, f"{n}.{ZONE}", udp[n].ports["udp"]) for n in names]


def series(url: str, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``metric`` at ``url`` now, by their labels."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {tuple(sorted(s.labels.items())): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == metric}  # fmt: skip


def sample(url: str, metric: str, labels: dict[str, str]) -> float:
    """One sample now, 0 when the series does not exist."""
    return series(url, metric).get(tuple(sorted(labels.items())), 0.0)


def prober(dns: DnsServer, *args: str) -> contextlib.AbstractContextManager[ServiceProcess]:
    return service_process("wirekit_probe", "--metrics-port", "0",
                           "--dns-servers", json.dumps([dns.address]), *args)  # fmt: skip


def test_the_prober_probes_what_the_srv_records_say(
    udp: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    """Two records: two targets, each answering; the records change: the one that left has no
    series any more, the one that joined is probed from zero."""
    with (
        dns_server(tmp_path, [*records(udp, ECHO, "a", "b"), *ADDRESSES]) as dns,
        prober(dns, "--targets", json.dumps([f"udp+srv://{ECHO}"]), "--resolve-interval-s",
               "0.2", "--rate-per-target", "20", "--timeout-s", "0.3") as proc,
    ):  # fmt: skip
        url = proc.url("/metrics")

        def labels(name: str) -> dict[str, str]:
            return {"module": "udp", "target": target(udp, name), "name": f"{name}.{ZONE}"}

        def targets() -> set[str]:
            return {dict(k)["target"] for k in series(url, "probe_probes_sent_total")}

        def up(name: str) -> bool:
            return sample(url, "probe_up", labels(name)) == 1

        for name in ("a", "b"):
            wait_until(functools.partial(up, name), 15, f"replies from {name}")
            assert sample(url, "probe_probes_received_total", labels(name)) > 0, name
        assert targets() == {target(udp, "a"), target(udp, "b")}
        assert proc.value("probe_targets") == 2

        dns.serve([*records(udp, ECHO, "b", "c"), *ADDRESSES])  # a leaves, c (::1) joins
        wait_until(lambda: targets() == {target(udp, "b"), target(udp, "c")}, 15, "a -> c")
        for metric in ("probe_probes_sent_total", "probe_up", "probe_rtt_seconds_count"):
            assert not [k for k in series(url, metric) if ("name", f"a.{ZONE}") in k], metric
        assert proc.value("probe_targets") == 2
        wait_until(functools.partial(up, "c"), 15, "replies from c, over IPv6")
        assert sample(url, "probe_probes_received_total", labels("c")) > 0
        errors = series(url, "probe_resolve_errors_total")
        assert errors
        assert not any(errors.values()), errors
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0
        proc.assert_clean_log()


def probe_query(spec: str, count: int = 5) -> str:
    return "/probe?" + urllib.parse.urlencode({"target": spec, "count": str(count)})


def test_probe_takes_an_srv_target_within_probe_allow(
    udp: dict[str, ServiceProcess], tmp_path: Path
) -> None:
    """Allowed when the SRV name is listed, or when every address lies in a listed network."""
    named, v4, v6 = f"_named._udp.{ZONE}", f"_v4._udp.{ZONE}", f"_v6._udp.{ZONE}"
    zone = [*records(udp, named, "c"), *records(udp, v4, "a", "b"), *records(udp, v6, "c"),
            *ADDRESSES]  # fmt: skip
    allow = json.dumps(["127.0.0.0/8", named])
    with (
        dns_server(tmp_path, zone) as dns,
        prober(dns, "--probe-allow", allow, "--probe-interval-s", "0.01",
               "--timeout-s", "0.3") as proc,
    ):  # fmt: skip
        for spec, where in ((f"udp+srv://{named}", "c"), (f"udp+srv://{v4}", "a")):
            status, body = http_get(proc.url(probe_query(spec)))
            assert status == 200, (spec, body)
            assert "probe_success 1.0" in body, body
            assert f'target="{target(udp, where)}"' in body, body
        status, body = http_get(proc.url(probe_query(f"udp+srv://{v6}")))
        assert (status, body) == (400, f"target {v6!r} is not allowed by probe_allow\n")
        status, body = http_get(proc.url(probe_query(f"udp+srv://_nope._udp.{ZONE}")))
        assert (status, body) == (400, f"cannot resolve '_nope._udp.{ZONE}': nxdomain\n")
        proc.assert_clean_log()
