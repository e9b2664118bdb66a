#!/usr/bin/env bash
# Build the edgeheads image from a wheelhouse made on this host (the build itself needs no network).
#
#   deploy/build-image.sh worker    [TAG]   # lean install (worker, controller); default TAG edgeheads:worker
#   deploy/build-image.sh headnode  [TAG]   # edgeheads[headnode];              default TAG edgeheads:headnode
#
# Environment:
#   BASE_IMAGE      default python:3.11-slim; e.g. edgeheads-base:bookworm from deploy/base-image.sh
#   TORCH           the torch requirement for the wheelhouse (default torch==2.13.0: the CPU build on x86)
#   WHEEL_PLATFORM  pip platform tags (space-separated) to fill the wheelhouse for another platform, e.g.
#                   "manylinux_2_28_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64" (binary wheels
#                   only, Python 3.11); set TORCH to a CPU build for it (PyPI's torch==2.9.1 on aarch64);
#                   then build with PLATFORM=linux/arm64. Wheels of several platforms can share the
#                   wheelhouse: pip in the image takes the ones that match it.
#   HOST_TORCH      with WHEEL_PLATFORM: the torch the host resolves the other packages with (torch==2.13.0)
#   PLATFORM        e.g. linux/arm64: `docker buildx build --platform` where buildx is installed, else the
#                   classic builder's --platform; another architecture needs QEMU registered with binfmt_misc
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
if [ -z "${WHEEL_PLATFORM:-}" ]; then
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" --find-links "$WHEELS" "$TORCH" "$EH_WHEEL[headnode]"
else
    # Another platform. pip judges environment markers by the host, so it would fetch the
    # host's CUDA packages as torch's dependencies. Instead: the host's pip resolves names and
    # versions (with the host's torch), and each is fetched for the target without dependencies;
    # torch itself is $TORCH, and the x86-only CUDA packages are left out.
    REPORT=$(mktemp)
    trap 'rm -f "$REPORT"' EXIT
    "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --report "$REPORT" \
        --find-links "$WHEELS" "${HOST_TORCH:-torch==2.13.0}" "$EH_WHEEL[headnode]"
    mapfile -t PINNED < <("$PYTHON" - "$REPORT" <<'PY'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower() in ("torch", "edgeheads", "triton") or name.lower().startswith("nvidia-"):
        continue
    print(f"{name}=={version}")
PY
)
    PLATFORM_ARGS=()
    for tag in $WHEEL_PLATFORM; do PLATFORM_ARGS+=(--platform "$tag"); done
    "$PYTHON" -m pip download --quiet --dest "$WHEELS" --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp "${PLATFORM_ARGS[@]}" "$TORCH" "${PINNED[@]}"
fi

# 2. the image
if [ -n "${PLATFORM:-}" ] && docker buildx version >/dev/null 2>&1; then
    docker buildx build --platform "$PLATFORM" --load -f "$HERE/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" -t "$TAG" "$HERE"
elif [ -n "${PLATFORM:-}" ]; then
    # no buildx (Debian's docker.io 20.10): the classic builder takes --platform too; RUN steps
    # of another architecture run under QEMU registered with binfmt_misc
    docker build --platform "$PLATFORM" -f "$HERE/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" -t "$TAG" "$HERE"
else
    docker build -f "$HERE/Dockerfile" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg EXTRAS="$EXTRAS" -t "$TAG" "$HERE"
fi
docker images "$TAG"
