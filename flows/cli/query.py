"""``atr query``: one read-only SQL query on the results store."""

from __future__ import annotations

import sys

from .common import add_command


def query_parser(sub, common) -> None:
    p = add_command(
        sub, common, "query",
        help="run a read-only SQL query on the results store",
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


def cmd_query(home, args) -> int:
    from storage.results import format_rows, query

    columns, rows = query(home.results_db, args.sql, timeout=args.timeout)
    sys.stdout.write(format_rows(columns, rows, args.fmt or "table"))
    return 0
