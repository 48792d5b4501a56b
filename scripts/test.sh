#!/usr/bin/env bash
# The whole test suite: lint, types (mypy strict on src/ and tests/), then pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "==> ruff"
ruff check src tests bench
echo "==> mypy (strict, src/ and tests/)"
mypy
echo "==> pytest"
exec python -m pytest "$@"
