"""The eval stage: pruned LLaVA-NeXT evaluation, one cached chunk per (benchmark, strategy, retention, seed).

A chunk's output ``stages/eval/<key>/`` (``samples.json`` + manifest with the
summary) is keyed by a content hash of the model stage, the data files, the
selector checkpoint (for ``selector``), the budget, the sample limit and the
chunk itself, so adding a strategy or a retention reuses every chunk already
done. The work unit is one chunk (:func:`eval_chunk`); the stage maps them
through its ``mapper``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.benchmarks import items, spec
from pipeline.config import ConfigError
from pipeline.evaluate import EvalConfig
from pipeline.presets import cached_model
from storage.benchmarks import benchmark_files, files_fingerprint, load_benchmark_rows, parquet_rows
from storage.home import Home
from storage.selectors import LoadedSelector, load_selector, resolve_selector
from storage.stages import StageDir, StageResult, code_version, run_stage, stage_key, write_json_atomic

from ..present import progress
from . import Mapper, serial
from .benchmark import synthetic_benchmark
from .prepare_model import model_stage

EVAL_VERSION = "2"  # 2: budgets count valid tokens, the prompt keeps BOS, the compute is an input
SYNTHETIC = ("synthetic-ocr", "synthetic-scene")
SELECTOR_NEEDED = "strategy 'selector' needs --selector (a train stage hash or a .safetensors checkpoint)"


# ---------------------------------------------------------------- inputs

def data_files(benchmark: str, data: dict[str, str], home: Home, limit: int) -> list[Path]:
    """The parquet file(s) of a benchmark: generated for synthetic ones, ``--data`` for real ones."""
    if benchmark in SYNTHETIC and benchmark not in data:
        return [synthetic_benchmark(home, benchmark, "test", limit)]
    if benchmark not in data:
        raise ConfigError(f"benchmark {benchmark} needs --data PATH (a local lmms-lab parquet file or a directory "
                          f"of them), or --data {benchmark}=PATH when evaluating several benchmarks")
    return benchmark_files(benchmark, data[benchmark])


def benchmark_items(benchmark: str, files: list[Path], limit: int):
    """The first ``limit`` EvalItems of a benchmark's parquet files (one line naming the file if malformed)."""
    s = spec(benchmark)
    rows = load_benchmark_rows(benchmark, files, limit, s.required)
    try:
        return items(benchmark, rows)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{benchmark}: malformed row in {files[0]} ({exc}); expected columns "
                          f"{', '.join(s.required)}") from None


def eval_selector(home: Home, ref: str, retention: float, model: StageResult) -> LoadedSelector:
    """The ``--selector`` checkpoint for ``retention`` (nearest trained p), checked against the model's C and L."""
    from pipeline.train import selector_from_checkpoint

    d = model.manifest.get("describe", {})
    return load_selector(resolve_selector(home, ref, retention), selector_from_checkpoint,
                         expect_channels=d.get("vision_hidden"), expect_tokens=d.get("tokens_per_crop"))


# ---------------------------------------------------------------- chunks

@dataclass(frozen=True)
class Chunk:
    """One planned eval chunk: its inputs and its stage key."""

    benchmark: str
    files: tuple[str, ...]
    strategy: str
    retention: float
    seed: int
    key: str
    device: str = "cpu"              # resolved --device and --dtype the model runs in
    dtype: str = "float32"


def chunk_key(model_key: str, data_fp: str, selector_sha: str | None, benchmark: str, strategy: str,
              retention: float, seed: int, cfg: EvalConfig, compute: str = "cpu-float32") -> str:
    chunk = {"benchmark": benchmark, "strategy": strategy, "retention": retention, "seed": seed,
             "budget": cfg.budget, "limit": cfg.limit}
    inputs = {"model": model_key, "data": data_fp, "compute": compute,
              **({"selector": selector_sha} if selector_sha else {})}
    return stage_key("eval", EVAL_VERSION, chunk, inputs)


def plan_eval(home: Home, model: StageResult, cfg: EvalConfig, selector: str | None,
              data: dict[str, str]) -> list[Chunk]:
    """Every chunk of an evaluation with its content-hashed key (fails fast, one line, on bad inputs)."""
    from pipeline.device import compute

    device, dtype = compute(cfg.device, cfg.model_dtype)
    if "selector" in cfg.strategies and not selector:
        raise ConfigError(SELECTOR_NEEDED)
    sel_sha = {}
    if "selector" in cfg.strategies:
        for r in cfg.retentions:
            sel_sha[float(r)] = eval_selector(home, selector, r, model).sha256
    plan = []
    for bench in cfg.benchmarks:
        files = data_files(bench, data, home, cfg.limit)
        benchmark_items(bench, files, 1)  # fail fast with one line on a malformed file
        fp = files_fingerprint(files)
        for strategy, retention, seed in cfg.chunks():
            key = chunk_key(model.key, fp, sel_sha.get(retention) if strategy == "selector" else None,
                            bench, strategy, retention, seed, cfg, f"{device}-{dtype}")
            plan.append(Chunk(bench, tuple(str(f) for f in files), strategy, retention, seed, key, device, dtype))
    return plan


