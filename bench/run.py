"""``make bench``: wirekit against reference servers, measured in the same run, interleaved.

Writes bench/results/latest.{json,md} and throughput.png. Every load is bounded in count and
time and runs on loopback. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
RESULTS = HERE / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- CPU of a process tree, from the scheduler's nanosecond counters ---------------------------
def tree_cpu_ns(root: int) -> dict[tuple[int, str], int]:
    """Nanoseconds on CPU of every thread of the process tree, keyed by (pid, tid).

    Per thread, so a measurement can count only threads alive at its end: a thread that exits
    during the window (the seed design's per-connection threads of an earlier run) would
    otherwise take its whole past with it and make the difference negative."""
    pids, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in pids:
                pids.add(child)
                frontier.append(child)
    out: dict[tuple[int, str], int] = {}
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out[(pid, tid)] = int(f.read().split()[0])
        except OSError:
            pass
    return out


def cpu_delta_s(before: dict[tuple[int, str], int], after: dict[tuple[int, str], int]) -> float:
    return sum(ns - before.get(key, 0) for key, ns in after.items()) / 1e9


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- servers ------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready: str  # "stdout:ready" | "http:PORT" (its /readyz answers) | "connect"
    env: dict[str, str] = field(default_factory=dict)
    udp: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **self.env}, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        end = time.monotonic() + 20
        if self.ready == "stdout:ready":
            assert self.proc.stdout.readline().strip() == b"ready", f"{self.name} failed"
        elif self.ready.startswith("http:"):
            url = f"http://127.0.0.1:{self.ready[5:]}/readyz"
            while time.monotonic() < end:
                try:
                    urllib.request.urlopen(url, timeout=0.5).read()
                    break
                except OSError:
                    time.sleep(0.05)
        else:
            while time.monotonic() < end:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        threading.Thread(target=self._drain, daemon=True).start()
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start")

    def _drain(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group, by its id
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def ref(name: str, kind: str, port: int, udp: bool = False) -> Server:
    return Server(name, [PY, str(HERE / "servers/refecho.py"), kind, str(port)], port,
                  "stdout:ready", udp=udp)  # fmt: skip


def wirekit_echo(
    name: str, port: int, metrics: int, env: dict[str, str], baseline: Path | None = None
) -> Server:
    """The echo service as shipped, its limits raised out of the way of the load; with
    ``baseline``, the same service from another checkout (its sources first on the path)."""
    cmd = [PY, "-m", "wirekit_echo", "--raw-port", str(port), "--framed-port", str(port + 1),
           "--metrics-port", str(metrics), "--log-level", "WARNING", "--limit-connections",
           "20000", "--timeout-idle-s", "600"]  # fmt: skip
    if baseline is None or knows_per_source_limit(baseline):
        cmd += ["--limit-connections-per-source", "20000"]  # every client is 127.0.0.1
    if baseline is not None:
        env = {**env, "PYTHONPATH": echo_path(baseline)}
    return Server(name, cmd, port, "connect", env)


def echo_path(tree: Path) -> str:
    """PYTHONPATH for the echo service of the checkout ``tree``."""
    src = ("shared/framing/src", "shared/servicekit/src", "services/echo/src")
    return os.pathsep.join(str(tree / p) for p in src)


def knows_per_source_limit(tree: Path) -> bool:
    """Whether the echo of ``tree`` has ``--limit-connections-per-source`` (64 by default since
    it came in: left at that, a baseline closes all but 64 of a x100 cell's connections)."""
    env = {**os.environ, "PYTHONPATH": echo_path(tree)}
    usage = subprocess.run([PY, "-m", "wirekit_echo", "--help"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout  # fmt: skip
    return "--limit-connections-per-source" in usage


def checkout(rev: str, workdir: Path) -> Path:
    """The tree of ``rev`` (a commit of this repository) in ``workdir``, for --baseline."""
    dest = workdir / f"baseline-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=HERE.parent, check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # _version.py is generated at install time, not committed: give the baseline's packages one
    # (a revision from before the VERSION file is named by its commit, as a local version).
    file = dest / "VERSION"
    version = file.read_text().strip() if file.exists() else f"0+g{rev}"
    for package in dest.glob("*/*/src/wirekit_*"):
        if not (package / "_version.py").exists():
            (package / "_version.py").write_text(f'__version__ = "{version}"\n')
    return dest


def xinetd(workdir: Path, stream_port: int, dgram_port: int) -> Server | None:
    binary = shutil.which("xinetd")
    if binary is None:
        log("xinetd not installed: its rows are skipped (make bench installs it)")
        return None
    conf = workdir / "xinetd.conf"
    conf.write_text(
        "defaults\n{\n  instances = UNLIMITED\n  per_source = UNLIMITED\n  cps = 100000 1\n"
        f"  log_type = FILE {workdir}/xinetd.log\n}}\n"
        f"service echo\n{{\n  id = echo-stream\n  type = INTERNAL UNLISTED\n  socket_type = stream\n"
        f"  protocol = tcp\n  port = {stream_port}\n  bind = 127.0.0.1\n  wait = no\n"
        "  user = root\n}\n"
        f"service echo\n{{\n  id = echo-dgram\n  type = INTERNAL UNLISTED\n  socket_type = dgram\n"
        f"  protocol = udp\n  port = {dgram_port}\n  bind = 127.0.0.1\n  wait = yes\n"
        "  user = root\n}\n"
    )
    return Server("xinetd", [binary, "-dontfork", "-f", str(conf), "-pidfile",
                             str(workdir / "xinetd.pid")], stream_port, "connect")  # fmt: skip


# -- one measurement ----------------------------------------------------------------------------
def measure(server: Server, kind: str, port: int, **load: Any) -> dict[str, Any]:
    args = [PY, str(HERE / "loadgen.py"), kind, "--port", str(port)]
    for key, value in load.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    cpu0: dict[tuple[int, str], int] = {}
    cpu1: dict[tuple[int, str], int] = {}
    t0 = t1 = 0.0
    result: dict[str, Any] = {}
    for line in proc.stdout:
        if line.strip() == "start":
            cpu0, t0 = tree_cpu_ns(server.pid), time.perf_counter()
        elif line.strip() == "end":
            cpu1, t1 = tree_cpu_ns(server.pid), time.perf_counter()
        elif line.startswith("{"):
            result = json.loads(line)
    proc.wait(60)
    result["server_cpu_s"] = cpu_delta_s(cpu0, cpu1)
    result["wall_s"] = t1 - t0
    msgs = result.get("msgs", 0)
    result["cpu_us_per_msg"] = result["server_cpu_s"] / msgs * 1e6 if msgs else float("nan")
    result["msgs_per_s"] = msgs / result["elapsed"] if result.get("elapsed") else 0.0
    result["rss_kib"] = rss_kib(server.pid)
    return result


def summarize(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples if s.get(key) == s.get(key)]  # drop NaN
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Sink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports (the 'telemetry on' runs send their spans here)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def scraper(port: int, stop: threading.Event) -> None:
    """Scrape /metrics every second, as Prometheus would, while telemetry is on."""
    while not stop.wait(1.0):
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()


# -- the matrix ---------------------------------------------------------------------------------
REF_TCP, REF_UDP = "uvloop-protocol", "uvloop-udp"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="one repetition, short runs (smoke)")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the echo and cmdexec of this commit, interleaved, as "
        "wirekit-baseline (the before of a before/after)",
    )
    p.add_argument(
        "--only",
        choices=("all", "echo", "udp", "cmdexec", "workers", "proxy", "probe"),
        default="all",
        help="echo: the TCP echo tables only; cmdexec: the cmdexec bench only; workers: "
        "wirekit echo with 1 and 2 workers only; proxy: the PROXY protocol's cost per "
        "connection only; probe: the prober beside smokeping_prober and blackbox_exporter",
    )
    args = p.parse_args()
    # SIGTERM (timeout, kill) ends like Ctrl-C: the finally below stops every server started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.reps, args.duration = 1, 0.5
    RESULTS.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="wirekit-bench-"))
    baseline = checkout(args.baseline, workdir) if args.baseline else None
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}",
          "OTEL_BSP_SCHEDULE_DELAY": "1000"}  # fmt: skip
    off = {"OTEL_SDK_DISABLED": "true"}
    tcp = [
        ref("seed-threading", "seed", 18001), ref("asyncio-streams", "streams", 18002),
        ref("asyncio-protocol", "protocol", 18003), ref(REF_TCP, "uvloop", 18004),
        wirekit_echo("wirekit", 18010, 18910, on), wirekit_echo("wirekit-telemetry-off", 18020, 18920, off),
    ]  # fmt: skip
    if baseline is not None:
        tcp.append(wirekit_echo("wirekit-baseline", 18030, 18930, on, baseline))
    udp = [
        ref(REF_UDP, "udp-uvloop", 18104, udp=True),
        Server("wirekit-udp", [PY, "-m", "wirekit_udp", "--port", "18106", "--metrics-port", "18916",
                               "--log-level", "ERROR", "--rate-per-source", "1e9",
                               "--burst-per-source", "1000000", "--rate-global", "1e9",
                               "--burst-global", "1000000"], 18106, "http:18916", on, udp=True),
    ]  # fmt: skip
    if baseline is not None:
        src = [baseline / p for p in ("shared/framing/src", "shared/servicekit/src",
                                      "services/udp/src")]  # fmt: skip
        udp.append(Server("wirekit-udp-baseline", [*udp[1].cmd[:4], "18108", "--metrics-port",
                                                    "18918", *udp[1].cmd[7:]], 18108, "http:18918",
                          {**on, "PYTHONPATH": os.pathsep.join(map(str, src))}, udp=True))  # fmt: skip
    xi = xinetd(workdir, 18005, 18105)
    if xi is not None:
        tcp.insert(4, xi)
    if args.only == "echo":
        udp = []
    if args.only == "udp":
        tcp, xi = [], None
    if args.only in ("cmdexec", "workers", "proxy", "probe"):
        tcp, udp, xi = [], [], None
    everything = tcp + udp
    stop_scraping = threading.Event()
    report: dict[str, Any] = {
        "meta": {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "reps": args.reps,
                 "duration_s": args.duration, "load": "10,000 msgs/s paced unless closed loop"},
        "paced": [], "closed": [], "closed_framed": [], "udp": [], "cold": [], "nagle": [], "idle": {},
        "cmdexec": {}, "framing": {}, "workers": [], "proxy": {}, "probe": {},
        "baseline": args.baseline,
    }  # fmt: skip
    try:
        for server in everything:
            server.start()
        for port in (18910, 18916):
            threading.Thread(target=scraper, args=(port, stop_scraping), daemon=True).start()
        total = args.reps * (3 * 2 * (2 * len(tcp)) + 4 * len(tcp) + 6 + 4 * len(udp) + 1)
        done = 0

        def step(label: str, server: Server, kind: str, port: int, **load: Any) -> dict[str, Any]:
            nonlocal done
            done += 1
            log(f"[{done}/{total}] {label} {server.name}")
            r = measure(server, kind, port, duration=args.duration, warmup=0.3, **load)
            r.update(server=server.name, **{k: v for k, v in load.items() if k != "rate"})
            return r

        for rep in range(args.reps):  # A B A B ...: every server once per round
            for size in (100, 1024, 16384):
                for conns in (10, 100):
                    for server in tcp:
                        r = step(f"paced raw {size}B x{conns}", server, "tcp", server.port,
                                 size=size, conns=conns, rate=10000)  # fmt: skip
                        report["paced"].append({**r, "mode": "raw", "rep": rep})
                    framed_targets = [(s, s.port + (1 if s.name.startswith("wirekit") else 0))
                                      for s in tcp if s.name in (REF_TCP, "wirekit",
                                                                 "wirekit-telemetry-off",
                                                                 "wirekit-baseline")]  # fmt: skip
                    for server, port in framed_targets:
                        r = step(f"paced framed {size}B x{conns}", server, "tcp", port,
                                 size=size, conns=conns, rate=10000, framed=True)  # fmt: skip
                        report["paced"].append({**r, "mode": "framed", "rep": rep})
            for conns in (1, 10, 100, 1000):
                for server in tcp:
                    r = step(f"closed 100B x{conns}", server, "tcp", server.port, size=100,
                             conns=conns, rate=0)  # fmt: skip
                    report["closed"].append({**r, "rep": rep})
            for size in (100, 1024):  # closed loop: framed echo and udp, x10 (issue 24's cells)
                for server in [
                    s for s in tcp if s.name in (REF_TCP, "wirekit", "wirekit-baseline")
                ]:
                    port = server.port + (0 if server.name == REF_TCP else 1)
                    r = step(f"closed framed {size}B x10", server, "tcp", port, size=size,
                             conns=10, rate=0, framed=True)  # fmt: skip
                    report["closed_framed"].append({**r, "rep": rep})
            for size in (100, 1024):
                for load, rate in (("paced", 10000), ("closed", 0)):
                    for server in udp + ([xi] if xi and udp and size == 100 and rate else []):
                        port = 18105 if server is xi else server.port
                        r = step(f"udp {load} {size}B x10", server, "udp", port, size=size,
                                 conns=10, rate=rate)  # fmt: skip
                        report["udp"].append({**r, "load": load, "rep": rep})
        if args.only == "all":
            wk = next(s for s in tcp if s.name == "wirekit")
            for size in (1024, 16384):  # one round trip per message, even for big frames
                r = measure(wk, "tcp", wk.port + 1, size=size, conns=1, rate=0, framed=True,
                            duration=args.duration, warmup=0.3)  # fmt: skip
                report["nagle"].append({**r, "server": "wirekit", "size": size})
            report["cold"] = cold_start(args.duration, on)
            report["idle"] = idle_connections(on)
    finally:
        stop_scraping.set()
        for server in everything:
            server.stop()
        sink.shutdown()
    if args.only in ("all", "workers"):
        report["workers"] = workers_table(args.reps, args.duration, on)
    if args.only in ("all", "cmdexec"):
        log("cmdexec")
        extra = ["--baseline", str(baseline)] if baseline is not None else []
        report["cmdexec"] = json.loads(subprocess.run(
            [PY, str(HERE / "cmdexec_bench.py"), *(["--quick"] if args.quick else []), *extra],
            check=True, capture_output=True, text=True, timeout=900).stdout)  # fmt: skip
    if args.only in ("all", "proxy"):
        log("proxy")
        report["proxy"] = json.loads(subprocess.run(
            [PY, str(HERE / "proxy_bench.py"), *(["--quick"] if args.quick else [])],
            check=True, capture_output=True, text=True, timeout=600).stdout)  # fmt: skip
    if args.only in ("all", "probe"):
        log("probe")
        report["probe"] = json.loads(subprocess.run(
            [PY, str(HERE / "probe_bench.py"), *(["--quick"] if args.quick else [])],
            check=True, capture_output=True, text=True, timeout=600).stdout)  # fmt: skip
    if args.only == "all":
        log("framing")
        report["framing"] = json.loads(subprocess.run(
            [PY, str(HERE / "framing_bench.py"), *(["--quick"] if args.quick else [])],
            check=True, capture_output=True, text=True, timeout=600).stdout)  # fmt: skip
    name = "latest" if args.only == "all" else f"only-{args.only}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    md = render(report)
    (RESULTS / f"{name}.md").write_text(md)
    if args.only == "all":
        with (RESULTS / "history.jsonl").open("a") as f:
            f.write(json.dumps({"meta": report["meta"], "headline": headline(report)}) + "\n")
        plot(report, RESULTS / "throughput.png")
    print(md)


