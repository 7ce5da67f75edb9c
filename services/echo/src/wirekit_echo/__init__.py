"""wirekit_echo: TCP echo (RFC 862) in raw and length-framed modes."""

from ._version import __version__

__all__ = ["__version__"]
