"""Recording a flow run into the DuckDB results store and MLflow.

One ``RunRecorder`` per flow run: a ``runs`` row plus one ``stage_runs`` row per
stage in DuckDB, and an MLflow parent run with a child run per stage (params =
flat config, metrics = stage figures, artifact = the stage manifest). The run id
is passed explicitly; nothing relies on MLflow's thread-local active run.

Besides the generic stage record, the recorder writes each stage's own rows:
``selector_metrics`` (train), ``eval_scores`` and ``eval_samples`` (eval).
"""

from __future__ import annotations

import json
import re
import traceback
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import canonical_json, content_hash, first_line
from pipeline.errors import UserError
from pipeline.train import Callback
from storage.home import Home
from storage.results import ResultsStore
from storage.stages import MANIFEST, StageResult
from storage.tracking import Tracker


class RunRecorder:
    def __init__(self, home: Home, flow: str, config: dict[str, Any]):
        self.home, self.flow, self.config = home, flow, config
        self.run_id = uuid.uuid4().hex[:12]
        self.store = ResultsStore(home.results_db)
        self.tracker = Tracker(home.root)
        self.config_hash = content_hash(config)
        self.store.start_run(self.run_id, flow, self.config_hash, canonical_json(config))
        self.mlflow_run_id = self.tracker.start_run(f"{flow}-{self.run_id}", params=config,
                                                    tags={"atr.run_id": self.run_id, "atr.flow": flow})
        self.stages: list[StageResult] = []

    def begin_stage(self, stage: str) -> str:
        """Open the MLflow child run of a stage before it runs (for live training curves)."""
        return self.tracker.start_run(stage, parent_run_id=self.mlflow_run_id,
                                      tags={"atr.run_id": self.run_id, "atr.stage": stage})

    def stage(self, result: StageResult, metrics: dict[str, float] | None = None, child: str | None = None,
              artifacts: tuple[Path, ...] = ()) -> str:
        """Record one stage: a stage_runs row, and an MLflow child run with params, figures,
        the manifest and ``artifacts``. Returns the child run id."""
        self.stages.append(result)
        counts = result.manifest.get("counts")
        self.store.record_stage_run(self.run_id, result.stage, result.key, result.cached, result.seconds,
                                    str(result.path), counts)
        child = child or self.begin_stage(result.stage)
        self.tracker.log_params(child, {"stage": result.stage, "cache_key": result.key, "cached": result.cached,
                                        **({"config": result.manifest["config"]} if "config" in result.manifest
                                           else {})})
        figures = {"seconds": result.seconds, "cached": float(result.cached), **(metrics or {})}
        self.tracker.log_metrics(child, {k: float(v) for k, v in figures.items() if v is not None})
        for path in (Path(result.path) / MANIFEST, *artifacts):
            if Path(path).exists():
                self.tracker.log_artifact(child, Path(path))
        self.tracker.end_run(child)
        return child

    def stage_metrics(self, stage: str, figures: dict[str, float], child: str | None = None) -> None:
        """A stage's figures as ``stage_metrics`` rows (one write) and, with ``child``, MLflow metrics."""
        self.store.insert_rows("stage_metrics", [{"run_id": self.run_id, "stage": stage, "name": k, "value": float(v)}
                                                 for k, v in figures.items()])
        if child is not None:
            self.tracker.log_metrics(child, {f"stage/{k}": float(v) for k, v in figures.items()})

    def stages_batch(self, results: list[StageResult]) -> None:
        """Record many stage results (eval chunks) as stage_runs rows in one write, no MLflow runs."""
        self.stages.extend(results)
        self.store.record_stage_runs([
            {"run_id": self.run_id, "stage": r.stage, "cache_key": r.key, "cached": r.cached,
             "seconds": r.seconds, "output_dir": r.path, "counts": r.manifest.get("counts")} for r in results])

    def finish(self, error: BaseException | None = None) -> None:
        status = "failed" if error else "completed"
        message = None
        if error is not None:
            message = first_line(error)
            if not isinstance(error, UserError):  # a bug: keep where it happened
                message += "\n" + "".join(traceback.format_exception(error))[-2000:]
        self.store.finish_run(self.run_id, status, mlflow_run_id=self.mlflow_run_id, error=message)
        self.tracker.end_run(self.mlflow_run_id, "FAILED" if error else "FINISHED")

    # ------------------------------------------------------------ each stage's own rows

    def train(self, result: StageResult, child: str, figures: dict[str, float], artifacts: tuple[Path, ...]) -> None:
        """The train stage: its ``selector_metrics`` rows, then the stage record in MLflow child ``child``."""
        ckpts = result.manifest["checkpoints"]
        self.store.insert_rows("selector_metrics", [
            {"run_id": self.run_id, "checkpoint": str(result.path / ckpts[r.get("checkpoint") or f"{r['selector_retention']:g}"]),
             "split": "held-out", "strategy": r["strategy"], "retention": r["retention"],
             "recon_mse": r["recon_mse"],
             "glyph_coverage": None if r["glyph_coverage"] != r["glyph_coverage"] else r["glyph_coverage"]}
            for r in result.manifest["selector_metrics"]])
        self.stage(result, metrics=figures, child=child, artifacts=artifacts)

    def eval(self, model: str, results: list, child: str | None = None) -> None:
        """Eval chunks ((Chunk, StageResult) pairs): stage_runs, eval_scores and eval_samples (one write
        each), and MLflow.

        With ``child`` (``atr run``: one MLflow child run for the whole eval stage) every chunk's figures
        are metrics of that run; without it (``atr eval``) each chunk gets its own child run."""
        stages = [o for _, o in results]
        if child is None:
            for c, o in results:
                s = o.manifest["summary"]
                self.stage(o, metrics={"score": s["score"], "mean_visual_tokens": s["mean_visual_tokens"],
                                       **({"tokens_vs_stock": s["tokens_vs_stock"]}
                                          if s.get("tokens_vs_stock") is not None else {})})
        else:
            self.stages_batch(stages)
            metrics = {}
            for c, o in results:
                name = chunk_metric_name(c)
                metrics[f"{name}/score"] = o.manifest["summary"]["score"]
                metrics[f"{name}/mean_visual_tokens"] = o.manifest["summary"]["mean_visual_tokens"]
                if o.manifest["summary"].get("tokens_vs_stock") is not None:
                    metrics[f"{name}/tokens_vs_stock"] = o.manifest["summary"]["tokens_vs_stock"]
            metrics["chunks"] = len(results)
            metrics["cached_chunks"] = sum(o.cached for o in stages)
            metrics["seconds"] = sum(o.seconds for o in stages)
            self.tracker.log_metrics(child, metrics)
        samples, scores = [], []
        interpolation = bool((self.config.get("eval") or {}).get("interpolation", False))
        for c, o in results:
            s = o.manifest["summary"]
            rows = json.loads((o.path / "samples.json").read_text())
            budget = c.pruning.budget
            where = {"variant": c.pruning.variant, "threshold": float(c.pruning.threshold),
                     "interpolation": interpolation}
            samples += [{"run_id": self.run_id, "model": model, "benchmark": c.benchmark, "sample_id": r["sample_id"],
                         "strategy": c.strategy, "retention": c.retention, "seed": c.seed, "budget": budget, **where,
                         "prediction": r["prediction"], "answer": r["answer"], "score": r["score"],
                         "visual_tokens": r.get("visual_tokens"),
                         "stock_visual_tokens": r.get("stock_visual_tokens")} for r in rows]
            stock = s.get("stock_visual_tokens")
            scores.append({"run_id": self.run_id, "model": model, "benchmark": c.benchmark, "strategy": c.strategy,
                           "retention": c.retention, "seed": c.seed, "budget": budget, **where, "metric": s["metric"],
                           "score": s["score"], "n_samples": s["n_samples"],
                           "mean_visual_tokens": s["mean_visual_tokens"], "prefill_ms": s["prefill_ms"],
                           "stock_visual_tokens": stock,
                           "tokens_vs_stock": s["mean_visual_tokens"] / stock if stock else None})
        self.store.insert_rows("eval_samples", samples)
        self.store.insert_rows("eval_scores", scores)

    def run_ids(self) -> dict[str, str]:
        """The ids a report names: DuckDB run, MLflow run and experiment, tracking URI."""
        return {"run_id": self.run_id, "mlflow_run_id": self.mlflow_run_id,
                "experiment_id": self.tracker.experiment_id, "tracking_uri": self.tracker.uri}


