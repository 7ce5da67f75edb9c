"""wirekit-probe as a service: real targets (wirekit-udp, wirekit-echo), the prober as a real
process, its /metrics and /probe read over HTTP."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from wirekit_testkit import ServiceProcess, free_port, service_process, wait_until


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /,
          **labels: str) -> float:  # fmt: skip
    return got.get((metric, tuple(sorted(labels.items()))), float("nan"))


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def udp() -> Iterator[ServiceProcess]:
    limits = ("--rate-per-source", "100000", "--burst-per-source", "100000")
    with service_process("wirekit_udp", "--port", "0", "--metrics-port", "0", *limits) as proc:
        yield proc
        proc.assert_clean_log()


@pytest.fixture(scope="module")
def echo() -> Iterator[ServiceProcess]:
    ports = ("--raw-port", "0", "--framed-port", "0", "--metrics-port", "0")
    with service_process("wirekit_echo", *ports) as proc:
        yield proc
        proc.assert_clean_log()


def prober(*args: str) -> contextlib.AbstractContextManager[ServiceProcess]:
    return service_process("wirekit_probe", "--metrics-port", "0", *args)


def test_a_series_per_target_and_dead_targets_are_total_loss(
    udp: ServiceProcess, echo: ServiceProcess
) -> None:
    dead_udp, dead_tcp = free_port(), free_port()
    live = {
        "udp": f"127.0.0.1:{udp.ports['udp']}",
        "tcp-framed": f"127.0.0.1:{echo.ports['framed']}",
        "tcp-connect": f"127.0.0.1:{echo.ports['raw']}",
    }
    dead = {"udp": f"127.0.0.1:{dead_udp}", "tcp-framed": f"127.0.0.1:{dead_tcp}",
            "tcp-connect": f"127.0.0.1:{dead_tcp}"}  # fmt: skip
    targets = [f"{m}://{t}" for m, t in [*live.items(), *dead.items()]]
    with prober("--targets", json.dumps(targets), "--rate-per-target", "20",
                "--timeout-s", "0.3") as proc:  # fmt: skip
        url = proc.url("/metrics")

        def sent(module: str, target: str) -> float:
            return value(samples(url), "probe_probes_sent_total", module=module, target=target,
                         name="127.0.0.1")  # fmt: skip

        for module, target in [*live.items(), *dead.items()]:
            wait_until(functools.partial(lambda m, t: sent(m, t) >= 20, module, target), 30,
                       f"{module} {target}")  # fmt: skip
        time.sleep(0.5)  # every probe counted so far has had its timeout
        got = samples(url)
        assert value(got, "probe_targets") == 6
        for module, target in live.items():
            labels = {"module": module, "target": target, "name": "127.0.0.1"}
            assert value(got, "probe_up", **labels) == 1, module
            assert value(got, "probe_probes_received_total", **labels) >= 19, module
            assert value(got, "probe_probes_lost_total", **labels) == 0, module
            # One RTT observed per reply (the families are read one after the other while the
            # probes go on: a reply or two may land between them).
            observed = value(got, "probe_rtt_seconds_count", **labels)
            assert abs(observed - value(got, "probe_probes_received_total", **labels)) <= 2
        assert value(got, "probe_hops", module="udp", target=live["udp"], name="127.0.0.1") == 0
        assert value(got, "probe_connects_total", module="tcp-framed", target=live["tcp-framed"],
                     name="127.0.0.1", result="ok") == 1  # one persistent connection  # fmt: skip
        for module, target in dead.items():
            labels = {"module": module, "target": target, "name": "127.0.0.1"}
            assert value(got, "probe_up", **labels) == 0, module
            assert value(got, "probe_probes_received_total", **labels) == 0, module
            lost = value(got, "probe_probes_lost_total", **labels)
            sent_now = value(got, "probe_probes_sent_total", **labels)
            if module == "udp":  # the last 0.3 s of probes are in flight: about 6 at 20/s
                assert sent_now - 25 <= lost <= sent_now, (lost, sent_now)
            else:  # a probe that cannot connect is lost at once (a scrape may fall between
                # the send, the refusal and the loss of the probe in flight: 2 at most)
                assert sent_now - 2 <= lost <= sent_now, (module, lost, sent_now)
                refused = value(got, "probe_connects_total", result="refused", **labels)
                assert abs(refused - lost) <= 2, (module, refused, lost)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0
        proc.assert_clean_log()


def test_the_packet_budget_holds_whatever_the_targets_ask(udp: ServiceProcess) -> None:
    """Four targets asking 200/s each, a budget of 40/s: each gets its share (0.9 x 10/s),
    and no second holds more than 1.1 x the budget."""
    target = f"udp://127.0.0.1:{udp.ports['udp']}"
    others = [f"udp://127.0.0.{i}:{udp.ports['udp']}" for i in (2, 3, 4)]  # no answer: lost
    started = time.monotonic()
    with prober("--targets", json.dumps([target, *others]), "--rate-per-target", "200",
                "--packet-budget", "40") as proc:  # fmt: skip
        time.sleep(3)
        got = samples(proc.url("/metrics"))
        elapsed = time.monotonic() - started
        total = sum(v for (name, _), v in got.items() if name == "probe_probes_sent_total")
        skipped = sum(v for (name, _), v in got.items() if name == "probe_probes_skipped_total")
        assert 0 < total <= 40 * elapsed * 1.1 + 4, (total, elapsed)
        # Each target its share: what each asked (sent + skipped) is about the same.
        sent = {labels: v for (name, labels), v in got.items() if name == "probe_probes_sent_total"}
        asked = [v + value(got, "probe_probes_skipped_total", **dict(k)) for k, v in sent.items()]
        assert len(asked) == 4
        assert min(asked) >= 0.4 * max(asked), asked
        assert skipped < total  # the shares leave headroom: skips are Poisson's clusters
        proc.assert_clean_log()


def test_endpoints_over_the_limit_are_left_out_and_counted(udp: ServiceProcess) -> None:
    """Five endpoints, limit_endpoints 3: three are probed (the first in order), two are
    counted as dropped, and no series exists for them."""
    port = udp.ports["udp"]
    targets = [f"udp://127.0.0.{i}:{port}" for i in (5, 1, 4, 2, 3)]
    with prober("--targets", json.dumps(targets), "--limit-endpoints", "3",
                "--rate-per-target", "5") as proc:  # fmt: skip
        wait_until(lambda: value(samples(proc.url("/metrics")), "probe_targets") == 3, 30,
                   "three endpoints probed")  # fmt: skip
        got = samples(proc.url("/metrics"))
        assert value(got, "probe_endpoints_dropped") == 2
        probed = {dict(labels)["target"] for (name, labels) in got
                  if name == "probe_probes_sent_total"}  # fmt: skip
        assert probed == {f"127.0.0.{i}:{port}" for i in (1, 2, 3)}
        assert any("too many endpoints" in line for line in list(proc.lines))
        proc.assert_clean_log()


@pytest.fixture(scope="module")
def probe_api(udp: ServiceProcess) -> Iterator[ServiceProcess]:
    with prober("--probe-allow", json.dumps(["127.0.0.0/8", "localhost"]),
                "--probe-concurrency", "1", "--probe-count", "50",
                "--probe-interval-s", "0.01", "--timeout-s", "0.3") as proc:  # fmt: skip
        yield proc
        proc.assert_clean_log()


def test_probe_answers_one_burst_for_the_target(
    udp: ServiceProcess, probe_api: ServiceProcess
) -> None:
    target = f"127.0.0.1:{udp.ports['udp']}"
    status, body = get(probe_api.url(f"/probe?target={target}&module=udp&count=20"))
    assert status == 200, body
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(body) for s in f.samples}  # fmt: skip
    labels = {"module": "udp", "target": target, "name": "127.0.0.1"}
    assert value(got, "probe_success") == 1
    assert value(got, "probe_probes_sent_total", **labels) == 20
    assert value(got, "probe_probes_received_total", **labels) == 20
    assert value(got, "probe_rtt_seconds_count", **labels) == 20
    # A dead one: 200 with probe_success 0, every probe lost.
    status, body = get(probe_api.url(f"/probe?target=127.0.0.1:{free_port()}&count=5"))
    assert status == 200
    assert "probe_success 0.0" in body
    assert "probe_probes_lost_total" in body


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("", "target is required", id="no-target"),
        pytest.param("target=127.0.0.1:7&module=icmp", "unknown module 'icmp'", id="module"),
        pytest.param("target=127.0.0.1", "HOST:PORT", id="no-port"),
        pytest.param("target=127.0.0.1:99999", "HOST:PORT", id="bad-port"),
        pytest.param("target=10.0.0.1:7", "not allowed by probe_allow", id="not-allowed"),
        pytest.param("target=[::1]:7", "not allowed by probe_allow", id="v6-not-allowed"),
        pytest.param("target=no-such-host.invalid:7", "cannot resolve", id="nxdomain"),
        pytest.param("target=127.0.0.1:7&count=0", "count must be 1..50", id="count-0"),
        pytest.param("target=127.0.0.1:7&count=51", "count must be 1..50", id="count-over"),
        pytest.param("target=127.0.0.1:7&count=x", "count must be 1..50", id="count-nan"),
    ],
)
def test_probe_refuses_with_one_line(probe_api: ServiceProcess, query: str, reason: str) -> None:
    status, body = get(probe_api.url(f"/probe?{query}"))
    assert status == 400
    assert reason in body
    assert body.count("\n") == 1


def test_probe_bursts_beyond_the_concurrency_are_429(
    udp: ServiceProcess, probe_api: ServiceProcess
) -> None:
    target = f"127.0.0.1:{udp.ports['udp']}"
    before = udp.value("udp_datagrams_received_total")
    first: list[int] = []
    slow = threading.Thread(target=lambda: first.append(
        get(probe_api.url(f"/probe?target={target}&count=50"))[0]))  # fmt: skip
    slow.start()
    try:
        # The first burst has begun (its probes reach the target): it holds the one slot for
        # about half a second more.
        wait_until(lambda: udp.value("udp_datagrams_received_total") > before, 10, "a burst")
        status, body = get(probe_api.url(f"/probe?target={target}&count=1"))
        assert status == 429, body
    finally:
        slow.join(60)
    assert first == [200]


def test_more_than_one_worker_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "wirekit_probe", "--workers", "2"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "runs as one process" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("targets", ['["icmp://127.0.0.1:7"]', '["udp://127.0.0.1"]'])
def test_bad_targets_are_refused_at_start(targets: str) -> None:
    done = subprocess.run([sys.executable, "-m", "wirekit_probe", "--targets", targets],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "invalid settings" in done.stderr
    assert "Traceback" not in done.stderr


def private_hosts(path: Path) -> list[str]:
    """Run under a mount namespace of its own whose /etc/hosts is ``path`` (root, as CI is):
    names that the test changes while the prober runs -- glibc reads the file at every
    lookup -- without touching the machine's."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{path}" /etc/hosts && exec "$0" "$@"']  # fmt: skip


@pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="a mount namespace needs root"
)
def test_targets_follow_the_names_resolution(udp: ServiceProcess, tmp_path: Path) -> None:
    """A name with two addresses is two targets; an address that leaves the name has its series
    removed at the next resolution; one that joins starts from zero."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 flappy.test\n127.0.0.2 flappy.test\n")
    port = udp.ports["udp"]
    spec = json.dumps([f"udp://flappy.test:{port}"])
    with service_process("wirekit_probe", "--metrics-port", "0", "--targets", spec,
                         "--resolve-interval-s", "0.2", "--rate-per-target", "20",
                         wrap=private_hosts(hosts)) as proc:  # fmt: skip
        url = proc.url("/metrics")

        def targets() -> set[str]:
            return {dict(labels)["target"] for (name, labels) in samples(url)
                    if name == "probe_probes_sent_total"}  # fmt: skip

        wait_until(lambda: targets() == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}, 10, "two")
        wait_until(lambda: value(samples(url), "probe_probes_received_total", module="udp",
                                 target=f"127.0.0.1:{port}", name="flappy.test") > 0, 10,
                   "answers from 127.0.0.1")  # fmt: skip
        hosts.write_text("127.0.0.2 flappy.test\n127.0.0.3 flappy.test\n")  # same inode
        wait_until(lambda: targets() == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}, 10, "moved")
        got = samples(url)
        assert not [k for k in got if ("target", f"127.0.0.1:{port}") in k[1]]  # nothing stale
        assert value(got, "probe_targets") == 2
        hosts.write_text("")  # the name is gone: a failed resolution keeps the last answer

        def errors() -> float:
            got = samples(url)
            return sum(v for (name, _), v in got.items() if name == "probe_resolve_errors_total")

        wait_until(lambda: errors() > 0, 10, "a failed resolution")
        assert targets() == {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0
        bad = [line for line in proc.lines if "Traceback" in line]
        assert not bad, bad
