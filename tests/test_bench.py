"""The benchmark harness and the profile command on a tiny CPU case.

No timing is asserted (numbers on a shared CPU mean nothing); what is checked is that the
runner measures both implementations on the same clip, records the fields the reports
promise, that its accuracy column reports agreement for a faithful implementation and
disagreement for a deliberately wrong one, and that FLOPs are attributed per stage.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
import torch

pytest.importorskip("sam2", reason="the reference sam2 package is needed for side-by-side runs")

from sam2_fast.bench import command, impls, profile  # noqa: E402
from sam2_fast.bench.flops import attention_flops, flop_counter  # noqa: E402
from sam2_fast.bench.ladder import RowSpec  # noqa: E402
from sam2_fast.bench.runner import Case, run_rows  # noqa: E402
from sam2_fast.bench.stages import StageTimer  # noqa: E402
from sam2_fast.bench.video import synthetic_clip  # noqa: E402
from sam2_fast.profiling import listening, stage  # noqa: E402

TINY = ["--image-size", "128", "--frames", "3", "--resolution", "72x104", "--threads", "1"]


def _ours_flag():
    """No flag: the bench measures our predictor. If ``sam2_fast.build_sam`` does not import,
    fail here (a stand-in would silently benchmark the reference as "ours")."""
    ours = impls.ours_impl()
    assert ours.available and ours.label == "sam2_fast", f"our predictor is not available: {ours.missing}"
    return []


def test_bench_json_csv_and_accuracy(tmp_path):
    args = command.build_parser().parse_args(
        TINY + _ours_flag() + ["--ladder", "eager-fp32", "--reference", "ref-eager-fp32", "--out", str(tmp_path)])
    (result,) = command.run(args, log=lambda *a: None)
    with open(result["paths"]["json"]) as f:
        data = json.load(f)
    for key in ("date", "card", "driver", "torch", "triton", "commit"):
        assert key in data["meta"], key
    assert data["meta"]["card"] == "cpu"
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == {"ref-eager-fp32", "eager-fp32"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["frames"] == 3 and r["timed_frames"] == 3
        for key in ("fps", "p50_ms", "p99_ms", "warmup_s", "peak_host_mib", "miou", "min_iou", "logit_rel_err"):
            assert isinstance(r[key], float) and r[key] == r[key], (key, r[key])  # a number, not NaN
        assert r["fps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["accuracy_vs"] == "ref-eager-fp32"
        assert set(r["stage_ms"]) >= {"image_encoder", "memory_attention", "sam_heads", "memory_encoder"}
    # Identical weights, identical clip: a faithful implementation agrees with the reference.
    ours = rows["eager-fp32"]
    assert ours["impl_label"] == "sam2_fast" and rows["ref-eager-fp32"]["impl_label"] != "sam2_fast"
    assert ours["miou"] > 0.999 and ours["min_iou"] > 0.99, ours
    assert ours["logit_rel_err"] < 1e-3, ours  # parity tests hold 1e-4 per frame; this is a sanity bound
    # FLOPs are counted per stage, attention included.
    flops = data["floor"]["stage_flops"]
    assert flops["image_encoder"] > 1e9 and flops["memory_attention"] > 1e8, flops
    with open(result["paths"]["csv"]) as f:
        lines = list(csv.DictReader(f))
    assert [l["key"] for l in lines] == ["ref-eager-fp32", "eager-fp32"]
    assert lines[0]["card"] == "cpu" and lines[1]["torch"] == torch.__version__


def test_accuracy_column_catches_a_wrong_implementation():
    """Mutation: 'ours' silently runs at another input size; the accuracy column must show it."""
    ref = impls.reference_impl()

    def wrong_builder(cfg, ckpt, **kw):
        kw["hydra_overrides_extra"] = ["++model.image_size=160"]
        return ref.builder(cfg, ckpt, **kw)

    mutant = impls.Impl("ours", "mutant", wrong_builder, False)
    case = Case(model="tiny", image_size=128, frames=3, objects=2, device="cpu")
    clip = synthetic_clip(3, 72, 104, 2, seed=3)
    rows = [(RowSpec("ref-eager-fp32", "reference", "golden", golden=True), None),
            (RowSpec("eager-fp32", "ours", "mutant"), None)]
    torch.set_num_threads(1)
    res = {r["key"]: r for r in run_rows(rows, case, clip, mutant, ref, torch.device("cpu"), log=lambda *a: None)}
    bad = res["eager-fp32"]
    assert bad["status"] == "ok", bad
    assert bad["logit_rel_err"] > 1e-2, bad  # >= 100x the parity tolerance
    assert res["ref-eager-fp32"]["logit_rel_err"] == 0.0


def test_attention_flops_registered_for_cpu_sdpa():
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 29, 8), torch.randn(2, 3, 29, 5)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected = 2 * 2 * 3 * 17 * 29 * (8 + 5)
    assert attention_flops(q.shape, k.shape, v.shape) == expected
    assert counter.get_total_flops() == expected


class _FakeCounter:
    def __init__(self):
        self.total = 0

    def get_total_flops(self):
        return self.total


def test_broken_build_sam_fails_instead_of_benchmarking_the_reference(monkeypatch):
    """Mutation: ``sam2_fast.build_sam`` fails to import. The harness reports our predictor
    as missing (naming the import error) and the bench tests' guard fails."""
    monkeypatch.setitem(sys.modules, "sam2_fast.build_sam", None)  # import raises ImportError
    ours = impls.ours_impl()
    assert not ours.available and "build_sam" in ours.missing
    with pytest.raises(AssertionError, match="our predictor is not available"):
        _ours_flag()


