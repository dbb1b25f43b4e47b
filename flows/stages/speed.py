"""The speed stage (``atr speed``): measured prefill speed-up against the FLOPs limit, selector
overhead, extraction throughput, the cache, and memory -- in one process and one run.

Not cached: every run measures. No Prefect flow runs inside the timings (its
temporary server would add CPU noise on a shared machine); the timing loops are
in ``pipeline.speed``, and ``flows.orchestration.flows.speed_run`` records the run
like every flow (a ``runs`` row, an MLflow run, the ``bench_results`` rows). The stored names
keep the command's old name ``bench``: they are data (the ``runs.flow`` value ``bench``, the
``bench_results`` table, ``reports/bench-<run_id>/``, ``bench-scratch/``).

What is timed (medians of ``--repeats`` interleaved rounds after ``--warmup`` rounds):

* **prefill**: one forward of the LM (``use_cache=True``, logits of the last position)
  over the full prompt's ``inputs_embeds`` and over the pruned one at each retention
  (same text; LLaVA: the kept tokens packed by the model's own ``pack_image_features``; a family with its
  own runtime, Qwen-VL: ids with exact M-RoPE positions and the kept tokens, DeepStack included, through
  ``mm_encoder_outputs``, ``pipeline.speed.prompt_inputs``; its speed image is 1344 x 1680 px, no crops);
* **selector + top-k**: ``strategies.keep_mask("selector", ...)`` on every crop of the
  image in one forward (a random-init selector: its cost does not depend on weights);
* **extraction**: the extract stage (``flows.stages.extract.extract``: rendering,
  processor, tower, fp16 shards, manifest) against the
  bare vision-tower forward on the same pixel batches; cold vs cached stage time;
* **time to first token** (on CUDA, or with ``--ttft``): image -> processor -> tower ->
  [selector] -> packing -> prefill -> first token;
* **every strategy side by side** (``--strategies``, default all): each one's own selection time per
  image and its time to first token at each retention, at equal budgets
  (``pipeline.speed.strategy_timings``; rows ``select/<strategy>/...``);
* **selector training** (``--selector-training``; default on CUDA: the real-shape dims ``next``, 576 x 1024,
  and ``ov``, 729 x 1152, at batch 64 in bf16 autocast; off on the CPU): optimizer steps of the training
  loop itself after a warm-up step, crops/s and FLOP/s against the FLOPs model, and the time to train
  on 100K COCO crops at the default schedule projected from it and for an H100
  (``pipeline.speed.selector_training_timings``; rows ``selector_training/<shape>/...``).
"""

from __future__ import annotations

import math
import shutil
import time
from typing import Any

from pipeline.speed import (
    LoadSampler,
    extraction_timings,
    median,
    prefill_timings,
    selector_training_projection,
    selector_training_timings,
    strategy_timings,
    synchronize,
    use_sdpa,
)
from pipeline.config import ExtractConfig
from pipeline.device import compute, set_torch_threads, torch_facts
from pipeline.families import family_of
from pipeline.flops import SELECTOR_SHAPES, SelectorDims
from pipeline.selector import SelectorConfig
from pipeline.loading import cached_model
from storage.home import Home
from storage.stages import StageResult

from ..present import progress
from .extract import extract

SPREAD_WARN = 0.25  # (max - min) / median of a prefill's rounds above which the run warns
TARGETS = {  # the figures atr speed is held to: (description, comparison, target)
    "prefill/measured_over_ideal/causal@0.5": ("measured / ideal prefill speed-up (causal) at 0.5", ">=", 0.90),
    "prefill/measured_over_ideal/causal@0.25": ("measured / ideal prefill speed-up (causal) at 0.25", ">=", 0.90),
    "selector/measured_over_predicted": ("selector + top-k share of full prefill / FLOPs-predicted share", "<=", 1.5),
    "selector/projected_share/llava-v1.6-vicuna-7b": ("selector FLOPs share projected for vicuna-7b", "<=", 0.01),
    "extract/stage_over_bare_tower": ("extraction throughput, shards included / bare tower", ">=", 0.90),
    "extract/cached_over_cold": ("extract stage, cached / cold time", "<=", 0.05),
}


