"""The settings base every service derives from: one pydantic-settings model per service.

Precedence, highest first: command-line flags, ``<PREFIX><NAME>`` environment variables,
``<PREFIX><NAME>_FILE`` (a path whose content is the value, as the official Docker images do),
a file named ``<prefix><name>`` in the secrets directory (Docker secrets: ``/run/secrets``), then
the field default. ``--help`` is generated from the same model, with each variable's name.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args

from pydantic import Field, IPvAnyNetwork, SecretBytes, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

__all__ = [
    "ServiceSettings",
    "SettingsLoadError",
    "TcpServiceSettings",
    "cpu_count",
    "load_settings",
    "metrics_port_field",
]

#: Where Docker (and Kubernetes, by convention) mounts secrets.
DEFAULT_SECRETS_DIR = "/run/secrets"


class SettingsLoadError(Exception):
    """Settings could not be loaded; the message is one line meant for the operator."""


class FileEnvSettingsSource(EnvSettingsSource):
    """Values from ``<PREFIX><NAME>_FILE``: the variable holds a path, the file holds the value."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        for _, env_name, _ in self._extract_field_info(field, field_name):
            path = self.env_vars.get(f"{env_name}_file")
            if path is not None:
                try:
                    value = Path(path).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise SettingsError(
                        f"{env_name.upper()}_FILE: cannot read {path}: {exc.strerror}"
                    ) from exc
                return value, env_name, False
        return None, field_name, False


def metrics_port_field(default: int) -> Any:
    """The ``metrics_port`` field with a service's own default port (the rest written once)."""
    return Field(default, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz.")


class ServiceSettings(BaseSettings):
    """Settings every wirekit service has. Subclasses set ``env_prefix`` and ``cli_prog_name``."""

    model_config = SettingsConfigDict(
        env_prefix="WIREKIT_",
        secrets_dir=DEFAULT_SECRETS_DIR,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
        cli_exit_on_error=False,
        extra="ignore",
        frozen=True,
    )

    #: Fields never taken from the command line (secrets: argv is readable by every user).
    cli_forbidden: ClassVar[frozenset[str]] = frozenset()
    #: Limits that hold for the whole instance: with N workers each worker enforces 1/N.
    per_instance: ClassVar[tuple[str, ...]] = ()
    #: The service reloads its configuration on SIGHUP (the supervisor forwards it to workers);
    #: for the others SIGHUP keeps its default action.
    reloads_on_sighup: ClassVar[bool] = False

    host: str = Field(
        "127.0.0.1",
        description="Address the service listens on (the images set 0.0.0.0).",
    )
    metrics_host: str | None = Field(
        None, description="Address of the metrics/health HTTP endpoint (default: host)."
    )
    metrics_port: int = metrics_port_field(0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe level logged (JSON lines on stderr)."
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="Event loop: uvloop when installed (auto), or the standard one."
    )
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Worker processes sharing the ports (SO_REUSEPORT) under one supervisor "
        "that serves the instance's metrics; auto = the CPUs this process may use (affinity "
        "and cgroup quota). Per-instance limits are divided among them.",
    )

    @property
    def metrics_bind(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host

    @property
    def worker_count(self) -> int:
        """``workers`` as a number (``auto`` resolved)."""
        return cpu_count() if self.workers == "auto" else self.workers

    @property
    def drain_grace_s(self) -> float:
        """How long open connections get to finish at shutdown (none for datagram services)."""
        return 0.0

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings, FileEnvSettingsSource(settings_cls)]
        secrets_dir = settings_cls.model_config.get("secrets_dir")
        if isinstance(secrets_dir, str) and Path(secrets_dir).is_dir():
            sources.append(file_secret_settings)  # absent outside containers: not an error
        return tuple(sources)

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> Self:
        """Parse flags, environment and files. ``--help`` prints and exits 0."""
        args = list(sys.argv[1:] if argv is None else argv)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name in cls.cli_forbidden:
            flag = f"--{name.replace('_', '-')}"
            if any(a == flag or a.startswith(flag + "=") for a in args):
                raise SettingsLoadError(
                    f"{flag} is not accepted on the command line (every user can read it): use "
                    f"{prefix}{name.upper()}, {prefix}{name.upper()}_FILE or a secret file"
                )
        try:
            return cls(_cli_parse_args=args)
        except ValidationError as exc:
            raise SettingsLoadError(cls._describe(exc)) from None
        except SettingsError as exc:
            cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            raise SettingsLoadError(_unechoed(f"invalid settings: {exc}{cause}")) from None

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        """The fields typed as secrets (``SecretStr``, ``SecretBytes``, optional or not)."""
        return frozenset(
            name for name, info in cls.model_fields.items() if _is_secret(info.annotation)
        )

    @classmethod
    def _describe(cls, exc: ValidationError) -> str:
        """One line for the operator: each problem with the value given, except a secret's.

        The value of a secret field is never shown, nor any error's input that holds one (a
        model-level check's input is every value at once), and any secret value found in those
        inputs is masked wherever else it appears in the line."""
        secret = cls.secret_fields()
        values: set[str] = set()
        problems = []
        for err in exc.errors():
            field_name = str(err["loc"][0]) if err["loc"] else ""
            given = err.get("input")
            text = f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            if not err["loc"]:  # a model-level check: its input is every value at once
                if isinstance(given, dict):
                    values.update(_secret_text(given.get(name)) for name in secret)
            elif field_name in secret:
                values.add(_secret_text(given))
            else:
                text += f" (got {given!r})"
            problems.append(text)
        line = "invalid settings: " + "; ".join(problems)
        for value in sorted(values, key=len, reverse=True):
            if len(value) >= _MASK_MIN:
                line = line.replace(value, _MASK)
        return line


