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
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from pipeline.config import ConfigError

from ..stages import serial


def task_runner(dask_address: str | None = None, dask_workers: int | None = None):
    """A DaskTaskRunner for an address or a local cluster, or None for in-process execution."""
    if dask_address and dask_workers is not None:
        raise ConfigError("give --dask-address or --dask-workers, not both")
    if dask_workers is not None and dask_workers < 1:
        raise ConfigError(f"--dask-workers must be at least 1, got {dask_workers}")
    if not dask_address and dask_workers is None:
        return None
    if dask_address and not dask_address.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
        raise ConfigError(f"--dask-address must look like tcp://HOST:PORT, got {dask_address!r}")
    from prefect_dask import DaskTaskRunner

    from ..runtime import WORKER_ENV

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    env = {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k.startswith(("ATR_", "PREFECT_", "HF_",
                                                                                   "MLFLOW_"))
                            and k != "ATR_TORCH_THREADS"}}
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": ":0", "env": env})


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
