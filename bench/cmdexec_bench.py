"""cmdexec against local spawning and OpenSSH: per-command latency over one persistent
connection, and streaming a 100 MB file. Prints one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wirekit_cmdexec.client import CmdexecClient

TOKEN = "bench-Tq3vXw0yZk8sPd2LmN5rBc7HfJ1gAe4U"  # strong: weak tokens are refused


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": statistics.median(s) * 1e3,
        "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3,
    }


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def start_cmdexec(
    work: Path, big: Path, baseline: Path | None = None
) -> tuple[subprocess.Popen[str], int]:
    """The service (or, with ``baseline``, the one of that checkout). It runs as root here, as
    the bench does: the service is told that this is meant."""
    env = {**os.environ, "WIREKIT_CMDEXEC_TOKEN": TOKEN, "WIREKIT_CMDEXEC_LOG_LEVEL": "INFO",
           "WIREKIT_CMDEXEC_ALLOW_ROOT": "true"}  # fmt: skip
    if baseline is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            str(baseline / p) for p in ("shared/framing/src", "shared/servicekit/src",
                                        "services/cmdexec/src")
        )  # fmt: skip
    popen = subprocess.Popen(
        [sys.executable, "-m", "wirekit_cmdexec", "--port", "0", "--metrics-port", "0",
         "--allow", '["true", "cat"]',
         "--arg-patterns", json.dumps({"cat": str(big)}),
         "--limit-output-bytes", str(1 << 30), "--timeout-run-s", "120"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert popen.stderr is not None
    deadline = time.monotonic() + 20
    for line in popen.stderr:
        if '"listening"' in line:
            threading.Thread(target=lambda: [None for _ in popen.stderr], daemon=True).start()  # type: ignore[union-attr]
            return popen, json.loads(line)["ports"]["cmdexec"]
        if time.monotonic() > deadline:
            break
    popen.kill()
    raise RuntimeError("cmdexec did not start")


def start_sshd(work: Path) -> tuple[subprocess.Popen[bytes], list[str]] | None:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or not shutil.which("ssh"):
        return None
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)],
                       check=True)  # fmt: skip
    (work / "authorized_keys").write_text((work / "user.pub").read_text())
    os.chmod(work / "authorized_keys", 0o600)
    port = _free_port()
    (work / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work}/host\nPidFile {work}/sshd.pid\n"
        f"AuthorizedKeysFile {work}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "MaxSessions 100\nMaxStartups 100\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(work / "sshd_config")],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    base = ["ssh", "-p", str(port), "-i", str(work / "user"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes"]  # fmt: skip
    for _ in range(50):
        if subprocess.run([*base, "root@127.0.0.1", "true"], capture_output=True).returncode == 0:
            return proc, base
        time.sleep(0.1)
    proc.terminate()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drop(_: bytes) -> None:
    pass


def wrapper() -> dict[str, object]:
    """The exec wrapper the service will use (as its Spawner finds it): its linkage decides
    its cost per command (static musl +0.06 ms, static glibc +0.36 ms: bench/RESULTS.md)."""
    from wirekit_cmdexec.runner import Spawner

    spawner = Spawner({"nproc": 1})
    if not spawner.prefix:
        return {"mode": spawner.mode}
    path = Path(spawner.prefix[0])
    data = path.read_bytes()
    libc = "glibc" if b"glibc" in data else "musl"
    return {"mode": spawner.mode, "path": str(path), "bytes": len(data), "libc": libc}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--baseline", help="a checkout whose cmdexec is measured too (before/after)")
    args = p.parse_args()
    n = 50 if args.quick else 300
    size = (20 if args.quick else 100) * 1_000_000
    work = Path(tempfile.mkdtemp(prefix="wirekit-cx-bench-"))
    big = work / "big.bin"
    with big.open("wb") as f:
        f.write(os.urandom(1 << 20) * (size // (1 << 20)))
    size = big.stat().st_size
    latency, streaming = [], []
    servers = {"wirekit": start_cmdexec(work, big)}
    if args.baseline:
        servers["wirekit-baseline"] = start_cmdexec(work, big, Path(args.baseline))
    try:
        clients = {}
        for name, (_, port) in servers.items():
            sock = socket.create_connection(("127.0.0.1", port))
            clients[name] = CmdexecClient(sock, TOKEN)
            clients[name].run(["true"], on_stdout=_drop, on_stderr=_drop)  # warm

        # Interleaved rounds: local, wirekit, baseline, local, ... so drift hits them alike.
        samples: dict[str, list[float]] = {"local": [], **{k: [] for k in clients}}
        rounds = 5
        for _ in range(rounds):
            samples["local"] += timed(lambda: subprocess.run(["true"]), n // rounds)
            for name, client in clients.items():
                samples[name] += timed(
                    lambda c=client: c.run(["true"], on_stdout=_drop, on_stderr=_drop),
                    n // rounds,
                )
        latency.append({"name": "local subprocess.run(['true'])", **percentiles(samples["local"])})
        for name in clients:
            latency.append({"name": f"{name} cmdexec `true` (one connection)",
                            **percentiles(samples[name])})  # fmt: skip
        for name, client in clients.items():
            got = [0]

            def count(data: bytes, got: list[int] = got) -> None:
                got[0] += len(data)

            t0 = time.perf_counter()
            client.run(["cat", str(big)], on_stdout=count, on_stderr=_drop)
            elapsed = time.perf_counter() - t0
            assert got[0] == size, (got[0], size)
            streaming.append(
                {"name": f"{name} cmdexec `cat` (no TLS)", "mb_per_s": size / elapsed / 1e6}
            )
        for client in clients.values():
            client.sock.close()
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(15)
    sshd = start_sshd(work)
    if sshd is not None:
        proc, base = sshd
        try:
            latency.append({"name": "ssh, new connection each",
                            **percentiles(timed(lambda: subprocess.run([*base, "root@127.0.0.1", "true"]),
                                                max(10, n // 10)))})  # fmt: skip
            mux = [*base, "-o", "ControlMaster=auto", "-o", f"ControlPath={work}/mux",
                   "-o", "ControlPersist=60"]  # fmt: skip
            subprocess.run([*mux, "root@127.0.0.1", "true"], check=True)
            latency.append({"name": "ssh with ControlMaster",
                            **percentiles(timed(lambda: subprocess.run([*mux, "root@127.0.0.1", "true"]),
                                                max(20, n // 3)))})  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(
                [*mux, "root@127.0.0.1", "cat", str(big)], stdout=subprocess.DEVNULL, check=True
            )
            streaming.append(
                {
                    "name": "ssh `cat`, multiplexed",
                    "mb_per_s": size / (time.perf_counter() - t0) / 1e6,
                }
            )
            subprocess.run([*mux, "-O", "exit", "root@127.0.0.1"], capture_output=True)
        finally:
            proc.terminate()
            proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"latency": latency, "streaming": streaming, "stream_bytes": size,
                      "wrapper": wrapper()}))  # fmt: skip


if __name__ == "__main__":
    main()
