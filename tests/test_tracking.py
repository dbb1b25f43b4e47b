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


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unreachable_server_spools_and_sync_replays_it_once(tmp_path, monkeypatch, capfd):
    """MLflow down: one warning line, every call spooled with stand-in ids; replay against the server
    (here the sqlite store standing in for it once it is back) recreates runs, params, metric history,
    artifacts, statuses and the parent/child link, and a second replay does nothing."""
    from storage import tracking
    from storage.tracking import OFFLINE_PREFIX, pending, replay

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking.Tracker, "_warned", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    home = tmp_path / "home"
    t = Tracker(home)
    assert t.offline
    parent = t.start_run("eval-abc", params={"model": {"name": "tiny"}}, tags={"atr.run_id": "abc"})
    child = t.start_run("eval", parent_run_id=parent)
    t.log_metrics(child, {"acc": 0.5}, step=0)
    t.log_metrics(child, {"acc": 0.75}, step=1)
    (home / "report.md").write_text("# report")
    t.log_artifact(child, home / "report.md")
    t.end_run(child)
    Tracker(home).end_run(parent, "FAILED")  # a second tracker in the process: no second warning
    err = capfd.readouterr().err
    assert err.count("warning: MLflow at http://127.0.0.1") == 1 and "`atr sync`" in err
    assert parent.startswith(OFFLINE_PREFIX) and child.startswith(OFFLINE_PREFIX)
    assert len(pending(home)) == 2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/server.db")
    seen = {}
    got = replay(home, on_ids=seen.update)
    assert got == {"files": 2, "calls": 8, "runs": 2}
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/server.db")
    p, c = client.get_run(seen[parent]), client.get_run(seen[child])
    assert p.data.params == {"model.name": "tiny"} and p.data.tags["atr.run_id"] == "abc"
    assert c.data.tags["mlflow.parentRunId"] == p.info.run_id
    assert [m.value for m in client.get_metric_history(c.info.run_id, "acc")] == [0.5, 0.75]
    assert [f.path for f in client.list_artifacts(c.info.run_id)] == ["report.md"]
    assert (c.info.status, p.info.status) == ("FINISHED", "FAILED")
    assert pending(home) == [] and replay(home) == {"files": 0, "calls": 0, "runs": 0}
    assert len(client.search_runs([t.experiment_id or client.get_experiment_by_name("atr").experiment_id])) == 2


