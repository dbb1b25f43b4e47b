"""``atr speed``: prefill speed-up full vs pruned against the FLOPs limit, selector overhead,
extraction throughput, the cache and memory (see ``flows.stages.speed``). ``atr bench``, its old
name, still runs it for one release (``flows.cli.RENAMED``)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import ConfigError

from .common import (MODEL_HELP, add_command, add_compute_options, add_retentions_option, parse_retentions,
                     strategies_help)

DEFAULT_RETENTIONS = "0.5,0.25,0.11"
SIZED_RETENTIONS = "0.5,0.222,0.111,0.056"  # the field's 1440 / 640 / 320 / 160 of LLaVA-NeXT's 2,880 tokens


def speed_parser(sub, common) -> None:
    p = add_command(
        sub, common, "speed", aliases=("bench",),
        help="speed benchmarks: prefill speed-up vs the FLOPs limit, selector, extraction",
        description="Measure, in one process, the prefill time of the full vs the pruned prompt at each retention "
                    "(medians of interleaved rounds A B A B after warm-up) against the ideal speed-up of the FLOPs "
                    "model (true FLOPs, causal attention; FastV's and the full-square conventions beside it), the "
                    "selector + top-k time as a share of the full prefill against its FLOPs share, extraction "
                    "images/s through the extract stage (shards included) against the bare vision tower, cold vs "
                    "cached extract stage, peak memory and KV-cache bytes, and (--selector-training, the default "
                    "on CUDA) selector-training crops/s and FLOP/s at the real tower dims with the time to train on "
                    "100K COCO crops projected from them. The machine load from other processes "
                    "is sampled during the run; a warning says when it makes the ratios untrustworthy. Rows go to "
                    "bench_results, the speed-up plot to $ATR_HOME/reports/bench-<run_id>/ and MLflow.",
        epilog="examples:\n  atr speed\n  atr speed --retentions 0.5,0.25,0.11 --repeats 7\n"
               "  atr speed --selector-training next,ov --extract-images 0 --strategies none  # real-dim selector "
               "training\n"
               "  atr speed --model bench-vicuna-7b                                   # real size, on a CUDA machine\n"
               "  atr speed --model bench-qwen25-vl-7b --strategies none             # Qwen2.5-VL-7B's dims, on CUDA\n"
               "  atr speed --model llava-hf/llava-v1.6-vicuna-7b-hf --repeats 10     # on a CUDA machine\n"
               "  atr query \"SELECT name, retention, measured_speedup, ideal_speedup, value, unit FROM "
               "bench_results ORDER BY name\"")
    p.add_argument("--model", default="bench",
                   help=MODEL_HELP + " (default: bench, a random-init LLaVA-NeXT with the real token counts: "
                                     "336-px crops of 14-px patches, 576 tokens per crop, up to 5 crops; "
                                     "bench-vicuna-7b and bench-mistral-7b: random-init with the exact dimensions "
                                     "of llava-v1.6-vicuna-7b / -mistral-7b, built on the target device in the "
                                     "--dtype chosen: 13.2 / 14.1 GiB of weights in bf16 (auto on CUDA), 26.3 / "
                                     "28.2 GiB in fp32 (auto on the CPU); bench-qwen25-vl-7b and bench-qwen3-vl-8b: "
                                     "the same for Qwen2.5-VL-7B-Instruct / Qwen3-VL-8B-Instruct, 8.29 / 8.77 B "
                                     "parameters, timed on a 1344 x 1680 image: 2,880 / 2,184 merged tokens; "
                                     "tiny-qwen25 / tiny-qwen3 on the CPU)")
    add_retentions_option(p, "",
                          help=f"comma-separated fractions of encoder tokens kept per crop, each in (0, 1]; the "
                               f"full prompt (1) is always measured (default: {DEFAULT_RETENTIONS}; "
                               f"{SIZED_RETENTIONS} for the real-size bench-* presets)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="let bench-vicuna-7b / bench-mistral-7b run on the CPU (minutes per prefill): 26.3 / 28.2 GiB "
                        "of weights in fp32 (--dtype auto there), 13.2 / 14.1 GiB with --dtype bf16. A model whose "
                        "weights + 20 %% + 1 GiB exceed free RAM is refused before allocating (ATR_MEMORY_LIMIT=8GiB "
                        "sets what counts as free)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per measurement; medians are reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default: 1)")
    p.add_argument("--extract-images", type=int, default=None,
                   help="synthetic:docs images per extract-stage run (default: 32; 0 for the 7B presets; "
                        "0 skips extraction)")
    p.add_argument("--extract-repeats", type=int, default=5,
                   help="timed rounds of the extract stage and the bare tower, at most --repeats (default: 5)")
    p.add_argument("--batch-size", type=int, default=8, help="images per vision-tower batch in extraction (default: 8)")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard in extraction (default: 16)")
    p.add_argument("--strategies", default=None,
                   help=strategies_help("strategies timed side by side (selection ms per image and time to first "
                                        "token at each retention, equal budgets); 'none' skips them (default: "
                                        "every pruning strategy)", pruners_only=True))
    p.add_argument("--ttft", action=argparse.BooleanOptionalAction, default=None,
                   help="also time image-to-first-token, full vs pruned (default: on with CUDA, off on the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default, as every atr command: $ATR_TORCH_THREADS, else $OMP_NUM_THREADS, else "
                        "one per core)")
    p.add_argument("--selector-training", default=None, metavar="SHAPES",
                   help="time selector training (the training loop's own steps: selector + reconstructor forward, "
                        "backward, AdamW) at these feature shapes, comma-separated: next (CLIP ViT-L/14-336, 576 "
                        "tokens x 1024 channels), ov (SigLIP-so400m, 729 x 1152) or LxC; reports crops/s and "
                        "FLOP/s against the FLOPs model and projects the time to train on 100K COCO crops at the "
                        "default schedule (2000 steps x 64), as measured and on an H100; 'none' skips it "
                        "(default: next,ov on CUDA, none on the CPU, where a real-shape step takes seconds per crop)")
    p.add_argument("--selector-batch", type=int, default=None,
                   help="crops per selector-training step (default: 64 on CUDA, 2 on the CPU)")
    p.add_argument("--selector-steps", type=int, default=None,
                   help="timed selector-training steps after one warm-up step (default: 5 on CUDA, 2 on the CPU)")
    p.add_argument("--selector-autocast", choices=("auto", "none", "bf16"), default="auto",
                   help="selector training under bf16 autocast, as `atr train --autocast bf16` (CUDA only; "
                        "default: auto, bf16 on CUDA)")
    add_compute_options(p)
    p.add_argument("--load-threshold", type=float, default=0.2,
                   help="mean CPU cores used by other processes above which the run is flagged untrustworthy "
                        "(default: 0.2)")


def check_args(args) -> dict[str, Any]:
    """The validated options as a config dict (ConfigError names the bad option)."""
    from pipeline.presets import SIZED_PRESETS

    sized = args.model in SIZED_PRESETS
    retentions = list(parse_retentions(args.retentions or (SIZED_RETENTIONS if sized else DEFAULT_RETENTIONS)))
    if args.extract_images is None:
        args.extract_images = 0 if sized else 32
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
    from pipeline.strategies import get, pruners

    # by default every pruner but those reading a trained file (visionselector's checkpoint, trained per model)
    given = ",".join(p for p in pruners() if not get(p).files) if args.strategies is None else args.strategies
    strategies = [] if given.strip() in ("", "none") else [x.strip() for x in given.split(",") if x.strip()]
    for x in strategies:
        if x not in pruners():
            raise ConfigError(f"--strategies: unknown strategy {x!r}; valid: {', '.join(pruners())} (the full prompt "
                              f"is always timed)")
    training = _selector_shapes(args.selector_training)
    for opt, value in (("--selector-batch", args.selector_batch), ("--selector-steps", args.selector_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{opt} must be >= 1, got {value}")
    return {"selector_training": training, "selector_batch": args.selector_batch,
            "selector_steps": args.selector_steps, "selector_autocast": args.selector_autocast,
            "model": args.model, "retentions": retentions, "repeats": args.repeats, "warmup": args.warmup,
            "extract_images": args.extract_images, "extract_repeats": min(args.extract_repeats, args.repeats),
            "batch_size": args.batch_size, "shard_size": args.shard_size,
            "ttft": args.ttft, "load_threshold": args.load_threshold, "threads": args.threads,
            "device": args.device, "model_dtype": args.dtype, "allow_cpu": args.allow_cpu, "strategies": strategies,
            "strategies_default": args.strategies is None}


def _selector_shapes(given: str | None) -> list[str] | None:
    """``--selector-training``: None (the device's default), [] for none, else the validated shape names."""
    from pipeline.flops import SELECTOR_SHAPES

    if given is None:
        return None
    names = [x.strip() for x in given.split(",") if x.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        tokens, x, channels = name.partition("x")
        if name not in SELECTOR_SHAPES and not (x and tokens.isdigit() and channels.isdigit()
                                                and int(tokens) > 0 and int(channels) > 0):
            raise ConfigError(f"--selector-training: unknown shape {name!r}; valid: {', '.join(SELECTOR_SHAPES)}, "
                              f"none, or LxC (tokens x channels, e.g. 64x256)")
    return names


def cmd_speed(home, args) -> int:
    from ..orchestration.flows import speed_run
    from ..present.tables import print_speed

    print_speed(speed_run(home, check_args(args)))
    return 0
