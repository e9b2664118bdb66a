#!/usr/bin/env bash
# A local stand-in for the official python:3.11-slim image, for machines that cannot pull
# from a registry (CI, air-gapped hosts). Debian bookworm's python3 is 3.11, like the
# official image; the Dockerfile only needs python3 with venv and pip.
#
#   deploy/base-image.sh [TAG]        # default TAG: edgeheads-base:bookworm
#   ARCH=arm64 deploy/base-image.sh edgeheads-base:bookworm-arm64   # for linux/arm64 images
#
# Needs root, debootstrap and a reachable Debian mirror (MIRROR, default deb.debian.org). Another
# ARCH than the host's needs QEMU user emulation registered with binfmt_misc (Debian:
# apt-get install qemu-user-static binfmt-support), which debootstrap's second stage runs under.
set -euo pipefail
TAG=${1:-edgeheads-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ARCH=${ARCH:-$(dpkg --print-architecture)}
ROOTFS=$(mktemp -d /tmp/edgeheads-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
chmod 755 "$ROOTFS"   # mktemp made it 0700: "/" must be readable by the non-root user
debootstrap --variant=minbase --arch="$ARCH" \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
# keep the image small: no apt lists or caches, no docs
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
# One-layer image archive (docker save's format), loaded with `docker load`: unlike `docker import`,
# it records the architecture, so an arm64 base is an arm64 image that --platform builds accept.
ARCHIVE=$(mktemp -d /tmp/edgeheads-image.XXXXXX)
trap 'rm -rf "$ROOTFS" "$ARCHIVE"' EXIT
tar --numeric-owner -C "$ROOTFS" -cf "$ARCHIVE/layer.tar" .
DIFF_ID=$(sha256sum "$ARCHIVE/layer.tar" | cut -d' ' -f1)
cat >"$ARCHIVE/config.json" <<JSON
{"architecture": "$ARCH", "os": "linux",
 "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
            "Cmd": ["python3"]},
 "rootfs": {"type": "layers", "diff_ids": ["sha256:$DIFF_ID"]}}
JSON
echo "[{\"Config\": \"config.json\", \"RepoTags\": [\"$TAG\"], \"Layers\": [\"layer.tar\"]}]" >"$ARCHIVE/manifest.json"
tar -C "$ARCHIVE" -c manifest.json config.json layer.tar | docker load >/dev/null
echo "built $TAG (linux/$ARCH)"