def eval_chunk(home: str | Home, chunk: Chunk, model_key: str, config: dict[str, Any], selector: str | None,
               force: bool = False) -> dict[str, Any]:
    """Evaluate one chunk (cached); returns its StageResult as a dict (what crosses a task boundary)."""
    from pipeline.evaluate import evaluate_chunk

    home = Home.resolve(home)
    cfg = EvalConfig.from_dict(config)
    c = chunk

    def build(work: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        model_result = model_stage(home, model_key)
        model, processor = cached_model(str(model_result.model_dir), c.device, c.dtype)
        loaded = None
        if c.strategy == "selector":
            loaded = eval_selector(home, selector, c.retention, model_result).selector
            loaded = loaded.to(model.device)
        rows = benchmark_items(c.benchmark, [Path(f) for f in c.files], cfg.limit)
        res = evaluate_chunk(model, processor, c.benchmark, rows, c.strategy, c.retention, c.seed, cfg.budget,
                             loaded, cfg.batch_size, on_batch=progress.advance)
        write_json_atomic(work / "samples.json", res.samples)
        return {"config": {"benchmark": c.benchmark, "strategy": c.strategy, "retention": c.retention,
                           "seed": c.seed, "budget": cfg.budget, "limit": cfg.limit},
                "inputs": {"model": model_key, "files": list(c.files), "selector": selector},
                "compute": {"device": c.device, "dtype": c.dtype},
                "summary": {"metric": res.metric, "score": res.score, "n_samples": res.n_samples,
                            "mean_visual_tokens": res.mean_visual_tokens, "prefill_ms": res.prefill_ms},
                "counts": {"samples": res.n_samples}, "code_version": code_version(),
                "seconds": time.perf_counter() - t0}

    return run_stage(home, "eval", c.key, build, force=force).to_dict()


# ---------------------------------------------------------------- the stage

def eval_chunks(home: Home, config: EvalConfig, model: StageResult, plan: list[Chunk], selector: str | None = None, *,
             force: bool = False, mapper: Mapper = serial) -> list[tuple[Chunk, StageResult]]:
    """Run (or reuse) every chunk of ``plan`` (from :func:`plan_eval`); ``force`` recomputes them all
    (``atr run --from eval``). A cache hit reports its share of the lookup time, not the original time."""
    files = {c.files for c in plan}
    rows = {f: parquet_rows([Path(x) for x in f]) for f in files}  # footers, once per file set
    total = sum(min(config.limit, rows[c.files]) if c.benchmark != "gqa" else config.limit for c in plan)
    complete = [StageDir(home, "eval", c.key).is_complete() and not force for c in plan]
    remote = getattr(mapper, "remote", False)
    t0 = time.perf_counter()
    with progress.bar("eval", total=total, unit="questions") as bar:
        def done(i: int, out: dict[str, Any]) -> None:
            if complete[i] or remote:  # in-process chunks advance the bar per batch themselves
                bar.advance(out["manifest"]["summary"]["n_samples"])

        calls = [{"home": str(home.root), "chunk": c, "model_key": model.key, "config": config.to_dict(),
                  "selector": selector, "force": force} for c in plan]
        outs = mapper(eval_chunk, calls, [c.key for c in plan], done)
    results = []
    for c, was_complete, out in zip(plan, complete, outs):
        r = StageResult.from_dict(out)
        if was_complete:
            r.cached, r.seconds = True, (time.perf_counter() - t0) / len(plan)
        results.append((c, r))
    return results


def eval_summary(results: list[tuple[Chunk, StageResult]]) -> list[dict[str, Any]]:
    """One row per chunk: its coordinates, whether it was cached, and its summary figures."""
    return [{"benchmark": c.benchmark, "strategy": c.strategy, "retention": c.retention, "seed": c.seed,
             "cached": o.cached, **o.manifest["summary"]} for c, o in results]


__all__ = ["Chunk", "plan_eval", "eval_chunk", "eval_chunks", "eval_summary", "data_files", "benchmark_items",
           "eval_selector", "chunk_key", "SELECTOR_NEEDED"]
