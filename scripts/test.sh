#!/usr/bin/env bash
# Install vlmserve into .venv (idempotent; see scripts/_install.sh for the knobs) and run the
# test suite (tests/, per pyproject's testpaths). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -k packaging -x`. Exits with pytest's own exit code (5: no tests ran).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
vlmserve_install
# Debian's prometheus package: promtool checks /metrics in tests/test_server_metrics.py, and a real
# Prometheus scrapes the server in tests/test_server_conventions.py; where it cannot be installed
# (not root, no apt) those two tests skip, saying why.
if ! { command -v promtool && command -v prometheus; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
    >/dev/null 2>&1 || echo "scripts/test.sh: could not install promtool; its check will skip" >&2
fi
# Triton's interpreter runs the fused-kernel tests on CPU (tests/test_fused_kernels.py and
# tests/test_fused_dispatch.py; they skip without triton). A CUDA torch brings its own triton.
if ! python -c "import triton" >/dev/null 2>&1 \
    && python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" >/dev/null 2>&1; then
  python -m pip install -q "triton==3.6.0" >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install triton; the fused-kernel tests will skip" >&2
fi
cd "$VLMSERVE_ROOT"
exec python -m pytest -q "$@"
