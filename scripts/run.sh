#!/usr/bin/env bash
# Main job: train the built-in default (configs/quickstart.yaml) on 2 local ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dist-opt train configs/quickstart.yaml "$@"