#: What stands for a secret's value in messages (pydantic's own mask).
_MASK = "**********"
#: Shorter values are not masked inside other words (a secret "t" would mask every t): they
#: cannot be told apart from the message's own text, nor kept secret by any message.
_MASK_MIN = 6


_UNRECOGNIZED = "unrecognized arguments:"


def _unechoed(message: str) -> str:
    """The command line's words argparse did not know, without their values: ``--toke=X`` or
    ``--tok X`` may be a secret mistyped (the flag names are kept, the values masked)."""
    head, found, tail = message.partition(_UNRECOGNIZED)
    if not found:
        return message
    words = [w.split("=", 1)[0] + ("=" + _MASK if "=" in w else "") if w.startswith("-")
             else _MASK for w in tail.split()]  # fmt: skip
    return f"{head}{found} {' '.join(words)}"


def _is_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, (SecretStr, SecretBytes)):
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def _secret_text(value: object) -> str:
    """A secret's value as it could appear in a message ("" when there is none to mask)."""
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def cpu_count() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (what
    ``workers = "auto"`` means)."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


class TcpServiceSettings(ServiceSettings):
    """The settings of a TCP service: connection limits and timeouts (echo, cmdexec)."""

    per_instance: ClassVar[tuple[str, ...]] = ("limit_connections", "limit_connections_per_source")

    limit_connections: int = Field(
        1024,
        ge=1,
        description="Open connections per listener; one more is accepted, closed and counted.",
    )
    limit_connections_per_source: int = Field(
        64,
        ge=1,
        description="Open connections per listener from one source address (IPv6: one /64); "
        "one more is accepted, closed and counted. Raise it behind a proxy or NAT.",
    )
    timeout_idle_s: float = Field(
        60.0,
        gt=0,
        description="A connection that sends nothing for this long (even mid-frame) is closed.",
    )
    timeout_frame_s: float = Field(
        120.0,
        gt=0,
        description="A frame must be complete this long after its first byte arrived, or the "
        "connection is reset (1 MiB at 128 kbit/s takes 66 s).",
    )
    timeout_drain_s: float = Field(
        8.0,
        ge=0,
        description="On SIGTERM/SIGINT: time open connections get to finish before being closed.",
    )
    proxy_protocol: Literal["off", "v1", "v2", "any"] = Field(
        "off",
        description="Behind a load balancer that sends the PROXY protocol (HAProxy send-proxy "
        "or send-proxy-v2, nginx stream, Envoy, cloud load balancers): the header version "
        "expected before each connection's first byte (any: v1 or v2). The client it names is "
        "then the address of every limit, log, span and audit record. Needs proxy_trusted.",
    )
    proxy_trusted: list[IPvAnyNetwork] = Field(
        default=[],
        description="Networks (CIDRs, JSON list) of the proxies allowed to send the header; a "
        "connection from any other address is closed (it could choose its address).",
    )
    timeout_proxy_header_s: float = Field(
        3.0,
        gt=0,
        description="A connection must have sent its complete PROXY header within this time.",
    )

    @model_validator(mode="after")
    def _proxies_named(self) -> Self:
        if self.proxy_protocol != "off" and not self.proxy_trusted:
            raise ValueError(
                "proxy_protocol needs proxy_trusted: the networks of the proxies that may "
                "send the header (a header from anyone else would let them pick an address)"
            )
        return self

    @property
    def drain_grace_s(self) -> float:
        return self.timeout_drain_s


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Load ``cls`` or exit 2 with one clear line on stderr (never a traceback)."""
    try:
        return cls.load(argv)
    except SettingsLoadError as exc:
        print(f"{cls.model_config.get('cli_prog_name') or 'wirekit'}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
