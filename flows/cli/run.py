"""``atr run``: the whole pipeline as one Prefect flow (prepare-model -> extract -> train -> eval -> report)."""

from __future__ import annotations

import sys
import time

from ..stages import STAGES
from .common import add_command, add_dask_options, preflight


def run_parser(sub, common) -> None:
    p = add_command(
        sub, common, "run",
        help="the end-to-end pipeline: prepare-model, extract, train, eval, report",
        description="Run every stage as one Prefect flow: prepare the model, extract selector-training "
                    "features, train the selector, evaluate pruned inference on the benchmarks with every "
                    "strategy, and write a report. With no arguments: tiny-trained, 2048 synthetic document "
                    "images (base crops), one selector at p = 0.25, both synthetic benchmarks, all strategies "
                    "at retentions 0.1, 0.25, 0.5 and 0.75. Every stage is cached by content hash: an identical "
                    "second run does no model work.",
        epilog="examples:\n"
               "  atr run                                   # the embedded default, end to end\n"
               "  atr run --print-config > run.toml         # every stage's settings, commented\n"
               "  atr run --config run.toml --from train    # retrain the selector, re-evaluate, reuse features\n"
               "  atr run --dask-workers 2                  # shards and eval chunks on a local Dask cluster\n"
               "  atr run --dask-address tcp://10.0.0.5:8786  # ... or on an existing one")
    p.add_argument("--config", metavar="RUN.TOML", default=None,
                   help="TOML file with any of: model, [extract], [train], [train.selector], [eval], [data] "
                        "(see --print-config); unknown keys are refused. [eval.options] takes a table per strategy, "
                        "or a list of tables for variants side by side: selector = [{}, {allocation = \"image\"}]")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", choices=STAGES, default=None,
                   help=f"recompute STAGE and every stage after it ({', '.join(STAGES)}); earlier stages are "
                        "reused from the cache")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration (the defaults, or --config's values) as TOML and exit")
    add_dask_options(p)



def cmd_run(home, args) -> int:
    from pipeline.run_config import load_run_config, run_config_toml

    from ..orchestration.dask import cluster_device, task_runner
    from ..orchestration.flows import run_flow
    from ..present import progress
    from ..present.report import stage_summary
    from ..present.tables import print_eval, print_eval_figures, print_stages
    from ..stages.eval import data_files

    cfg, user_set = load_run_config(args.config)
    if args.print_config:
        sys.stdout.write(run_config_toml(cfg))
        return 0
    # bad options (and more local workers than GPUs): one line before any flow starts
    task_runner(args.dask_address, args.dask_workers, cluster_device(cfg.extract.device, cfg.eval.device))
    for model in cfg.models:
        preflight(model, cfg.extract.images, cfg.extract.seed)
    for bench in cfg.eval.benchmarks:
        if bench in cfg.data:
            data_files(bench, dict(cfg.data), home, cfg.eval.limit)
    progress.enable(True)
    t0 = time.perf_counter()
    out = run_flow(str(home.root), cfg.to_dict(), args.from_stage, user_set, args.dask_address, args.dask_workers)
    several = len(out["summaries"]) > 1
    for model, summary in out["summaries"].items():
        print_eval(summary, title=f"pruned evaluation: {model}" if several else None)
    print_stages(stage_summary(out["stages"]))
    for model, figures in (out["eval_figures"].items() if several else [(None, out.get("eval_figures"))]):
        print_eval_figures(figures)
    print(f"  report  {out['report']}/summary.md  ({time.perf_counter() - t0:.1f}s)")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0
