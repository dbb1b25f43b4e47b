"""The Prefect flows: ``atr-run`` (the whole pipeline) and one flow per single-stage command.

Each flow opens a ``RunRecorder`` (a ``runs`` row, an MLflow parent run), runs
its stages through ``flows.orchestration.tasks`` and records every stage, then
closes the run as completed or failed. ``atr-run`` is

    prepare-model -> extract (selector training images) -> train -> eval -> report

with every stage the same content-hashed, cached stage the single-stage commands
use, so:

* a second identical run does no model work, and every stage is recorded as
  cached in ``stage_runs``;
* changing only ``[eval]`` settings reuses the features and the selector;
* ``--from STAGE`` recomputes that stage and every stage after it (the old
  output stays in place until the new one replaces it);
* deleting a stage directory recomputes just that stage (its output has the same
  content, so later stages stay cache hits).

The run's folder ``$ATR_HOME/reports/run-<run_id>/`` holds the report stage's
files plus the stage list and the DuckDB and MLflow run ids. ``build_deployment`` is
``atr serve``'s deployment of ``atr-run``. ``speed_run`` is the one command recorded
like a flow but run without Prefect (see ``flows.stages.speed``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from pipeline.config import ConfigError, ExtractConfig
from pipeline.evaluate import EvalConfig
from pipeline.run_config import RunConfig
from pipeline.train import TrainConfig, tiny_schedule
from storage.home import Home
from storage.stages import StageResult, stage_result, write_json_atomic

from .. import runtime
from ..present.plots import plot_eval, plot_speedups
from ..present.report import stage_dicts, write_run_folder
from ..stages import STAGES
from ..stages.eval import eval_chunks, eval_summary, plan_eval
from ..stages.extract import extract, extract_figures
from ..stages.report import report
from ..stages.speed import jsonable, speed, speed_config, speed_metrics
from ..stages.train import dynamic_tower_width, features_model_name, train_artifacts, train_figures
from .dask import cluster_device, task_runner
from .recorder import RunRecorder, quality_figures
from .tasks import TASK_MAPPER, prepare_model_run, train_run


def _recorded(recorder: RunRecorder, body):
    """Run ``body()`` and close the recorder's run as completed, or as failed with the error."""
    try:
        out = body()
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    return out


# ---------------------------------------------------------------- single-stage commands

@flow(name="prepare-model")
def prepare_model_flow(home: str, model: str, tiny_world: dict[str, Any] | None = None,
                       retrain: bool = False) -> dict[str, Any]:
    """prepare-model, recorded (with the quality card's figures of a trained preset)."""
    h = Home.resolve(home)
    recorder = RunRecorder(h, "prepare-model", {"model": model, "retrain": retrain, "tiny_world": tiny_world})

    def body():
        result = prepare_model_run(h, model, tiny_world, retrain)
        recorder.stage(result, metrics=quality_figures(result.manifest.get("quality", [])))
        return result.to_dict()

    return _recorded(recorder, body)


@flow(name="extract", log_prints=False)
def extract_flow(home: str, model: str, config: dict[str, Any]) -> dict[str, Any]:
    """prepare-model -> extract, recorded in DuckDB (runs, stage_runs) and MLflow."""
    h = Home.resolve(home)
    cfg = ExtractConfig.from_dict(config)
    recorder = RunRecorder(h, "extract", {"model": model, "extract": cfg.to_dict()})

    def body():
        model_stage = prepare_model_run(h, model)
        recorder.stage(model_stage)
        result = extract(h, cfg, model_stage, mapper=TASK_MAPPER)
        recorder.stage(result, metrics=extract_figures(result))

    _recorded(recorder, body)
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id,
            "stages": [s.to_dict() for s in recorder.stages]}


def _train_recorded(h: Home, recorder: RunRecorder, feat: StageResult, cfg: TrainConfig,
                    force: bool = False) -> tuple[StageResult, Path]:
    """The train stage as a Prefect task, recorded: selector_metrics rows, an MLflow child run with live
    curves, figures and the checkpoints, and ``reports/train-<key>/``."""
    child = recorder.begin_stage("train")
    result = train_run(h, feat, cfg, child, force=force)
    recorder.train(result, child, train_figures(result), train_artifacts(result))
    folder = h.reports / f"train-{result.key}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(result.path / "selector_metrics.png", folder / "selector_metrics.png")
    return result, folder


