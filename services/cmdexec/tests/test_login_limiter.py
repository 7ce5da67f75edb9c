"""The failed-login limiter against many addresses: budgets are per source, the service-wide
figure only slows failures down, and the table of sources is bounded.

Clients come from distinct loopback addresses (all of 127.0.0.0/8 reaches ``lo``), so the
server sees them as the distinct sources a real network would show it."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc

from wirekit_harness import TOKEN, CmdexecHarness, StartCmdexec

from wirekit_cmdexec.messages import Auth, Exec, Kind, encode_json
from wirekit_framing import encode, read_frame

#: Each answer within this (a deadline on the peer, not a performance figure).
ANSWER_S = 30.0


async def login(h: CmdexecHarness, token: str, source: str) -> tuple[str, str]:
    """AUTH and EXEC true from ``source``: ("exit", "") once it ran, or ("error", message)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port, local_addr=(source, 0))
    try:
        writer.write(encode(encode_json(Kind.AUTH, Auth(token=token)))
                     + encode(encode_json(Kind.EXEC, Exec(argv=["true"]))))  # fmt: skip
        async with asyncio.timeout(ANSWER_S):
            frame = await read_frame(reader)
        assert frame is not None, "closed without an answer"
        body = json.loads(frame[1:])
        if frame[0] == Kind.EXIT:
            return "exit", ""
        assert frame[0] == Kind.ERROR, frame
        return "error", str(body["message"])
    finally:
        writer.close()
        await writer.wait_closed()


async def test_thirty_addresses_within_their_budgets_do_not_lock_anyone_out(
    start_cmdexec: StartCmdexec,
) -> None:
    """Issue 19's case: 30 addresses send 10 wrong tokens each (within every per-source budget,
    300 failures, three times the service-wide burst). Then the right token still gets in from
    a fresh address and from an address that failed within its budget; an attacker address
    that spent its budget is refused with its own reason; and a wrong token during the attack
    is answered late and says why."""
    async with start_cmdexec(auth_failure_delay_s=0.0, auth_failure_delay_attack_s=0.2) as h:
        attackers = [f"127.0.3.{i}" for i in range(1, 31)]

        async def attack(source: str) -> list[tuple[str, str]]:
            return [await login(h, "guess-" + source, source) for _ in range(10)]

        results = await asyncio.gather(*(attack(a) for a in attackers))
        assert all(kind == "error" and msg.startswith("wrong token") for r in results
                   for kind, msg in r)  # fmt: skip
        assert h.value("cmdexec_auth_failures_total", reason="token") == 300
        assert h.value("cmdexec_auth_under_attack") == 1

        # A fresh address with the right token: in, at once.
        assert await login(h, TOKEN, "127.0.4.1") == ("exit", "")
        # An address within its budget (5 of 10 failures) with the right token: in.
        for _ in range(5):
            assert (await login(h, "typo", "127.0.5.1"))[0] == "error"
        assert await login(h, TOKEN, "127.0.5.1") == ("exit", "")
        # An attacker that spent its budget: refused unread, even with the right token, and
        # told it is this source.
        kind, message = await login(h, TOKEN, "127.0.3.7")
        assert kind == "error"
        assert message.startswith("too many failed logins from 127.0.3.7; retry in ")
        assert h.value("cmdexec_auth_failures_total", reason="rate_limited") == 1
        assert h.value("cmdexec_auth_limited_sources") == 1
        # A wrong token during the attack: answered after the attack delay, and says so.
        started = time.monotonic()
        kind, message = await login(h, "typo", "127.0.6.1")
        assert time.monotonic() - started >= 0.2  # the delay is there (a lower bound)
        assert "the service is under a login attack" in message
        assert h.value("cmdexec_runs_total", result="ok") == 2
        assert h.value("cmdexec_identity_logins_total", identity="default") == 2


async def test_the_attack_is_over_once_the_service_wide_burst_is_regained(
    start_cmdexec: StartCmdexec,
) -> None:
    async with start_cmdexec(auth_failure_burst=5, auth_failure_rate=5.0,
                             auth_failure_delay_attack_s=0.0) as h:  # fmt: skip
        for i in range(6):
            await login(h, "guess", f"127.0.7.{i + 1}")
        assert h.value("cmdexec_auth_under_attack") == 1
        await h.wait_for(lambda: h.value("cmdexec_auth_under_attack") == 0, 5.0)
        assert (await login(h, "typo", "127.0.7.9"))[1] == "wrong token"


async def test_a_thousand_addresses_failing_once_cost_a_bounded_table(
    start_cmdexec: StartCmdexec,
) -> None:
    """1,000 sources each fail once with room for 100: the table never holds more than 100,
    the memory it takes stays that of 100 entries, and a source forgotten starts afresh."""
    settings = {"auth_failure_delay_s": 0.0, "auth_failure_delay_attack_s": 0.0,
                "limit_auth_sources": 100, "auth_failure_burst_per_source": 1}  # fmt: skip
    async with start_cmdexec(**settings) as h:
        sources = [f"127.0.{8 + i // 250}.{1 + i % 250}" for i in range(1000)]
        tracemalloc.start()
        try:
            for chunk in range(0, 1000, 50):
                await asyncio.gather(*(login(h, "guess", s) for s in sources[chunk : chunk + 50]))
                assert h.value("cmdexec_auth_sources") <= 100
                if chunk == 100:
                    at_200 = tracemalloc.take_snapshot()
            at_1000 = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert h.value("cmdexec_auth_sources") == 100
        assert h.value("cmdexec_auth_failures_total", reason="token") == 1000

        # What the limiter module holds did not grow from 200 sources to 1,000.
        def held(snapshot: tracemalloc.Snapshot) -> int:
            return sum(
                s.size for s in snapshot.filter_traces(
                    [tracemalloc.Filter(True, "*wirekit_servicekit/ratelimit.py")]
                ).statistics("filename")
            )  # fmt: skip

        assert held(at_1000) <= held(at_200) * 1.1 + 4096
        # The most recent source spent its one failure: refused. The first was forgotten: it
        # may try again (and fails on its token, not on a budget).
        assert (await login(h, TOKEN, sources[-1]))[1].startswith("too many failed logins")
        kind, message = await login(h, "guess", sources[0])
        assert kind == "error"
        assert message.startswith("wrong token")
