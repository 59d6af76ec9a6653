"""The model imports the kernel dispatchers only where a kernel could run; triton stays optional.

Each check runs a fresh interpreter (what is imported is process state): a tiny Hiera trunk
and one memory-attention layer's RoPE core run on CPU and report which modules got loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


_PROBE = r"""
import json, sys
BLOCK = {BLOCK}
if BLOCK:  # an install without triton (a platform it does not support): imports fail
    sys.modules["triton"] = None
import torch
from sam2_fast.config import resolve_config
from sam2_fast.modeling.hiera import Hiera
from sam2_fast.modeling.rope import axial_rope_table, rope_attention_core
torch.manual_seed(0)
trunk = Hiera(resolve_config("sam2.1_hiera_tiny").trunk).eval()
with torch.no_grad():
    feats = trunk(torch.randn(1, 3, 64, 64))
    cos, sin = axial_rope_table(32, 4, 4)
    q = torch.randn(1, 1, 16, 32)
    out = rope_attention_core(q, torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32), cos, sin,
                              repeat_k=True, num_k_exclude=8)
print(json.dumps({{"dispatch": "sam2_fast.kernels.dispatch" in sys.modules,
                   "shapes": [list(f.shape) for f in feats] + [list(out.shape)]}}))
"""


def _probe(block_triton: bool, force: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM2_FAST_")}
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    if force:
        env["SAM2_FAST_FORCE_KERNELS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(BLOCK=block_triton)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_default_never_imports_the_dispatchers():
    got = _probe(block_triton=False, force=False)
    assert got["dispatch"] is False
    assert got["shapes"][-1] == [1, 1, 16, 32]


def test_without_triton_the_model_runs_its_pytorch_paths():
    """Even with the force switch set, a missing triton means the PyTorch paths, no error."""
    got = _probe(block_triton=True, force=True)
    assert got["dispatch"] is False
    assert got["shapes"][-1] == [1, 1, 16, 32] and len(got["shapes"]) == 5  # 4 trunk levels + attention
