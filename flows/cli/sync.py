"""``atr sync``: replay to MLflow what was recorded while the tracking server was down."""

from __future__ import annotations

from .common import add_command


def sync_parser(sub, common) -> None:
    add_command(
        sub, common, "sync",
        help="replay runs recorded while MLflow was unreachable to the tracking server",
        description="When the MLflow tracking server does not answer, every command still completes: it records "
                    "to DuckDB, warns once, and spools its MLflow calls under $ATR_HOME/mlflow-spool/. "
                    "`atr sync` plays the spool against $MLFLOW_TRACKING_URI in the order the calls were made "
                    "(runs, params, metrics, artifacts, parent/child structure) and points the DuckDB runs at the "
                    "real MLflow run ids. An interrupted sync resumes; a second one changes nothing.",
        epilog="example:\n  MLFLOW_TRACKING_URI=http://localhost:5000 atr sync")


def cmd_sync(home, args) -> int:
    from storage.results import ResultsStore, query
    from storage.tracking import OFFLINE_PREFIX, pending, replay, tracking_uri

    files = pending(home.root)
    if not files:
        print(f"nothing to sync: every run in {home.root} is on MLflow ({tracking_uri(home.root)})")
        return 0
    store = ResultsStore(home.results_db)
    updated = {"rows": 0}

    def on_ids(mapping: dict[str, str]) -> None:
        updated["rows"] = store.replace_mlflow_run_ids(mapping)

    got = replay(home.root, on_ids=on_ids)
    _, rows = query(home.results_db, f"SELECT count(*) FROM runs WHERE mlflow_run_id LIKE '{OFFLINE_PREFIX}%'")
    left = rows[0][0]
    print(f"synced {got['calls']} MLflow calls from {got['files']} spool files to {tracking_uri(home.root)}: "
          f"{got['runs']} runs created, {updated['rows']} DuckDB runs now point at them"
          + (f"; {left} runs still have no MLflow run" if left else ""))
    return 0
