#!/usr/bin/env bash
# Run the test suite: creates/uses .venv, installs sharpscope[test], runs pytest (extra args are passed on).
set -euo pipefail
source "$(dirname "$0")/_env.sh" test
cd "$ROOT"
workers="${SHARPSCOPE_TEST_WORKERS:-2}"
exec python -m pytest -n "$workers" "$@"
