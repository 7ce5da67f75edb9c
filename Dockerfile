# wirekit images: one file, one target per service (`docker build --target echo .`).
#
# Hermetic: no network during the build. `make wheelhouse` downloads the pinned, hash-checked
# dependencies and builds the wirekit wheels on the host into ./wheelhouse, with cmdexec's
# static exec wrapper (wirekit-limits); the image installs from there with --no-index. No BuildKit features: the legacy builder is enough.
#
# BASE_IMAGE is any Debian bookworm image with python3.11 and python3-venv: the official Python
# image by default; `make base-image` builds wirekit-base:local with debootstrap for machines
# that cannot pull from a registry.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# tini as PID 1: forwards signals, reaps orphans. The local base has it; the official image
# gets Debian's package (the only step that uses the network, skipped when tini is present).
RUN if [ ! -x /usr/bin/tini ]; then \
      apt-get update && apt-get install -y --no-install-recommends tini \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && groupadd --system --gid 10001 wirekit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin wirekit

FROM base AS venv
# The wheelhouse's framing, echo and udp wheels may hold compiled modules (mypyc, C; built on the host):
# where they do not load on this base (another C library), they are removed and the pure-Python
# modules beside them run (python -m wirekit_servicekit.accel says which).
# Marks this build-only stage, so its leftover image can be pruned (docker image prune --filter).
LABEL org.wirekit.stage=build
COPY requirements/runtime.txt /wheelhouse/runtime.txt
COPY wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/wirekit \
 && /opt/wirekit/bin/pip install --no-cache-dir --no-index --find-links /wheelhouse \
      --require-hashes -r /wheelhouse/runtime.txt \
 && /opt/wirekit/bin/pip install --no-cache-dir --no-index --no-deps /wheelhouse/wirekit_*.whl \
 && if ! /opt/wirekit/bin/python -m wirekit_servicekit.accel wirekit_echo wirekit_udp >/dev/null 2>&1; then \
      echo "the compiled modules do not load on this base: pure Python" >&2; \
      find /opt/wirekit/lib -path '*/site-packages/wirekit_*/*.so' -delete; \
      /opt/wirekit/bin/python -m wirekit_servicekit.accel --expect pure wirekit_echo wirekit_udp; \
    fi \
 && /opt/wirekit/bin/pip uninstall --yes --quiet pip \
 && /opt/wirekit/bin/python -m compileall -q /opt/wirekit >/dev/null

FROM base AS runtime
COPY --from=venv /opt/wirekit /opt/wirekit
ENV PATH=/opt/wirekit/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
LABEL org.opencontainers.image.vendor="wirekit"

FROM runtime AS echo
ARG VERSION
ENV WIREKIT_ECHO_HOST=0.0.0.0
EXPOSE 7000/tcp 7001/tcp 9700/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "wirekit_servicekit.healthcheck", "WIREKIT_ECHO_METRICS_PORT", "9700"]
LABEL org.opencontainers.image.title="wirekit-echo" \
      org.opencontainers.image.description="TCP echo (RFC 862), raw and length-framed, with Prometheus metrics and OTLP traces" \
      org.opencontainers.image.version="${VERSION}"
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "wirekit-echo"]

FROM runtime AS cmdexec
ARG VERSION
# Sets the commands' rlimits, then execs them (static: runs on any base).
COPY --from=venv /wheelhouse/wirekit-limits /opt/wirekit/bin/wirekit-limits
# Commands run as the image's non-root user, with a minimal environment, in the read-only root.
ENV WIREKIT_CMDEXEC_HOST=0.0.0.0
EXPOSE 7100/tcp 9710/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "wirekit_servicekit.healthcheck", "WIREKIT_CMDEXEC_METRICS_PORT", "9710"]
LABEL org.opencontainers.image.title="wirekit-cmdexec" \
      org.opencontainers.image.description="Remote command execution over TCP: authenticated, allowlisted, no shell, limited" \
      org.opencontainers.image.version="${VERSION}"
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "wirekit-cmdexec"]

FROM runtime AS udp
ARG VERSION
ENV WIREKIT_UDP_HOST=0.0.0.0
EXPOSE 7200/udp 9720/tcp
# The health endpoint answers only while the UDP endpoint is bound and serving.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "wirekit_servicekit.healthcheck", "WIREKIT_UDP_METRICS_PORT", "9720"]
LABEL org.opencontainers.image.title="wirekit-udp" \
      org.opencontainers.image.description="UDP echo (RFC 862) with reflection and loop defences" \
      org.opencontainers.image.version="${VERSION}"
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "wirekit-udp"]

FROM runtime AS probe
ARG VERSION
# /metrics and /probe on 0.0.0.0 (the prober listens on nothing else).
ENV WIREKIT_PROBE_HOST=0.0.0.0
EXPOSE 9730/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-m", "wirekit_servicekit.healthcheck", "WIREKIT_PROBE_METRICS_PORT", "9730"]
LABEL org.opencontainers.image.title="wirekit-probe" \
      org.opencontainers.image.description="Continuous loss, RTT, jitter, reordering and hop count against echo targets, as Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}"
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "wirekit-probe"]
