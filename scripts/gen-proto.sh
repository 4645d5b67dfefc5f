#!/usr/bin/env bash
# Regenerates upterm/proto/server_pb2.py(+.pyi) from server.proto.
# grpcio-tools 1.62 ships protoc 25.1, whose output has no runtime version gate,
# so the committed module loads on protobuf 4.21 (Debian 12) up to the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q "grpcio-tools==1.62.3"
"$venv/bin/python" -m grpc_tools.protoc -Iupterm/proto \
  --python_out=upterm/proto --pyi_out=upterm/proto upterm/proto/server.proto
