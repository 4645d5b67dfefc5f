#!/usr/bin/env bash
# The whole test suite: set-up (scripts/setup.sh), lint, types, then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k e2e
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/ruff check upterm tests bench
.venv/bin/ruff format --check upterm tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
