"""``atr eval``: pruned LLaVA-NeXT evaluation as a Prefect flow with one cached task per chunk.

A chunk is one (benchmark, strategy, retention, seed). Its output directory
``stages/eval/<key>/`` is keyed by a content hash of the model stage, the data
files, the selector checkpoint (for ``selector``), the budget, the sample limit
and the chunk itself, so adding a strategy or a retention reuses every chunk
already done, and Prefect's cache key is that same hash. Rows go to
``eval_samples`` and ``eval_scores``; each chunk is an MLflow child run; plots go
to ``$ATR_HOME/reports/eval-<run>/`` and MLflow.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig
from storage.home import Home
from storage.stages import StageDir, code_version, stage_key, write_json_atomic

from . import progress
from .extract import _key_from_params, _result, _result_dict, run_prepare_model
from .records import RunRecorder
from .stages import StageResult, cached_model, synthetic_benchmark

EVAL_VERSION = "1"
SYNTHETIC = ("synthetic-ocr", "synthetic-scene")


# ---------------------------------------------------------------- inputs

def data_files(benchmark: str, data: dict[str, str], home: Home, limit: int) -> list[Path]:
    """The parquet file(s) of a benchmark: generated for synthetic ones, ``--data`` for real ones."""
    if benchmark in SYNTHETIC and benchmark not in data:
        return [synthetic_benchmark(home, benchmark, "test", limit)]
    if benchmark not in data:
        raise ConfigError(f"benchmark {benchmark} needs --data PATH (a local lmms-lab parquet file or a directory "
                          f"of them), or --data {benchmark}=PATH when evaluating several benchmarks")
    path = Path(data[benchmark]).expanduser()
    if not path.exists():
        raise ConfigError(f"--data for {benchmark}: {path} does not exist")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"--data for {benchmark}: no *.parquet files under {path}")
    return files


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_items(benchmark: str, files: list[Path], limit: int):
    """EvalItems from parquet rows (GQA: questions joined to the images table by imageId)."""
    from pipeline.benchmarks import items, spec
    from storage.benchmarks import parquet_columns, read_parquet

    s = spec(benchmark)
    if benchmark == "gqa":
        question_files = [f for f in files if "question" in parquet_columns(f)]
        image_files = [f for f in files if f not in question_files]
        if not question_files or not image_files:
            raise ConfigError("gqa needs both testdev_balanced_instructions (columns id, imageId, question, "
                              "answer) and testdev_balanced_images (columns id, image) parquet files in --data")
        rows = []
        for f in question_files:
            rows += read_parquet(f, ("id", "imageId", "question", "answer"), limit=limit - len(rows))
            if len(rows) >= limit:
                break
        wanted = {r["imageId"] for r in rows}
        images = {r["id"]: r["image"] for f in image_files for r in read_parquet(f, ("id", "image"))
                  if r["id"] in wanted}
        missing = sorted(wanted - set(images))
        if missing:
            raise ConfigError(f"gqa: imageId {missing[0]} (and {len(missing) - 1} more) not in the images parquet")
        rows = [{**r, "image": images[r["imageId"]]} for r in rows]
    else:
        rows = []
        for f in files:
            rows += read_parquet(f, s.required, limit=limit - len(rows))
            if len(rows) >= limit:
                break
    try:
        return items(benchmark, rows)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{benchmark}: malformed row in {files[0]} ({exc}); expected columns "
                          f"{', '.join(s.required)}") from None


def load_selector(home: Home, ref: str, retention: float, model_stage: StageResult):
    """(TokenSelector, checkpoint sha) for ``--selector`` at ``retention`` (nearest trained p)."""
    from pipeline.config import first_line
    from pipeline.selector import SelectorConfig
    from pipeline.train import selector_from_tensors
    from storage.checkpoints import CheckpointError, load_checkpoint

    from .mask import resolve_selector

    path = resolve_selector(home, ref, retention)
    d = model_stage.manifest.get("describe", {})
    tokens = d.get("tokens_per_crop")
    tensors, meta = load_checkpoint(path, expect_channels=d.get("vision_hidden"), expect_tokens=tokens)
    try:
        selector = selector_from_tensors(SelectorConfig.from_dict(meta["config"]), meta["tokens"],
                                         meta["channels"], tensors).eval()
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot build a selector from it ({first_line(exc)})") from None
    return selector, hashlib.sha256(path.read_bytes()).hexdigest()[:16], path


# ---------------------------------------------------------------- chunks

def chunk_key(model_key: str, data_fp: str, selector_sha: str | None, benchmark: str, strategy: str,
              retention: float, seed: int, cfg: EvalConfig) -> str:
    chunk = {"benchmark": benchmark, "strategy": strategy, "retention": retention, "seed": seed,
             "budget": cfg.budget, "limit": cfg.limit}
    inputs = {"model": model_key, "data": data_fp, **({"selector": selector_sha} if selector_sha else {})}
    return stage_key("eval", EVAL_VERSION, chunk, inputs)


@task(name="eval-chunk", cache_key_fn=_key_from_params, persist_result=True, result_serializer="json")
def eval_chunk_task(home: str, model_dir: str, benchmark: str, files: list[str], strategy: str, retention: float,
                    seed: int, config: dict[str, Any], selector: str | None, model_key: str,
                    cache_key: str) -> dict[str, Any]:
    return _result_dict(run_chunk(Home.resolve(home), model_dir, benchmark, [Path(f) for f in files], strategy,
                                  retention, seed, EvalConfig.from_dict(config), selector, model_key, cache_key))


def run_chunk(home: Home, model_dir: str, benchmark: str, files: list[Path], strategy: str, retention: float,
              seed: int, cfg: EvalConfig, selector_ref: str | None, model_key: str, key: str) -> StageResult:
    from pipeline.evaluate import evaluate_chunk

    t0 = time.perf_counter()
    sd = StageDir(home, "eval", key)
    if sd.is_complete():
        return StageResult("eval", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete():
            return StageResult("eval", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin()
        model, processor = cached_model(model_dir)
        selector = None
        if strategy == "selector":
            selector, _, _ = load_selector(home, selector_ref, retention, _model_stage(home, model_key))
            selector = selector.to(model.device)
        items = load_items(benchmark, files, cfg.limit)
        res = evaluate_chunk(model, processor, benchmark, items, strategy, retention, seed, cfg.budget, selector,
                             cfg.batch_size, on_batch=progress.advance)
        write_json_atomic(work / "samples.json", res.samples)
        manifest = {"config": {"benchmark": benchmark, "strategy": strategy, "retention": retention, "seed": seed,
                               "budget": cfg.budget, "limit": cfg.limit},
                    "inputs": {"model": model_key, "files": [str(f) for f in files], "selector": selector_ref},
                    "summary": {"metric": res.metric, "score": res.score, "n_samples": res.n_samples,
                                "mean_visual_tokens": res.mean_visual_tokens, "prefill_ms": res.prefill_ms},
                    "counts": {"samples": res.n_samples}, "code_version": code_version(),
                    "seconds": time.perf_counter() - t0}
        path = sd.commit(manifest)
    return StageResult("eval", key, path, False, time.perf_counter() - t0, json.loads((path / "_manifest.json")
                                                                                        .read_text()))


def _model_stage(home: Home, key: str) -> StageResult:
    sd = StageDir(home, "prepare-model", key)
    return StageResult("prepare-model", key, sd.path, True, 0.0, sd.manifest())


# ---------------------------------------------------------------- the flow

@flow(name="eval")
def eval_flow(home: str, model: str, config: dict[str, Any], selector: str | None = None,
              data: dict[str, str] | None = None) -> dict[str, Any]:
    h = Home.resolve(home)
    cfg = EvalConfig.from_dict(config)
    data = data or {}
    if "selector" in cfg.strategies and not selector:
        raise ConfigError("strategy 'selector' needs --selector (a train stage hash or a .safetensors checkpoint)")
    recorder = RunRecorder(h, "eval", {"model": model, "selector": selector, "data": data, "eval": cfg.to_dict()})
    try:
        model_stage = run_prepare_model(h, model)
        recorder.stage(model_stage)
        sel_sha = {}
        if "selector" in cfg.strategies:
            for r in cfg.retentions:
                _, sha, _ = load_selector(h, selector, r, model_stage)
                sel_sha[float(r)] = sha
        plan = []
        for bench in cfg.benchmarks:
            files = data_files(bench, data, h, cfg.limit)
            load_items(bench, files, 1)  # fail fast with one line on a malformed file
            fp = fingerprint(files)
            for strategy, retention, seed in cfg.chunks():
                key = chunk_key(model_stage.key, fp, sel_sha.get(retention) if strategy == "selector" else None,
                                bench, strategy, retention, seed, cfg)
                plan.append((bench, files, strategy, retention, seed, key))
        from storage.benchmarks import parquet_rows

        total = sum(min(cfg.limit, parquet_rows(files) if bench != "gqa" else cfg.limit)
                    for bench, files, *_ in plan)
        results = []
        with progress.bar("eval", total=total, unit="questions"):
            for bench, files, strategy, retention, seed, key in plan:
                complete = StageDir(h, "eval", key).is_complete()
                t0 = time.perf_counter()
                out = _result(eval_chunk_task.with_options(refresh_cache=not complete)(
                    str(h.root), str(model_stage.model_dir), bench, [str(f) for f in files], strategy, retention,
                    seed, cfg.to_dict(), selector, model_stage.key, key))
                if complete:
                    out.cached, out.seconds = True, time.perf_counter() - t0
                    progress.advance(out.manifest["summary"]["n_samples"])
                results.append((bench, strategy, retention, seed, out))
                _record_chunk(recorder, model, bench, strategy, retention, seed, out)
        summary = [{"benchmark": b, "strategy": s, "retention": r, "seed": sd, "cached": o.cached,
                    **o.manifest["summary"]} for b, s, r, sd, o in results]
        report = h.reports / f"eval-{recorder.run_id}"
        report.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report / "summary.json", summary)
        from .plots import plot_eval

        pngs = plot_eval(summary, report)
        for png in pngs:
            recorder.tracker.log_artifact(recorder.mlflow_run_id, png)
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "summary": summary,
            "report": str(report), "plots": [str(p) for p in pngs]}


def _record_chunk(recorder: RunRecorder, model: str, bench: str, strategy: str, retention: float, seed: int,
                  out: StageResult) -> None:
    s = out.manifest["summary"]
    recorder.stage(out, metrics={"score": s["score"], "mean_visual_tokens": s["mean_visual_tokens"]},
                   child=None)
    samples = json.loads((out.path / "samples.json").read_text())
    recorder.store.insert_rows("eval_samples", [
        {"run_id": recorder.run_id, "benchmark": bench, "sample_id": r["sample_id"], "strategy": strategy,
         "retention": retention, "seed": seed, "prediction": r["prediction"], "answer": r["answer"],
         "score": r["score"]} for r in samples])
    recorder.store.insert_rows("eval_scores", [
        {"run_id": recorder.run_id, "model": model, "benchmark": bench, "strategy": strategy, "retention": retention,
         "seed": seed, "metric": s["metric"], "score": s["score"], "n_samples": s["n_samples"],
         "mean_visual_tokens": s["mean_visual_tokens"], "prefill_ms": s["prefill_ms"]}])
