#!/usr/bin/env bash
# Mutation testing of the numerical core with mutmut, bounded in wall time.
#
# Usage:
#   scripts/mutation_test.sh [BUDGET_SECONDS] [MODULE ...]
#
#   BUDGET_SECONDS  total wall time (default 1200), split evenly over the modules; a
#                   module whose share runs out stops there (SIGINT, then SIGKILL 30 s later:
#                   mutmut 2 may ignore SIGINT) and its remaining mutants are
#                   reported as untested.
#   MODULE          among models timesteps updates schedules (default: all four).
#
# Environment:
#   MUTMUT  the mutmut executable (default /work/mutvenv/bin/mutmut)
#   PYTHON  the interpreter with jax and pytest that runs the tests (default: python3)
#   OUT     where the per-module reports go (default: ./mutation-results)
#
# mutmut is not a project dependency; install it in a venv of its own, e.g.
#   python -m venv /work/mutvenv && /work/mutvenv/bin/pip install "mutmut==2.5.1"
# (mutmut 2.x mutates files in place and runs an arbitrary test command; the 3.x line
# forks the test process per mutant, which XLA's thread pool does not survive.)
#
# The tracked files are copied to a temporary directory and mutated there: the checkout
# itself is never modified. Each module has a fast test subset (a few seconds a mutant,
# most of it importing jax); on 2 cores a module of ~150 mutants takes ~8 minutes.
set -euo pipefail

BUDGET=${1:-1200}
shift || true
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then MODULES=(models timesteps updates schedules); fi
MUTMUT=${MUTMUT:-/work/mutvenv/bin/mutmut}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$PWD/mutation-results}
mkdir -p "$OUT"

# module -> the fast tests that must kill its mutants
tests_for() {
  case "$1" in
    models) echo "tests/test_conversions_and_plans.py -k parameterisations_recover or unknown_model or dynamic_threshold" ;;
    timesteps) echo "tests/test_conversions_and_plans.py tests/test_hardening.py -k orders or time_grid" ;;
    updates) echo "tests/test_sampler.py -k ddim or local_error_order or multistep3_formula" ;;
    schedules) echo "tests/test_schedules.py tests/test_hardening.py" ;;
    *) echo "unknown module $1" >&2; exit 2 ;;
  esac
}

WORK=$(mktemp -d /tmp/dpmjax-mutation.XXXXXX)
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
(cd "$ROOT" && git ls-files -z | xargs -0 -I{} cp --parents {} "$WORK")

SHARE=$(( BUDGET / ${#MODULES[@]} ))
for m in "${MODULES[@]}"; do
  spec=$(tests_for "$m")
  files=${spec%% -k *}
  kexpr=""
  if [[ "$spec" == *" -k "* ]]; then kexpr=${spec#* -k }; fi
  runner="env PYTHONPATH=$WORK JAX_PLATFORMS=cpu $PYTHON -m pytest -x -q -p no:cacheprovider -p no:randomly $files"
  if [ -n "$kexpr" ]; then runner="$runner -k '$kexpr'"; fi
  echo "== $m: budget ${SHARE}s, runner: $runner"
  rm -f "$WORK/.mutmut-cache"
  start=$(date +%s)
  (cd "$WORK" && timeout --signal=INT --kill-after=30 "$SHARE" "$MUTMUT" run --paths-to-mutate "dpmjax/$m.py" \
      --tests-dir tests --runner "$runner" --no-progress >"$OUT/$m.log" 2>&1) || true
  echo "   ran $(( $(date +%s) - start ))s"
  cp "$ROOT/dpmjax/$m.py" "$WORK/dpmjax/$m.py"  # an interrupted run may leave a mutant in place
  {
    for status in killed survived timeout suspicious skipped untested; do
      ids=$(cd "$WORK" && "$MUTMUT" result-ids "$status" 2>/dev/null || true)
      n=$(echo "$ids" | wc -w)
      echo "$status $n"
    done
  } | tee "$OUT/$m.counts"
  (cd "$WORK" && for id in $("$MUTMUT" result-ids survived 2>/dev/null || true); do
      echo "--- survived mutant $id"; "$MUTMUT" show "$id"; done) >"$OUT/$m.survivors.txt" 2>&1 || true
  echo "   survivors: $OUT/$m.survivors.txt"
done
