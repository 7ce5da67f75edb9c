"""Helpers for the integration tests (importable: ``tests/`` is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families
from testcontainers.core.container import DockerContainer

#: The token of the in-process cmdexec servers of the unit tests.
CMDEXEC_TOKEN = "test-ZgWnryHrrF6Su8naDxGCnqSE7aaMaVpN"  # strong: weak ones are refused
#: The project's one version (the VERSION file; the images are labelled with it).
VERSION = (Path(__file__).resolve().parents[1] / "VERSION").read_text().strip()


def hardened(
    image: str,
    *ports: str,
    docker_kwargs: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **more_env: str,
) -> DockerContainer:
    """A container run as a careful operator would: read-only, no capabilities, no privilege
    escalation, the image's non-root user, ports published on 127.0.0.1 only."""
    container = (
        DockerContainer(image)
        .with_kwargs(
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            # Keep the image's HEALTHCHECK command; check every second instead of every 10 s.
            healthcheck={"interval": 1_000_000_000, "start_period": 1_000_000_000},
            **(docker_kwargs or {}),
        )
        .with_tmpfs_mount("/tmp", "size=16m")
    )
    for port in ports:
        # docker-py accepts (host_ip, host_port); None picks a free port.
        container.ports[port] = ("127.0.0.1", None)  # type: ignore[assignment]
    for key, value in {**(env or {}), **more_env}.items():
        container.with_env(key, value)
    return container


def host_port(container: DockerContainer, port: str) -> int:
    return int(container.get_exposed_port(port))  # type: ignore[arg-type]


def wait_until(predicate: Callable[[], Any], limit_s: float, what: str) -> Any:
    """Poll (bounded) until ``predicate()`` is truthy; return its value."""
    end = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes (``MSG_WAITALL`` is not reliable on sockets with a timeout)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"end of stream after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def free_port() -> int:
    """A currently free TCP port on loopback (for servers that cannot report their own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200. (A TCP connect proves nothing: docker-proxy accepts first.)"""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_ready(container: DockerContainer, metrics_port: str = "9700/tcp") -> None:
    port = host_port(container, metrics_port)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 30, "the service's /readyz")


def make_test_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate (localhost, 127.0.0.1) and a client certificate,
    made with Debian's openssl. Returns the paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    p = {n: directory / n for n in ("ca.key", "ca.pem", "server.key", "server.pem",
                                    "client.key", "client.pem")}  # fmt: skip

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *key, "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]),
            "-days", "2", "-subj", "/CN=wirekit test CA")  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        csr, extfile = directory / f"{name}.csr", directory / f"{name}.ext"
        extfile.write_text(ext + "\n")
        openssl("req", *key, "-keyout", str(p[f"{name}.key"]), "-out", str(csr),
                "-subj", f"/CN=wirekit test {name}")  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]), "-CAkey",
                str(p["ca.key"]), "-CAcreateserial", "-out", str(p[f"{name}.pem"]),
                "-days", "2", "-extfile", str(extfile))  # fmt: skip
    for path in p.values():
        path.chmod(0o644)  # readable by a container's non-root user (throwaway keys)
    return p


def tool(name: str) -> str:
    """Path of a command the tests need: a skip on a laptop without it, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (see .ci/run for what to install)")
        pytest.skip(f"{name} not installed")
    return path


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.base}/api/v1/alerts", timeout=5) as resp:
            body = json.load(resp)
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    def equals(self, expr: str, want: float) -> Callable[[], bool]:
        """A predicate for :func:`wait_until`: the query's value is ``want``."""
        return lambda: self.value(expr) == want


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) trace receiver: decodes every request it gets."""

    def __init__(self, host: str) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces"
                if ok:
                    receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.endpoint = f"http://{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[dict[str, object], Span]]:
        """(resource attributes, span) for every span received so far."""
        out: list[tuple[dict[str, object], Span]] = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {
                    kv.key: otlp_value(kv.value) for kv in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    out.extend((resource, span) for span in scope_spans.spans)
        return out


def otlp_value(value: AnyValue) -> object:
    return getattr(value, value.WhichOneof("value") or "string_value")


def scrape(url: str, name: str, **labels: str) -> float:
    """One sample of the /metrics at ``url`` now (0 when the series does not exist yet)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def child_processes(parent: int | None = None) -> list[tuple[int, bytes, bytes]]:
    """(pid, state, name) of the direct children of ``parent`` (this process by default)."""
    parent = os.getpid() if parent is None else parent
    out: list[tuple[int, bytes, bytes]] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            name = raw[raw.index(b"(") + 1 : raw.rindex(b")")]
            fields = raw.rsplit(b")", 1)[1].split()
            if int(fields[1]) == parent:
                out.append((int(entry), fields[0], name))
    return out


@dataclass
class ServiceProcess:
    popen: subprocess.Popen[str]
    ports: dict[str, int]
    lines: list[str]  # its JSON log lines so far (collected in a thread)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}{path}"

    def value(self, name: str, **labels: str) -> float:
        """A sample of its /metrics now (0 when the series does not exist yet)."""
        return scrape(self.url("/metrics"), name, **labels)

    def wait_value(self, name: str, value: float, limit_s: float = 10.0, **labels: str) -> None:
        wait_until(lambda: self.value(name, **labels) == value, limit_s, f"{name}{labels}={value}")

    def assert_clean_log(self) -> None:
        """No traceback and nothing at ERROR or above in what it logged so far."""
        bad = [line for line in list(self.lines) if "Traceback" in line
               or json.loads(line).get("level") in ("ERROR", "CRITICAL")]  # fmt: skip
        assert not bad, "".join(bad)


#: How long a service process gets to say it is listening.
START_S = 30.0


@contextlib.contextmanager
def service_process(
    module: str, *args: str, env: dict[str, str] | None = None, wrap: Sequence[str] = ()
) -> Iterator[ServiceProcess]:
    """Run ``python -m module args`` (ports 0 where the caller says so); wait (at most
    ``START_S``) for its "listening" log line (the supervisor's, with ``--workers``); kill it at
    the end if the test did not stop it. Its stderr is read by a thread from the start.
    ``wrap``: a command line the process runs under (``unshare ...``), which execs the rest."""
    popen = subprocess.Popen([*wrap, sys.executable, "-m", module, *args], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, **(env or {})})  # fmt: skip
    assert popen.stderr is not None
    lines: list[str] = []
    ready: queue.Queue[dict[str, int] | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        said = False
        for line in stream:
            lines.append(line)
            if said or not line.startswith("{"):
                continue
            record = json.loads(line)
            if record.get("message") == "listening" and "worker" not in record:
                said = True
                ready.put(record["ports"])
        ready.put(None)  # the process ended (or closed stderr)

    reader = threading.Thread(target=read, args=(popen.stderr,), daemon=True)
    reader.start()
    try:
        try:
            ports = ready.get(timeout=START_S)
        except queue.Empty:
            ports = None
        assert ports, f"{module} did not start within {START_S:g} s: {lines}"
        yield ServiceProcess(popen, ports, lines)
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait(10)
        reader.join(5)
        popen.stderr.close()
