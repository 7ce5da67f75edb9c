"""How a command runs: its own session and process group, a minimal environment, resource limits
in force before its first instruction, a timeout that kills the whole group, output capped per
stream and streamed as produced with back-pressure, stdin and signals forwarded, and no process
left behind when it ends (``containment``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .containment import Containment, containment
from .errors import ClientGone
from .messages import Kind
from .states import Act, State, act

log = logging.getLogger(__name__)

#: Pipe read size, and so the largest STDOUT/STDERR message.
CHUNK = 64 * 1024
#: After the command exits, how long its pipes may stay open (held by a background grandchild)
#: before the rest of its process group is killed.
PIPE_GRACE_S = 0.2
#: End-of-run sweeps for what the command left behind (each after a short pause).
_END_SWEEPS = 5

Send = Callable[[Kind, bytes], Awaitable[None]]


class Inbox:
    """The client's messages during a conversation, in order, with back-pressure (``put`` waits
    while ``size`` are queued: the reader stops reading, TCP slows the client). Once the stream
    has ended, every ``get`` after the last message returns the end (``END``, or the error that
    ended it): whoever reads next -- the run's control, then the conversation -- sees it."""

    def __init__(self, size: int) -> None:
        self._items: list[tuple[Kind, Any]] = []
        self._size = size
        self._end: End | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put(self, item: tuple[Kind, Any]) -> None:
        while len(self._items) >= self._size:
            self._writable.clear()
            await self._writable.wait()
        self._items.append(item)
        self._readable.set()

    def __len__(self) -> int:
        """Messages waiting (the end, if any, not counted)."""
        return len(self._items)

    def end(self, end: End) -> None:
        if self._end is None:
            self._end = end
        self._readable.set()

    async def get(self) -> tuple[Kind, Any] | End:
        while not self._items:
            if self._end is not None:
                return self._end
            self._readable.clear()
            await self._readable.wait()
        self._writable.set()
        return self._items.pop(0)


@dataclass(frozen=True)
class End:
    """The client's stream ended: cleanly (``error`` None) or by a protocol error."""

    error: Exception | None = None


END = End()


@dataclass(frozen=True)
class RunLimits:
    """How a command runs: its settings' names (and the policy file's) for the same things."""

    timeout_run_s: float
    limit_output_bytes: int  # per stream
    limit_output_action: Literal["end", "drop"]  # when a stream passes limit_output_bytes
    child_env: Mapping[str, str]  # the whole environment of the command
    workdir: str


