"""The ``atr run`` and ``atr serve`` command lines (parsers and handlers).

Kept apart from ``flows.run`` so that building the parser imports neither Prefect
nor torch: the CLI sets PREFECT_HOME and thread counts before either loads.
"""

from __future__ import annotations

import argparse
import sys
import time

from storage.home import Home

STAGES = ("prepare-model", "extract", "train", "eval", "report")  # = flows.run.STAGES (checked by a test)
DEFAULT_CRON = "0 3 * * *"
DEFAULT_DEPLOYMENT = "nightly"


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=80)


def add_parsers(sub, common) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="the end-to-end pipeline: prepare-model, extract, train, eval, report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Run every stage as one Prefect flow: prepare the model, extract selector-training "
                    "features, train the selector, evaluate pruned inference on the benchmarks with every "
                    "strategy, and write a report. With no arguments: tiny-trained, 2048 synthetic document "
                    "images (base crops), one selector at p = 0.25, both synthetic benchmarks, all strategies "
                    "at retentions 0.1, 0.25, 0.5 and 0.75. Every stage is cached by content hash: an identical "
                    "second run does no model work."),
        epilog="examples:\n"
               "  atr run                                   # the embedded default, end to end\n"
               "  atr run --print-config > run.toml         # every stage's settings, commented\n"
               "  atr run --config run.toml --from train    # retrain the selector, re-evaluate, reuse features\n"
               "  atr run --dask-workers 2                  # shards and eval chunks on a local Dask cluster\n"
               "  atr run --dask-address tcp://10.0.0.5:8786  # ... or on an existing one")
    p.add_argument("--config", metavar="RUN.TOML", default=None,
                   help="TOML file with any of: model, [extract], [train], [train.selector], [eval], [data] "
                        "(see --print-config); unknown keys are refused")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", choices=STAGES, default=None,
                   help=f"recompute STAGE and every stage after it ({', '.join(STAGES)}); earlier stages are "
                        "reused from the cache")
    p.add_argument("--print-config", action="store_true",
                   help="print the configuration (the defaults, or --config's values) as TOML and exit")
    add_dask_options(p)

    p = sub.add_parser(
        "serve", parents=[common], help="serve the end-to-end run as a scheduled Prefect deployment",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Register the atr-run flow as a Prefect deployment with a cron schedule and the run "
                    "configuration as its parameters, then serve it: this process stays up and executes the "
                    "scheduled runs (and runs started from the Prefect UI). It needs a Prefect server: set "
                    "PREFECT_API_URL (the docker-compose stack provides one at http://localhost:4200/api)."),
        epilog="examples:\n"
               "  PREFECT_API_URL=http://localhost:4200/api atr serve --cron \"0 3 * * *\" --config run.toml\n"
               "  atr serve --name hourly --cron \"0 * * * *\"")
    p.add_argument("--cron", default=DEFAULT_CRON,
                   help=f"schedule in cron syntax, UTC (default: \"{DEFAULT_CRON}\", daily at 03:00)")
    p.add_argument("--config", metavar="RUN.TOML", default=None, help="run configuration (default: the defaults)")
    p.add_argument("--name", default=DEFAULT_DEPLOYMENT, help=f"deployment name (default: {DEFAULT_DEPLOYMENT})")
    p.add_argument("--dask-address", metavar="ADDR", default=None,
                   help="scheduled runs map shards and eval chunks over this Dask scheduler")


def add_dask_options(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dask-address", metavar="ADDR", default=None,
                   help="map extraction shards and eval chunks over an existing Dask cluster (tcp://HOST:PORT; "
                        "start its workers with OMP_WAIT_POLICY=PASSIVE and one thread per process)")
    g.add_argument("--dask-workers", metavar="N", type=int, default=None,
                   help="... or over a local Dask cluster of N single-threaded worker processes")


def cmd_run(home: Home, args) -> int:
    from . import progress
    from .cli import _console, _preflight, _print_eval
    from .run import config_toml, load_config, run_flow, stage_summary

    cfg, user_set = load_config(args.config)
    if args.print_config:
        sys.stdout.write(config_toml(cfg))
        return 0
    from .scale import task_runner

    task_runner(args.dask_address, args.dask_workers)  # bad options: one line before any flow starts
    _preflight(cfg.model, cfg.extract.images, cfg.extract.seed)
    from .evaluate import data_files

    for bench in cfg.eval.benchmarks:
        if bench in cfg.data:
            data_files(bench, dict(cfg.data), home, cfg.eval.limit)
    progress.enable(True)
    t0 = time.perf_counter()
    out = run_flow(str(home.root), cfg.to_dict(), args.from_stage, user_set, args.dask_address, args.dask_workers)
    _print_eval(out["summary"])
    from rich.table import Table

    table = Table(title="stages")
    for col in ("stage", "key", "cached", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in stage_summary(out["stages"]):
        table.add_row(r["stage"], r["key"], r["cached"], f"{r['seconds']:.1f}")
    _console().print(table)
    print(f"  report  {out['report']}/summary.md  ({time.perf_counter() - t0:.1f}s)")
    print(f"  run     {out['run_id']} (mlflow {out['mlflow_run_id']})")
    return 0


def cmd_serve(home: Home, args) -> int:
    import os

    from pipeline.config import ConfigError

    from .run import build_deployment, load_config

    cfg, user_set = load_config(args.config)
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ConfigError("atr serve needs a Prefect server: set PREFECT_API_URL (e.g. "
                              "http://localhost:4200/api from `docker compose up`, or `prefect server start`)")
    deployment = build_deployment(home, cfg, user_set, args.cron, args.name, args.dask_address)
    from prefect import serve

    print(f"serving deployment atr-run/{args.name} on cron \"{args.cron}\" (UTC); home {home.root}; "
          "Ctrl-C stops", flush=True)
    serve(deployment, print_starting_message=False)
    return 0
