"""Tests for the MLflow tracker against real sqlite-backed MLflow stores."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from storage.tracking import Tracker, flatten, tracking_uri


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}) == {"a.b.c": 1, "a.d": [1, 2], "e": None}
    assert flatten({"x": 1}, prefix="cfg") == {"cfg.x": 1}


def test_parent_and_child_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    tracker = Tracker(tmp_path)
    params = {"model": {"name": "llava", "layers": [1, 2]}, "long": "x" * (MAX_PARAM_VAL_LENGTH + 10)}
    parent = tracker.start_run("eval", params=params, tags={"flow": "eval"})
    child = tracker.start_run("eval/textvqa", parent_run_id=parent)
    tracker.log_params(child, {"retention": {"ratio": 0.25}})
    tracker.log_metrics(child, {"acc": 0.5}, step=0)
    tracker.log_metrics(child, {"acc": 0.75}, step=1)
    artifact = tmp_path / "report.json"
    artifact.write_text('{"ok": true}')
    tracker.log_artifact(child, artifact, artifact_path="reports")
    tracker.end_run(child)
    tracker.end_run(parent, "FAILED")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent_run, child_run = client.get_run(parent), client.get_run(child)
    assert parent_run.data.params["model.name"] == "llava"
    assert parent_run.data.params["model.layers"] == "[1, 2]"
    assert len(parent_run.data.params["long"]) == MAX_PARAM_VAL_LENGTH
    assert parent_run.data.tags["flow"] == "eval"
    assert child_run.data.params == {"retention.ratio": "0.25"}
    assert child_run.data.metrics == {"acc": 0.75}
    assert [m.value for m in client.get_metric_history(child, "acc")] == [0.5, 0.75]
    assert child_run.data.tags["mlflow.parentRunId"] == parent
    assert (child_run.info.status, parent_run.info.status) == ("FINISHED", "FAILED")
    assert [f.path for f in client.list_artifacts(child, "reports")] == ["reports/report.json"]
    assert child_run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    assert Tracker(tmp_path).experiment_id == tracker.experiment_id


def test_tracking_uri_override(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    home = tmp_path / "home"
    run_id = Tracker(home, experiment="override").start_run("r")
    assert other.exists() and not (home / "mlflow.db").exists()
    run = MlflowClient(tracking_uri=f"sqlite:///{other}").get_run(run_id)
    assert run.info.run_name == "r"
