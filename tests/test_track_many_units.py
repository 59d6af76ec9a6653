"""``sam2-fast track-many`` without workers: the scheduler on an in-process backend
(longest first, one video per worker, retries elsewhere, giving up) with product mutations,
and the manifest parser's error messages."""

from __future__ import annotations

import json

import pytest

from sam2_fast.batch import worker as W

# ---------------------------------------------------------------------------- scheduler (in-process backend)
class FakeBackend:
    """Runs each task at once in this process; ``die`` maps a video name to how many of its
    tries kill the worker. Records every hand-out so the test can check the order."""

    def __init__(self, die=None, fatal=None, die_loading=False):
        self.die, self.fatal, self.die_loading = dict(die or {}), fatal, die_loading
        self.handed, self.inflight, self.n, self.starting = [], {}, 0, []

    def _new(self):
        self.n += 1
        self.starting.append(f"w{self.n - 1}")
        return f"w{self.n - 1}"

    def start(self, n):
        return [self._new() for _ in range(n)]

    def submit(self, wid, task):
        assert wid not in self.inflight  # back-pressure: one video per worker at a time
        self.inflight[wid] = task
        self.handed.append((task.name, wid))

    def wait(self, timeout):
        from sam2_fast.batch.scheduler import Event

        if self.starting:  # workers report ready (or that the model failed) first
            ready, self.starting = self.starting, []
            if self.die_loading:
                return [Event(w, died="killed by SIGSEGV") for w in ready]
            return [Event(w, fatal=self.fatal) if self.fatal else Event(w, ready=True) for w in ready]
        events = []
        for wid, task in sorted(self.inflight.items())[:1]:  # one finishes per wait
            del self.inflight[wid]
            if self.die.get(task.name, 0) > 0:
                self.die[task.name] -= 1
                events.append(Event(wid, died="exit code 70"))
            else:
                events.append(Event(wid, record=W.record(task, "done", wid, task.frames, 0.1)))
        return events

    def replace(self, wid):
        return self._new()

    def stop(self):
        pass


def _tasks(frames):
    from sam2_fast.batch.manifest import Task

    return [Task(i + 1, f"v{i}", f"/v{i}.mp4", {}, f"/o/v{i}", frames=n) for i, n in enumerate(frames)]


def test_scheduler_longest_first_one_per_worker_and_retries_elsewhere():
    from sam2_fast.batch.scheduler import run_tasks

    b = FakeBackend(die={"v1": 1})
    res = run_tasks(_tasks([3, 9, 5, 1, 7]), b, workers=2, max_attempts=3, log=lambda _m: None, poll=0)
    first = [name for name, _ in b.handed]
    assert first[:2] == ["v1", "v4"]  # the two longest start first
    died_on = next(w for n, w in b.handed if n == "v1")
    retried_on = [w for n, w in b.handed if n == "v1"][1]
    assert retried_on != died_on
    assert {r["name"]: r["attempts"] for r in res.records.values()} == {"v0": 1, "v1": 2, "v2": 1, "v3": 1, "v4": 1}
    assert res.deaths == 1 and all(r["status"] == "done" for r in res.records.values())


def test_scheduler_gives_up_after_max_attempts_and_stops_when_workers_cannot_start():
    from sam2_fast.batch.scheduler import run_tasks
    from sam2_fast.commands.models import CliError

    res = run_tasks(_tasks([3, 4]), FakeBackend(die={"v1": 99}), workers=2, max_attempts=3, log=lambda _m: None,
                    poll=0)
    bad = res.records[2]
    assert bad["status"] == "failed" and bad["attempts"] == 3
    assert "died (exit code 70) on each of 3 tries" in bad["error"]
    assert res.records[1]["status"] == "done"
    with pytest.raises(CliError, match="could not load the model: checkpoint is for sam2.1_hiera_large"):
        run_tasks(_tasks([3]), FakeBackend(fatal="checkpoint is for sam2.1_hiera_large"), 1, 3, lambda _m: None, poll=0)
    # workers that die while loading are replaced, but not forever
    with pytest.raises(CliError, match="10 workers died before tracking anything .*killed by SIGSEGV"):
        run_tasks(_tasks([3, 4]), FakeBackend(die_loading=True), 2, 3, lambda _m: None, poll=0)


