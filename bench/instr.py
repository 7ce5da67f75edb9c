"""Servers compared by the instructions they execute per message: deterministic where the CPU
time of run.py and udp_bench.py moves +-10 % from run to run on a shared machine.

Each server runs under valgrind's callgrind (which counts every instruction the process
executes in user space: the interpreter, uvloop, libc -- not the kernel's) and answers a
ping-pong of distinct messages from one client: udp datagrams (wirekit-udp bound to 127.0.0.1,
or to 0.0.0.0 as the images run it: ``udp-wildcard``), raw echo messages, or framed echo
frames. It runs twice, for N1 and N2 messages, and (instructions(N2) -
instructions(N1)) / (N2 - N1) is what one more message costs, start-up and shutdown cancelled
out (a first, short run writes the bytecode caches). The kernel's share is the same for every
server of a kind (one read and one write per message, with one epoll_wait: checked with
``strace -c``), so a smaller count is less CPU. Hash seeds are fixed (PYTHONHASHSEED=0): two
runs give the same counts within a few instructions.

    python bench/instr.py [--kinds udp,udp-wildcard,raw,framed] [--baseline REV ...] [--tree DIR ...]
                          [--sizes 100,1024]

Needs valgrind (``make bench`` installs it). Takes ~1 minute per server, kind and size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, REF_TCP, REF_UDP, checkout  # noqa: E402

N1, N2 = 500, 2500
PORT = 18880
LIMITS_OFF = ["--log-level", "ERROR", "--rate-per-source", "1e9", "--burst-per-source", "1000000",
              "--rate-global", "1e9", "--burst-global", "1000000"]  # fmt: skip


def _connect(kind: str, proc: subprocess.Popen[str], cmd: list[str]) -> socket.socket:
    deadline = time.monotonic() + 120  # valgrind starts a Python service slowly
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind.startswith("udp") else
                          socket.SOCK_STREAM)  # fmt: skip
        try:
            s.settimeout(2)
            s.connect(("127.0.0.1", PORT))
            if kind.startswith("udp"):
                s.send(b"warmup!!")
                s.recv(65536)
            else:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(10)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{cmd} did not answer") from None
            time.sleep(0.5)


def _sigint_default() -> None:
    """The servers stop on SIGINT: a shell's background job (nohup, &) ignores it, and an
    ignored signal stays ignored across exec, so it is restored in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def instructions(cmd: list[str], env: dict[str, str], kind: str, n: int, size: int) -> int:
    """What the process ``cmd`` executed in all, having answered ``n`` messages of ``size``."""
    full = dict(os.environ, OTEL_SDK_DISABLED="true", PYTHONHASHSEED="0", **env)
    vg = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    proc = subprocess.Popen(vg + cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_sigint_default)  # fmt: skip
    try:
        with _connect(kind, proc, cmd) as s:
            tail = bytes(size - 8)
            for i in range(n):
                body = i.to_bytes(8, "big") + tail
                msg = len(body).to_bytes(4, "big") + body if kind == "framed" else body
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):  # a datagram comes whole; a stream may not
                    try:
                        got += s.recv(65536)
                    except TimeoutError:
                        raise RuntimeError(f"{cmd}: message {i} not answered") from None
                if got != msg:
                    raise RuntimeError(f"{cmd}: message {i} came back different")
        time.sleep(0.2)  # the server sees the close before it is stopped
    finally:
        proc.send_signal(2)  # SIGINT: every server here ends on it, and callgrind reports
        _, err = proc.communicate(timeout=120)
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"no callgrind total for {cmd}: {err[-500:]}")
    return int(found.group(1))


def per_message(cmd: list[str], env: dict[str, str], kind: str, size: int) -> float:
    instructions(cmd, env, kind, 1, size)  # a first run writes the bytecode caches
    n2, n1 = instructions(cmd, env, kind, N2, size), instructions(cmd, env, kind, N1, size)
    return (n2 - n1) / (N2 - N1)


def wirekit(kind: str, tree: Path | None) -> tuple[list[str], dict[str, str]]:
    """The service as run.py runs it (limits out of the way), from ``tree`` if given."""
    if kind.startswith("udp"):  # udp-wildcard: bound to 0.0.0.0 (answers via IP_PKTINFO)
        service = "udp"
        host = "0.0.0.0" if kind == "udp-wildcard" else "127.0.0.1"
        cmd = [PY, "-m", "wirekit_udp", "--host", host, "--port", str(PORT),
               "--metrics-port", str(PORT + 100), *LIMITS_OFF]  # fmt: skip
    else:
        service = "echo"
        ports = ["--raw-port", str(PORT), "--framed-port", str(PORT + 1)]
        if kind == "framed":
            ports = ["--raw-port", str(PORT + 1), "--framed-port", str(PORT)]
        cmd = [PY, "-m", "wirekit_echo", *ports, "--metrics-port", str(PORT + 100),
               "--log-level", "WARNING", "--limit-connections-per-source", "20000"]  # fmt: skip
    if tree is None:
        return cmd, {}
    src = [
        tree / p for p in ("shared/framing/src", "shared/servicekit/src", f"services/{service}/src")
    ]
    return cmd, {"PYTHONPATH": os.pathsep.join(map(str, src))}


def main() -> None:
    global PORT  # one setting the helpers above read
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="udp,udp-wildcard,raw,framed")
    p.add_argument("--baseline", action="append", default=[], metavar="REV")
    p.add_argument("--tree", type=Path, action="append", default=[], metavar="DIR")
    p.add_argument("--sizes", default="100,1024")
    p.add_argument("--port", type=int, default=PORT, help="the servers' port (and the next two)")
    args = p.parse_args()
    PORT = args.port
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind; make bench does)")
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="wirekit-instr-"))
    trees: dict[str, Path | None] = {"wirekit": None}
    trees.update({f"wirekit {rev}": checkout(rev, workdir) for rev in args.baseline})
    trees.update({f"wirekit {tree.name}": tree for tree in args.tree})
    for kind in args.kinds.split(","):
        udp = kind.startswith("udp")
        ref = "udp-uvloop" if udp else "uvloop"
        reference_cmd = [PY, str(HERE / "servers/refecho.py"), ref, str(PORT)]
        servers: dict[str, tuple[list[str], dict[str, str]]] = {
            REF_UDP if udp else REF_TCP: (reference_cmd, {})
        }
        servers.update({name: wirekit(kind, tree) for name, tree in trees.items()})
        rows = {name: [per_message(cmd, env, kind, size) for size in sizes]
                for name, (cmd, env) in servers.items()}  # fmt: skip
        reference = next(iter(rows.values()))
        print(f"\n{kind}: instructions per message (ratio to {next(iter(rows))})\n")
        print("| server | " + " | ".join(f"{s} B" for s in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        for name, counts in rows.items():
            cells = [f"{c:,.0f} ({c / r:.2f}×)" for c, r in zip(counts, reference, strict=True)]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
