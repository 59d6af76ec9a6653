"""``inference_state["images"]``: the official frames tensor's reading side, without the tensor.

The official predictor keeps every frame of a session in one (N, 3, S, S) float32 tensor
(N x 12 MiB at S = 1024). Code written for it reads that tensor: ``images.shape``,
``len(images)``, ``images[t]``, ``images[a:b]``. :class:`FramesView` answers the same reads
from the lazy frame source: the shape is known without decoding, an integer index decodes
one frame, and a slice or a list of indices stacks just those frames.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch


class FramesView:
    """Read-only, tensor-like view of a frame source (see the module docstring)."""

    ndim = 4
    dtype = torch.float32

    def __init__(self, source: Any) -> None:
        self._source = source

    @property
    def shape(self) -> torch.Size:
        s = int(self._source.image_size)
        return torch.Size((len(self._source), 3, s, s))

    @property
    def device(self) -> torch.device:
        return self._source.device

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self._source[i]

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, tuple):  # images[t, c, ...]: pick the frame(s), then index them
            return self[idx[0]][idx[1:]] if len(idx) > 1 else self[idx[0]]
        if isinstance(idx, torch.Tensor) and idx.dim() == 0:
            idx = idx.item()
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            return self._source[int(idx)]  # (3, S, S)
        if isinstance(idx, slice):
            frames = range(*idx.indices(len(self)))
        elif isinstance(idx, (list, range, np.ndarray, torch.Tensor)):
            items = idx.tolist() if hasattr(idx, "tolist") else list(idx)
            if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in items):
                raise TypeError(f"inference_state['images'] takes a list of frame indices (ints), got {items[:4]}")
            frames = [int(i) for i in items]
        else:
            raise TypeError(f"inference_state['images'] is indexed by frame: an int, a slice or a list of "
                            f"ints, got {type(idx).__name__}")
        return self._stack(frames)

    def _stack(self, frames: Sequence[int]) -> torch.Tensor:
        if len(frames) == 0:
            return torch.empty((0,) + tuple(self.shape[1:]), dtype=self.dtype, device=self.device)
        return torch.stack([self._source[i] for i in frames])  # (n, 3, S, S)

    def __getattr__(self, name: str) -> Any:
        # num_resident, hint, video_height, ... of the underlying source
        if name.startswith("__") or name == "_source":
            raise AttributeError(name)
        return getattr(self._source, name)

    def __repr__(self) -> str:
        return f"FramesView(shape={tuple(self.shape)}, dtype=float32, device={self.device}, source={self._source!r})"
