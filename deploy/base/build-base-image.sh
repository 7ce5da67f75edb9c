#!/usr/bin/env bash
# Build a local Debian bookworm base image (python3, venv, tini) for machines that cannot pull
# from an image registry: debootstrap a minimal root filesystem and `docker import` it.
# The Debian mirror is the one this machine's apt already uses (read from its sources).
# Usage: build-base-image.sh [TAG]   (default wirekit-base:local; needs root, debootstrap, docker)
set -euo pipefail
tag="${1:-wirekit-base:local}"

mirror_from_apt_sources() {
  local f
  # deb822 files first (Debian 12's default), then one-line sources.list entries.
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk '/^Suites:.*bookworm( |$)/ {ok=1} /^URIs:/ {u=$2} /^$/ {if (ok && u) {print u; exit} ok=0; u=""}
         END {if (ok && u) print u}' "$f" | head -n 1
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    awk '$1 == "deb" && $0 ~ / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f"
  done
}
mirror="${DEBIAN_MIRROR:-$(mirror_from_apt_sources | grep -v security | head -n 1)}"
[ -n "$mirror" ] || { echo "no Debian mirror found in the apt sources; set DEBIAN_MIRROR" >&2; exit 1; }

rootfs="$(mktemp -d /tmp/wirekit-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from the machine's Debian mirror into $rootfs" >&2
debootstrap --variant=minbase --include=python3,python3-venv,tini bookworm "$rootfs" "$mirror" >/dev/null
# Slim it: no apt lists, caches, docs or man pages in an image.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "built $tag" >&2