def workers_table(reps: int, duration: float, env: dict[str, str]) -> list[dict[str, Any]]:
    """wirekit echo with 1 and 2 workers, interleaved: server CPU per message at a paced load
    (the fair figure when the load generator needs a core of its own) and closed-loop msgs/s."""
    servers = []
    for n, port in ((1, 18210), (2, 18220)):
        server = wirekit_echo(f"wirekit --workers {n}", port, port + 700, env)
        server.cmd += ["--workers", str(n)]
        server.ready = f"http:{port + 700}"  # the supervisor is ready once every worker is
        servers.append(server)
    rows: list[dict[str, Any]] = []
    try:
        for server in servers:
            server.start()
        for rep in range(reps):
            for server in servers:
                log(f"workers: paced raw 100B x100, {server.name}")
                r = measure(server, "tcp", server.port, size=100, conns=100, rate=10000,
                            duration=duration, warmup=0.3)  # fmt: skip
                rows.append({**r, "server": server.name, "load": "paced", "rep": rep})
                for conns in (10, 100):
                    log(f"workers: closed raw 100B x{conns}, {server.name}")
                    r = measure(server, "tcp", server.port, size=100, conns=conns, rate=0,
                                duration=duration, warmup=0.3)  # fmt: skip
                    rows.append({**r, "server": server.name, "load": f"closed x{conns}",
                                 "rep": rep})  # fmt: skip
    finally:
        for server in servers:
            server.stop()
    return rows


