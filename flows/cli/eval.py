"""``atr eval``: pruned evaluation (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL) on benchmarks, one tower
pass per image, cached per result."""

from __future__ import annotations

import time

from pipeline.errors import UserError

from .common import (
    MODEL_HELP,
    add_command,
    add_compute_options,
    add_dask_options,
    add_retentions_option,
    on_dask,
    strategies_help,
    parse_retentions,
    preflight,
)


def eval_parser(sub, common) -> None:
    p = add_command(
        sub, common, "eval",
        help="evaluate pruned LLaVA-NeXT / LLaVA-OneVision / Qwen2.5-VL / Qwen3-VL on benchmarks",
        description="Evaluate the model on benchmarks with each token-reduction strategy at each "
                    "retention. The work unit is a shard of a benchmark's questions: the vision tower "
                    "runs once per image, and every missing (strategy, retention, seed) result of the "
                    "shard is computed from those features. Each result is cached per shard: adding a "
                    "strategy or retention reuses what is done. Unreadable rows are skipped with a "
                    "warning. Rows go to eval_samples, eval_scores and stage_metrics; plots to "
                    "$ATR_HOME/reports/eval-<run>/ and MLflow.",
        epilog="examples:\n  atr eval --selector <train-hash>\n"
               "  atr eval --benchmark synthetic-ocr --strategies full,random --retentions 0.25\n"
               "  atr eval --selector <train-hash> --strategies full,none,selector --variant selector:allocation=image "
               "--thresholds 0.3,0.5,0.7\n"
               "  atr eval --model llava-hf/llava-v1.6-mistral-7b-hf --selector sel.safetensors "
               "--benchmark docvqa_val --data DocVQA/validation-00000-of-00006.parquet\n"
               "  atr eval --model Qwen/Qwen2.5-VL-7B-Instruct --strategies full,random,visionzip,cdpruner "
               "--retentions 0.25 --benchmark docvqa_val --data DocVQA/validation-00000-of-00006.parquet")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--selector", default=None,
                   help="selector for the 'selector' strategy: a train stage hash (prefix) or a .safetensors file")
    p.add_argument("--benchmark", default="synthetic-ocr,synthetic-scene",
                   help="comma-separated benchmarks (default: synthetic-ocr,synthetic-scene); real ones: docvqa_val, "
                        "infovqa_val, chartqa, textvqa_val, mmbench_en_dev, ai2d, gqa, mmmu_val, mmstar, scienceqa_img")
    p.add_argument("--data", action="append", default=[], metavar="PATH|NAME=PATH",
                   help="lmms-lab parquet file or directory of a real benchmark; NAME=PATH when giving several")
    p.add_argument("--strategies", default=None,
                   help=strategies_help("strategies to evaluate (default: all; those needing a selector only "
                                        "with --selector)"))
    p.add_argument("--option", action="append", default=[], metavar="STRATEGY.NAME=VALUE",
                   help="a strategy's option (ablation switch), repeatable, e.g. --option visionzip.cls=false "
                        "--option visionzip.merge=average; values are JSON (true, 0.5, [1, 1]) or plain strings. "
                        "Options that differ from the defaults are part of the results' cache keys "
                        "(docs/strategies.md)")
    p.add_argument("--variant", action="append", default=[], metavar="STRATEGY:NAME=VALUE[,NAME=VALUE]",
                   help="one more variant of a strategy, evaluated beside its default (the --option values) in the "
                        "same run, repeatable, e.g. --variant selector:allocation=image --variant "
                        "selector:allocation=image,calibration=crop-z; each variant's options go on top of the "
                        "strategy's --option values. Results are told apart by their variant (eval_scores.variant: "
                        "the changed options as k=v,k=v) and labelled e.g. 'selector [allocation=image]'")
    p.add_argument("--thresholds", default=None, metavar="T1,T2",
                   help="the threshold budget, for adaptive strategies (the selector): per threshold in (0, 1) one "
                        "more result per variant that keeps each image's tokens whose keep probability reaches it, "
                        "between --threshold-floor and --threshold-cap of its valid tokens, so the count follows the "
                        "image (reported with its mean visual tokens, e.g. 'selector @ t=0.5', and on the frontier "
                        "plot); other strategies are evaluated as usual")
    p.add_argument("--threshold-floor", type=float, default=0.02, metavar="F",
                   help="threshold budget: the least fraction of an image's valid tokens kept (default: 0.02)")
    p.add_argument("--threshold-cap", type=float, default=0.75, metavar="C",
                   help="threshold budget: the most fraction of an image's valid tokens kept; also the retention "
                        "whose selector checkpoint it uses (default: 0.75)")
    p.add_argument("--split", default="test", metavar="val|test",
                   help="which split of the synthetic benchmarks is generated: val to fix choices on, test to report "
                        "once (default: test; train is refused: VisionSelector learns on it). Real benchmarks read "
                        "--data, whose files decide their split")
    p.add_argument("--text-encoder", default=None, metavar="ID_OR_DIR",
                   help="a CLIP checkpoint (hub id or save_pretrained folder, e.g. openai/clip-vit-large-patch14-336) "
                        "whose text tower gives cdpruner the question's relevance; without it cdpruner runs the "
                        "unconditioned DPP")
    p.add_argument("--harness", choices=["builtin", "lmms-eval"], default="builtin",
                   help="builtin (default): atr's benchmarks and scoring, cached per shard; lmms-eval: lmms-eval's "
                        "own tasks, prompts and metrics (--tasks), through the atr_llava plugin model, cached per "
                        "(task, strategy, retention, seed); needs the [lmms] extra")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="--harness lmms-eval: comma-separated lmms-eval task names (e.g. docvqa_val,chartqa); "
                        "--data NAME=PATH reads a task from a local lmms-lab parquet instead of the hub")
    p.add_argument("--interpolation", choices=["off", "on"], default="off",
                   help="LLaVA-OneVision only: its anyres_max_9 bilinearly shrinks large token grids. off (default, "
                        "as in the paper): vision_aspect_ratio is set so no grid shrinks, the only way a keep mask "
                        "can be gathered; on: the checkpoint's own setting, for full/none only (stock baseline)")
    add_retentions_option(p, "0.1,0.25,0.5,0.75", help="comma-separated (default: 0.1,0.25,0.5,0.75)")
    p.add_argument("--budget", default="per-crop", metavar="per-crop|global|stock[,...]",
                   help="per-crop: k = round(r * valid tokens) in every crop; global: r * the image's valid tokens; "
                        "stock: r * the encoder tokens the stock model (the unpruned checkpoint with its own settings: "
                        "LLaVA-OneVision's interpolation on) sends of the image, spread as global. Every strategy "
                        "sends the LLM that many tokens; the peers that split a budget themselves (HiRED, DivPrune, "
                        "CDPruner) spread the image's total their way. Qwen2.5-VL and Qwen3-VL have no crops: "
                        "per-crop means the whole image (one crop), and every budget counts merged tokens (2 x 2 "
                        "patches, what the LLM sees) of the processor's resized image; HiRED, which needs crops, is "
                        "refused there. Comma-separated: each budget is evaluated, "
                        "side by side in one run (default: per-crop). The adaptive threshold budget is not one of these: "
                        "--thresholds gives it")
    p.add_argument("--limit", type=int, default=300, help="questions per benchmark (default: 300)")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="questions per generate call, or auto: on CUDA each batch is cut by its tokens (visual + "
                        "text + new) against free GPU memory over the LLM's bytes per token, so long pages go "
                        "in smaller batches (an out-of-memory batch halves the budget); on a CPU auto is 16. "
                        "Batching changes speed, never answers or cache keys (default: auto on CUDA, 16 on the "
                        "CPU)")
    p.add_argument("--shard-size", type=int, default=100,
                   help="questions per work unit: the vision tower runs once per image of a shard for every "
                        "strategy, retention and seed, and --dask-* distributes shards (default: 100)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the random strategy (default: 3)")
    add_compute_options(p)
    add_dask_options(p)


