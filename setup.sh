#!/usr/bin/env bash
# Create .venv and install IDunno with everything it needs. Safe to re-run: it only installs
# when the dependency list changed (stamp file) or the venv is missing.
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.idunno-stamp
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    touch "$STAMP"  # keep make's timestamp check quiet after a git checkout
    echo "setup.sh: $VENV is up to date"
else
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
        echo "setup.sh: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch/torchvision are pinned to the pair that pip finds on this machine's disk; pip (not uv or
    # poetry) is required for that. The other dependencies come from pyproject.toml.
    "$VENV/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
    echo "$want" > "$STAMP"
    echo "setup.sh: installed IDunno into $VENV"
fi

cat <<'MSG'
next:
  make demo                      # local cluster, AlexNet + ResNet jobs, statistics
  make test                      # the whole test suite
  . .venv/bin/activate && idunno --help
MSG
