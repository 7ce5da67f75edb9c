"""The probe image on a Docker network with the udp and echo images: it finds its targets by
name, Prometheus scrapes its series, and /probe answers through the published port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from wirekit_testkit import Prometheus, hardened, host_port, wait_ready, wait_until

Start = Callable[[DockerContainer], DockerContainer]


@pytest.fixture
def network() -> Iterator[Network]:
    with Network() as net:
        yield net


def test_probe_image_probes_udp_and_echo_by_name(
    images: dict[str, str],
    network: Network,  # before start: torn down after the containers
    start: Start,
    prometheus_for: Callable[[dict[str, int]], Prometheus],
) -> None:
    for name, metrics in (("udp", "9720/tcp"), ("echo", "9700/tcp")):
        container = hardened(images[name], metrics).with_network(network)
        wait_ready(start(container.with_network_aliases(name)), metrics)
    targets = ["udp://udp:7200", "tcp-framed://echo:7001", "tcp-connect://echo:7000"]
    probe = hardened(
        images["probe"], "9730/tcp",
        WIREKIT_PROBE_TARGETS=json.dumps(targets), WIREKIT_PROBE_RATE_PER_TARGET="5",
        WIREKIT_PROBE_PROBE_ALLOW=json.dumps(["udp", "echo"]),
    ).with_network(network)  # fmt: skip
    start(probe)
    wait_ready(probe, "9730/tcp")
    port = host_port(probe, "9730/tcp")
    prom = prometheus_for({"wirekit-probe": port})
    for module in ("udp", "tcp-framed", "tcp-connect"):
        expr = f'sum(probe_up{{job="wirekit-probe", module="{module}"}})'
        wait_until(prom.equals(expr, 1.0), 60, f"{module} up")
        received = f'sum(probe_probes_received_total{{module="{module}"}})'
        wait_until(lambda e=received: (prom.value(e) or 0) >= 5, 60, f"{module} replies")  # type: ignore[misc]
        lost = prom.value(f'sum(probe_probes_lost_total{{module="{module}"}})')
        assert lost == 0, module
    assert prom.value('probe_hops{module="udp", name="udp"}') == 0  # one bridge, no router
    # /probe through the published port: a listed name answers, another is refused.
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/probe?target=udp:7200&module=udp&count=5", timeout=60
    ) as resp:
        body = resp.read().decode()
    assert "probe_success 1.0" in body
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/probe?target=8.8.8.8:53", timeout=60)
    assert refused.value.code == 400
    logs = b"".join(probe.get_wrapped_container().logs(stdout=False, stderr=True, stream=False)
                    .splitlines(keepends=True))  # fmt: skip
    assert b"Traceback" not in logs
