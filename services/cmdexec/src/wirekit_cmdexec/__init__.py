"""wirekit_cmdexec: remote command execution over TCP, safe by default."""

__version__ = "0.1.0"
