"""``sam2-fast bench --task amg`` on a tiny CPU case: both rows run on the same image and
weights, the files are written, and the accuracy column tells a faithful generator from a
broken one (no timing is asserted: numbers on a shared CPU mean nothing)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sam2")
pytest.importorskip("torchvision")

from sam2_fast.bench import command  # noqa: E402
from sam2_fast.utils import amg as amg_utils  # noqa: E402

TINY = ["--task", "amg", "--image-size", "128", "--resolution", "64x96", "--points-per-side", "3",
        "--amg-settings", "all", "--threads", "1"]


def _run(tmp_path):
    args = command.build_parser().parse_args(TINY + ["--out", str(tmp_path)])
    (result,) = command.run(args, log=lambda *a: None)
    rows = {r["key"]: r for r in result["rows"]}
    return result, rows


def test_amg_bench_rows_files_and_accuracy(tmp_path, monkeypatch):
    result, rows = _run(tmp_path)
    assert set(rows) == {"ref-fp32", "amg-fp32"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["masks"] == 27 and r["ms_per_image"] > 0 and r["masks_per_s"] > 0  # 3x3 points x 3 masks, no filter
    ours = rows["amg-fp32"]
    assert ours["miou"] > 0.999 and ours["min_iou"] > 0.99 and ours["count_diff"] == 0 and ours["score_err"] < 1e-5
    with open(result["paths"]["json"]) as f:
        data = json.load(f)
    assert data["case"]["task"] == "amg" and data["meta"]["card"] == "cpu"
    assert open(result["paths"]["csv"]).read().count("\n") == 3

    # a planted bug in our RLE encoder (runs shifted by one pixel) shows in the accuracy column
    real = amg_utils.mask_to_rle_pytorch
    monkeypatch.setattr(amg_utils, "mask_to_rle_pytorch",
                        lambda t: real(t.roll(shifts=7, dims=2)))
    _, rows = _run(tmp_path)
    assert rows["amg-fp32"]["min_iou"] < 0.99, rows["amg-fp32"]


def test_amg_bench_bad_image_is_named(tmp_path):
    args = command.build_parser().parse_args(TINY + ["--image", str(tmp_path / "nope.png")])
    with pytest.raises(SystemExit, match="nope.png.*does not exist"):
        command.run(args, log=lambda *a: None)


def test_default_settings_keep_masks_with_random_weights(tmp_path, monkeypatch):
    """Without --checkpoint the default (auto -> random-weights) keeps masks, so the accuracy
    columns compare something; the official settings keep none of a random model's masks
    and the run says so."""
    base = [a for a in TINY if a not in ("--amg-settings", "all")] + ["--points-per-side", "4"]
    logs = []
    args = command.build_parser().parse_args(base + ["--out", str(tmp_path)])
    (result,) = command.run(args, log=logs.append)
    assert result["case"]["settings"] == "random-weights"
    assert all(r["masks"] > 0 for r in result["rows"]), result["rows"]
    args = command.build_parser().parse_args(base + ["--amg-settings", "official", "--out", str(tmp_path)])
    logs.clear()
    (result,) = command.run(args, log=logs.append)
    assert all(r["masks"] == 0 for r in result["rows"])
    assert any("compare nothing" in str(line) for line in logs)
