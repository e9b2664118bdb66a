#!/usr/bin/env bash
# Build the edgeheads image from a wheelhouse made on this host (the build itself needs no network).
#
#   deploy/build-image.sh worker    [TAG]   # lean install (worker, controller); default TAG edgeheads:worker
#   deploy/build-image.sh headnode  [TAG]   # edgeheads[headnode];              default TAG edgeheads:headnode
#
# Environment:
#   BASE_IMAGE      default python:3.11-slim; e.g. edgeheads-base:bookworm from deploy/base-image.sh
#   TORCH           the torch requirement for the wheelhouse (default torch==2.13.0: the CPU build on x86)
#   WHEEL_PLATFORM  e.g. manylinux2014_aarch64 to fill the wheelhouse for another platform (binary wheels
#                   only, for Python 3.11); then build with PLATFORM=linux/arm64 (docker buildx)
#   PLATFORM        passed to `docker buildx build --platform` (needs buildx and, cross-arch, QEMU/binfmt)
#   PYTHON          the host Python used to make the wheelhouse (default python3)
set -euo pipefail
ROLE=${1:-worker}
case "$ROLE" in
    worker) EXTRAS="" ;;
    headnode) EXTRAS="[headnode]" ;;
    *) echo "usage: $0 worker|headnode [TAG]" >&2; exit 2 ;;
esac
TAG=${2:-edgeheads:$ROLE}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
WHEELS="$HERE/wheels"
mkdir -p "$WHEELS"

# 1. the wheelhouse: edgeheads itself, torch, and everything edgeheads[headnode] needs (a superset
#    of the worker's, so one wheelhouse serves both images; pip installs only what the role asks)
rm -f "$WHEELS"/edgeheads-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "$ROOT"
EH_WHEEL=$(ls "$WHEELS"/edgeheads-*.whl)
PLATFORM_ARGS=()
if [ -n "${WHEEL_PLATFORM:-}" ]; then
    PLATFORM_ARGS=(--platform "$WHEEL_PLATFORM" --python-version 3.11 --implementation cp --only-binary=:all:)
fi
"$PYTHON" -m pip download --quiet --dest "$WHEELS" --find-links "$WHEELS" "${PLATFORM_ARGS[@]}" \
    "$TORCH" "$EH_WHEEL[headnode]"

# 2. the image
if [ -n "${PLATFORM:-}" ]; then
    docker buildx build --platform "$PLATFORM" --load -f "$HERE/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" -t "$TAG" "$HERE"
else
    docker build -f "$HERE/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" -t "$TAG" "$HERE"
fi
docker images "$TAG"
