"""Crashes lose nothing: extraction killed with SIGKILL at random points resumes to the same
bytes, training resumes from its last checkpoint, a killed eval keeps its finished chunks,
and no stage directory without a complete manifest is ever taken as a cache hit."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runtime import WORKER_ENV
from pipeline.config import ExtractConfig
from storage.shards import iter_features
from storage.stages import read_manifest

from conftest import REPO

# One extraction through the real stage functions (what `atr extract` runs inside its Prefect
# tasks), in its own process so that it can be SIGKILLed. It prints "ready" once the model is
# loaded, then a JSON line when done.
DRIVER = r"""
import json, sys, time
from flows.stages.extract import extract, plan_extract
from flows.stages.prepare_model import prepare_model
from pipeline.config import ExtractConfig
from pipeline.loading import cached_model
from storage.home import Home

home = Home.resolve(sys.argv[1]).ensure()
model_stage = prepare_model(home, "tiny")
cfg = ExtractConfig.from_dict(json.loads(sys.argv[2]))
plan = plan_extract(model_stage, cfg)
cached_model(plan.model_dir)
print("ready", flush=True)
t0 = time.perf_counter()
extract(home, cfg, model_stage)  # resumes the finished shards of an interrupted run
print(json.dumps({"seconds": time.perf_counter() - t0, "key": plan.key}), flush=True)
"""


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(REPO), **(extra or {})}
    return env


def _start_driver(home: Path, cfg: ExtractConfig) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(home), json.dumps(cfg.to_dict())], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_driver(home: Path, cfg: ExtractConfig) -> dict:
    proc = _start_driver(home, cfg)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _shard_bytes(stage: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(stage.glob("feats-*.tar"))}


def _state_after_kill(extract_dir: Path, key: str, n_shards: int) -> dict:
    """Where a kill landed: finished shards, a half-written shard, a final directory."""
    from storage.shards import shard_record

    work = extract_dir / f"{key}.tmp"
    final = extract_dir / key
    return {"done": sum(shard_record(work, i) is not None for i in range(n_shards)) if work.is_dir() else None,
            "partial_tar": bool(work.is_dir() and list(work.glob("*.tar.tmp"))),
            "tars": len(list(work.glob("feats-*.tar"))) if work.is_dir() else None,
            "final": final.is_dir(), "final_complete": (final / "_manifest.json").is_file()}


def _check_resumed(stage: Path, reference: dict[str, bytes], n_images: int) -> dict:
    m = read_manifest(stage)
    assert _shard_bytes(stage) == reference  # byte for byte
    keys = [s.key for s in iter_features(stage, m)]
    lost, duplicated = n_images - len(set(keys)), len(keys) - len(set(keys))
    assert (lost, duplicated) == (0, 0)
    assert m["counts"]["samples"] == n_images
    assert not list(stage.rglob("*.tmp")) and not (stage / "_shards").exists()
    return m


def _kill_trials(tmp_path: Path, trials: int, cfg: ExtractConfig, seed: int) -> list[dict]:
    """Reference run, then per trial: start, SIGKILL at a random time, resume, compare."""
    ref_home = tmp_path / "ref-home"
    ref = _run_driver(ref_home, cfg)
    reference = _shard_bytes(ref_home / "stages" / "extract" / ref["key"])
    n_shards = -(-cfg.limit // cfg.shard_size)
    assert len(reference) == n_shards
    home = tmp_path / "home"
    _run_driver(home, ExtractConfig(images=cfg.images, limit=1))  # prepares the model stage once
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        extract_dir = home / "stages" / "extract"
        shutil.rmtree(extract_dir / ref["key"], ignore_errors=True)
        delay = rng.uniform(0.0, 0.9) * ref["seconds"]
        proc = _start_driver(home, cfg)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        landed = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        state = _state_after_kill(extract_dir, ref["key"], n_shards)
        if landed:
            assert not state["final"] or state["final_complete"]  # nothing half-done outside .tmp
        resumed = _run_driver(home, cfg)
        m = _check_resumed(extract_dir / ref["key"], reference, cfg.limit)
        if landed and state["done"] is not None and not state["final"]:
            assert m["resumed_shards"] == state["done"]  # finished shards were kept, not recomputed
        results.append({"trial": trial, "delay_s": round(delay, 2), "killed_mid_run": landed, **state,
                        "resumed_shards": m["resumed_shards"], "resume_s": round(resumed["seconds"], 1)})
    return results


def test_killed_extraction_resumes_to_the_same_bytes(tmp_path):
    """A SIGKILL at a random point of a 24-shard extraction; the resumed run equals the
    uninterrupted one byte for byte, 0 lost and 0 duplicated samples (10 points: -m slow)."""
    cfg = ExtractConfig(images="synthetic:docs", limit=96, shard_size=4, batch_size=4)
    results = _kill_trials(tmp_path, 1, cfg, seed=int(time.time()))
    print(json.dumps(results))
    assert all(r["killed_mid_run"] for r in results), results


def _atr_extract_args(cfg: ExtractConfig) -> list[str]:
    return ["extract", "--model", "tiny", "--images", cfg.images, "--limit", str(cfg.limit),
            "--shard-size", str(cfg.shard_size), "--batch-size", str(cfg.batch_size)]


@pytest.mark.slow
def test_atr_extract_killed_at_ten_random_points(cli_env, tmp_path):
    """`atr extract` (the real command, Prefect and recording included) SIGKILLed at 10 random
    points: after a random number k of its 24 shards is written (k = 0: while the model loads),
    plus a random 0-40 ms; every resumed run equals an uninterrupted one byte for byte."""
    cfg = ExtractConfig(images="synthetic:docs", limit=96, shard_size=4, batch_size=4)
    env = {**cli_env, **WORKER_ENV}
    args = [sys.executable, "-m", "flows.cli", *_atr_extract_args(cfg)]
    t0 = time.monotonic()
    ref = subprocess.run(args, cwd=REPO, env={**env, "ATR_HOME": str(tmp_path / "ref-home")}, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (ref_stage,) = [p for p in (tmp_path / "ref-home" / "stages" / "extract").iterdir() if p.is_dir()]
    reference = _shard_bytes(ref_stage)
    assert len(reference) == 24
    key = ref_stage.name
    extract_dir = Path(env["ATR_HOME"]) / "stages" / "extract"
    work = extract_dir / f"{key}.tmp"
    rng = random.Random(int(time.time()))
    passed, results = 0, []
    for trial in range(10):
        shutil.rmtree(extract_dir / key, ignore_errors=True)
        k, jitter = rng.randrange(24), rng.uniform(0.0, 0.04)
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                work.is_dir() and len(list(work.glob("feats-*.tar"))) >= k):
            time.sleep(0.002)
        time.sleep(jitter)
        landed = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = _state_after_kill(extract_dir, key, 24)
        assert not state["final"] or state["final_complete"]
        resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        m = _check_resumed(extract_dir / key, reference, cfg.limit)
        if landed and state["done"] is not None and not state["final"]:
            assert m["resumed_shards"] == state["done"]
        passed += 1
        results.append({"trial": trial, "after_shards": k, "jitter_ms": round(jitter * 1000),
                        "killed_mid_run": landed, **state, "resumed_shards": m["resumed_shards"]})
    print(json.dumps(results))
    print(f"kill-and-resume trials passed: {passed}/10 (killed mid-run: "
          f"{sum(r['killed_mid_run'] for r in results)}), wall {time.monotonic() - t0:.0f}s")
    assert passed == 10 and all(r["killed_mid_run"] for r in results)


@pytest.mark.slow
def test_extraction_driver_killed_at_ten_random_points(tmp_path):
    cfg = ExtractConfig(images="synthetic:docs", limit=96, shard_size=4, batch_size=4)
    results = _kill_trials(tmp_path, 10, cfg, seed=int(time.time()))
    print(json.dumps(results))
    print(f"kill-and-resume trials passed: {len(results)}/10")
    assert all(r["killed_mid_run"] for r in results), results


# ------------------------------------------------------------------------------ training

def test_checkpoint_killed_between_tensors_and_sidecar_resumes_at_the_tensors_step(tmp_path):
    """save_checkpoint replaces the tensors, then the .json sidecar. A kill between the two
    leaves the sidecar one checkpoint behind; the meta inside the safetensors file decides."""
    import numpy as np
    import torch

    from pipeline.selector import SelectorConfig
    from pipeline.train import Trainer
    from storage.checkpoints import load_checkpoint

    cfg = SelectorConfig(n_heads=4, steps=6, batch_size=4, warmup_steps=1, lr=1e-3)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((64, 16, 16)).astype(np.float32)

    def batches():
        while True:
            yield data[rng.choice(64, 4, replace=False)]

    trainer = Trainer(cfg, tokens=16, channels=16)
    last = tmp_path / "last-p0.25.safetensors"
    with pytest.raises(_Stop):
        trainer.fit(batches(), checkpoint_every=2, callbacks=[_Saver(last, stop_after=2)])
    old_sidecar = last.with_suffix(".json").read_text()
    with pytest.raises(_Stop):
        trainer.fit(batches(), checkpoint_every=2, callbacks=[_Saver(last, stop_after=4)])
    last.with_suffix(".json").write_text(old_sidecar)  # as if killed before the sidecar was replaced
    assert json.loads(old_sidecar)["step"] == 2

    tensors, meta = load_checkpoint(last)
    assert meta["step"] == 4
    resumed = Trainer(cfg, tokens=16, channels=16)
    resumed.load_state(tensors, meta)
    assert resumed.step == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                 trainer.model.state_dict().values()))
    state = resumed.optimizer.state_dict()["state"]
    assert {float(s["step"]) for s in state.values()} == {4.0}  # AdamW moments of step 4, with step 4


class _Stop(Exception):
    pass


class _Saver:
    """Write the resumable checkpoint as the train stage does, then stop training there."""

    def __init__(self, path: Path, stop_after: int):
        self.path, self.stop_after = path, stop_after

    def on_step(self, step, metrics):
        pass

    def on_checkpoint(self, step, trainer):
        from storage.checkpoints import save_checkpoint

        tensors, meta = trainer.state()
        save_checkpoint(self.path, tensors, meta)
        if step >= self.stop_after:
            raise _Stop

    def on_end(self, step, trainer):
        pass


# ---------------------------------------------------------------------------------- eval

def _complete_chunks(home: Path) -> dict[str, int]:
    """Finished eval shard results: {result dir: mtime_ns of its samples.json} (16 questions: one shard,
    whose three results are computed one after another from one tower pass)."""
    parent = home / "stages" / "eval-shard"
    return {p.name: (p / "samples.json").stat().st_mtime_ns for p in parent.iterdir()
            if p.is_dir() and (p / "_manifest.json").is_file()} if parent.is_dir() else {}


def test_killed_eval_keeps_finished_chunks_and_redoes_only_the_rest(cli_env, tmp_path):
    home = Path(cli_env["ATR_HOME"])
    args = [sys.executable, "-m", "flows.cli", "eval", "--benchmark", "synthetic-scene", "--strategies",
            "none,full,random", "--retentions", "0.25", "--seeds", "1", "--limit", "16", "--batch-size", "4"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _complete_chunks(home) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the "none" chunk is done, "full" is running
    proc.wait()
    kept = _complete_chunks(home)
    assert 1 <= len(kept) < 3, kept
    unfinished = [p for p in (home / "stages" / "eval-shard").iterdir() if p.name.endswith(".tmp")]
    assert all(not (p / "_manifest.json").exists() for p in unfinished)

    resumed = subprocess.run(args, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = _complete_chunks(home)
    assert len(done) == 3
    assert {k: done[k] for k in kept} == kept  # finished chunks were not rewritten
    report = resumed.stdout.split("report  ")[1].split()[0]
    summary = json.loads(Path(report, "summary.json").read_text())
    cached = {r["strategy"]: r["cached"] for r in summary}
    strategy_of = {k: read_manifest(home / "stages" / "eval-shard" / k)["config"]["strategy"] for k in done}
    assert cached == {strategy_of[k]: k in kept for k in done}  # only the rest was redone
    assert all(r["n_samples"] == 16 for r in summary)


# ------------------------------------------------------------------------------ the cache

def _damage(kind: str, stage: Path) -> None:
    manifest = stage / "_manifest.json"
    if kind == "no manifest":
        manifest.unlink()
    elif kind == "manifest not marked complete":
        m = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**m, "complete": False}))
    elif kind == "truncated manifest":
        manifest.write_bytes(manifest.read_bytes()[:200])
    elif kind == "only a .tmp with a manifest":
        stage.rename(stage.with_name(stage.name + ".tmp"))


def test_a_stage_without_a_complete_manifest_is_never_a_cache_hit(prefect_api_url, session_home):
    """Through the real Prefect flow: its task cache holds the stage's key, yet a stage directory
    without a complete manifest is recomputed (to the same bytes) instead of trusted."""
    from flows.orchestration.flows import extract_flow

    cfg = ExtractConfig(images="synthetic:scenes", limit=6, shard_size=2, batch_size=2, seed=4242)
    first = extract_flow(str(session_home.root), "tiny", cfg.to_dict())["stages"][1]
    stage = Path(first["path"])
    reference = _shard_bytes(stage)
    assert extract_flow(str(session_home.root), "tiny", cfg.to_dict())["stages"][1]["cached"] is True
    for kind in ("no manifest", "manifest not marked complete", "truncated manifest", "only a .tmp with a manifest"):
        _damage(kind, stage)
        again = extract_flow(str(session_home.root), "tiny", cfg.to_dict())["stages"][1]
        assert again["cached"] is False and again["path"] == str(stage), kind
        assert read_manifest(stage)["complete"] is True and _shard_bytes(stage) == reference, kind
