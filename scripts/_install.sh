# Sourced by scripts/serve.sh and scripts/test.sh: make sure the virtual environment exists and
# holds torch and vlmserve (editable, with the test extras), then activate it. Idempotent: a
# second run only checks a stamp and returns in well under a second.
#
# Environment:
#   VLMSERVE_TORCH_SPEC  what to pip-install for torch (default: torch==2.13.0). Words are split,
#                        so pip options may follow, e.g.
#                        'torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128'
#   VLMSERVE_SKIP_TORCH  1: keep the torch that is already there (e.g. Cambricon's torch_mlu
#                        image); a venv created in that mode sees the system site-packages
#   VLMSERVE_VENV        the virtual environment (default: <repo>/.venv)
#   PYTHON               the interpreter that creates it (default: python3)

VLMSERVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLMSERVE_VENV="${VLMSERVE_VENV:-$VLMSERVE_ROOT/.venv}"

_vlmserve_log() { printf '[vlmserve] %s\n' "$*" >&2; }

vlmserve_install() {
    local torch_spec="${VLMSERVE_TORCH_SPEC:-torch==2.13.0}"
    local skip_torch="${VLMSERVE_SKIP_TORCH:-0}"
    local py="$VLMSERVE_VENV/bin/python"

    # 1. The virtual environment.
    if [[ ! -x "$py" ]]; then
        local venv_args=()
        if [[ "$skip_torch" == 1 ]]; then
            # Keep the torch (and torch_mlu) that the image installed system-wide visible.
            if ! "${PYTHON:-python3}" -c 'import torch' 2>/dev/null; then
                _vlmserve_log "VLMSERVE_SKIP_TORCH=1 but ${PYTHON:-python3} cannot import torch; install torch first"
                return 1
            fi
            venv_args+=(--system-site-packages)
        fi
        _vlmserve_log "creating $VLMSERVE_VENV ${venv_args[*]}"
        "${PYTHON:-python3}" -m venv ${venv_args[@]+"${venv_args[@]}"} "$VLMSERVE_VENV"
    fi
    local pip=("$py" -m pip --disable-pip-version-check)

    # 2. torch, first and on its own: an unconstrained resolve of vlmserve's dependencies would
    #    pull the default (multi-GB CUDA) wheel.
    if [[ "$skip_torch" == 1 ]]; then
        if ! "$py" -c 'import torch' 2>/dev/null; then
            _vlmserve_log "VLMSERVE_SKIP_TORCH=1 but torch is not importable from $py"
            _vlmserve_log "install torch there first, or remove $VLMSERVE_VENV to recreate it with --system-site-packages"
            return 1
        fi
    elif ! "$py" - "$torch_spec" <<'PY'
import sys
from importlib import metadata
try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
try:
    installed = metadata.version("torch")
    req = Requirement(sys.argv[1].split()[0])
except (metadata.PackageNotFoundError, InvalidRequirement):
    sys.exit(1)
# A spec naming a URL has no specifier: any installed torch is then taken as it.
sys.exit(0 if req.name == "torch" and req.specifier.contains(installed, prereleases=True) else 1)
PY
    then
        _vlmserve_log "installing $torch_spec"
        # shellcheck disable=SC2086  # word splitting is wanted: the spec may carry pip options
        "${pip[@]}" install $torch_spec
    fi
    local torch_version
    torch_version="$("$py" -c 'from importlib import metadata; print(metadata.version("torch"))')"

    # 3. vlmserve itself (editable) with its test extras; skipped while nothing it depends on
    #    changed. torch is pinned to what step 2 left, so this step can never replace it.
    local stamp_file="$VLMSERVE_VENV/.vlmserve-install-stamp" stamp
    stamp="$( { cat "$VLMSERVE_ROOT/pyproject.toml"; echo "$VLMSERVE_ROOT"; echo "torch=$torch_version"; } \
              | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" && -x "$VLMSERVE_VENV/bin/vlmserve" ]]; then
        _vlmserve_log "environment up to date ($VLMSERVE_VENV, torch $torch_version)"
    else
        _vlmserve_log "installing vlmserve (editable) with test extras"
        local constraint
        constraint="$(mktemp)"
        echo "torch==$torch_version" > "$constraint"
        rm -f "$stamp_file"
        if ! (cd "$VLMSERVE_ROOT" && "${pip[@]}" install -c "$constraint" -e '.[test]'); then
            rm -f "$constraint"
            return 1
        fi
        rm -f "$constraint"
        echo "$stamp" > "$stamp_file"
    fi

    # shellcheck disable=SC1091
    source "$VLMSERVE_VENV/bin/activate"
}
