"""CUDA-graph capture of the static-shape per-frame steps.

A tracked frame launches on the order of a thousand small kernels (Hiera blocks, four
memory-attention layers, the two-way transformer, the ConvNeXt fuser); at batch 1 the CPU
cannot issue them as fast as an H100 runs them. :class:`GraphedStep` captures one step
into a ``torch.cuda.CUDAGraph`` per input signature and replays it: inputs are copied into
the graph's static buffers, the graph replays, and the outputs are cloned out (a replay
overwrites them, and the predictor keeps outputs across frames).

Why our own capture rather than ``torch.compile(mode="reduce-overhead")``:
* the memory attention's inputs are the static bank's persistent buffers, which a manual
  graph reads in place (``static_argnums``); cudagraph trees copy or refuse inputs that are
  mutated between runs;
* one mechanism for compiled and eager steps alike (graphs work with ``compile=False``);
* capture failures degrade per signature to eager, counted, instead of per process.

Signatures: tensor shapes/dtypes/devices plus the non-tensor arguments (e.g.
``multimask_output``) and the autocast state; a new object count is a new signature and is
captured on first use. At most ``max_graphs`` are kept per step (each holds its own memory
pool); beyond that the least recently used one is dropped and the new signature captured,
so a model reused for videos with many different object counts (up to 5 object buckets x 2
bank buckets for the memory attention) keeps replaying the shapes it currently sees, where
it used to run every signature past the 8th eagerly for good. Warm-up runs
on a side stream before capture, as CUDA graphs require (lazy inits, cuBLAS workspaces,
compilation and autotuning all happen there, never inside the capture).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


def graphs_unavailable_reason(device: "torch.device | str") -> Optional[str]:
    """Why CUDA graphs cannot run for ``device`` (None when they can)."""
    if torch.device(device).type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


class _Captured:
    __slots__ = ("replay", "inputs", "outputs")

    def __init__(self, replay: Callable[[], None], inputs: List[Any], outputs: Any) -> None:
        self.replay, self.inputs, self.outputs = replay, inputs, outputs


class CudaGraphBackend:
    """Warm-up on a side stream, then capture into a ``torch.cuda.CUDAGraph`` (private pool).

    Kept separate from :class:`GraphedStep` so the bookkeeping around it (signatures,
    static inputs, cloned outputs) can be exercised on CPU with a stand-in backend.
    """

    device_type = "cuda"

    def capture(self, run: Callable[[], Any], warmup: int) -> Tuple[Callable[[], None], Any]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: frame-decoding threads may touch CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = run()  # recorded, not executed: the caller replays before reading
        return graph.replay, outputs

    def recover(self) -> None:
        torch.cuda.synchronize()


def _signature(leaves: Sequence[Any], spec: Any) -> Hashable:
    parts: List[Hashable] = [str(spec), torch.is_inference_mode_enabled()]
    if torch.is_autocast_enabled("cuda"):
        parts.append(("autocast", torch.get_autocast_dtype("cuda")))
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            parts.append(("const", leaf))
    return tuple(parts)


class GraphedStep:
    """Callable replaying a CUDA graph of ``fn`` per input signature.

    ``static_argnums``: positional tensor arguments that are persistent buffers (same
    storage every call); the graph reads them in place instead of copying them.
    Grad-enabled calls run ``fn`` eagerly (graphs here are for inference).
    """

    def __init__(self, fn: Callable[..., Any], name: str, *, warmup: int = 3, max_graphs: int = 8,
                 static_argnums: Sequence[int] = (), counters: Optional[collections.Counter] = None,
                 backend: Optional[Any] = None) -> None:
        self.fn, self.name = fn, name
        self.backend = backend if backend is not None else CudaGraphBackend()
        # False only for callers that consume each output before the next call (tests mutate it)
        self.clone_outputs = True
        self.warmup, self.max_graphs = warmup, max_graphs
        self.static_argnums = frozenset(static_argnums)
        self.counters = counters if counters is not None else collections.Counter()
        # signature -> graph, least recently used first; a signature whose capture failed is
        # in ``errors`` instead and runs eagerly from then on
        self._graphs: "collections.OrderedDict[Hashable, _Captured]" = collections.OrderedDict()
        self.errors: Dict[Hashable, str] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self.counters[f"graph_eager[{self.name}]: grad enabled"] += 1
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if any(isinstance(t, Tensor) and t.device.type != self.backend.device_type for t in leaves):
            return self.fn(*args, **kwargs)
        key = _signature(leaves, spec)
        entry = self._graphs.get(key)
        if entry is None and key not in self.errors:
            while len(self._graphs) >= self.max_graphs:  # drop the least recently used (and its pool)
                self._graphs.popitem(last=False)
                self.counters[f"graph_evictions[{self.name}]"] += 1
            static_ids = {id(args[i]) for i in self.static_argnums if i < len(args)}
            entry = self._capture(key, leaves, spec, static_ids)
            if entry is not None:
                self._graphs[key] = entry
        if entry is None:
            self.counters[f"graph_eager_calls[{self.name}]"] += 1
            return self.fn(*args, **kwargs)
        self._graphs.move_to_end(key)
        for dst, src in zip(entry.inputs, leaves):
            if isinstance(dst, Tensor) and dst.data_ptr() != src.data_ptr():
                dst.copy_(src)  # a static argument in a new buffer is copied like any other
        entry.replay()
        self.counters[f"graph_replays[{self.name}]"] += 1
        if not self.clone_outputs:
            return entry.outputs
        # clone: the next replay overwrites the graph's outputs in place
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.outputs)

    def _static_inputs(self, leaves: Sequence[Any], static_ids: set) -> List[Any]:
        # tensors get a graph-owned copy, except persistent buffers passed as static arguments
        return [leaf.clone() if isinstance(leaf, Tensor) and id(leaf) not in static_ids else leaf
                for leaf in leaves]

    def _capture(self, key: Hashable, leaves: Sequence[Any], spec: Any, static_ids: set) -> Optional[_Captured]:
        inputs = self._static_inputs(leaves, static_ids)
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        try:
            replay, outputs = self.backend.capture(lambda: self.fn(*args, **kwargs), self.warmup)
        except Exception as exc:  # capture is an optimisation: fall back to eager, say why
            self.backend.recover()
            self.errors[key] = f"{type(exc).__name__}: {exc}"
            self.counters[f"graph_capture_failed[{self.name}]"] += 1
            return None
        self.counters[f"graph_captures[{self.name}]"] += 1
        return _Captured(replay, inputs, outputs)

    def reset(self) -> None:
        """Drop every captured graph (their memory pools are freed with them)."""
        self._graphs.clear()
        self.errors.clear()


def graph_method(owner: Any, attr: str, name: str, counters: collections.Counter,
                 static_argnums: Sequence[int] = (), backend: Optional[Any] = None
                 ) -> Tuple[GraphedStep, Callable[[], None]]:
    """Replace ``owner.<attr>`` (a callable attribute, e.g. a module's forward) by a graphed
    version of its current value; returns (the step, undo)."""
    had = attr in owner.__dict__
    old = owner.__dict__.get(attr)
    step = GraphedStep(getattr(owner, attr), name, static_argnums=static_argnums, counters=counters,
                       backend=backend)
    setattr(owner, attr, step)

    def undo() -> None:
        step.reset()
        if had:
            setattr(owner, attr, old)
        else:
            owner.__dict__.pop(attr, None)

    return step, undo


# The bank core reads the staged buffers in place: (curr, curr_pos, mem, mem_pos, key_ok,
# num_spatial_slots); the last is an int, part of the graph signature.
BANK_STATIC_ARGNUMS = (2, 3, 4)


def install_graphs(predictor: Any, bank: Optional[Any], counters: collections.Counter,
                   backend: Optional[Any] = None) -> Tuple[Dict[str, GraphedStep], List[Callable[[], None]]]:
    """Graph the per-frame steps of a predictor: image encoder (fixed input), mask decoder and
    memory encoder (one graph per object count / prompt shape) and, with a static bank, the
    memory attention (one graph per bucket). Returns ({name: step}, undo functions)."""
    steps = [(predictor.image_encoder, "forward", "image_encoder", ()),
             (predictor.sam_mask_decoder, "forward", "mask_decoder", ()),
             (predictor.memory_encoder, "forward", "memory_encoder", ())]
    if bank is not None:
        steps.append((bank, "core", "memory_attention", BANK_STATIC_ARGNUMS))
    graphed, undo = {}, []
    for owner, attr, name, static in steps:
        graphed[name], undo_one = graph_method(owner, attr, name, counters, static_argnums=static,
                                               backend=backend)
        undo.append(undo_one)
    return graphed, undo
