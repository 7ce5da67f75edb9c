"""The probe image on a Docker network with the udp and echo images: it finds its targets by
name, Prometheus scrapes its series, and /probe answers through the published port."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from wirekit_testkit import Prometheus, hardened, host_port, wait_ready, wait_until

Start = Callable[[DockerContainer], DockerContainer]
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/probe.json"
#: What Grafana puts for the dashboard's variables when every value is chosen ("All"), and for
#: its own range macros (a rate window of 15 s is four of this Prometheus' 1 s scrapes).
GRAFANA = {"$instance": ".+", "$module": ".+", "$__range": "1m", "$__rate_interval": "15s"}


def render(prom: Prometheus) -> dict[str, list[float]]:
    """What Grafana would draw: every panel's every query run against the real Prometheus,
    the variables filled in as Grafana fills them; title -> every value it returned."""
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC, LABEL): the values to choose from
            metric, label = variable["query"].removeprefix("label_values(").rstrip(")").split(", ")
            query = urllib.parse.urlencode({"match[]": metric})
            with urllib.request.urlopen(f"{prom.base}/api/v1/label/{label}/values?{query}",
                                        timeout=5) as resp:  # fmt: skip
                assert json.load(resp)["data"], f"variable {variable['name']}: no values"
    drawn: dict[str, list[float]] = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            values = [float(r["value"][1]) for r in prom.query(expr)]  # type: ignore[index]
            drawn.setdefault(panel["title"], []).extend(values)
    return drawn


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
    # The dashboard draws: every panel has data, every value a number (no NaN from a division
    # or a quantile over nothing), losses 0, RTT quantiles inside the histogram's range.
    # Drawn, and in numbers: a series with no round trip in the last $__rate_interval is a NaN
    # quantile while it lasts (seen once in CI, cause not found); one that stays fails here.
    wait_until(lambda: all(v and all(map(math.isfinite, v)) for v in render(prom).values()), 60,
               "every panel of probe.json drawn, in numbers")  # fmt: skip
    drawn = render(prom)
    for title, values in drawn.items():
        assert values, title
        assert all(math.isfinite(v) for v in values), (title, values)
    assert max(drawn["Loss matrix (prober x target, over the range)"]) == 0
    assert all(0 < v < 1 for v in drawn["RTT p50 / p90 / p99"])
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
