#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (torch 2.11 / triton 3.6 / Python 3.12, no internet).
# Run from the repository root, one step per device-tool call, in this priority order:
#
#   bash benchmarks/gpu_check.sh quick         # ONE call for a 15-minute lease (< 9 min): kernel
#                                              # candidates at real shapes, pytest -m cuda on the
#                                              # kernels, tiny 480p ours vs reference bf16, 1 and 8 objects
#   bash benchmarks/gpu_check.sh correctness   # pytest -m cuda (kernels, bf16 numerics, graphs, parity)
#   bash benchmarks/gpu_check.sh bench         # side by side, tiny @480p, 1 object, full ladder
#   bash benchmarks/gpu_check.sh profile       # profile reports: ours tiny/large (+ compiled), reference tiny
#   bash benchmarks/gpu_check.sh bench-8obj    # side by side, tiny @480p, 8 objects, full ladder
#   bash benchmarks/gpu_check.sh bench-large   # side by side, large @480p, 1 and 8 objects
#   bash benchmarks/gpu_check.sh bench-refvos  # the reference's vos_optimized (max-autotune) rows
#   bash benchmarks/gpu_check.sh bench-objects # 8 objects @480p, tiny and large, eager: ours batched vs
#                                              # ours one step per object vs the reference bf16
#   bash benchmarks/gpu_check.sh bench-objects-vos  # 8 objects, tiny: our vos_optimized batched vs per
#                                              # object vs the reference's vos_optimized (compiles)
#
# Each step needs the wheels from scripts/prepare_gpu_wheels.sh (carry ".wheels"), installs
# them and this package offline, ends well inside the tool's 10 minutes (an internal time
# budget plus a hard `timeout`), and packs everything it produced into ONE archive,
# $OUT/gpu_check_<step>.tar.gz, next to a copy of its log. See benchmarks/README.md.
set -uo pipefail

STEP="${1:-}"
case "$STEP" in
    quick|correctness|bench|bench-8obj|bench-large|bench-refvos|bench-objects|bench-objects-vos|profile) ;;
    *) echo "usage: $0 quick|correctness|bench|profile|bench-8obj|bench-large|bench-refvos|bench-objects|bench-objects-vos" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
WORK="/tmp/gpu_check/$STEP"
LIMIT="${GPU_CHECK_LIMIT:-540}"   # hard stop for the step's main command (seconds)
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.wheels}"
# GPU_CHECK_SMOKE=1 shrinks every case (image_size 128, 3 frames, 96x128 video) so that the
# script's plumbing can be checked on a CPU machine (with PYTHON pointing at a scratch venv).
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    SIZE=(--image-size 128 --frames 3 --resolution 96x128); PSIZE=(--image-size 128 --frames 3 --resolution 96x128)
    LADDER=auto; PROFILES=("tiny ours" "tiny reference"); CENSUS=(--image-size 128 --frames 9)
else
    CENSUS=(--image-size 1024 --frames 9)
    SIZE=(--resolution 480p); PSIZE=(--resolution 480p --frames 24 --profile-frames 6)
    LADDER=all; PROFILES=("tiny ours" "tiny reference" "large ours" "tiny ours compiled")
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
LOG="$WORK/log.txt"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

pack() {
    echo "== step $STEP finished after $(elapsed)s; packing"
    cp "$LOG" "$OUT/gpu_check_${STEP}.log" 2>/dev/null
    tar -czf "$OUT/gpu_check_${STEP}.tar.gz" -C "$WORK" . && ls -la "$OUT"
}
trap pack EXIT

