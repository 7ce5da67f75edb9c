"""Model-based tests of the echo over real sockets: hypothesis generates streams (empty frames,
frames at the size limit, arbitrary bytes), splits them at every kind of boundary (inside a
header, right after one, between frames, inside a payload), paces the writes, and reads
slowly; the reply stream must equal the model's. The same with SIGTERM at a random moment.
Each example runs against a real ``wirekit-echo`` process; after each one no connection is
left in its gauges, and its log has no traceback."""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wirekit_testkit import ServiceProcess, service_process

from wirekit_framing import HEADER_SIZE, encode_many

LIMIT = 4096  # the servers' max_frame_size here: frames at the limit stay cheap
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
EXAMPLES = settings(max_examples=40, deadline=None, suppress_health_check=SLOW)


@contextlib.contextmanager
def echo_process(*args: str) -> Iterator[ServiceProcess]:
    with service_process(
        "wirekit_echo", "--raw-port", "0", "--framed-port", "0", "--metrics-port", "0",
        "--max-frame-size", str(LIMIT), *args,
    ) as proc:  # fmt: skip
        yield proc


@pytest.fixture(scope="module")
def server() -> Iterator[ServiceProcess]:
    with echo_process() as proc:
        yield proc
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(15) == 0
        time.sleep(0.1)
        proc.assert_clean_log()


# -- what a client does -------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How one client sends a stream and reads the replies."""

    cuts: tuple[int, ...]  # where the stream is split into writes
    pauses: tuple[float, ...]  # sleep after each write (cycled)
    nodelay: bool
    rcvbuf: int | None  # a small receive buffer: the server meets back-pressure
    read_pause: float  # sleep before each read

    def chunks(self, wire: bytes) -> list[bytes]:
        points = sorted({c for c in self.cuts if 0 < c < len(wire)} | {0, len(wire)})
        return [wire[a:b] for a, b in itertools.pairwise(points)]


class Client:
    def __init__(self, port: int, plan: Plan) -> None:
        self.plan = plan
        self.sock = socket.socket()
        if plan.rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, plan.rcvbuf)
        if plan.nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(15)  # every wait on the server has a deadline
        self.sock.connect(("127.0.0.1", port))
        self.sent = threading.Event()
        self.send_error: BaseException | None = None

    def send(self, wire: bytes, then_shutdown: bool) -> threading.Thread:
        def run() -> None:
            try:
                for i, chunk in enumerate(self.plan.chunks(wire)):
                    self.sock.sendall(chunk)
                    pause = self.plan.pauses[i % len(self.plan.pauses)]
                    if pause:
                        time.sleep(pause)
                if then_shutdown:
                    self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.send_error = exc
            self.sent.set()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def exchange(self, wire: bytes, then_shutdown: bool) -> tuple[bytes, str]:
        """Send ``wire`` (and maybe end the stream) while reading everything the server sends:
        (bytes, "eof" | "reset")."""
        return self.finish(self.send(wire, then_shutdown))

    def finish(self, sender: threading.Thread) -> tuple[bytes, str]:
        """Read to the server's end, wait for the sender. The kernel reports a reset once per
        socket, to the sending thread or to the reading one: either counts."""
        got, ending = self.read_all()
        sender.join(15)
        assert not sender.is_alive()
        self.sock.close()
        if isinstance(self.send_error, ConnectionResetError | BrokenPipeError):
            return got, "reset"
        assert self.send_error is None, self.send_error
        return got, ending

    def read_all(self) -> tuple[bytes, str]:
        """Everything until the server's end: (bytes, "eof" | "reset")."""
        got = bytearray()
        try:
            while True:
                if self.plan.read_pause:
                    time.sleep(self.plan.read_pause)
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return bytes(got), "eof"
                got += chunk
        except ConnectionResetError:
            return bytes(got), "reset"


