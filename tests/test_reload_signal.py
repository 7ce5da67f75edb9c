"""SIGHUP at any moment of cmdexec's start, alone and with workers: the process is not killed,
and it comes up serving the newest policy.

Each round writes policy v2 (token B replaces token A) and sends SIGHUP at a random moment
between the start of the console script and a little past its readiness, chosen from a seeded
generator (the seed is printed). Moments before the interpreter has run the service's first
statement (``hold()``, ~30 ms after exec here, nearly all of it the interpreter's own start: the
one window no Python program can close) are moved to the moment the kernel shows SIGHUP
blocked or caught (/proc/PID/status); at that moment pydantic's compiled core must not be loaded
yet (/proc/PID/maps), i.e. the signal is held before the slow imports. Ground truth afterwards:
the process lives, token B logs in and token A is refused, and ``cmdexec_config_info`` names
v2's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from wirekit_testkit import http_get, http_ok, service_process, wait_until

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.tokens import hash_token

SCRIPT = str(Path(sys.executable).parent / "wirekit-cmdexec")
ROUNDS = {1: 8, 2: 5}  # by --workers
_HUP_BIT = 1 << (signal.SIGHUP - 1)


def _policy(token: str) -> str:
    return (f"version: 1\nidentities:\n  ops:\n    tokens: ['{hash_token(token)}']\n"
            "    allow: ['true']\n")  # fmt: skip


def _hup_held(pid: int) -> bool:
    """The kernel's view: SIGHUP blocked or caught by ``pid``'s main thread."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return False
    return bool((int(fields["SigBlk"], 16) | int(fields["SigCgt"], 16)) & _HUP_BIT)


def _login(port: int, token: str) -> str:
    """ "ok" once a command ran, else the ERROR code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            CmdexecClient(s, token).run(["true"], on_stdout=print, on_stderr=print)
        except RemoteError as exc:
            return exc.code
    return "ok"


@dataclass
class Round:
    delay_s: float
    sent_at_s: float = -1.0
    held_after_s: float = -1.0
    #: Whether pydantic's compiled core was already loaded when SIGHUP was first held.
    slow_imports_before_hold: bool = True


def _loaded(pid: int, library: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return library in f.read()
    except OSError:
        return False


Started = tuple[Round, dict[str, int], subprocess.Popen[str], list[str]]


def _start_and_signal(workers: int, policy: Path, v2: str, delay_s: float | None) -> Started:
    """Start the console script; with ``delay_s``, write ``v2`` and send SIGHUP that long
    after (and not before SIGHUP is held); return once it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIREKIT_")}
    env.update({"WIREKIT_CMDEXEC_ALLOW_ROOT": "true", "WIREKIT_CMDEXEC_POLICY_FILE": str(policy)})
    started = time.monotonic()
    argv = [SCRIPT, "--port", "0", "--metrics-port", "0", "--workers", str(workers)]
    popen = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    result = Round(delay_s or 0.0)

    def fire() -> None:
        end = time.monotonic() + 10
        while not _hup_held(popen.pid) and time.monotonic() < end and popen.poll() is None:
            time.sleep(0.0005)
        result.held_after_s = time.monotonic() - started
        result.slow_imports_before_hold = _loaded(popen.pid, "_pydantic_core")
        time.sleep(max(0.0, result.delay_s - result.held_after_s))
        tmp = policy.with_suffix(".new")
        tmp.write_text(v2)
        tmp.replace(policy)  # atomically, as a config reloader does
        popen.send_signal(signal.SIGHUP)
        result.sent_at_s = time.monotonic() - started

    firing = threading.Thread(target=fire)
    if delay_s is not None:
        firing.start()
    lines: list[str] = []
    ports: dict[str, int] = {}
    assert popen.stderr is not None
    for line in popen.stderr:  # bounded: ends when the process does
        lines.append(line)
        if not line.startswith("{"):
            break  # a refusal: one plain line, then the exit
        record = json.loads(line)
        if record.get("message") == "listening" and "worker" not in record:
            ports = record["ports"]
            break
    if delay_s is not None:
        firing.join(30)
    assert ports, f"not ready (exit {popen.poll()}): {''.join(lines)}"
    threading.Thread(target=lambda: lines.extend(popen.stderr or ()), daemon=True).start()
    return result, ports, popen, lines


def _serves(metrics_port: int, policy: str) -> bool:
    """cmdexec_config_info names ``policy``'s SHA-256 (every worker's, summed, is the one)."""
    want = hashlib.sha256(policy.encode()).hexdigest()
    status, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    return status == 200 and f'policy_sha256="{want}"' in text


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_at_any_moment_of_the_start_reloads_and_never_kills(
    workers: int, tmp_path: Path
) -> None:
    seed = int(os.environ.get("WIREKIT_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    # How long a start takes here, to draw moments from: one start without a signal.
    policy = tmp_path / "policy.yaml"
    token_a, token_b = "a-" + secrets.token_urlsafe(24), "b-" + secrets.token_urlsafe(24)
    policy.write_text(_policy(token_a))
    started = time.monotonic()
    _, _, popen, _ = _start_and_signal(workers, policy, "", None)
    ready_s = time.monotonic() - started
    popen.kill()
    popen.wait(10)
    for n in range(ROUNDS[workers]):
        policy.write_text(_policy(token_a))
        v2 = _policy(token_b)
        delay = rng.uniform(0.0, ready_s * 1.1)
        result, ports, popen, lines = _start_and_signal(workers, policy, v2, delay)
        try:
            print(f"round {n}: drawn {delay * 1000:.0f} ms, SIGHUP held after "
                  f"{result.held_after_s * 1000:.0f} ms, sent at {result.sent_at_s * 1000:.0f} "
                  f"ms, ready at ~{ready_s * 1000:.0f} ms")  # fmt: skip
            assert result.sent_at_s >= 0, "the signal was not sent"
            # Held before anything slow: pydantic (and what comes with it) not loaded yet.
            assert not result.slow_imports_before_hold, "SIGHUP held only after the imports"
            wait_until(partial(_serves, ports["metrics"], v2), 10, "config_info of policy v2")
            assert popen.poll() is None, f"killed: {popen.returncode}"
            assert _login(ports["cmdexec"], token_b) == "ok"
            assert _login(ports["cmdexec"], token_a) == "unauthorized"
            popen.terminate()
            assert popen.wait(30) == 0
            bad = [ln for ln in lines if "Traceback" in ln or '"level": "ERROR"' in ln]
            assert not bad, "".join(bad)
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait(10)


@pytest.mark.parametrize(
    ("module", "args"),
    [
        pytest.param("wirekit_udp", ("--port", "0"), id="udp"),
        pytest.param("wirekit_udp", ("--port", "0", "--workers", "2"), id="udp-workers"),
        pytest.param("wirekit_echo", ("--raw-port", "0", "--framed-port", "0"), id="echo"),
        pytest.param("wirekit_probe", (), id="probe"),
    ],
)
def test_sighup_to_a_service_without_reload_is_logged_not_fatal(
    module: str, args: tuple[str, ...]
) -> None:
    """`docker kill -s HUP` (or a reload sent to the wrong service): before, the default action
    ended echo, udp and the prober with status 129; now it is one log line and they serve on."""
    with service_process(module, "--metrics-port", "0", *args) as proc:
        proc.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: any("SIGHUP: nothing to reload" in line for line in proc.lines), 10,
                   "the SIGHUP logged")  # fmt: skip
        time.sleep(0.5)
        assert proc.popen.poll() is None, proc.lines[-5:]
        assert http_ok(proc.url("/readyz"))
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0
        proc.assert_clean_log()
