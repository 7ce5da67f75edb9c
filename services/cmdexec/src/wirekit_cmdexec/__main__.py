"""``wirekit-cmdexec``: run the remote-command service (``--help`` lists every setting)."""

from __future__ import annotations

from wirekit_servicekit.reload import hold

if __name__ == "__main__":  # python -m wirekit_cmdexec (the console script: wirekit_cmdexec.main)
    # Before the slow imports below (pydantic, OpenTelemetry: most of a second): a SIGHUP from
    # now on waits for the reload handler instead of ending the process (see
    # wirekit_servicekit.reload). Not when imported (tests): their children would inherit it.
    hold()

import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Sequence

from pydantic import SecretStr

from wirekit_servicekit import (
    Background,
    ConnectionHub,
    ConnectionLimits,
    Listener,
    Part,
    Reload,
    Runtime,
    Service,
)
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from . import __version__, audit
from .auth import AuthGuard
from .config import load_identities, reload, server_tls
from .containment import SWEEP_S, containment, make_undumpable
from .context import CmdexecContext
from .identities import PolicyFileError, load_policy_file
from .metrics import CmdexecMetrics
from .protocol import handler
from .runner import Spawner
from .settings import CmdexecSettings
from .tokens import hash_token, new_token, prepare_token_judge, weak_token_problem

NAME = "wirekit-cmdexec"
log = logging.getLogger("wirekit_cmdexec")
#: Largest buffered read of a connection's StreamReader.
_READ_LIMIT = 64 * 1024


def _token(settings: CmdexecSettings) -> str:
    """The ``default`` identity's token without a policy file: the setting, or one generated
    for this run and logged once (as Jupyter does)."""
    if settings.token is not None and settings.token.get_secret_value():
        token = settings.token.get_secret_value()
        if settings.allow_weak_tokens and weak_token_problem(token):
            log.warning("the token is weak: accepted because allow_weak_tokens is set")
        return token
    token = new_token()
    log.warning("no token configured: generated one for this run (set WIREKIT_CMDEXEC_TOKEN, "
                "a secret, or a policy file to keep it)", extra={"token": token})  # fmt: skip
    return token


def build_context(runtime: Runtime[CmdexecSettings]) -> CmdexecContext:
    settings = runtime.settings
    token = "" if settings.policy_file else _token(settings)
    guard = AuthGuard(
        per_source=SourceLimiter(
            settings.auth_failure_rate_per_source,
            settings.auth_failure_burst_per_source,
            settings.limit_auth_sources,
        ),
        overall=TokenBucket(settings.auth_failure_rate, settings.auth_failure_burst, 0.0),
        delay_s=settings.auth_failure_delay_s,
        delay_attack_s=settings.auth_failure_delay_attack_s,
    )
    per_source = guard.per_source
    metrics = CmdexecMetrics(runtime.registry, guard.attacked_now,
                             per_source.__len__, lambda: per_source.limited)  # fmt: skip
    if settings.policy_file and not settings.allow_weak_tokens:
        prepare_token_judge()  # tokens are judged at their first login: not in the loop's time
    rlimits = {"nproc": settings.rlimit_nproc, "cpu": settings.rlimit_cpu_s,
               "as": settings.rlimit_as_bytes}  # fmt: skip
    spawner = Spawner({k: v for k, v in rlimits.items() if v is not None}, settings.rlimit_wrapper)
    identities = load_identities(settings, token, runtime.worker.share)
    tls, tls_sha256 = server_tls(settings)
    metrics.known(identities, tls_sha256)
    box = containment()
    log.info(
        "commands",
        extra={"identities": {n: i.policy.names for n, i in identities.by_name.items()},
               "policy_file": settings.policy_file, "rlimits": spawner.mode,
               "containment": "session sweep as child subreaper" if box.subreaper
               else "process group only (not a subreaper: escaped processes survive)"},
    )  # fmt: skip
    return CmdexecContext(
        identities=identities, tls=tls, spawner=spawner, guard=guard,
        max_frame_size=settings.max_frame_size, limit_auth_bytes=settings.limit_auth_bytes,
        limit_exec_bytes=settings.limit_exec_bytes, limit_runs=settings.limit_runs,
        timeout_auth_s=settings.timeout_auth_s, timeout_write_s=settings.timeout_write_s,
        allow_weak_tokens=settings.allow_weak_tokens, metrics=metrics, tracer=runtime.tracer,
        hub=ConnectionHub(ConnectionLimits.from_settings(settings), metrics.connections),
    )  # fmt: skip


