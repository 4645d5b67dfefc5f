#!/usr/bin/env bash
# The main job: set-up (scripts/setup.sh), then share a terminal. With no --server, the
# daemon starts a built-in relay on 127.0.0.1:2222 and prints the ssh line to join.
# Arguments go to 'upterm host', e.g. scripts/try.sh --accept -- bash
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The shared shell (and you, for 'upterm session ...') find upterm in .venv/bin.
export PATH="$PWD/.venv/bin:$PATH"
echo "setup: upterm is $PWD/.venv/bin/upterm; in other shells: export PATH=\"$PWD/.venv/bin:\$PATH\"" >&2
exec upterm host "$@"
