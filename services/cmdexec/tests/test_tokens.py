"""Token strength: the estimate, the refusal at start, by ``token hash`` and at login."""

from __future__ import annotations

import asyncio
import base64
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from wirekit_harness import StartCmdexec

from wirekit_cmdexec.client import CmdexecClient, RemoteError
from wirekit_cmdexec.tokens import MIN_TOKEN_BITS, hash_token, new_token, token_bits

STRONG = [
    pytest.param(new_token(), id="token-new"),
    pytest.param("9b01c5c189205b79607c7ebd92ed3039", id="hex-16-bytes"),  # openssl rand -hex 16
    pytest.param("V2h5IG5vdCB1c2UgYSByZWFsIHRva2VuPw0KZG9uZSE=", id="base64-32-bytes"),
    pytest.param("MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43UOV3HO6DZPJQWE2LO", id="base32-30-bytes"),
    pytest.param("k2Wq8Zt4nR7vB1xY6cL0pD3mF9sJ5hG8aE2uT7iO", id="alnum-40"),
]
WEAK = [
    pytest.param("", id="empty"),
    pytest.param("hunter2", id="short"),
    pytest.param("password123", id="dictionary"),
    pytest.param("my-secret-token-1234567890abcdef", id="words-and-a-sequence"),
    pytest.param("t" * 64, id="repeat"),
    pytest.param("qwertyuiopasdfghjklzxcvbnm1234567890", id="keyboard-walk"),
    pytest.param("correct horse battery staple", id="passphrase-4-words"),
    pytest.param("550e8400-e29b-41d4-a716-446655440000", id="uuid"),
    pytest.param("0123456789abcdef0123456789ab", id="hex-14-bytes"),
    pytest.param("20261202", id="date"),
    # Longer than zxcvbn judges at once (72): judged piece by piece (found by review).
    pytest.param("a" * 110, id="long-repeat"),
    pytest.param("password" * 20, id="long-words"),
    pytest.param("0123456789" * 13, id="long-sequence"),
]


@pytest.mark.parametrize("token", STRONG)
def test_strong_tokens_pass(token: str) -> None:
    assert token_bits(token) >= MIN_TOKEN_BITS


@pytest.mark.parametrize(
    "encode", [bytes.hex, lambda b: base64.b64encode(b).decode(),
               lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
               lambda b: base64.b32encode(b).decode()],
    ids=["hex", "base64", "base64url", "base32"],
)  # fmt: skip
def test_random_tokens_of_20_bytes_always_pass(encode: Callable[[bytes], str]) -> None:
    """160 random bits in any usual encoding: no coincidental pattern makes them weak (seeded:
    the same 300 tokens each run)."""
    rng = random.Random(19)
    weak = [t for t in (encode(rng.randbytes(20)) for _ in range(300))
            if token_bits(t) < MIN_TOKEN_BITS]  # fmt: skip
    assert not weak


@pytest.mark.parametrize("token", WEAK)
def test_weak_tokens_do_not(token: str) -> None:
    assert token_bits(token) < MIN_TOKEN_BITS


def _token_command(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "wirekit_cmdexec", "token", *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


def test_token_hash_refuses_a_weak_token_unless_told() -> None:
    refused = _token_command("hash", stdin="hunter2\n")
    assert refused.returncode == 2
    assert "too weak" in refused.stderr
    assert "token new" in refused.stderr
    assert "hunter2" not in refused.stderr + refused.stdout
    forced = _token_command("hash", "--allow-weak", stdin="hunter2\n")
    assert (forced.returncode, forced.stdout.strip()) == (0, hash_token("hunter2"))
    made = _token_command("new", stdin="")
    token = made.stdout.split()[1]
    assert _token_command("hash", stdin=token).stdout.strip() == hash_token(token)


@pytest.mark.parametrize("allow_weak", [False, True])
async def test_a_weak_token_in_the_policy_is_refused_at_login(
    start_cmdexec: StartCmdexec, tmp_path: Path, allow_weak: bool
) -> None:
    """A policy file holds hashes: the token is judged when it is first offered. Refused even
    though it is right (reason weak_token), unless the server allows weak tokens."""
    weak, strong = "hunter2-hunter2", new_token()
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nidentities:\n  old:\n    tokens: ['{hash_token(weak)}']\n"
                      f"  new:\n    tokens: ['{hash_token(strong)}']\n")  # fmt: skip
    async with start_cmdexec(token=None, policy_file=str(policy),
                             allow_weak_tokens=allow_weak) as h:  # fmt: skip

        def run(token: str) -> str:
            try:
                h.run_sync(["true"], client=CmdexecClient(h.sock(), token))
            except RemoteError as exc:
                return f"{exc.code}: {exc}"
            return "ok"

        for _ in range(2):  # the second time from the remembered judgement
            got = await asyncio.to_thread(run, weak)
            if allow_weak:
                assert got == "ok"
            else:
                assert got.startswith("unauthorized")
                assert "too weak" in got
        assert await asyncio.to_thread(run, strong) == "ok"
        refused = h.value("cmdexec_auth_failures_total", reason="weak_token")
        assert refused == (0 if allow_weak else 2)
