"""The train stage end to end on real shards: figures, records, cache, resume, bad input."""

from __future__ import annotations

import dataclasses

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.config import ExtractConfig
from pipeline.selector import SelectorConfig
from pipeline.train import TrainConfig
from storage.checkpoints import load_checkpoint
from storage.home import Home
from storage.stages import read_manifest

from conftest import REPO

SHORT = SelectorConfig(retention=0.25, steps=200, batch_size=32, lr=1e-3, warmup_steps=20)


@pytest.fixture(scope="module")
def features(prefect_api_url, tmp_path_factory):
    from flows.orchestration.flows import extract_flow

    home = Home.resolve(tmp_path_factory.mktemp("train-home"))
    out = extract_flow(str(home.root), "tiny", ExtractConfig(images="synthetic:docs", limit=320, crops="base",
                                                            shard_size=64).to_dict())
    return home, out["stages"][1]["key"]


@pytest.fixture(scope="module")
def trained(features):
    from flows.orchestration.flows import train_flow

    home, key = features
    cfg = TrainConfig(selector=SHORT, held_out_percent=20, checkpoint_every=50)
    return home, key, cfg, train_flow(str(home.root), cfg.to_dict(), features=key,
                                      user_set=["steps", "batch_size", "lr", "warmup_steps"])


def test_selector_beats_random_on_held_out_crops(trained):
    _, _, _, out = trained
    rows = {(r["strategy"], r["retention"]): r for r in out["manifest"]["selector_metrics"]}
    assert {r for _, r in rows} == {0.1, 0.25, 0.5, 0.75, 1.0}
    sel, rnd = rows[("selector", 0.25)], rows[("random", 0.25)]
    every = rows[("selector", 1.0)]["recon_mse"]  # every token kept: the reconstruction floor
    assert every == rows[("random", 1.0)]["recon_mse"] and every < 0.6 * rnd["recon_mse"], (every, rnd)
    assert sel["recon_mse"] < 0.85 * rnd["recon_mse"], (sel, rnd)
    assert sel["glyph_coverage"] > 1.5 * rnd["glyph_coverage"], (sel, rnd)
    assert abs(rnd["glyph_coverage"] - 0.25) < 0.05  # random keeps a quarter of the glyph tokens
    assert out["manifest"]["held_out_crops"] > 40


def test_checkpoint_and_outputs(trained):
    _, key, cfg, out = trained
    path = Path(out["path"])
    assert out["manifest"]["inputs"] == {"features": key}
    assert out["manifest"]["eval_mode"] == "single-selector-top-k"
    tensors, meta = load_checkpoint(path / "selector-p0.25.safetensors", expect_channels=64, expect_tokens=64)
    assert meta["tokens"] == 64 and meta["channels"] == 64 and meta["steps"] == 200
    assert meta["encoder"]["features_key"] == key and meta["config"]["lr"] == 1e-3
    assert "feature_std" in tensors and not any(k.startswith("optim.") for k in tensors)
    assert not (path / "last-p0.25.safetensors").exists()
    curves = json.loads((path / "curves-p0.25.json").read_text())
    assert [c["step"] for c in curves] == list(range(10, 201, 10))
    assert (Path(out["report"]) / "selector_metrics.png").stat().st_size > 10_000


def test_records_in_duckdb_and_mlflow(trained):
    home, _, _, out = trained
    with duckdb.connect(str(home.results_db), read_only=True) as con:
        rows = con.execute("SELECT strategy, retention, recon_mse, glyph_coverage, split, checkpoint "
                           "FROM selector_metrics WHERE run_id = ?", [out["run_id"]]).fetchall()
        stage = con.execute("SELECT cached FROM stage_runs WHERE run_id = ? AND stage = 'train'",
                            [out["run_id"]]).fetchone()
    assert len(rows) == 15 and stage == (False,)  # 5 retentions x 3 strategies
    assert all(r[4] == "held-out" and r[5].endswith("selector-p0.25.safetensors") for r in rows)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home.mlflow_db}")
    parent = client.get_run(out["mlflow_run_id"])
    child, = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    history = client.get_metric_history(child.info.run_id, "p0.25/loss")
    assert len(history) == 20 and history[-1].step == 200
    assert child.data.metrics["selector/glyph_coverage_at_0.25"] > child.data.metrics["random/glyph_coverage_at_0.25"]
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"selector_metrics.png", "selector-p0.25.safetensors", "_manifest.json"} <= artifacts


def test_identical_train_is_a_cache_hit(trained):
    from flows.orchestration.flows import train_flow

    home, key, cfg, first = trained
    again = train_flow(str(home.root), cfg.to_dict(), features=key,
                       user_set=["steps", "batch_size", "lr", "warmup_steps"])
    assert again["cached"] and again["key"] == first["key"] and again["seconds"] < 5


def _atr(env, *args):
    """`atr args` with environment ``env``, in this process (tests/conftest.py atr_in_process)."""
    from conftest import atr_in_process

    return atr_in_process(args, env)


def _atr_process(env, *args):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


