"""Prefect tasks over the stage functions, and the mapper that runs work units as tasks.

Every task's Prefect cache key is the stage's content hash (plus the shard index
for a shard), the same hash that names the output directory, so Prefect's cache
and the file cache agree.

The stage directory is the cache; Prefect's result store is written (one record
per key) but never read: every task runs with ``refresh_cache=True`` and returns
a finished stage or shard at once. A record in that store names its own
serializer, and a pickle one planted under a (predictable) stage key would run
code on a cache read, so reading it is never allowed (``tests/test_reliability_code.py``).
Tasks receive only paths, hashes and plain configs, never tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.compat import torchvision_guard

# Dask workers import this module to run the tasks and never run flows.runtime.configure: the guard
# must come before their first transformers import (the [lmms] extra's torchvision on CPU torch).
torchvision_guard()

from pipeline.train import TrainConfig  # noqa: E402
from storage.home import Home
from storage.stages import StageResult, stage_result

from ..present import progress
from ..stages.eval import Shard, eval_shard
from ..stages.extract import ExtractPlan, extract_shard
from ..stages.prepare_model import prepare_model, prepare_model_key
from ..stages.train import train, train_key
from .dask import distributed, map_tasks
from .recorder import MlflowCurves


def _cache_key_param(_ctx, params: dict[str, Any]) -> str:
    return params["cache_key"]


_CACHED = {"cache_key_fn": _cache_key_param, "persist_result": True, "result_serializer": "json"}


@task(name="prepare-model", **_CACHED)
def prepare_model_task(home: str, model: str, cache_key: str, tiny_world: dict[str, Any] | None = None,
                       retrain: bool = False, force: bool = False) -> dict[str, Any]:
    with progress.phases() as on_progress:
        return prepare_model(Home.resolve(home), model, tiny_world, retrain=retrain, force=force,
                             on_progress=on_progress).to_dict()


@task(name="extract-shard", **_CACHED)
def extract_shard_task(home: str, plan: ExtractPlan, index: int, cache_key: str,
                       items: list | None = None) -> dict[str, Any]:
    return extract_shard(home, plan, index, items)


@task(name="train", **_CACHED)
def train_task(home: str, features_key: str, config: dict[str, Any], cache_key: str,
               mlflow_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    h = Home.resolve(home)
    features = stage_result(h, "extract", features_key)
    curves = (lambda p: []) if mlflow_run_id is None else \
        (lambda p: [MlflowCurves(h, mlflow_run_id, p if isinstance(p, str) else f"p{p:g}")])
    return train(h, TrainConfig.from_dict(config), features, force=force, callbacks=curves).to_dict()


@task(name="eval-shard", cache_policy=NO_CACHE)
def eval_shard_task(home: str, shard: Shard, model_key: str, config: dict[str, Any], selector: str | None,
                    cache_key: str, force: bool = False) -> dict[str, Any]:
    """Not cached by Prefect: each result of the shard is a cached stage dir already, and the unit's
    figures (images encoded, tower passes) must describe this run, not the one that computed it."""
    return eval_shard(home, shard, model_key, config, selector, force)


# ---------------------------------------------------------------- stage calls as tasks

def prepare_model_run(home: Home, model: str, tiny_world: dict[str, Any] | None = None, retrain: bool = False,
                      force: bool = False) -> StageResult:
    """The prepare-model stage as a Prefect task (``retrain``/``force`` bypass every cache)."""
    key, _, _ = prepare_model_key(model, tiny_world)
    out = prepare_model_task.with_options(refresh_cache=True)(str(home.root), model, key, tiny_world, retrain, force)
    return StageResult.from_dict(out)


def train_run(home: Home, features: StageResult, cfg: TrainConfig, mlflow_run_id: str | None,
              force: bool = False) -> StageResult:
    """The train stage as a Prefect task, with live curves in MLflow run ``mlflow_run_id``."""
    key = train_key(features, cfg)
    out = train_task.with_options(refresh_cache=True)(str(home.root), features.key, cfg.to_dict(), key,
                                                      mlflow_run_id=mlflow_run_id, force=force)
    return StageResult.from_dict(out)


_TASKS = {extract_shard: extract_shard_task, eval_shard: eval_shard_task}


class TaskMapper:
    """A stage mapper (``flows.stages.Mapper``) that runs each work unit as its Prefect task, under the
    unit's cache key; over Dask when the flow runs on a DaskTaskRunner."""

    @property
    def remote(self) -> bool:
        """True when units run in Dask worker processes (they advance no progress bar here)."""
        return distributed()

    def __call__(self, unit: Callable[..., Any], calls: Sequence[dict[str, Any]], keys: Sequence[str],
                 on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
        return map_tasks(_TASKS[unit], [{**c, "cache_key": k} for c, k in zip(calls, keys, strict=True)], on_done)


TASK_MAPPER = TaskMapper()

__all__ = ["prepare_model_task", "extract_shard_task", "train_task", "eval_shard_task", "prepare_model_run",
           "train_run", "TaskMapper", "TASK_MAPPER"]