@flow(name="train")
def train_flow(home: str, config: dict[str, Any], features: str | None = None, model: str = "tiny",
               extract: dict[str, Any] | None = None, user_set: list[str] | None = None) -> dict[str, Any]:
    """[prepare-model -> extract ->] train + held-out evaluation, recorded in DuckDB and MLflow."""
    h = Home.resolve(home)
    cfg = TrainConfig.from_dict(config)
    recorder = RunRecorder(h, "train", {"features": features, "model": model, "extract": extract,
                                        "train": cfg.to_dict()})

    def body():
        if features is not None:
            feat = stage_result(h, "extract", features)
            feat_model = features_model_name(h, feat)
        else:
            model_stage = prepare_model_run(h, model)
            recorder.stage(model_stage)
            feat = _extract_stage(h, model_stage, ExtractConfig.from_dict(extract or {}))
            recorder.stage(feat)
            feat_model = model
        return _train_recorded(h, recorder, feat, tiny_schedule(cfg, feat_model, set(user_set or []),
                                                                dynamic_tower_width(h, feat)))

    result, folder = _recorded(recorder, body)
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, **result.to_dict(),
            "report": str(folder)}


def _extract_stage(h: Home, model_stage: StageResult, cfg: ExtractConfig, force: bool = False) -> StageResult:
    return extract(h, cfg, model_stage, force=force, mapper=TASK_MAPPER)


@flow(name="eval")
def eval_flow(home: str, model: str, config: dict[str, Any], selector: str | None = None,
              data: dict[str, str] | None = None) -> dict[str, Any]:
    """prepare-model -> every eval chunk, recorded (each chunk an MLflow child run), plus plots."""
    h = Home.resolve(home)
    cfg = EvalConfig.from_dict(config)
    data = data or {}
    recorder = RunRecorder(h, "eval", {"model": model, "selector": selector, "data": data, "eval": cfg.to_dict()})

    def body():
        model_stage = prepare_model_run(h, model)
        recorder.stage(model_stage)
        if cfg.harness == "lmms-eval":
            from ..stages.lmms_eval import plan_lmms, run_lmms_chunk

            plan = plan_lmms(model_stage, cfg, tuple(cfg.tasks), selector, data, h)
            results = [(c, run_lmms_chunk(h, c, model_stage, cfg, selector)) for c in plan]
            figures = {"chunks": len(results), "computed": sum(not o.cached for _, o in results)}
        else:
            plan = plan_eval(h, model_stage, cfg, selector, data)
            run = eval_chunks(h, cfg, model_stage, plan, selector, mapper=TASK_MAPPER)
            results, figures = run.results, run.figures
        recorder.eval(model, results)
        recorder.stage_metrics("eval", figures, child=recorder.mlflow_run_id)
        summary = eval_summary(results)
        folder = h.reports / f"eval-{recorder.run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "summary.json", summary)
        pngs = plot_eval(summary, folder, model)
        for png in pngs:
            recorder.tracker.log_artifact(recorder.mlflow_run_id, png)
        return summary, folder, pngs, figures

    summary, folder, pngs, figures = _recorded(recorder, body)
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "summary": summary,
            "report": str(folder), "plots": [str(p) for p in pngs], "figures": figures}


# ---------------------------------------------------------------- atr run

def _run_strategies(cfg: EvalConfig, model: str, model_stage=None) -> EvalConfig:
    """``atr run``'s eval config for one model: so that one config runs every family, a strategy the model cannot
    run (``pipeline.strategies.unavailable``: HiRED on a family without AnyRes crops, VisionSelector without a
    checkpoint for the model, a plugin's own ``available`` hook) is left out with one warning line each."""
    from pipeline.families import FAMILIES
    from pipeline.strategies import unavailable

    facts = ((model_stage.manifest or {}).get("describe") or {}) if model_stage is not None else {}
    family = FAMILIES.get(facts.get("model_type"))
    dropped = []
    for name in cfg.strategies:
        why = unavailable(name, family, model, cfg.options.get(name))
        if why:
            print(f"atr run: {name} left out for {model}: {why}", file=sys.stderr)
            dropped.append(name)
    return dataclasses.replace(cfg, strategies=tuple(s for s in cfg.strategies if s not in dropped)) if dropped else cfg