def test_an_interrupted_replay_resumes_without_repeats(tmp_path, monkeypatch):
    from storage import tracking
    from storage.tracking import replay

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking.Tracker, "_warned", set())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    home = tmp_path / "home"
    t = Tracker(home)
    run = t.start_run("r")
    for step in range(3):
        t.log_metrics(run, {"loss": float(step)}, step=step)
    t.end_run(run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/server.db")
    calls = {"n": 0}
    real = tracking.MlflowClient.log_batch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("server went away")
        return real(self, *a, **k)

    monkeypatch.setattr(tracking.MlflowClient, "log_batch", flaky)
    import pytest

    with pytest.raises(ConnectionError):
        replay(home)
    monkeypatch.setattr(tracking.MlflowClient, "log_batch", real)
    got = replay(home)
    assert got["runs"] == 0 and got["calls"] == 3  # the run and the first metric were not played again
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/server.db")
    (only,) = client.search_runs([client.get_experiment_by_name("atr").experiment_id])
    assert [m.value for m in client.get_metric_history(only.info.run_id, "loss")] == [0.0, 1.0, 2.0]
    assert only.info.status == "FINISHED"


def test_refused_credentials_are_one_line_naming_the_server(tmp_path, monkeypatch):
    from storage.tracking import TrackingAuthError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    t = Tracker.__new__(Tracker)
    t.uri = "http://127.0.0.1:1"
    from mlflow.exceptions import MlflowException

    import pytest

    with pytest.raises(TrackingAuthError, match=r"MLflow tracking server http://127.0.0.1:1 refused the credentials "
                                                r"\(user 'alice'"):
        t._failed(MlflowException("API request to endpoint /api/2.0/mlflow/experiments/get-by-name failed with "
                                  "error code 401 != 200. Response body: 'You are not authenticated.'"))


def test_atr_eval_with_mlflow_down_completes_and_atr_sync_replays_it(cli_env, tmp_path):
    """As a user meets it: `atr eval` while the tracking server is down completes, records to DuckDB
    and warns in one line; `atr sync` (server back) gives MLflow the run with the same structure a live
    run has (parent, one child per chunk, params, metrics, artifacts); a second sync changes nothing."""
    import duckdb

    from conftest import atr_in_process

    env = {**cli_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"}
    args = ["eval", "--model", "tiny-trained", "--benchmark", "synthetic-ocr",
            "--limit", "8", "--strategies", "full,random", "--retentions", "0.5", "--seeds", "1"]
    down = atr_in_process(args, env)
    assert down.returncode == 0, down.stderr
    warnings = [line for line in down.stderr.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "atr sync" in warnings[0], down.stderr
    db = tmp_path / "home" / "results.duckdb"
    with duckdb.connect(str(db), read_only=True) as c:
        ((run_id, stand_in),) = c.execute("SELECT run_id, mlflow_run_id FROM runs").fetchall()
        assert stand_in.startswith("offline-")
        assert c.execute("SELECT count(*) FROM eval_scores WHERE run_id = ?", [run_id]).fetchone()[0] == 2

    server = f"sqlite:///{tmp_path}/server.db"
    sync = ["sync"]
    up = {**cli_env, "MLFLOW_TRACKING_URI": server}
    first = atr_in_process(sync, up)
    assert first.returncode == 0, first.stderr
    assert "runs created, 1 DuckDB runs now point at them" in first.stdout, first.stdout
    with duckdb.connect(str(db), read_only=True) as c:
        (real,) = c.execute("SELECT mlflow_run_id FROM runs").fetchone()
    second = atr_in_process(sync, up)
    assert second.returncode == 0 and "nothing to sync" in second.stdout, second.stdout + second.stderr

    live = atr_in_process(args, up)  # the same, live
    assert live.returncode == 0 and "MLflow" not in live.stderr, live.stderr
    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("atr").experiment_id

    def shape(parent_id: str):
        parent = client.get_run(parent_id)
        kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")
        return (sorted(parent.data.params), parent.info.status,
                sorted((k.info.run_name, tuple(sorted(k.data.params)), tuple(sorted(k.data.metrics)),
                        tuple(f.path for f in client.list_artifacts(k.info.run_id)), k.info.status) for k in kids))

    with duckdb.connect(str(db), read_only=True) as c:
        (live_id,) = c.execute("SELECT mlflow_run_id FROM runs WHERE mlflow_run_id <> ?", [real]).fetchone()
    replayed, fresh = shape(real), shape(live_id)
    assert [k[0] for k in replayed[2]] == ["eval", "eval", "prepare-model"] and replayed == fresh
    assert client.get_run(real).data.tags["atr.run_id"] == run_id


def test_sync_while_the_server_is_still_down_is_one_line_and_keeps_the_spool(tmp_path, monkeypatch, capfd):
    import pytest

    from storage import tracking
    from storage.tracking import TrackingError, pending, replay

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(tracking.Tracker, "_warned", set())
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    home = tmp_path / "home"
    Tracker(home).end_run(Tracker(home).start_run("r"))
    capfd.readouterr()
    monkeypatch.setattr(tracking.Tracker, "_warned", set())
    with pytest.raises(TrackingError, match=rf"MLflow at {url} is still unreachable; nothing replayed after 0 calls"):
        replay(home)
    assert "warning" not in capfd.readouterr().err  # the error is the one line
    assert len(pending(home)) == 2  # one spool file per tracker, both kept for the next sync