def test_stage_timer_attributes_nested_work_exclusively():
    fake = _FakeCounter()
    timer = StageTimer(torch.device("cpu"), fake)
    with listening(timer):
        timer.begin_frame()
        fake.total += 5  # before any stage -> other
        with stage("image_encoder"):
            fake.total += 100
            with stage("memory_attention"):
                fake.total += 30
                with stage("memory_attention"):  # re-entry (model + outside wrap) counts once
                    fake.total += 7
            fake.total += 1
        timer.end_frame()
    assert timer.frames_flops == [{"other": 5, "image_encoder": 101, "memory_attention": 37}]
    assert set(timer.frames_ms[0]) == {"other", "image_encoder", "memory_attention"}


def test_profile_writes_report(tmp_path):
    impl = "ours"
    _ours_flag()  # fails (instead of profiling the reference) when sam2_fast.build_sam is broken
    args = profile.build_parser().parse_args(
        TINY + ["--impl", impl, "--profile-frames", "2", "--out", str(tmp_path / "profiles")])
    out = profile.run(args, log=lambda *a: None)
    folder = tmp_path / "profiles" / "cpu" / ("tiny" if impl == "ours" else "reference-tiny")
    assert out["out_dir"] == str(folder)
    for name in ("report.md", "latency.png", "memory.png", "stages.png", "summary.json"):
        assert (folder / name).stat().st_size > 0, name
    text = (folder / "report.md").read_text()
    assert "| image_encoder |" in text and "memory_attention" in text and "Top ops" in text
    assert os.path.exists(out["summary"]["trace"])
    assert str(tmp_path / "profiles" / "_traces") in out["summary"]["trace"]


def test_instrument_restores_instance_patches():
    """Wrapping from outside must put back methods someone patched on the instance (the runtime does)."""
    from sam2_fast.profiling import instrument

    class Model(torch.nn.Module):
        def forward_image(self, x):
            return x + 1

        def _forward_sam_heads(self, x):
            return x * 2

    m = Model()
    runtime_patch = lambda x: x - 5  # noqa: E731 - stands in for a runtime's instance patch
    m.forward_image = runtime_patch
    seen = []

    class Spy:
        def enter(self, name):
            seen.append(("in", name))

        def exit(self, name):
            seen.append(("out", name))

    with instrument(m) as found, listening(Spy()):
        assert m.forward_image(torch.tensor(1.0)).item() == -4.0  # the runtime's patch still runs
        assert m._forward_sam_heads(torch.tensor(1.0)).item() == 2.0
    assert found == ["image_encoder", "sam_heads"]
    assert seen == [("in", "image_encoder"), ("out", "image_encoder"), ("in", "sam_heads"), ("out", "sam_heads")]
    assert m.forward_image is runtime_patch
    assert "_forward_sam_heads" not in m.__dict__


