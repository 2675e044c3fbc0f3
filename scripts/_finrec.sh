# Shared by the scripts in this folder (sourced, not run): find the finrec command and the workspace.
# The repo's .venv (made by `make demo` or `make test`) first, else `finrec` on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/finrec" ]; then
    FINREC="$ROOT/.venv/bin/finrec"
elif command -v finrec >/dev/null 2>&1; then
    FINREC="$(command -v finrec)"
else
    echo "error: finrec is not installed" >&2
    echo "hint: run \`make demo\` once (it installs into .venv), or: python3 -m venv .venv && .venv/bin/pip install -e ." >&2
    exit 2
fi
# The same folders as `make demo`: <workspace>/data (the world) and <workspace>/model (the bundle).
WORKSPACE="${FINREC_WORKSPACE:-$ROOT/finrec-workspace}"
export FINREC_WORKSPACE="$WORKSPACE"
DATA="$WORKSPACE/data"
MODEL="$WORKSPACE/model"
