"""Running commands: exit status, streams, limits, timeouts, disconnects, zombies, environment."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from wirekit_harness import TOKEN, CmdexecHarness, StartCmdexec
from wirekit_testkit import child_processes

from wirekit_cmdexec.client import EXIT_TIMEOUT, CmdexecClient, RemoteError, exit_status
from wirekit_cmdexec.messages import Exec, Exit, Kind, encode_json
from wirekit_framing import recv_frame
from wirekit_servicekit.testing import until


@pytest.mark.parametrize(
    ("argv", "code", "sig", "status"),
    [
        pytest.param(["true"], 0, None, 0, id="ok"),
        pytest.param(["sh", "-c", "exit 7"], 7, None, 7, id="nonzero"),
        pytest.param(["sh", "-c", "kill -TERM $$"], None, "TERM", 128 + 15, id="sigterm"),
        pytest.param(["sh", "-c", "kill -KILL $$"], None, "KILL", 128 + 9, id="sigkill"),
    ],
)
async def test_exit_codes_and_signals_are_mapped(
    cmdexec: CmdexecHarness, argv: list[str], code: int | None, sig: str | None, status: int
) -> None:
    res = await cmdexec.run(argv)
    assert (res.exit.code, res.exit.signal, res.exit.timed_out) == (code, sig, False)
    assert exit_status(res.exit) == status
    result = "ok" if code == 0 else ("nonzero" if code else "signal")
    assert cmdexec.value("cmdexec_runs_total", result=result) == 1


async def test_stdout_and_stderr_are_separate_and_in_order(cmdexec: CmdexecHarness) -> None:
    script = 'i=1; while [ $i -le 300 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done'
    res = await cmdexec.run(["sh", "-c", script])
    assert res.stdout == b"".join(b"out %d\n" % i for i in range(1, 301))
    assert res.stderr == b"".join(b"err %d\n" % i for i in range(1, 301))
    assert cmdexec.value("cmdexec_output_bytes_total", stream="stdout") == len(res.stdout)
    assert cmdexec.value("cmdexec_output_bytes_total", stream="stderr") == len(res.stderr)


async def test_output_is_streamed_as_produced(cmdexec: CmdexecHarness) -> None:
    """The first line arrives while the command is still running."""
    client: CmdexecClient = cmdexec.client()
    first_seen = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def on_stdout(data: bytes) -> None:
        if not first_seen.done():
            loop.call_soon_threadsafe(first_seen.set_result, time.monotonic())

    def go() -> Exit:
        return client.run(["sh", "-c", "echo first; sleep 1; echo second"],
                          on_stdout=on_stdout, on_stderr=lambda _: None)  # fmt: skip

    started = time.monotonic()
    result = await asyncio.to_thread(go)
    client.sock.close()
    assert result.code == 0
    # The first line came before the command's sleep was over, not with the EXIT.
    assert await first_seen - started < result.duration_s


@pytest.mark.parametrize("action", ["end", "drop"])
async def test_output_cap_truncates_and_reports(start_cmdexec: StartCmdexec, action: str) -> None:
    async with start_cmdexec(limit_output_bytes=1_000_000, limit_output_action=action) as h:
        res = await h.run(["head", "-c", "100000000", "/dev/zero"])
        assert len(res.stdout) == 1_000_000
        assert res.exit.truncated == {"stdout": True, "stderr": False}
        if action == "end":  # ended at the cap, not after 100 MB read and dropped
            assert (res.exit.signal, res.exit.output_capped) == ("KILL", True)
            assert h.value("cmdexec_runs_total", result="output_cap") == 1
        else:
            assert (res.exit.code, res.exit.output_capped) == (0, False)
        small = await h.run(["echo", "fits"])
        assert small.exit.truncated == {"stdout": False, "stderr": False}
        assert not small.exit.output_capped


async def test_timeout_kills_a_tree_whose_grandchild_holds_the_pipes(
    cmdexec: CmdexecHarness,
) -> None:
    # The background sleep inherits stdout/stderr: without a group kill, no end of file ever.
    res = await asyncio.wait_for(
        cmdexec.run(["sh", "-c", "sleep 60 & echo $!; sleep 60"], timeout_s=0.5), 20
    )
    assert res.exit.timed_out
    assert res.exit.signal == "KILL"
    assert exit_status(res.exit) == EXIT_TIMEOUT
    grandchild = int(res.stdout.split()[0])
    await _gone(grandchild)
    assert cmdexec.value("cmdexec_runs_total", result="timeout") == 1


async def test_background_child_is_killed_when_the_command_exits(cmdexec: CmdexecHarness) -> None:
    res = await asyncio.wait_for(cmdexec.run(["sh", "-c", "sleep 60 & echo $!"]), 20)
    assert res.exit.code == 0
    await _gone(int(res.stdout.split()[0]))


async def test_client_may_ask_for_less_time_never_more(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(timeout_run_s=0.5) as h:
        res = await asyncio.wait_for(h.run(["sleep", "30"], timeout_s=1000), 20)
        assert res.exit.timed_out
        assert res.exit.duration_s < 5


async def test_client_disconnect_kills_the_command(cmdexec: CmdexecHarness) -> None:
    client = cmdexec.client()
    sock = client.sock
    client._send(encode_json(Kind.EXEC, Exec(argv=["sh", "-c", "echo $$; exec sleep 60"])))
    frame = await asyncio.to_thread(recv_frame, sock)
    assert frame is not None
    assert frame[0] == Kind.STDOUT
    pid = int(frame[1:])
    assert _alive(pid)
    sock.close()
    await _gone(pid)
    await until(lambda: cmdexec.value("cmdexec_runs_active") == 0)


async def test_signal_and_stdin_are_forwarded(cmdexec: CmdexecHarness) -> None:
    client = cmdexec.client()
    try:
        r, w = os.pipe()
        reader = os.fdopen(r, "rb")
        os.write(w, b"line one\nline two\n")
        os.close(w)
        res = await cmdexec.run(["cat"], client=client, stdin=reader)
        assert (res.exit.code, res.stdout) == (0, b"line one\nline two\n")
        # Same connection, next command: SIGNAL TERM reaches the whole group.
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def on_out(_: bytes) -> None:
            loop.call_soon_threadsafe(started.set)

        fut = asyncio.ensure_future(asyncio.to_thread(
            client.run, ["sh", "-c", "echo up; sleep 60"], on_stdout=on_out,
            on_stderr=lambda _: None))  # fmt: skip
        await asyncio.wait_for(started.wait(), 10)
        client.signal("TERM")
        result = await asyncio.wait_for(fut, 10)
        assert result.signal == "TERM"
    finally:
        client.sock.close()


async def test_a_thousand_timed_out_commands_leave_no_zombie(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(limit_runs=8) as h:

        def batch(n: int) -> int:
            client = h.client()
            timed_out = 0
            try:
                for _ in range(n):
                    res = client.run(
                        ["sleep", "5"], timeout_s=0.005, on_stdout=_drop, on_stderr=_drop
                    )
                    timed_out += res.timed_out
            finally:
                client.sock.close()
            return timed_out

        results = await asyncio.wait_for(
            asyncio.gather(*(asyncio.to_thread(batch, 250) for _ in range(4))), 300
        )
        assert sum(results) == 1000
        await until(lambda: not _zombie_children() and not _children_named(b"sleep"), 10)


async def test_the_child_sees_none_of_the_servers_environment(
    start_cmdexec: StartCmdexec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREKIT_TEST_SERVER_SECRET", "must-not-leak")
    async with start_cmdexec(child_env={"TZ": "UTC"}) as h:
        res = await h.run(["env"])
    names = sorted(line.split(b"=", 1)[0] for line in res.stdout.splitlines())
    assert names == [b"HOME", b"LANG", b"PATH", b"TZ"]
    assert b"must-not-leak" not in res.stdout
    assert b"test-token" not in res.stdout


async def test_concurrency_cap_answers_busy(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(limit_runs=1) as h:
        client = h.client()
        long_run = asyncio.ensure_future(asyncio.to_thread(
            h.run_sync, ["sleep", "30"], client=client))  # fmt: skip
        await until(lambda: h.value("cmdexec_runs_active") == 1)
        with pytest.raises(RemoteError) as info:
            await h.run(["true"])
        assert info.value.code == "busy"
        client.signal("KILL")
        assert (await asyncio.wait_for(long_run, 10)).exit.signal == "KILL"
        assert (await h.run(["true"])).exit.code == 0  # a slot is free again
        client.sock.close()


async def test_many_commands_in_turn_on_one_connection(cmdexec: CmdexecHarness) -> None:
    client = cmdexec.client()
    try:
        for i in range(50):
            res = await cmdexec.run(["echo", str(i)], client=client)
            assert res.stdout == f"{i}\n".encode()
    finally:
        client.sock.close()
    assert cmdexec.value("cmdexec_runs_total", result="ok") == 50
    assert cmdexec.value("cmdexec_connections_opened_total") == 1


async def test_span_continues_the_clients_trace_and_carries_no_arguments(
    cmdexec: CmdexecHarness,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    secret_arg = "do-not-record-me"
    res = await cmdexec.run(["echo", secret_arg], traceparent=f"00-{trace_id}-{parent}-01")
    assert res.exit.code == 0
    spans = [s for s in cmdexec.spans.get_finished_spans() if s.name == "cmdexec.run"]
    assert len(spans) == 1
    span = spans[0]
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == parent
    attrs = dict(span.attributes or {})
    assert attrs["process.executable.name"] == "echo"
    assert attrs["process.exit.code"] == 0
    assert attrs["wirekit.cmdexec.arg_count"] == 1
    assert all(secret_arg not in str(v) for v in attrs.values())


async def test_audit_events_per_login_and_run(
    cmdexec: CmdexecHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """One event per AUTH and per EXEC on the audit logger, field by field; never the token."""
    caplog.set_level("INFO", logger="wirekit_cmdexec.audit")
    await cmdexec.run(["echo", "an-argument"])
    records = [r.__dict__ for r in caplog.records if r.name == "wirekit_cmdexec.audit"]
    assert [r["event"] for r in records] == ["auth", "exec"]
    auth, run = records
    assert (auth["identity"], auth["method"], auth["decision"], auth["reason"]) == (
        "default",
        "token",
        "allowed",
        None,
    )
    assert auth["source"].startswith("127.0.0.1:")
    assert (run["identity"], run["argv"], run["decision"], run["result"], run["exit_code"]) == (
        "default",
        ["echo", "an-argument"],
        "allowed",
        "ok",
        0,
    )
    assert (run["signal"], run["shell"], run["reason"]) == (None, False, None)
    assert run["bytes_out"] == len(b"an-argument\n")
    assert run["duration_s"] > 0
    assert run["source"] == auth["source"]
    assert len(run["trace_id"]) == 32
    assert TOKEN not in str(records)


# -- helpers ------------------------------------------------------------------------------------
def _drop(_: bytes) -> None:
    pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z"


def _zombie_children() -> list[int]:
    return [pid for pid, state, _ in child_processes() if state == b"Z"]


def _children_named(name: bytes) -> list[int]:
    return [pid for pid, _, n in child_processes() if n == name]


async def _gone(pid: int) -> None:
    """The process is dead and reaped (not a zombie, not running)."""
    await until(lambda: not os.path.exists(f"/proc/{pid}"), 10)


async def test_resource_limits_are_applied_to_children(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(rlimit_nproc=77, rlimit_cpu_s=13, rlimit_as_bytes=1 << 30) as h:
        # `sleep` first: the limits are set with prlimit(2) right after the spawn.
        res = await h.run(["sh", "-c", "sleep 0.2; cat /proc/$$/limits"])
    limits = {
        line[:26].strip(): line[26:].split()[:2] for line in res.stdout.decode().splitlines()[1:]
    }
    assert limits["Max processes"] == ["77", "77"]
    assert limits["Max cpu time"] == ["13", "13"]
    assert limits["Max address space"] == [str(1 << 30), str(1 << 30)]