def _pipeline(home: str, config: dict[str, Any], from_stage: str | None, user_set: list[str] | None) -> dict:
    h = Home.resolve(home)
    runtime.configure(h)  # a served deployment runs this in a fresh process
    cfg = RunConfig.from_dict(config)
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: valid stages are {', '.join(STAGES)}")
    force = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    recorder = RunRecorder(h, "run", {**cfg.to_dict(), "from": from_stage})

    def one_model(model: str):
        model_stage = prepare_model_run(h, model, force="prepare-model" in force)
        recorder.stage(model_stage)
        feat = _extract_stage(h, model_stage, cfg.extract, force="extract" in force)
        recorder.stage(feat, metrics=extract_figures(feat))
        tcfg = tiny_schedule(cfg.train, model, set(user_set or []), dynamic_tower_width(h, feat))
        train, _ = _train_recorded(h, recorder, feat, tcfg, force="train" in force)
        ecfg = _run_strategies(cfg.eval, model, model_stage)
        plan = plan_eval(h, model_stage, ecfg, train.key, dict(cfg.data))
        child = recorder.begin_stage("eval" if len(cfg.models) == 1 else f"eval {model}")
        recorder.tracker.log_params(child, {"stage": "eval", "model": model, "config": ecfg.to_dict(),
                                            "data": dict(cfg.data)})
        run = eval_chunks(h, ecfg, model_stage, plan, train.key, force="eval" in force, mapper=TASK_MAPPER)
        results = run.results
        recorder.eval(model, results, child=child)
        recorder.stage_metrics("eval", run.figures, child=child)
        recorder.tracker.end_run(child)
        rep = report(h, model, feat, train, results, force="report" in force)
        plots = [rep.path / p for p in rep.manifest["plots"]]
        recorder.stage(rep, artifacts=(rep.path / "summary.md", rep.path / "summary.json", *plots))
        return rep, results, run.figures

    def body():
        done = {m: one_model(m) for m in cfg.models}  # one family after the other, every stage cached
        folder = write_run_folder(h, recorder.run_ids(), {m: d[0] for m, d in done.items()}, recorder.stages)
        recorder.tracker.log_artifact(recorder.mlflow_run_id, folder / "summary.md")
        return folder, done

    folder, done = _recorded(recorder, body)
    summaries = {m: eval_summary(results) for m, (_, results, _) in done.items()}
    figures = {m: f for m, (_, _, f) in done.items()}
    one = len(done) == 1
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "report": str(folder),
            "summary": next(iter(summaries.values())) if one else
            [{"model": m, **r} for m, rows in summaries.items() for r in rows],
            "summaries": summaries, "stages": stage_dicts(recorder.stages),
            "eval_figures": next(iter(figures.values())) if one else figures}


@flow(name="atr-run-on-dask")
def _pipeline_on_dask(home: str, config: dict[str, Any], from_stage: str | None = None,
                      user_set: list[str] | None = None) -> dict:
    return _pipeline(home, config, from_stage, user_set)


@flow(name="atr-run")
def run_flow(home: str, config: dict[str, Any], from_stage: str | None = None, user_set: list[str] | None = None,
             dask_address: str | None = None, dask_workers: int | None = None) -> dict:
    """prepare-model -> extract -> train -> eval -> report, every stage cached by content hash.

    With ``dask_address``/``dask_workers`` the stages run in a subflow on prefect-dask's
    DaskTaskRunner, which maps extraction shards and eval chunks over the cluster."""
    runner = task_runner(dask_address, dask_workers,
                         cluster_device(*(config.get(s, {}).get("device", "auto") for s in ("extract", "eval"))))
    if runner is None:
        return _pipeline(home, config, from_stage, user_set)
    return _pipeline_on_dask.with_options(task_runner=runner)(home, config, from_stage, user_set)


