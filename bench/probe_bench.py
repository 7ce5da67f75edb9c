"""The prober's cell of `make bench`: what probing costs and the RTT floor it adds on loopback,
side by side with smokeping_prober (ICMP, Debian's prometheus-smokeping-prober) and
blackbox_exporter's tcp module (Debian's prometheus-blackbox-exporter), on the same machine.

- CPU: wirekit-probe at 1,000 udp probes/s across 100 targets (127.0.1.1..100, one wirekit-udp
  on 0.0.0.0 answering from each address), and smokeping_prober pinging the same 100 addresses
  every 100 ms (1,000 pings/s): process CPU over the run, per probe and as % of one core.
- RTT floor: the mean round trip on loopback at 500 probes/s to one target (histogram sum over
  count, exact): wirekit-probe udp to wirekit-udp (a userspace answer -- a process woken, a
  Python callback -- is inside the round trip; the prober itself times the reply's arrival with
  the kernel's receive timestamp) and smokeping_prober ICMP to 127.0.0.1 (answered by the kernel
  itself). The same prober against a bare uvloop ``DatagramProtocol`` echo (bench/servers)
  separates what the prober adds from what the reflector adds: on this kind of machine most of
  a loopback round trip is waking the reflector's process.
- TCP: wirekit-probe tcp-connect to wirekit-echo raw at 100/s (mean handshake from its
  histogram, CPU per probe) and blackbox_exporter's tcp_connect module asked 300 times through
  /probe (mean probe_duration_seconds, CPU per probe: the HTTP request is part of its cost).

Prints JSON; ``--quick`` for short runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable
TARGETS = 100
UDP_PORT, UDP_METRICS, ECHO_PORT, ECHO_METRICS, BARE_PORT = 18501, 18502, 18503, 18504, 18508
PROBE_METRICS, SMOKE_PORT, BLACKBOX_PORT = 18505, 18506, 18507


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
    """Sample name -> the sum over its label sets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def wait_http(port: int, path: str = "/metrics", limit_s: float = 30) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            scrape(port, path)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers on :{port}{path}")


