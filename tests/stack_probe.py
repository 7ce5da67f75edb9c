"""Clients for the swarm stack test, run inside a container on the stack's overlay network
(tests/test_stack.py mounts this file into a probe container and runs it with `docker exec`).
Standard library and wirekit_framing only; every result is one JSON document on stdout.

  resolve NAME                   the addresses NAME resolves to
  query PROMQL                   Prometheus's instant query result (http://prometheus:9090)
  spread HOST PORT N             N raw echo connections, each to an address picked at random
                                 among those HOST resolves to: per address, connections answered
  udp HOST PORT                  one datagram to every address of HOST: addresses that answered
  framed HOST PORT CLIENTS SEED  reconnecting framed clients until stdin closes (see _client)
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from typing import Any

from wirekit_framing import FrameDecoder, encode

DEADLINE_S = 10.0  # every wait on a peer


def resolve(host: str, port: int = 0, kind: int = socket.SOCK_STREAM) -> list[str]:
    return sorted({str(a[4][0]) for a in socket.getaddrinfo(host, port, type=kind)})


def query(promql: str) -> Any:
    url = "http://prometheus:9090/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=DEADLINE_S) as r:
        return json.load(r)["data"]["result"]


def spread(host: str, port: int, n: int) -> dict[str, int]:
    """Each connection sends a line and reads it back: the address it reached, counted."""
    answered: Counter[str] = Counter()
    for i in range(n):
        address = random.choice(resolve(host, port))
        with socket.create_connection((address, port), timeout=DEADLINE_S) as s:
            line = f"hello {i}\n".encode()
            s.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            if got == line:
                answered[address] += 1
    return dict(answered)


def udp(host: str, port: int) -> list[str]:
    answered = []
    for address in resolve(host, port, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2.0)
            for attempt in range(3):  # a datagram may be lost; ask again
                payload = f"ping {address} {attempt}".encode()
                s.sendto(payload, (address, port))
                try:
                    if s.recvfrom(2048)[0] == payload:
                        answered.append(address)
                        break
                except TimeoutError:
                    continue
    return answered


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.peers: set[str] = set()
        self.errors: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def _client(host: str, port: int, seed: int, stop: threading.Event, tally: Tally) -> None:
    """A well-behaved framed client: a burst of 1-8 pipelined frames, read every reply, think
    0.3-0.6 s, again. It reconnects (to an address picked at random among those the name
    resolves to) when the server ends the connection. Each frame is owed exactly one
    byte-exact reply, in order. A FIN (clean end of stream) while frames are owed is a silent
    loss (`lost`): the drain guarantee says it never happens. A reset means the server did not
    answer what is owed and says so: those frames are sent again on the next connection
    (`resent`). At the end every frame the client made must have been answered once."""
    rng = random.Random(seed)
    pending: deque[bytes] = deque()  # made, not yet answered: resent after a reset
    made = 0
    while not stop.is_set() or pending:
        try:
            address = rng.choice(resolve(host, port))
            sock = socket.create_connection((address, port), timeout=DEADLINE_S)
        except OSError:
            tally.add("connect_failed")
            time.sleep(0.2)
            continue
        tally.add("connections")
        with tally.lock:
            tally.peers.add(address)
        decoder = FrameDecoder()
        owed: deque[bytes] = deque()
        try:
            with sock:
                if pending:  # what a reset left unanswered, first
                    owed.extend(pending)
                    tally.add("resent", len(pending))
                    sock.sendall(b"".join(encode(p) for p in pending))
                    pending.clear()
                while True:
                    if not owed:
                        if stop.is_set():
                            break
                        # Think; a FIN that arrives meanwhile (the server drains) ends this
                        # connection before anything new is sent on it.
                        readable, _, _ = select.select([sock], [], [], rng.uniform(0.3, 0.6))
                        if readable:
                            data = sock.recv(65536)
                            if not data:
                                tally.add("eof")
                                break
                            tally.errors.append(f"unsolicited bytes from {address}: {data[:40]!r}")
                            break
                        burst = [
                            f"{seed}:{made + i}:".encode() + rng.randbytes(rng.randint(0, 2000))
                            for i in range(rng.randint(1, 8))
                        ]
                        made += len(burst)
                        owed.extend(burst)
                        sock.sendall(b"".join(encode(p) for p in burst))
                    data = sock.recv(65536)
                    if not data:
                        tally.add("eof")
                        tally.add("lost", len(owed))  # a FIN while replies were owed
                        owed.clear()
                        break
                    for reply in decoder.feed(data):
                        expected = owed.popleft() if owed else None
                        if reply != expected:
                            tally.errors.append(
                                f"{address}: reply {reply[:20]!r} != {expected!r:.40}"
                            )
                            return
                        tally.add("answered")
        except (ConnectionResetError, BrokenPipeError, TimeoutError) as exc:
            tally.add(f"reset:{type(exc).__name__}")
            pending.extend(owed)
    tally.add("made", made)


def framed(host: str, port: int, clients: int, seed: int) -> dict[str, Any]:
    """Clients run until stdin is closed (the test's signal), then finish what they owe."""
    stop = threading.Event()
    tally = Tally()
    threads = [
        threading.Thread(target=_client, args=(host, port, seed * 1000 + i, stop, tally))
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    print(json.dumps({"started": clients}), flush=True)
    sys.stdin.read()
    stop.set()
    for t in threads:
        t.join(DEADLINE_S * 3)
    alive = sum(t.is_alive() for t in threads)
    if alive:
        tally.errors.append(f"{alive} clients did not finish")
    return {"counts": dict(tally.counts), "peers": sorted(tally.peers), "errors": tally.errors}


def main(argv: list[str]) -> None:
    command, *args = argv
    result: Any
    if command == "resolve":
        result = resolve(args[0])
    elif command == "query":
        result = query(args[0])
    elif command == "spread":
        result = spread(args[0], int(args[1]), int(args[2]))
    elif command == "udp":
        result = udp(args[0], int(args[1]))
    elif command == "framed":
        result = framed(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
