"""``wirekit-cmdexec``: run the remote-command service (``--help`` lists every setting)."""

from __future__ import annotations

from wirekit_servicekit.reload import hold

# Before the slow imports below (pydantic, OpenTelemetry: most of a second): a SIGHUP from now
# on waits for the reload handler instead of ending the process (see wirekit_servicekit.reload).
hold()

import asyncio
import hashlib
import logging
import logging.handlers
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from wirekit_servicekit import (
    Background,
    ConnectionHub,
    ConnectionLimits,
    Listener,
    Reload,
    serve_service,
    service_main,
)
from wirekit_servicekit.lifecycle import Part
from wirekit_servicekit.logs import TraceContextFilter, json_formatter
from wirekit_servicekit.ratelimit import SourceLimiter, TokenBucket
from wirekit_servicekit.workers import current

from . import __version__
from .containment import SWEEP_S, containment, make_undumpable
from .identities import (
    Defaults,
    Identities,
    PolicyFileError,
    hash_token,
    load_policy_file,
    new_token,
    prepare_token_judge,
    weak_token_problem,
)
from .protocol import AuthGuard, CmdexecContext, CmdexecMetrics, audit, handler
from .runner import Spawner
from .settings import CmdexecSettings

NAME = "wirekit-cmdexec"
log = logging.getLogger("wirekit_cmdexec")
#: Largest buffered read of a connection's StreamReader.
_READ_LIMIT = 64 * 1024


def server_tls(settings: CmdexecSettings) -> tuple[ssl.SSLContext | None, str]:
    """The TLS context from the files as they are now, and the SHA-256 of their bytes."""
    if not settings.tls_cert_file:
        return None, ""
    files = [settings.tls_cert_file, settings.tls_key_file or "", settings.tls_client_ca_file or ""]
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() if f else b"" for f in files))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
        ctx.load_verify_locations(settings.tls_client_ca_file)
    return ctx, digest.hexdigest()


def defaults(settings: CmdexecSettings) -> Defaults:
    return Defaults(
        allow=settings.allow, arg_patterns=settings.arg_patterns,
        allow_shell=settings.allow_shell, child_path=settings.child_path,
        child_env=settings.child_env, workdir=settings.workdir,
        timeout_s=settings.timeout_run_s, output_bytes=settings.limit_output_bytes,
        output_action=settings.limit_output_action, limit_runs=settings.limit_runs,
    )  # fmt: skip


def load_identities(settings: CmdexecSettings, token: str) -> Identities:
    """From the policy file when there is one (PolicyFileError if it is unusable), else the
    token as identity ``default``."""
    if settings.policy_file:
        policy, sha256 = load_policy_file(settings.policy_file)
        worker = current()
        return Identities.from_file(policy, sha256, defaults(settings),
                                    worker.count if worker else 1)  # fmt: skip
    return Identities.single(token, defaults(settings))


def configure_audit_log(settings: CmdexecSettings) -> None:
    """Audit events on their own logger: to ``audit_file`` (JSON lines, reopened when logrotate
    moves it) or to stderr, never through the operational log's handler."""
    handler: logging.Handler
    if settings.audit_file:
        handler = logging.handlers.WatchedFileHandler(settings.audit_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    worker = current()
    handler.setFormatter(json_formatter(NAME, worker.index if worker else None))
    handler.addFilter(TraceContextFilter())
    for old in list(audit.handlers):
        audit.removeHandler(old)
        old.close()
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def reload(svc: CmdexecContext, settings: CmdexecSettings) -> bool:
    """SIGHUP: the policy file and the TLS files again. Either all of it is taken or, on any
    error, none of it: the configuration in force stays, one error is logged."""
    try:
        identities = load_identities(settings, "") if settings.policy_file else svc.identities
        tls, tls_sha256 = server_tls(settings)
    except (PolicyFileError, OSError, ssl.SSLError) as exc:
        svc.metrics.reloads.labels("error").inc()
        log.error("configuration reload failed: the configuration in force is kept",
                  extra={"error": str(exc)})  # fmt: skip
        return False
    svc.identities, svc.tls = identities, tls
    svc.metrics.known(identities, tls_sha256)
    svc.metrics.reloads.labels("ok").inc()
    log.info("configuration reloaded", extra={
        "identities": sorted(identities.by_name), "policy_sha256": identities.sha256,
        "tls_sha256": tls_sha256})  # fmt: skip
    return True


def build_context(
    settings: CmdexecSettings, registry: CollectorRegistry, provider: TracerProvider
) -> CmdexecContext:
    token = ""
    if not settings.policy_file:
        if settings.token is not None and settings.token.get_secret_value():
            token = settings.token.get_secret_value()
            if settings.allow_weak_tokens and weak_token_problem(token):
                log.warning("the token is weak: accepted because allow_weak_tokens is set")
        else:
            token = new_token()
            log.warning(
                "no token configured: generated one for this run (set WIREKIT_CMDEXEC_TOKEN, "
                "a secret, or a policy file to keep it)",
                extra={"token": token},
            )
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
    metrics = CmdexecMetrics(registry, guard)
    if settings.policy_file and not settings.allow_weak_tokens:
        prepare_token_judge()  # tokens are judged at their first login: not in the loop's time
    rlimits = {"nproc": settings.rlimit_nproc, "cpu": settings.rlimit_cpu_s,
               "as": settings.rlimit_as_bytes}  # fmt: skip
    spawner = Spawner({k: v for k, v in rlimits.items() if v is not None}, settings.rlimit_wrapper)
    identities = load_identities(settings, token)
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
        identities=identities,
        tls=tls,
        spawner=spawner,
        guard=guard,
        max_frame_size=settings.max_frame_size,
        limit_auth_bytes=settings.limit_auth_bytes,
        limit_exec_bytes=settings.limit_exec_bytes,
        limit_runs=settings.limit_runs,
        timeout_auth_s=settings.timeout_auth_s,
        timeout_write_s=settings.timeout_write_s,
        allow_weak_tokens=settings.allow_weak_tokens,
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
        configure_audit_log(settings)

        def factory() -> asyncio.StreamReaderProtocol:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(_READ_LIMIT), callback)

        async def sweep() -> None:
            """Escaped processes are killed while runs go on, not only when they end."""
            box = containment()
            while box.subreaper:
                await asyncio.sleep(SWEEP_S)
                box.sweep()
                svc.count_kills()

        # TLS, when on, is started by each connection with the context in force then.
        listener = Listener("cmdexec", settings.host, settings.port, factory, svc.hub)
        return [listener, Background("process sweep", sweep),
                Reload(lambda: reload(svc, settings))]  # fmt: skip

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


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["token"]:
        raise SystemExit(token_command(args[1:]))
    service_main(CmdexecSettings, NAME, __version__, serve, argv, check=refuse_unsafe_start)


if __name__ == "__main__":
    main()
