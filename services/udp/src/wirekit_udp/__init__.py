"""wirekit_udp: UDP echo (RFC 862) with defences against reflection and loops."""

__version__ = "0.1.0"
