"""wirekit_udp: UDP echo (RFC 862) with defences against reflection and loops."""

from ._version import __version__

__all__ = ["__version__"]
