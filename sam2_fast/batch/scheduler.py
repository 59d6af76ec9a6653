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
    record: Optional[Dict[str, Any]] = None  # the worker finished its task (done or failed)
    died: Optional[str] = None  # the worker process is gone (why: exit code, signal, Ray's reason)
    fatal: Optional[str] = None  # the worker could not build the model: nothing can run


class Backend(Protocol):
    def start(self, n: int) -> List[str]: ...  # n worker ids
    def submit(self, wid: str, task: Task) -> None: ...
    def wait(self, timeout: float) -> List[Event]: ...
    def replace(self, wid: str) -> str: ...  # a fresh worker in place of a dead one
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


def run_tasks(tasks: List[Task], backend: Backend, workers: int, max_attempts: int,
              log: Callable[[str], None] = print, result: Optional[RunResult] = None, poll: float = 0.5) -> RunResult:
    """Track ``tasks`` on ``workers`` workers of ``backend``; the final records land in
    ``result`` as they come (so an interrupted run still has the finished ones)."""
    queue: Deque[Task] = collections.deque(longest_first(tasks))
    result = result if result is not None else RunResult({})
    attempts: Dict[int, int] = collections.Counter()
    avoid: Dict[int, Set[str]] = collections.defaultdict(set)
    inflight: Dict[str, Task] = {}
    total, finished = len(tasks), 0
    t0 = time.perf_counter()
    idle: List[str] = []
    try:
        idle = backend.start(min(workers, len(queue))) if queue else []
        live = set(idle)
        while queue or inflight:
            for wid in list(idle):
                task = _take(queue, wid, avoid, alone=len(live) == 1)
                if task is None:
                    continue
                idle.remove(wid)
                attempts[task.line] += 1
                backend.submit(wid, task)
                inflight[wid] = task
            for ev in backend.wait(poll):
                task = inflight.pop(ev.wid, None)
                if ev.fatal is not None:
                    raise CliError(f"worker {ev.wid} could not load the model: {ev.fatal}")
                final: Optional[Dict[str, Any]] = None
                if ev.died is not None:
                    result.deaths += 1
                    live.discard(ev.wid)
                    if ev.wid in idle:  # it had sent its last record before it went
                        idle.remove(ev.wid)
                    new = backend.replace(ev.wid)
                    live.add(new)
                    idle.append(new)
                    reason = f"worker {ev.wid} died ({ev.died})"
                    if finished == 0 and result.deaths >= max(10, 3 * workers):
                        # a worker that cannot even start (a driver crash on import, no memory for
                        # the model) would otherwise burn every video's tries one after another
                        raise CliError(f"{result.deaths} workers died before any video finished (last: {reason})")
                    if task is None:
                        continue
                    if attempts[task.line] < max_attempts:
                        log(f"{reason} while tracking {task.name}; retrying on another worker "
                            f"(try {attempts[task.line] + 1} of {max_attempts})")
                        avoid[task.line].add(ev.wid)
                        queue.appendleft(task)
                    else:
                        final = record(task, "failed", ev.wid, error=f"{reason} on each of {max_attempts} tries")
                else:
                    idle.append(ev.wid)
                    rec = ev.record
                    if task is None or rec is None:
                        continue
                    st = result.workers.setdefault(ev.wid, WorkerStats())
                    st.seconds += rec["seconds"]
                    if rec.get("retry") and attempts[task.line] < max_attempts:
                        log(f"{task.name} failed on {ev.wid} ({rec['error']}); retrying on another worker")
                        avoid[task.line].add(ev.wid)
                        queue.appendleft(task)
                    else:
                        rec.pop("retry", None)
                        final = rec
                        if rec["status"] == "done":
                            st.videos += 1
                            st.frames += rec["frames"]
                if final is not None:
                    final["attempts"] = attempts[task.line]
                    result.records[task.line] = final
                    finished += 1
                    what = (f"{final['frames']} frames in {final['seconds']:.1f} s" if final["status"] == "done"
                            else final.get("error", ""))
                    log(f"[{finished}/{total}] {final['status']} {task.name}: {what} ({final['worker']})")
    finally:
        result.wall = time.perf_counter() - t0
        backend.stop()
    return result
