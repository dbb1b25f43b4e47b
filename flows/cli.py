"""The ``atr`` command line.

Every subcommand takes ``--home DIR`` (or ``$ATR_HOME``, default ``./.atr``).
Errors a user can cause end in one ``error: ...`` line and exit code 2; the
full traceback is shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

DESCRIPTION = """\
Adaptive visual-token reduction for LLaVA-NeXT (arXiv 2503.16660), as a pipeline.

Stages write content-hashed directories under $ATR_HOME/stages/, so running the
same command twice reuses the first result (a cache hit does no model work).
Every run is recorded in $ATR_HOME/results.duckdb (query it with `atr query`)
and in MLflow ($MLFLOW_TRACKING_URI, default sqlite:///$ATR_HOME/mlflow.db).
"""

EPILOG = """\
examples:
  atr prepare-model                      # tiny-trained: the shipped checkpoint, or trained here (~8 min)
  atr ask --image card.png --question "What is written in the image?"
  atr benchmark synthetic-ocr --split test -n 300 --out ocr-test.parquet
  atr extract --model tiny --images synthetic:docs --limit 256
  atr extract --model llava-hf/llava-v1.6-mistral-7b-hf --images /data/coco/train2017 --limit 100000 --crops base
  atr query "SELECT stage, cached, round(seconds, 2) AS s FROM stage_runs ORDER BY started_at DESC LIMIT 5"
"""

MODEL_HELP = ("model: a preset (tiny-trained: trained in-project and able to read; tiny: random weights, for "
              "fast tests), a local directory saved with save_pretrained, or a Hugging Face id "
              "such as llava-hf/llava-v1.6-mistral-7b-hf (must be in the local HF cache when offline)")


from .run_cmd import add_dask_options  # noqa: E402 - light module: no Prefect, no torch
from .run_cmd import add_parsers as add_run_parsers  # noqa: E402


class UserError(Exception):
    """Printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    # Options valid before and after the subcommand. SUPPRESS keeps a subparser's
    # unset option from overwriting a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                        help="pipeline home holding stages, results.duckdb, mlflow.db "
                             "(default: $ATR_HOME or ./.atr)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Prefect logs and full tracebacks")

    parser = argparse.ArgumentParser(prog="atr", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare-model", parents=[common], help="build, train or register a LLaVA-NeXT model (cached)",
                       description="Build a preset with save_pretrained into a content-hashed stage directory, "
                                   "or register a local/HF model after checking that from_pretrained loads it. "
                                   "tiny-trained is copied from the checkpoint shipped in pipeline/assets when "
                                   "its training config matches; otherwise (or with --retrain) it is trained "
                                   "here on the synthetic benchmarks' train splits (CPU, about 8 minutes on 2 "
                                   "cores) and evaluated on their test splits.")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--retrain", action="store_true",
                   help="tiny-trained: train from scratch even if cached or shipped (reproduces the shipped one)")
    p.add_argument("--seed", type=int, default=None, help="tiny-trained: training seed (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="tiny-trained: LM training steps (default: 2000)")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="copy the prepared trained model (weights, processor, provenance.json) to DIR, e.g. "
                        "pipeline/assets/tiny-trained to refresh the shipped checkpoint")

    p = sub.add_parser("ask", parents=[common], help="answer a question about an image",
                       description="Load the model (prepared and cached like prepare-model) and print its greedy "
                                   "answer, through the processor's chat template and HF generate.",
                       epilog='example:\n  atr ask --image card.png --question "What is written in the image?"',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--image", required=True, help="image file (.png, .jpg, .webp)")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default: 16)")

    p = sub.add_parser("benchmark", parents=[common], help="write a synthetic benchmark split as lmms-lab parquet",
                       description="Generate synthetic-ocr or synthetic-scene deterministically from a seed and "
                                   "write one split as parquet (columns question_id, question, answers, answer, "
                                   "image{bytes,path}). Splits are disjoint by content. Cached under "
                                   "$ATR_HOME/stages/benchmark/.")
    p.add_argument("name", help="synthetic-ocr or synthetic-scene")
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("-n", type=int, default=300, help="number of questions (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--out", default=None, help="also copy the parquet file here")

    p = sub.add_parser("extract", parents=[common], help="extract vision-encoder features into WebDataset shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the model's image processor and vision tower over an image source and "
                                   "store, per image, the per-crop tensors LLaVA-NeXT feeds its projector "
                                   "(vision_feature_layer, CLS dropped) as fp16 feat.npy (crops x L x C) in "
                                   "feats-%%06d.tar shards, plus a json with crop grid, crop boxes and (synthetic "
                                   "images) a per-token glyph mask. Interrupted runs resume; identical runs are "
                                   "cache hits.")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--images", default="synthetic:docs",
                   help="image source: synthetic:docs (text-like), synthetic:scenes (shapes), or a folder of "
                        "jpg/png/webp searched recursively (default: synthetic:docs)")
    p.add_argument("--limit", type=int, default=256,
                   help="number of images; a folder is sampled deterministically (by --seed) when it holds more "
                        "(default: 256; 0 = the whole folder)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic images and folder sampling (default: 0)")
    p.add_argument("--crops", choices=["all", "base"], default="all",
                   help="all AnyRes crops (base + grid), or only the base crop as in the paper's selector "
                        "training (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="images per vision-tower batch (default: 16)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default: 64)")
    add_dask_options(p)

    p = sub.add_parser("train", parents=[common], help="train the token selector(s) and evaluate them on held-out crops",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train the paper's selector + reconstructor on extracted features (loss = "
                                   "MSE + max(mean(M), p)), one selector per --retention, then compare selector "
                                   "top-k with random-k (mean of 3 seeds) and a uniform grid on held-out crops at "
                                   "retentions 0.1, 0.25, 0.5, 0.75 (reconstruction MSE, glyph coverage). "
                                   "Features come from --features, or are extracted first from --model/--images. "
                                   "A killed run resumes from its last checkpoint; an identical run is a cache hit.",
                       epilog="examples:\n  atr train --retention 0.25\n  atr train --features 4c914bad --retention "
                              "0.1,0.25,0.5 --steps 2000\n  atr train --model llava-hf/llava-v1.6-mistral-7b-hf "
                              "--images /data/coco/train2017 --limit 100000 --steps 20000 --batch-size 64")
    p.add_argument("--features", metavar="STAGE_OR_HASH", default=None,
                   help="an extract stage: its hash (or a unique prefix) or its directory")
    p.add_argument("--model", default="tiny-trained",
                   help=MODEL_HELP + " (used without --features; default: tiny-trained)")
    p.add_argument("--images", default="synthetic:docs", help="image source to extract first (default: synthetic:docs)")
    p.add_argument("--limit", type=int, default=2048, help="images to extract first (default: 2048)")
    p.add_argument("--crops", choices=["all", "base"], default="base",
                   help="crops to extract for training: base (the paper: one base-resolution crop per image) "
                        "or all (default: base)")
    p.add_argument("--retention", default="0.25",
                   help="target keep ratio p, or a comma-separated list for one selector per p (default: 0.25)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per selector (default: 2000; 700 for the tiny presets)")
    p.add_argument("--batch-size", type=int, default=None, help="crops per step (default: 64; 32 for the tiny presets)")
    p.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate (default: 1e-4; 1e-3 for tiny)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 100; 50 for tiny)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--checkpoint-every", type=int, default=250,
                   help="steps between resumable checkpoints (default: 250)")
    p.add_argument("--held-out-percent", type=int, default=10,
                   help="percent of images (by hash of image id) held out for evaluation (default: 10)")

    p = sub.add_parser("eval", parents=[common], help="evaluate pruned LLaVA-NeXT on benchmarks",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate the model on benchmarks with each token-reduction strategy at each "
                                   "retention. One cached chunk per (benchmark, strategy, retention, seed): adding "
                                   "a strategy or retention reuses what is done. Rows go to eval_samples and "
                                   "eval_scores; plots to $ATR_HOME/reports/eval-<run>/ and MLflow.",
                       epilog="examples:\n  atr eval --selector <train-hash>\n"
                              "  atr eval --benchmark synthetic-ocr --strategies full,random --retentions 0.25\n"
                              "  atr eval --model llava-hf/llava-v1.6-mistral-7b-hf --selector sel.safetensors "
                              "--benchmark docvqa_val --data DocVQA/validation-00000-of-00006.parquet")
    p.add_argument("--model", default="tiny-trained", help=MODEL_HELP + " (default: tiny-trained)")
    p.add_argument("--selector", default=None,
                   help="selector for the 'selector' strategy: a train stage hash (prefix) or a .safetensors file")
    p.add_argument("--benchmark", default="synthetic-ocr,synthetic-scene",
                   help="comma-separated benchmarks (default: synthetic-ocr,synthetic-scene); real ones: docvqa_val, "
                        "infovqa_val, chartqa, textvqa_val, mmbench_en_dev, ai2d, gqa, mmmu_val, mmstar, scienceqa_img")
    p.add_argument("--data", action="append", default=[], metavar="PATH|NAME=PATH",
                   help="lmms-lab parquet file or directory of a real benchmark; NAME=PATH when giving several")
    p.add_argument("--strategies", default=None,
                   help="comma-separated from full,none,random,selector,attention,diversity (default: all; "
                        "selector only with --selector)")
    p.add_argument("--retentions", default="0.1,0.25,0.5,0.75", help="comma-separated (default: 0.1,0.25,0.5,0.75)")
    p.add_argument("--budget", default="per-crop", choices=["per-crop", "global"],
                   help="per-crop: k = round(r*L) in every crop; global: r * all encoder tokens of the image")
    p.add_argument("--limit", type=int, default=300, help="questions per benchmark (default: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call (default: 16)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the random strategy (default: 3)")
    add_dask_options(p)

    from .mask import add_parser as add_mask_parser

    add_mask_parser(sub, common, MODEL_HELP)

    from .bench import add_parser as add_bench_parser

    add_run_parsers(sub, common)
    add_bench_parser(sub, common, MODEL_HELP)

    p = sub.add_parser("query", parents=[common], help="run a read-only SQL query on the results store",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Open $ATR_HOME/results.duckdb read-only and print the result. Tables: runs, "
                                   "stage_runs, selector_metrics, eval_scores, eval_samples, bench_results. "
                                   "Only one SELECT runs: DuckDB itself refuses writes, SET, ATTACH, COPY, "
                                   "INSTALL/LOAD and reading other files. While a run is writing, the query "
                                   "waits up to 2 s for the store, then says it is busy.",
                       epilog='example:\n  atr query "SELECT * FROM stage_runs" --csv')
    p.add_argument("sql", help="one SELECT statement")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="interrupt the query after this many seconds (default: 30)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="fmt", action="store_const", const="json", help="print JSON (list of objects)")
    fmt.add_argument("--csv", dest="fmt", action="store_const", const="csv", help="print CSV with a header")

    p = sub.add_parser("clean", parents=[common], help="remove the pipeline home (or only stale .tmp work dirs)",
                       description="Delete $ATR_HOME entirely, or with --tmp only the unfinished .tmp stage "
                                   "directories no running process holds.")
    p.add_argument("--tmp", action="store_true", help="only remove stale .tmp stage directories")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home = getattr(args, "home", None)
    args.verbose = getattr(args, "verbose", False)
    from storage.home import Home

    home = Home.resolve(args.home)
    try:
        if args.command == "query":
            return cmd_query(home, args)
        if args.command == "clean":
            return cmd_clean(home, args)
        from . import runtime

        runtime.configure(home, verbose=args.verbose)
        from .bench import cmd_bench
        from .mask import cmd_mask
        from .run_cmd import cmd_run, cmd_serve

        handler = {"prepare-model": cmd_prepare_model, "extract": cmd_extract, "train": cmd_train,
                   "mask": cmd_mask, "ask": cmd_ask, "benchmark": cmd_benchmark, "eval": cmd_eval,
                   "run": cmd_run, "serve": cmd_serve, "bench": cmd_bench}[args.command]
        return handler(home, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place user errors become one line
        if args.verbose or not _is_user_error(exc):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _is_user_error(exc: BaseException) -> bool:
    from pipeline.config import ConfigError
    from pipeline.presets import ModelLoadError

    names = {"BadImage", "ShardError", "StageError", "QueryError", "CheckpointError", "TrainingDiverged"}
    return isinstance(exc, (UserError, ConfigError, ModelLoadError, FileNotFoundError, ValueError)) or \
        type(exc).__name__ in names


def _one_line(exc: BaseException) -> str:
    from pipeline.config import first_line

    return first_line(exc)


def _tiny_world_overrides(args) -> dict | None:
    """The training config for tiny-trained when --seed/--steps are given (None = the default)."""
    if args.seed is None and args.steps is None:
        return None
    from pipeline.presets import TRAINED_PRESETS
    from pipeline.tinyworld import TinyWorldConfig

    if args.model not in TRAINED_PRESETS:
        raise UserError(f"--seed/--steps train a preset ({', '.join(TRAINED_PRESETS)}); {args.model!r} is not one")
    data = TinyWorldConfig().to_dict()
    if args.seed is not None:
        data["seed"] = args.seed
    if args.steps is not None:
        data["steps"] = args.steps
    return TinyWorldConfig.from_dict(data).to_dict()


def cmd_prepare_model(home, args) -> int:
    from pipeline.presets import TRAINED_PRESETS

    from . import progress
    from .extract import run_prepare_model

    tiny_world = _tiny_world_overrides(args)
    if args.retrain and args.model not in TRAINED_PRESETS:
        raise UserError(f"--retrain applies to trained presets ({', '.join(TRAINED_PRESETS)}), not {args.model!r}")
    _preflight(args.model, tiny_world=tiny_world)
    t0 = time.perf_counter()
    progress.enable(True)
    from prefect import flow

    @flow(name="prepare-model")
    def prepare_model_flow():
        from .records import RunRecorder

        recorder = RunRecorder(home, "prepare-model", {"model": args.model, "retrain": args.retrain,
                                                       "tiny_world": tiny_world})
        try:
            result = run_prepare_model(home, args.model, tiny_world, args.retrain)
            recorder.stage(result, metrics=_quality_metrics(result.manifest.get("quality", [])))
        except BaseException as exc:
            recorder.finish(exc)
            raise
        recorder.finish()
        return result

    result = prepare_model_flow()
    d = result.manifest.get("describe", {})
    print(f"prepare-model {'cached' if result.cached else 'built'}: {result.model_dir}")
    print(f"  key {result.key}  tokens/crop {d.get('tokens_per_crop')}  C {d.get('vision_hidden')}  "
          f"layer {d.get('vision_feature_layer')}  pinpoints {d.get('grid_pinpoints')}  "
          f"({time.perf_counter() - t0:.1f}s)")
    m = result.manifest
    if m.get("source"):
        metrics = m.get("provenance", {}).get("metrics", {})
        how = {"shipped": "copied from the shipped checkpoint", "trained": "trained here"}[m["source"]]
        print(f"  {args.model}: {how}; training took {metrics.get('train_seconds', float('nan')):.0f}s"
              f"{' (when shipped)' if m['source'] == 'shipped' else ''}"
              + (f"; identical to the shipped checkpoint: {m['matches_shipped']}" if "matches_shipped" in m else ""))
        _print_quality(m.get("quality", []))
    if args.export:
        from .stages import export_model

        out = export_model(result.model_dir, args.export)
        print(f"  exported to {out}")
    return 0


def _console():
    """A rich console; when piped (not a terminal) 120 columns wide instead of rich's 80."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _quality_metrics(rows: list[dict]) -> dict[str, float]:
    """MLflow metric names for a quality card: ``<benchmark>.<strategy>.accuracy`` (seed mean)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(f"{r['benchmark']}.{r['strategy']}.accuracy", []).append(r["accuracy"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _print_quality(rows: list[dict]) -> None:
    """Test-split figures: accuracy per benchmark and strategy (random averaged over seeds)."""
    if not rows:
        return
    from rich.table import Table

    table = Table(title="tiny world, test splits")
    for col in ("benchmark", "strategy", "retention", "accuracy", "vs full", "chance", "tokens"):
        table.add_column(col, justify="left" if col in ("benchmark", "strategy") else "right")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["strategy"], r["retention"]), []).append(r)
    full = {b: g[0]["accuracy"] for (b, s, _), g in groups.items() if s == "full"}
    for (bench, strategy, retention), g in groups.items():
        acc = sum(r["accuracy"] for r in g) / len(g)
        rel = acc / full[bench] if full.get(bench) else float("nan")
        name = strategy if len(g) == 1 else f"{strategy} x{len(g)} seeds"
        table.add_row(bench, name, f"{retention:g}", f"{acc:.3f}", f"{rel:.2f}",
                      f"{g[0]['chance']:.3f}", f"{sum(r['mean_visual_tokens'] for r in g) / len(g):.1f}")
    _console().print(table)
    print("  (accuracy: exact match on the test splits; random: mean over seeds; tokens: mean visual tokens "
          "the LM saw)")


def cmd_ask(home, args) -> int:
    from pipeline.images import decode_image

    from .stages import cached_model

    _preflight(args.model)
    image = decode_image(args.image)  # BadImage: one line naming the file
    if not args.question.strip():
        raise UserError("--question is empty")
    from .stages import prepare_model

    # A plain stage call, not a Prefect flow: asking is not a pipeline run, and it
    # saves starting Prefect's temporary server. The model stage is still cached.
    result = prepare_model(home, args.model)
    model, processor = cached_model(str(result.model_dir))
    from pipeline.tinyworld import ask

    print(ask(model, processor, [image], [args.question], max_new_tokens=args.max_new_tokens)[0])
    return 0


def _parse_data(values: list[str], benchmarks: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in benchmarks:
            out[name] = path
        else:
            real = [b for b in benchmarks if not b.startswith("synthetic-")]
            if len(real) != 1:
                raise UserError(f"--data {v}: say which benchmark it is for (--data NAME=PATH)")
            out[real[0]] = v
    return out


def cmd_eval(home, args) -> int:
    from pipeline.config import ConfigError
    from pipeline.evaluate import EvalConfig

    from . import progress
    from .evaluate import eval_flow

    benchmarks = tuple(b.strip() for b in args.benchmark.split(",") if b.strip())
    if args.strategies:
        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    else:
        strategies = ("full", "none", "random", *(("selector",) if args.selector else ()), "attention", "diversity")
    try:
        retentions = tuple(float(r) for r in args.retentions.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"--retentions must be numbers like 0.1,0.25, got {args.retentions!r}") from None
    cfg = EvalConfig(benchmarks=benchmarks, strategies=strategies, retentions=retentions, budget=args.budget,
                     seeds=args.seeds, limit=args.limit, batch_size=args.batch_size)
    data = _parse_data(args.data, benchmarks)
    if "selector" in strategies and not args.selector:
        raise UserError("strategy 'selector' needs --selector (a train stage hash or a .safetensors checkpoint)")
    from .evaluate import data_files

    for bench in benchmarks:
        if not bench.startswith("synthetic-") or bench in data:
            data_files(bench, data, home, cfg.limit)  # one line now, not a failed flow later
    _preflight(args.model)
    progress.enable(True)
    t0 = time.perf_counter()
    out = _on_dask(eval_flow, args)(str(home.root), args.model, cfg.to_dict(), args.selector, data)
    _print_eval(out["summary"])
    print(f"  report  {out['report']}  ({time.perf_counter() - t0:.1f}s)")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0


def _print_eval(summary: list[dict]) -> None:
    from rich.table import Table

    from .evaluate import eval_table

    rows = eval_table(summary)
    table = Table(title="pruned evaluation")
    for col in ("benchmark", "strategy", "retention", "metric", "score", "vs full", "tokens", "prefill ms", "cached"):
        table.add_column(col, justify="left" if col in ("benchmark", "strategy", "metric") else "right")
    for r in rows:
        name = r["strategy"] + (f" x{r['seeds']}" if r["seeds"] > 1 else "")
        table.add_row(r["benchmark"], name, f"{r['retention']:g}", r["metric"], f"{r['score']:.3f}",
                      "" if r["rel"] is None else f"{r['rel']:.2f}", f"{r['visual_tokens']:.1f}",
                      f"{r['prefill_ms']:.1f}", "yes" if r["cached"] else "")
    _console().print(table)
    rel: dict[tuple, list[float]] = {}
    for r in rows:
        if r["strategy"] not in ("full", "none") and r["rel"] is not None:
            rel.setdefault((r["strategy"], r["retention"]), []).append(r["rel"])
    if rel:
        print("  Rel. (mean over benchmarks of pruned/full): " + ", ".join(
            f"{s}@{ret:g} {sum(v) / len(v):.2f}" for (s, ret), v in sorted(rel.items())))


def cmd_benchmark(home, args) -> int:
    from .stages import synthetic_benchmark

    path = synthetic_benchmark(home, args.name, args.split, args.n, args.seed)
    if args.out:
        import shutil
        from pathlib import Path

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        path = out
    print(f"{args.name} {args.split}: {args.n} questions -> {path}")
    return 0


def cmd_extract(home, args) -> int:
    from pipeline.config import ExtractConfig

    from . import progress
    from .extract import extract_flow

    cfg = ExtractConfig(images=args.images, limit=args.limit or None, seed=args.seed, crops=args.crops,
                        batch_size=args.batch_size, shard_size=args.shard_size)
    _preflight(args.model, cfg.images, cfg.seed)
    t0 = time.perf_counter()
    progress.enable(True)
    out = _on_dask(extract_flow, args)(str(home.root), args.model, cfg.to_dict())
    wall = time.perf_counter() - t0
    ext = out["stages"][-1]
    m = ext["manifest"]
    c = m["counts"]
    f = m["features"]
    state = "cached" if ext["cached"] else "computed"
    rate = m.get("images_per_second")
    print(f"extract {state} in {ext['seconds']:.2f}s (wall {wall:.1f}s): {c['samples']} samples in "
          f"{c['shards']} shards, {c['skipped']} skipped; features {f['dtype']} (crops, {f['tokens_per_crop']}, "
          f"{f['feature_dim']})" + (f"; {rate:.1f} images/s" if rate and not ext["cached"] else ""))
    print(f"  output  {ext['path']}")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0


def _on_dask(flow, args):
    """``flow`` on a DaskTaskRunner when --dask-address / --dask-workers was given (see flows/scale.py)."""
    from .scale import task_runner

    runner = task_runner(args.dask_address, args.dask_workers)
    return flow if runner is None else flow.with_options(task_runner=runner)


def parse_retentions(text: str) -> tuple[float, ...]:
    from pipeline.config import ConfigError

    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--retention must be numbers separated by commas, got {text!r}") from None
    for v in values:
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"retention must be in (0, 1], got {v:g}")
    if not values:
        raise ConfigError("--retention is empty")
    return values


def cmd_train(home, args) -> int:
    from pipeline.config import ExtractConfig
    from pipeline.selector import SelectorConfig
    from pipeline.train import TrainConfig

    from . import progress
    from .train import train_flow

    user = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps}
    user_set = {k for k, v in user.items() if v is not None}
    selector = SelectorConfig(seed=args.seed, **{k: v for k, v in user.items() if v is not None})
    cfg = TrainConfig(selector=selector, retentions=parse_retentions(args.retention),
                      held_out_percent=args.held_out_percent, checkpoint_every=args.checkpoint_every)
    extract = None
    if args.features is None:
        ext = ExtractConfig(images=args.images, limit=args.limit or None, crops=args.crops)
        _preflight(args.model, ext.images, ext.seed)
        extract = ext.to_dict()
    else:
        from storage.stages import find_stage

        find_stage(home, "extract", args.features)
    progress.enable(True)
    t0 = time.perf_counter()
    out = train_flow(str(home.root), cfg.to_dict(), features=args.features, model=args.model, extract=extract,
                     user_set=sorted(user_set))
    m = out["manifest"]
    print(f"train {'cached' if out['cached'] else 'computed'} in {out['seconds']:.1f}s "
          f"(wall {time.perf_counter() - t0:.1f}s), eval mode {m['eval_mode']}, "
          f"{m['held_out_crops']} held-out crops")
    _print_selector_table(m["selector_metrics"])
    print(f"  output  {out['path']}")
    print(f"  plot    {out['report']}/selector_metrics.png")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0


