#!/usr/bin/env bash
# Full test suite on a fresh machine. pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if [ "$(id -u)" = 0 ] && [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null; then
  # real sshd for the multi-node (network namespace) launcher test
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server iproute2) >/dev/null 2>&1 || true
fi
export OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_SILENT=true
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
