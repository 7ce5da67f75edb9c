"""``wirekit_udp._hot`` in whichever build runs (``make test-compiled`` runs udp's tests against
the C build): its token bucket and per-source limiter against servicekit's, the model, in
random sequences at random times (the same answers, the same state, bit for bit), and its
checks of what it is given. The protocol's path is the other test files' work (test_defences'
drops and scrapes at every step, the service over loopback)."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import ratelimit
from wirekit_udp import _hot, protocol
from wirekit_udp.defences import LoopGuard
from wirekit_udp.protocol import UdpContext, UdpEcho
from wirekit_udp.settings import UdpSettings

times = st.floats(min_value=-10.0, max_value=1e4, allow_nan=False) | st.sampled_from([0.0, 1.0])
rates = st.sampled_from([0, 0.5, 1, 10.0, 1e9, math.inf]) | st.floats(0.0, 1e6)
bursts = st.integers(0, 20) | st.sampled_from([1.5, 1e9])
SOURCES: list[Any] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1", "2001:db8::/64", 7]
sources = st.sampled_from(SOURCES)


def outcome(call: Any) -> Any:
    try:
        return call()
    except ZeroDivisionError:
        return ZeroDivisionError


def state(bucket: Any) -> tuple[Any, ...]:
    return (bucket.rate, bucket.burst, bucket.tokens, bucket.stamp, bucket.limited)


def assert_same(got: Any, want: Any) -> None:
    """Equal (a number given as an int is kept as a float in C), NaN as NaN (a bucket of
    infinite rate holds NaN tokens after a refill); a bool where the model has a bool."""
    assert (type(got) is bool) == (type(want) is bool), (got, want)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float), (got, want)
        assert math.isnan(got), (got, want)
    else:
        assert got == want, (got, want)


bucket_ops = st.lists(st.tuples(st.sampled_from(["take", "level", "ready", "wait_s"]), times),
                      max_size=60)  # fmt: skip


@settings(max_examples=300)
@given(rates, bursts, times, bucket_ops)
def test_a_token_bucket_is_servicekits(
    rate: float, burst: float, start: float, ops: list[tuple[str, float]]
) -> None:
    got = _hot.TokenBucket(rate, burst, start)  # type: ignore[arg-type]
    want = ratelimit.TokenBucket(rate, burst, start)  # type: ignore[arg-type]
    for name, now in ops:
        assert_same(outcome(lambda: getattr(got, name)(now)),  # noqa: B023 (called at once)
                    outcome(lambda: getattr(want, name)(now)))  # noqa: B023  # fmt: skip
        for g, w in zip(state(got), state(want), strict=True):
            assert_same(g, w)


def test_a_token_bucket_takes_keywords_and_its_state_can_be_set() -> None:
    bucket = _hot.TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(now=0.0) for _ in range(6)] == [True] * 5 + [False]
    bucket.tokens, bucket.stamp, bucket.limited = 2.0, 1.0, True
    assert bucket.level(now=1.0) == 2.0
    assert bucket.ready(now=1.0) is True
    assert bucket.wait_s(now=1.0) == 0.0
    assert bucket.limited is True


limiter_ops = st.lists(
    st.tuples(st.sampled_from(["allow", "allow", "allow", "ready", "wait_s"]), sources, times),
    max_size=80,
)  # fmt: skip


@settings(max_examples=300)
@given(rates, bursts, st.integers(1, 4), limiter_ops)
def test_a_source_limiter_is_servicekits(
    rate: float, burst: float, limit: int, ops: list[tuple[str, Any, float]]
) -> None:
    got = _hot.SourceLimiter(rate, burst, limit)  # type: ignore[arg-type]
    want = ratelimit.SourceLimiter(rate, burst, limit)  # type: ignore[arg-type]
    assert (got.rate, got.burst, got.limit) == (want.rate, want.burst, want.limit)
    for name, source, now in ops:
        assert_same(outcome(lambda: getattr(got, name)(source, now)),  # noqa: B023
                    outcome(lambda: getattr(want, name)(source, now)))  # noqa: B023  # fmt: skip
        assert len(got) == len(want)
        assert got.limited == want.limited
        # every source's bucket, as far as it shows: known or not, its level and its wait
        for other in SOURCES:
            assert_same(outcome(lambda: got.wait_s(other, now)),  # noqa: B023
                         outcome(lambda: want.wait_s(other, now)))  # noqa: B023  # fmt: skip


def test_a_source_limiter_forgets_the_least_recently_seen_first() -> None:
    limiter = _hot.SourceLimiter(rate=1, burst=1, limit=2)
    assert limiter.allow("a", now=0.0) is True
    assert limiter.allow("b", now=0.0) is True
    assert limiter.allow("a", now=0.0) is False  # a is the newest now
    assert limiter.limited == 1
    assert limiter.allow("c", now=0.0) is True  # b goes
    assert len(limiter) == 2
    assert limiter.ready("b", now=0.0) is True  # unknown: it has a token
    assert limiter.wait_s("a", now=0.0) == 1.0  # still known, still empty
    assert limiter.allow("d", now=0.0) is True  # a goes, and with it its limited state
    assert limiter.limited == 0
    assert limiter.wait_s("a", now=0.0) == 0.0


def test_a_source_limiter_made_again_starts_afresh() -> None:
    """__init__ run twice (the C build drops its list of buckets with the old table)."""
    limiter = _hot.SourceLimiter(rate=1, burst=1, limit=2)
    for source in "abc":
        limiter.allow(source, now=0.0)
    limiter.allow("c", now=0.0)
    limiter.__init__(1, 1, 2)  # type: ignore[misc]
    assert (len(limiter), limiter.limited) == (0, 0)
    # z evicts x, then x evicts y: through the new list only
    assert [limiter.allow(source, now=0.0) for source in "xyzx"] == [True] * 4
    assert len(limiter) == 2
    assert (limiter.wait_s("z", now=0.0), limiter.wait_s("y", now=0.0)) == (1.0, 0.0)


def test_the_build_is_named() -> None:
    expected = "compiled" if _hot.__file__.endswith(".so") else "pure"
    assert expected == _hot.BUILD
    # the C build's NH needs 128-bit integers, which 64-bit GCC and Clang have; else Python's hash
    nh = _hot.BUILD == "compiled" and sys.maxsize > 2**32
    assert ("nh" if nh else "hash") == _hot.LOOP_KEY


def test_the_context_makes_this_builds_classes() -> None:
    ctx = UdpContext.build(UdpSettings(), CollectorRegistry(), TracerProvider().get_tracer("t"),
                           clock=lambda: 0.0)  # fmt: skip
    assert type(ctx.limiter) is _hot.SourceLimiter
    assert type(ctx.global_bucket) is _hot.TokenBucket
    assert type(ctx.metrics.received) is _hot.Cell
    proto = UdpEcho(ctx)
    assert (proto.max_size, proto.sends_empty, proto._ipv4) == (ctx.max_size, False, False)
    assert proto._answers is ctx.loop.answers


def test_the_c_core_refuses_a_context_without_its_buckets() -> None:
    """The C build reads the buckets and cells through their C structures, so it checks their
    types; the pure build takes any object with their interface."""
    ctx = UdpContext.build(UdpSettings(), CollectorRegistry(), TracerProvider().get_tracer("t"),
                           clock=lambda: 0.0)  # fmt: skip
    ctx.limiter = ratelimit.SourceLimiter(1, 1, 10)
    if _hot.BUILD == "compiled":
        with pytest.raises(TypeError, match=r"limiter must be a wirekit_udp\._hot\.SourceLimiter"):
            UdpEcho(ctx)
    else:
        assert UdpEcho(ctx).limiter is ctx.limiter


def test_the_c_core_refuses_a_loop_table_that_is_not_its_own() -> None:
    ctx = UdpContext.build(UdpSettings(), CollectorRegistry(), TracerProvider().get_tracer("t"),
                           clock=lambda: 0.0)  # fmt: skip
    assert type(ctx.loop.answers) is _hot.LoopTable  # type: ignore[comparison-overlap]
    ctx.loop.answers = {}
    if _hot.BUILD == "compiled":
        with pytest.raises(TypeError, match=r"answers must be a wirekit_udp\._hot\.LoopTable"):
            UdpEcho(ctx)
    else:
        assert UdpEcho(ctx)._answers is ctx.loop.answers


# Keys that share home slots (small ints, in a table of 8 to 64 slots) and keys anywhere.
table_keys = st.integers(0, 40) | st.integers(-(2**63), 2**63 - 1).filter(lambda k: k != -1)
table_ops = st.lists(
    st.tuples(st.sampled_from(["set", "set", "del", "get", "in", "item"]), table_keys,
              st.floats(-1e9, 1e9) | st.integers(-5, 5)),
    max_size=300,
)  # fmt: skip


def assert_table_is(table: Any, model: dict[int, float]) -> None:
    assert len(table) == len(model)
    assert sorted(table.items()) == sorted(model.items())
    for key, when in model.items():
        assert key in table
        assert table[key] == when
        assert table.get(key) == when


@settings(max_examples=300)
@given(table_ops)
def test_the_loop_table_is_a_dict_of_keys_and_times(ops: list[tuple[str, int, float]]) -> None:
    """Set, delete, look up: a dict's answers after every step (the C table's probing, growth
    and deletion by backward shift, with keys that collide)."""
    table, model = _hot.LoopTable(), {}
    for op, key, when in ops:
        if op == "set":
            table[key] = when
            model[key] = when
        elif op == "del":
            if key in model:
                del table[key], model[key]
            else:
                with pytest.raises(KeyError):
                    del table[key]
        elif op == "get":
            assert table.get(key) == model.get(key)
            assert table.get(key, "none") == model.get(key, "none")
        elif op == "in":
            assert (key in table) == (key in model)
        elif key in model:
            assert table[key] == model[key]
        else:
            with pytest.raises(KeyError):
                table[key]  # the look-up is the test
        assert_table_is(table, model)
    table.clear()
    assert_table_is(table, {})


def test_the_loop_table_grows_and_shrinks_by_thousands() -> None:
    """20,000 keys in (the table grows eleven times), then deleted in random order to half,
    looked up throughout: a dict's answers."""
    rng = random.Random(24)
    table, model = _hot.LoopTable(), {}
    keys = [rng.randrange(-(2**63), 2**63) for _ in range(20_000)]
    keys = [key for key in keys if key != -1]
    for i, key in enumerate(keys):
        table[key] = model[key] = float(i)
    assert_table_is(table, model)
    rng.shuffle(keys)
    for key in keys[: len(keys) // 2]:
        del table[key], model[key]
    assert_table_is(table, model)
    assert all(key not in table for key in keys[: len(keys) // 2])


def test_the_loop_table_takes_only_loop_keys_and_times() -> None:
    if _hot.BUILD != "compiled":
        assert _hot.LoopTable is dict  # the pure build's, which takes anything
        return
    table: Any = _hot.LoopTable()
    with pytest.raises(TypeError, match="loop keys are ints, not str"):
        table["1"] = 1.0
    with pytest.raises(TypeError):
        table[1] = "1.0"
    for key in (-1, 2**63, -(2**63) - 1):  # -1 marks a free slot; no hash() is -1
        with pytest.raises(ValueError, match="is not a loop key"):
            table[key] = 1.0
        assert key not in table
        assert table.get(key) is None
    with pytest.raises(TypeError):
        _hot.LoopTable(8)  # type: ignore[call-overload]
    assert len(table) == 0


def test_answers_are_stamped_by_the_monotonic_clock_when_it_is_the_clock() -> None:
    """The service's clock is time.monotonic, which the C build reads itself: the same clock,
    so an answer's time lies between two readings of it around the datagram."""
    ctx = UdpContext.build(UdpSettings(), CollectorRegistry(), TracerProvider().get_tracer("t"),
                           clock=time.monotonic)  # fmt: skip
    proto = UdpEcho(ctx)
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    before = time.monotonic()
    proto.datagram_received(b"x", A)
    after = time.monotonic()
    [(key, when)] = ctx.loop.answers.items()
    assert (key, before <= when <= after) == (_hot.loop_key(b"x", A), True), (before, when, after)
    proto.datagram_received(b"x", A)  # our answer coming back, within the window: dropped
    assert transport.sent == [(b"x", A)]
    assert ctx.metrics.dropped["loop"].n == 1


def _pure_hot() -> ModuleType:
    """``_hot.py`` itself, whichever build ``wirekit_udp._hot`` is: the reference."""
    path = Path(protocol.__file__).with_name("_hot.py")
    spec = importlib.util.spec_from_file_location("wirekit_udp._hot_reference", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PURE = _pure_hot()


def _reference_echo(ctx: UdpContext) -> Any:
    """UdpEcho on _hot.py's Core, with servicekit's buckets."""

    def init(self: Any, ctx: UdpContext) -> None:
        PURE.Core.__init__(self, ctx)
        self.stats, self.reporter, self.check_source = ctx.metrics, ctx.reporter, ctx.check_source

    methods = {name: UdpEcho.__dict__[name] for name in
               ("connection_made", "_send_empty", "_judge", "_drop", "error_received")}  # fmt: skip
    bases = (PURE.Core, asyncio.DatagramProtocol)
    cls = type("ReferenceEcho", bases, {"__init__": init, **methods})
    return cls(ctx)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str) -> None:
        return None


ADDRESSES = [
    ("127.0.0.1", 40000), ("10.0.0.2", 40001), ("10.0.0.3", 40001), ("224.0.0.1", 5000),
    ("127.0.0.1", 19), ("127.0.0.1", 2049), ("2001:db8::1", 40000, 0, 0),
    ("2001:db8::2", 40000, 0, 0), ("::ffff:10.0.0.2", 40001, 0, 0), ("ff02::1", 40000, 0, 0),
]  # fmt: skip
datagrams = st.lists(
    st.tuples(st.sampled_from([b"", b"x", b"y", b"z" * 33]), st.sampled_from(ADDRESSES),
              st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.06, 1.0])),
    max_size=60,
)  # fmt: skip


A = ("127.0.0.1", 40000)


def test_a_loop_key_is_the_same_for_the_same_bytes_to_the_same_address() -> None:
    for n in (0, 1, 15, 16, 17, 1023, 1024, 1025, 2048, 2049, 65507):
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        assert _hot.loop_key(data, A) == _hot.loop_key(bytes(bytearray(data)), (A[0], A[1]))
        assert type(_hot.loop_key(data, A)) is int


def test_loop_keys_tell_apart_lengths_single_bytes_and_addresses() -> None:
    """Every length of zeros (the C build pads its last 16 bytes with zeros: the length tells
    them apart), every one-byte change of a payload across three of the C build's 1 KiB blocks,
    the same bytes to another address or port: all different keys."""
    zeros = {_hot.loop_key(bytes(n), A) for n in range(2100)}
    assert len(zeros) == 2100
    base = bytes((i * 7 + 3) % 256 for i in range(2100))
    keys = {_hot.loop_key(base, A)}
    for at in range(len(base)):
        keys.add(_hot.loop_key(base[:at] + bytes([base[at] ^ 0x80]) + base[at + 1 :], A))
    keys |= {_hot.loop_key(base, addr) for addr in ADDRESSES[1:]}
    keys.add(_hot.loop_key(base, (A[0], A[1] + 1)))
    assert len(keys) == 1 + len(base) + len(ADDRESSES) - 1 + 1
    assert len(zeros | keys) == len(zeros) + len(keys)


@settings(max_examples=300)
@given(st.binary(max_size=2100), st.binary(max_size=2100), st.sampled_from(ADDRESSES))
def test_different_payloads_have_different_loop_keys(a: bytes, b: bytes, addr: Any) -> None:
    assert (_hot.loop_key(a, addr) == _hot.loop_key(b, addr)) == (a == b)


def test_the_loop_guards_key_is_the_builds_and_bytes_of_a_subclass_are_bytes() -> None:
    class Payload(bytes):
        pass

    for data in (b"", b"x", bytes(range(256)) * 5):
        assert LoopGuard.key(data, A) == _hot.loop_key(data, A)
        assert _hot.loop_key(Payload(data), A) == _hot.loop_key(data, A)


def test_a_module_loaded_again_keeps_the_processs_loop_keys() -> None:
    """Tables keyed so far stay valid when the module is set up again (here: imported again
    after leaving sys.modules, as a subinterpreter would)."""
    code = (
        "import importlib, sys; from wirekit_udp import _hot; "
        "a = _hot.loop_key(bytes(100), ('h', 4)); del sys.modules['wirekit_udp._hot']; "
        "again = importlib.import_module('wirekit_udp._hot'); assert again is not _hot; "
        "print(a == again.loop_key(bytes(100), ('h', 4)))"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    assert got.strip() == "True"


def test_a_payload_that_is_not_bytes_is_keyed_or_refused_as_the_pure_build_does() -> None:
    with pytest.raises(TypeError, match="unhashable"):
        _hot.loop_key(bytearray(b"x"), A)  # type: ignore[arg-type]
    for data in ("text", memoryview(b"x")):  # hashable: the pure build's key
        assert _hot.loop_key(data, A) == hash((A, data))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unhashable"):
        _hot.loop_key(b"x", ["127.0.0.1", 1])  # type: ignore[arg-type]


def test_the_c_builds_loop_keys_are_drawn_afresh_in_each_process() -> None:
    """Under the same PYTHONHASHSEED the pure build's keys are the same in two processes; the
    C build's NH and SipHash keys come from os.urandom, so its keys differ (where it has NH:
    without 128-bit integers it falls back to the pure build's hash)."""
    code = "from wirekit_udp import _hot; print(_hot.loop_key(bytes(100), ('127.0.0.1', 4)))"
    env = dict(os.environ, PYTHONHASHSEED="0")
    keys = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True, timeout=60).stdout for _ in range(2)}  # fmt: skip
    assert len(keys) == (2 if _hot.LOOP_KEY == "nh" else 1)


