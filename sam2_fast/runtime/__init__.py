"""The fast runtime behind ``build_sam2_video_predictor(..., vos_optimized=True)``.

:func:`enable_fast_runtime` configures a built predictor in place (nothing is subclassed and
the state dict is untouched): bf16 autocast around the per-frame work, TF32, the static
memory bank, ``torch.compile`` of the image encoder / memory attention / mask decoder /
memory encoder and CUDA-graph replay of those steps. What it enabled, and why anything
was skipped, is recorded in ``predictor.runtime_info``; live counters (bank fallbacks,
graph captures and replays) sit in ``predictor.runtime_info["counters"]``.

Call it after the predictor is on its final device (``.to(...)``); calling it again
replaces the previous configuration, and :func:`disable_fast_runtime` undoes it.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Dict, List, Optional

import torch

from sam2_fast.runtime.settings import RuntimeSettings, apply_dynamo_config, apply_inductor_config, runtime_settings

__all__ = ["enable_fast_runtime", "disable_fast_runtime", "runtime_settings", "RuntimeSettings"]

_UNDO_ATTR = "_fast_runtime_undo"


def _patch(owner: Any, attr: str, new: Any) -> Callable[[], None]:
    """Set an instance attribute (shadowing the class's method); returns the undo."""
    had = attr in owner.__dict__
    old = owner.__dict__.get(attr)
    setattr(owner, attr, new)

    def undo() -> None:
        if had:
            setattr(owner, attr, old)
        else:
            owner.__dict__.pop(attr, None)

    return undo


def _is_compiled(fn: Any) -> bool:
    # torch.compile wraps callables in a function carrying the original as _torchdynamo_orig_callable
    return hasattr(fn, "_torchdynamo_orig_callable") or hasattr(fn, "_orig_mod")


_FP32_OUTPUT_KEYS = ("obj_ptr", "object_score_logits")


def _autocast_method(fn: Callable[..., Any], device_type: str, dtype: torch.dtype, cache: bool,
                     to_fp32: bool = False):
    """``fn`` run under autocast. ``to_fp32``: small per-frame outputs that the session
    stores go back to fp32, so the rest of the predictor sees the dtypes it does eagerly."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        # cache_enabled=False when graphs capture: cached casts would be freed after capture
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            out = fn(*args, **kwargs)
        if to_fp32 and isinstance(out, dict):
            for key in _FP32_OUTPUT_KEYS:
                value = out.get(key)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
                    out[key] = value.float()
        return out

    return run


def disable_fast_runtime(predictor) -> Any:
    """Undo :func:`enable_fast_runtime` (global TF32 / inductor settings included)."""
    for undo in reversed(predictor.__dict__.pop(_UNDO_ATTR, [])):
        undo()
    predictor.__dict__.pop("runtime_info", None)
    return predictor


def enable_fast_runtime(predictor, *, dtype: Optional[torch.dtype] = None, compile: Optional[bool] = None,
                        cuda_graphs: Optional[bool] = None, static_bank: Optional[bool] = None,
                        compile_backend: Optional[str] = None, compile_mode: Optional[str] = None,
                        extra_cond_frames: int = 2):
    """Configure ``predictor`` (a SAM2Base / SAM2VideoPredictor) for fast tracking; returns it.

    ``None`` picks the device default (see :func:`runtime_settings`): on CUDA bf16 +
    compile + CUDA graphs + static bank; on CPU fp32 eager with the static bank.
    ``compile_backend`` overrides the inductor backend (tests use "aot_eager" on CPU);
    ``compile_mode`` the torch.compile mode (default on CUDA: "max-autotune-no-cudagraphs").
    """
    for part in ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder", "track_step"):
        if not hasattr(predictor, part):
            raise TypeError(f"enable_fast_runtime needs a SAM 2 model; {type(predictor).__name__} has no {part}")
    disable_fast_runtime(predictor)
    device = predictor.device
    s = runtime_settings(device, dtype=dtype, compile=compile, cuda_graphs=cuda_graphs,
                         static_bank=static_bank, compile_backend=compile_backend,
                         compile_mode=compile_mode, extra_cond_frames=extra_cond_frames)
    counters: collections.Counter = collections.Counter()
    undo: List[Callable[[], None]] = []
    skipped: Dict[str, str] = {}
    info: Dict[str, Any] = {"device": str(device), "settings": s.as_dict(), "counters": counters,
                            "skipped": skipped}
    try:
        _apply_globals(s, undo, info)
        bank = _install_bank(predictor, s, counters, undo, info, skipped)
        _compile_parts(predictor, s, bank, undo, info, skipped)
        _graph_parts(predictor, s, bank, counters, undo, info, skipped, device)
        _prompts_run_eager(predictor, undo, info)
        info["autocast"] = None
        if s.autocast:  # on CPU only when asked for (dtype=...): the CPU default is fp32
            dev, cache = s.device_type, not s.cuda_graphs
            for name in ("forward_image", "track_step", "track_objects_step", "_encode_new_memory"):
                if not hasattr(predictor, name):
                    continue
                wrapped = _autocast_method(getattr(predictor, name), dev, s.dtype, cache,
                                           to_fp32=(name in ("track_step", "track_objects_step")))
                undo.append(_patch(predictor, name, wrapped))
            info["autocast"] = str(s.dtype).replace("torch.", "")
        _install_weight_cache(predictor, s, undo, info, skipped)
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    predictor.__dict__[_UNDO_ATTR] = undo
    predictor.runtime_info = info
    return predictor


def _install_weight_cache(predictor, s: RuntimeSettings, undo, info, skipped) -> None:
    """Eager autocast: cached bf16 weights instead of two cast kernels per Linear/Conv call
    (``weight_cache.py``; ~300 of ~1000 launches of a tiny frame)."""
    info["weight_cache"] = 0
    if not s.autocast:
        return
    if s.compile or s.cuda_graphs:
        skipped["weight_cache"] = "compiled or graphed steps: inductor fuses the casts / a replay launches none"
        return
    from sam2_fast.runtime.weight_cache import install

    count, remove = install(predictor)
    undo.append(remove)
    info["weight_cache"] = count


def _apply_globals(s: RuntimeSettings, undo: List[Callable[[], None]], info: Dict[str, Any]) -> None:
    if s.allow_tf32:
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        def restore_tf32() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

        undo.append(restore_tf32)
    info["tf32"] = s.allow_tf32
    if s.compile and s.inductor_config:
        previous = apply_inductor_config(s.inductor_config)
        undo.append(lambda: apply_inductor_config(previous))
        info["inductor_config"] = {k: s.inductor_config[k] for k in previous}
    else:
        info["inductor_config"] = {}
    import torch._dynamo.config as dynamo_cfg  # never lower a limit the user raised

    previous_dynamo = apply_dynamo_config({k: max(v, getattr(dynamo_cfg, k, v)) for k, v in s.dynamo_config.items()})
    if previous_dynamo:
        undo.append(lambda: apply_dynamo_config(previous_dynamo))
    info["dynamo_config"] = {k: s.dynamo_config[k] for k in previous_dynamo}


def _install_bank(predictor, s: RuntimeSettings, counters, undo, info, skipped):
    from sam2_fast.runtime.static_bank import bank_for, check_supported

    info["static_bank"] = None
    if not s.static_bank:
        skipped["static_bank"] = s.reasons["static_bank"] + " (off)"
        return None
    if predictor.num_maskmem == 0:
        skipped["static_bank"] = "num_maskmem == 0: the model has no memory"
        return None
    reason = check_supported(predictor.memory_attention)
    if reason is not None:
        skipped["static_bank"] = reason
        return None
    bank = bank_for(predictor, extra_cond_frames=s.extra_cond_frames, counters=counters)
    undo.append(bank.install())
    hw = (predictor.image_size // predictor.backbone_stride) ** 2
    info["static_bank"] = bank.describe(hw)
    predictor.__dict__["_fast_runtime_bank"] = bank
    undo.append(lambda: predictor.__dict__.pop("_fast_runtime_bank", None))
    return bank


def _compile_parts(predictor, s: RuntimeSettings, bank, undo, info, skipped) -> None:
    compiled: Dict[str, Any] = {}
    info["compiled"] = compiled
    if not s.compile:
        skipped["compile"] = s.reasons["compile"]
        return
    targets = {"image_encoder": predictor.image_encoder, "memory_encoder": predictor.memory_encoder,
               "mask_decoder": predictor.sam_mask_decoder}
    for name, module in targets.items():
        if _is_compiled(module.forward):
            skipped[f"compile.{name}"] = "already compiled (compile_image_encoder in the config)"
            continue
        kwargs = dict(s.compile_kwargs[name])
        undo.append(_patch(module, "forward", torch.compile(module.forward, **kwargs)))
        compiled[name] = kwargs
    skipped["compile.prompt_encoder"] = ("a few embedding lookups; its input length changes with every "
                                         "click, so compiling it would mostly recompile")
    if bank is not None:
        kwargs = dict(s.compile_kwargs["memory_attention"])
        undo.append(_patch(bank, "core", torch.compile(bank.padded_forward, **kwargs)))
        compiled["memory_attention"] = kwargs
    else:
        skipped["compile.memory_attention"] = "no static bank: variable key length would recompile per frame"


def _prompts_run_eager(predictor, undo, info) -> None:
    """Prompted decodes (clicks, boxes, mask prompts) skip the compiled / graphed decoder.

    Their sparse-token count changes with every click (1 click: 2 tokens, 4 clicks: 5, a box
    and a click: 4 ...), and each new count compiled the decoder again (CPU census: 4 clicks,
    a box and a box + click = 6 compiles; minutes each under max-autotune on a GPU, and
    dynamo's recompile limit of 8 then silently turns the decoder eager for good) and
    captured one more CUDA graph. A prompt is one decoder call per user action, so eager
    costs nothing the user sees; tracked frames keep the compiled, graphed decoder."""
    from sam2_fast.modeling.sam2_heads import prompted_decode

    decoder = predictor.sam_mask_decoder
    fast = decoder.__dict__.get("forward")
    if fast is None:  # neither compiled nor graphed
        return
    eager = type(decoder).forward.__get__(decoder)

    def forward(*args, **kwargs):
        return (eager if prompted_decode() else fast)(*args, **kwargs)

    undo.append(_patch(decoder, "forward", forward))
    info["mask_decoder_prompts"] = "eager (token count changes per click)"


def _graph_parts(predictor, s: RuntimeSettings, bank, counters, undo, info, skipped, device) -> None:
    from sam2_fast.runtime.graphs import graphs_unavailable_reason, install_graphs

    info["cuda_graphs"] = []
    if not s.cuda_graphs:
        skipped["cuda_graphs"] = s.reasons["cuda_graphs"]
        return
    reason = graphs_unavailable_reason(device)
    if reason is not None:
        skipped["cuda_graphs"] = reason
        return
    graphed, undo_graphs = install_graphs(predictor, bank, counters)
    undo.extend(undo_graphs)
    info["cuda_graphs"] = list(graphed)
