"""Every setting of the echo service: flags, ``WIREKIT_ECHO_*`` variables, ``*_FILE``, secrets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from wirekit_framing import DEFAULT_MAX_FRAME_SIZE, MAX_WIRE_FRAME_SIZE
from wirekit_servicekit import TcpServiceSettings
from wirekit_servicekit.settings import metrics_port_field


class EchoSettings(TcpServiceSettings):
    """wirekit echo: TCP echo (RFC 862). Raw mode returns bytes as they arrive (works with nc);
    framed mode returns each length-prefixed frame as one frame."""

    model_config = SettingsConfigDict(env_prefix="WIREKIT_ECHO_", cli_prog_name="wirekit-echo")

    mode: Literal["both", "raw", "framed"] = Field("both", description="Which listeners to open.")
    raw_port: int = Field(7000, ge=0, le=65535, description="Raw (RFC 862) echo port.")
    framed_port: int = Field(7001, ge=0, le=65535, description="Framed echo port.")
    metrics_port: int = metrics_port_field(9700)
    max_frame_size: int = Field(
        DEFAULT_MAX_FRAME_SIZE,
        ge=0,
        le=MAX_WIRE_FRAME_SIZE,
        description="Largest frame payload (framed mode); a larger header closes the connection.",
    )
