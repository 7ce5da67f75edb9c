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
        shell: false
        timeout_run_s: 60
        limit_output_bytes: 1048576
        limit_runs: 2                    # commands of this identity running at once
        workdir: /srv
        env: {DEPLOY_ENV: prod}

A policy field left out takes the server's setting of the same meaning (``allow``,
``arg_patterns``, ``allow_shell``, ``timeout_run_s``, ``limit_output_bytes``, ``limit_runs``,
``workdir``, ``child_env``). Tokens are stored as SHA-256 hashes only: tokens are random and
long (``token new`` makes 256-bit ones), so a fast hash is as safe as a slow one and costs
nothing per login. Without a policy file, the ``token`` setting means one identity,
``default``, with the server's settings as its policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
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

TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")
CERT_NAME = re.compile(r"(CN=|DNS:|email:|URI:).+")
IdentityName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
#: The identity of the ``token`` setting when there is no policy file.
DEFAULT_IDENTITY = "default"


def hash_token(token: str) -> str:
    """The form a token is stored in: ``sha256:`` and the hex digest of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(token.encode(errors="surrogatepass")).hexdigest()


def new_token() -> str:
    """A new token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


#: Tokens estimated below this are refused (at start, by ``token hash`` and at login) unless
#: ``allow_weak_tokens`` is set: 2^128 guesses are out of reach from any number of addresses.
MIN_TOKEN_BITS = 128
#: Patterns of fewer characters are coincidences in random tokens ("a1b2" happens), not signs
#: of a human hand.
PATTERN_MIN_CHARS = 4
#: A token more than this share of whose characters zxcvbn finds in patterns (words, repeats,
#: sequences, dates, keyboard walks) is human-made. Random 128-bit tokens stay under it
#: (measured on 2,000 each: hex, base32, base64, 99th percentile at most 0.44).
HUMAN_SHARE = 0.5
#: The usual alphabets of random tokens, smallest first: a token is judged by the first that
#: holds every one of its characters.
_ALPHABETS = tuple(
    (size, frozenset(chars))
    for size, chars in (
        (10, string.digits),
        (16, "0123456789abcdef"),
        (16, "0123456789ABCDEF"),
        (32, string.ascii_uppercase + "234567="),  # base32 ("=": padding)
        (36, string.ascii_lowercase + string.digits),
        (62, string.ascii_letters + string.digits),
        (64, string.ascii_letters + string.digits + "-_="),  # base64url
        (64, string.ascii_letters + string.digits + "+/="),  # base64
        (95, string.printable[:95]),  # printable ASCII and space
    )
)
#: A UUID (8-4-4-4-12 hex digits): 122 random bits at most (version 4), whatever its form says.
_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_UUID_BITS = 122
#: zxcvbn judges at most this many characters (its own limit).
_ZXCVBN_MAX = 72


def token_bits(token: str) -> float:
    """Estimated entropy of a token, in bits.

    Each character is worth log2 of the smallest usual alphabet holding all of them (digits,
    hex, base32, alphanumeric, base64, printable ASCII; 95 for anything else), as in a random
    token of that form. zxcvbn (the estimator password managers use) then looks for human
    patterns: when more than ``HUMAN_SHARE`` of the characters lie in patterns of at least
    ``PATTERN_MIN_CHARS``, the token is human-made and each pattern is worth only zxcvbn's guess
    count for it (the rest stays at the alphabet's worth). ``token new``: 256 bits; ``openssl
    rand -hex 16``: 128; a UUID: 122 (what a version 4 UUID holds); ``correct horse battery
    staple``: about 86."""
    if not token:
        return 0.0
    if _UUID.fullmatch(token):
        return _UUID_BITS
    import zxcvbn  # 60 ms to import: only where tokens are judged

    chars = set(token)
    per_char = math.log2(next((n for n, alphabet in _ALPHABETS if chars <= alphabet), 95))
    judged = token[:_ZXCVBN_MAX]
    patterns = [
        m for m in zxcvbn.zxcvbn(judged)["sequence"]
        if m["pattern"] != "bruteforce" and len(m["token"]) >= PATTERN_MIN_CHARS
    ]  # fmt: skip
    in_patterns = sum(len(m["token"]) for m in patterns)
    if in_patterns <= HUMAN_SHARE * len(judged):
        return len(token) * per_char
    pattern_bits = sum(math.log2(max(float(m["guesses"]), 1.0)) for m in patterns)
    return pattern_bits + (len(token) - in_patterns) * per_char


def prepare_token_judge() -> None:
    """Import zxcvbn now (60 ms), not at the first token judged."""
    import zxcvbn  # noqa: F401


def weak_token_problem(token: str) -> str | None:
    """Why ``token`` is too weak to be safe against guessing, or None when it is strong."""
    bits = token_bits(token)
    if bits >= MIN_TOKEN_BITS:
        return None
    return (
        f"the token is too weak to be safe against guessing: about {bits:.0f} bits of entropy, "
        f"at least {MIN_TOKEN_BITS} are needed; make one with 'wirekit-cmdexec token new'"
    )


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
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[TokenHash] = []
    certificates: list[CertificateName] = []
    sources: list[IPvAnyNetwork] | None = None
    allow: list[str] | None = None
    arg_patterns: dict[str, str] | None = None
    # Strict: `shell: "yes"` or `limit_runs: "2"` is a mistake to point out, not to guess at.
    shell: StrictBool | None = None
    timeout_run_s: Annotated[float, Field(gt=0)] | None = None
    limit_output_bytes: Annotated[StrictInt, Field(ge=0)] | None = None
    limit_runs: Annotated[StrictInt, Field(ge=1)] | None = None
    workdir: str | None = None
    env: dict[str, str] | None = None

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


@dataclass(frozen=True)
class Defaults:
    """The server's settings an identity's policy falls back to."""

    allow: Sequence[str]
    arg_patterns: Mapping[str, str]
    allow_shell: bool
    child_path: str
    child_env: Mapping[str, str]
    workdir: str
    timeout_s: float
    output_bytes: int
    output_action: Literal["end", "drop"]
    limit_runs: int


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


def _identity(name: str, spec: IdentityPolicy, d: Defaults, share: int) -> Identity:
    env = dict(d.child_env if spec.env is None else spec.env)
    workdir = d.workdir if spec.workdir is None else spec.workdir
    limits = RunLimits(
        timeout_s=d.timeout_s if spec.timeout_run_s is None else spec.timeout_run_s,
        output_bytes=d.output_bytes if spec.limit_output_bytes is None else spec.limit_output_bytes,
        output_action=d.output_action,
        env={"PATH": d.child_path, "LANG": "C.UTF-8", "HOME": workdir, **env},
        cwd=workdir,
    )
    policy = Policy(
        d.allow if spec.allow is None else spec.allow,
        d.arg_patterns if spec.arg_patterns is None else spec.arg_patterns,
        d.child_path,
        d.allow_shell if spec.shell is None else spec.shell,
    )
    runs = d.limit_runs if spec.limit_runs is None else max(1, spec.limit_runs // share)
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
    def from_file(cls, policy: PolicyFile, sha256: str, d: Defaults, share: int) -> Identities:
        return cls({n: _identity(n, s, d, share) for n, s in policy.identities.items()}, sha256)

    @classmethod
    def single(cls, token: str, d: Defaults) -> Identities:
        """No policy file: the ``token`` setting is identity ``default`` with the settings."""
        digest = hash_token(token)
        ident = _identity(DEFAULT_IDENTITY, IdentityPolicy(tokens=[digest]), d, 1)
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
