"""Workers as local processes (no Ray): one per GPU, or CPU processes sharing the cores.

Each worker has its own pipe; the driver waits on the pipes and the processes' sentinels
together, so a worker that dies (killed, out of memory, ``os._exit``) is noticed at once
and only its own pipe is lost (a shared queue could be left locked by a dying writer).
Processes are spawned, not forked: torch's thread pools do not survive a fork.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from sam2_fast.batch.manifest import Task
from sam2_fast.batch.scheduler import Event
from sam2_fast.batch.worker import ModelSpec, Worker, describe_error


def _worker_main(spec: ModelSpec, wid: str, device: str, threads: Optional[int], conn: mpc.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops us
    try:
        worker = Worker(spec, wid, device, threads)
    except BaseException as exc:  # noqa: BLE001 - reported, then the driver ends the run
        conn.send(("fatal", describe_error(exc)))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(("done", worker.process(task)))


@dataclass
class _Proc:
    proc: Any  # mp.Process
    conn: mpc.Connection
    slot: int  # index into the device list


def _why(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class LocalPool:
    """``Backend`` of worker processes on this machine; worker k uses ``devices[k % len]``."""

    def __init__(self, spec: ModelSpec, devices: List[str], threads: Optional[int]) -> None:
        self.spec, self.devices, self.threads = spec, devices, threads
        self.ctx = mp.get_context("spawn")
        self.procs: Dict[str, _Proc] = {}
        self.broken: set = set()  # workers found dead, reported by the next wait
        self.busy: set = set()  # workers tracking a video
        self.ready: set = set()  # workers with a model
        self.count = 0

    def _spawn(self, slot: int) -> str:
        wid = f"local-{self.count}"
        self.count += 1
        parent, child = self.ctx.Pipe()
        device = self.devices[slot % len(self.devices)]
        proc = self.ctx.Process(target=_worker_main, args=(self.spec, wid, device, self.threads, child),
                                name=f"sam2-fast-{wid}", daemon=True)
        proc.start()
        child.close()
        self.procs[wid] = _Proc(proc, parent, slot)
        return wid

    def start(self, n: int) -> List[str]:
        return [self._spawn(k) for k in range(n)]

    def submit(self, wid: str, task: Task) -> None:
        self.busy.add(wid)
        try:
            self.procs[wid].conn.send(task)
        except OSError:  # it died since its last message: the next wait reports it, with the task
            self.broken.add(wid)

    def wait(self, timeout: float) -> List[Event]:
        handles: Dict[Any, str] = {}
        for wid, p in self.procs.items():
            handles[p.conn] = wid
            handles[p.proc.sentinel] = wid
        seen = set()
        events: List[Event] = []
        for h in ([] if self.broken else mpc.wait(list(handles), timeout)):
            wid = handles[h]
            if wid in seen:
                continue
            seen.add(wid)
            p = self.procs[wid]
            try:
                while p.conn.poll():  # what it sent before it ended still counts
                    kind, body = p.conn.recv()
                    if kind == "done":
                        self.busy.discard(wid)
                    elif kind == "ready":
                        self.ready.add(wid)
                    events.append(Event(wid, ready=True) if kind == "ready" else
                                  Event(wid, fatal=body) if kind == "fatal" else Event(wid, record=body))
            except (EOFError, OSError):  # EOF on the pipe: the process is ending
                self.broken.add(wid)
            if not p.proc.is_alive():
                self.broken.add(wid)
        for wid in sorted(self.broken):
            p = self.procs[wid]
            p.proc.join(5)
            events.append(Event(wid, died=_why(p.proc.exitcode)))
            self.busy.discard(wid)
        self.broken.clear()
        return events

    def replace(self, wid: str) -> str:
        p = self.procs.pop(wid)
        p.conn.close()
        if p.proc.is_alive():
            p.proc.kill()
        p.proc.join(5)
        return self._spawn(p.slot)

    def stop(self) -> None:
        """Idle workers are told to exit; busy or still loading ones (an interrupted or aborted
        run) are killed at once: a video cut short has no marker, so the next run redoes it."""
        for wid, p in self.procs.items():
            if wid in self.busy or wid not in self.ready:
                p.proc.kill()
                continue
            try:
                p.conn.send(None)
            except OSError:
                pass
        for p in self.procs.values():
            p.proc.join(10)
            if p.proc.is_alive():
                p.proc.kill()
                p.proc.join(5)
            p.conn.close()
        self.procs.clear()


def local_devices(device: str) -> List[str]:
    """``auto`` with CUDA: one worker per GPU by default, worker k on ``cuda:k``; otherwise
    every worker on the device given."""
    import torch

    if device == "auto" and torch.cuda.is_available():
        return [f"cuda:{k}" for k in range(torch.cuda.device_count())]
    return ["cpu" if device == "auto" else device]


def cpu_threads(workers: int) -> int:
    # CPU workers split the cores: N workers x all cores each would oversubscribe them, and
    # OpenMP threads that lose their core stall the others at every barrier (on the shared
    # 2-core machine, a 4-frame track took 0.7 s at 1 thread and 19 s at 2 under load ~6)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))
