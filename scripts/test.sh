#!/usr/bin/env bash
# Full test suite on a fresh machine: lint, format and type gates, then pytest (arguments go to
# pytest). pytest's exit code 5 (no tests collected) is a failure.
#
# DIST_OPT_SKIP_LINT=1 skips the three gates (or a comma list of them: ruff-check,ruff-format,mypy).
# DIST_OPT_REQUIRE_ALL_TESTS=1 (set by .ci/run) turns skips for a missing environment (root,
# `ip netns`, tmpfs) into failures.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if [ "$(id -u)" = 0 ] && [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null; then
  # real sshd for the multi-node (network namespace) launcher test
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server iproute2) >/dev/null 2>&1 || true
fi
export OMP_NUM_THREADS=1 WANDB_SILENT=true

gate() {  # gate NAME COMMAND...: run COMMAND unless NAME is skipped; a failure ends the run
  local name=$1
  shift
  case ",${DIST_OPT_SKIP_LINT:-}," in
    ,1,|*",$name,"*)
      echo "[test.sh] $name skipped (DIST_OPT_SKIP_LINT=${DIST_OPT_SKIP_LINT})" >&2
      return 0 ;;
  esac
  echo "[test.sh] $name: $*" >&2
  "$@" || { echo "[test.sh] $name failed" >&2; exit 1; }
}
gate ruff-check .venv/bin/ruff check .
gate ruff-format .venv/bin/ruff format --check .
gate mypy .venv/bin/mypy

# two workers, one test module each at a time (module fixtures stay per module; the gloo ranks per worker),
# the modules in the order tests/conftest.py gives them (costly ones first, so both workers end together)
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
