"""MLflow adapter: an explicit-client tracker (no fluent global/active-run state).

By default runs go to a sqlite database under the pipeline home and artifacts
to `{home}/mlartifacts`; MLFLOW_TRACKING_URI overrides the tracking store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

_REMOTE_SCHEMES = ("http://", "https://", "databricks")
END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite database in `home`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve()}/mlflow.db"


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """Flatten nested mappings into dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _param_value(value: object) -> str:
    """Stringify a param value, truncated to MLflow's length limit."""
    text = json.dumps(list(value), default=str) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """Logs runs, params, metrics and artifacts to one MLflow experiment."""

    def __init__(self, home: Path, experiment: str = "atr"):
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        home = Path(home)
        self.uri = tracking_uri(home)
        if self.uri.startswith("sqlite:"):
            home.mkdir(parents=True, exist_ok=True)
        # A fresh sqlite store is created by alembic migrations on first use; two processes doing
        # that at once (two `atr` commands on a new home) collide, so the first use is serialized.
        lock = open(home / ".mlflow.lock", "w") if self.uri.startswith("sqlite:") else None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            with warnings.catch_warnings():  # SQLAlchemy deprecation noise from MLflow's store
                warnings.simplefilter("ignore", DeprecationWarning)
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment_id(experiment, home / "mlartifacts")
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    def _experiment_id(self, name: str, artifacts: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None if self.uri.startswith(_REMOTE_SCHEMES) else artifacts.resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # created concurrently
            if found is None:
                raise
            return found.experiment_id

    def start_run(
        self,
        run_name: str,
        params: dict | None = None,
        parent_run_id: str | None = None,
        tags: dict | None = None,
    ) -> str:
        """Create a run (a child run if `parent_run_id`) and return its id."""
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Log flattened, stringified params (re-logging an equal value is allowed)."""
        items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        items = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        for chunk in _chunks(items, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, to the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in END_STATUSES:
            raise ValueError(f"end_run status must be one of {END_STATUSES}, not {status!r}")
        self.client.set_terminated(run_id, status=status)
