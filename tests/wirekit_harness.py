"""The in-process harnesses of the three services' unit tests: each runs its service on
ephemeral loopback ports with a fresh registry and tracer (wirekit_servicekit.testing), and
adds the service's own helpers. Importable (``tests/`` is on pytest's path) so that fixtures
and helpers are typed with them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from wirekit_testkit import CMDEXEC_TOKEN

from wirekit_cmdexec.__main__ import SERVICE as CMDEXEC
from wirekit_cmdexec.client import CmdexecClient
from wirekit_cmdexec.messages import Exit
from wirekit_cmdexec.settings import CmdexecSettings

# -- echo --------------------------------------------------------------------------------------
from wirekit_echo.__main__ import SERVICE as ECHO
from wirekit_echo.settings import EchoSettings
from wirekit_servicekit.testing import RunningService, running_service
from wirekit_udp.__main__ import SERVICE as UDP
from wirekit_udp.settings import UdpSettings


class EchoHarness(RunningService[EchoSettings]):
    async def connect(self, mode: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.ports[mode])


@contextlib.asynccontextmanager
async def running_echo(**overrides: Any) -> AsyncIterator[EchoHarness]:
    values: dict[str, Any] = {"raw_port": 0, "framed_port": 0, "metrics_port": 0,
                              "timeout_drain_s": 2.0, **overrides}  # fmt: skip
    async with running_service(ECHO, EchoSettings(**values), EchoHarness) as service:
        yield service


# -- cmdexec -----------------------------------------------------------------------------------

TOKEN = CMDEXEC_TOKEN
#: Tests may run what they need to exercise the runner (sh, sleep, head, env...).
TEST_ALLOW = ["echo", "true", "sh", "sleep", "head", "env", "cat", "ls", "yes"]


@dataclass
class Result:
    exit: Exit
    stdout: bytes
    stderr: bytes


class CmdexecHarness(RunningService[CmdexecSettings]):
    tls: ssl.SSLContext | None = None

    @property
    def port(self) -> int:
        return self.ports["cmdexec"]

    def sock(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return self.tls.wrap_socket(raw, server_hostname="localhost") if self.tls else raw

    def client(self, token: str = TOKEN) -> CmdexecClient:
        return CmdexecClient(self.sock(), token)

    def run_sync(self, argv: list[str], client: CmdexecClient | None = None, **kw: Any) -> Result:
        own = client is None
        client = client or self.client()
        out, err = bytearray(), bytearray()
        try:
            result = client.run(argv, on_stdout=out.extend, on_stderr=err.extend, **kw)
        finally:
            if own:
                client.sock.close()
        return Result(result, bytes(out), bytes(err))

    async def run(self, argv: list[str], **kw: Any) -> Result:
        return await asyncio.to_thread(self.run_sync, argv, **kw)


@contextlib.asynccontextmanager
async def running_cmdexec(
    expected_errors: tuple[str, ...] = (), **overrides: Any
) -> AsyncIterator[CmdexecHarness]:
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "token": TOKEN,
        "allow": TEST_ALLOW,
        "auth_failure_delay_s": 0.01,
        "timeout_drain_s": 2.0,
        **overrides,
    }
    settings = CmdexecSettings(**values)
    async with running_service(CMDEXEC, settings, CmdexecHarness, expected_errors) as service:
        yield service


# -- udp ---------------------------------------------------------------------------------------


class UdpHarness(RunningService[UdpSettings]):
    @property
    def port(self) -> int:
        return self.ports["udp"]


@contextlib.asynccontextmanager
async def running_udp(**overrides: Any) -> AsyncIterator[UdpHarness]:
    settings = UdpSettings(**{"port": 0, "metrics_port": 0, **overrides})
    async with running_service(UDP, settings, UdpHarness) as service:
        yield service


StartEcho = Callable[..., contextlib.AbstractAsyncContextManager[EchoHarness]]
StartCmdexec = Callable[..., contextlib.AbstractAsyncContextManager[CmdexecHarness]]
StartUdp = Callable[..., contextlib.AbstractAsyncContextManager[UdpHarness]]
