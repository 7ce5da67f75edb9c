"""wirekit_echo: TCP echo (RFC 862) in raw and length-framed modes."""

__version__ = "0.1.0"
