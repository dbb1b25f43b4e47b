"""``atr serve``: the end-to-end run as a scheduled Prefect deployment."""

from __future__ import annotations

import os

from .common import add_command

DEFAULT_CRON = "0 3 * * *"
DEFAULT_DEPLOYMENT = "nightly"


def serve_parser(sub, common) -> None:
    p = add_command(
        sub, common, "serve",
        help="serve the end-to-end run as a scheduled Prefect deployment",
        description="Register the atr-run flow as a Prefect deployment with a cron schedule and the run "
                    "configuration as its parameters, then serve it: this process stays up and executes the "
                    "scheduled runs (and runs started from the Prefect UI). It needs a Prefect server: set "
                    "PREFECT_API_URL (the docker-compose stack provides one at http://localhost:4200/api).",
        epilog="examples:\n"
               "  PREFECT_API_URL=http://localhost:4200/api atr serve --cron \"0 3 * * *\" --config run.toml\n"
               "  atr serve --name hourly --cron \"0 * * * *\"")
    p.add_argument("--cron", default=DEFAULT_CRON,
                   help=f"schedule in cron syntax, UTC (default: \"{DEFAULT_CRON}\", daily at 03:00)")
    p.add_argument("--config", metavar="RUN.TOML", default=None, help="run configuration (default: the defaults)")
    p.add_argument("--name", default=DEFAULT_DEPLOYMENT, help=f"deployment name (default: {DEFAULT_DEPLOYMENT})")
    p.add_argument("--dask-address", metavar="ADDR", default=None,
                   help="scheduled runs map shards and eval chunks over this Dask scheduler")




def cmd_serve(home, args) -> int:
    from pipeline.config import ConfigError
    from pipeline.run_config import load_run_config

    from ..orchestration.flows import build_deployment

    cfg, user_set = load_run_config(args.config)
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
