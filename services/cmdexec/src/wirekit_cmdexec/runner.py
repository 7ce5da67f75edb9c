"""How a command runs: its own process group, a minimal environment, a timeout that kills the
whole group, output capped per stream and streamed as produced with back-pressure, stdin and
signals forwarded, and no process left behind when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .messages import Kind

#: Pipe read size, and so the largest STDOUT/STDERR message.
CHUNK = 64 * 1024
#: After the command exits, how long its pipes may stay open (held by a background grandchild)
#: before the rest of its process group is killed.
PIPE_GRACE_S = 0.2

Send = Callable[[Kind, bytes], Awaitable[None]]
#: Client messages during a run: (kind, body), or None when the client has gone.
Inbox = asyncio.Queue[tuple[Kind, object] | None]

_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS}


@dataclass(frozen=True)
class RunLimits:
    timeout_s: float
    output_bytes: int  # per stream
    env: Mapping[str, str]
    cwd: str
    rlimits: Mapping[str, int] = field(default_factory=dict)  # "nproc" | "cpu" | "as" -> value


@dataclass
class Outcome:
    code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    aborted: str | None = None  # "disconnect" | "bad_request": the client ended it
    duration_s: float = 0.0
    sent: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False, "stderr": False})

    @property
    def result(self) -> str:
        """ok / nonzero / signal / timeout: the metrics label."""
        if self.timed_out:
            return "timeout"
        if self.signal is not None:
            return "signal"
        return "ok" if self.code == 0 else "nonzero"


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def run(
    path: str,
    args: tuple[str, ...],
    limits: RunLimits,
    *,
    timeout_s: float,
    want_stdin: bool,
    send: Send,
    inbox: Inbox,
    active: set[int],
) -> Outcome:
    """Run one command to its end; ``active`` holds the pids of commands being run."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    # Process.wait() only returns once the pipes are closed too, and a background grandchild
    # can hold them open forever: the protocol tells us when the command itself has exited.
    exited: asyncio.Future[None] = loop.create_future()

    class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
        def process_exited(self) -> None:
            super().process_exited()
            if not exited.done():
                exited.set_result(None)

    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(limit=CHUNK, loop=loop),
        path,
        *args,
        stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(limits.env),
        cwd=limits.cwd,
        start_new_session=True,  # its own session and process group: pgid == pid
        close_fds=True,
    )
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    pgid = proc.pid
    active.add(pgid)
    # prlimit(2) from here rather than a preexec_fn: the child keeps the fast vfork spawn path.
    for name, value in limits.rlimits.items():
        with contextlib.suppress(ProcessLookupError, OSError):
            resource.prlimit(proc.pid, _RLIMITS[name], (value, value))
    out = Outcome()
    client_gone = False

    async def pump(stream: asyncio.StreamReader, kind: Kind, name: str) -> None:
        nonlocal client_gone
        cap = limits.output_bytes
        while chunk := await stream.read(CHUNK):
            room = cap - out.sent[name]
            if room < len(chunk):
                out.truncated[name] = True
                chunk = chunk[: max(room, 0)]
            if not chunk or client_gone:
                continue  # keep draining the pipe so the child never blocks on a full one
            out.sent[name] += len(chunk)
            try:
                await send(kind, chunk)  # waits while the client's socket buffer is full
            except (ConnectionError, OSError):
                client_gone = True

    assert proc.stdout is not None
    assert proc.stderr is not None
    pumps = [
        asyncio.ensure_future(pump(proc.stdout, Kind.STDOUT, "stdout")),
        asyncio.ensure_future(pump(proc.stderr, Kind.STDERR, "stderr")),
    ]
    control = asyncio.ensure_future(_control(proc, pgid, inbox))
    try:
        first: set[asyncio.Future[Any]] = {exited, control}
        done, _ = await asyncio.wait(first, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if exited not in done:
            if control in done:
                out.aborted = control.result()
            else:
                out.timed_out = True
            _killpg(pgid)
            await exited
        # The command is over. A background grandchild may still hold its pipes: give them a
        # moment to reach end of file, then kill whatever is left of the group, always.
        _, pending = await asyncio.wait(pumps, timeout=PIPE_GRACE_S)
        _killpg(pgid)
        await reap_group(pgid)
        if pending:
            await asyncio.wait(pending, timeout=1.0)
    finally:
        for task in (*pumps, control):
            task.cancel()
        _killpg(pgid)
        if not exited.done():  # cancelled (server shutdown): still wait for the exit
            await asyncio.shield(exited)
        transport.close()  # our ends of the pipes, whoever else still holds theirs
        active.discard(pgid)
    rc = transport.get_returncode()
    assert rc is not None
    if rc < 0:
        out.signal = signal.Signals(-rc).name.removeprefix("SIG")
    else:
        out.code = rc
    out.duration_s = loop.time() - started
    return out


async def _control(proc: asyncio.subprocess.Process, pgid: int, inbox: Inbox) -> str:
    """Apply the client's STDIN / STDIN_EOF / SIGNAL messages; return why the client ended it."""
    while True:
        item = await inbox.get()
        if item is None:
            return "disconnect"
        kind, body = item
        if kind is Kind.STDIN and proc.stdin is not None and isinstance(body, bytes):
            with contextlib.suppress(ConnectionError, OSError):
                proc.stdin.write(body)
                await proc.stdin.drain()
        elif kind is Kind.STDIN_EOF and proc.stdin is not None:
            proc.stdin.close()
        elif kind is Kind.SIGNAL:
            _killpg(pgid, signal.Signals[f"SIG{getattr(body, 'name', '')}"])
        else:
            return "bad_request"


# -- no zombie, ever ---------------------------------------------------------------------------
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants of our commands re-parent to this process (not to PID 1), so
    the service reaps them itself whatever PID 1 is. Linux only; False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


async def reap_group(pgid: int, limit_s: float = 2.0) -> None:
    """Reap the killed members of a command's process group that were re-parented to us."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while loop.time() < end:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
        except ChildProcessError:
            return  # none of our children is left in that group
        if pid == 0:
            await asyncio.sleep(0.005)  # killed, not yet dead


def reap_strays(running: set[int]) -> int:
    """Reap zombie children that are not commands being run (strays that escaped their group)."""
    me = os.getpid()
    reaped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in running:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)
                reaped += 1
    return reaped
