"""``wirekit-cmdexec``: run the remote-command service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import ssl
import sys
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import (
    Background,
    ConnectionHub,
    ConnectionLimits,
    Listener,
    serve_service,
    service_main,
)
from wirekit_servicekit.lifecycle import Part
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket

from . import __version__
from .containment import SWEEP_S, containment, make_undumpable
from .policy import Policy
from .protocol import AuthGuard, CmdexecContext, CmdexecMetrics, handler
from .runner import RunLimits, Spawner
from .settings import CmdexecSettings

NAME = "wirekit-cmdexec"
log = logging.getLogger("wirekit_cmdexec")
#: Largest buffered read of a connection's StreamReader.
_READ_LIMIT = 64 * 1024
#: Sources whose failed logins are remembered (the least recently seen forgotten first).
_AUTH_SOURCES = 10_000


def server_tls(settings: CmdexecSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
        ctx.load_verify_locations(settings.tls_client_ca_file)
    return ctx


def build_context(
    settings: CmdexecSettings, registry: CollectorRegistry, provider: TracerProvider
) -> CmdexecContext:
    if settings.token is not None and settings.token.get_secret_value():
        token = settings.token.get_secret_value()
    else:
        token = secrets.token_urlsafe(32)
        log.warning(
            "no token configured: generated one for this run (set WIREKIT_CMDEXEC_TOKEN or a "
            "secret to keep it)",
            extra={"token": token},
        )
    metrics = CmdexecMetrics(registry)
    rlimits = {"nproc": settings.rlimit_nproc, "cpu": settings.rlimit_cpu_s,
               "as": settings.rlimit_as_bytes}  # fmt: skip
    spawner = Spawner({k: v for k, v in rlimits.items() if v is not None}, settings.rlimit_wrapper)
    policy = Policy(
        settings.allow, settings.arg_patterns, settings.child_path, settings.allow_shell
    )
    box = containment()
    log.info(
        "commands",
        extra={"allow": policy.names, "allow_shell": settings.allow_shell,
               "rlimits": spawner.mode,
               "containment": "session sweep as child subreaper" if box.subreaper
               else "process group only (not a subreaper: escaped processes survive)"},
    )  # fmt: skip
    return CmdexecContext(
        token_digest=hashlib.sha256(token.encode()).digest(),
        policy=policy,
        limits=RunLimits(
            timeout_s=settings.timeout_run_s,
            output_bytes=settings.limit_output_bytes,
            output_action=settings.limit_output_action,
            env={
                "PATH": settings.child_path,
                "LANG": "C.UTF-8",
                "HOME": settings.workdir,
                **settings.child_env,
            },
            cwd=settings.workdir,
        ),
        spawner=spawner,
        guard=AuthGuard(
            per_source=SourceLimiter(
                settings.auth_failure_rate_per_source,
                settings.auth_failure_burst_per_source,
                _AUTH_SOURCES,
            ),
            overall=TokenBucket(settings.auth_failure_rate, settings.auth_failure_burst, 0.0),
            delay_s=settings.auth_failure_delay_s,
        ),
        max_frame_size=settings.max_frame_size,
        limit_auth_bytes=settings.limit_auth_bytes,
        limit_exec_bytes=settings.limit_exec_bytes,
        limit_runs=settings.limit_runs,
        timeout_auth_s=settings.timeout_auth_s,
        timeout_write_s=settings.timeout_write_s,
        metrics=metrics,
        tracer=provider.get_tracer("wirekit_cmdexec", __version__),
        hub=ConnectionHub(ConnectionLimits.from_settings(settings), metrics.connections),
    )


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


async def serve(
    settings: CmdexecSettings,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    use_pidfd_child_watcher()

    def build(registry: CollectorRegistry, provider: TracerProvider) -> list[Part]:
        svc = build_context(settings, registry, provider)
        callback = handler(svc)

        def factory() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(_READ_LIMIT), callback)

        async def sweep() -> None:
            """Escaped processes are killed while runs go on, not only when they end."""
            box = containment()
            while box.subreaper:
                await asyncio.sleep(SWEEP_S)
                box.sweep()
                svc.count_kills()

        listener = Listener("cmdexec", settings.host, settings.port, factory, svc.hub,
                            server_tls(settings))  # fmt: skip
        return [listener, Background("process sweep", sweep)]

    return await serve_service(
        settings, NAME, __version__, build,
        registry=registry, provider=provider, on_ready=on_ready, stop=stop,
    )  # fmt: skip


def refuse_unsafe_start(settings: CmdexecSettings) -> None:
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
    # Same-user commands must not read the token from our /proc files (environ, mem).
    make_undumpable()
    os.environ.pop("WIREKIT_CMDEXEC_TOKEN", None)


def main(argv: Sequence[str] | None = None) -> None:
    service_main(CmdexecSettings, NAME, __version__, serve, argv, check=refuse_unsafe_start)


if __name__ == "__main__":
    main()
