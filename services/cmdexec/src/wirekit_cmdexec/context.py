"""What every cmdexec connection shares: the configuration in force, the limiter, the run
slots, metrics and tracer."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field

from opentelemetry import trace
from prometheus_client import Counter

from wirekit_servicekit import ConnectionHub

from .auth import AuthGuard
from .containment import containment
from .errors import Busy
from .identities import Identities, Identity
from .messages import Kind
from .metrics import CmdexecMetrics
from .runner import Spawner
from .tokens import weak_token_problem

__all__ = ["CmdexecContext"]

#: Token hashes judged at login (strong or not), at most this many remembered.
_JUDGED_TOKENS = 1024


@dataclass
class CmdexecContext:
    """``identities`` and ``tls`` are replaced as a whole by a reload: a connection reads them
    when it authenticates and at each EXEC."""

    identities: Identities
    tls: ssl.SSLContext | None
    spawner: Spawner
    guard: AuthGuard
    max_frame_size: int
    limit_auth_bytes: int
    limit_exec_bytes: int
    limit_runs: int
    timeout_auth_s: float
    timeout_write_s: float
    allow_weak_tokens: bool
    metrics: CmdexecMetrics
    tracer: trace.Tracer
    hub: ConnectionHub
    running: int = 0
    running_by_identity: dict[str, int] = field(default_factory=dict)
    #: Token hash -> why the token is too weak ("" when strong): judged once per token.
    weak: dict[str, str] = field(default_factory=dict)
    output: dict[Kind, Counter] = field(init=False)
    _killed_before: int = field(init=False)

    def __post_init__(self) -> None:
        # Children bound once: no label lookup per output chunk.
        self.output = {
            Kind.STDOUT: self.metrics.output.labels("stdout"),
            Kind.STDERR: self.metrics.output.labels("stderr"),
        }
        self._killed_before = containment().killed  # the process may have served before

    def weak_token(self, token: str, credential: str) -> str:
        """Why a token that matched an identity may not be used ("" when it may): tokens in a
        policy file are hashes, so their strength is judged at their first login."""
        if self.allow_weak_tokens:
            return ""
        problem = self.weak.get(credential)
        if problem is None:
            if len(self.weak) >= _JUDGED_TOKENS:
                self.weak.clear()
            problem = self.weak[credential] = weak_token_problem(token) or ""
        return problem

    @contextlib.contextmanager
    def run_slot(self, identity: Identity) -> Iterator[None]:
        """One of ``limit_runs`` (server-wide) and of the identity's own ``limit_runs``, held
        while its command runs; Busy when none is free."""
        if self.running >= self.limit_runs:
            raise Busy(f"{self.limit_runs} commands are running; retry later")
        if self.running_by_identity.get(identity.name, 0) >= identity.limit_runs:
            raise Busy(f"{identity.limit_runs} commands of {identity.name!r} are running; "
                       "retry later")  # fmt: skip
        self.running += 1
        self.running_by_identity[identity.name] = self.running_by_identity.get(identity.name, 0) + 1
        self.metrics.active.inc()
        try:
            yield
        finally:
            self.running -= 1
            self.running_by_identity[identity.name] -= 1
            self.metrics.active.dec()

    def count_kills(self) -> None:
        """cmdexec_processes_killed_total: the sweeps' kills since this service started."""
        self.metrics.killed.n = containment().killed - self._killed_before
