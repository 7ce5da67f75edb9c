"""SIGHUP held from a service's first statement: hold, release, restore and held.

Every case runs in a child interpreter: the signal mask of the test process would otherwise
leak into the other tests. Each child starts from a known state (SIGHUP's default action,
unblocked, unless the case blocks it first), prints what it saw as JSON, and the test compares
all of it at once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

#: Run first in every child (but the import check): SIGHUP at its default, not blocked.
PRELUDE = """\
import json, os, signal, subprocess, sys
HUP = signal.SIGHUP
signal.signal(HUP, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {HUP})

def blocked():
    return HUP in signal.pthread_sigmask(signal.SIG_BLOCK, [])

def pending():
    return HUP in signal.sigpending()

def let_handlers_run():
    # Python runs a signal's handler at the next check of the eval loop: calls and loops.
    for _ in range(1000):
        blocked()

calls = []
def handler(signum, frame):
    calls.append(signum)

out = {}
"""


def _child(code: str, prelude: bool = True) -> subprocess.CompletedProcess[str]:
    source = (PRELUDE if prelude else "") + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=60
    )


def _report(code: str) -> dict[str, object]:
    """Run ``code`` (after the prelude), which fills ``out``; what it filled."""
    res = _child(textwrap.dedent(code) + "\nprint(json.dumps(out))\n")
    assert res.returncode == 0, res.stderr
    got: dict[str, object] = json.loads(res.stdout)
    return got


def test_without_hold_sighup_kills() -> None:
    """The control case: what hold() is for."""
    res = _child("""
        os.kill(os.getpid(), HUP)
        let_handlers_run()
        print("alive")
    """)
    assert (res.returncode, res.stdout) == (-signal.SIGHUP, "")


def test_hold_keeps_sighup_pending_and_release_takes_it() -> None:
    got = _report("""
        from wirekit_servicekit.reload import hold, release
        out["hold"] = hold()
        out["blocked"] = blocked()
        os.kill(os.getpid(), HUP)
        let_handlers_run()
        out["alive"] = True
        out["pending"] = pending()
        signal.signal(HUP, handler)
        out["release"] = release()
        let_handlers_run()
        out["handled_after_release"] = list(calls)  # taken by release(): not delivered
        out["blocked_after_release"] = blocked()
        out["pending_after_release"] = pending()
        os.kill(os.getpid(), HUP)  # unblocked now: the handler gets it
        let_handlers_run()
        out["handled_later"] = list(calls)
    """)
    assert got == {
        "hold": False,
        "blocked": True,
        "alive": True,
        "pending": True,
        "release": True,
        "handled_after_release": [],
        "blocked_after_release": False,
        "pending_after_release": False,
        "handled_later": [int(signal.SIGHUP)],
    }


def test_release_without_a_pending_sighup() -> None:
    got = _report("""
        from wirekit_servicekit.reload import hold, release
        out["hold"] = hold()
        signal.signal(HUP, handler)
        out["release"] = release()
        let_handlers_run()
        out["handled"] = list(calls)
        out["blocked"] = blocked()
        out["release_again"] = release()  # not blocked, nothing pending
        out["blocked_again"] = blocked()
    """)
    assert got == {
        "hold": False,
        "release": False,
        "handled": [],
        "blocked": False,
        "release_again": False,
        "blocked_again": False,
    }


@pytest.mark.parametrize("blocked_first", [False, True], ids=["unblocked", "blocked"])
def test_hold_then_restore_puts_the_block_back(blocked_first: bool) -> None:
    got = _report(f"""
        from wirekit_servicekit.reload import hold, restore
        if {blocked_first}:
            signal.pthread_sigmask(signal.SIG_BLOCK, {{HUP}})
        out["hold"] = hold()
        out["held"] = blocked()
        restore(out["hold"])
        out["after"] = blocked()
    """)
    assert got == {"hold": blocked_first, "held": True, "after": blocked_first}


def _sigblk_code(name: str) -> str:
    """Child code: start a grandchild, put whether its SIGHUP is blocked in ``out[name]``."""
    return f"""
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
        with open(f"/proc/{{p.pid}}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out["{name}"] = bool(int(fields["SigBlk"], 16) & (1 << (HUP - 1)))
        p.stdin.close()
        p.wait(timeout=30)
        """


@pytest.mark.parametrize("blocked_first", [False, True], ids=["unblocked", "blocked"])
def test_held_blocks_for_what_starts_inside(blocked_first: bool) -> None:
    code = textwrap.dedent(f"""
        from wirekit_servicekit.reload import held
        if {blocked_first}:
            signal.pthread_sigmask(signal.SIG_BLOCK, {{HUP}})
        out["before"] = blocked()
        """)
    code += textwrap.dedent(_sigblk_code("child_before"))
    code += "with held():\n"
    code += "    out['inside'] = blocked()\n"
    code += textwrap.indent(textwrap.dedent(_sigblk_code("child_inside")), "    ")
    code += "out['after'] = blocked()\n"
    code += textwrap.dedent(_sigblk_code("child_after"))
    got = _report(code)
    assert got == {
        "before": blocked_first,
        "child_before": blocked_first,
        "inside": True,
        "child_inside": True,
        "after": blocked_first,
        "child_after": blocked_first,
    }


def test_held_restores_when_an_exception_leaves_it() -> None:
    got = _report("""
        from wirekit_servicekit.reload import held
        try:
            with held():
                out["inside"] = blocked()
                raise KeyError("out")
        except KeyError:
            out["raised"] = True
        out["after"] = blocked()
    """)
    assert got == {"inside": True, "raised": True, "after": False}


def test_the_import_is_light() -> None:
    """hold() comes before anything slow: the import (and hold itself) loads none of it."""
    slow = ("typing", "contextlib", "threading", "pydantic", "opentelemetry", "prometheus_client")
    res = _child(
        f"""
        import sys
        import wirekit_servicekit.reload
        print(sorted(m for m in {slow!r} if m in sys.modules))
        wirekit_servicekit.reload.hold()
        print(sorted(m for m in {slow!r} if m in sys.modules))
        """,
        prelude=False,
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "[]\n[]\n", "")