# ---------------------------------------------------------------- atr serve: the deployment

def build_deployment(home: Home, cfg: RunConfig, user_set: list[str], cron: str, name: str,
                     dask_address: str | None = None):
    """The end-to-end flow as a Prefect deployment with a cron schedule (UTC) and the run's parameters."""
    from prefect.schedules import Cron

    try:
        schedule = Cron(cron, timezone="UTC")
    except ValueError:
        raise ConfigError(f"--cron {cron!r} is not a cron expression (e.g. \"0 3 * * *\": daily at 03:00 UTC)") \
            from None
    params = {"home": str(home.root), "config": cfg.to_dict(), "from_stage": None, "user_set": user_set,
              "dask_address": dask_address, "dask_workers": None}
    from prefect.types.entrypoint import EntrypointType

    # MODULE_PATH: a triggered run imports flows.orchestration.flows as a module. The default
    # (FILE_PATH) loads flows/orchestration/flows.py as a loose script, where its relative imports
    # fail ("attempted relative import beyond top-level package") and every run crashes.
    return run_flow.to_deployment(name=name, schedule=schedule, parameters=params,
                                  description="atr end-to-end run: prepare-model -> extract -> train -> eval -> "
                                              "report", tags=["atr"], entrypoint_type=EntrypointType.MODULE_PATH)


# ---------------------------------------------------------------- atr speed (recorded, no Prefect)

def speed_run(home: Home, config: dict[str, Any]) -> dict[str, Any]:
    """Run every speed measurement; record a runs row, an MLflow run, the bench_results rows and the
    speed-up plot under ``reports/bench-<run_id>/``; return the summary."""
    from ..stages.prepare_model import prepare_model

    model_stage = prepare_model(home, config["model"])
    full_config = speed_config(config, model_stage)
    # "bench" (the runs row's flow, the reports folder) and bench_results: the command's old name,
    # kept because they are stored data that queries and earlier runs use
    recorder = RunRecorder(home, "bench", full_config)

    def body():
        recorder.stage(model_stage)
        out = speed(home, full_config, model_stage, recorder.run_id)
        load = out["load"]
        recorder.store.insert_rows("bench_results", out["rows"])
        folder = home.reports / f"bench-{recorder.run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        other = "n/a" if load.other_cores is None else f"{load.other_cores:.2f}"
        title = (f"{config['model']} on {full_config['device']} ({full_config['dtype']}, "
                 f"{full_config['torch_threads']} threads); other processes: {other} cores")
        plot = plot_speedups(out["prefill"], folder / "speedup.png", title)
        summary = {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "config": full_config,
                   "prefill": jsonable(out["prefill"]), "extract": jsonable(out["extract"]),
                   "strategies": jsonable(out["strategies"]),
                   "selector_training": jsonable(out.get("selector_training")), "load": load.as_dict(),
                   "load_by_phase": {k: v.as_dict() for k, v in out["phases"].items()},
                   "warnings": out["warnings"], "figures": out["figures"], "plot": str(plot)}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        recorder.tracker.log_metrics(recorder.mlflow_run_id, speed_metrics(out["rows"]))
        recorder.tracker.log_artifact(recorder.mlflow_run_id, plot)
        recorder.tracker.log_artifact(recorder.mlflow_run_id, folder / "summary.json")
        return {**summary, "rows": out["rows"], "report_dir": str(folder)}

    return _recorded(recorder, body)


def settle_local_server(seconds: float = 1.0) -> None:
    """Let Prefect's temporary local server record the last task and flow states before it stops.

    With no PREFECT_API_URL, a flow runs against a temporary server that stops when
    the process exits; if the process exits right after the flow returns, the
    server's task-run recorder is cancelled mid-write and prints a traceback (a
    race in Prefect's shutdown, seen here on a fully cached ``atr run``). So the
    client's pending events are sent and the server gets ``seconds`` to write them."""
    if os.environ.get("PREFECT_API_URL"):
        return
    import time

    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    time.sleep(seconds)


__all__ = ["prepare_model_flow", "extract_flow", "train_flow", "eval_flow", "run_flow", "build_deployment",
           "speed_run", "settle_local_server"]