def cold_start(duration: float, env: dict[str, str]) -> list[dict[str, Any]]:
    """A fresh server's first connection against a later one (msgs/s, closed loop, 1 KiB)."""
    out = []
    wirekit_udp = [PY, "-m", "wirekit_udp", "--port", "18206", "--metrics-port", "18913",
                   "--rate-per-source", "1e9", "--burst-per-source", "1000000",
                   "--rate-global", "1e9", "--burst-global", "1000000"]  # fmt: skip
    for make in (lambda: ref("asyncio-protocol", "protocol", 18203),
                 lambda: ref(REF_TCP, "uvloop", 18204),
                 lambda: wirekit_echo("wirekit", 18210, 18911, env),
                 lambda: ref(REF_UDP, "udp-uvloop", 18205, udp=True),
                 lambda: Server("wirekit-udp", wirekit_udp, 18206, "http:18913", env, udp=True)):  # fmt: skip
        server = make()
        server.start()
        kind = "udp" if server.udp else "tcp"
        try:
            first = measure(server, kind, server.port, size=1024, conns=1, rate=0,
                            duration=duration, warmup=0)  # fmt: skip
            later = measure(server, kind, server.port, size=1024, conns=1, rate=0,
                            duration=duration, warmup=0.3)  # fmt: skip
        finally:
            server.stop()
        out.append({"server": server.name, "first": first["msgs_per_s"],
                    "later": later["msgs_per_s"],
                    "first_cpu_us": first["cpu_us_per_msg"], "later_cpu_us": later["cpu_us_per_msg"]})  # fmt: skip
    return out


