"""`atr run` end to end on a small config: every stage, the cache, --from, the report, DuckDB and MLflow.

One module-scoped cold run; the tests after it re-run the same home with identical,
eval-only-changed and --from configs and check what was recomputed.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import duckdb
import pytest

SMALL = {
    "model": "tiny-trained",
    "extract": {"limit": 96, "shard_size": 32},
    "train": {"selector": {"steps": 20}, "eval_retentions": [0.25], "eval_seeds": 1, "checkpoint_every": 10},
    # no selector variants and no threshold sweep: a partial [eval] table keeps atr run's own (RunConfig)
    "eval": {"strategies": ["full", "none", "random", "selector"], "retentions": [0.25], "seeds": 1, "limit": 12,
             "batch_size": 12, "thresholds": [], "options": {}},
}
STAGE_ORDER = ["prepare-model", "extract", "train", "eval", "report"]


def run(home, config=SMALL, from_stage=None, return_state=False):
    from flows.orchestration.flows import run_flow
    from pipeline.run_config import RunConfig

    cfg = RunConfig.from_dict(config).to_dict()
    return run_flow(str(home), cfg, from_stage, ["steps"], return_state=return_state)


def by_stage(out) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for s in out["stages"]:
        groups.setdefault(s["stage"], []).append(s)
    return groups


def cached(out) -> dict[str, bool | None]:
    """Per stage: True if every row was cached, False if none was, None if mixed."""
    out_ = {}
    for name, g in by_stage(out).items():
        n = sum(s["cached"] for s in g)
        out_[name] = True if n == len(g) else (False if n == 0 else None)
    return out_


@pytest.fixture(scope="module")
def cold(prefect_api_url, tmp_path_factory):
    from storage.home import Home

    home = Home.resolve(tmp_path_factory.mktemp("run-home")).ensure()
    state = run(home.root, return_state=True)
    return home, state.result(), state.state_details.flow_run_id


def test_cold_run_computes_every_stage_and_writes_the_report(cold):
    home, out, _ = cold
    assert list(by_stage(out)) == STAGE_ORDER
    assert cached(out) == dict.fromkeys(STAGE_ORDER, False)
    # full + none + random x1 + selector at one retention, on two benchmarks
    assert len(by_stage(out)["eval"]) == 2 * 4
    report = Path(out["report"])
    assert report.parent == home.reports and report.name == f"run-{out['run_id']}"
    files = {p.name for p in report.iterdir()}
    assert {"summary.md", "summary.json", "run.json", "eval-synthetic-ocr.png", "eval-synthetic-scene.png",
            "eval-grid.png", "frontier.png", "selector_metrics.png"} <= files
    md = (report / "summary.md").read_text()
    assert out["run_id"] in md and out["mlflow_run_id"] in md
    assert "| synthetic-ocr | selector |" in md and "| synthetic-scene | random (1 seeds) |" in md
    summary = json.loads((report / "summary.json").read_text())
    full = [r for r in summary["eval"] if r["strategy"] == "full"]
    assert {r["benchmark"] for r in full} == {"synthetic-ocr", "synthetic-scene"}
    assert all(r["score"] > 0.5 for r in full)  # tiny-trained reads: full-image accuracy is high


def test_run_is_recorded_in_duckdb_with_its_mlflow_run(cold):
    home, out, _ = cold
    con = duckdb.connect(str(home.results_db), read_only=True)
    try:
        status, mlflow_id, config = con.execute(
            "SELECT status, mlflow_run_id, config_json FROM runs WHERE run_id = ?", [out["run_id"]]).fetchone()
        stages = con.execute("SELECT stage, count(*), bool_or(cached) FROM stage_runs WHERE run_id = ? "
                             "GROUP BY stage ORDER BY stage", [out["run_id"]]).fetchall()
        scores = con.execute("SELECT count(*) FROM eval_scores WHERE run_id = ?", [out["run_id"]]).fetchone()[0]
        samples = con.execute("SELECT count(*) FROM eval_samples WHERE run_id = ?", [out["run_id"]]).fetchone()[0]
        metrics = con.execute("SELECT count(*) FROM selector_metrics WHERE run_id = ?", [out["run_id"]]).fetchone()[0]
    finally:
        con.close()
    assert status == "completed" and mlflow_id == out["mlflow_run_id"]
    assert json.loads(config)["extract"]["limit"] == 96
    assert stages == [("eval", 8, False), ("extract", 1, False), ("prepare-model", 1, False),
                      ("report", 1, False), ("train", 1, False)]
    assert scores == 8 and samples == 8 * 12 and metrics == 3  # selector, random, uniform-grid at 0.25


def test_mlflow_parent_run_has_one_child_per_stage_with_params_metrics_artifacts(cold):
    from mlflow import MlflowClient

    home, out, _ = cold
    client = MlflowClient(tracking_uri=f"sqlite:///{home.root}/mlflow.db")
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.data.params["extract.limit"] == "96" and parent.data.params["model"] == "tiny-trained"
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(c.info.run_name for c in children)
    assert names == sorted(STAGE_ORDER)
    child = {c.info.run_name: c for c in children}
    assert child["extract"].data.metrics["samples"] == 96
    assert child["eval"].data.metrics["chunks"] == 8
    assert "synthetic-ocr/selector/r0.25/seed0/score" in child["eval"].data.metrics
    train_arts = {a.path for a in client.list_artifacts(child["train"].info.run_id)}
    assert {"selector-p0.25.safetensors", "selector_metrics.png", "_manifest.json"} <= train_arts
    report_arts = {a.path for a in client.list_artifacts(child["report"].info.run_id)}
    assert {"summary.md", "eval-grid.png", "frontier.png", "_manifest.json"} <= report_arts


def test_prefect_cache_entries_are_keyed_by_the_stage_hashes(cold):
    """Prefect stores each task's cached result under its cache key: one entry per stage key
    (per shard for extraction), holding that very stage's output. Eval shards are not cached by
    Prefect: their results are stage dirs already, and a unit's figures (tower passes) describe each run."""
    import os

    home, out, _ = cold
    results = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    extract = by_stage(out)["extract"][0]
    for s in out["stages"]:
        if s["stage"] == "eval":
            assert not (results / s["key"]).exists()
            continue
        if s["stage"] == "report":  # plain function, not a Prefect task
            continue
        keys = [f"{s['key']}-{i:06d}" for i in range(3)] if s["stage"] == "extract" else [s["key"]]
        for key in keys:
            record = json.loads((results / key).read_text())
            result = json.loads(record["result"])
            if s["stage"] == "extract":
                assert result["index"] == int(key[-6:]) and result["name"] in {
                    sh["name"] for sh in json.loads((Path(extract["path"]) / "_manifest.json").read_text())["shards"]}
            else:
                assert result["key"] == s["key"] and result["stage"] == s["stage"]