def chunk_metric_name(chunk) -> str:
    """An eval chunk's MLflow metric prefix: ``benchmark/strategy/rRETENTION[/budget][/variant][/tT]/seedK``
    (the budget when not per-crop, the variant when not the defaults, with ``=`` and ``,`` as ``:`` and
    ``.`` and any other character MLflow refuses in a name as ``_``; the threshold under the threshold budget, where r is the cap)."""
    p = chunk.pruning
    variant = re.sub(r"[^A-Za-z0-9_\-. :]", "_", p.variant.replace("=", ":").replace(",", "."))
    return (f"{chunk.benchmark}/{chunk.strategy}/r{chunk.retention:g}" + ("" if p.budget == "per-crop" else f"/{p.budget}")
            + (f"/{variant}" if variant else "") + (f"/t{p.threshold:g}" if p.budget == "threshold" else "")
            + f"/seed{chunk.seed}")


class MlflowCurves(Callback):
    """Training curves to an MLflow run (a callback attached here, never in pipeline/)."""

    def __init__(self, home: Home, run_id: str, prefix: str):
        self.tracker, self.run_id, self.prefix = Tracker(home.root), run_id, prefix

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, {f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step)


def quality_figures(rows: list[dict]) -> dict[str, float]:
    """MLflow metric names for a quality card: ``<benchmark>.<strategy>.accuracy`` (seed mean)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(f"{r['benchmark']}.{r['strategy']}.accuracy", []).append(r["accuracy"])
    return {k: sum(v) / len(v) for k, v in groups.items()}
