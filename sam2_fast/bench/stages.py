"""Split each frame's time (and FLOPs) into the stages marked by ``sam2_fast.profiling``.

Time between two stage boundaries belongs to the innermost open stage, so nested stages
are counted once (exclusive time). On CUDA the boundaries are CUDA events, read back once
per frame; on CPU they are ``perf_counter`` readings. While a FLOP counter is attached,
its running total is read at every boundary and the difference is attributed the same way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from sam2_fast.profiling import OTHER


class StageTimer:
    """A :class:`sam2_fast.profiling.StageListener` collecting per-frame stage times."""

    def __init__(self, device: torch.device, flop_counter=None) -> None:
        self.cuda = device.type == "cuda"
        self.flop_counter = flop_counter
        self.frames_ms: List[Dict[str, float]] = []
        self.frames_flops: List[Dict[str, float]] = []
        self._stack: List[str] = []
        self._reentered: Dict[str, int] = defaultdict(int)
        self._marks: list = []  # (clock, label of the interval that starts here, flops so far)
        self._open = False

    # -- clock -----------------------------------------------------------------------
    def _clock(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _mark(self) -> None:
        label = self._stack[-1] if self._stack else OTHER
        flops = self.flop_counter.get_total_flops() if self.flop_counter is not None else 0
        self._marks.append((self._clock(), label, flops))

    def _capturing(self) -> bool:
        # Events recorded inside a CUDA-graph capture would be meaningless: skip them.
        return self.cuda and torch.cuda.is_current_stream_capturing()

    # -- listener protocol -----------------------------------------------------------
    def enter(self, name: str) -> None:
        if not self._open or self._capturing():
            return
        if name in self._stack:  # the same stage marked twice (model code + outside wrap)
            self._reentered[name] += 1
            return
        self._stack.append(name)
        self._mark()

    def exit(self, name: str) -> None:
        if not self._open or self._capturing():
            return
        if self._reentered.get(name):
            self._reentered[name] -= 1
            return
        if not self._stack or self._stack[-1] != name:
            return  # unbalanced exit (an exception unwound a stage): ignore it
        self._stack.pop()
        self._mark()

    # -- frames ----------------------------------------------------------------------
    def begin_frame(self) -> None:
        self._stack, self._marks, self._open = [], [], True
        self._reentered.clear()
        self._mark()

    def end_frame(self) -> None:
        if not self._open:
            return
        self._stack = []
        self._mark()
        self._open = False
        ms: Dict[str, float] = defaultdict(float)
        flops: Dict[str, float] = defaultdict(float)
        if self.cuda:
            self._marks[-1][0].synchronize()
        for (c0, label, f0), (c1, _, f1) in zip(self._marks, self._marks[1:]):
            ms[label] += c0.elapsed_time(c1) if self.cuda else (c1 - c0) * 1e3
            flops[label] += f1 - f0
        self.frames_ms.append(dict(ms))
        self.frames_flops.append(dict(flops))

    def discard_frame(self) -> None:
        """Drop the frame begun after the last yield (the generator ended: none follows)."""
        self._stack, self._marks, self._open = [], [], False

    # -- summaries -------------------------------------------------------------------
    def mean_ms(self, skip_first: bool = True) -> Dict[str, float]:
        return _mean(self.frames_ms[1:] if skip_first and len(self.frames_ms) > 1 else self.frames_ms)

    def mean_flops(self, skip_first: bool = True) -> Dict[str, float]:
        return _mean(self.frames_flops[1:] if skip_first and len(self.frames_flops) > 1 else self.frames_flops)

    def last_flops(self) -> Optional[Dict[str, float]]:
        return dict(self.frames_flops[-1]) if self.frames_flops else None


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    if not rows:
        return {}
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}
