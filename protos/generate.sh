#!/usr/bin/env bash
# Regenerate the Python gRPC code from protos/edgeheads/v1/*.proto.
# The generated *_pb2*.py files are committed next to the .proto files; the test
# tests/test_protos_in_sync.py regenerates into a temporary folder and fails if they differ.
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-.}"
python -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" edgeheads/v1/*.proto