def speed_config(config: dict[str, Any], model_stage: StageResult) -> dict[str, Any]:
    """The options plus what the run measures on: model key, device, dtype, attention, torch threads."""
    if config.get("threads"):
        set_torch_threads(config["threads"])
    resolved = compute(config.get("device", "auto"), config.get("model_dtype", "auto"))
    model, _ = cached_model(str(model_stage.model_dir), *resolved, allow_cpu=config.get("allow_cpu", False))
    param = next(model.parameters())
    device, dtype = str(param.device), str(param.dtype).replace("torch.", "")
    ttft = config["ttft"] if config["ttft"] is not None else device.startswith("cuda")
    strategies = list(config.get("strategies") or [])
    if config.get("strategies_default") and not family_of(model).has_crops:
        # the default list is every pruner the model can run: HiRED needs crops, which Qwen-VL has none of
        from pipeline.strategies import get

        strategies = [s for s in strategies if not get(s).crops]
    return {**config, "ttft": ttft, "strategies": strategies, **selector_training_config(config, device),
            "model_key": model_stage.key, "device": device, "dtype": dtype,
            "load": list(resolved),  # the names the model was loaded under (one load per process)
            "attn_implementation": use_sdpa(model), **torch_facts()}


def selector_training_config(config: dict[str, Any], device: str) -> dict[str, Any]:
    """The selector-training options with their device-dependent defaults resolved: on CUDA the real-shape
    dims ``next`` and ``ov`` at the paper's batch (64), 5 timed steps, bf16 autocast; on the CPU none (with
    ``--selector-training``: batch 2, 2 timed steps, float32)."""
    cuda = device.startswith("cuda")
    shapes = config.get("selector_training")
    batch, steps, autocast = (config.get(k) for k in ("selector_batch", "selector_steps", "selector_autocast"))
    return {"selector_training": list(SELECTOR_SHAPES) if shapes is None and cuda else list(shapes or []),
            "selector_batch": batch or (SelectorConfig().batch_size if cuda else 2),
            "selector_steps": steps or (5 if cuda else 2),
            "selector_autocast": autocast if autocast not in (None, "auto") else ("bf16" if cuda else "none")}


def selector_shape(name: str) -> SelectorDims:
    """``next`` / ``ov`` (the real towers' L x C), or ``LxC`` (e.g. ``64x256``) for other dims."""
    if name in SELECTOR_SHAPES:
        return SELECTOR_SHAPES[name]
    tokens, _, channels = name.partition("x")
    return SelectorDims(tokens=int(tokens), channels=int(channels))


def selector_training(config: dict[str, Any], device: str) -> dict[str, Any]:
    """Training throughput and the 100K-crop projection for each of ``config["selector_training"]``."""
    schedule = SelectorConfig()  # the default schedule: steps x batch size
    out = {}
    for name in config["selector_training"]:
        dims = selector_shape(name)
        timed = selector_training_timings(dims, config["selector_batch"], config["selector_steps"], device,
                                          config["selector_autocast"])
        timed["projection"] = selector_training_projection(dims, timed["flops_per_second"], schedule.steps,
                                                           schedule.batch_size)
        out[name] = timed
    return out


