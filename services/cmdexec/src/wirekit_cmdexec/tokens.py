"""Tokens: how they are made (``token new``), stored (a SHA-256 hash) and judged (an estimate of
their entropy: tokens under 128 bits are refused unless ``allow_weak_tokens`` is set)."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import string

__all__ = [
    "MIN_TOKEN_BITS",
    "hash_token",
    "new_token",
    "prepare_token_judge",
    "token_bits",
    "weak_token_problem",
]


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
    # zxcvbn judges at most _ZXCVBN_MAX characters at a time: a longer token is judged piece by
    # piece (so "a" * 110 is two repeats, not 72 characters of repeat and 38 of random).
    total = 0.0
    for start in range(0, len(token), _ZXCVBN_MAX):
        piece = token[start : start + _ZXCVBN_MAX]
        patterns = [
            m for m in zxcvbn.zxcvbn(piece)["sequence"]
            if m["pattern"] != "bruteforce" and len(m["token"]) >= PATTERN_MIN_CHARS
        ]  # fmt: skip
        in_patterns = sum(len(m["token"]) for m in patterns)
        if in_patterns <= HUMAN_SHARE * len(piece):
            total += len(piece) * per_char
        else:
            pattern_bits = sum(math.log2(max(float(m["guesses"]), 1.0)) for m in patterns)
            total += pattern_bits + (len(piece) - in_patterns) * per_char
    return total


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
