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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig
from storage.home import Home
from storage.stages import StageDir, code_version, stage_key, write_json_atomic

from . import progress, scale
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
                    cache_key: str, force: bool = False) -> dict[str, Any]:
    return _result_dict(run_chunk(Home.resolve(home), model_dir, benchmark, [Path(f) for f in files], strategy,
                                  retention, seed, EvalConfig.from_dict(config), selector, model_key, cache_key,
                                  force=force))


def run_chunk(home: Home, model_dir: str, benchmark: str, files: list[Path], strategy: str, retention: float,
              seed: int, cfg: EvalConfig, selector_ref: str | None, model_key: str, key: str,
              force: bool = False) -> StageResult:
    from pipeline.evaluate import evaluate_chunk

    t0 = time.perf_counter()
    sd = StageDir(home, "eval", key)
    if sd.is_complete() and not force:
        return StageResult("eval", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete() and not force:
            return StageResult("eval", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin(fresh=force)
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

@dataclass(frozen=True)
class Chunk:
    """One planned eval chunk: its inputs and its stage key."""

    benchmark: str
    files: tuple[str, ...]
    strategy: str
    retention: float
    seed: int
    key: str


def plan_eval(h: Home, model_stage: StageResult, cfg: EvalConfig, selector: str | None,
              data: dict[str, str]) -> list[Chunk]:
    """Every chunk of an evaluation with its content-hashed key (fails fast, one line, on bad inputs)."""
    if "selector" in cfg.strategies and not selector:
        raise ConfigError("strategy 'selector' needs --selector (a train stage hash or a .safetensors checkpoint)")
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
            plan.append(Chunk(bench, tuple(str(f) for f in files), strategy, retention, seed, key))
    return plan


def run_eval_chunks(h: Home, model_stage: StageResult, cfg: EvalConfig, selector: str | None, plan: list[Chunk],
                    force: bool = False) -> list[tuple[Chunk, StageResult]]:
    """Run (or reuse) every chunk as a cached Prefect task; over Dask when the flow runs on one.

    ``force`` recomputes every chunk (``atr run --from eval``)."""
    from storage.benchmarks import parquet_rows

    rows = {files: parquet_rows([Path(f) for f in files]) for files in {c.files for c in plan}}  # footers, once
    total = sum(min(cfg.limit, rows[c.files]) if c.benchmark != "gqa" else cfg.limit for c in plan)
    complete = [StageDir(h, "eval", c.key).is_complete() and not force for c in plan]
    remote = scale.distributed()
    t0 = time.perf_counter()
    with progress.bar("eval", total=total, unit="questions") as bar:
        def done(i: int, out: dict[str, Any]) -> None:
            if complete[i] or remote:  # in-process chunks advance the bar per batch themselves
                bar.advance(out["manifest"]["summary"]["n_samples"])

        calls = [{"home": str(h.root), "model_dir": str(model_stage.model_dir), "benchmark": c.benchmark,
                   "files": list(c.files), "strategy": c.strategy, "retention": c.retention, "seed": c.seed,
                   "config": cfg.to_dict(), "selector": selector, "model_key": model_stage.key, "cache_key": c.key,
                   "force": force} for c in plan]
        outs = scale.map_tasks(eval_chunk_task, calls, on_done=done)
    results = []
    for c, was_complete, out in zip(plan, complete, outs):
        r = _result(out)
        if was_complete:  # a cache hit reports its lookup time, not the original evaluation time
            r.cached, r.seconds = True, (time.perf_counter() - t0) / len(plan)
        results.append((c, r))
    return results


def eval_summary(results: list[tuple[Chunk, StageResult]]) -> list[dict[str, Any]]:
    return [{"benchmark": c.benchmark, "strategy": c.strategy, "retention": c.retention, "seed": c.seed,
             "cached": o.cached, **o.manifest["summary"]} for c, o in results]


def eval_table(summary: list[dict]) -> list[dict]:
    """Seed-averaged rows with score relative to full, plus Rel. (mean over benchmarks of pruned/full)."""
    groups: dict[tuple, list[dict]] = {}
    for r in summary:
        groups.setdefault((r["benchmark"], r["strategy"], r["retention"]), []).append(r)
    full = {b: g[0]["score"] for (b, s, _), g in groups.items() if s == "full"}
    rows = []
    for (bench, strategy, retention), g in groups.items():
        score = sum(r["score"] for r in g) / len(g)
        rows.append({"benchmark": bench, "strategy": strategy, "retention": retention, "metric": g[0]["metric"],
                     "score": score, "seeds": len(g), "rel": score / full[bench] if full.get(bench) else None,
                     "visual_tokens": sum(r["mean_visual_tokens"] for r in g) / len(g),
                     "prefill_ms": sum(r["prefill_ms"] for r in g) / len(g), "cached": all(r["cached"] for r in g)})
    return rows


def record_eval(recorder: RunRecorder, model: str, results: list[tuple[Chunk, StageResult]],
                child: str | None = None) -> None:
    """Rows into stage_runs, eval_scores and eval_samples (one write each), and MLflow.

    With ``child`` (``atr run``: one MLflow child run for the whole eval stage) every chunk's figures
    are metrics of that run; without it (``atr eval``) each chunk gets its own child run."""
    stages = [o for _, o in results]
    if child is None:
        for c, o in results:
            s = o.manifest["summary"]
            recorder.stage(o, metrics={"score": s["score"], "mean_visual_tokens": s["mean_visual_tokens"]})
    else:
        recorder.stages_batch(stages)
        metrics = {}
        for c, o in results:
            name = f"{c.benchmark}/{c.strategy}/r{c.retention:g}/seed{c.seed}"
            metrics[f"{name}/score"] = o.manifest["summary"]["score"]
            metrics[f"{name}/mean_visual_tokens"] = o.manifest["summary"]["mean_visual_tokens"]
        metrics["chunks"] = len(results)
        metrics["cached_chunks"] = sum(o.cached for o in stages)
        metrics["seconds"] = sum(o.seconds for o in stages)
        recorder.tracker.log_metrics(child, metrics)
    samples, scores = [], []
    for c, o in results:
        s = o.manifest["summary"]
        rows = json.loads((o.path / "samples.json").read_text())
        samples += [{"run_id": recorder.run_id, "benchmark": c.benchmark, "sample_id": r["sample_id"],
                     "strategy": c.strategy, "retention": c.retention, "seed": c.seed, "prediction": r["prediction"],
                     "answer": r["answer"], "score": r["score"]} for r in rows]
        scores.append({"run_id": recorder.run_id, "model": model, "benchmark": c.benchmark, "strategy": c.strategy,
                       "retention": c.retention, "seed": c.seed, "metric": s["metric"], "score": s["score"],
                       "n_samples": s["n_samples"], "mean_visual_tokens": s["mean_visual_tokens"],
                       "prefill_ms": s["prefill_ms"]})
    recorder.store.insert_rows("eval_samples", samples)
    recorder.store.insert_rows("eval_scores", scores)


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
        plan = plan_eval(h, model_stage, cfg, selector, data)
        results = run_eval_chunks(h, model_stage, cfg, selector, plan)
        record_eval(recorder, model, results)
        summary = eval_summary(results)
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