# ---- setup: environment record, wheels, this package --------------------------------------
{
    date -u; nvidia-smi; uname -a
    "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(torch.cuda.get_device_name(0))"
} > "$WORK/env.txt" 2>&1
head -20 "$WORK/env.txt"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no $WHEELS/*.whl here: run scripts/prepare_gpu_wheels.sh on a CPU machine and carry .wheels" >&2
    exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || exit 1
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e .; then
    # Fallback without setuptools' editable mode: a copy of the tree with kernels/ placed
    # where the package-dir mapping puts it (sam2_fast/kernels), run from that copy.
    echo "editable install failed; running from a copy at /tmp/src"
    rm -rf /tmp/src && mkdir -p /tmp/src && cp -r sam2_fast tests benchmarks pyproject.toml /tmp/src/
    cp -r kernels /tmp/src/sam2_fast/kernels && cp -r .wheels /tmp/src/ 2>/dev/null
    cd /tmp/src || exit 1
fi
"$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|sam2|sam2-fast|hydra-core|omegaconf|nvtx|av|pytest-benchmark) " \
    | tee -a "$WORK/env.txt"
"$PY" -c "import sam2_fast.kernels, sam2.build_sam, sam2_fast.bench.command" || exit 1
echo "== setup done after $(elapsed)s"
BUDGET=$(( LIMIT - $(elapsed) - 30 ))   # what the run may use, leaving time to print and pack

bench() {  # bench <name> <args...>: one side-by-side run with the step's time budget
    local name="$1"; shift
    timeout -k 10 $(( LIMIT - $(elapsed) )) "$PY" -m sam2_fast.bench --out "$WORK/bench" --time-budget "$BUDGET" "$@" \
        2>&1 | tee "$WORK/bench_${name}.txt"
}

case "$STEP" in
quick)
    # Priority order; each part has its own hard stop so a hang cannot eat the next ones.
    # 1. every candidate of each kernel slot at real shapes (~2.5 min with Triton compiles)
    KB=$(( LIMIT - $(elapsed) )); KB=$(( KB > 400 ? 170 : KB / 3 ))
    timeout -k 5 $(( KB + 20 )) "$PY" benchmarks/kernel_candidates.py --budget "$KB" --out "$WORK/kernels" \
        2>&1 | tee "$WORK/kernel_candidates.txt"
    echo "== kernels done after $(elapsed)s"
    # 2. the kernels' CUDA tests
    #    (the connected-components kernel's first GPU run goes last, on its own: a failure or a
    #    hang there must not stop the other kernels' tests under -x)
    timeout -k 5 100 "$PY" -m pytest tests/kernels -m cuda -q -rA -p no:cacheprovider -x \
        --deselect tests/kernels/test_connected_components.py \
        --junitxml="$WORK/junit_kernels_cuda.xml" 2>&1 | tail -40 | tee "$WORK/pytest_kernels_cuda.txt"
    timeout -k 5 45 "$PY" -m pytest tests/kernels/test_connected_components.py -m cuda -q -rA -p no:cacheprovider \
        2>&1 | tail -12 | tee -a "$WORK/pytest_kernels_cuda.txt"
    echo "== kernel tests done after $(elapsed)s"
    # 2b. the frame feed's first GPU run (pinned ring, async upload; opt-in until this passes),
    #     and hole filling's device plan (checks every 3 rounds on CUDA: CPU vs CUDA labels)
    timeout -k 5 40 "$PY" -m pytest tests/test_frames.py tests/test_eager_glue.py tests/test_masks.py -m cuda -q -rA \
        -p no:cacheprovider \
        2>&1 | tail -15 | tee "$WORK/pytest_frames_cuda.txt"
    # 3. tiny @480p, eager (no compile: the first H200 run spent > 5 min compiling the
    #    cuda-graphs row): ours bf16 with and without the kernel slots vs the reference bf16
    #    eager, 1 and 8 objects; the selection layer's choices print per row
    BUDGET=$(( LIMIT - $(elapsed) - 25 ))
    [ "$BUDGET" -gt 30 ] && bench quick --model tiny --objects 1,8 --frames 24 "${SIZE[@]}" \
        --ladder bf16,bf16-unbatched,bf16-kernels --reference ref-eager-fp32,ref-bf16
    # 3b. op census of the eager bf16 frame (kernel launches / syncs per stage, ours vs the
    #     reference; hard stop 30 s, before the profiles, which take whatever time is left)
    left=$(( LIMIT - $(elapsed) - 10 )); [ "$left" -ge 90 ] && timeout -k 5 30 "$PY" benchmarks/op_census.py \
        --dtype bf16 "${CENSUS[@]}" --json "$WORK/op_census_bf16.json" 2>&1 | tee "$WORK/op_census.txt"
    # 3c. the frame feed, fast vs plain (decides whether SAM2_FAST_CUDA_FEED becomes the default)
    left=$(( LIMIT - $(elapsed) - 10 )); [ "$left" -ge 90 ] && timeout -k 5 30 "$PY" benchmarks/bench_frame_feed.py \
        --device cuda --frames 24 --sizes 1024 --workers 2 2>&1 | tail -20 | tee "$WORK/frame_feed.txt"
    # 4. where the eager frame goes (top kernels/ops per stage), ours then the reference: the
    #    first H200 run found our eager bf16 slower than the reference's (32 vs 20 ms/frame)
    for impl in ours reference; do
        left=$(( LIMIT - $(elapsed) - 20 )); [ "$left" -lt 45 ] && break
        [ "$impl" = ours ] && left=$(( left / 2 ))
        timeout -k 5 "$left" "$PY" -m sam2_fast.cli profile --model tiny --impl "$impl" "${PSIZE[@]}" \
            --out "$WORK/profiles" 2>&1 | tail -80 | tee -a "$WORK/profile.txt"
    done
    rm -rf "$WORK/profiles/_traces"
    ;;
correctness)
    timeout -k 10 $(( LIMIT - $(elapsed) )) "$PY" -m pytest tests -m cuda -q -rA -p no:cacheprovider \
        --junitxml="$WORK/junit_cuda.xml" 2>&1 | tee "$WORK/pytest_cuda.txt"
    ;;
bench)
    bench tiny --model tiny --objects 1 --frames 48 "${SIZE[@]}" --ladder "$LADDER" \
        --reference ref-eager-fp32,ref-bf16
    ;;
bench-8obj)
    bench tiny8 --model tiny --objects 8 --frames 48 "${SIZE[@]}" --ladder "$LADDER" \
        --reference ref-eager-fp32,ref-bf16
    ;;
bench-large)
    bench large --model large --objects 1,8 --frames 32 "${SIZE[@]}" --ladder "$LADDER" \
        --reference ref-eager-fp32,ref-bf16
    ;;
bench-refvos)
    # The reference compiles five modules with max-autotune: minutes before its first frame.
    bench refvos --model tiny --objects 1 --frames 48 "${SIZE[@]}" --ladder none \
        --reference ref-eager-fp32,ref-bf16,ref-vos
    ;;
bench-objects)
    # issue 10: all objects in one pass against one step per object, same run (eager rows
    # warm up in seconds, so both models fit one call; tiny gets half of the time left)
    for m in tiny large; do
        share=1; [ "$m" = tiny ] && share=2
        BUDGET=$(( (LIMIT - $(elapsed) - 30) / share ))
        bench "objects_$m" --model "$m" --objects 8 --frames 24 "${SIZE[@]}" \
            --ladder bf16,bf16-unbatched --reference ref-bf16
    done
    ;;
bench-objects-vos)
    # the same with the fast runtime on both sides; 'default' compile mode: max-autotune's
    # compile alone took > 5 min on the first H200 run
    bench objects_vos --model tiny --objects 8 --frames 32 "${SIZE[@]}" --compile-mode default \
        --ladder cuda-graphs,cuda-graphs-unbatched --reference ref-vos
    ;;
profile)
    # op census first (both precisions; launches, memcpy and syncs per stage from the profiler)
    timeout -k 5 90 "$PY" benchmarks/op_census.py --dtype bf16,fp32 "${CENSUS[@]}" \
        --json "$WORK/op_census.json" 2>&1 | tee "$WORK/op_census.txt"
    # ours with hole filling: its syncs per frame on CUDA (3 rounds per check; NOTES 12-01)
    timeout -k 5 45 "$PY" benchmarks/op_census.py --dtype bf16 --fill-holes "${CENSUS[@]}" \
        --json "$WORK/op_census_fill_holes.json" 2>&1 | tee "$WORK/op_census_fill_holes.txt"
    # frame feed: main-thread ms/frame of the lazy source (pinned async feed vs the old
    # pageable upload) against preloaded frames, 480p file (NOTES.md "Frame feed"); hard 40 s
    timeout -k 5 40 "$PY" benchmarks/bench_frame_feed.py --device cuda --frames 32 \
        --sizes 1024,512 --workers 2 2>&1 | tee "$WORK/frame_feed.txt"
    left=${#PROFILES[@]}
    for spec in "${PROFILES[@]}"; do
        # Each run gets an equal share of what is left; quick runs leave more to later ones.
        per=$(( (LIMIT - 30 - $(elapsed)) / left )); left=$(( left - 1 ))
        set -- $spec
        extra=(); [ "${3:-}" = compiled ] && extra=(--compile)
        timeout -k 10 "$per" "$PY" -m sam2_fast.cli profile --model "$1" --impl "$2" "${PSIZE[@]}" "${extra[@]}" \
            --out "$WORK/profiles" 2>&1 | tee -a "$WORK/profile.txt"
    done
    # Traces: keep them only while the archive stays well under the tool's 16 MiB per file.
    traces=$(du -sb "$WORK/profiles/_traces" 2>/dev/null | cut -f1)
    if [ "${traces:-0}" -gt $(( 12 * 1024 * 1024 )) ]; then
        echo "traces too large to bring back; dropped"; rm -rf "$WORK/profiles/_traces"
    fi
    ;;
esac
