"""``sam2-fast track / segment / amg`` end to end with a generated checkpoint (official
format, sensitive random weights, image_size 128): what they write equals what the Python
API returns, and bad input gets one clear line and a non-zero exit."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from cli_harness import (SIZE, assert_clean_error, clip, run_cli, shared_checkpoint, tmp_leftovers, write_mp4)

import sam2_fast.commands.outputs as O  # noqa: E402

av = pytest.importorskip("av")
BIKES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bikes.mp4")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return write_mp4(str(folder / "clip.mp4"), clip(5, 96, 128))


def _model_args(ckpt):
    return ["--model", "tiny", "--checkpoint", ckpt, "--image-size", SIZE, "--device", "cpu"]


def _api_track(ckpt, video, prompts, **propagate):
    from sam2_fast.build_sam import build_sam2_video_predictor

    pred = build_sam2_video_predictor("sam2.1_hiera_tiny", ckpt, device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    state = pred.init_state(video)
    for frame, obj, kw in prompts:
        pred.add_new_points_or_box(state, frame, obj, **kw)
    return {f: (ids, (lg[:, 0] > 0).numpy()) for f, ids, lg in pred.propagate_in_video(state, **propagate)}


def _decode_rle_json(path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    with open(path) as f:
        data = json.load(f)
    return data, {o["id"]: mask_utils.decode(o["segmentation"]).astype(bool) for o in data["objects"]}


def _read_video(path):
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# ---------------------------------------------------------------------------- track
def test_track_writes_pngs_overlay_and_rle_equal_to_the_api(ckpt, video, tmp_path, capsys):
    pytest.importorskip("pycocotools")
    out = tmp_path / "out"
    res = run_cli(capsys, "track", video, *_model_args(ckpt), "--point", "0:1:40,30", "--box", "0:2:70,40,120,90",
                  "--save", "png,overlay,rle", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    assert "tracked 5 frames, 2 object(s)" in res.out and "frames/s" in res.out and "peak memory" in res.out
    want = _api_track(ckpt, video, [(0, 1, dict(points=[[40, 30]], labels=[1])),
                                    (0, 2, dict(box=[70, 40, 120, 90]))])
    assert sorted(os.listdir(out / "masks")) == [f"{i:05d}.png" for i in range(5)]
    for f, (ids, masks) in want.items():
        assert ids == [1, 2]
        png = Image.open(out / "masks" / f"{f:05d}.png")
        assert png.mode == "P" and png.size == (128, 96) and png.getpalette()[3:6] == [128, 0, 0]
        index = np.asarray(png)
        data, rle = _decode_rle_json(out / "rle" / f"{f:05d}.json")
        assert data["frame"] == f and (data["height"], data["width"]) == (96, 128)
        for k, obj in enumerate(ids):
            assert np.array_equal(rle[obj], masks[k]), (f, obj)  # column-major COCO RLE, decoded
            assert np.all((index == obj) <= masks[k])  # the PNG shows each object inside its mask
        assert np.array_equal(index > 0, masks.any(0))
    frames = _read_video(out / "overlay.mp4")
    assert len(frames) == 5 and frames[0].shape == (96, 128, 3)
    assert tmp_leftovers(str(out)) == []


def test_track_jpeg_folder_mask_prompt_reverse(ckpt, tmp_path, capsys):
    frames = clip(6, 64, 96)
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.jpg")
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    res = run_cli(capsys, "track", folder, *_model_args(ckpt), "--mask", f"4:3:{tmp_path / 'm.png'}",
                  "--reverse", "--max-frames", "2", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    assert sorted(os.listdir(out / "masks")) == ["00002.png", "00003.png", "00004.png"]
    assert set(np.unique(np.asarray(Image.open(out / "masks" / "00004.png")))) <= {0, 3}


def test_track_bikes(ckpt, tmp_path, capsys):
    if not os.path.exists(BIKES):
        pytest.skip("../shared/data/bikes.mp4 not present")
    pytest.importorskip("pycocotools")
    out = tmp_path / "bikes"
    res = run_cli(capsys, "track", BIKES, *_model_args(ckpt), "--point", "0:1:300,150", "--point", "0:1:320,120:0",
                  "--max-frames", "2", "--save", "png,overlay,rle", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    frames = _read_video(out / "overlay.mp4")
    assert len(frames) == 3 and frames[0].shape == (272, 640, 3)
    for f in range(3):
        index = np.asarray(Image.open(out / "masks" / f"{f:05d}.png"))
        _, rle = _decode_rle_json(out / "rle" / f"{f:05d}.json")
        assert index.shape == (272, 640) and np.array_equal(rle[1], index == 1)


# ---------------------------------------------------------------------------- segment, amg
def test_segment_png_json_and_multimask_equal_the_api(ckpt, tmp_path, capsys):
    pytest.importorskip("pycocotools")
    from sam2_fast.build_sam import build_sam2
    from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

    img = clip(1, 90, 120)[0]
    Image.fromarray(img).save(tmp_path / "img.png")
    pred = SAM2ImagePredictor(build_sam2("sam2.1_hiera_tiny", ckpt, device="cpu",
                                         hydra_overrides_extra=[f"++model.image_size={SIZE}"]))
    pred.set_image(img)
    masks, scores, _ = pred.predict(point_coords=[[50, 40]], point_labels=[1], multimask_output=True)
    order = np.argsort(-scores)
    res = run_cli(capsys, "segment", tmp_path / "img.png", *_model_args(ckpt), "--point", "50,40",
                  "--out", tmp_path / "m.png", "--multimask")
    assert res.code == 0, res.err
    for k, j in enumerate(order):
        got = np.asarray(Image.open(tmp_path / f"m_{k}.png")) > 0
        assert np.array_equal(got, masks[j] > 0) and f"score {scores[j]:.4f}" in res.out
    res = run_cli(capsys, "segment", tmp_path / "img.png", *_model_args(ckpt), "--box", "10,10,80,70",
                  "--out", tmp_path / "box.json")
    assert res.code == 0, res.err
    masks, scores, _ = pred.predict(box=[10, 10, 80, 70], multimask_output=False)
    import pycocotools.mask as mask_utils

    data = json.load(open(tmp_path / "box.json"))
    assert np.array_equal(mask_utils.decode(data["segmentation"]).astype(bool), masks[0] > 0)
    assert abs(data["score"] - float(scores[0])) < 1e-6


@pytest.mark.parametrize("fmt", ["png", "coco_rle"])
def test_amg_equal_to_the_generator(ckpt, tmp_path, capsys, fmt):
    if fmt == "coco_rle":
        pytest.importorskip("pycocotools")
    pytest.importorskip("torchvision")
    from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2_fast.build_sam import build_sam2

    img = clip(1, 80, 100)[0]
    Image.fromarray(img).save(tmp_path / "img.png")
    opts = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    gen = SAM2AutomaticMaskGenerator(build_sam2("sam2.1_hiera_tiny", ckpt, device="cpu",
                                                hydra_overrides_extra=[f"++model.image_size={SIZE}"]), **opts)
    want = gen.generate(img)
    res = run_cli(capsys, "amg", tmp_path / "img.png", *_model_args(ckpt), "--out", tmp_path / "o", "--format", fmt,
                  "--points-per-side", 3, "--pred-iou-thresh", 0, "--stability-score-thresh", 0)
    assert res.code == 0, res.err
    index = json.load(open(tmp_path / "o" / "masks.json"))
    assert len(index["masks"]) == len(want) > 0
    for rec, w in zip(index["masks"], want):
        assert rec["bbox"] == w["bbox"] and rec["area"] == w["area"] and rec["predicted_iou"] == w["predicted_iou"]
        if fmt == "png":
            got = np.asarray(Image.open(tmp_path / "o" / rec["file"])) > 0
        else:
            import pycocotools.mask as mask_utils

            got = mask_utils.decode(rec["segmentation"]).astype(bool)
        assert np.array_equal(got, w["segmentation"])


def test_help_shows_examples(capsys):
    for cmd in ("track", "segment", "amg", "download"):
        res = run_cli(capsys, cmd, "--help")
        assert res.code == 0 and "examples:" in res.out, cmd


# ---------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path, video, ckpt):
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(5000))
    data = open(video, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "afile").write_text("x")
    ok = ["--point", "0:1:40,30"]
    return [
        (["track", tmp_path / "missing.mp4", *ok], "video not found"),
        (["track", tmp_path / "garbage.mp4", *ok], "garbage.mp4"),
        (["track", tmp_path / "truncated.mp4", *ok], "truncated.mp4"),
        (["track", video, "--point", "9:1:40,30"], "frame 9 is past the end of the video (5 frames"),
        (["track", video, "--point", "0:1:40;30"], "--point '0:1:40;30'"),
        (["track", video, "--point", "0:1:40,30:7"], "label must be 1"),
        (["track", video, "--point", "0:0:40,30"], "OBJ must be an object id"),
        (["track", video, "--point", "0:1:400,30"], "outside the 128x96 frame"),
        (["track", video], "no prompt given"),
        (["track", video, *ok, "--save", "gif"], "--save 'gif'"),
        (["track", video, *ok, "--model", "huge"], "unknown model 'huge'"),
        (["track", video, *ok, "--model", "small"], "is for sam2.1_hiera_tiny, not sam2.1_hiera_small"),
        (["track", video, *ok, "--out", tmp_path / "afile"], "is a file"),
        (["track", "-", *ok], "streaming tracker"),
        (["segment", tmp_path / "afile", "--point", "1,1"], "cannot read image"),
        (["segment", video, "--point", "1,1", "--out", tmp_path / "m.gif"], ".png"),
        (["amg", tmp_path / "nope.png"], "image not found"),
    ]


def test_bad_input_gets_one_clear_line(ckpt, video, tmp_path, capsys):
    for argv, needle in _bad_cases(tmp_path, video, ckpt):
        cmd, rest = argv[0], argv[1:]
        if "--out" not in rest:
            rest = [*rest, "--out", tmp_path / ("o.png" if cmd == "segment" else "o")]
        model = [a for a in _model_args(ckpt) if not ("--model" in rest and a in ("--model", "tiny"))]
        res = run_cli(capsys, cmd, *rest, *model, *(["--no-progress"] if cmd == "track" else []))
        assert_clean_error(res, needle)


def test_missing_checkpoint_says_how_to_download(video, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAM2_FAST_HOME", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    res = run_cli(capsys, "track", video, "--model", "tiny", "--point", "0:1:4,3", "--out", tmp_path / "o")
    assert_clean_error(res, "sam2-fast download sam2.1_hiera_tiny")


def test_full_disk_mid_run_leaves_only_whole_files(ckpt, video, tmp_path, capsys, monkeypatch):
    real, calls = O.os.replace, []

    def replace(src, dst):  # the third file finds the disk full
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(O.os, "replace", replace)
    out = tmp_path / "out"
    res = run_cli(capsys, "track", video, *_model_args(ckpt), "--point", "0:1:40,30", "--save", "png,overlay",
                  "--out", out, "--no-progress")
    monkeypatch.undo()
    assert_clean_error(res, "No space left on device")
    assert sorted(os.listdir(out / "masks")) == ["00000.png", "00001.png"]
    for name in os.listdir(out / "masks"):
        Image.open(out / "masks" / name).load()  # whole PNGs
    assert tmp_leftovers(str(out)) == [] and not os.path.exists(out / "overlay.mp4")
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_read_only_output_folder(ckpt, video, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the full-disk test covers failed writes")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    res = run_cli(capsys, "track", video, *_model_args(ckpt), "--point", "0:1:4,3", "--out", ro / "sub")
    assert_clean_error(res, "cannot write to the output folder")


def test_interrupted_run_keeps_finished_frames_and_says_where_to_resume(ckpt, video, tmp_path, capsys, monkeypatch):
    real = O.write_png

    def write_png(path, image):
        if path.endswith("00003.png"):
            raise KeyboardInterrupt
        real(path, image)

    monkeypatch.setattr(O, "write_png", write_png)
    out = tmp_path / "out"
    res = run_cli(capsys, "track", video, *_model_args(ckpt), "--point", "0:1:40,30", "--save", "png,overlay",
                  "--out", out, "--no-progress")
    assert res.code == 130 and "Traceback" not in res.err
    assert "3 frames written" in res.out and "resume with --start 3" in res.out
    assert sorted(os.listdir(out / "masks")) == ["00000.png", "00001.png", "00002.png"]
    assert len(_read_video(out / "overlay.mp4")) == 3 and tmp_leftovers(str(out)) == []
    monkeypatch.undo()
    res = run_cli(capsys, "track", video, *_model_args(ckpt), "--point", "0:1:40,30", "--start", 3,
                  "--out", out, "--no-progress")
    assert res.code == 0 and len(os.listdir(out / "masks")) == 5


def test_generator_from_pretrained_finds_the_local_checkpoint(ckpt, monkeypatch):
    pytest.importorskip("torchvision")
    from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator

    monkeypatch.setenv("SAM2_FAST_CHECKPOINT_DIR", os.path.dirname(ckpt))
    gen = SAM2AutomaticMaskGenerator.from_pretrained("facebook/sam2.1-hiera-tiny", image_size=SIZE, device="cpu",
                                                     points_per_side=2, pred_iou_thresh=0.0)
    assert gen.predictor.model.image_size == SIZE and len(gen.point_grids[0]) == 4 and gen.pred_iou_thresh == 0.0
    assert isinstance(gen.generate(clip(1, 40, 50)[0]), list)


def test_own_yaml_config_as_model(ckpt, tmp_path, capsys):
    """--model my.yaml (a changed copy of an official config) with its --checkpoint: the same
    masks as the preset where the change does not touch images; clear lines without one."""
    import sam2

    official = os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2.1", "sam2.1_hiera_t.yaml")
    text = open(official).read()
    assert "memory_temporal_stride_for_eval" not in text
    custom = tmp_path / "my tiny.yaml"
    custom.write_text(text.replace("  num_maskmem: 7", "  num_maskmem: 7\n  memory_temporal_stride_for_eval: 2"))
    img = clip(1, 90, 120)[0]
    Image.fromarray(img).save(tmp_path / "img.png")
    common = ["--point", "50,40", "--image-size", SIZE, "--device", "cpu", "--checkpoint", ckpt]
    res = run_cli(capsys, "segment", tmp_path / "img.png", "--model", "tiny", *common, "--out", tmp_path / "a.png")
    assert res.code == 0, res.err
    res = run_cli(capsys, "segment", tmp_path / "img.png", "--model", custom, *common, "--out", tmp_path / "b.png")
    assert res.code == 0, res.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    from sam2_fast.commands.models import resolve_model
    from sam2_fast.config import resolve_config
    assert resolve_config(resolve_model(str(custom)).config).memory_temporal_stride_for_eval == 2
    res = run_cli(capsys, "segment", tmp_path / "img.png", "--model", custom, "--point", "50,40",
                  "--out", tmp_path / "c.png")
    assert_clean_error(res, "your own config", "--checkpoint")
    res = run_cli(capsys, "segment", tmp_path / "img.png", "--model", tmp_path / "nope.yaml", *common,
                  "--out", tmp_path / "c.png")
    assert_clean_error(res, "config file not found")
    assert_clean_error(run_cli(capsys, "download", custom), "no published checkpoint")