def test_second_identical_run_does_no_model_work(cold):
    from pipeline import loading

    home, first, _ = cold
    stamps = {p: p.stat().st_mtime_ns for p in home.stages.glob("*/*/_manifest.json")}
    loading._LOADED.clear()
    out = run(home.root)
    assert cached(out) == dict.fromkeys(STAGE_ORDER, True)
    assert loading._LOADED == {}  # no model was loaded
    assert {p: p.stat().st_mtime_ns for p in home.stages.glob("*/*/_manifest.json")} == stamps
    assert [s["key"] for s in out["stages"]] == [s["key"] for s in first["stages"]]
    assert out["run_id"] != first["run_id"]


def test_changing_only_eval_settings_reuses_features_and_selector(cold):
    home, first, _ = cold
    config = {**SMALL, "eval": {**SMALL["eval"], "retentions": [0.25, 0.5]}}
    out = run(home.root, config)
    c = cached(out)
    assert c["prepare-model"] and c["extract"] and c["train"]
    evals = by_stage(out)["eval"]
    assert len(evals) == 2 * (2 + 2 + 2)
    old = {s["key"] for s in by_stage(first)["eval"]}
    assert {s["key"] for s in evals if s["cached"]} == old  # every chunk of the first run was reused
    assert not by_stage(out)["report"][0]["cached"]


