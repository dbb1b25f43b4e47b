"""``atr bench``: measured prefill speed-up against the FLOPs limit, selector overhead,
extraction throughput, the cache, and memory -- in one process and one run.

No Prefect flow runs inside the timings (its temporary server would add CPU noise on
a shared machine); the run is recorded with ``RunRecorder`` like every flow (a ``runs``
row, an MLflow run) and its figures go to ``bench_results``.

What is timed (medians of ``--repeats`` interleaved rounds after ``--warmup`` rounds):

* **prefill**: one forward of the LM (``use_cache=True``, logits of the last position)
  over the full prompt's ``inputs_embeds`` and over the pruned one at each retention
  (same text; the kept tokens packed by the model's own ``pack_image_features``);
* **selector + top-k**: ``strategies.keep_mask("selector", ...)`` on every crop of the
  image in one forward (a random-init selector: its cost does not depend on weights);
* **extraction**: the extract stage (``plan_extract`` / ``extract_shard`` /
  ``finish_extract``: rendering, processor, tower, fp16 shards, manifest) against the
  bare vision-tower forward on the same pixel batches; cold vs cached stage time;
* **time to first token** (on CUDA, or with ``--ttft``): image -> processor -> tower ->
  [selector] -> packing -> prefill -> first token.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

DEFAULT_RETENTIONS = "0.5,0.25,0.11"
SPREAD_WARN = 0.25  # (max - min) / median of a prefill's rounds above which the run warns
QUESTION = "What is written in the image? Answer with the text."
TARGETS = {  # issue 8's figures: (description, comparison, target)
    "prefill/measured_over_ideal/causal@0.5": ("measured / ideal prefill speed-up (causal) at 0.5", ">=", 0.90),
    "prefill/measured_over_ideal/causal@0.25": ("measured / ideal prefill speed-up (causal) at 0.25", ">=", 0.90),
    "selector/measured_over_predicted": ("selector + top-k share of full prefill / FLOPs-predicted share", "<=", 1.5),
    "selector/projected_share/llava-v1.6-vicuna-7b": ("selector FLOPs share projected for vicuna-7b", "<=", 0.01),
    "extract/stage_over_bare_tower": ("extraction throughput, shards included / bare tower", ">=", 0.90),
    "extract/cached_over_cold": ("extract stage, cached / cold time", "<=", 0.05),
}


def add_parser(sub, common, model_help: str) -> None:
    p = sub.add_parser(
        "bench", parents=[common], help="speed benchmarks: prefill speed-up vs the FLOPs limit, selector, extraction",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure, in one process, the prefill time of the full vs the pruned prompt at each retention "
                    "(medians of interleaved rounds A B A B after warm-up) against the ideal speed-up of the FLOPs "
                    "model (true FLOPs, causal attention; FastV's and the full-square conventions beside it), the "
                    "selector + top-k time as a share of the full prefill against its FLOPs share, extraction "
                    "images/s through the extract stage (shards included) against the bare vision tower, cold vs "
                    "cached extract stage, peak memory and KV-cache bytes. The machine load from other processes "
                    "is sampled during the run; a warning says when it makes the ratios untrustworthy. Rows go to "
                    "bench_results, the speed-up plot to $ATR_HOME/reports/bench-<run_id>/ and MLflow.",
        epilog="examples:\n  atr bench\n  atr bench --retentions 0.5,0.25,0.11 --repeats 7\n"
               "  atr bench --model llava-hf/llava-v1.6-vicuna-7b-hf --repeats 10     # on a CUDA machine\n"
               "  atr query \"SELECT name, retention, measured_speedup, ideal_speedup, value, unit FROM "
               "bench_results ORDER BY name\"")
    p.add_argument("--model", default="bench",
                   help=model_help + " (default: bench, a random-init LLaVA-NeXT with the real token counts: "
                                     "336-px crops of 14-px patches, 576 tokens per crop, up to 5 crops)")
    p.add_argument("--retentions", default=DEFAULT_RETENTIONS,
                   help=f"comma-separated fractions of encoder tokens kept per crop, each in (0, 1]; the full "
                        f"prompt (1) is always measured (default: {DEFAULT_RETENTIONS})")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per measurement; medians are reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default: 1)")
    p.add_argument("--extract-images", type=int, default=32,
                   help="synthetic:docs images per extract-stage run (default: 32; 0 skips extraction)")
    p.add_argument("--extract-repeats", type=int, default=5,
                   help="timed rounds of the extract stage and the bare tower, at most --repeats (default: 5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per vision-tower batch in extraction (default: 8)")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard in extraction (default: 16)")
    p.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=None,
                   help="also time image-to-first-token, full vs pruned (default: on with CUDA, off on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: one per core, as every atr command; ATR_TORCH_THREADS also sets it)")
    p.add_argument("--load-threshold", type=float, default=0.2,
                   help="mean CPU cores used by other processes above which the run is flagged untrustworthy "
                        "(default: 0.2)")


def parse_retentions(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise ConfigError(f"--retentions: {part!r} is not a number") from None
        if not (0.0 < r <= 1.0) or math.isnan(r):
            raise ConfigError(f"--retentions: retention must be in (0, 1], got {part}")
        out.append(r)
    if not out:
        raise ConfigError("--retentions: give at least one retention, e.g. 0.5,0.25,0.11")
    if len(set(out)) != len(out):
        raise ConfigError(f"--retentions: duplicate retention in {text!r}")
    return out


def check_args(args) -> dict[str, Any]:
    """The validated options as a config dict (ConfigError names the bad option)."""
    retentions = parse_retentions(args.retentions)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.extract_images < 0:
        raise ConfigError(f"--extract-images must be >= 0, got {args.extract_images}")
    if args.extract_repeats < 1:
        raise ConfigError(f"--extract-repeats must be >= 1, got {args.extract_repeats}")
    if args.batch_size < 1 or args.shard_size < 1:
        raise ConfigError("--batch-size and --shard-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not args.load_threshold > 0:
        raise ConfigError(f"--load-threshold must be positive, got {args.load_threshold}")
    return {"model": args.model, "retentions": retentions, "repeats": args.repeats, "warmup": args.warmup,
            "extract_images": args.extract_images, "extract_repeats": min(args.extract_repeats, args.repeats),
            "batch_size": args.batch_size, "shard_size": args.shard_size,
            "ttft": args.ttft, "load_threshold": args.load_threshold, "threads": args.threads}


def cmd_bench(home, args) -> int:
    config = check_args(args)
    out = run_bench(home, config)
    print_report(out)
    return 0


# ---------------------------------------------------------------- the benchmark

def run_bench(home, config: dict[str, Any]) -> dict[str, Any]:
    """Run every measurement, record rows + runs row + MLflow run + plot; return a summary dict."""
    import torch

    from pipeline.bench import LoadSampler

    from .records import RunRecorder
    from .stages import cached_model, prepare_model

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    model_stage = prepare_model(home, config["model"])
    model, processor = cached_model(str(model_stage.model_dir))
    device = str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    attn = _use_sdpa(model)
    ttft = config["ttft"] if config["ttft"] is not None else device.startswith("cuda")
    full_config = {**config, "ttft": ttft, "model_key": model_stage.key, "device": device, "dtype": dtype,
                   "attn_implementation": attn, "torch_threads": torch.get_num_threads(),
                   "torch": torch.__version__}
    recorder = RunRecorder(home, "bench", full_config)
    try:
        recorder.stage(model_stage)
        threshold = config["load_threshold"]
        phases = {}
        with LoadSampler(threshold=threshold) as sampler:
            with LoadSampler(threshold=threshold, label="the prefill and selector timings") as phase:
                prefill = _bench_prefill(model, processor, config, device, ttft)
            phases["prefill"] = phase.report
            extract = None
            if config["extract_images"] > 0:
                with LoadSampler(threshold=threshold, label="the extraction and cache timings") as phase:
                    extract = _bench_extract(home, model_stage, model, processor, config, recorder.run_id, device)
                phases["extract"] = phase.report
        load = sampler.report
        load.warnings[:] = [w for rep in phases.values() for w in rep.warnings]
        noisy = {f"{float(r):g}": x["spread"] for r, x in prefill["by_retention"].items() if x["spread"] > SPREAD_WARN}
        if noisy and config["repeats"] > 1:
            load.warnings.append(f"prefill timings varied by more than {SPREAD_WARN:.0%} between rounds (retention: "
                                 f"(max - min) / median = {', '.join(f'{k}: {v:.0%}' for k, v in noisy.items())}); "
                                 f"medians are less certain")
        rows = _rows(recorder.run_id, prefill, extract, load, phases)
        recorder.store.insert_rows("bench_results", rows)
        report_dir = home.reports / f"bench-{recorder.run_id}"
        report_dir.mkdir(parents=True, exist_ok=True)
        title = (f"{config['model']} on {device} ({dtype}, {torch.get_num_threads()} threads); other processes: "
                 f"{_fmt(load.other_cores, '.2f')} cores")
        plot = plot_speedups(prefill, report_dir / "speedup.png", title)
        summary = {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "config": full_config,
                   "prefill": _jsonable(prefill), "extract": _jsonable(extract), "load": load.as_dict(),
                   "load_by_phase": {k: v.as_dict() for k, v in phases.items()},
                   "warnings": load.warnings, "figures": figures(rows), "plot": str(plot)}
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        recorder.tracker.log_metrics(recorder.mlflow_run_id, _metrics(rows))
        recorder.tracker.log_artifact(recorder.mlflow_run_id, plot)
        recorder.tracker.log_artifact(recorder.mlflow_run_id, report_dir / "summary.json")
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    summary["rows"] = rows
    summary["report_dir"] = str(report_dir)
    return summary


def _use_sdpa(model) -> str:
    """Make sure the model runs PyTorch SDPA attention; return the implementation in use."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # a model without SDPA support keeps what it has
            pass
        impl = getattr(model.config, "_attn_implementation", impl)
    return str(impl)


