#!/usr/bin/env bash
# The whole CPU test run, in three pytest invocations:
#   1. model, predictors, utilities (fp32 parity against sam2==1.1.0);
#   2. Triton kernels under the interpreter (TRITON_INTERPRET=1 must be set before triton
#      is imported, so they run in their own process);
#   3. ahead-of-time GPU compile of every kernel launch (needs TRITON_INTERPRET unset;
#      AOT_JOBS compile processes, default 2).
# JUNIT_DIR=dir writes one junit XML per stage there (.ci/run reads them).
# Any failure makes the script exit non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
status=0
junit() { if [ -n "${JUNIT_DIR:-}" ]; then echo "--junitxml=$JUNIT_DIR/$1.xml"; fi; }
run() { echo "=== $*"; "$@" || status=1; }
run "$PY" -m pytest -q tests --ignore=tests/kernels -m "not cuda" $(junit model) "$@"
if [ -d tests/kernels ]; then
  run env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/kernels -m "not aot and not cuda" $(junit interp)
  run env -u TRITON_INTERPRET "$PY" -m pytest -q tests/kernels -m aot $(junit aot)
fi
exit $status
