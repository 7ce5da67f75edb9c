"""The configuration files: the policy file (identities) and the TLS files, read at start and
again on SIGHUP (all or nothing)."""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from .context import CmdexecContext
from .identities import Identities, PolicyFileError, load_policy_file
from .settings import CmdexecSettings

__all__ = ["load_identities", "reload", "server_tls"]

log = logging.getLogger("wirekit_cmdexec")


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


def load_identities(
    settings: CmdexecSettings, token: str, share: Callable[[int], int]
) -> Identities:
    """From the policy file when there is one (PolicyFileError if it is unusable), else the
    token as identity ``default``. ``share``: this worker's part of a per-identity limit."""
    if settings.policy_file:
        policy, sha256 = load_policy_file(settings.policy_file)
        return Identities.from_file(policy, sha256, settings, share)
    return Identities.single(token, settings)


def reload(svc: CmdexecContext, settings: CmdexecSettings, share: Callable[[int], int]) -> bool:
    """SIGHUP: the policy file and the TLS files again. Either all of it is taken or, on any
    error, none of it: the configuration in force stays, one error is logged."""
    try:
        identities = (load_identities(settings, "", share) if settings.policy_file
                      else svc.identities)  # fmt: skip
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
