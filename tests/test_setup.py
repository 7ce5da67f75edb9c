"""The README's first command on a fresh clone: `make run`, with no `make install` before it,
makes the virtualenv and serves echo (issue 15: it used to fail until `make install`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from wirekit_testkit import tool

from wirekit_framing import encode, recv_frame

ROOT = Path(__file__).resolve().parents[1]


def test_make_run_on_a_fresh_clone_makes_its_venv_and_serves_echo(tmp_path: Path) -> None:
    clone = tmp_path / "wirekit"
    subprocess.run([tool("git"), "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    env = {**os.environ, "WIREKIT_ECHO_RAW_PORT": "0", "WIREKIT_ECHO_FRAMED_PORT": "0",
           "WIREKIT_ECHO_METRICS_PORT": "0"}  # fmt: skip
    env.pop("VIRTUAL_ENV", None)
    make = subprocess.Popen(
        [tool("make"), "-s", "run"], cwd=clone, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert make.stderr is not None
    lines: list[str] = []
    try:
        ports: dict[str, int] = {}
        for line in make.stderr:  # the service's JSON log (pip is quiet); ends if make fails
            lines.append(line)
            if line.startswith("{") and json.loads(line).get("message") == "listening":
                ports = json.loads(line)["ports"]
                break
        assert ports, "".join(lines[-30:])
        threading.Thread(target=lambda: lines.extend(make.stderr or ()), daemon=True).start()
        with socket.create_connection(("127.0.0.1", ports["raw"]), timeout=10) as s:
            s.sendall(b"hello, fresh clone\n")
            assert s.recv(100) == b"hello, fresh clone\n"
        with socket.create_connection(("127.0.0.1", ports["framed"]), timeout=10) as s:
            s.sendall(encode(b"framed too"))
            assert recv_frame(s) == b"framed too"
        assert (clone / ".venv" / ".installed").exists()
        os.killpg(make.pid, signal.SIGTERM)  # make's process group: make and the service
        make.wait(30)
        # Up to date now: a second `make -n run` would not install again.
        dry = subprocess.run([tool("make"), "-n", "run"], cwd=clone, capture_output=True,
                             text=True, timeout=60, check=True)  # fmt: skip
        assert "pip install" not in dry.stdout
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)
