"""Workers as Ray actors: one per GPU (``num_gpus=1``), or on a CPU-only cluster one per
``num_cpus`` share, each building the model once and tracking video after video.

Ray is an optional extra (``pip install 'sam2-fast[ray]'``) and only imported here. The
actors write the outputs themselves (``--out`` must be a folder every node sees, as must
the videos and the checkpoint); what comes back through Ray is a status record of a few
hundred bytes per video, and the driver keeps at most one call in flight per actor.
Ray's own restarts are off (``max_restarts=0``): when an actor dies the scheduler decides
what to retry and where, the same way as for local processes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from sam2_fast.batch.manifest import Task
from sam2_fast.batch.scheduler import Event
from sam2_fast.batch.worker import ModelSpec, Worker, describe_error, record
from sam2_fast.commands.models import CliError

INSTALL_HINT = "pip install 'sam2-fast[ray]' (or pip install ray)"


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise CliError(f"--ray needs Ray, an optional extra that is not installed ({exc}); {INSTALL_HINT}") from None
    return ray


def connect(address: Optional[str]) -> bool:
    """Join the cluster at ``address`` (None: $RAY_ADDRESS, else a new local one) unless this
    process already did; True when this call started the connection (and should end it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "Ray"
        raise CliError(f"cannot start or reach {where}: {exc}") from None
    return True


class WorkerActor:
    """The actor body (``ray.remote`` is applied when a pool starts, so importing this module
    does not need Ray). A model that fails to load is reported on the first call."""

    def __init__(self, spec: ModelSpec, wid: str, device: str, threads: Optional[int]) -> None:
        self.error: Optional[str] = None
        try:
            self.worker: Optional[Worker] = Worker(spec, wid, device, threads)
        except Exception as exc:  # noqa: BLE001 - sent back as a fatal event
            self.worker, self.error = None, describe_error(exc)

    def ready(self):
        return ("ready", None) if self.worker is not None else ("fatal", self.error)

    def process(self, task: Task):
        if self.worker is None:
            return ("fatal", self.error)
        return ("done", self.worker.process(task))


class RayPool:
    """``Backend`` of Ray actors."""

    def __init__(self, spec: ModelSpec, use_gpu: bool, cpus_per_actor: int) -> None:
        ray = import_ray()
        self.ray = ray
        self.spec, self.use_gpu, self.cpus = spec, use_gpu, cpus_per_actor
        res = dict(num_gpus=1, num_cpus=1) if use_gpu else dict(num_cpus=cpus_per_actor)
        self.cls = ray.remote(WorkerActor).options(max_restarts=0, max_task_retries=0, **res)
        self.actors: Dict[str, Any] = {}
        self.refs: Dict[Any, str] = {}  # in-flight call (a ready() or a process()) -> worker id
        self.tasks: Dict[str, Task] = {}  # worker id -> its video, while process() runs
        self.count = 0

    def _spawn(self) -> str:
        wid = f"ray-{self.count}"
        self.count += 1
        device = "cuda" if self.use_gpu else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        self.actors[wid] = actor = self.cls.remote(self.spec, wid, device, None if self.use_gpu else self.cpus)
        self.refs[actor.ready.remote()] = wid
        return wid

    def start(self, n: int) -> List[str]:
        return [self._spawn() for _ in range(n)]

    def submit(self, wid: str, task: Task) -> None:
        self.refs[self.actors[wid].process.remote(task)] = wid
        self.tasks[wid] = task

    def wait(self, timeout: float) -> List[Event]:
        ray = self.ray
        if not self.refs:
            return []
        # the first reply, then whatever else is in already: waiting for all of them (or the
        # timeout) would leave a finished actor idle until the slowest one is done
        ready, rest = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        events: List[Event] = []
        for ref in ready:
            wid = self.refs.pop(ref)
            task = self.tasks.pop(wid, None)
            try:
                kind, body = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # our code raised in the actor (it should not)
                if task is None:
                    events.append(Event(wid, fatal=describe_error(exc)))
                else:
                    events.append(Event(wid, record=record(task, "failed", wid, error=describe_error(exc))))
                continue
            except ray.exceptions.RayError as exc:  # the actor or its node is gone (killed, OOM, lost)
                events.append(Event(wid, died=_reason(exc)))
                continue
            events.append(Event(wid, ready=True) if kind == "ready" else
                          Event(wid, fatal=body) if kind == "fatal" else Event(wid, record=body))
        return events

    def replace(self, wid: str) -> str:
        self.refs = {r: w for r, w in self.refs.items() if w != wid}
        self.tasks.pop(wid, None)
        actor = self.actors.pop(wid)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        return self._spawn()

    def stop(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors.clear()
        self.refs.clear()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((l.strip() for l in text if l.strip()), "")
    return f"{type(exc).__name__}: {first}"[:300]


def cluster_plan(device: str, workers: Optional[int], threads: Optional[int] = None) -> Dict[str, Any]:
    """How many actors of what kind: one per GPU when the cluster has GPUs (and --device is
    not cpu), else CPU actors of ``threads`` CPUs each, by default the cluster's CPUs split
    among ``workers`` (one CPU each when ``workers`` is not given either)."""
    ray = import_ray()
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if device.startswith("cuda") and not gpus:
        raise CliError(f"--device {device} asked for, but the Ray cluster has no GPUs ({res.get('CPU', 0):g} CPUs)")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise CliError(f"--device {device}: with --ray use auto, cpu or cuda (each actor gets its own GPU)")
    use_gpu = gpus > 0 and device != "cpu"
    n = workers or (gpus if use_gpu else max(1, cpus // (threads or 1)))
    return {"use_gpu": use_gpu, "workers": n, "cpus_per_actor": 1 if use_gpu else (threads or max(1, cpus // n)),
            "cluster": f"{cpus} CPUs, {gpus} GPUs"}
