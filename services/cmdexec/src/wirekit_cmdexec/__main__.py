"""``wirekit-cmdexec``: run the remote-command service (``--help`` lists every setting)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import ssl
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import (
    ConnectionHub,
    ConnectionLimits,
    Listener,
    serve_service,
    service_main,
)

from . import __version__, runner
from .policy import Policy
from .protocol import CmdexecMetrics, Service, handle
from .runner import RunLimits
from .settings import CmdexecSettings

NAME = "wirekit-cmdexec"
log = logging.getLogger("wirekit_cmdexec")
#: Largest buffered read of a connection's StreamReader.
_READ_LIMIT = 64 * 1024
#: How often zombies that escaped their command's process group are looked for.
_STRAY_SWEEP_S = 5.0


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


def build_service(
    settings: CmdexecSettings, registry: CollectorRegistry, provider: TracerProvider
) -> Service:
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
    policy = Policy(
        settings.allow, settings.arg_patterns, settings.child_path, settings.allow_shell
    )
    log.info("allowlist", extra={"allow": policy.names, "allow_shell": settings.allow_shell})
    return Service(
        token_digest=hashlib.sha256(token.encode()).digest(),
        policy=policy,
        limits=RunLimits(
            timeout_s=settings.timeout_run_s,
            output_bytes=settings.limit_output_bytes,
            env={
                "PATH": settings.child_path,
                "LANG": "C.UTF-8",
                "HOME": settings.workdir,
                **settings.child_env,
            },
            cwd=settings.workdir,
            rlimits={k: v for k, v in rlimits.items() if v is not None},
        ),
        max_frame_size=settings.max_frame_size,
        limit_exec_bytes=settings.limit_exec_bytes,
        limit_runs=settings.limit_runs,
        auth_failure_delay_s=settings.auth_failure_delay_s,
        metrics=metrics,
        tracer=provider.get_tracer("wirekit_cmdexec", __version__),
        hub=ConnectionHub(ConnectionLimits.from_settings(settings), metrics.connections),
    )


async def serve(
    settings: CmdexecSettings,
    registry: CollectorRegistry | None = None,
    provider: TracerProvider | None = None,
    on_ready: Callable[[dict[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    background: list[asyncio.Future[None]] = []

    def build(registry: CollectorRegistry, provider: TracerProvider) -> list[Listener]:
        svc = build_service(settings, registry, provider)
        if runner.become_subreaper():
            background.append(asyncio.ensure_future(_sweep_strays(svc)))
        callback = functools.partial(handle, svc)

        def factory() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(_READ_LIMIT), callback)

        tls = server_tls(settings)
        return [Listener("cmdexec", settings.host, settings.port, factory, svc.hub, tls)]

    try:
        return await serve_service(
            settings, NAME, __version__, build,
            registry=registry, provider=provider, on_ready=on_ready, stop=stop,
        )  # fmt: skip
    finally:
        for task in background:
            task.cancel()


async def _sweep_strays(svc: Service) -> None:
    """As a subreaper, reap descendants that escaped their command's process group."""
    while True:
        await asyncio.sleep(_STRAY_SWEEP_S)
        runner.reap_strays(svc.pids)


def main(argv: Sequence[str] | None = None) -> None:
    service_main(CmdexecSettings, NAME, __version__, serve, argv)


if __name__ == "__main__":
    main()
