#!/usr/bin/env bash
# Prepare, on a CPU machine with internet access, the Python 3.12 wheels that the lent GPU
# machines (torch 2.11, triton 3.6, Python 3.12, no internet) lack, into .wheels/
# (git-ignored; the device tool carries it: carry=[".wheels"]).
#
#   scripts/prepare_gpu_wheels.sh            # reference sam2 + hydra/omegaconf/antlr4/iopath + nvtx + av
#   scripts/prepare_gpu_wheels.sh --no-av    # skip PyAV (35 MB; the GPU check uses synthetic videos only)
#
# The reference sam2==1.1.0 exists only as an sdist; it is built here as a pure-Python wheel
# with SAM2_BUILD_CUDA=0 (its optional CUDA extension only fills mask holes) and
# --no-build-isolation (its setup.py imports torch; an isolated build would download a
# CUDA torch). Everything the image already has (torch, numpy, tqdm, pillow, pyyaml,
# portalocker, packaging, pytest, pytest-benchmark, matplotlib) is left out: two versions
# of one package would stop the offline install there.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST="${WHEEL_DIR:-.wheels}"
WITH_AV=1
for arg in "$@"; do
    case "$arg" in
        --no-av) WITH_AV=0 ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done
if ! "$PY" -c "import torch, setuptools, wheel" 2>/dev/null; then
    echo "error: $PY needs torch, setuptools and wheel (it builds the sam2 wheel without isolation)" >&2
    exit 1
fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(hydra-core==1.3.2 omegaconf==2.3.0 nvtx==0.2.17)
[ "$WITH_AV" = 1 ] && BINARY+=(av==18.1.0)

echo "== binary wheels for cp312: ${BINARY[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"

# sdist-only packages: pure Python, so a wheel built here under any Python 3 installs there.
echo "== building sam2==1.1.0 (SAM2_BUILD_CUDA=0), iopath==0.1.10, antlr4-python3-runtime==4.9.3"
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
    sam2==1.1.0 iopath==0.1.10 antlr4-python3-runtime==4.9.3

# Every built wheel must be pure Python (py3-none-any) or it would not install on cp312.
for whl in "$DEST"/sam2-*.whl "$DEST"/iopath-*.whl "$DEST"/antlr4*.whl; do
    case "$(basename "$whl")" in
        *-py3-none-any.whl) ;;
        *) echo "error: $(basename "$whl") is not a pure-Python wheel" >&2; exit 1 ;;
    esac
done
if unzip -l "$DEST"/sam2-*.whl | grep -q '\.so$'; then
    echo "error: the sam2 wheel holds a compiled extension; rebuild with SAM2_BUILD_CUDA=0" >&2
    exit 1
fi

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "== $DEST: $(ls "$DEST" | wc -l) wheels, $((total / 1024 / 1024)) MiB (+ $((tree / 1024 / 1024)) MiB of tracked files)"
ls -1 "$DEST"
if [ $((total + tree)) -gt $((60 * 1024 * 1024)) ]; then
    echo "warning: wheels + working tree exceed 60 MiB; the device tool carries at most 64 MiB (try --no-av)" >&2
fi
