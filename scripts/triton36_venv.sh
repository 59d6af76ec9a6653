#!/usr/bin/env bash
# Make a second, small venv with triton 3.6 (what the lent GPU machines run) and run the
# ahead-of-time compile check of sam2_fast.kernels under it.
#
# The venv holds only triton 3.6 (+ pytest, numpy); torch and the rest come from the project
# venv through a .pth file that is appended *after* the venv's own site-packages, so
# `import triton` resolves to 3.6 while `import torch` uses the project's torch (the AOT check
# never runs torch's own Triton code, so the version pin of torch does not matter there).
#
# Usage: scripts/triton36_venv.sh [VENV_DIR] [extra pytest args]
set -euo pipefail
top=$(git rev-parse --show-toplevel) && cd "$top"
venv=${1:-/tmp/sam2_fast_triton36}
shift || true
proj_site=$("$top/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -x "$venv/bin/python" ]; then
    "$top/.venv/bin/python" -m venv "$venv"
    "$venv/bin/pip" install -q "triton==3.6.0" numpy pytest
fi
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir appends the project's site-packages after ours and runs its .pth files (the
# editable-install finder of sam2_fast lives there).
echo "import site; site.addsitedir('$proj_site')" > "$site/zz_sam2_fast_project.pth"
"$venv/bin/python" -c "import triton, torch, sam2_fast.kernels; print('triton', triton.__version__, 'torch', torch.__version__)"
env -u TRITON_INTERPRET OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -m aot tests/kernels/test_aot_compile.py "$@"
