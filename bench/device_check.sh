#!/usr/bin/env bash
# One command for a bare GPU machine (no network): environment, parity tests on the GPU with
# full-precision matmuls, then the benchmark's GPU section at reduced repeats, inside 8 minutes.
#   bash bench/device_check.sh              # the check; output in $OUT (else bench/results/)
#   bash bench/device_check.sh --dry-run    # the plan, the imports, the carried wheels
#   bash bench/device_check.sh --cpu        # the same steps on the CPU at tiny sizes (CI)
# Options after these go to `python -m bench.device_check` (--budget-s, --repeats, ...).
# Wheels in .whl/ (bench/fetch_device_wheels.sh) whose distribution the machine lacks are
# installed into a private folder first; official fixtures: export CGA_JAX_FIXTURES=DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
BUDGET_S=450        # the Python steps; + installation and start-up stay inside 8 minutes
mkdir -p "$OUT_DIR"
name=device_check
dry=0
prev=
for a in "$@"; do
  case "$a" in
    --cpu) name=device_check_cpu ;;
    --dry-run) dry=1 ;;
  esac
  if [ "$prev" = --budget-s ]; then BUDGET_S=$a; fi
  prev=$a
done
HARD_LIMIT_S=$(( ${BUDGET_S%.*} + 20 ))  # the last resort if the Python guard fails
LOG="$OUT_DIR/$name.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  SITE=${CGA_JAX_SITE:-/tmp/cga_jax_site}
  wheels=$("$PY" -m bench.device_check --select-wheels .whl)
  if [ -n "$wheels" ]; then
    echo "installing into $SITE: $wheels" | tee "$LOG"
    # shellcheck disable=SC2086  # one argument per wheel
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" $wheels 2>&1 | tee -a "$LOG"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
timeout -k 10 "$HARD_LIMIT_S" "$PY" -m bench.device_check --budget-s "$BUDGET_S" "$@" 2>&1 \
  | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
