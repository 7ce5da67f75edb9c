"""wirekit_cmdexec: remote command execution over TCP, safe by default."""

from ._version import __version__

__all__ = ["__version__"]