def use_pidfd_child_watcher() -> None:
    """Python 3.11 watches each child from a thread of its own; a pidfd (Linux 5.3+) needs no
    thread: cheaper spawns, and no thread to create when a run has used up RLIMIT_NPROC (which
    counts the server's threads). Python 3.12+ does this by itself."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # kernel without pidfds
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


def build(runtime: Runtime[CmdexecSettings]) -> list[Part]:
    """The listener (TLS, when on, is started by each connection with the context in force
    then), the sweep of escaped processes, and the reload on SIGHUP."""
    use_pidfd_child_watcher()
    settings = runtime.settings
    svc = build_context(runtime)
    callback = handler(svc)
    worker = runtime.worker
    audit.configure(settings.audit_file, NAME, worker.index if worker.count > 1 else None)

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(_READ_LIMIT), callback)

    async def sweep() -> None:
        """Escaped processes are killed while runs go on, not only when they end."""
        box = containment()
        while box.subreaper:
            await asyncio.sleep(SWEEP_S)
            box.sweep()
            svc.count_kills()

    return [
        Listener("cmdexec", settings.host, settings.port, factory, svc.hub, tls_later=True),
        Background("process sweep", sweep),
        Reload(lambda: reload(svc, settings, worker.share)),
    ]


def refuse_unsafe_start(settings: CmdexecSettings) -> CmdexecSettings:
    """Before anything starts: no root unless meant; the token out of reach of commands."""
    if os.geteuid() == 0 and not settings.allow_root:
        print(
            "wirekit-cmdexec: refusing to run as root: commands would run as root and "
            "RLIMIT_NPROC is not enforced for root. Run it as an unprivileged user (the image "
            "does), or set WIREKIT_CMDEXEC_ALLOW_ROOT=true if you really mean it.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        Spawner({"cpu": 1}, settings.rlimit_wrapper)
    except FileNotFoundError as exc:
        print(f"wirekit-cmdexec: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    token = settings.token.get_secret_value() if settings.token is not None else ""
    problem = weak_token_problem(token) if token else None
    if problem is not None and not settings.allow_weak_tokens:
        print(f"wirekit-cmdexec: {problem} (or set WIREKIT_CMDEXEC_ALLOW_WEAK_TOKENS=true to "
              "accept it)", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    # The files a reload reads again: unusable at start is a clear error, not a traceback.
    try:
        if settings.policy_file:
            load_policy_file(settings.policy_file)
        server_tls(settings)
    except PolicyFileError as exc:
        print(f"wirekit-cmdexec: invalid policy file: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, ssl.SSLError) as exc:
        print(f"wirekit-cmdexec: unusable TLS files: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    # Same-user commands must not read the token from our /proc files (environ, mem).
    make_undumpable()
    os.environ.pop("WIREKIT_CMDEXEC_TOKEN", None)
    if settings.policy_file or (settings.token is not None and settings.token.get_secret_value()):
        return settings
    # No token: one for this run, made here, before workers are spawned (they all take it).
    return settings.model_copy(update={"token": SecretStr(_token(settings))})


def token_command(argv: Sequence[str]) -> int:
    """``wirekit-cmdexec token new``: a new token and the hash to put in the policy file;
    ``wirekit-cmdexec token hash``: the hash of a token read from stdin."""
    if list(argv) == ["new"]:
        token = new_token()
        print(f"token: {token}\nhash:  {hash_token(token)}")
        print("Give the token to the client (a file, or WIREKIT_CMDEXEC_TOKEN); put the hash "
              "in the identity's tokens: [...] in the policy file.", file=sys.stderr)  # fmt: skip
        return 0
    if list(argv) in (["hash"], ["hash", "--allow-weak"]):
        token = sys.stdin.readline().strip()
        if not token:
            print("wirekit-cmdexec token hash: no token on stdin", file=sys.stderr)
            return 2
        problem = weak_token_problem(token)
        if problem is not None and "--allow-weak" not in argv:
            print(f"wirekit-cmdexec token hash: {problem} (a server refuses it at login "
                  "unless it sets allow_weak_tokens; --allow-weak hashes it anyway)",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(hash_token(token))
        return 0
    print("usage: wirekit-cmdexec token new | wirekit-cmdexec token hash [--allow-weak] "
          "< token-file", file=sys.stderr)  # fmt: skip
    return 2


SERVICE = Service(NAME, __version__, CmdexecSettings, build, check=refuse_unsafe_start)
serve = SERVICE.serve  # the in-process entry point of earlier releases, for tests and embedders


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["token"]:
        raise SystemExit(token_command(args[1:]))
    SERVICE.main(argv)


if __name__ == "__main__":
    main()
