"""``sam2-fast track-many`` end to end on CPU with a generated checkpoint (image_size 128):
the local process pool and a local Ray cluster each track a manifest of 6 small videos to
the same files as 6 single-video ``sam2-fast track`` runs, survive a worker killed mid-video
(retried on another worker), do no work on a rerun, and fail bad lines one by one."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from cli_harness import SIZE, assert_clean_error, run_cli, shared_checkpoint, tmp_leftovers, write_mp4
from video_utils import make_clip

from sam2_fast.batch import worker as W

pytest.importorskip("av")
pytest.importorskip("pycocotools")

LENGTHS = (3, 5, 4, 3, 5, 4)  # frames per video; 48x64 each
OPTS = ["--workers", "2", "--threads", "1", "--save", "png,rle"]


def _prompts(i: int):
    """Per video: a click (two on odd videos, one of them background) and a box."""
    pts = [[20, 22]] + ([[50, 10]] if i % 2 else [])
    return [{"frame": 0, "obj": 1, "points": pts, "labels": [1] + ([0] if i % 2 else [])},
            {"frame": 0, "obj": 3, "box": [30, 12, 62, 44]}]


def _track_args(i: int):
    args = []
    for p in _prompts(i):
        if "points" in p:
            for (x, y), lab in zip(p["points"], p["labels"]):
                args += ["--point", f"{p['frame']}:{p['obj']}:{x},{y}:{lab}"]
        else:
            args += ["--box", f"{p['frame']}:{p['obj']}:" + ",".join(map(str, p["box"]))]
    return args


def _model(ckpt):
    return ["--model", "tiny", "--checkpoint", str(ckpt), "--image-size", str(SIZE), "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return shared_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 videos, the manifest of their lines, the lines themselves."""
    folder = tmp_path_factory.mktemp("many")
    lines = []
    for i, n in enumerate(LENGTHS):
        write_mp4(str(folder / f"v{i}.mp4"), make_clip(n, 48, 64, seed=10 + i))
        lines.append({"video": f"v{i}.mp4", "prompts": _prompts(i)})
    manifest = folder / "videos.jsonl"
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return folder, manifest, lines


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory):
    """What single-video ``sam2-fast track`` writes for each line."""
    folder, _, _ = data
    out = tmp_path_factory.mktemp("ref")
    import torch

    from sam2_fast.cli import main

    # one thread, as every worker below (--threads 1): fp32 sums in another order move a few
    # border pixels (2 of 3072 on one frame at 1 vs 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(len(LENGTHS)):
            code = main(["track", str(folder / f"v{i}.mp4"), *_model(ckpt), *_track_args(i), "--save", "png,rle",
                         "--out", str(out / f"v{i}"), "--no-progress"])
            assert code == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def assert_same_as_track(out, ref, names):
    for name in names:
        want = [f for f in _files(ref / name)]
        got = [f for f in _files(out / name) if f != W.MARKER]
        assert got == want and len(want) > 0, (name, got, want)
        for f in want:
            if f.endswith(".png"):
                a, b = Image.open(out / name / f), Image.open(ref / name / f)
                assert a.mode == b.mode == "P" and a.getpalette() == b.getpalette()
                assert np.array_equal(np.asarray(a), np.asarray(b)), (name, f)
            else:
                assert json.loads((out / name / f).read_text()) == json.loads((ref / name / f).read_text()), (name, f)


def _status(out):
    return [json.loads(l) for l in (out / "status.jsonl").read_text().splitlines()]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _mtimes(out):
    return {f: os.stat(out / f).st_mtime_ns for f in _files(out) if f not in ("status.jsonl", "summary.json")}


