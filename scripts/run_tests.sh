#!/usr/bin/env bash
# The whole CPU test run, in three pytest invocations:
#   1. model, predictors, utilities (fp32 parity against sam2==1.1.0);
#   2. Triton kernels under the interpreter (TRITON_INTERPRET=1 must be set before triton
#      is imported, so they run in their own process);
#   3. ahead-of-time GPU compile of every kernel (needs TRITON_INTERPRET unset).
# Any failure makes the script exit non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
status=0
run() { echo "=== $*"; "$@" || status=1; }
run "$PY" -m pytest -q tests --ignore=tests/kernels -m "not cuda" "$@"
if [ -d tests/kernels ]; then
  run env TRITON_INTERPRET=1 "$PY" -m pytest -q tests/kernels -m "not aot and not cuda"
  run env -u TRITON_INTERPRET "$PY" -m pytest -q tests/kernels -m aot
fi
exit $status
