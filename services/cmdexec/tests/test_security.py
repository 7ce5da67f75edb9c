"""The attack table: every row refused with the right ERROR code, and nothing executed."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from wirekit_harness import StartCmdexec
from wirekit_testkit import CMDEXEC_TOKEN

from wirekit_cmdexec.__main__ import build_context
from wirekit_cmdexec.client import RemoteError
from wirekit_cmdexec.messages import Auth, Exec, Kind, decode, encode_json
from wirekit_cmdexec.settings import DEFAULT_ALLOW, CmdexecSettings
from wirekit_cmdexec.tokens import hash_token
from wirekit_framing import encode, recv_frame
from wirekit_servicekit import Runtime
from wirekit_servicekit.worker import SOLO

TOKEN = CMDEXEC_TOKEN
MARKER = Path("/tmp/wirekit-cmdexec-marker")


def _exec(argv: list[str], **kw: Any) -> bytes:
    return encode_json(Kind.EXEC, Exec(argv=argv, **kw))


def _auth(token: str = TOKEN) -> bytes:
    return encode_json(Kind.AUTH, Auth(token=token))


M = str(MARKER)
ROWS = [
    # (messages sent in order, expected ERROR code, connection closed afterwards)
    pytest.param([_auth("wrong-token")], "unauthorized", True, id="wrong-token"),
    pytest.param([_auth("")], "unauthorized", True, id="empty-token"),
    pytest.param([_auth("x" * 100_000)], "unauthorized", True, id="overlong-token"),
    pytest.param([_exec(["touch", M])], "unauthorized", True, id="exec-before-auth"),
    pytest.param([_auth(), _exec(["sh", "-c", f"touch {M}"])], "forbidden", False, id="sh"),
    pytest.param([_auth(), _exec(["touch", M])], "forbidden", False, id="not-allowlisted"),
    pytest.param([_auth(), _exec([f"echo hi; touch {M}"])], "forbidden", False, id="semicolon"),
    pytest.param([_auth(), _exec([f"true && touch {M}"])], "forbidden", False, id="and-and"),
    pytest.param([_auth(), _exec([f"$(touch {M})"])], "forbidden", False, id="dollar-paren"),
    pytest.param([_auth(), _exec([f"`touch {M}`"])], "forbidden", False, id="backticks"),
    pytest.param([_auth(), _exec(["../../usr/bin/touch", M])], "forbidden", False, id="dotdot"),
    pytest.param([_auth(), _exec(["/usr/bin/touch", M])], "forbidden", False, id="abs-path"),
    pytest.param([_auth(), _exec(["cat", "--", "/etc/shadow"])], "forbidden", False, id="dashdash"),
    pytest.param(
        [_auth(), _exec(["cat", "/proc/../etc/shadow"])], "forbidden", False, id="cat-dotdot"
    ),
    pytest.param([_auth(), _exec(["ls", "/tmp/../root"])], "forbidden", False, id="ls-dotdot"),
    pytest.param([_auth(), _exec(["ls", "--hide=*"])], "forbidden", False, id="option-injection"),
    pytest.param([_auth(), _exec(["date", "-s", "2020-01-01"])], "forbidden", False, id="date-set"),
    pytest.param([_auth(), _exec([f"touch {M}"], shell=True)], "forbidden", False, id="shell-off"),
    pytest.param([_auth(), _exec(["echo", "a\x00b"])], "forbidden", False, id="nul-byte"),
    pytest.param([_auth(), _exec(["echo"] + ["y" * 2000] * 40)], "too_large", True, id="big-exec"),
    pytest.param([_auth(), b"\x7fwhat"], "bad_request", True, id="unknown-kind"),
    pytest.param([_auth(), b"\x02{not json"], "bad_request", True, id="malformed-json"),
    pytest.param([_auth(), b'\x02{"args": ["ls"]}'], "bad_request", True, id="missing-argv"),
    pytest.param([_auth(), b'\x02{"argv": []}'], "bad_request", True, id="empty-argv"),
    pytest.param([_auth(), b"\x83{}"], "bad_request", True, id="server-kind-from-client"),
    # Strict types: no coercion, no NaN or infinity.
    pytest.param(
        [_auth(), b'\x02{"argv": ["true"], "shell": "yes"}'],
        "bad_request",
        True,
        id="shell-as-string",
    ),
    pytest.param(
        [_auth(), b'\x02{"argv": ["true"], "stdin": 1}'], "bad_request", True, id="stdin-as-int"
    ),
    pytest.param(
        [_auth(), b'\x02{"argv": ["true"], "timeout_s": "0.5"}'],
        "bad_request",
        True,
        id="timeout-as-string",
    ),
    pytest.param(
        [_auth(), b'\x02{"argv": ["true"], "timeout_s": NaN}'],
        "bad_request",
        True,
        id="timeout-nan",
    ),
    pytest.param([b'\x01{"token": 12345}'], "unauthorized", True, id="token-as-number"),
    pytest.param([_auth(), b"\x04"], None, False, id="stray-stdin-eof-ignored"),
]


@pytest.mark.parametrize(("messages", "code", "closes"), ROWS)
async def test_attack_is_refused_and_nothing_runs(
    start_cmdexec: StartCmdexec, messages: list[bytes], code: str | None, closes: bool
) -> None:
    MARKER.unlink(missing_ok=True)
    async with start_cmdexec(allow=DEFAULT_ALLOW) as h:

        def attack() -> tuple[Any, bool]:
            with h.sock() as s:
                s.sendall(b"".join(encode(m, 2**32 - 1) for m in messages))
                s.settimeout(2 if code is None else 10)
                try:
                    frame = recv_frame(s, 1 << 20)
                except TimeoutError:
                    return None, False
                kind, body = decode(frame) if frame else (None, None)
                assert kind is Kind.ERROR, (kind, body)
                if closes:
                    try:
                        return body, recv_frame(s) is None
                    except ConnectionResetError:
                        return body, True
                # Refused, but the connection is still good for a legitimate command.
                s.sendall(encode(_exec(["true"]), 1 << 20))
                kind, _ = decode(recv_frame(s, 1 << 20) or b"")
                return body, kind is not Kind.EXIT

        body, closed = await asyncio.to_thread(attack)
    if code is None:
        assert body is None
    else:
        assert body is not None
        assert body.code == code
        assert closed is closes
    assert not MARKER.exists(), "a refused request executed something"


async def test_metacharacters_in_arguments_stay_literal(start_cmdexec: StartCmdexec) -> None:
    MARKER.unlink(missing_ok=True)
    async with start_cmdexec(allow=DEFAULT_ALLOW) as h:
        arg = f"$(touch {M}); `touch {M}` && touch {M} | touch {M}"
        res = await h.run(["echo", arg])
    assert res.stdout == arg.encode() + b"\n"
    assert not MARKER.exists()


async def test_the_marker_check_can_fail(start_cmdexec: StartCmdexec) -> None:
    """Control for the table: when touch IS allowed, the marker appears."""
    MARKER.unlink(missing_ok=True)
    async with start_cmdexec(allow=["touch"]) as h:
        res = await h.run(["touch", M])
    assert res.exit.code == 0
    assert MARKER.exists()
    MARKER.unlink()


async def test_frame_over_max_frame_size_is_too_large(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(max_frame_size=4096) as h:

        def attack() -> dict[str, Any]:
            with h.sock() as s:
                s.sendall(encode(_auth(), 1 << 20) + struct.pack("!I", 2**31))
                kind, body = decode(recv_frame(s, 1 << 20) or b"")
                assert kind is Kind.ERROR
                assert recv_frame(s) is None
                return dict(body)

        assert (await asyncio.to_thread(attack))["code"] == "too_large"
        assert h.value("cmdexec_protocol_errors_total", code="too_large") == 1


async def test_failed_auth_is_counted_delayed_and_closed(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(auth_failure_delay_s=0.3) as h:

        def attempt() -> tuple[float, str]:
            with h.sock() as s:
                started = time.monotonic()
                s.sendall(encode(_auth("guess"), 1 << 20) + encode(_exec(["echo", "x"]), 1 << 20))
                frame = recv_frame(s, 1 << 20)
                took = time.monotonic() - started
                assert recv_frame(s) is None  # closed after the ERROR
                return took, json.loads(frame[1:])["code"] if frame else ""

        took, code = await asyncio.to_thread(attempt)
        assert code == "unauthorized"
        assert took >= 0.3  # the delay is there (a lower bound, not a performance target)
        assert h.value("cmdexec_auth_failures_total", reason="token") == 1
        assert h.value("cmdexec_runs_total", result="ok") == 0


def test_the_server_keeps_only_token_hashes_and_looks_them_up_by_hash() -> None:
    """Whatever is offered is hashed before it is looked up: the lookup (a dict of SHA-256
    digests) depends on a digest the client cannot steer, not on how much of the token it got
    right. The identities hold the token's hash, never the token."""
    settings = CmdexecSettings(token="right", metrics_port=0)
    runtime = Runtime(settings, CollectorRegistry(), TracerProvider().get_tracer("t"),
                      logging.getLogger("t"), SOLO)  # fmt: skip
    svc = build_context(runtime)
    found = svc.identities.by_token("right")
    assert found is not None
    assert found.name == "default"
    assert found.credentials == {hash_token("right")}
    for offered in ("", "r", "righ", "wrong", "right ", "x" * 10_000):
        assert svc.identities.by_token(offered) is None


async def test_generated_token_is_logged_once_and_works(
    start_cmdexec: StartCmdexec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="wirekit_cmdexec")
    async with start_cmdexec(token=None) as h:
        tokens = [r.__dict__["token"] for r in caplog.records if hasattr(r, "token")]
        assert len(tokens) == 1
        assert len(tokens[0]) >= 40  # 32 random bytes, urlsafe base64
        res = await asyncio.to_thread(h.run_sync, ["echo", "ok"], client=h.client(tokens[0]))
        assert res.stdout == b"ok\n"


async def test_shell_mode_runs_only_when_enabled(start_cmdexec: StartCmdexec) -> None:
    async with start_cmdexec(allow=["true"], allow_shell=True, workdir="/tmp") as h:
        res = await h.run(["echo one && pwd"], shell=True)
        assert (res.exit.code, res.stdout) == (0, b"one\n/tmp\n")
        with pytest.raises(RemoteError) as info:
            await h.run(["echo", "two"], shell=True)  # shell mode takes one string
        assert info.value.code == "forbidden"