@pytest.mark.parametrize("argv, needle", [
    (["--model", "huge"], "unknown model 'huge'"),
    (["--resolution", "12p"], "bad resolution '12p'"),
    (["--ladder", "turbo"], "unknown row(s) ['turbo']"),
    (["--objects", "0"], "--objects must be positive"),
    (["--video", "/no/such/clip.mp4"], "does not exist"),
])
def test_bench_rejects_bad_options_by_name(argv, needle):
    args = command.build_parser().parse_args(argv + ["--no-floor"])
    with pytest.raises(SystemExit) as info:
        command.run(args, log=lambda *a: None)
    assert needle in str(info.value)


@pytest.mark.cuda
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_and_profile_on_cuda(tmp_path):
    """The CUDA paths of the harness (events, device memory, kernel launches) on a small case."""
    args = command.build_parser().parse_args(
        ["--device", "cuda", "--image-size", "256", "--frames", "4", "--resolution", "120x200", "--objects", "2",
         "--ladder", "eager-fp32,bf16", "--reference", "ref-eager-fp32,ref-bf16", "--repeats", "1",
         "--out", str(tmp_path)] + _ours_flag())
    (result,) = command.run(args, log=lambda *a: None)
    rows = {r["key"]: r for r in result["rows"]}
    assert result["floor"]["matmul"]["dtype"] == "bfloat16" and result["floor"]["matmul"]["tflops"] > 1
    for key in ("ref-eager-fp32", "ref-bf16", "eager-fp32", "bf16"):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["peak_device_mib"] > 0 and r["p50_ms"] > 0
    assert rows["eager-fp32"]["logit_rel_err"] < 1e-3
    assert rows["bf16"]["miou"] > 0.9 and rows["ref-bf16"]["miou"] > 0.9
    impl = "ours"
    pargs = profile.build_parser().parse_args(
        ["--device", "cuda", "--impl", impl, "--image-size", "256", "--frames", "4", "--resolution", "120x200",
         "--profile-frames", "2", "--out", str(tmp_path / "profiles")])
    out = profile.run(pargs, log=lambda *a: None)
    assert out["summary"]["profiler"]["device_launches_per_frame"] > 0
    assert os.path.isdir(out["out_dir"]) and os.sep + "cpu" + os.sep not in out["out_dir"]


def test_per_object_table_reports_cost_per_object():
    from sam2_fast.bench.report import per_object_table

    def case(n, ms_ours, ms_ref):
        return {"case": {"objects": n}, "rows": [
            {"key": "eager-fp32", "status": "ok", "fps": 1e3 / ms_ours, "p50_ms": ms_ours},
            {"key": "ref-eager-fp32", "status": "ok", "fps": 1e3 / ms_ref, "p50_ms": ms_ref},
            {"key": "cuda-graphs", "status": "n/a"}]}

    table = per_object_table([case(8, 120.0, 800.0), case(1, 100.0, 100.0)])
    lines = table.splitlines()
    assert lines[0].split() == ["row", "objects", "frames/s", "p50", "ms/frame", "ms", "per", "object", "x", "vs",
                                "fewest"]
    rows = [l.split() for l in lines[2:]]
    assert rows == [["eager-fp32", "1", "10.00", "100.0", "100.00", "1.00"],
                    ["eager-fp32", "8", "8.33", "120.0", "15.00", "1.20"],
                    ["ref-eager-fp32", "1", "10.00", "100.0", "100.00", "1.00"],
                    ["ref-eager-fp32", "8", "1.25", "800.0", "100.00", "8.00"]]


def test_unbatched_rows_run_one_step_per_object_and_only_when_named():
    """The batching's baselines (issue 10's GPU comparison) switch the product's per-object
    path on for their row only, and are not part of the auto / all ladders."""
    import torch

    from sam2_fast.bench.ladder import select_rows
    from sam2_fast.bench.runner import row_settings
    from sam2_fast.video import propagate

    cpu = torch.device("cpu")
    assert not any(r.per_object for r, _ in select_rows(cpu, "all", "none"))
    assert not any(r.per_object for r, _ in select_rows(cpu, "auto", "none"))
    (row, _), = select_rows(cpu, "bf16-unbatched", "none")
    assert row.per_object and row.runtime is not None
    assert propagate.TRACK_PER_OBJECT is False
    with row_settings(row, cpu):
        assert propagate.TRACK_PER_OBJECT is True
    assert propagate.TRACK_PER_OBJECT is False
