"""Prefect flows for prepare-model and extract.

The extract flow maps one task per shard. Every task's Prefect cache key is the
stage's content hash (plus the shard index), the same hash that names the
output directory, so Prefect's cache and the file cache agree.

The stage directory is the cache; Prefect's result store is written (one record
per key) but never read: every task runs with ``refresh_cache=True`` and returns
a finished stage or shard at once. A record in that store names its own
serializer, and a pickle one planted under a (predictable) stage key would run
code on a cache read, so reading it is never allowed (``tests/test_reliability_code.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from pipeline.config import ExtractConfig
from storage.home import Home
from storage.stages import StageDir

from . import progress, scale
from .records import RunRecorder
from .stages import (ExtractPlan, StageResult, extract_shard, finish_extract, plan_extract,
                     prepare_model, prepare_model_key, shard_done)


def _key_from_params(_ctx, params: dict[str, Any]) -> str:
    return params["cache_key"]


@task(name="prepare-model", cache_key_fn=_key_from_params, persist_result=True, result_serializer="json")
def prepare_model_task(home: str, model: str, cache_key: str, tiny_world: dict[str, Any] | None = None,
                       retrain: bool = False, force: bool = False) -> dict[str, Any]:
    with progress.phases() as on_progress:
        result = prepare_model(Home.resolve(home), model, tiny_world, retrain, on_progress, force=force)
    return _result_dict(result)


@task(name="extract-shard", cache_key_fn=_key_from_params, persist_result=True, result_serializer="json")
def extract_shard_task(home: str, plan: ExtractPlan, index: int, cache_key: str) -> dict[str, Any]:
    return extract_shard(Home.resolve(home), plan, index, on_images=progress.advance)


def _result_dict(r: StageResult) -> dict[str, Any]:
    return {"stage": r.stage, "key": r.key, "path": str(r.path), "cached": r.cached,
            "seconds": r.seconds, "manifest": r.manifest}


def _result(d: dict[str, Any]) -> StageResult:
    return StageResult(d["stage"], d["key"], Path(d["path"]), d["cached"], d["seconds"], d["manifest"])


def run_prepare_model(home: Home, model: str, tiny_world: dict[str, Any] | None = None,
                      retrain: bool = False, force: bool = False) -> StageResult:
    """The prepare-model stage as a cached Prefect task (``retrain``/``force`` bypass every cache)."""
    key, _, _ = prepare_model_key(model, tiny_world)
    t0 = time.perf_counter()
    complete = StageDir(home, "prepare-model", key).is_complete() and not (retrain or force)
    out = _result(prepare_model_task.with_options(refresh_cache=True)(
        str(home.root), model, key, tiny_world, retrain, force))
    # The stage is cached iff its directory was complete before (refresh_cache: see the module docstring).
    out.cached, out.seconds = complete, time.perf_counter() - t0
    return out


def run_extract(home: Home, model_stage: StageResult, config: ExtractConfig, force: bool = False) -> StageResult:
    """The extract stage: one Prefect task per missing shard (over Dask when the flow runs on a
    DaskTaskRunner), then the manifest. ``force`` recomputes every shard."""
    t0 = time.perf_counter()
    plan = plan_extract(model_stage, config)
    sd = StageDir(home, "extract", plan.key)
    if sd.is_complete() and not force:
        return StageResult("extract", plan.key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete() and not force:
            return StageResult("extract", plan.key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin(fresh=force)
        done = [shard_done(work, i) for i in range(plan.n_shards)]
        remote = scale.distributed()
        with progress.bar(f"extract {config.images}", total=plan.n_items) as bar:
            def images(i: int) -> int:
                lo, hi = plan.shard_items(i)
                return hi - lo

            bar.advance(sum(images(i) for i in range(plan.n_shards) if done[i]))

            def advance(i: int, _record: dict) -> None:
                if remote and not done[i]:  # in-process tasks advance the bar per batch themselves
                    bar.advance(images(i))

            calls = [{"home": str(home.root), "plan": plan, "index": i, "cache_key": f"{plan.key}-{i:06d}"}
                     for i in range(plan.n_shards)]
            records = scale.map_tasks(extract_shard_task, calls, on_done=advance)
        result = finish_extract(home, plan, records, time.perf_counter() - t0, resumed_shards=sum(done))
    return result


def extract_metrics(result: StageResult) -> dict[str, float | None]:
    """MLflow figures of an extract stage (images/s only when it computed)."""
    m = result.manifest
    return {"images_per_second": m.get("images_per_second") if not result.cached else None,
            "samples": m["counts"]["samples"], "skipped": m["counts"]["skipped"]}


@flow(name="extract", log_prints=False)
def extract_flow(home: str, model: str, config: dict[str, Any]) -> dict[str, Any]:
    """prepare-model -> extract, recorded in DuckDB (runs, stage_runs) and MLflow."""
    h = Home.resolve(home)
    cfg = ExtractConfig.from_dict(config)
    recorder = RunRecorder(h, "extract", {"model": model, "extract": cfg.to_dict()})
    try:
        model_stage = run_prepare_model(h, model)
        recorder.stage(model_stage)
        result = run_extract(h, model_stage, cfg)
        recorder.stage(result, metrics=extract_metrics(result))
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id,
            "stages": [_result_dict(s) for s in recorder.stages]}