def offsets(frames: list[bytes]) -> list[list[int]]:
    """Per frame, a split point of each kind: none, at the frame's start, inside its header,
    right after its header, inside its payload."""
    out, pos = [], 0
    for f in frames:
        out.append([-1, pos, pos + 1, pos + 2, pos + 3, pos + HEADER_SIZE,
                    pos + HEADER_SIZE + len(f) // 2])  # fmt: skip
        pos += HEADER_SIZE + len(f)
    return out


payload = st.one_of(
    st.binary(max_size=8),
    # At the limit (the content is derived from the length: it costs hypothesis no entropy).
    st.integers(min_value=LIMIT - 2, max_value=LIMIT).map(lambda n: random.Random(n).randbytes(n)),
    st.binary(max_size=1500),
)


@st.composite
def plans(draw: st.DrawFn, boundaries: list[list[int]], size: int) -> Plan:
    """A way to send ``size`` bytes: for each frame, a split of one kind (``boundaries``), plus
    arbitrary splits; pauses that let the server read each write on its own."""
    picked = [draw(st.sampled_from(kinds)) for kinds in boundaries]
    arbitrary = draw(st.lists(st.integers(min_value=0, max_value=max(size, 1)), max_size=6))
    return Plan(
        cuts=tuple(c for c in picked + arbitrary if c >= 0),
        pauses=tuple(draw(st.lists(st.sampled_from([0.0, 0.002, 0.002, 0.01]), min_size=1,
                                   max_size=4))),
        nodelay=draw(st.booleans()),
        rcvbuf=draw(st.sampled_from([None, 2048])),
        read_pause=draw(st.sampled_from([0.0, 0.0, 0.005])),
    )  # fmt: skip


def settle(proc: ServiceProcess) -> None:
    """After a case: no connection left (the gauges read 0)."""
    for mode in ("raw", "framed"):
        proc.wait_value("echo_connections_active", 0.0, mode=mode)


# -- the model tests -----------------------------------------------------------------------------
@EXAMPLES
@given(frames=st.lists(payload, max_size=12), data=st.data())
def test_framed_replies_are_the_frames_received(
    server: ServiceProcess, frames: list[bytes], data: st.DataObject
) -> None:
    wire = encode_many(frames, LIMIT)
    plan = data.draw(plans(offsets(frames), len(wire)))
    client = Client(server.ports["framed"], plan)
    got, ending = client.exchange(wire, then_shutdown=True)
    assert (got, ending) == (wire, "eof")  # every frame, as one frame each, in order; then FIN
    settle(server)


@EXAMPLES
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), max_size=10), data=st.data())
def test_raw_replies_are_the_bytes_received(
    server: ServiceProcess, chunks: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(chunks)
    plan = data.draw(plans([], len(wire)))
    client = Client(server.ports["raw"], plan)
    got, ending = client.exchange(wire, then_shutdown=True)
    assert (got, ending) == (wire, "eof")
    settle(server)


@EXAMPLES
@given(
    frames=st.lists(payload, max_size=6),
    bad=st.integers(min_value=LIMIT + 1, max_value=2**32 - 1),
    junk=st.binary(max_size=64),
    data=st.data(),
)
def test_an_oversize_header_gets_the_frames_before_it_then_a_reset(
    server: ServiceProcess, frames: list[bytes], bad: int, junk: bytes, data: st.DataObject
) -> None:
    good = encode_many(frames, LIMIT)
    wire = good + struct.pack("!I", bad) + junk
    plan = data.draw(plans(offsets(frames), len(wire)))
    client = Client(server.ports["framed"], plan)
    got, ending = client.exchange(wire, then_shutdown=False)
    assert (got, ending) == (good, "reset")
    settle(server)


@EXAMPLES
@given(frames=st.lists(payload, max_size=6), partial=payload, data=st.data())
def test_a_stream_ending_inside_a_frame_gets_the_whole_frames_then_eof(
    server: ServiceProcess, frames: list[bytes], partial: bytes, data: st.DataObject
) -> None:
    good = encode_many(frames, LIMIT)
    last = encode_many([partial], LIMIT)
    cut = data.draw(st.integers(min_value=1, max_value=len(last) - 1))
    wire = good + last[:cut]
    plan = data.draw(plans(offsets(frames), len(wire)))
    client = Client(server.ports["framed"], plan)
    got, ending = client.exchange(
        wire, then_shutdown=True
    )  # the client ends its own stream mid-frame
    assert (got, ending) == (good, "eof")
    settle(server)


# -- SIGTERM at a random moment ------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=SLOW)
@given(
    streams=st.lists(
        st.tuples(st.sampled_from(["raw", "framed"]), st.lists(payload, max_size=8)),
        min_size=1, max_size=3,
    ),
    signal_after=st.floats(min_value=0.0, max_value=0.3),
    data=st.data(),
)  # fmt: skip
def test_sigterm_at_a_random_moment_answers_everything_sent(
    streams: list[tuple[str, list[bytes]]], signal_after: float, data: st.DataObject
) -> None:
    """Clients keep sending (pauses of at most 10 ms) while the drain runs: everything they
    send is answered, then the server ends each stream with a FIN and exits 0."""
    with echo_process("--timeout-drain-s", "10") as proc:
        work = []
        for mode, frames in streams:
            wire = encode_many(frames, LIMIT) if mode == "framed" else b"".join(frames)
            plan = data.draw(plans(offsets(frames) if mode == "framed" else [], len(wire)))
            client = Client(proc.ports[mode], plan)
            work.append((client, wire, client.send(wire, then_shutdown=False)))
        for mode in ("raw", "framed"):  # accepted (one still in the accept queue is reset)
            proc.wait_value("echo_connections_opened_total", sum(m == mode for m, _ in streams),
                            mode=mode)  # fmt: skip
        time.sleep(signal_after)
        proc.popen.send_signal(signal.SIGTERM)
        for client, wire, sender in work:
            assert client.finish(sender) == (wire, "eof")
        assert proc.popen.wait(15) == 0
        time.sleep(0.1)
        proc.assert_clean_log()
