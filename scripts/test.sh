#!/usr/bin/env bash
# Install vlmserve into .venv (idempotent; see scripts/_install.sh for the knobs) and run the
# test suite (tests/, per pyproject's testpaths). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -k packaging -x`. Exits with pytest's own exit code (5: no tests ran).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
vlmserve_install
cd "$VLMSERVE_ROOT"
exec python -m pytest -q "$@"