def speed(home: Home, config: dict[str, Any], model_stage: StageResult, run_id: str) -> dict[str, Any]:
    """Every measurement of ``atr speed`` on the model of ``model_stage`` (``config`` from :func:`speed_config`).

    Returns the prefill and extraction figures, the machine load per phase, the
    warnings, the ``bench_results`` rows of run ``run_id`` and the figures against
    their targets. Nothing is recorded here; the extraction runs in a private
    scratch home that is removed at the end."""
    device = config["device"]  # resolved by speed_config, as is config["dtype"]
    model, processor = cached_model(str(model_stage.model_dir), *config.get("load", (device, config["dtype"])),
                                    allow_cpu=config.get("allow_cpu", False))
    # pruned prompts need OneVision's grid interpolation off (as eval does); the full prompt is then the
    # un-shrunk grid too, so full and pruned are timed on the same geometry
    family_of(model).set_interpolation(model, processor, False)
    threshold = config["load_threshold"]
    phases = {}
    with LoadSampler(threshold=threshold) as sampler:
        with LoadSampler(threshold=threshold, label="the prefill and selector timings") as phase:
            prefill = prefill_timings(model, processor, config, device, config["ttft"])
        phases["prefill"] = phase.report
        strategies = None
        if config.get("strategies"):
            with LoadSampler(threshold=threshold, label="the strategy timings") as phase:
                strategies = strategy_timings(model, processor, config["strategies"], config["retentions"],
                                              config["repeats"], config["warmup"], device)
            phases["strategies"] = phase.report
        extract_figures = None
        if config["extract_images"] > 0:
            with LoadSampler(threshold=threshold, label="the extraction and cache timings") as phase:
                extract_figures = _speed_extract(home, model_stage, model, processor, config, run_id, device)
            phases["extract"] = phase.report
        training = None
        if config.get("selector_training"):
            with LoadSampler(threshold=threshold, label="the selector-training timings") as phase:
                training = selector_training(config, device)
            phases["selector_training"] = phase.report
    load = sampler.report
    load.warnings[:] = [w for rep in phases.values() for w in rep.warnings]
    noisy = {f"{float(r):g}": x["spread"] for r, x in prefill["by_retention"].items() if x["spread"] > SPREAD_WARN}
    if noisy and config["repeats"] > 1:
        load.warnings.append(f"prefill timings varied by more than {SPREAD_WARN:.0%} between rounds (retention: "
                             f"(max - min) / median = {', '.join(f'{k}: {v:.0%}' for k, v in noisy.items())}); "
                             f"medians are less certain")
    rows = speed_rows(run_id, prefill, extract_figures, load, phases, strategies, training)
    return {"prefill": prefill, "extract": extract_figures, "strategies": strategies, "load": load, "phases": phases,
            "selector_training": training, "warnings": load.warnings, "rows": rows, "figures": figures(rows)}


def _extract_stage(home: Home, model_stage: StageResult, cfg) -> tuple[bool, float]:
    """The extract stage, in process (no Prefect, no progress bar): (cached, seconds)."""
    t0 = time.perf_counter()
    with progress.disabled():
        result = extract(home, cfg, model_stage)
    return result.cached, time.perf_counter() - t0


