"""Container health check without curl: ``python -m wirekit_servicekit.healthcheck VAR PORT``.

Asks the service's own ``/readyz`` on loopback; exit 0 when it answers 200, 1 otherwise. The port
is read from the service's metrics-port variable (``PORT_VAR``), falling back to ``DEFAULT``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m wirekit_servicekit.healthcheck PORT_VARIABLE DEFAULT_PORT")
        return 2
    port = os.environ.get(args[0]) or args[1]
    url = f"http://127.0.0.1:{int(port)}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print("healthy" if ok else f"unhealthy: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
