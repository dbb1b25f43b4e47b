"""The ``atr`` command line: one module per command, this one builds the parser and runs it.

Every subcommand takes ``--home DIR`` (or ``$ATR_HOME``, default ``./.atr``).
Errors a user can cause (``pipeline.errors.UserError``) end in one
``error: ...`` line and exit code 2. Anything else is a bug in atr: its
traceback is printed with a one-line request to report it, exit code 1.
``--verbose`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from pipeline.errors import UserError

from .ask import ask_parser, cmd_ask
from .benchmark import benchmark_parser, cmd_benchmark
from .clean import clean_parser, cmd_clean
from .eval import cmd_eval, eval_parser
from .extract import cmd_extract, extract_parser
from .mask import cmd_mask, mask_parser
from .prepare_model import cmd_prepare_model, prepare_model_parser
from .query import cmd_query, query_parser
from .run import cmd_run, run_parser
from .serve import cmd_serve, serve_parser
from .speed import cmd_speed, speed_parser
from .sync import cmd_sync, sync_parser
from .train import cmd_train, train_parser
from .train_visionselector import cmd_train_visionselector, train_visionselector_parser

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

BUG_HINT = ("atr: this is a bug in atr, not a mistake in your input. Please report it with the traceback above "
            "and the command you ran.")

# (parser builder, handler) per command, in the order `atr --help` lists them.
COMMANDS = {
    "prepare-model": (prepare_model_parser, cmd_prepare_model),
    "ask": (ask_parser, cmd_ask),
    "benchmark": (benchmark_parser, cmd_benchmark),
    "extract": (extract_parser, cmd_extract),
    "train": (train_parser, cmd_train),
    "train-visionselector": (train_visionselector_parser, cmd_train_visionselector),
    "eval": (eval_parser, cmd_eval),
    "mask": (mask_parser, cmd_mask),
    "run": (run_parser, cmd_run),
    "serve": (serve_parser, cmd_serve),
    "speed": (speed_parser, cmd_speed),
    "query": (query_parser, cmd_query),
    "sync": (sync_parser, cmd_sync),
    "clean": (clean_parser, cmd_clean),
}
# Old command names, accepted for one release: old -> new. The new command's parser lists the old
# name in its aliases; running it prints one note on stderr, then runs the new command.
RENAMED = {"bench": "speed"}
NO_RUNTIME = ("query", "clean")  # commands that load neither Prefect nor torch
FLOW_COMMANDS = ("prepare-model", "extract", "train", "eval", "run")  # commands that run a Prefect flow


class VersionAction(argparse.Action):
    """``--version``: one line, read from the installed packages' metadata (torch itself is not imported)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """``atr 0.1.0 (torch 2.13.0+cpu, transformers 5.25.0)``: the versions pip installed."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"atr {installed('atr')} (torch {installed('torch')}, transformers {installed('transformers')})"


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
    parser.add_argument("--version", action=VersionAction,
                        help="print atr's version with the installed torch and transformers, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.home = getattr(args, "home", None)
    args.verbose = getattr(args, "verbose", False)
    if args.command in RENAMED:
        old, args.command = args.command, RENAMED[args.command]
        print(f"note: `atr {old}` is now `atr {args.command}`; the old name goes in the next release",
              file=sys.stderr)
    from storage.home import Home

    home = Home.resolve(args.home)
    try:
        if args.command not in NO_RUNTIME:
            from .. import runtime

            runtime.configure(home, verbose=args.verbose)
            if args.command in FLOW_COMMANDS + ("serve",) and os.environ.get("PREFECT_API_URL"):
                runtime.check_prefect_server(os.environ["PREFECT_API_URL"])
        rc = COMMANDS[args.command][1](home, args)
        if args.command in FLOW_COMMANDS:
            from ..orchestration.flows import settle_local_server

            settle_local_server()
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # the one place user errors become one line
        if args.verbose:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: keep the traceback, say so
        traceback.print_exc()
        print(BUG_HINT, file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The message printed after ``error:``."""
    from pipeline.config import first_line

    return first_line(exc)

