"""The driver's loop, the same for local processes and Ray actors: hand each idle worker the
longest video left, one at a time (so the driver only ever holds small status records, and
a worker never sits on a queue of videos another could take), and when a worker dies
retry its video on another worker, up to ``max_attempts`` tries in all."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set

from sam2_fast.batch.manifest import Task
from sam2_fast.batch.worker import record
from sam2_fast.commands.models import CliError


@dataclass
class Event:
    """What a backend reports about one worker."""

    wid: str
    ready: bool = False  # the worker built its model and takes videos
    record: Optional[Dict[str, Any]] = None  # the worker finished its task (done or failed)
    died: Optional[str] = None  # the worker process is gone (why: exit code, signal, Ray's reason)
    fatal: Optional[str] = None  # the worker could not build the model: nothing can run


class Backend(Protocol):
    def start(self, n: int) -> List[str]: ...  # n worker ids; each reports ready (or fatal) later
    def submit(self, wid: str, task: Task) -> None: ...
    def wait(self, timeout: float) -> List[Event]: ...
    def replace(self, wid: str) -> str: ...  # a fresh worker in place of a dead one (also reports ready)
    def stop(self) -> None: ...


@dataclass
class WorkerStats:
    videos: int = 0
    frames: int = 0
    seconds: float = 0.0  # time inside its videos (tracking and writing)


@dataclass
class RunResult:
    records: Dict[int, Dict[str, Any]]  # manifest line -> final record
    workers: Dict[str, WorkerStats] = field(default_factory=dict)
    wall: float = 0.0
    deaths: int = 0
    startup: Optional[float] = None  # seconds until the first worker was ready


def longest_first(tasks: List[Task]) -> List[Task]:
    # the longest videos start first, so the last video to finish is a short one and the
    # workers run out of work at about the same time
    return sorted(tasks, key=lambda t: (-t.frames, t.line))


def _take(queue: Deque[Task], wid: str, avoid: Dict[int, Set[str]], alone: bool) -> Optional[Task]:
    """The first queued task not to be retried on ``wid`` (any task when ``wid`` is the only
    worker, rather than nothing)."""
    for i, task in enumerate(queue):
        if wid not in avoid.get(task.line, ()) or alone:
            del queue[i]
            return task
    return None


class _Run:
    """The state of one ``run_tasks`` call: the queue, the workers (starting, idle, busy) and
    every video's tries."""

    def __init__(self, tasks: List[Task], backend: Backend, workers: int, max_attempts: int,
                 log: Callable[[str], None], result: RunResult) -> None:
        self.queue: Deque[Task] = collections.deque(longest_first(tasks))
        self.backend, self.workers, self.max_attempts = backend, workers, max_attempts
        self.log, self.result = log, result
        self.attempts: Dict[int, int] = collections.Counter()
        self.avoid: Dict[int, Set[str]] = collections.defaultdict(set)
        self.inflight: Dict[str, Task] = {}
        self.ready: Set[str] = set()  # workers with a model, idle or busy
        self.idle: List[str] = []
        self.total, self.finished = len(tasks), 0
        self.idle_deaths = 0  # workers that died holding no video (while loading, or idle)
        self.t0 = time.perf_counter()

    def dispatch(self) -> None:
        for wid in list(self.idle):
            task = _take(self.queue, wid, self.avoid, alone=len(self.ready) == 1)
            if task is None:
                continue
            self.idle.remove(wid)
            self.attempts[task.line] += 1
            self.backend.submit(wid, task)
            self.inflight[wid] = task

    def on_event(self, ev: Event) -> None:
        task = self.inflight.pop(ev.wid, None)
        if ev.fatal is not None:
            raise CliError(f"worker {ev.wid} could not load the model: {ev.fatal}")
        if ev.ready:
            if self.result.startup is None:
                self.result.startup = time.perf_counter() - self.t0
            self.ready.add(ev.wid)
            self.idle.append(ev.wid)
        elif ev.died is not None:
            self.on_death(ev.wid, ev.died, task)
        elif task is not None and ev.record is not None:
            self.idle.append(ev.wid)
            self.on_record(ev.wid, ev.record, task)

    def on_death(self, wid: str, why: str, task: Optional[Task]) -> None:
        self.result.deaths += 1
        self.ready.discard(wid)
        if wid in self.idle:  # it had sent its last record before it went
            self.idle.remove(wid)
        self.backend.replace(wid)  # the new one reports ready when its model is built
        reason = f"worker {wid} died ({why})"
        if task is None:
            # workers that cannot even start (a crash on import, no memory for the model) would
            # be replaced forever; deaths with a video are bounded by its tries instead
            self.idle_deaths += 1
            if self.finished == 0 and self.idle_deaths >= max(10, 3 * self.workers):
                raise CliError(f"{self.idle_deaths} workers died before tracking anything (last: {reason})")
            return
        if self.attempts[task.line] < self.max_attempts:
            self.log(f"{reason} while tracking {task.name}; retrying on another worker "
                     f"(try {self.attempts[task.line] + 1} of {self.max_attempts})")
            self.avoid[task.line].add(wid)
            self.queue.appendleft(task)
        else:
            self.finish(task, record(task, "failed", wid, error=f"{reason} on each of {self.max_attempts} tries"))

    def on_record(self, wid: str, rec: Dict[str, Any], task: Task) -> None:
        st = self.result.workers.setdefault(wid, WorkerStats())
        st.seconds += rec["seconds"]
        if rec.get("retry") and self.attempts[task.line] < self.max_attempts:
            self.log(f"{task.name} failed on {wid} ({rec['error']}); retrying on another worker")
            self.avoid[task.line].add(wid)
            self.queue.appendleft(task)
            return
        rec.pop("retry", None)
        if rec["status"] == "done":
            st.videos += 1
            st.frames += rec["frames"]
        self.finish(task, rec)

    def finish(self, task: Task, final: Dict[str, Any]) -> None:
        final["attempts"] = self.attempts[task.line]
        self.result.records[task.line] = final
        self.finished += 1
        what = (f"{final['frames']} frames in {final['seconds']:.1f} s" if final["status"] == "done"
                else final.get("error", ""))
        self.log(f"[{self.finished}/{self.total}] {final['status']} {task.name}: {what} ({final['worker']})")


def run_tasks(tasks: List[Task], backend: Backend, workers: int, max_attempts: int,
              log: Callable[[str], None] = print, result: Optional[RunResult] = None, poll: float = 0.5,
              patience: float = 120.0) -> RunResult:
    """Track ``tasks`` on ``workers`` workers of ``backend``; the final records land in
    ``result`` as they come (so an interrupted run still has the finished ones). A worker
    gets its first video once its model is built, so a slow or unschedulable one (a Ray
    actor waiting for a GPU the cluster lacks) holds no video back."""
    run = _Run(tasks, backend, workers, max_attempts, log, result if result is not None else RunResult({}))
    warned = False
    try:
        if run.queue:
            backend.start(min(workers, len(run.queue)))
        while run.queue or run.inflight:
            run.dispatch()
            for ev in backend.wait(poll):
                run.on_event(ev)
            if not run.ready and not warned and time.perf_counter() - run.t0 > patience:
                warned = True
                log(f"no worker ready after {patience:.0f} s: still loading, or waiting for resources "
                    "(a Ray cluster without the CPUs/GPUs asked for)")
    finally:
        run.result.wall = time.perf_counter() - run.t0
        backend.stop()
    return run.result