def test_from_train_recomputes_train_and_after_but_reuses_the_features(cold):
    home, first, _ = cold
    before = by_stage(first)["train"][0]
    ckpt = Path(before["path"]) / "selector-p0.25.safetensors"
    out = run(home.root, from_stage="train")
    assert cached(out) == {"prepare-model": True, "extract": True, "train": False, "eval": False, "report": False}
    assert by_stage(out)["train"][0]["key"] == before["key"]
    assert ckpt.is_file()  # replaced in place by the recomputed one (training is deterministic)


def test_from_eval_recomputes_eval_and_report_only(cold):
    home, _, _ = cold
    out = run(home.root, from_stage="eval")
    assert cached(out) == {"prepare-model": True, "extract": True, "train": True, "eval": False, "report": False}


def test_deleting_a_stage_directory_recomputes_just_that_stage(cold):
    home, first, _ = cold
    ext = by_stage(first)["extract"][0]
    shas = [s["sha256"] for s in json.loads((Path(ext["path"]) / "_manifest.json").read_text())["shards"]]
    shutil.rmtree(ext["path"])
    out = run(home.root)
    assert cached(out) == {"prepare-model": True, "extract": False, "train": True, "eval": True, "report": True}
    again = json.loads((Path(ext["path"]) / "_manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in again] == shas  # the same bytes, so later stages stay valid


def test_print_config_round_trips_and_bad_configs_fail_in_one_line(cli_env, tmp_path):
    from conftest import assert_one_line_errors, atr_in_process
    from pipeline.run_config import RunConfig, load_run_config

    proc = atr_in_process(["run", "--print-config"], cli_env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "limit = 2048" in text and 'crops = "base"' in text and "retentions = [0.1, 0.25, 0.5, 0.75]" in text
    (tmp_path / "run.toml").write_text(text)
    cfg, user_set = load_run_config(tmp_path / "run.toml")
    assert cfg == RunConfig() and "steps" not in user_set  # the tiny schedule still applies
    assert tomllib.loads(text)["eval"]["strategies"][3] == "selector"
    partial = tmp_path / "partial.toml"
    partial.write_text('[extract]\nimages = "synthetic:scenes"\n[train.selector]\nsteps = 50\n')
    cfg, user_set = load_run_config(partial)
    assert cfg.extract.images == "synthetic:scenes" and cfg.extract.limit == 2048 and cfg.extract.crops == "base"
    assert cfg.train.selector.steps == 50 and user_set == ["steps"]
    (tmp_path / "eval.toml").write_text("[eval]\nlimit = 50\n")  # a partial [eval] keeps atr run's variants
    cfg, _ = load_run_config(tmp_path / "eval.toml")
    assert cfg.eval.limit == 50 and cfg.eval.thresholds == RunConfig().eval.thresholds == (0.3, 0.5, 0.7, 0.9)
    assert [dict(o) for o in cfg.eval.options["selector"]] == [{}, {"allocation": "image"}, {"allocation": "grid"}]
    (tmp_path / "typo.toml").write_text("[eval]\nretentons = [0.25]\n")
    (tmp_path / "range.toml").write_text("[eval]\nretentions = [1.5]\n")
    (tmp_path / "broken.toml").write_text("[eval\n")
    (tmp_path / "bench.toml").write_text('[eval]\nbenchmarks = ["docvqa_val"]\n')
    assert_one_line_errors([
        (["run", "--config", str(tmp_path / "typo.toml")], "did you mean 'retentions'"),
        (["run", "--config", str(tmp_path / "range.toml")], "retention must be in (0, 1]"),
        (["run", "--config", str(tmp_path / "broken.toml")], "not valid TOML"),
        (["run", "--config", str(tmp_path / "bench.toml")], "needs a path in [data]"),
        (["run", "--config", str(tmp_path / "missing.toml")], "no such file"),
    ], cli_env)


def test_cli_stage_names_match_the_flow():
    from flows.cli import build_parser
    from flows.stages import STAGES

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    choices = next(a.choices for a in run._actions if a.dest == "from_stage")
    assert tuple(choices) == STAGES == tuple(STAGE_ORDER)


def test_atr_run_command_prints_the_tables_and_the_report(cold, cli_env, tmp_path):
    """The command as a user runs it, on the module's home: a cache hit end to end."""
    from conftest import atr_in_process

    home, _, _ = cold
    lines = ['model = "tiny-trained"', "[extract]", "limit = 96", "shard_size = 32",
             "[train]", "eval_retentions = [0.25]", "eval_seeds = 1", "checkpoint_every = 10",
             "[train.selector]", "steps = 20",
             "[eval]", 'strategies = ["full", "none", "random", "selector"]', "retentions = [0.25]", "seeds = 1",
             "limit = 12", "batch_size = 12", "thresholds = []", "[eval.options]"]
    (tmp_path / "small.toml").write_text("\n".join(lines) + "\n")
    env = {**cli_env, "ATR_HOME": str(home.root)}
    proc = atr_in_process(["run", "--config", str(tmp_path / "small.toml")], env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "pruned evaluation" in out and "stages" in out
    for stage in STAGE_ORDER:
        row = next(line for line in out.splitlines() if f" {stage} " in line and "│" in line)
        assert "yes" in row, row  # every stage cached
    report = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("report "))
    assert Path(report).is_file() and Path(report).name == "summary.md"


def test_both_families_in_one_run_keyed_by_model(cold):
    """``model = [tiny-trained, tiny-ov-trained]``: the NeXT stages are the cold run's (cached), the
    OneVision ones are new; the SQL store and the report are keyed by model."""
    home, first, _ = cold
    config = {**SMALL, "model": ["tiny-trained", "tiny-ov-trained"]}
    out = run(home.root, config)
    stages = by_stage(out)
    assert [len(stages[s]) for s in STAGE_ORDER] == [2, 2, 2, 16, 2]
    assert {s["key"] for s in stages["train"] if s["cached"]} == {by_stage(first)["train"][0]["key"]}
    assert sum(not s["cached"] for s in stages["eval"]) == 8  # the OneVision chunks
    assert set(out["summaries"]) == {"tiny-trained", "tiny-ov-trained"}
    full = {r["model"]: r["score"] for r in out["summary"] if r["strategy"] == "full"
            and r["benchmark"] == "synthetic-scene"}
    assert set(full) == {"tiny-trained", "tiny-ov-trained"} and all(v > 0.5 for v in full.values())
    con = duckdb.connect(str(home.results_db), read_only=True)
    try:
        per_model = con.execute("SELECT model, count(*) FROM eval_samples WHERE run_id = ? GROUP BY model "
                                "ORDER BY model", [out["run_id"]]).fetchall()
        scores = con.execute("SELECT count(DISTINCT model) FROM eval_scores WHERE run_id = ?",
                             [out["run_id"]]).fetchone()[0]
    finally:
        con.close()
    assert per_model == [("tiny-ov-trained", 8 * 12), ("tiny-trained", 8 * 12)] and scores == 2
    report = Path(out["report"])
    for model in ("tiny-trained", "tiny-ov-trained"):
        assert {"summary.md", "eval-synthetic-ocr.png", "eval-grid.png"} <= {p.name for p in (report / model).iterdir()}
    md = (report / "summary.md").read_text()
    assert "](tiny-ov-trained/eval-grid.png)" in md and "](tiny-trained/eval-grid.png)" in md
    ov_md = (report / "tiny-ov-trained" / "summary.md").read_text()
    assert "- synthetic-scene: stock context" in ov_md and "; full 1." in ov_md  # OneVision: full above stock
    next_md = (report / "tiny-trained" / "summary.md").read_text()
    assert "stock context" not in next_md and "(1.00×) | " in next_md  # NeXT: stock is full; the token table stays
