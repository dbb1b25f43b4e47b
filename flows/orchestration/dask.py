"""Scale-out: shard-sized tasks mapped over a Dask cluster through prefect-dask.

Without a cluster the flows call their tasks one after another in the flow's own
process (on 2 CPUs, one torch process using both cores is the fastest layout).
With ``--dask-address tcp://HOST:PORT`` (an existing cluster) or
``--dask-workers N`` (a local cluster of N single-threaded worker processes) the
flow runs under prefect-dask's ``DaskTaskRunner`` and extraction shards and
evaluation chunks are submitted as futures, so each worker takes one shard or
chunk at a time. Tasks receive only paths, hashes and plain configs; each worker
process loads the model once (``pipeline.loading.cached_model``).

Local workers get ``flows.runtime.WORKER_ENV`` (one torch thread,
``OMP_WAIT_POLICY=PASSIVE``): several spinning OpenMP pools on shared cores
were measured 15-100x slower. Workers of an existing cluster must be started
with the same environment (see docs/orchestration.md, "Scale-out with Dask").

With CUDA the device (``--device cuda``, or ``auto`` where CUDA is present), ``--dask-workers N``
starts one worker per GPU, each pinned to its device through ``CUDA_VISIBLE_DEVICES`` (worker i's list
starts with GPU i, so its ``cuda`` is that GPU) and given ``flows.runtime.gpu_worker_env``: dask-cuda's
``LocalCUDACluster`` when dask-cuda is installed, otherwise ``pinned_cluster``, the same layout on a
plain ``distributed.SpecCluster``. The GPUs are ``pipeline.device.cuda_devices()`` (it honours
``CUDA_VISIBLE_DEVICES``); N above their count is one line.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

from pipeline.config import ConfigError

from ..stages import serial


def task_runner(dask_address: str | None = None, dask_workers: int | None = None, device: str = "auto",
                gpus: Sequence[str] | None = None):
    """A DaskTaskRunner for an address or a local cluster, or None for in-process execution.

    ``device`` is the tasks' ``--device``: with CUDA the device, the local cluster has one worker per GPU
    (``worker_devices``). ``gpus`` stands in for ``pipeline.device.cuda_devices()`` (tests)."""
    if dask_address and dask_workers is not None:
        raise ConfigError("give --dask-address or --dask-workers, not both")
    if dask_workers is not None and dask_workers < 1:
        raise ConfigError(f"--dask-workers must be at least 1, got {dask_workers}")
    if not dask_address and dask_workers is None:
        return None
    if dask_address and not dask_address.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
        raise ConfigError(f"--dask-address must look like tcp://HOST:PORT, got {dask_address!r}")
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    devices = worker_devices(dask_workers, device, gpus)
    from prefect_dask import DaskTaskRunner

    from ..runtime import WORKER_ENV, gpu_worker_env

    passed = {k: v for k, v in os.environ.items()
              if k.startswith(("ATR_", "PREFECT_", "HF_", "MLFLOW_")) and k != "ATR_TORCH_THREADS"}
    if devices:
        return DaskTaskRunner(cluster_class=gpu_cluster,
                              cluster_kwargs={"devices": devices, "env": {**gpu_worker_env(len(devices)), **passed}})
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": ":0", "env": {**WORKER_ENV, **passed}})


def worker_devices(workers: int, device: str = "auto", gpus: Sequence[str] | None = None) -> list[str]:
    """The CUDA devices of a local cluster of ``workers`` processes, one each; ``[]`` for CPU workers
    (``--device cpu``, or ``auto`` without CUDA). More workers than GPUs is one line naming both."""
    if device == "cpu":
        return []
    if gpus is None:
        from pipeline.device import cuda_devices

        gpus = cuda_devices()
    gpus = [str(g) for g in gpus]
    if not gpus:
        if device == "cuda":
            raise ConfigError(f"--device cuda --dask-workers {workers}: no CUDA device is available here; "
                              "use --device auto or cpu")
        return []
    if workers > len(gpus):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible})"
        raise ConfigError(f"--dask-workers {workers} is more than the {len(gpus)} CUDA device"
                          f"{'' if len(gpus) == 1 else 's'} here{seen}: each worker drives one GPU; give "
                          f"--dask-workers {len(gpus)} or fewer, or --device cpu for CPU workers")
    return gpus[:workers]


def cluster_device(*devices: str) -> str:
    """The device of a run whose stages ask for ``devices`` (e.g. extract's and eval's ``device``)."""
    asked = set(devices)
    return "cpu" if asked == {"cpu"} else "cuda" if "cuda" in asked else "auto"


def pinned_visible_devices(devices: Sequence[str]) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` per worker: worker i's list starts with device i, then the others in order
    (dask-cuda's rotation), so ``cuda`` in worker i is GPU i."""
    devices = [str(d) for d in devices]
    return [",".join(devices[i:] + devices[:i]) for i in range(len(devices))]


def gpu_cluster(devices: Sequence[str], env: dict[str, str], **kwargs):
    """One worker process per CUDA device, each pinned to its device and running one task at a time:
    dask-cuda's ``LocalCUDACluster`` when it is installed, else ``pinned_cluster``."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        return pinned_cluster(devices, env, **kwargs)
    import dask

    # LocalCUDACluster replaces each worker's ``env`` with CUDA_VISIBLE_DEVICES alone; its nannies read the
    # rest from Dask's config when they are created, which happens inside this constructor.
    with dask.config.set({"distributed.nanny.environ": dict(env)}):
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=[str(d) for d in devices], n_workers=len(devices),
                                threads_per_worker=1, dashboard_address=kwargs.pop("dashboard_address", ":0"),
                                **kwargs)


def pinned_cluster(devices: Sequence[str], env: dict[str, str], dashboard_address: str | None = ":0",
                   threads_per_worker: int = 1):
    """``LocalCUDACluster``'s layout on a plain ``distributed.SpecCluster``: one Nanny per device, named
    ``cuda-<device>``, with ``env`` plus its own ``CUDA_VISIBLE_DEVICES`` and an equal share of the RAM."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    workers = {f"cuda-{d}": {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                                       "env": {**env, "CUDA_VISIBLE_DEVICES": visible},
                                                       "memory_limit": MEMORY_LIMIT // len(devices)}}
               for d, visible in zip(devices, pinned_visible_devices(devices))}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": dashboard_address}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="atr-gpu")


def distributed() -> bool:
    """True inside a flow run whose task runner is a DaskTaskRunner."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.task_runner is None:
        return False
    return type(ctx.task_runner).__name__ == "DaskTaskRunner"


def map_tasks(task, calls: Iterable[dict[str, Any]], on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run ``task(**kwargs)`` for each kwargs dict; results in call order.

    In-process one after another; under a DaskTaskRunner all are submitted at once
    and ``on_done(index, result)`` fires as each finishes. Prefect's result store is
    written, never read (``refresh_cache=True``; see ``flows.orchestration.tasks``): the
    stage directories are the cache, and a finished stage or shard returns at once."""
    calls = list(calls)
    task = task.with_options(refresh_cache=True)
    if not distributed():
        return serial(task, calls, (), on_done)
    from prefect.futures import as_completed

    futures = [task.submit(**kwargs) for kwargs in calls]
    index = {f.task_run_id: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    for f in as_completed(futures):
        i = index[f.task_run_id]
        results[i] = f.result()
        if on_done:
            on_done(i, results[i])
    return results