def bench_image(model):
    """A deterministic RGB image whose size is the grid pinpoint with the most crops (5 for llava-v1.6:
    672x672 -> base + 2x2), so no crop is padding and the prompt has the model's largest visual token count."""
    import numpy as np
    from PIL import Image

    pins = [tuple(p) for p in model.config.image_grid_pinpoints]
    crop = model.config.vision_config.image_size
    h, w = max(pins, key=lambda p: ((p[0] // crop) * (p[1] // crop), -p[0] * p[1]))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def bench_selector(tokens: int, channels: int, device):
    """A random-init paper selector (3 layers, d = C, FFN 4C, 16 heads where C allows) for (crops, L, C) features."""
    from pipeline.selector import SelectorConfig, TokenSelector

    heads = max(h for h in range(1, 17) if channels % h == 0)
    return TokenSelector(SelectorConfig(n_heads=heads), tokens, channels).to(device).eval()


def _prefill_fn(model, x):
    return lambda: model(inputs_embeds=x, use_cache=True, logits_to_keep=1, return_dict=True)


def cache_bytes(cache) -> int | None:
    """Bytes held by the K/V tensors of a transformers cache (None if its layout is unknown)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if not total:
        for name in ("key_cache", "value_cache"):
            for t in getattr(cache, name, None) or []:
                total += t.numel() * t.element_size()
    return total or None


def _bench_prefill(model, processor, config: dict[str, Any], device: str, ttft: bool) -> dict[str, Any]:
    import torch

    from pipeline import flops as F
    from pipeline.bench import interleaved, median, peak_memory, spread
    from pipeline.evaluate import chat_prompt
    from pipeline.prune import encode_images, split_prompt, visual_embeddings
    from pipeline.strategies import Context, keep_mask

    dims = F.LlavaNextDims.from_config(model.config)
    image = bench_image(model)
    prompt = chat_prompt(processor, QUESTION, True)
    with torch.inference_mode():
        feats = encode_images(model, processor, [image])[0]
        crops, tokens, channels = feats.features.shape
        selector = bench_selector(tokens, channels, feats.features.device)
        embed = model.get_input_embeddings()
        before, after = split_prompt(processor.tokenizer, prompt, model.config.image_token_id)
        if after is None:
            raise ConfigError(f"the chat prompt of {config['model']!r} has no image placeholder")
        head, tail = embed(before.to(embed.weight.device)), embed(after.to(embed.weight.device))
        text_tokens = head.shape[0] + tail.shape[0]
        ctx = Context(selector=selector)
        pruned = [r for r in config["retentions"] if r < 1.0]  # 1 keeps everything: the full prompt
        keeps = {r: keep_mask("selector", feats.features, r, "per-crop", ctx) for r in pruned}
        prompts = {1.0: torch.cat([head, visual_embeddings(model, feats), tail])[None]}
        for r, keep in keeps.items():
            prompts[r] = torch.cat([head, visual_embeddings(model, feats, keep), tail])[None]
    visual = {r: x.shape[1] - text_tokens for r, x in prompts.items()}

    candidates = {f"prefill@{r:g}": _prefill_fn(model, x) for r, x in prompts.items()}
    # The prompt without its image: the fixed cost of one forward (Python, kernel launches) plus the text.
    candidates["prefill@text"] = _prefill_fn(model, torch.cat([head, tail])[None])
    for r in pruned:
        candidates[f"selector@{r:g}"] = (lambda r=r: keep_mask("selector", feats.features, r, "per-crop", ctx))
    if ttft:
        def first_token(r):
            def run():
                f = encode_images(model, processor, [image])[0]
                keep = None if r == 1.0 else keep_mask("selector", f.features, r, "per-crop", ctx)
                x = torch.cat([head, visual_embeddings(model, f, keep), tail])[None]
                return model(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
            return run
        for r in prompts:
            candidates[f"ttft@{r:g}"] = first_token(r)
    with torch.inference_mode():
        times = interleaved(candidates, config["repeats"], config["warmup"], device)
        memory, kv = {}, {}
        for r, x in prompts.items():
            memory[r] = peak_memory(_prefill_fn(model, x), device)
            kv[r] = cache_bytes(_prefill_fn(model, x)().past_key_values)

    bytes_per = next(model.parameters()).element_size()
    per_r: dict[float, dict[str, Any]] = {}
    full_s = median(times["prefill@1"])
    for r in prompts:
        t = median(times[f"prefill@{r:g}"])
        n_vis = visual[r]
        row: dict[str, Any] = {
            "visual_tokens": n_vis, "seconds": t, "spread": spread(times[f"prefill@{r:g}"]),
            "times": times[f"prefill@{r:g}"], "measured_speedup": full_s / t,
            "peak_bytes": memory[r], "kv_cache_bytes": kv[r],
            "kv_cache_bytes_model": F.kv_cache_bytes(dims.lm, text_tokens + n_vis, bytes_per),
        }
        for conv in F.CONVENTIONS:
            row[f"flops_{conv}"] = F.prefill_flops(dims.lm, text_tokens, n_vis, conv)
            row[f"ideal_{conv}"] = F.ideal_speedup(dims.lm, text_tokens, visual[1.0], n_vis, conv)
        row["flops_per_second"] = row["flops_causal"] / t
        if r != 1.0:
            sel_s = median(times[f"selector@{r:g}"])
            sel_dims = F.SelectorDims(tokens=tokens, channels=channels, d_model=selector.cfg.d_model,
                                      layers=selector.cfg.selector_layers, ffn_mult=selector.cfg.ffn_mult)
            predicted = F.selector_share(sel_dims, crops, dims.lm, text_tokens, visual[1.0])
            row.update(selector_seconds=sel_s, selector_share=sel_s / full_s, selector_share_predicted=predicted,
                       selector_flops=F.selector_flops(sel_dims, crops),
                       encoder_tokens_kept=int(keeps[r].sum()))
        if ttft:
            row["ttft_seconds"] = median(times[f"ttft@{r:g}"])
        per_r[r] = row
    text_only = {"seconds": median(times["prefill@text"]), "flops_causal": F.prefill_flops(dims.lm, text_tokens, 0)}
    vicuna_visual = F.llava_next_visual_tokens(24, 2, 2)
    projected = F.selector_share(F.CLIP_L_SELECTOR, 5, F.VICUNA_7B.lm, 60, vicuna_visual)
    return {"text_tokens": text_tokens, "crops": crops, "tokens_per_crop": tokens, "channels": channels,
            "encoder_tokens": crops * tokens, "selector_heads": selector.cfg.n_heads,
            "image_size": list(image.size), "by_retention": per_r, "text_only": text_only,
            "projection": {"model": "llava-v1.6-vicuna-7b", "selector": "CLIP-L width 1024, 5 x 576 tokens",
                           "text_tokens": 60, "visual_tokens": vicuna_visual, "selector_share": projected,
                           "selector_flops": F.selector_flops(F.CLIP_L_SELECTOR, 5),
                           "prefill_flops": F.prefill_flops(F.VICUNA_7B.lm, 60, vicuna_visual)},
            "lm": vars(dims.lm)}


def extract_stage(home, model_stage, cfg) -> tuple[bool, float]:
    """The extract stage as ``flows.extract.run_extract`` runs it, without Prefect: (cached, seconds)."""
    from storage.stages import StageDir

    from .stages import extract_shard, finish_extract, plan_extract

    t0 = time.perf_counter()
    plan = plan_extract(model_stage, cfg)
    sd = StageDir(home, "extract", plan.key)
    if sd.is_complete():
        sd.manifest()
        return True, time.perf_counter() - t0
    with sd.lock():
        sd.begin()
        records = [extract_shard(home, plan, i) for i in range(plan.n_shards)]
        finish_extract(home, plan, records, time.perf_counter() - t0)
    return False, time.perf_counter() - t0


def _bench_extract(home, model_stage, model, processor, config: dict[str, Any], run_id: str,
                   device: str) -> dict[str, Any]:
    import torch

    from pipeline.bench import interleaved, median, synchronize
    from pipeline.config import ExtractConfig
    from pipeline.extract import FeatureExtractor
    from pipeline.images import open_source
    from storage.home import Home

    cfg = ExtractConfig(images="synthetic:docs", limit=config["extract_images"], batch_size=config["batch_size"],
                        shard_size=config["shard_size"])
    scratch = Home(home.root / "bench-scratch" / run_id)  # a private stage tree, removed at the end
    try:
        scratch.stages.mkdir(parents=True, exist_ok=True)
        cold_cached, cold = extract_stage(scratch, model_stage, cfg)  # first run: computes every shard
        if cold_cached:
            raise RuntimeError(f"{scratch.root}: the scratch extract stage was already complete")

        def stage_again():
            if extract_stage(scratch, model_stage, cfg)[0]:
                raise RuntimeError("the scratch extract stage was a cache hit after being removed")

        fx = FeatureExtractor(model, processor, crops=cfg.crops)
        items = open_source(cfg.images, seed=cfg.seed).items(cfg.limit)
        images = [it.load().image for it in items]
        batches = [torch.cat(fx.pixel_crops(images[i:i + cfg.batch_size]))
                   for i in range(0, len(images), cfg.batch_size)]
        param = next(fx.tower.parameters())
        batches = [b.to(param.device, param.dtype) for b in batches]

        def bare_tower():
            with torch.inference_mode():
                for b in batches:
                    fx.tower(b, output_hidden_states=True, return_dict=True)

        def preprocess():  # what the stage does before the tower: render/decode, image processor
            imgs = [it.load().image for it in items]
            for i in range(0, len(imgs), cfg.batch_size):
                fx.pixel_crops(imgs[i:i + cfg.batch_size])

        rounds = config.get("extract_repeats", config["repeats"])
        # The cold run above warmed the tower on these very batch shapes: no extra warm-up round.
        times: dict[str, list[float]] = {"stage": [], "bare_tower": [], "preprocess": []}
        for _ in range(rounds):
            # Removing the last run's output is not part of a stage run: do it before the clock starts.
            shutil.rmtree(scratch.stages / "extract", ignore_errors=True)
            for name, seconds in interleaved({"stage": stage_again, "bare_tower": bare_tower,
                                              "preprocess": preprocess}, 1, 0, device).items():
                times[name] += seconds
        cached_times = []
        for _ in range(config["repeats"]):
            synchronize(device)
            cached, seconds = extract_stage(scratch, model_stage, cfg)
            if not cached:
                raise RuntimeError("the scratch extract stage was not a cache hit after it completed")
            cached_times.append(seconds)
        n = len(items)
        crops = sum(int(b.shape[0]) for b in batches)
        from pipeline.flops import LlavaNextDims, vision_tower_flops

        tower_flops = vision_tower_flops(LlavaNextDims.from_config(model.config).vision, crops)
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
            scratch.root.parent.rmdir()  # bench-scratch/, when no other bench is running
        except OSError:
            pass


# ---------------------------------------------------------------- rows, figures, output

def _rows(run_id: str, prefill: dict, extract: dict | None, load, phases: dict) -> list[dict[str, Any]]:
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
    if extract is not None:
        add("extract/images_per_second/stage", extract["stage_images_per_second"], "images/s")
        add("extract/images_per_second/bare_tower", extract["bare_tower_images_per_second"], "images/s")
        add("extract/stage_over_bare_tower", extract["stage_over_bare_tower"], "ratio")
        add("extract/seconds/preprocess", extract["preprocess_seconds"], "s")
        add("extract/bare_tower_achieved_flops_per_second", extract["bare_tower_flops_per_second"], "FLOP/s")
        add("extract/seconds/cold", extract["cold_seconds"], "s")
        add("extract/seconds/cached", extract["cached_seconds"], "s")
        add("extract/cached_over_cold", extract["cached_over_cold"], "ratio")
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
    """Issue 8's figures from the rows: name, value, target, met."""
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


def _metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        if r["value"] is None:
            continue
        key = r["name"] + ("" if r["retention"] is None else f"/r{r['retention']:g}")
        out[key.replace("@", "_")] = r["value"]
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {(f"{k:g}" if isinstance(k, float) else k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def plot_speedups(prefill: dict, path: Path, title: str = "") -> Path:
    """Measured prefill speed-up vs retention next to the ideal of each FLOPs convention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_r = prefill["by_retention"]
    rs = sorted(by_r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(rs, [by_r[r]["measured_speedup"] for r in rs], "o-", color="tab:red", lw=2, label="measured (median)")
    styles = {"causal": ("tab:green", "ideal: true FLOPs, causal"), "square": ("tab:blue", "ideal: full n² square"),
              "fastv": ("tab:gray", "ideal: FastV convention")}
    for conv, (color, label) in styles.items():
        ax.plot(rs, [by_r[r][f"ideal_{conv}"] for r in rs], "--", color=color, marker=".", label=label)
    for r in rs:
        if r != 1.0:
            ax.annotate(f"{by_r[r]['measured_speedup'] / by_r[r]['ideal_causal']:.2f}", (r, by_r[r]["measured_speedup"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8, color="tab:red")
    ax.set_xlabel("retention (fraction of encoder tokens kept per crop)")
    ax.set_ylabel("prefill speed-up over the full prompt (×)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log or a pipe: do not wrap the tables at 80 columns
    p, e, load = out["prefill"], out["extract"], out["load"]
    cfg = out["config"]
    t = Table(title=f"prefill: {cfg['model']} on {cfg['device']} ({cfg['dtype']}, {cfg['torch_threads']} threads, "
                    f"{cfg['attn_implementation']}), {p['text_tokens']} text tokens, {p['crops']} crops × "
                    f"{p['tokens_per_crop']}, median of {cfg['repeats']}")
    for col in ("retention", "LLM tokens", "seconds", "measured ×", "ideal × (causal)", "÷ ideal causal",
                "÷ ideal square", "÷ ideal FastV", "GFLOP/s", "peak MiB", "KV MiB"):
        t.add_column(col, justify="right")
    for r, x in sorted(p["by_retention"].items(), key=lambda kv: -float(kv[0])):
        t.add_row(f"{float(r):g}", str(p["text_tokens"] + x["visual_tokens"]), f"{x['seconds']:.3f}",
                  f"{x['measured_speedup']:.2f}", f"{x['ideal_causal']:.2f}",
                  *[f"{x['measured_speedup'] / x[f'ideal_{c}']:.2f}" for c in ("causal", "square", "fastv")],
                  f"{x['flops_per_second'] / 1e9:.0f}", f"{x['peak_bytes'] / 2**20:.1f}",
                  _fmt(None if x["kv_cache_bytes"] is None else x["kv_cache_bytes"] / 2**20, ".1f"))
    console.print(t)
    s = Table(title="selector + top-k per image (all crops in one forward) vs full prefill")
    for col in ("retention", "seconds", "measured share", "FLOPs share", "measured/predicted"):
        s.add_column(col, justify="right")
    for r, x in sorted(p["by_retention"].items(), key=lambda kv: -float(kv[0])):
        if "selector_seconds" in x:
            s.add_row(f"{float(r):g}", f"{x['selector_seconds']:.4f}", f"{x['selector_share']:.2%}",
                      f"{x['selector_share_predicted']:.2%}",
                      f"{x['selector_share'] / x['selector_share_predicted']:.2f}")
    console.print(s)
    console.print(f"the prompt without its image ({p['text_tokens']} tokens): {p['text_only']['seconds'] * 1000:.1f} ms "
                  f"per forward (fixed cost + text)")
    proj = p["projection"]
    console.print(f"projection: {proj['selector']} selector vs {proj['model']} prefill ({proj['text_tokens']} text + "
                  f"{proj['visual_tokens']} visual tokens): {proj['selector_flops'] / 1e9:.0f} GFLOP / "
                  f"{proj['prefill_flops'] / 1e12:.1f} TFLOP = {proj['selector_share']:.2%}")
    if e is not None:
        console.print(f"extraction ({e['images']} {e['source']} images, {e['crops']} crops, batch {e['batch_size']}, "
                      f"{e['shards']} shards): stage {e['stage_images_per_second']:.2f} images/s, bare tower "
                      f"{e['bare_tower_images_per_second']:.2f} images/s, ratio {e['stage_over_bare_tower']:.3f} "
                      f"(render + processor {e['preprocess_seconds']:.2f} s, fp16 + shards + manifest "
                      f"{e['other_seconds']:.2f} s of {e['stage_seconds']:.2f} s)")
        console.print(f"extract stage: cold {e['cold_seconds']:.2f} s, cached {e['cached_seconds'] * 1000:.1f} ms, "
                      f"cached/cold {e['cached_over_cold']:.4f}")
    f = Table(title="figures against their targets")
    for col in ("figure", "value", "target", "met"):
        f.add_column(col)
    for row in out["figures"]:
        f.add_row(row["figure"], _fmt(row["value"], ".4g"), row["target"],
                  "n/a" if row["met"] is None else ("yes" if row["met"] else "NO"))
    console.print(f)
    phases = "; ".join(f"{k} {_fmt(v['other_cores_mean'], '.2f')} (max {_fmt(v['other_cores_max'], '.2f')})"
                       for k, v in out["load_by_phase"].items())
    console.print(f"load: other processes used {_fmt(load['other_cores_mean'], '.2f')} cores on average (max "
                  f"{_fmt(load['other_cores_max'], '.2f')}) of {load['cpus']} ({phases}); loadavg "
                  f"{_fmt(load['loadavg1_start'], '.2f')} -> {_fmt(load['loadavg1_end'], '.2f')}; {load['seconds']:.0f} s")
    for w in out["warnings"]:
        console.print(f"[bold red]warning:[/] {escape(w)}")
    console.print(f"run {out['run_id']} (MLflow {out['mlflow_run_id']}); plot {out['plot']}")
