"""The tracker's rules, by hand and against a model (a plain re-statement of the rules over
the whole history) for any interleaving of sends, replies, duplicates and expiries."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirekit_probe.tracker import Outcome, Tracker, hops_from_ttl


def test_in_order_replies() -> None:
    t = Tracker(timeout_s=1.0)
    for seq in range(3):
        t.on_send(seq, seq * 0.1)
    assert t.on_reply(0, 0.010)[1] == pytest.approx(0.010)
    assert t.on_reply(1, 0.130)[1] == pytest.approx(0.030)
    assert t.on_reply(2, 0.210)[1] == pytest.approx(0.010)
    assert (t.received, t.lost, t.reordered, t.duplicate, t.late) == (3, 0, 0, 0, 0)
    # RFC 3550: J = J + (|D| - J) / 16, D the difference of consecutive round trips
    assert t.jitter_s == pytest.approx((0.020 / 16) + (0.020 - 0.020 / 16) / 16)


def test_reordered_duplicate_late_unknown() -> None:
    t = Tracker(timeout_s=0.5)
    for seq in range(4):
        t.on_send(seq, 0.0)
    assert t.on_reply(1, 0.01)[0] is Outcome.RECEIVED
    assert t.on_reply(0, 0.02)[0] is Outcome.RECEIVED  # below the next expected (2)
    assert t.on_reply(0, 0.03)[0] is Outcome.DUPLICATE
    assert t.expire(0.6) == 2  # 2 and 3
    assert t.on_reply(3, 0.7)[0] is Outcome.LATE
    assert t.on_reply(3, 0.8)[0] is Outcome.DUPLICATE
    assert t.on_reply(99, 0.9)[0] is Outcome.UNKNOWN
    assert (t.sent, t.received, t.lost, t.late, t.duplicate, t.reordered) == (4, 2, 2, 1, 2, 1)


def test_memory_is_bounded() -> None:
    t = Tracker(timeout_s=10.0, limit=100, window=64)
    for seq in range(1000):
        t.on_send(seq, 0.0)
    assert t.in_flight == 100
    assert t.lost == 900
    for seq in range(1000, 100_000):  # answered at once: nothing grows
        t.on_send(seq, 0.0)
        t.on_reply(seq, 0.001)
    assert t.in_flight <= 100
    assert (len(t._seqs), len(t._states)) == (64, 64)
    # The latest 64 are remembered; an answer to anything older is unknown.
    assert t.on_reply(99_999, 0.002)[0] is Outcome.DUPLICATE
    assert t.on_reply(99_000, 0.002)[0] is Outcome.UNKNOWN


@pytest.mark.parametrize(("ttl", "hops"), [(64, 0), (63, 1), (1, 63), (128, 0), (120, 8),
                                           (255, 0), (250, 5), (65, 63)])  # fmt: skip
def test_hops(ttl: int, hops: int) -> None:
    assert hops_from_ttl(ttl) == hops


# -- against a model ----------------------------------------------------------------------------
events = st.lists(
    st.one_of(
        st.tuples(st.just("send")),
        st.tuples(st.just("reply"), st.integers(0, 30)),
        st.tuples(st.just("wait"), st.floats(0.0, 0.6)),
    ),
    max_size=80,
)


@given(events)
def test_matches_the_model(history: list[tuple[object, ...]]) -> None:
    timeout = 0.5
    t = Tracker(timeout_s=timeout)
    now, next_seq = 0.0, 0
    sent_at: dict[int, float] = {}
    lost: set[int] = set()
    replied: set[int] = set()  # answered on time or late
    arrivals: list[int] = []  # on-time replies, in order
    late = duplicate = unknown = 0
    for event in history:
        if event[0] == "send":
            t.on_send(next_seq, now)
            sent_at[next_seq] = now
            next_seq += 1
        elif event[0] == "wait":
            now += float(event[1])  # type: ignore[arg-type]
        else:
            seq = int(event[1])  # type: ignore[call-overload]
            t.expire(now)
            for s, at in sent_at.items():  # the model's expiry: at or after the timeout
                if s not in replied and now - at >= timeout:
                    lost.add(s)
            outcome, _ = t.on_reply(seq, now)
            if seq not in sent_at:
                want = Outcome.UNKNOWN
                unknown += 1
            elif seq in replied:
                want = Outcome.DUPLICATE
                duplicate += 1
            elif seq in lost:
                want = Outcome.LATE
                late += 1
                replied.add(seq)
            else:
                want = Outcome.RECEIVED
                replied.add(seq)
                arrivals.append(seq)
            assert outcome is want, (event, history)
    reordered, expected = 0, 0
    for seq in arrivals:
        if seq < expected:
            reordered += 1
        else:
            expected = seq + 1
    assert (t.sent, t.received, t.late, t.duplicate, t.reordered) == (
        next_seq, len(arrivals), late, duplicate, reordered)  # fmt: skip
    t.expire_all()
    assert t.lost == next_seq - len(arrivals)
