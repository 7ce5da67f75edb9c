"""A real DNS server for the tests: Debian's dnsmasq on loopback (package dnsmasq-base, which
.ci/check installs), answering only from the records a test gives it -- SRV, A and AAAA -- and
NXDOMAIN for any other name of its zone. dnsmasq reads SRV records from its configuration only
at start (SIGHUP re-reads hosts files, not them), so new answers mean a restart on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdata
from wirekit_testkit import tool

#: The zone the tests' names live in: dnsmasq answers it alone (``local=``), NXDOMAIN included.
ZONE = "wk.test"
#: How long dnsmasq gets to answer its first query, and to end on SIGTERM.
START_S = 10.0
STOP_S = 10.0


def srv(name: str, target: str, port: int, priority: int = 0, weight: int = 0) -> str:
    """An SRV record; dnsmasq puts the target's A and AAAA in the additional section."""
    return f"srv-host={name},{target},{port},{priority},{weight}"


def srv_bare(name: str, target: str, port: int) -> str:
    """An SRV record as opaque data: answered without an additional section (the resolver has
    to ask the target's addresses itself)."""
    wire = dns.rdata.from_text("IN", "SRV", f"0 0 {port} {target}.").to_wire()
    assert wire is not None
    return f"dns-rr={name},33,{wire.hex()}"


def host(name: str, *addresses: str) -> str:
    """A and AAAA records of ``name``."""
    return f"host-record={name},{','.join(addresses)}"


def free_udp_tcp_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


class DnsServer:
    """dnsmasq on 127.0.0.1:``port``; :meth:`serve` (re)starts it with new records."""

    def __init__(self, directory: Path) -> None:
        self.binary = tool("dnsmasq")
        self.directory = directory
        self.port = free_udp_tcp_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        """As dns_servers takes it."""
        return f"127.0.0.1:{self.port}"

    def serve(self, records: Sequence[str]) -> None:
        """Answer ``records`` from now on (a restart when it runs already)."""
        self.stop()
        self.starts += 1
        conf = self.directory / f"dnsmasq-{self.starts}.conf"
        conf.write_text("\n".join([f"local=/{ZONE}/", *records]) + "\n")
        log = self.directory / f"dnsmasq-{self.starts}.log"
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [self.binary, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                 f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                 f"--conf-file={conf}", "--pid-file=", "--log-facility=-"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        end = time.monotonic() + START_S
        query = dns.message.make_query(f"ready.{ZONE}", "A")
        while True:
            if self.popen.poll() is not None:
                raise AssertionError(f"dnsmasq ended at start: {log.read_text()}")
            try:
                dns.query.udp(query, "127.0.0.1", timeout=0.2, port=self.port)
                return  # an answer (NXDOMAIN): it serves
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > end:
                    raise AssertionError(f"dnsmasq did not answer: {log.read_text()}") from None

    def stop(self) -> None:
        """End it (the process this helper started, by its handle) and wait for it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_S)
        self.popen = None


@contextlib.contextmanager
def dns_server(directory: Path, records: Sequence[str]) -> Iterator[DnsServer]:
    server = DnsServer(directory)
    try:
        server.serve(records)
        yield server
    finally:
        server.stop()
