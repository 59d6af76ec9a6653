#!/usr/bin/env bash
# Create (or reuse) ./.venv and install sam2_fast with everything the tests and the
# side-by-side benchmark need, including the reference sam2==1.1.0.
#   VENV=path scripts/setup.sh    # another venv location
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned: the reference needs torchvision, and an unpinned torch may pull
# a different build (these pins are the versions the CPU CI machines carry locally).
pip_ "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
# The reference is an sdist; without --no-build-isolation pip builds it in a fresh env
# that downloads ~5 GB of CUDA wheels and may replace torch. SAM2_BUILD_CUDA=0 skips its
# optional CUDA extension (we need none of it).
if ! "$VENV/bin/python" -c "import sam2" 2>/dev/null; then
  pip_ setuptools wheel
  SAM2_BUILD_CUDA=0 pip_ --no-build-isolation "sam2==1.1.0"
fi
pip_ -e ".[dev]"
echo "setup done: $VENV"