def _speed_extract(home: Home, model_stage: StageResult, model, processor, config: dict[str, Any], run_id: str,
                   device: str) -> dict[str, Any]:
    cfg = ExtractConfig(images="synthetic:docs", limit=config["extract_images"], batch_size=config["batch_size"],
                        shard_size=config["shard_size"])
    scratch = Home(home.root / "bench-scratch" / run_id)  # a private stage tree, removed at the end
    try:
        scratch.stages.mkdir(parents=True, exist_ok=True)
        cold_cached, cold = _extract_stage(scratch, model_stage, cfg)  # first run: computes every shard
        if cold_cached:
            raise RuntimeError(f"{scratch.root}: the scratch extract stage was already complete")

        def stage_again():
            if _extract_stage(scratch, model_stage, cfg)[0]:
                raise RuntimeError("the scratch extract stage was a cache hit after being removed")

        def remove_last_output():  # not part of a stage run: done before the clock starts
            shutil.rmtree(scratch.stages / "extract", ignore_errors=True)

        timed = extraction_timings(model, processor, cfg, config.get("extract_repeats", config["repeats"]), device,
                                   stage_again, remove_last_output)
        times = timed["times"]
        cached_times = []
        for _ in range(config["repeats"]):
            synchronize(device)
            cached, seconds = _extract_stage(scratch, model_stage, cfg)
            if not cached:
                raise RuntimeError("the scratch extract stage was not a cache hit after it completed")
            cached_times.append(seconds)
        n, crops, tower_flops = timed["images"], timed["crops"], timed["tower_flops"]
        stage_s, tower_s, pre_s = median(times["stage"]), median(times["bare_tower"]), median(times["preprocess"])
        return {"images": n, "crops": crops, "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
                "shards": -(-n // cfg.shard_size), "source": cfg.images,
                "stage_seconds": stage_s, "bare_tower_seconds": tower_s, "preprocess_seconds": pre_s,
                "stage_images_per_second": n / stage_s, "bare_tower_images_per_second": n / tower_s,
                "stage_over_bare_tower": tower_s / stage_s,
                "other_seconds": stage_s - tower_s - pre_s, "bare_tower_flops": tower_flops,
                "bare_tower_flops_per_second": tower_flops / tower_s,
                "cold_seconds": cold, "cached_seconds": median(cached_times),
                "cached_over_cold": median(cached_times) / cold,
                "times": {k: v for k, v in times.items()}, "cached_times": cached_times}
    finally:
        shutil.rmtree(scratch.root, ignore_errors=True)
        try:
            scratch.root.parent.rmdir()  # bench-scratch/, when no other speed run is running
        except OSError:
            pass


def speed_rows(run_id: str, prefill: dict, extract: dict | None, load, phases: dict,
               strategies: dict | None = None, training: dict | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name, value, unit, retention=None, measured=None, ideal=None):
        rows.append({"run_id": run_id, "name": name, "retention": retention, "value": _num(value), "unit": unit,
                     "measured_speedup": _num(measured), "ideal_speedup": _num(ideal)})

    by_r = prefill["by_retention"]
    add("prefill/text_tokens", prefill["text_tokens"], "tokens")
    add("prefill/encoder_tokens", prefill["encoder_tokens"], "tokens")
    add("prefill/text_only/seconds", prefill["text_only"]["seconds"], "s")
    for r, x in by_r.items():
        kind = "full" if r == 1.0 else "pruned"
        add(f"prefill/{kind}/seconds", x["seconds"], "s", r, x["measured_speedup"], x["ideal_causal"])
        add("prefill/visual_tokens", x["visual_tokens"], "tokens", r)
        add("prefill/timing_spread", x["spread"], "fraction", r)
        add("prefill/flops/causal", x["flops_causal"], "FLOP", r)
        add("prefill/flops/square", x["flops_square"], "FLOP", r)
        add("prefill/flops/fastv", x["flops_fastv"], "FLOP-fastv", r)
        add("prefill/achieved_flops_per_second", x["flops_per_second"], "FLOP/s", r)
        add(f"memory/peak_bytes/{kind}", x["peak_bytes"], "bytes", r)
        add("memory/kv_cache_bytes", x["kv_cache_bytes"], "bytes", r)
        add("memory/kv_cache_bytes_model", x["kv_cache_bytes_model"], "bytes", r)
        if "ttft_seconds" in x:
            full_ttft = by_r[1.0]["ttft_seconds"]
            add(f"ttft/{kind}/seconds", x["ttft_seconds"], "s", r, full_ttft / x["ttft_seconds"], None)
        if r == 1.0:
            continue
        for conv in ("causal", "square", "fastv"):
            add(f"prefill/measured_over_ideal/{conv}", x["measured_speedup"] / x[f"ideal_{conv}"], "ratio", r,
                x["measured_speedup"], x[f"ideal_{conv}"])
        add("selector/seconds_per_image", x["selector_seconds"], "s", r)
        add("selector/share_measured", x["selector_share"], "fraction", r)
        add("selector/share_predicted", x["selector_share_predicted"], "fraction", r)
        add("selector/measured_over_predicted", x["selector_share"] / x["selector_share_predicted"], "ratio", r)
        add("selector/achieved_flops_per_second", x["selector_flops"] / x["selector_seconds"], "FLOP/s", r)
    proj = prefill["projection"]
    add("selector/projected_share/llava-v1.6-vicuna-7b", proj["selector_share"], "fraction")
    if strategies is not None:
        full = strategies["ttft_full_seconds"]
        add("select/full/ttft_seconds", full, "s", 1.0, 1.0, None)
        for name, by in strategies["strategies"].items():
            for r, x in by.items():
                add(f"select/{name}/ms_per_image", x["select_seconds"] * 1000.0, "ms", r)
                add(f"select/{name}/ttft_seconds", x["ttft_seconds"], "s", r, full / x["ttft_seconds"], None)
                add(f"select/{name}/tokens", x["tokens"], "tokens", r)
                add(f"select/{name}/visual_tokens", x["visual_tokens"], "tokens", r)
    if extract is not None:
        add("extract/images_per_second/stage", extract["stage_images_per_second"], "images/s")
        add("extract/images_per_second/bare_tower", extract["bare_tower_images_per_second"], "images/s")
        add("extract/stage_over_bare_tower", extract["stage_over_bare_tower"], "ratio")
        add("extract/seconds/preprocess", extract["preprocess_seconds"], "s")
        add("extract/bare_tower_achieved_flops_per_second", extract["bare_tower_flops_per_second"], "FLOP/s")
        add("extract/seconds/cold", extract["cold_seconds"], "s")
        add("extract/seconds/cached", extract["cached_seconds"], "s")
        add("extract/cached_over_cold", extract["cached_over_cold"], "ratio")
    for shape, x in (training or {}).items():
        base, proj = f"selector_training/{shape}", x["projection"]
        add(f"{base}/crops_per_second", x["crops_per_second"], "crops/s")
        add(f"{base}/seconds_per_step", x["seconds_per_step"], "s")
        add(f"{base}/achieved_flops_per_second", x["flops_per_second"], "FLOP/s")
        add(f"{base}/flops_per_crop", x["flops_per_crop"], "FLOP")
        add(f"{base}/batch_size", x["batch_size"], "crops")
        add(f"{base}/parameters", x["parameters"], "parameters")
        add(f"{base}/torch_threads", x["threads"], "threads")
        add(f"{base}/bf16_autocast", 1.0 if x["autocast"] else 0.0, "bool")
        add(f"{base}/peak_bytes", x["peak_bytes"], "bytes")
        add(f"{base}/projected_crops", proj["crops"], "crops")
        add(f"{base}/projected_seconds/measured", proj["seconds_measured"], "s")
        add(f"{base}/projected_seconds/h100_bf16_at_40pct", proj["seconds_gpu"], "s")
    add("load/other_cores_mean", load.other_cores, "cores")
    add("load/other_cores_max", load.other_cores_max, "cores")
    add("load/loadavg1_start", load.loadavg_start, "load")
    add("load/loadavg1_end", load.loadavg_end, "load")
    add("load/trustworthy", 1.0 if all(p.trustworthy for p in phases.values()) else 0.0, "bool")
    for phase, rep in phases.items():
        add(f"load/{phase}/other_cores_mean", rep.other_cores, "cores")
        add(f"load/{phase}/other_cores_max", rep.other_cores_max, "cores")
        add(f"load/{phase}/trustworthy", 1.0 if rep.trustworthy else 0.0, "bool")
    return rows


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def figures(rows: list[dict]) -> list[dict[str, Any]]:
    """The figures of TARGETS from the rows: name, value, target, met."""
    by = {(r["name"], r["retention"]): r["value"] for r in rows}
    out = []
    for key, (what, op, target) in TARGETS.items():
        name, _, ret = key.partition("@")
        value = by.get((name, float(ret) if ret else None))
        if value is None and not ret:  # a per-retention figure without one named: the worst retention
            values = [v for (n, _), v in by.items() if n == name and v is not None]
            value = (max(values) if op == "<=" else min(values)) if values else None
            what += " (worst retention)" if len(values) > 1 else ""
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"figure": what, "name": name, "retention": float(ret) if ret else None, "value": value,
                    "target": f"{op} {target:g}", "met": met})
    return out


def speed_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        if r["value"] is None:
            continue
        key = r["name"] + ("" if r["retention"] is None else f"/r{r['retention']:g}")
        out[key.replace("@", "_")] = r["value"]
    return out


def jsonable(obj):
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