@pytest.mark.parametrize("bug", ["manifest_order", "retry_on_the_same_worker"])
def test_mutation_scheduler_bugs_are_caught(monkeypatch, bug):
    """Product mutations: videos handed out in manifest order; a dead worker's video retried
    on the same worker id."""
    from sam2_fast.batch import scheduler

    if bug == "manifest_order":
        monkeypatch.setattr(scheduler, "longest_first", lambda tasks: list(tasks))
    else:
        real = scheduler._take
        monkeypatch.setattr(scheduler, "_take", lambda q, wid, avoid, alone: real(q, wid, {}, alone))
        monkeypatch.setattr(FakeBackend, "replace", lambda self, wid: self.starting.append(wid))  # keeps its id
    with pytest.raises(AssertionError):
        test_scheduler_longest_first_one_per_worker_and_retries_elsewhere()


def test_manifest_lines_name_the_bad_field(tmp_path):
    from sam2_fast.batch.manifest import ManifestError, parse_line

    (tmp_path / "v.mp4").write_bytes(b"x")
    ok = {"frame": 0, "obj": 1, "points": [[1, 2]]}
    cases = [
        ({"prompts": [ok]}, 'no "video" field'),
        ({"video": "v.mp4", "prompts": []}, '"prompts" must be a non-empty list'),
        ({"video": "v.mp4", "prompt": [ok]}, "unknown field 'prompt'"),
        ({"video": "v.mp4", "prompts": [{**ok, "obj": 0}]}, "prompts[0].obj must be an object id in 1..255"),
        ({"video": "v.mp4", "prompts": [{**ok, "frame": -1}]}, "prompts[0].frame must be an integer >= 0"),
        ({"video": "v.mp4", "prompts": [{**ok, "labels": [2]}]}, "prompts[0].labels must be one 1 (foreground)"),
        ({"video": "v.mp4", "prompts": [{**ok, "points": [[1, "a"]]}]}, "prompts[0].points[0] must be [x, y]"),
        ({"video": "v.mp4", "prompts": [{"frame": 0, "obj": 1, "box": [5, 5, 1, 1]}]}, "need x0 <= x1"),
        ({"video": "v.mp4", "prompts": [{"frame": 0, "obj": 1}]}, 'give "points"'),
        ({"video": "v.mp4", "prompts": [ok], "reverse": "yes"}, '"reverse" must be true or false'),
        ({"video": "v.mp4", "prompts": [ok], "id": "../up"}, '"id" must be a folder name'),
        ({"video": "v.mp4", "prompts": [ok], "max_frames": -2}, '"max_frames" must be an integer >= 0'),
        ({"video": "gone.mp4", "prompts": [ok]}, "video not found"),
    ]
    for line, needle in cases:
        with pytest.raises(ManifestError) as exc:
            parse_line(json.dumps(line), 1, str(tmp_path), str(tmp_path / "out"))
        assert needle in str(exc.value), (line, str(exc.value))
    t = parse_line(json.dumps({"video": "v.mp4", "prompts": [ok, {**ok, "points": [[3, 4]], "labels": [0]},
                                                             {"frame": 0, "obj": 1, "box": [0, 0, 9, 9]}]}),
                   1, str(tmp_path), str(tmp_path / "out"))
    p = t.prompts[(0, 1)]  # merged as repeated track options are
    assert (p.points, p.labels, p.box, p.sources) == ([(1, 2), (3, 4)], [1, 0], (0, 0, 9, 9),
                                                      ["prompts[0]", "prompts[1]", "prompts[2]"])
    assert t.name == "v" and t.out == str(tmp_path / "out" / "v") and t.video == str(tmp_path / "v.mp4")


def test_own_yaml_config_is_part_of_the_options_hash(tmp_path):
    """--model my.yaml: editing the file makes finished videos stale (another model); the same
    file keeps the same hash; official names keep the hashes of earlier runs (no config key)."""
    import argparse

    import numpy as np

    from cli_harness import write_mp4
    from sam2_fast.commands import track_many as TM

    video = write_mp4(str(tmp_path / "v.mp4"), np.zeros((3, 32, 48, 3), np.uint8))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": video, "prompts": [{"frame": 0, "obj": 1, "points": [[4, 4]]}]}) + "\n")
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights")
    cfg = tmp_path / "my.yaml"
    parser = argparse.ArgumentParser()
    TM.build_parser(parser)

    def options(model):
        args = parser.parse_args([str(manifest), "--model", model, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
        _, _, pending = TM.plan(args, str(tmp_path / "o"), lambda *a: None)
        return pending[0].options

    cfg.write_text("model:\n  num_maskmem: 7\n")
    first = options(str(cfg))
    assert options(str(cfg)) == first
    cfg.write_text("model:\n  num_maskmem: 5\n")
    assert options(str(cfg)) != first
    assert options("tiny") == options("sam2.1_hiera_tiny")