# slow (52 s): tests/test_train_resume.py checks that a resumed run equals an uninterrupted one by default
@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(features, cli_env):
    home, key = features
    env = {**cli_env, "ATR_HOME": str(home.root)}
    args = ["train", "--features", key, "--retention", "0.3", "--steps", "300", "--batch-size", "16",
            "--lr", "1e-3", "--checkpoint-every", "60"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages = home.stages / "train"
    deadline, last = time.monotonic() + 400, None
    while time.monotonic() < deadline and last is None:
        assert proc.poll() is None, "training finished before it could be killed"
        found = [p / "last-p0.3.json" for p in stages.glob("*.tmp") if (p / "last-p0.3.json").is_file()] \
            if stages.exists() else []
        if found and json.loads(found[0].read_text())["step"] >= 120:
            last = found[0]
        time.sleep(0.05)
    assert last is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(last.read_text())["step"]
    assert 120 <= killed_at < 300

    resumed = _atr_process(env, *args)
    assert resumed.returncode == 0, resumed.stderr
    final = last.parent.with_name(last.parent.name[: -len(".tmp")])
    curves = json.loads((final / "curves-p0.3.json").read_text())
    steps = [c["step"] for c in curves]
    assert steps == list(range(10, 301, 10))  # no step trained twice: it resumed, not restarted
    _, meta = load_checkpoint(final / "selector-p0.3.safetensors")
    assert meta["steps"] == 300


def test_bad_training_input_fails_in_one_line(features, cli_env):
    home, key = features
    env = {**cli_env, "ATR_HOME": str(home.root)}
    cases = [
        (["train", "--features", "ffffffffff"], "no extract stage output matches 'ffffffffff'"),
        (["train", "--features", key, "--retention", "1.5"], "retention must be in (0, 1]"),
        (["train", "--features", key, "--retention", "0"], "retention must be in (0, 1]"),
        (["train", "--features", key, "--steps", "50", "--lr", "1e9", "--retention", "0.2"], "training stopped"),
        (["train", "--features", key, "--held-out-percent", "100"], "held_out_percent"),
    ]
    for argv, needle in cases:
        proc = _atr(env, *argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and lines and lines[-1].startswith("error: ") and needle in lines[-1], \
            (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    complete = [p for p in (home.stages / "train").iterdir() if p.is_dir() and not p.name.endswith(".tmp")]
    for p in complete:
        assert read_manifest(p)["config"]["selector"]["lr"] < 1e9


@pytest.mark.slow
def test_default_training_reaches_the_issue_figures(prefect_api_url, tmp_path):
    """`atr train --retention 0.25` defaults on the tiny preset: selector MSE <= 0.6 x random and
    glyph coverage >= 2 x random at 0.25 on held-out crops, training in about 2 minutes."""
    from flows.orchestration.flows import train_flow

    extract = ExtractConfig(images="synthetic:docs", limit=2048, crops="base").to_dict()
    out = train_flow(str(tmp_path / "home"), TrainConfig().to_dict(), model="tiny", extract=extract)
    rows = {(r["strategy"], r["retention"]): r for r in out["manifest"]["selector_metrics"]}
    sel, rnd = rows[("selector", 0.25)], rows[("random", 0.25)]
    print({k: (round(v["recon_mse"], 4), round(v["glyph_coverage"], 3)) for k, v in rows.items()},
          out["manifest"]["train_seconds"])
    assert sel["recon_mse"] <= 0.6 * rnd["recon_mse"]
    assert sel["glyph_coverage"] >= 2 * rnd["glyph_coverage"]


def test_empty_feature_stage_is_refused_and_leaves_nothing(tmp_path, cli_env):
    from storage.stages import StageDir

    home = Home.resolve(tmp_path / "home")
    sd = StageDir(home, "extract", "0123456789abcdef")
    sd.begin()
    sd.commit({"config": ExtractConfig().to_dict(), "inputs": {"model": "none", "images": "none"},
               "features": {"dtype": "float16", "tokens_per_crop": 64, "feature_dim": 64},
               "counts": {"images": 0, "samples": 0, "skipped": 0, "shards": 0}, "shards": []})
    proc = _atr({**cli_env, "ATR_HOME": str(home.root)}, "train", "--features", "0123456789abcdef")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: no training features: the train split is empty"
    assert not list((home.stages / "train").glob("*")) or not [
        p for p in (home.stages / "train").iterdir() if p.is_dir()]


def test_tiny_schedule_applies_to_both_tiny_presets_only():
    from pipeline.train import TINY_SCHEDULE, TrainConfig, tiny_schedule

    cfg = TrainConfig()
    for model in ("tiny", "tiny-trained"):
        short = tiny_schedule(cfg, model, set())
        assert (short.selector.steps, short.selector.batch_size, short.selector.lr) == \
            (TINY_SCHEDULE["steps"], TINY_SCHEDULE["batch_size"], TINY_SCHEDULE["lr"])
        assert tiny_schedule(cfg, model, {"steps"}).selector.steps == cfg.selector.steps
    assert tiny_schedule(cfg, "llava-hf/llava-v1.6-mistral-7b-hf", set()) == cfg
    assert tiny_schedule(cfg, None, set()) == cfg  # features from another home: the model is unknown
    # dynamic-grid features (Qwen-VL): d = the tower's width for every model, unless the user set it
    qwen = tiny_schedule(cfg, "Qwen/Qwen2.5-VL-7B-Instruct", set(), tower_width=1280)
    assert qwen.selector.d_model == 1280 and qwen.selector.steps == cfg.selector.steps
    assert tiny_schedule(cfg, "tiny-qwen25-trained", set(), 64).selector.d_model == 64
    assert tiny_schedule(cfg, "Qwen/Qwen2.5-VL-7B-Instruct", {"d_model"}, 1280) == cfg
    given = dataclasses.replace(cfg, selector=dataclasses.replace(cfg.selector, d_model=512))
    assert tiny_schedule(given, "Qwen/Qwen2.5-VL-7B-Instruct", set(), 1280) == given