def _print_selector_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="held-out: selector vs random (3 seeds) vs uniform grid")
    for col in ("retention", "strategy", "recon MSE", "glyph coverage"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for r in sorted(rows, key=lambda r: (r["retention"], r["strategy"])):
        cov = r["glyph_coverage"]
        table.add_row(f"{r['retention']:g}", r["strategy"], f"{r['recon_mse']:.4f}",
                      "n/a" if cov != cov else f"{cov:.3f}")
    _console().print(table)


def _preflight(model: str, images: str | None = None, seed: int = 0, tiny_world: dict | None = None) -> None:
    """Check user inputs before any flow starts, so mistakes end in one line, not a flow failure."""
    from .stages import model_spec

    model_spec(model, tiny_world)
    if images is not None:
        from pipeline.images import open_source

        open_source(images, seed=seed)


def cmd_query(home, args) -> int:
    from storage.results import format_rows, query

    columns, rows = query(home.results_db, args.sql, timeout=args.timeout)
    sys.stdout.write(format_rows(columns, rows, args.fmt or "table"))
    return 0


def cmd_clean(home, args) -> int:
    import shutil

    from storage.stages import clean_tmp

    if args.tmp:
        removed = clean_tmp(home)
        print(f"removed {len(removed)} stale .tmp stage directories")
        return 0
    if not home.root.exists():
        print(f"nothing to clean: {home.root} does not exist")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to delete {home.root} without --yes (no terminal to ask)")
        if input(f"delete {home.root} and everything in it? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    shutil.rmtree(home.root)
    print(f"removed {home.root}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
