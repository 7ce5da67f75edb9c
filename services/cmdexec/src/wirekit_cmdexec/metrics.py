"""cmdexec's metrics: runs, output, logins, identities, reloads, the limiter's state."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from wirekit_servicekit import ConnectionMetrics, HotCounter

from .identities import Identities

__all__ = ["AUTH_FAILURES", "RESULTS", "CmdexecMetrics"]

#: The ``result`` label of the run counters.
RESULTS = ("ok", "nonzero", "signal", "timeout", "output_cap", "aborted", "denied", "error")
#: The ``reason`` label of cmdexec_auth_failures_total.
AUTH_FAILURES = ("token", "protocol", "timeout", "rate_limited", "source", "tls", "weak_token")
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class CmdexecMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        under_attack: Callable[[], float],
        sources: Callable[[], float],
        limited_sources: Callable[[], float],
    ) -> None:
        ns = "cmdexec"
        self.connections = ConnectionMetrics(ns, registry, [])
        self.runs = Counter(
            "runs", "Commands requested, by result.", ["result"], namespace=ns, registry=registry
        )
        self.duration = Histogram(
            "run_duration_seconds", "Wall time of commands that ran.",
            buckets=DURATION_BUCKETS, namespace=ns, registry=registry,
        )  # fmt: skip
        self.output = Counter(
            "output_bytes", "Command output sent to clients.", ["stream"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.auth_failures = Counter(
            "auth_failures", "Connections refused before AUTH succeeded, by reason.", ["reason"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        # With workers: each worker has its own limiter; the instance is under attack when one
        # of them is (max); sources are summed.
        Gauge(
            "auth_under_attack", "1 while failed logins from all sources together are over "
            "auth_failure_burst (failures answered after auth_failure_delay_attack_s).",
            namespace=ns, registry=registry, multiprocess_mode="livemax",
        ).set_function(under_attack)  # fmt: skip
        Gauge(
            "auth_sources", "Source addresses (IPv6: /64s) with failed logins remembered.",
            namespace=ns, registry=registry,
        ).set_function(sources)  # fmt: skip
        Gauge(
            "auth_limited_sources", "Sources refused at their last attempt because they had "
            "spent their budget of failed logins (rate_limited).",
            namespace=ns, registry=registry,
        ).set_function(limited_sources)  # fmt: skip
        self.active = Gauge("runs_active", "Commands running now.", namespace=ns, registry=registry)
        self.errors = Counter(
            "protocol_errors", "ERROR messages sent, by code.", ["code"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.identity_runs = Counter(
            "identity_runs", "Commands requested, by identity (from the configuration) and "
            "result.", ["identity", "result"], namespace=ns, registry=registry,
        )  # fmt: skip
        self.identity_logins = Counter(
            "identity_logins", "Successful AUTHs, by identity.", ["identity"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"],
            namespace=ns, registry=registry,
        )  # fmt: skip
        self.config = Info(
            "config", "The configuration in force: SHA-256 of the policy file (or of the "
            "token's hash without one) and of the TLS files.", namespace=ns, registry=registry,
        )  # fmt: skip
        self.killed = HotCounter(
            "processes_killed", "Processes killed because they outlived their run or left it "
            "(background children, setsid daemons).", namespace=ns, registry=registry,
        ).labels()  # fmt: skip
        # Every series exists from the start, at 0: rate() and alerts see the first event.
        for result in RESULTS:
            self.runs.labels(result)
        for reason in AUTH_FAILURES:
            self.auth_failures.labels(reason)
        for code in ("unauthorized", "bad_request", "too_large", "forbidden", "busy"):
            self.errors.labels(code)
        for result in ("ok", "error"):
            self.reloads.labels(result)

    def known(self, identities: Identities, tls_sha256: str) -> None:
        """Series for every configured identity, at 0; the info metric for this config."""
        for name in identities.by_name:
            self.identity_logins.labels(name)
            for result in RESULTS:
                self.identity_runs.labels(name, result)
        self.config.info({"policy_sha256": identities.sha256, "tls_sha256": tls_sha256})

    def ran(self, identity: str | None, result: str) -> None:
        """One command requested, by result, and by identity when it is a configured one."""
        self.runs.labels(result).inc()
        if identity is not None:
            self.identity_runs.labels(identity, result).inc()
