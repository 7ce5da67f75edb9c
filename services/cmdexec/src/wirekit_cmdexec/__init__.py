"""wirekit_cmdexec: remote command execution over TCP, safe by default."""

from ._version import __version__

__all__ = ["__version__", "main"]


def main() -> None:
    """The ``wirekit-cmdexec`` console script. SIGHUP is held first, before anything slow is
    imported (see :mod:`wirekit_servicekit.reload`): a reload signal in the first second of the
    process waits for the handler instead of ending it."""
    from wirekit_servicekit.reload import hold

    hold()
    from .__main__ import main as run

    run()
