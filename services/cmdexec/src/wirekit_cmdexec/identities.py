"""Who a client is and what it may do: named identities, each with its credentials (token
hashes, client-certificate names) and its own policy, read from one YAML file and validated
with clear errors that name the file's line.

The file (``policy_file``; a complete example is ``deploy/cmdexec-policy.example.yaml``)::

    version: 1
    identities:
      deploy:
        tokens: ["sha256:<64 hex>"]      # wirekit-cmdexec token new prints one
        certificates: ["CN=deploy-bot"]  # or "DNS:name", "email:addr", "URI:uri" (mTLS)
        sources: [10.0.0.0/8]            # where it may connect from (default: anywhere)
        allow: [uname, /usr/local/bin/deploy]
        arg_patterns: {deploy: "[a-z0-9-]+"}
        allow_shell: false
        timeout_run_s: 60
        limit_output_bytes: 1048576
        limit_runs: 2                    # commands of this identity running at once
        workdir: /srv
        child_env: {DEPLOY_ENV: prod}

A policy field has the name of the server setting it overrides, and one left out takes that
setting (``allow``, ``arg_patterns``, ``allow_shell``, ``timeout_run_s``, ``limit_output_bytes``,
``limit_runs``, ``workdir``, ``child_env``; ``shell`` and ``env`` are read as ``allow_shell``
and ``child_env``). Tokens are stored as SHA-256 hashes only: tokens are random and
long (``token new`` makes 256-bit ones), so a fast hash is as safe as a slow one and costs
nothing per login. Without a policy file, the ``token`` setting means one identity,
``default``, with the server's settings as its policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from .errors import Forbidden
from .policy import Policy
from .runner import RunLimits
from .settings import CmdexecSettings
from .tokens import hash_token
from .tokens import new_token as new_token  # where earlier releases had it

TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")
CERT_NAME = re.compile(r"(CN=|DNS:|email:|URI:).+")
IdentityName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
#: The identity of the ``token`` setting when there is no policy file.
DEFAULT_IDENTITY = "default"


def _token_hash(value: str) -> str:
    if not TOKEN_HASH.fullmatch(value):
        raise ValueError(
            "a token is stored as its hash, 'sha256:' and 64 lowercase hex digits "
            "(wirekit-cmdexec token new prints one)"
        )
    return value


def _certificate_name(value: str) -> str:
    if not CERT_NAME.fullmatch(value):
        raise ValueError(f"{value!r}: a certificate name starts with CN=, DNS:, email: or URI:")
    return value


TokenHash = Annotated[str, AfterValidator(_token_hash)]
CertificateName = Annotated[str, AfterValidator(_certificate_name)]


class IdentityPolicy(BaseModel):
    """One identity in the file. A field has the name of the server setting it overrides;
    ``shell`` and ``env`` (the first spelling of ``allow_shell`` and ``child_env``) are read
    too."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    tokens: list[TokenHash] = []
    certificates: list[CertificateName] = []
    sources: list[IPvAnyNetwork] | None = None
    allow: list[str] | None = None
    arg_patterns: dict[str, str] | None = None
    # Strict: `allow_shell: "yes"` or `limit_runs: "2"` is a mistake to point out, not to guess.
    allow_shell: StrictBool | None = Field(
        None, validation_alias=AliasChoices("allow_shell", "shell")
    )
    timeout_run_s: Annotated[float, Field(gt=0)] | None = None
    limit_output_bytes: Annotated[StrictInt, Field(ge=0)] | None = None
    limit_runs: Annotated[StrictInt, Field(ge=1)] | None = None
    workdir: str | None = None
    child_env: dict[str, str] | None = Field(
        None, validation_alias=AliasChoices("child_env", "env")
    )

    @field_validator("arg_patterns")
    @classmethod
    def _patterns(cls, patterns: dict[str, str] | None) -> dict[str, str] | None:
        for name, pattern in (patterns or {}).items():
            try:
                re.compile(pattern)
            except re.error as exc:
                msg = f"arg_patterns[{name!r}] is not a regular expression: {exc}"
                raise ValueError(msg) from None
        return patterns


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    identities: Annotated[dict[IdentityName, IdentityPolicy], Field(min_length=1)]


class PolicyFileError(Exception):
    """The policy file cannot be used; the message names the file and line of each problem."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (a second identity of the same
    name would silently replace the first), and where only true and false are booleans (as in
    YAML 1.2): `allow: [yes]` is the `yes` command, not True."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _line_of(root: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (its deepest ancestor
    that exists: a missing field is reported where its mapping is)."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
            if node is None:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            break
    if node is not None:
        line = node.start_mark.line + 1
    return line


def parse_policy(text: str, source: str = "<policy>") -> PolicyFile:
    """Validate a policy file's text; :class:`PolicyFileError` names every problem's line."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PolicyFileError(f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{source}: {exc}") from None
    try:
        policy = PolicyFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            line = _line_of(root, err["loc"])
            path = ".".join(str(p) for p in err["loc"]) or "(top)"
            where = f"{source}:{line}" if line else source
            problems.append(f"{where}: {path}: {err['msg']}")
        raise PolicyFileError("; ".join(problems)) from None
    _check_unique_credentials(policy, source)
    return policy


