#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim image, for machines that cannot pull
# from a registry (CI, air-gapped hosts). Debian bookworm's python3 is 3.11, like the
# official image; the Dockerfile only needs python3 with venv and pip.
#
#   deploy/base-image.sh [TAG]        # default TAG: edgeheads-base:bookworm
#
# Needs root, debootstrap and a reachable Debian mirror (MIRROR, default deb.debian.org).
set -euo pipefail
TAG=${1:-edgeheads-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/edgeheads-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
chmod 755 "$ROOTFS"   # mktemp made it 0700: "/" must be readable by the non-root user
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
# keep the image small: no apt lists or caches, no docs
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar -C "$ROOTFS" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["python3"]' - "$TAG" >/dev/null
echo "built $TAG"
