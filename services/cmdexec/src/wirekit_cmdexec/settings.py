"""Every setting of cmdexec: flags, ``WIREKIT_CMDEXEC_*`` variables, ``*_FILE``, Docker secrets."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import CliSuppress, SettingsConfigDict

from wirekit_framing import DEFAULT_MAX_FRAME_SIZE, MAX_WIRE_FRAME_SIZE
from wirekit_servicekit import TcpServiceSettings
from wirekit_servicekit.settings import metrics_port_field

#: Harmless, read-only commands (uptime: `cat /proc/uptime`; procps is not in slim images).
#: `cat`, `ls`, `date`, `hostname` and `df` are limited by DEFAULT_ARG_PATTERNS.
DEFAULT_ALLOW = ["echo", "date", "uname", "hostname", "id", "df", "ls", "cat", "true"]
#: Every argument of these executables must match the pattern in full.
DEFAULT_ARG_PATTERNS = {
    "cat": r"/proc/(loadavg|uptime|meminfo|cpuinfo|version)|/etc/(hostname|os-release)",
    "ls": r"-[1aAlhF]+|/(?!.*\.\.)[A-Za-z0-9_./-]*",
    "date": r"-u|-R|--utc|-I[a-z]*|--iso-8601(=[a-z]+)?|\+[A-Za-z0-9%:._ -]*",
    "hostname": r"-[fsiIdA]",
    "df": r"-[hkPTl]+",
}


class CmdexecSettings(TcpServiceSettings):
    """wirekit cmdexec: remote command execution over TCP. Authenticated, allowlisted, no shell,
    limited in time, output and concurrency."""

    model_config = SettingsConfigDict(
        env_prefix="WIREKIT_CMDEXEC_", cli_prog_name="wirekit-cmdexec"
    )
    cli_forbidden: ClassVar[frozenset[str]] = frozenset({"token"})
    reloads_on_sighup: ClassVar[bool] = True
    per_instance: ClassVar[tuple[str, ...]] = (
        *TcpServiceSettings.per_instance, "limit_runs", "auth_failure_burst_per_source",
        "auth_failure_rate_per_source", "auth_failure_burst", "auth_failure_rate",
    )  # fmt: skip

    port: int = Field(7100, ge=0, le=65535, description="TCP port for clients.")
    metrics_port: int = metrics_port_field(9710)
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "asyncio",
        description="Event loop. asyncio by default: it spawns children ~3x faster (vfork).",
    )
    # Never a flag: the command line of a process is readable by every user of the machine.
    token: CliSuppress[SecretStr | None] = Field(
        None,
        description="Token clients must send (environment, *_FILE or secret; never a flag). "
        "Unset: a strong one is generated and logged once.",
    )
    policy_file: str | None = Field(
        None,
        description="YAML file of named identities: token hashes, client-certificate names and "
        "each one's policy (see the README). Reloaded on SIGHUP. Unset: the token setting is "
        "the one identity, 'default'.",
    )
    audit_file: str | None = Field(
        None,
        description="Append the audit events (JSON lines) to this file instead of stderr; "
        "reopened when rotated away.",
    )
    allow: list[str] = Field(
        default=list(DEFAULT_ALLOW),
        description="Executables that may run: names (looked up in child_path) or absolute paths.",
    )
    arg_patterns: dict[str, str] = Field(
        default=dict(DEFAULT_ARG_PATTERNS),
        description="Per executable name: a regex every argument must match in full.",
    )
    allow_shell: bool = Field(
        False, description="Allow EXEC with shell=true (/bin/sh -c STRING). Off: argv only."
    )
    child_path: str = Field(
        "/usr/local/bin:/usr/bin:/bin",
        description="PATH of children, and where allow names resolve.",
    )
    child_env: dict[str, str] = Field(
        default={},
        description="Extra environment of children (besides PATH, LANG, HOME). Never the server's.",
    )
    workdir: str = Field("/", description="Working directory of children.")
    timeout_run_s: float = Field(
        30.0, gt=0, description="Longest run; a client may ask for less, never more."
    )
    limit_output_bytes: int = Field(
        16 * 1024 * 1024, ge=0, description="Output sent per stream per run; the rest is dropped."
    )
    limit_runs: int = Field(
        8, ge=1, description="Commands running at once, server-wide; over: busy."
    )
    limit_output_action: Literal["end", "drop"] = Field(
        "end",
        description="When a stream passes limit_output_bytes: end the command (SIGKILL to its "
        "group; EXIT says output_capped) or drop the rest until it ends by itself.",
    )
    limit_auth_bytes: int = Field(
        4096, ge=64, le=MAX_WIRE_FRAME_SIZE,
        description="Largest frame before AUTH succeeded (the AUTH itself); over: unauthorized.",
    )  # fmt: skip
    timeout_auth_s: float = Field(
        5.0, gt=0, description="A new connection must have sent its AUTH within this time."
    )
    timeout_write_s: float = Field(
        15.0, gt=0,
        description="Longest wait for a client to take output (STDOUT, STDERR, EXIT); a client "
        "that reads nothing for this long is reset and its command killed.",
    )  # fmt: skip
    limit_exec_bytes: int = Field(
        64 * 1024, ge=64, description="Largest EXEC message (argv and options); over: too_large."
    )
    max_frame_size: int = Field(
        DEFAULT_MAX_FRAME_SIZE, ge=1024, le=MAX_WIRE_FRAME_SIZE,
        description="Largest frame accepted (STDIN chunks); over: too_large and close.",
    )  # fmt: skip
    rlimit_nproc: int | None = Field(
        256, ge=1,
        description="RLIMIT_NPROC of commands: processes (and threads) of the service's user.",
    )  # fmt: skip
    rlimit_cpu_s: int | None = Field(60, ge=1, description="RLIMIT_CPU of children, seconds.")
    rlimit_as_bytes: int | None = Field(
        2 * 1024**3, ge=1024**2, description="RLIMIT_AS (address space) of children, bytes."
    )
    rlimit_wrapper: Literal["auto", "wirekit-limits", "prlimit"] = Field(
        "auto",
        description="Exec wrapper that sets the rlimits before the command's first instruction: "
        "auto = wirekit-limits (in the image), else prlimit, else prlimit(2) right after spawn; "
        "naming one makes its absence an error at start.",
    )  # fmt: skip
    auth_failure_delay_s: float = Field(
        1.0, ge=0, description="Wait before answering a failed AUTH (slows guessing)."
    )
    auth_failure_burst_per_source: int = Field(
        10, ge=1, description="Failed logins a source address may make before it is limited."
    )
    auth_failure_rate_per_source: float = Field(
        0.1, gt=0,
        description="Failed logins per second a limited source regains; until then its "
        "attempts are refused without looking at the token.",
    )  # fmt: skip
    auth_failure_burst: int = Field(
        100, ge=1,
        description="Failed logins from all sources together before the service is under "
        "attack: failures are then answered after auth_failure_delay_attack_s (nobody is "
        "refused for it: sources within their own budget still get in).",
    )  # fmt: skip
    auth_failure_rate: float = Field(
        2.0, gt=0,
        description="Failed logins per second regained by all sources together; the attack "
        "is over once the whole burst is regained.",
    )  # fmt: skip
    auth_failure_delay_attack_s: float = Field(
        5.0, ge=0, description="Wait before answering a failed AUTH while under attack."
    )
    limit_auth_sources: int = Field(
        10_000, ge=1,
        description="Sources whose failed logins are remembered; the least recently failed "
        "is forgotten first (bounded memory under a spray from many addresses).",
    )  # fmt: skip
    allow_weak_tokens: bool = Field(
        False,
        description="Accept tokens under 128 bits of estimated entropy (refused by default, at "
        "start and at login: wirekit-cmdexec token new makes strong ones).",
    )
    allow_root: bool = Field(
        False,
        description="Start even as root (refused by default: commands would run as root, and "
        "the kernel does not enforce RLIMIT_NPROC for root).",
    )
    tls_cert_file: str | None = Field(None, description="PEM certificate chain: turns TLS on.")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mTLS)."
    )

    @model_validator(mode="after")
    def _one_source_of_identities(self) -> CmdexecSettings:
        if self.policy_file and self.token is not None:
            raise ValueError(
                "token and policy_file exclude each other: list the token's hash in the policy "
                "file (wirekit-cmdexec token hash < token-file)"
            )
        return self