_RLIMITS = {"nproc": resource.RLIMIT_NPROC, "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS}


#: The exec wrappers that set the limits before the command's first instruction, best first.
WRAPPERS = ("wirekit-limits", "prlimit")
Wrapper = Literal["auto", "wirekit-limits", "prlimit"]


class Spawner:
    """Resource limits in force before a command's first instruction: the command is started
    through an exec wrapper that sets them, then execs it -- ``wirekit-limits`` (a static
    binary shipped with the image: +0.06 ms per command built against musl, +0.36 ms against
    glibc) or else util-linux's ``prlimit`` (dynamically linked, +0.75 ms). The wrapper is
    looked for beside the Python interpreter (the virtualenv's ``bin``), then on ``search``.
    With neither on the machine, the limits are set with ``prlimit(2)`` right after the spawn,
    which a command that forks at once can outrun (the mode is logged at start)."""

    def __init__(
        self, rlimits: Mapping[str, int], wrapper: Wrapper = "auto", search: str = "/usr/bin:/bin"
    ) -> None:
        self.rlimits = dict(rlimits)
        self.wrapper: str | None = None
        self.prefix: list[str] = []
        if not self.rlimits:
            return
        path = os.pathsep.join((os.path.dirname(sys.executable), search))
        for name in WRAPPERS if wrapper == "auto" else (wrapper,):
            found = shutil.which(name, path=path)
            if found:
                self.wrapper = name
                self.prefix = self._prefix(name, found)
                break
        else:
            if wrapper != "auto":
                raise FileNotFoundError(f"{wrapper} (rlimit_wrapper) is not on {path}")

    def _prefix(self, name: str, found: str) -> list[str]:
        if name == "wirekit-limits":
            return [found, *(str(self.rlimits.get(k, "-")) for k in ("nproc", "cpu", "as"))]
        return [found, *(f"--{k}={v}:{v}" for k, v in self.rlimits.items()), "--"]

    @property
    def mode(self) -> str:
        if not self.rlimits:
            return "none"
        return f"{self.wrapper} exec wrapper" if self.wrapper else "prlimit(2) after spawn"

    def argv(self, path: str, args: tuple[str, ...]) -> list[str]:
        return [*self.prefix, path, *args]

    def after_spawn(self, pid: int) -> None:
        if self.prefix:
            return
        for name, value in self.rlimits.items():
            with contextlib.suppress(ProcessLookupError, OSError):
                resource.prlimit(pid, _RLIMITS[name], (value, value))


@dataclass
class Outcome:
    code: int | None = None
    signal: str | None = None
    timed_out: bool = False
    output_capped: bool = False
    aborted: str | None = None  # "disconnect" | "error" | "bad_request" | "stalled": no EXIT
    duration_s: float = 0.0
    sent: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    truncated: dict[str, bool] = field(default_factory=lambda: {"stdout": False, "stderr": False})

    @property
    def result(self) -> str:
        """The ``result`` label of cmdexec_runs_total."""
        if self.aborted is not None:
            return "aborted"
        if self.timed_out:
            return "timeout"
        if self.output_capped:
            return "output_cap"
        if self.signal is not None:
            return "signal"
        return "ok" if self.code == 0 else "nonzero"


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _ExitWatch(asyncio.subprocess.SubprocessStreamProtocol):
    """The subprocess protocol that says when the command itself has exited: Process.wait()
    only returns once the pipes are closed too, and a background grandchild can hold them open
    forever."""

    def __init__(self, exited: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=CHUNK, loop=loop)
        self.exited = exited

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _Run:
    """One command's run: its output pumped to the client, the client's messages applied to it,
    and its end, however it comes (exit, timeout, output cap, the client gone or misbehaving)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, pid: int, exited: asyncio.Future[None],
        limits: RunLimits, send: Send, inbox: Inbox,
    ) -> None:  # fmt: skip
        self.proc = proc
        self.pid = pid
        self.exited = exited
        self.limits = limits
        self.send = send
        self.inbox = inbox
        self.out = Outcome()
        self.cut_short: asyncio.Future[str] = exited.get_loop().create_future()

    def end_early(self, why: str) -> None:
        """ "output_cap" or "stalled" (the client stopped reading)."""
        if not self.cut_short.done():
            self.cut_short.set_result(why)

    async def pump(self, stream: asyncio.StreamReader, kind: Kind, name: str) -> None:
        """A pipe to the client, up to the output cap, as fast as the client takes it."""
        out, cap = self.out, self.limits.limit_output_bytes
        while chunk := await stream.read(CHUNK):
            if self.cut_short.done():
                continue  # keep draining the pipe so that the child never blocks on it
            room = cap - out.sent[name]
            if room < len(chunk):
                out.truncated[name] = True
                chunk = chunk[: max(room, 0)]
                if self.limits.limit_output_action == "end":
                    self.end_early("output_cap")
            if chunk:
                out.sent[name] += len(chunk)
                try:
                    await self.send(kind, chunk)  # waits (with a deadline) for a slow client
                except ClientGone:
                    self.end_early("stalled")

    async def control(self) -> str:
        """Apply the client's STDIN / STDIN_EOF / SIGNAL; return why the client ended the run."""
        stdin = self.proc.stdin
        while True:
            item = await self.inbox.get()
            if isinstance(item, End):
                return "disconnect" if item.error is None else "error"
            kind, body = item
            if act(State.RUNNING, kind) is not Act.HANDLE:
                return "bad_request"  # EXEC or AUTH while a command runs
            if kind is Kind.SIGNAL:
                _killpg(self.pid, signal.Signals[f"SIG{body.name}"])
            elif stdin is None:
                continue  # no STDIN asked for: the command reads /dev/null
            elif kind is Kind.STDIN:
                with contextlib.suppress(ConnectionError, OSError):
                    stdin.write(body)
                    await stdin.drain()
            else:
                stdin.close()

    async def until_over(self, controller: asyncio.Task[str]) -> None:
        """Wait for the command's exit, the client's end, a cut or the timeout; kill the group
        unless it exited by itself; then give its pipes a moment to reach their end."""
        out = self.out
        first: set[asyncio.Future[Any]] = {self.exited, controller, self.cut_short}
        done, _ = await asyncio.wait(
            first, timeout=self.limits.timeout_run_s, return_when=asyncio.FIRST_COMPLETED
        )
        if self.exited not in done:
            if controller in done:
                out.aborted = controller.result()
            elif self.cut_short in done:
                reason = self.cut_short.result()
                out.output_capped = reason == "output_cap"
                out.aborted = None if out.output_capped else reason
            else:
                out.timed_out = True
            _killpg(self.pid)
            await self.exited

    def ended(self, returncode: int, duration_s: float) -> Outcome:
        out = self.out
        if returncode < 0:
            out.signal = signal.Signals(-returncode).name.removeprefix("SIG")
        else:
            out.code = returncode
        out.duration_s = duration_s
        return out


async def run(
    path: str,
    args: tuple[str, ...],
    limits: RunLimits,
    spawner: Spawner,
    *,
    want_stdin: bool,
    send: Send,
    inbox: Inbox,
) -> Outcome:
    """Run one command to its end. Every task it starts is awaited before it returns; the
    command, its process group and whatever it left behind are dead by then."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    box = containment()
    exited: asyncio.Future[None] = loop.create_future()
    with box.spawning():
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitWatch(exited, loop),
            *spawner.argv(path, args),
            stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(limits.child_env),
            cwd=limits.workdir,
            start_new_session=True,  # its own session and process group: sid == pgid == pid
            close_fds=True,
        )
        pid = transport.get_pid()
        box.live.add(pid)
    spawner.after_spawn(pid)
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    assert proc.stdout is not None
    assert proc.stderr is not None
    this = _Run(proc, pid, exited, limits, send, inbox)
    pumps = [
        loop.create_task(this.pump(proc.stdout, Kind.STDOUT, "stdout")),
        loop.create_task(this.pump(proc.stderr, Kind.STDERR, "stderr")),
    ]
    controller = loop.create_task(this.control())
    try:
        await this.until_over(controller)
        # The command is over. A background child may still hold its pipes: give them a moment
        # to reach end of file, then kill whatever is left of the group, always.
        _, pending = await asyncio.wait(pumps, timeout=PIPE_GRACE_S)
        _killpg(pid)
        if pending:
            await asyncio.wait(pending, timeout=1.0)
    finally:
        for task in (*pumps, controller):
            task.cancel()
        await asyncio.gather(*pumps, controller, return_exceptions=True)
        _killpg(pid)
        if not exited.done():  # cancelled (server shutdown): still wait for the exit
            await asyncio.shield(exited)
        transport.close()  # our ends of the pipes, whoever else still holds theirs
        if proc.stdin is not None:
            # Collect how the stdin pipe ended (a broken pipe is normal here): asyncio would
            # otherwise log it as an exception never retrieved.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.stdin.wait_closed(), 1.0)
        box.live.discard(pid)
        await _sweep_leftovers(box)
    rc = transport.get_returncode()
    assert rc is not None
    return this.ended(rc, loop.time() - started)


async def _sweep_leftovers(box: Containment) -> None:
    """What the command left behind, re-parented to us meanwhile: a few sweeps, a short pause
    between them, until one finds nothing."""
    for _ in range(_END_SWEEPS):
        if not box.sweep():
            break
        await asyncio.sleep(0.005)
