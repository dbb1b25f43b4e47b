"""Recording a flow run into the DuckDB results store and MLflow.

One ``RunRecorder`` per flow run: a ``runs`` row plus one ``stage_runs`` row per
stage in DuckDB, and an MLflow parent run with a child run per stage (params =
flat config, metrics = stage figures, artifact = the stage manifest). The run id
is passed explicitly; nothing relies on MLflow's thread-local active run.
"""

from __future__ import annotations

import traceback
import uuid
from pathlib import Path
from typing import Any

from pipeline.config import canonical_json, content_hash, first_line
from storage.home import Home
from storage.results import ResultsStore
from storage.stages import MANIFEST
from storage.tracking import Tracker

from .stages import StageResult


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
            if not isinstance(error, (ValueError, RuntimeError, OSError)):
                message += "\n" + "".join(traceback.format_exception(error))[-2000:]
        self.store.finish_run(self.run_id, status, mlflow_run_id=self.mlflow_run_id, error=message)
        self.tracker.end_run(self.mlflow_run_id, "FAILED" if error else "FINISHED")