def model_family(model: str):
    """The family ``--model`` names, known before the model is prepared: a preset's, or a folder's (or a cached
    hub snapshot's) config.json; None when it cannot be told yet (the eval planning asks the prepared model)."""
    from pipeline.families import family_of
    from pipeline.presets import PRESETS, SHAPE_PRESETS, SIZED_PRESETS
    from pipeline.tinyworld import TRAINED_CONFIGS

    if model in TRAINED_CONFIGS:
        return TRAINED_CONFIGS[model]().preset.family
    for table in (PRESETS, SIZED_PRESETS, SHAPE_PRESETS):
        if model in table:
            return table[model].family
    try:
        from pipeline.loading import load_model_config

        from ..stages.prepare_model import model_spec

        kind, identity = model_spec(model)
        return family_of(load_model_config(identity["dir"])) if "dir" in identity else None
    except Exception:  # noqa: BLE001 (not a folder yet, offline: preflight and the flow say why in one line)
        return None


def _parse_data(values: list[str], benchmarks: tuple[str, ...], is_real=None) -> dict[str, str]:
    """``--data`` values: NAME=PATH, or a bare PATH when only one named benchmark (or task) can take it."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in benchmarks:
            out[name] = path
        else:
            real = [b for b in benchmarks if (is_real(b) if is_real else not b.startswith("synthetic-"))]
            if len(real) != 1:
                raise UserError(f"--data {v}: say which benchmark it is for (--data NAME=PATH)")
            out[real[0]] = v
    return out


def _batch_size(value: str) -> int | str:
    import argparse

    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {value!r}")
    return n


def parse_options(given: list[str]) -> dict[str, dict]:
    """``--option STRATEGY.NAME=VALUE`` (repeatable) -> {strategy: {name: value}}; one line for a bad one."""
    import json

    out: dict[str, dict] = {}
    for text in given:
        head, eq, raw = text.partition("=")
        strategy, dot, name = head.partition(".")
        if not (eq and dot and strategy and name):
            raise UserError(f"--option {text!r}: write STRATEGY.NAME=VALUE, e.g. visionzip.cls=false")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(strategy.strip(), {})[name.strip()] = value
    return out


def _option_value(raw: str):
    import json

    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_variants(given: list[str], options: dict[str, dict]) -> dict[str, object]:
    """``--variant STRATEGY:NAME=VALUE[,NAME=VALUE]`` (repeatable) on top of ``--option``'s tables: a
    strategy with variants gets the list [its --option table, that table updated by each variant]; one
    line for a bad one."""
    out: dict[str, object] = dict(options)
    for text in given:
        strategy, colon, body = text.partition(":")
        strategy = strategy.strip()
        pairs = [p for p in body.split(",") if p.strip()]
        if not (colon and strategy and pairs and all("=" in p and p.partition("=")[0].strip() for p in pairs)):
            raise UserError(f"--variant {text!r}: write STRATEGY:NAME=VALUE[,NAME=VALUE], e.g. "
                            "selector:allocation=image,calibration=crop-z")
        base = options.get(strategy, {})
        current = out.get(strategy, base)
        tables = list(current) if isinstance(current, list) else [current]
        tables.append({**base, **{k.strip(): _option_value(v.strip()) for k, _, v in (p.partition("=") for p in pairs)}})
        out[strategy] = tables
    return out


def parse_thresholds(text: str | None) -> tuple[float, ...]:
    """``--thresholds 0.3,0.5`` -> (0.3, 0.5); one line for a value that is not a number."""
    if not text:
        return ()
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise UserError(f"--thresholds {text!r}: {part!r} is not a number (write e.g. 0.3,0.5,0.7)") from None
    return tuple(out)


def cmd_eval(home, args) -> int:
    from pipeline.evaluate import EvalConfig, default_batch_size, default_strategies
    from pipeline.strategies.core import check_family

    from ..orchestration.flows import eval_flow
    from ..present import progress
    from ..present.tables import print_eval, print_eval_figures
    from ..stages.eval import data_files

    benchmarks = tuple(b.strip() for b in args.benchmark.split(",") if b.strip())
    family = model_family(args.model)
    if args.strategies:
        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    else:
        strategies = default_strategies(bool(args.selector), family)
    if family is not None:
        check_family(strategies, family)  # HiRED on Qwen-VL: one line before any flow (planning checks it too)
    tasks = tuple(t.strip() for t in (args.tasks or "").split(",") if t.strip())
    if tasks and args.harness != "lmms-eval":
        raise UserError("--tasks names lmms-eval tasks: add --harness lmms-eval (the built-in harness takes --benchmark)")
    cfg = EvalConfig(benchmarks=benchmarks, strategies=strategies, retentions=parse_retentions(args.retentions),
                     budget=args.budget, seeds=args.seeds, limit=args.limit,
                     batch_size=default_batch_size(args.device) if args.batch_size is None else args.batch_size,
                     shard_size=args.shard_size, device=args.device, model_dtype=args.dtype,
                     text_encoder=args.text_encoder, interpolation=args.interpolation == "on",
                     harness=args.harness, tasks=tasks, options=parse_variants(args.variant, parse_options(args.option)),
                     thresholds=parse_thresholds(args.thresholds), threshold_floor=args.threshold_floor,
                     threshold_cap=args.threshold_cap, split=args.split)
    if args.harness == "lmms-eval":
        from ..stages.lmms_eval import check_tasks, require_lmms_eval

        require_lmms_eval()
        check_tasks(tasks)  # one line with lmms-eval's nearest names, not a failed flow later
        data = _parse_data(args.data, tasks, is_real=lambda t: True)
    else:
        data = _parse_data(args.data, benchmarks)
        for bench in benchmarks:
            if not bench.startswith("synthetic-") or bench in data:
                data_files(bench, data, home, cfg.limit)  # one line now, not a failed flow later
    preflight(args.model)
    progress.enable(True)
    t0 = time.perf_counter()
    out = on_dask(eval_flow, args)(str(home.root), args.model, cfg.to_dict(), args.selector, data)
    print_eval(out["summary"], title="lmms-eval harness" if args.harness == "lmms-eval" else None)
    if args.harness == "builtin":
        print_eval_figures(out["figures"])
    print(f"  report  {out['report']}  ({time.perf_counter() - t0:.1f}s)")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0
