"""An in-process cmdexec server on an ephemeral loopback port, and a blocking client for it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from wirekit_testkit import CMDEXEC_TOKEN

from wirekit_cmdexec.__main__ import serve
from wirekit_cmdexec.client import CmdexecClient
from wirekit_cmdexec.messages import Exit
from wirekit_cmdexec.settings import CmdexecSettings
from wirekit_servicekit.testing import RunningService, running_service

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
async def running_cmdexec(**overrides: Any) -> AsyncIterator[CmdexecHarness]:
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "token": TOKEN,
        "allow": TEST_ALLOW,
        "auth_failure_delay_s": 0.01,
        "timeout_drain_s": 2.0,
        **overrides,
    }
    async with running_service(serve, CmdexecSettings(**values), CmdexecHarness) as service:
        yield service


@pytest.fixture
async def cmdexec() -> AsyncIterator[CmdexecHarness]:
    async with running_cmdexec() as h:
        yield h


@pytest.fixture
def start_cmdexec() -> Callable[..., contextlib.AbstractAsyncContextManager[CmdexecHarness]]:
    return running_cmdexec