# ---------------------------------------------------------------------------- local pool
def test_local_pool_equals_track_survives_a_kill_fails_bad_lines_alone_and_resumes(ckpt, data, reference, tmp_path,
                                                                                   capsys, monkeypatch):
    folder, manifest, lines = data
    bad = tmp_path / "mixed.jsonl"
    extra = ['{"video": "v0.mp4", "prompts": [ {"frame": 0, "obj": 1, "points": [[1, 2]]\n',  # malformed JSON
             json.dumps({"video": "nowhere.mp4", "prompts": _prompts(0)}) + "\n",
             json.dumps({"video": str(folder / "v2.mp4"), "id": "late",
                         "prompts": [{"frame": 7, "obj": 1, "points": [[5, 5]]}]})
             + "\n"]
    mixed = [json.dumps({**l, "video": str(folder / l["video"])}) + "\n" for l in lines]
    bad.write_text("".join(mixed[:3] + extra + mixed[3:]))
    out = tmp_path / "out"
    monkeypatch.setenv(W.FAULT_ENV, f"v4={tmp_path / 'fault.flag'}")
    res = run_cli(capsys, "track-many", bad, *_model(ckpt), *OPTS, "--out", out)
    assert res.code == 1, res.err  # some lines failed
    assert (tmp_path / "fault.flag").exists() and "died (exit code 70) while tracking v4" in res.out
    recs = {r["line"]: r for r in _status(out)}
    assert sorted(recs) == list(range(1, 10))
    by_name = {r["name"]: r for r in recs.values() if r["name"]}
    for i, n in enumerate(LENGTHS):
        r = by_name[f"v{i}"]
        assert r["status"] == "done" and r["frames"] == n and r["seconds"] > 0 and r["worker"].startswith("local-")
        assert r["attempts"] == (2 if i == 4 else 1)
    assert recs[4]["status"] == "failed" and recs[4]["error"].startswith("manifest line 4: not valid JSON")
    assert recs[5]["status"] == "failed" and "video not found" in recs[5]["error"] and "nowhere.mp4" in recs[5]["error"]
    assert recs[6]["status"] == "failed" and recs[6]["error"] == \
        "prompts[0]: frame 7 is past the end of the video (4 frames, 0..3)"
    s = _summary(out)
    assert (s["done"], s["failed"], s["tracked"], s["worker_deaths"]) == (6, 3, 6, 1)
    assert s["frames"] == sum(LENGTHS) and s["frames_per_s"] > 0
    per = s["workers"].values()  # which workers did what depends on timing; the totals do not
    assert all(w.startswith("local-") for w in s["workers"]) and sum(w["frames"] for w in per) == sum(LENGTHS)
    assert sum(w["videos"] for w in per) == 6 and all(w["frames_per_s"] > 0 for w in per if w["frames"])
    assert f"6 done (0 already done), 3 failed; {sum(LENGTHS)} frames tracked" in res.out
    assert_same_as_track(out, reference, [f"v{i}" for i in range(6)])
    assert tmp_leftovers(str(out)) == [] and os.listdir(out / "late") == [W.FAILED_MARKER]
    assert recs[6].get("input_error") and not recs[5].get("input_error")  # (a bad line never reached a worker)

    # a rerun of the same manifest: the input failure is reported again, not retried
    from sam2_fast.cli import _parser
    from sam2_fast.commands import track_many

    def plan(manifest, *extra):
        args = _parser().parse_args(["track-many", str(manifest), *_model(ckpt), *OPTS, *extra, "--out", str(out)])
        return track_many.plan(args, str(out), lambda _m: None)

    _, records, pending = plan(bad)
    assert pending == [] and records[6]["status"] == "failed" and records[6]["skipped"]
    assert records[6]["error"] == recs[6]["error"] and records[6]["input_error"]
    _, records, pending = plan(bad, "--retry-failed")
    assert [t.name for t in pending] == ["late"]

    # the same videos again (from another manifest naming them the same way): nothing to do
    monkeypatch.delenv(W.FAULT_ENV)
    before = _mtimes(out)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(mixed))
    res = run_cli(capsys, "track-many", good, *_model(ckpt), *OPTS, "--out", out)
    assert res.code == 0, res.err
    assert "6 videos: 0 to track, 6 already done" in res.out and "local workers" not in res.out
    assert _mtimes(out) == before and _summary(out)["tracked"] == 0
    assert all(r["skipped"] and r["status"] == "done" for r in _status(out))

    # a frame lost: that video is partial and redone (alone), the others are left as they are
    os.remove(out / "v1" / "masks" / "00002.png")
    res = run_cli(capsys, "track-many", good, *_model(ckpt), *OPTS, "--out", out)
    assert res.code == 0 and "6 videos: 1 to track, 5 already done" in res.out, res.out
    after = _mtimes(out)
    assert all(after[f] == t for f, t in before.items() if not f.startswith("v1"))
    assert_same_as_track(out, reference, ["v1"])

    # the data set moved (another folder, a manifest naming the new paths): still done
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    moved_manifest = tmp_path / "moved.jsonl"
    moved_manifest.write_text("".join(json.dumps({**l, "video": str(moved / l["video"])}) + "\n" for l in lines))
    _, records, pending = plan(moved_manifest)
    assert pending == [] and all(r["skipped"] and r["status"] == "done" for r in records.values())

    # other outputs asked for: another options hash, so every video is to be redone
    args = _parser().parse_args(["track-many", str(good), *_model(ckpt), "--save", "png", "--out", str(out)])
    _, records, pending = track_many.plan(args, str(out), lambda _m: None)
    assert records == {} and sorted(t.name for t in pending) == [f"v{i}" for i in range(6)]