def spawn(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def over(
    proc: subprocess.Popen[bytes], port: int, counter: str, seconds: float
) -> tuple[float, float]:
    """(CPU seconds, counter increase) of ``proc`` over ``seconds``."""
    c0, n0 = cpu_s(proc.pid), scrape(port).get(counter, 0.0)
    time.sleep(seconds)
    return cpu_s(proc.pid) - c0, scrape(port).get(counter, 0.0) - n0


def mean_rtt(port: int, family: str) -> float:
    got = scrape(port)
    return got[f"{family}_sum"] / max(1.0, got[f"{family}_count"])


def wirekit_probe(targets: list[str], rate: float) -> subprocess.Popen[bytes]:
    return spawn([PY, "-m", "wirekit_probe", "--metrics-port", str(PROBE_METRICS), "--log-level",
                  "ERROR", "--targets", json.dumps(targets), "--rate-per-target", str(rate),
                  "--packet-budget", "100000", "--resolve-interval-s", "3600"], PROBE_METRICS)  # fmt: skip


def smokeping(hosts: list[str], interval: str) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("prometheus-smokeping-prober")
    if exe is None:
        return None
    config = Path(tempfile.mkdtemp(prefix="wirekit-smokeping-")) / "smokeping.yml"
    config.write_text("targets: []\n")  # the hosts are arguments; the packaged file may not exist
    return spawn([exe, f"--web.listen-address=127.0.0.1:{SMOKE_PORT}", "--privileged",
                  f"--ping.interval={interval}", f"--config.file={config}", *hosts], SMOKE_PORT)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    seconds = 3.0 if args.quick else 10.0
    report: dict[str, Any] = {"seconds": seconds, "targets": TARGETS}
    udp = spawn([PY, "-m", "wirekit_udp", "--host", "0.0.0.0", "--port", str(UDP_PORT),
                 "--metrics-port", str(UDP_METRICS), "--log-level", "ERROR",
                 "--rate-per-source", "1e9", "--burst-per-source", "1000000",
                 "--rate-global", "1e9", "--burst-global", "1000000"], UDP_METRICS)  # fmt: skip
    echo = spawn([PY, "-m", "wirekit_echo", "--mode", "raw", "--raw-port", str(ECHO_PORT),
                  "--metrics-port", str(ECHO_METRICS), "--log-level", "ERROR",
                  "--limit-connections-per-source", "100000"], ECHO_METRICS)  # fmt: skip
    hosts = [f"127.0.1.{i}" for i in range(1, TARGETS + 1)]
    try:
        # 1. CPU at 1,000 probes/s across 100 targets.
        probe = wirekit_probe([f"udp://{h}:{UDP_PORT}" for h in hosts], 10.0)
        try:
            time.sleep(2)
            cpu, n = over(probe, PROBE_METRICS, "probe_probes_sent_total", seconds)
            lost = scrape(PROBE_METRICS).get("probe_probes_lost_total", 0.0)
            report["wirekit-probe udp"] = {"probes_per_s": n / seconds, "cpu_us_per_probe":
                                           cpu / max(1, n) * 1e6, "core_percent": cpu / seconds
                                           * 100, "lost": lost}  # fmt: skip
        finally:
            stop(probe)
        smoke = smokeping(hosts, "100ms")
        if smoke is not None:
            try:
                time.sleep(TARGETS * 0.1 + 1)  # it starts one pinger per interval
                cpu, n = over(smoke, SMOKE_PORT, "smokeping_requests_total", seconds)
                report["smokeping_prober icmp"] = {"probes_per_s": n / seconds,
                                                   "cpu_us_per_probe": cpu / max(1, n) * 1e6,
                                                   "core_percent": cpu / seconds * 100}  # fmt: skip
            finally:
                stop(smoke)
        # 2. The RTT floor on loopback: 500 probes/s to one target, mean round trip.
        probe = wirekit_probe([f"udp://127.0.0.1:{UDP_PORT}"], 500.0)
        try:
            time.sleep(seconds / 2)
            report["rtt_floor_us"] = {"wirekit-probe udp": mean_rtt(PROBE_METRICS,
                                                                    "probe_rtt_seconds") * 1e6}  # fmt: skip
        finally:
            stop(probe)
        bare = subprocess.Popen([PY, str(Path(__file__).parent / "servers" / "refecho.py"),
                                 "udp-uvloop", str(BARE_PORT)], stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert bare.stdout is not None
            assert bare.stdout.readline().strip() == b"ready"
            probe = wirekit_probe([f"udp://127.0.0.1:{BARE_PORT}"], 500.0)
            try:
                time.sleep(seconds / 2)
                report["rtt_floor_us"]["wirekit-probe udp to a bare uvloop echo"] = (
                    mean_rtt(PROBE_METRICS, "probe_rtt_seconds") * 1e6
                )
            finally:
                stop(probe)
        finally:
            stop(bare)
        smoke = smokeping(["127.0.0.1"], "2ms")
        if smoke is not None:
            try:
                time.sleep(seconds / 2)
                report["rtt_floor_us"]["smokeping_prober icmp"] = (
                    mean_rtt(SMOKE_PORT, "smokeping_response_duration_seconds") * 1e6
                )
            finally:
                stop(smoke)
        # 3. TCP: handshakes.
        probe = wirekit_probe([f"tcp-connect://127.0.0.1:{ECHO_PORT}"], 100.0)
        try:
            time.sleep(1)
            cpu, n = over(probe, PROBE_METRICS, "probe_probes_sent_total", seconds / 2)
            report["wirekit-probe tcp-connect"] = {
                "cpu_us_per_probe": cpu / max(1, n) * 1e6,
                "mean_us": mean_rtt(PROBE_METRICS, "probe_connect_seconds") * 1e6,
            }
        finally:
            stop(probe)
        exe = shutil.which("prometheus-blackbox-exporter")
        if exe is not None:
            with tempfile.TemporaryDirectory() as tmp:
                config = Path(tmp) / "blackbox.yml"
                config.write_text("modules:\n  tcp_connect:\n    prober: tcp\n    timeout: 2s\n")
                bb = subprocess.Popen([exe, f"--config.file={config}",
                                       f"--web.listen-address=127.0.0.1:{BLACKBOX_PORT}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                try:
                    wait_http(BLACKBOX_PORT)
                    query = f"/probe?module=tcp_connect&target=127.0.0.1:{ECHO_PORT}"
                    count = 100 if args.quick else 300
                    durations, c0 = [], cpu_s(bb.pid)
                    for _ in range(count):
                        got = scrape(BLACKBOX_PORT, query)
                        assert got["probe_success"] == 1.0, got
                        durations.append(got["probe_duration_seconds"])
                    report["blackbox_exporter tcp"] = {
                        "cpu_us_per_probe": (cpu_s(bb.pid) - c0) / count * 1e6,
                        "mean_us": sum(durations) / count * 1e6,
                    }
                finally:
                    bb.terminate()
                    bb.wait(15)
    finally:
        stop(echo)
        stop(udp)
    print(json.dumps(report))


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