def idle_connections(env: dict[str, str]) -> dict[str, Any]:
    server = wirekit_echo("wirekit", 18310, 18912, env)
    server.start()
    try:
        time.sleep(0.3)
        before = rss_kib(server.pid)
        procs = [subprocess.Popen([PY, str(HERE / "loadgen.py"), "idle", "--port", str(server.port),
                                   "--conns", "5000", "--duration", "3"], stdout=subprocess.PIPE,
                                  text=True) for _ in range(2)]  # fmt: skip
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "start"
        time.sleep(1.0)
        held = rss_kib(server.pid)
        for proc in procs:
            proc.wait(30)
    finally:
        server.stop()
    return {"connections": 10_000, "rss_before_mib": before / 1024, "rss_held_mib": held / 1024}


# -- report -------------------------------------------------------------------------------------
def _median(rows: list[dict[str, Any]], key: str, **match: Any) -> float:
    values = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())
              and r.get(key) == r.get(key)]  # fmt: skip
    return statistics.median(values) if values else float("nan")


def _spread(rows: list[dict[str, Any]], key: str, **match: Any) -> str:
    values = [r[key] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return f"{min(values):.1f}–{max(values):.1f}" if values else "–"


def headline(report: dict[str, Any]) -> dict[str, float]:
    paced = report["paced"]
    out = {}
    for mode in ("raw", "framed"):
        for size in (100, 1024, 16384):
            for conns in (10, 100):
                ref_cpu = _median(
                    paced, "cpu_us_per_msg", server=REF_TCP, mode=mode, size=size, conns=conns
                )
                wk = _median(
                    paced, "cpu_us_per_msg", server="wirekit", mode=mode, size=size, conns=conns
                )
                out[f"echo_{mode}_{size}B_x{conns}_cpu_ratio"] = wk / ref_cpu
    return out


def render(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        "# wirekit benchmark", "",
        f"{m['when']} · {m['cpus']} CPUs · Python {m['python']} · {m['reps']} repetitions of "
        f"{m['duration_s']} s per cell, servers interleaved (A B A B …) · medians, min–max spread.",
        "", "Cells: median [min–max over the repetitions] (ratio of medians).", "",
        "Server CPU per message is the fair figure on 2 cores (the client needs a whole one):",
        "paced load of 10,000 msgs/s; ratio against uvloop `Protocol` echo (bare, no telemetry).",
        "`wirekit` runs as shipped: metrics scraped every second, OTLP export on.", "",
    ]  # fmt: skip
    if report["paced"]:
        paced = report["paced"]
        servers = list(dict.fromkeys(r["server"] for r in paced))
        for mode in ("raw", "framed"):
            lines += [f"## TCP echo, {mode} messages, paced: server CPU µs/msg (ratio vs {REF_TCP})", "",
                      "| server | " + " | ".join(f"{s} B ×{c}" for s in (100, 1024, 16384) for c in (10, 100)) + " |",
                      "|---|" + "---|" * 6]  # fmt: skip
            for server in servers:
                cells = []
                for size in (100, 1024, 16384):
                    for conns in (10, 100):
                        cell = {"mode": mode, "size": size, "conns": conns}
                        v = _median(paced, "cpu_us_per_msg", server=server, **cell)
                        if v != v:
                            cells.append("–")
                            continue
                        r = v / _median(paced, "cpu_us_per_msg", server=REF_TCP, **cell)
                        spread = _spread(paced, "cpu_us_per_msg", server=server, **cell)
                        cells.append(f"{v:.1f} [{spread}] ({r:.2f}×)")
                if any(c != "–" for c in cells):
                    lines.append(f"| {server} | " + " | ".join(cells) + " |")
            lines.append("")
    if report["closed"]:
        closed = report["closed"]
        lines += ["## TCP echo, closed loop, 100 B: msgs/s (ratio vs uvloop), p50 / p99 ms", "",
                  "| server | ×1 | ×10 | ×100 | ×1000 |", "|---|---|---|---|---|"]  # fmt: skip
        for server in dict.fromkeys(r["server"] for r in closed):
            cells = []
            for conns in (1, 10, 100, 1000):
                v = _median(closed, "msgs_per_s", server=server, conns=conns)
                r = v / _median(closed, "msgs_per_s", server=REF_TCP, conns=conns)
                p50 = _median(closed, "p50", server=server, conns=conns) * 1e3
                p99 = _median(closed, "p99", server=server, conns=conns) * 1e3
                cells.append(f"{v / 1000:.1f}k ({r:.2f}×) {p50:.2f}/{p99:.2f}")
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        client_cpu = _median(closed, "client_cpu", server=REF_TCP, conns=10)
        wall = _median(closed, "elapsed", server=REF_TCP, conns=10)
        lines += ["", f"Load generator headroom: against the fastest server (×10) it used "
                  f"{client_cpu / wall:.0%} of one core: a closed loop here measures the client as much "
                  "as the server, which is why CPU per message at a paced load is the figure to compare.", ""]  # fmt: skip
    if report.get("closed_framed"):
        cf = report["closed_framed"]
        lines += ["## TCP echo, framed, closed loop ×10: server CPU µs/msg and msgs/s (ratio vs uvloop)", "",
                  "| server | 100 B CPU | 100 B msgs/s | 1024 B CPU | 1024 B msgs/s |", "|---|---|---|---|---|"]  # fmt: skip
        for server in dict.fromkeys(r["server"] for r in cf):
            cells = []
            for size in (100, 1024):
                for key in ("cpu_us_per_msg", "msgs_per_s"):
                    v = _median(cf, key, server=server, size=size)
                    r = v / _median(cf, key, server=REF_TCP, size=size)
                    cells.append(
                        f"{v:.1f} ({r:.2f}×)"
                        if key == "cpu_us_per_msg"
                        else f"{v / 1000:.1f}k ({r:.2f}×)"
                    )
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        lines.append("")
    if report["udp"]:
        udp = report["udp"]
        lines += ["## UDP echo, ×10 sockets: server CPU µs/datagram (ratio vs uvloop), paced at 10,000/s and closed loop", "",
                  "| server | paced 100 B | paced 1024 B | closed 100 B | closed 1024 B | closed msgs/s 100 B / 1024 B | paced loss |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for server in dict.fromkeys(r["server"] for r in udp):
            cells = []
            for load in ("paced", "closed"):
                for size in (100, 1024):
                    cell = {"load": load, "size": size}
                    v = _median(udp, "cpu_us_per_msg", server=server, **cell)
                    r = v / _median(udp, "cpu_us_per_msg", server=REF_UDP, **cell)
                    cells.append(
                        "–"
                        if v != v
                        else f"{v:.1f} [{_spread(udp, 'cpu_us_per_msg', server=server, **cell)}] ({r:.2f}×)"
                    )
            rates = [
                _median(udp, "msgs_per_s", server=server, load="closed", size=size)
                / _median(udp, "msgs_per_s", server=REF_UDP, load="closed", size=size)
                for size in (100, 1024)
            ]
            cells.append(" / ".join("–" if x != x else f"{x:.2f}×" for x in rates))
            lost = sum(r["lost"] for r in udp if r["server"] == server and r["load"] == "paced")
            sent = sum(
                r["msgs"] + r["lost"] for r in udp if r["server"] == server and r["load"] == "paced"
            )
            cells.append(f"{lost / max(sent, 1):.2%}")
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        lines.append("")
    if report["cold"]:
        lines += ["", "## Cold start (closed loop, 1 KiB, 1 connection or UDP socket): first vs later", "",
                  "| server | first msgs/s | later msgs/s | first/later |", "|---|---|---|---|"]  # fmt: skip
        for c in report["cold"]:
            lines.append(
                f"| {c['server']} | {c['first']:.0f} | {c['later']:.0f} | {c['first'] / c['later']:.2f} |"
            )
    if report["nagle"]:
        lines += ["", "## Nagle check: framed, 1 connection, closed loop", "",
                  "| size | msgs/s | p50 ms |", "|---|---|---|"]  # fmt: skip
        for n in report["nagle"]:
            lines.append(f"| {n['size']} B | {n['msgs_per_s']:.0f} | {n['p50'] * 1e3:.3f} |")
    if report["idle"]:
        idle = report["idle"]
        lines += ["", f"## Idle connections: {idle['connections']:,} held, echo RSS "
                  f"{idle['rss_before_mib']:.1f} MiB before, {idle['rss_held_mib']:.1f} MiB while held", ""]  # fmt: skip
    if report.get("workers"):
        rows = report["workers"]
        one = "wirekit --workers 1"
        lines += ["## Workers: wirekit echo, raw 100 B, 1 against 2 workers", "",
                  "Server CPU includes the supervisor and every worker. On 2 cores the load "
                  "generator takes one, so msgs/s cannot double here (see bench/RESULTS.md).", "",
                  "| server | paced ×100: CPU µs/msg | closed ×10: msgs/s | closed ×100: msgs/s |",
                  "|---|---|---|---|"]  # fmt: skip
        for server in dict.fromkeys(r["server"] for r in rows):
            cpu = _median(rows, "cpu_us_per_msg", server=server, load="paced")
            cells = [
                f"{cpu:.1f} [{_spread(rows, 'cpu_us_per_msg', server=server, load='paced')}]"
                f" ({cpu / _median(rows, 'cpu_us_per_msg', server=one, load='paced'):.2f}×)"
            ]
            for load in ("closed x10", "closed x100"):
                v = _median(rows, "msgs_per_s", server=server, load=load)
                cells.append(
                    f"{v:,.0f} ({v / _median(rows, 'msgs_per_s', server=one, load=load):.2f}×)"
                )
            lines.append(f"| {server} | " + " | ".join(cells) + " |")
        lines.append("")
    if report["cmdexec"]:
        cx = report["cmdexec"]
        lines += ["## cmdexec", "", "| what | p50 ms | p99 ms |", "|---|---|---|"]
        for row in cx["latency"]:
            lines.append(f"| {row['name']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
        p50 = {row["name"]: row["p50_ms"] for row in cx["latency"]}
        local = p50.get("local subprocess.run(['true'])")
        ours = p50.get("wirekit cmdexec `true` (one connection)")
        if local is not None and ours is not None:
            lines += ["", f"`true` p50 over a local spawn: +{ours - local:.2f} ms (target: +1 ms)"]
        if wrap := cx.get("wrapper"):
            size = (
                f", {wrap['bytes'] / 1024:.0f} KB static {wrap['libc']}" if "bytes" in wrap else ""
            )
            lines += ["", f"rlimits: {wrap['mode']}{size}"]
        lines += ["", "| streaming 100 MB | MB/s |", "|---|---|"]
        for row in cx["streaming"]:
            lines.append(f"| {row['name']} | {row['mb_per_s']:.0f} |")
    if report.get("proxy"):
        px = report["proxy"]
        off, on = px["proxy off"], px["proxy v2"]
        lines += ["## PROXY protocol: cost per connection (echo framed, connect + 100 B + close)", "",
                  f"{px['connections']} connections one after the other, {px['rounds']} interleaved "
                  "rounds, medians.", "",
                  "| | wall µs/connection | server CPU µs/connection |", "|---|---|---|",
                  f"| proxy_protocol off | {off['wall_us']:.0f} | {off['cpu_us']:.0f} |",
                  f"| proxy_protocol v2 (header parsed) | {on['wall_us']:.0f} | {on['cpu_us']:.0f} |",
                  f"| cost of the header | {on['wall_us'] - off['wall_us']:+.0f} | "
                  f"{on['cpu_us'] - off['cpu_us']:+.0f} |", ""]  # fmt: skip
    if report.get("probe"):
        lines += render_probe(report["probe"])
    if report["framing"]:
        fr = report["framing"]
        lines += ["", "## Framing decoder", "",
                  f"- 100-byte frames from one buffer: {fr['frames_per_s'] / 1e6:.2f} M frames/s "
                  f"(`feed`), {fr.get('relay_frames_per_s', float('nan')) / 1e6:.2f} M frames/s "
                  "(`relay`, the echo's call)",
                  f"- byte-at-a-time, per byte: {fr['per_byte_small_ns']:.0f} ns (1 MiB frame), "
                  f"{fr['per_byte_large_ns']:.0f} ns (16 MiB frame): ratio {fr['linearity']:.2f} (O(n))",
                  f"- whole 16 MiB frame in one feed: {fr['whole_per_byte_ns']:.2f} ns per byte", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def render_probe(pr: dict[str, Any]) -> list[str]:
    """The prober's cell: CPU per probe at 1,000/s over 100 targets, the RTT floor, TCP."""
    lines = ["## The prober (wirekit-probe) beside smokeping_prober and blackbox_exporter", "",
             f"{pr['targets']} targets on loopback, {pr['seconds']:g} s per run.", "",
             "| prober | probes/s | CPU µs/probe | % of one core |", "|---|---|---|---|"]  # fmt: skip
    for name in ("wirekit-probe udp", "smokeping_prober icmp"):
        if row := pr.get(name):
            lines.append(f"| {name} | {row['probes_per_s']:.0f} | {row['cpu_us_per_probe']:.0f} | "
                         f"{row['core_percent']:.1f} |")  # fmt: skip
    floor = pr.get("rtt_floor_us", {})
    lines += ["", "| RTT floor on loopback (mean, 500/s to one target) | µs |", "|---|---|"]
    lines += [f"| {name} | {v:.0f} |" for name, v in floor.items()]
    if "smokeping_prober icmp" in floor:
        ratio = floor["wirekit-probe udp"] / floor["smokeping_prober icmp"]
        lines.append(f"| ratio (target: within 2x) | {ratio:.2f}x |")
        if bare := floor.get("wirekit-probe udp to a bare uvloop echo"):
            lines.append(f"| ratio, the prober alone (a bare uvloop reflector) | "
                         f"{bare / floor['smokeping_prober icmp']:.2f}x |")  # fmt: skip
    lines += ["", "| TCP handshake probe | mean µs | CPU µs/probe |", "|---|---|---|"]
    for name in ("wirekit-probe tcp-connect", "blackbox_exporter tcp"):
        if row := pr.get(name):
            lines.append(f"| {name} | {row['mean_us']:.0f} | {row['cpu_us_per_probe']:.0f} |")
    return [*lines, ""]


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot")
        return
    closed = report["closed"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for server in dict.fromkeys(r["server"] for r in closed):
        xs = [1, 10, 100, 1000]
        ax.plot(xs, [_median(closed, "msgs_per_s", server=server, conns=c) for c in xs],
                marker="o", label=server)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("connections")
    ax.set_ylabel("messages/s (closed loop, 100 B)")
    ax.set_title("TCP echo throughput vs connections (2 cores, client included)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