def _observed(proto: Any, transport: FakeTransport, names: dict[int, Any]) -> tuple[Any, ...]:
    """What the endpoint did and holds; its loop table by the (data, addr) each key names."""
    stats, ctx = proto.stats, proto.ctx
    bucket = ctx.global_bucket
    return (
        list(transport.sent), {reason: cell.n for reason, cell in stats.dropped.items()},
        stats.received.n, stats.received_bytes.n, stats.dropped_bytes.n,
        {names[key]: when for key, when in ctx.loop.answers.items()}, ctx.loop.prune_at,
        len(ctx.limiter), ctx.limiter.limited,
        float(bucket.tokens), float(bucket.stamp), set(proto._unicast),
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    datagrams, st.integers(1, 3), st.integers(1, 3), st.sampled_from([1.0, 100.0]),
    st.integers(1, 5), st.booleans(), st.booleans(),
)  # fmt: skip
def test_the_path_is_the_references(
    steps: list[tuple[bytes, Any, float]], burst: int, limit: int, rate: float,
    burst_global: int, sends_empty: bool, ipv4: bool,
) -> None:  # fmt: skip
    """The endpoint's protocol in this build and in _hot.py, the same datagrams at the same
    times: the same answers, drops, counters, loop table, buckets (every drop reason, full
    tables, empty datagrams, IPv6 sources counted by /64)."""
    now = [0.0]
    echoes = []
    for reference in (False, True):
        settings_ = UdpSettings(
            max_datagram_size=32, rate_per_source=rate, burst_per_source=burst,
            limit_sources=limit, rate_global=10.0, burst_global=burst_global,
        )  # fmt: skip
        ctx = UdpContext.build(settings_, CollectorRegistry(), TracerProvider().get_tracer("t"),
                               clock=lambda: now[0])  # fmt: skip
        if reference:
            ctx.limiter = ratelimit.SourceLimiter(rate, burst, limit)
            ctx.global_bucket = ratelimit.TokenBucket(10.0, burst_global, 0.0)
        proto: Any = _reference_echo(ctx) if reference else UdpEcho(ctx)
        transport = FakeTransport()
        proto.connection_made(transport)
        proto.sends_empty, proto._ipv4 = sends_empty, ipv4
        echoes.append((proto, transport))
    # each build's loop keys (the C build's are its own keyed hash), by what they name
    got_names = {_hot.loop_key(data, addr): (data, addr) for data, addr, _ in steps}
    want_names = {hash((addr, data)): (data, addr) for data, addr, _ in steps}
    assert len(got_names) == len(want_names) == len({(data, addr) for data, addr, _ in steps})
    for data, addr, step in steps:
        now[0] += step
        for proto, _ in echoes:
            proto.datagram_received(data, addr)
        (got, got_transport), (want, want_transport) = echoes
        assert _observed(got, got_transport, got_names) == _observed(
            want, want_transport, want_names
        )
