#!/usr/bin/env bash
# Install vlmserve into .venv (idempotent; see scripts/_install.sh for the knobs) and serve the
# bundled demo model: OpenAI routes + KServe v2 REST on :8000, v2 gRPC on :8081.
# Extra arguments go to `vlmserve serve`, e.g. `bash scripts/serve.sh --port 9000` or
# `bash scripts/serve.sh /path/to/model --max-model-len 4096`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_install.sh"
vlmserve_install
cd "$VLMSERVE_ROOT"
exec vlmserve serve "$@"
