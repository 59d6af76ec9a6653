"""The online-softmax step shared by the attention kernels (Triton device code)."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """Fold one key block into the running softmax state.

    s: (M, N) fp32 scores already scaled to log2 units, -inf where a key is invalid;
    v: (N, D) values; m_i, l_i: (M,) running max and normaliser; acc: (M, D) fp32.
    Returns the updated (m, l, acc).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_new, acc
