#!/usr/bin/env bash
# Create .venv (idempotent) with CPU torch 2.13.0 and dist-opt with every user extra, the
# development tools and a bundled Open MPI (the tests need mpiexec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dist-opt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # CPU build pinned here (the package itself only asks for a torch range)
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[all,dev,mpi-bundled]"
  touch "$stamp"
fi