def _check_unique_credentials(policy: PolicyFile, source: str) -> None:
    owner: dict[str, str] = {}
    for name, ident in policy.identities.items():
        for credential in (*ident.tokens, *ident.certificates):
            if credential in owner and owner[credential] != name:
                shown = credential if not credential.startswith("sha256:") else "a token hash"
                raise PolicyFileError(
                    f"{source}: {shown} belongs to both {owner[credential]!r} and {name!r}"
                )
            owner[credential] = name


def load_policy_file(path: str) -> tuple[PolicyFile, str]:
    """The validated file and the SHA-256 of its bytes (what the info metric shows)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise PolicyFileError(f"{path}: not UTF-8") from None
    return parse_policy(text, path), hashlib.sha256(raw).hexdigest()


@dataclass
class Identity:
    name: str
    policy: Policy
    limits: RunLimits
    limit_runs: int
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None
    credentials: frozenset[str]  # token hashes and certificate names

    def check_source(self, address: str) -> None:
        if self.sources is None:
            return
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise Forbidden(f"identity {self.name!r} may not connect from {address}") from None
        if not any(ip in net for net in self.sources):
            raise Forbidden(f"identity {self.name!r} may not connect from {address}")


def _identity(
    name: str, spec: IdentityPolicy, d: CmdexecSettings, share: Callable[[int], int]
) -> Identity:
    def pick(field: str) -> Any:
        """The identity's own value of ``field``, else the server's."""
        own = getattr(spec, field)
        return getattr(d, field) if own is None else own

    workdir = pick("workdir")
    limits = RunLimits(
        timeout_run_s=pick("timeout_run_s"),
        limit_output_bytes=pick("limit_output_bytes"),
        limit_output_action=d.limit_output_action,
        child_env={"PATH": d.child_path, "LANG": "C.UTF-8", "HOME": workdir, **pick("child_env")},
        workdir=workdir,
    )
    policy = Policy(pick("allow"), pick("arg_patterns"), d.child_path, pick("allow_shell"))
    runs = d.limit_runs if spec.limit_runs is None else share(spec.limit_runs)
    sources = None if spec.sources is None else tuple(spec.sources)
    return Identity(name, policy, limits, runs, sources,
                    frozenset((*spec.tokens, *spec.certificates)))  # fmt: skip


@dataclass
class Identities:
    """The identities in force: looked up by token hash or certificate name at AUTH, by name
    for every EXEC (so that a reload applies to the next EXEC of an open connection)."""

    by_name: dict[str, Identity]
    sha256: str  # of the policy file, or of the token setting's hash without one
    _by_credential: dict[str, Identity] = field(init=False)

    def __post_init__(self) -> None:
        self._by_credential = {c: i for i in self.by_name.values() for c in i.credentials}

    def by_token(self, token: str) -> Identity | None:
        return self._by_credential.get(hash_token(token))

    def by_certificate(self, names: Iterable[str]) -> list[Identity]:
        found = {self._by_credential[n].name: self._by_credential[n]
                 for n in names if n in self._by_credential}  # fmt: skip
        return list(found.values())

    @classmethod
    def from_file(
        cls, policy: PolicyFile, sha256: str, d: CmdexecSettings, share: Callable[[int], int]
    ) -> Identities:
        """``share``: an identity's ``limit_runs`` for this worker (the server's settings are
        divided already; see wirekit_servicekit.worker)."""
        return cls({n: _identity(n, s, d, share) for n, s in policy.identities.items()}, sha256)

    @classmethod
    def single(cls, token: str, d: CmdexecSettings) -> Identities:
        """No policy file: the ``token`` setting is identity ``default`` with the settings."""
        digest = hash_token(token)
        ident = _identity(DEFAULT_IDENTITY, IdentityPolicy(tokens=[digest]), d, lambda n: n)
        return cls({DEFAULT_IDENTITY: ident}, hashlib.sha256(digest.encode()).hexdigest())


def certificate_names(peercert: Mapping[str, Any] | None) -> list[str]:
    """The names a verified client certificate can be known by: ``CN=`` of its subject, and
    its subjectAltName entries as ``DNS:``, ``email:``, ``URI:``."""
    if not peercert:
        return []
    names = [f"CN={value}" for rdn in peercert.get("subject", ()) for key, value in rdn
             if key == "commonName"]  # fmt: skip
    names += [f"{kind}:{value}" for kind, value in peercert.get("subjectAltName", ())
              if kind in ("DNS", "email", "URI")]  # fmt: skip
    return names
