"""wirekit_probe: the sender the echo reflectors were missing -- loss, RTT, jitter,
reordering and hop count against RFC 862 echo targets."""

from ._version import __version__

__all__ = ["__version__"]