# ---------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # one small cluster for the module: start-up takes seconds; 2 CPUs as the test machine
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
                 configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - a machine where Ray cannot start is not our bug
        pytest.skip(f"a local Ray cluster cannot start here: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


def test_ray_equals_track_survives_a_kill_and_reruns_nothing(ray_cluster, ckpt, data, reference, tmp_path, capsys,
                                                             monkeypatch):
    folder, manifest, lines = data
    out = tmp_path / "out"
    monkeypatch.setenv(W.FAULT_ENV, f"v2={tmp_path / 'fault.flag'}")
    res = run_cli(capsys, "track-many", manifest, *_model(ckpt), "--ray", *OPTS, "--out", out)
    assert res.code == 0, res.err + res.out
    assert "Ray cluster (2 CPUs, " in res.out and "2 actor(s), 1 CPU(s) each" in res.out
    assert (tmp_path / "fault.flag").exists() and "while tracking v2; retrying on another worker" in res.out
    recs = {r["name"]: r for r in _status(out)}
    assert [recs[f"v{i}"]["attempts"] for i in range(6)] == [1, 1, 2, 1, 1, 1]
    assert all(r["status"] == "done" and r["worker"].startswith("ray-") for r in recs.values())
    s = _summary(out)
    assert (s["done"], s["failed"], s["worker_deaths"], s["frames"]) == (6, 0, 1, sum(LENGTHS))
    assert_same_as_track(out, reference, [f"v{i}" for i in range(6)])
    assert tmp_leftovers(str(out)) == []
    monkeypatch.delenv(W.FAULT_ENV)
    before = _mtimes(out)
    res = run_cli(capsys, "track-many", manifest, *_model(ckpt), "--ray", *OPTS, "--out", out)
    assert res.code == 0 and "0 to track, 6 already done" in res.out and "Ray cluster" not in res.out
    assert _mtimes(out) == before


def test_ray_missing_says_how_to_install(ckpt, data, tmp_path, capsys, monkeypatch):
    _, manifest, _ = data
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    res = run_cli(capsys, "track-many", manifest, *_model(ckpt), "--ray", "--out", tmp_path / "o")
    assert res.code == 2
    assert_clean_error(res, "--ray needs Ray", "pip install 'sam2-fast[ray]'")
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


# ---------------------------------------------------------------------------- bad input
def test_bad_invocations_get_one_line(ckpt, data, tmp_path, capsys):
    _, manifest, _ = data
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "afile").write_text("x")
    cases = [
        ([tmp_path / "nope.jsonl"], "manifest not found"),
        ([tmp_path], "is a folder"),
        ([tmp_path / "empty.jsonl"], "has no lines"),
        ([manifest, "--workers", 0], "--workers must be >= 1"),
        ([manifest, "--max-attempts", 0], "--max-attempts must be >= 1"),
        ([manifest, "--save", "gif"], "--save 'gif'"),
        ([manifest, "--model", "huge"], "unknown model 'huge'"),
        ([manifest, "--out", tmp_path / "afile"], "is a file"),
    ]
    for argv, needle in cases:
        model = [a for a in _model(ckpt) if not ("--model" in argv and a in ("--model", "tiny"))]
        out = [] if "--out" in argv else ["--out", tmp_path / "o"]
        res = run_cli(capsys, "track-many", *argv, *model, *out)
        assert res.code == 2, (argv, res)
        assert_clean_error(res, needle)
