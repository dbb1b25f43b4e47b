"""DuckDB results store: run bookkeeping and every metric the pipeline produces.

The store is one DuckDB file. A connection is opened per operation and closed
right after, so several processes can share the file: writers that find it
locked retry with backoff (up to ``WRITE_LOCK_TIMEOUT_S``), and `query` opens it
read-only for user SQL. All timestamps are naive UTC.

User SQL (``query``) is confined by DuckDB itself, not by string filtering:
the file is opened ``read_only`` with ``enable_external_access`` off (no files,
no network, no ATTACH/COPY/INSTALL/LOAD of extensions), extension autoloading
off and ``lock_configuration`` on (no SET). On top of that only a single
SELECT statement is accepted, and a timer interrupts a query that runs past
its timeout (DuckDB has no statement timeout of its own).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.config import first_line

# A writer waits longer for the lock than a user query may run (QUERY_TIMEOUT_S),
# so `atr query` during a run can never make that run fail to record its rows.
WRITE_LOCK_TIMEOUT_S = 120.0
QUERY_LOCK_TIMEOUT_S = 2.0
QUERY_TIMEOUT_S = 30.0
# What DuckDB itself enforces on a user query's connection.
READ_ONLY_CONFIG = {
    "enable_external_access": False,  # no file or network access: read_csv/read_text, COPY, ATTACH, INSTALL
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,  # SET / PRAGMA cannot change the above
}
RUN_STATUSES = ("running", "completed", "failed")

_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "DOUBLE": pa.float64(),
    "INTEGER": pa.int32(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us"),
}


class QueryError(UserError):
    """A user query was refused or failed; the message is one line."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    comment: str
    default: Any = None  # a key column's value when a row leaves it out (the DDL's DEFAULT too): str, float, bool


@dataclass(frozen=True)
class Table:
    """Schema of one table. `key` identifies a row for upserts; it is declared
    as PRIMARY KEY unless one of its columns may be NULL (`primary_key=False`)."""

    name: str
    comment: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    primary_key: bool = True
    check: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def ddl(self) -> str:
        parts = [f'"{c.name}" {c.type}' + ("" if c.default is None else f" DEFAULT {_sql_value(c.default)}")
                 for c in self.columns]
        if self.primary_key:
            parts.append(f"PRIMARY KEY ({', '.join(self.key)})")
        if self.check:
            parts.append(f"CHECK ({self.check})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n  " + ",\n  ".join(parts) + "\n)"


_RUN_ID = Column("run_id", "VARCHAR", "Pipeline run id (runs.run_id)")
_RETENTION = Column("retention", "DOUBLE", "Fraction of visual tokens kept (0-1]")
_STRATEGY = Column("strategy", "VARCHAR", "Token-selection strategy name")
_SEED = Column("seed", "INTEGER", "Random seed of the evaluation")
_BUDGET = Column("budget", "VARCHAR", "Budget mode: per-crop (k per crop), global (K per image) or stock "
                                      "(K = retention x the stock model's tokens of the image), or threshold "
                                      "(adaptive: the tokens whose keep probability reaches `threshold`, retention "
                                      "is the cap)", default="per-crop")
_VARIANT = Column("variant", "VARCHAR", "The strategy's options that differ from its defaults, as k=v,k=v in name "
                                        "order (e.g. allocation=image); '' for the defaults", default="")
_THRESHOLD = Column("threshold", "DOUBLE", "The threshold budget's keep-probability threshold (0: a fixed budget); "
                                           "the floor is in the run's config", default=0.0)
_INTERPOLATION = Column("interpolation", "BOOLEAN", "LLaVA-OneVision's grid interpolation was on (--interpolation "
                                                    "on: full/none only); false: off, the default",
                        default=False)

TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "runs",
            "One row per pipeline (flow) run",
            (
                Column("run_id", "VARCHAR", "Pipeline run id"),
                Column("flow", "VARCHAR", "Flow that ran (e.g. train, eval, bench)"),
                Column("status", "VARCHAR", "running, completed or failed"),
                Column("started_at", "TIMESTAMP", "Start time (UTC)"),
                Column("finished_at", "TIMESTAMP", "End time (UTC); NULL while running"),
                Column("config_hash", "VARCHAR", "Hash of the resolved run configuration"),
                Column("mlflow_run_id", "VARCHAR", "Matching MLflow run id, if tracked"),
                Column("config_json", "VARCHAR", "Resolved run configuration as JSON"),
                Column("error", "VARCHAR", "Error message of a failed run"),
            ),
            key=("run_id",),
            check=f"status IN {RUN_STATUSES}",
        ),
        Table(
            "stage_runs",
            "One row per stage executed (or served from cache) within a run",
            (
                _RUN_ID,
                Column("stage", "VARCHAR", "Stage name"),
                Column("cache_key", "VARCHAR", "Content hash identifying the stage output"),
                Column("cached", "BOOLEAN", "True if the output was reused from cache"),
                Column("seconds", "DOUBLE", "Wall-clock seconds the stage took"),
                Column("output_dir", "VARCHAR", "Directory holding the stage output"),
                Column("started_at", "TIMESTAMP", "Stage start time (UTC)"),
                Column("counts_json", "VARCHAR", "Stage item counts as JSON"),
            ),
            key=("run_id", "stage", "cache_key"),
        ),
        Table(
            "selector_metrics",
            "Offline quality of a token selector checkpoint per retention level",
            (
                _RUN_ID,
                Column("checkpoint", "VARCHAR", "Selector checkpoint evaluated"),
                Column("split", "VARCHAR", "Data split the metrics were computed on"),
                _STRATEGY,
                _RETENTION,
                Column("recon_mse", "DOUBLE", "Feature reconstruction MSE from kept tokens"),
                Column("glyph_coverage", "DOUBLE", "Fraction of text-glyph patches kept"),
            ),
            key=("run_id", "checkpoint", "split", "strategy", "retention"),
        ),
        Table(
            "eval_scores",
            "Aggregate benchmark score per model, strategy, retention and seed",
            (
                _RUN_ID,
                Column("model", "VARCHAR", "Evaluated model id"),
                Column("benchmark", "VARCHAR", "Benchmark name"),
                _STRATEGY,
                _RETENTION,
                _SEED,
                Column("metric", "VARCHAR", "Metric name (e.g. accuracy, anls)"),
                Column("score", "DOUBLE", "Metric value"),
                Column("n_samples", "INTEGER", "Number of samples scored"),
                Column("mean_visual_tokens", "DOUBLE", "Mean visual tokens fed to the LLM"),
                Column("prefill_ms", "DOUBLE", "Mean prefill latency in milliseconds"),
                _BUDGET,
                Column("stock_visual_tokens", "DOUBLE", "Mean visual tokens the stock model (the unpruned checkpoint "
                                                       "with its own settings) sends for the same images; NULL: "
                                                       "no image sent, or recorded before atr counted it"),
                Column("tokens_vs_stock", "DOUBLE", "mean_visual_tokens / stock_visual_tokens: above 1 the pruned "
                                                    "context costs more than the stock model"),
                _VARIANT,
                _THRESHOLD,
                _INTERPOLATION,
            ),
            key=("run_id", "model", "benchmark", "strategy", "retention", "seed", "metric", "budget", "variant",
                 "threshold", "interpolation"),
        ),
        Table(
            "eval_samples",
            "Per-sample predictions and scores of an evaluation",
            (
                _RUN_ID,
                Column("model", "VARCHAR", "Evaluated model id (a run may evaluate several)"),
                Column("benchmark", "VARCHAR", "Benchmark name"),
                Column("sample_id", "VARCHAR", "Sample id within the benchmark"),
                _STRATEGY,
                _RETENTION,
                _SEED,
                Column("prediction", "VARCHAR", "Model output"),
                Column("answer", "VARCHAR", "Reference answer(s)"),
                Column("score", "DOUBLE", "Per-sample score"),
                _BUDGET,
                Column("visual_tokens", "INTEGER", "Visual tokens the LLM saw for this sample (kept tokens, kept "
                                                   "row newlines, extra tokens); NULL: not recorded"),
                Column("stock_visual_tokens", "INTEGER", "Visual tokens the stock model sends for this sample's "
                                                         "images; NULL: no image sent, or not recorded"),
                _VARIANT,
                _THRESHOLD,
                _INTERPOLATION,
            ),
            key=("run_id", "model", "benchmark", "sample_id", "strategy", "retention", "seed", "budget", "variant",
                 "threshold", "interpolation"),
        ),
        Table(
            "bench_results",
            "Micro-benchmark measurements (speedups, latencies, memory)",
            (
                _RUN_ID,
                Column("name", "VARCHAR", "Benchmark measurement name"),
                Column("retention", "DOUBLE", "Fraction of visual tokens kept; NULL if n/a"),
                Column("measured_speedup", "DOUBLE", "Measured speedup over full tokens"),
                Column("ideal_speedup", "DOUBLE", "Speedup predicted from token counts"),
                Column("value", "DOUBLE", "Raw measured value"),
                Column("unit", "VARCHAR", "Unit of value"),
            ),
            key=("run_id", "name", "retention"),
            primary_key=False,  # retention may be NULL
        ),
        Table(
            "stage_metrics",
            "Per-stage figures of a run (eval: images, tower_passes, shards, skipped, padding_share, ...)",
            (
                _RUN_ID,
                Column("stage", "VARCHAR", "Stage name (e.g. eval)"),
                Column("name", "VARCHAR", "Figure name"),
                Column("value", "DOUBLE", "Figure value"),
            ),
            key=("run_id", "stage", "name"),
        ),
    )
}


def _utc_naive(ts: datetime | None = None) -> datetime:
    """`ts` (default: now) as naive UTC; naive inputs are taken as UTC already."""
    if ts is None:
        ts = datetime.now(timezone.utc)
    return ts.astimezone(timezone.utc).replace(tzinfo=None) if ts.tzinfo else ts


def _is_lock_error(err: duckdb.Error) -> bool:
    return isinstance(err, duckdb.IOException) and "Could not set lock" in str(err)


def _connect(path: Path, timeout: float, **kwargs: Any) -> duckdb.DuckDBPyConnection:
    """Open `path`, retrying with jittered backoff while another process holds its lock."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), **kwargs)
        except duckdb.IOException as err:
            if not _is_lock_error(err) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 0.5)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_value(value: Any) -> str:
    """A column default as SQL: a quoted string, true/false, or a number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return _sql_literal(str(value))


# How a column added by a later schema is filled in rows an older atr wrote (default: NULL).
# A key column cannot be NULL: a run with no eval_scores row gets 'unknown'.
# The budget of an older row is its run's: the eval config in runs.config_json (one budget per run then).
_RUN_BUDGET = ("coalesce((SELECT json_extract_string(r.config_json, '$.eval.budget') FROM runs r "
               "WHERE r.run_id = old.run_id), 'per-crop')")
# variant and threshold did not exist before: every older row is a default variant under a fixed budget; its
# interpolation is its run's (the eval config in runs.config_json), false where the run does not say.
_RUN_INTERPOLATION = ("coalesce((SELECT TRY_CAST(json_extract_string(r.config_json, '$.eval.interpolation') AS BOOLEAN) "
                      "FROM runs r WHERE r.run_id = old.run_id), false)")
_BACKFILL = {("eval_samples", "model"):
             "coalesce((SELECT any_value(s.model) FROM eval_scores s WHERE s.run_id = old.run_id), 'unknown')",
             ("eval_samples", "budget"): _RUN_BUDGET, ("eval_scores", "budget"): _RUN_BUDGET,
             ("eval_scores", "tokens_vs_stock"): "NULL",
             **{(t, "variant"): "''" for t in ("eval_scores", "eval_samples")},
             **{(t, "threshold"): "0.0" for t in ("eval_scores", "eval_samples")},
             **{(t, "interpolation"): _RUN_INTERPOLATION for t in ("eval_scores", "eval_samples")}}


def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> tuple[str, ...]:
    rows = conn.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index",
                        [table]).fetchall()
    return tuple(r[0] for r in rows)


def _migrate(conn: duckdb.DuckDBPyConnection, table: Table) -> None:
    """Rebuild ``table`` in the current schema (inside the caller's transaction): columns it lacks are
    backfilled (``_BACKFILL``) or NULL, and the primary key is the new one (DuckDB cannot alter one).
    Only added columns are supported: a column the schema dropped is refused, not lost."""
    old = _columns(conn, table.name)
    dropped = [c for c in old if c not in table.column_names]
    if dropped:
        raise RuntimeError(f"results table {table.name} has columns {dropped} this atr does not know; "
                           f"it was written by a newer atr")
    conn.execute(f"ALTER TABLE {table.name} RENAME TO {table.name}__old")
    conn.execute(table.ddl())
    select = ", ".join(f'old."{c}"' if c in old else _BACKFILL.get((table.name, c), "NULL")
                       for c in table.column_names)
    conn.execute(f"INSERT INTO {table.name} SELECT {select} FROM {table.name}__old AS old")
    conn.execute(f"DROP TABLE {table.name}__old")
    conn.execute(f"COMMENT ON TABLE {table.name} IS {_sql_literal(table.comment)}")
    for col in table.columns:
        conn.execute(f'COMMENT ON COLUMN {table.name}."{col.name}" IS {_sql_literal(col.comment)}')


class ResultsStore:
    """Read/write access to the results database at `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write(self._create_schema)

    def _write(self, fn) -> Any:
        """Run `fn(conn)` in one transaction on a fresh connection."""
        with _connect(self.path, WRITE_LOCK_TIMEOUT_S) as conn:
            conn.begin()
            result = fn(conn)
            conn.commit()
            return result

    @staticmethod
    def _create_schema(conn: duckdb.DuckDBPyConnection) -> None:
        existing = {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for table in TABLES.values():
            if table.name in existing:
                if _columns(conn, table.name) == table.column_names:
                    continue
                _migrate(conn, table)  # a store written by an older atr: same rows, new columns
                continue
            conn.execute(table.ddl())
            conn.execute(f"COMMENT ON TABLE {table.name} IS {_sql_literal(table.comment)}")
            for col in table.columns:
                conn.execute(
                    f'COMMENT ON COLUMN {table.name}."{col.name}" IS {_sql_literal(col.comment)}'
                )

    def start_run(
        self,
        run_id: str,
        flow: str,
        config_hash: str,
        config_json: str,
        started_at: datetime | None = None,
    ) -> None:
        """Record a run as running (restarting an existing run id resets it)."""
        row = dict(
            run_id=run_id,
            flow=flow,
            status="running",
            started_at=_utc_naive(started_at),
            finished_at=None,
            config_hash=config_hash,
            config_json=config_json,
            error=None,
        )
        self.insert_rows("runs", [row])

    def finish_run(
        self, run_id: str, status: str, mlflow_run_id: str | None = None, error: str | None = None
    ) -> None:
        """Mark a started run completed or failed; keeps a known mlflow_run_id if none given."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"finish_run status must be 'completed' or 'failed', not {status!r}")

        def update(conn: duckdb.DuckDBPyConnection) -> None:
            updated = conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ?,"
                " mlflow_run_id = coalesce(?, mlflow_run_id) WHERE run_id = ? RETURNING run_id",
                [status, _utc_naive(), error, mlflow_run_id, run_id],
            ).fetchall()
            if not updated:
                raise ValueError(f"unknown run {run_id!r}: call start_run first")

        self._write(update)

    def replace_mlflow_run_ids(self, mapping: dict[str, str]) -> int:
        """Point runs recorded with a stand-in MLflow id (tracking server down) at the real run
        ``atr sync`` created; returns how many rows changed (0 on a second sync)."""
        if not mapping:
            return 0

        def update(conn: duckdb.DuckDBPyConnection) -> int:
            n = 0
            for old, new in mapping.items():
                n += len(conn.execute("UPDATE runs SET mlflow_run_id = ? WHERE mlflow_run_id = ? RETURNING run_id",
                                      [new, old]).fetchall())
            return n

        return self._write(update)

    def record_stage_run(
        self,
        run_id: str,
        stage: str,
        cache_key: str,
        cached: bool,
        seconds: float,
        output_dir: str,
        counts: dict | None = None,
    ) -> None:
        """Upsert one stage execution; started_at is taken as now minus `seconds`."""
        self.record_stage_runs([dict(run_id=run_id, stage=stage, cache_key=cache_key, cached=cached,
                                     seconds=seconds, output_dir=output_dir, counts=counts)])

    def record_stage_runs(self, stages: list[dict]) -> None:
        """Upsert many stage executions in one write. Each dict holds ``record_stage_run``'s
        arguments (``counts`` optional); started_at is now minus its `seconds`."""
        now = _utc_naive()
        self.insert_rows("stage_runs", [
            dict(run_id=s["run_id"], stage=s["stage"], cache_key=s["cache_key"], cached=s["cached"],
                 seconds=s["seconds"], output_dir=str(s["output_dir"]),
                 started_at=now - timedelta(seconds=s["seconds"]),
                 counts_json=None if s.get("counts") is None else json.dumps(s["counts"], sort_keys=True))
            for s in stages])

    def insert_rows(self, table: str, rows: list[dict]) -> int:
        """Upsert `rows` into `table`, matching on the table's key columns.

        Rows may omit non-key columns (left NULL on insert, untouched on update);
        later rows win over earlier rows with the same key. Returns the number of
        distinct rows written.
        """
        spec = TABLES.get(table)
        if spec is None:
            raise ValueError(f"unknown table {table!r}; known tables: {', '.join(TABLES)}")
        defaults = {c.name: c.default for c in spec.columns if c.default is not None and c.name in spec.key}
        if defaults:
            rows = [{**row, **{k: d for k, d in defaults.items() if row.get(k) is None}} for row in rows]
        columns = list(dict.fromkeys(name for row in rows for name in row))
        for name in columns:
            if name not in spec.column_names:
                raise ValueError(
                    f"unknown column {name!r} for table {table!r}; "
                    f"columns: {', '.join(spec.column_names)}"
                )
        missing = [k for k in spec.key if k not in columns]
        if rows and missing:
            raise ValueError(f"rows for {table!r} lack key column(s): {', '.join(missing)}")
        unique = list({tuple(row.get(k) for k in spec.key): row for row in rows}.values())
        if not unique:
            return 0
        staged = self._arrow_table(spec, columns, unique)
        self._write(lambda conn: self._merge(conn, spec, columns, staged))
        return len(unique)

    @staticmethod
    def _arrow_table(spec: Table, columns: list[str], rows: list[dict]) -> pa.Table:
        types = {c.name: _ARROW_TYPES[c.type] for c in spec.columns}
        arrays = {}
        for name in columns:
            values = [r.get(name) for r in rows]
            values = [_utc_naive(v) if isinstance(v, datetime) else v for v in values]
            try:
                arrays[name] = pa.array(values, type=types[name])
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as err:
                raise ValueError(f"bad value for {spec.name}.{name}: {err}") from err
        return pa.table(arrays)

    @staticmethod
    def _merge(
        conn: duckdb.DuckDBPyConnection, spec: Table, columns: list[str], staged: pa.Table
    ) -> None:
        # MERGE with IS NOT DISTINCT FROM works for tables whose key may hold NULLs.
        conn.register("_atr_staged", staged)
        on = " AND ".join(f't."{k}" IS NOT DISTINCT FROM s."{k}"' for k in spec.key)
        updates = ", ".join(f'"{c}" = s."{c}"' for c in columns if c not in spec.key)
        col_list = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join(f's."{c}"' for c in columns)
        matched = f"WHEN MATCHED THEN UPDATE SET {updates} " if updates else ""
        conn.execute(
            f"MERGE INTO {spec.name} AS t USING _atr_staged AS s ON ({on}) {matched}"
            f"WHEN NOT MATCHED THEN INSERT ({col_list}) VALUES ({values})"
        )
        conn.unregister("_atr_staged")


def open_read_only(path: str | os.PathLike, busy_timeout: float = QUERY_LOCK_TIMEOUT_S) -> duckdb.DuckDBPyConnection:
    """A connection to the store that DuckDB itself keeps read-only and inside the file.

    Raises QueryError (one line) when the store is missing, or busy for longer
    than ``busy_timeout`` seconds (a writer holds its lock)."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"no results store at {path}: run a stage first")
    try:
        return _connect(path, busy_timeout, read_only=True, config=dict(READ_ONLY_CONFIG))
    except duckdb.Error as err:
        if _is_lock_error(err):
            raise QueryError(f"results store busy ({path}): retry in a moment (a run is writing to it)") from None
        raise QueryError(f"cannot open the results store {path}: {first_line(err)}") from None


def query(
    path: str | os.PathLike,
    sql: str,
    *,
    busy_timeout: float = QUERY_LOCK_TIMEOUT_S,
    timeout: float | None = QUERY_TIMEOUT_S,
) -> tuple[list[str], list[tuple]]:
    """Run one read-only SELECT against the store; returns (column names, rows).

    The connection comes from ``open_read_only``; anything but a single SELECT
    is refused before it runs, and a query still running after ``timeout``
    seconds (None: no limit) is interrupted. Every failure is a one-line
    QueryError."""
    if timeout is not None and not timeout > 0:
        raise QueryError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if timeout is not None and timeout > 7 * 24 * 3600:
        timeout = None  # "inf" and the like: no limit (a timer that long cannot be set)
    conn = open_read_only(path, busy_timeout)
    with conn:
        try:
            statements = conn.extract_statements(sql)
        except duckdb.Error as err:
            raise QueryError(first_line(err)) from None
        if not statements:
            raise QueryError("empty query")
        if len(statements) > 1:
            raise QueryError("atr query runs a single statement; remove the extra ';'")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise QueryError(f"atr query is read-only: {kind.name} statements are not allowed")
        timer = threading.Timer(timeout, conn.interrupt) if timeout is not None else None
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            cursor = conn.execute(sql)
            rows = cursor.fetchall()
        except duckdb.InterruptException:
            raise QueryError(f"query interrupted after the {timeout:g} s timeout (raise it with --timeout)") from None
        except duckdb.PermissionException as err:
            raise QueryError(f"atr query cannot reach outside the results store: {first_line(err)}") from None
        except duckdb.Error as err:
            raise QueryError(first_line(err)) from None
        finally:
            if timer is not None:
                timer.cancel()
        return [d[0] for d in cursor.description], rows


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly form of a DuckDB value."""
    if isinstance(value, (datetime, date, dt_time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_rows(columns: list[str], rows: list[tuple], fmt: str, width: int | None = None) -> str:
    """Render query results as "table" (rich), "json" (list of objects) or "csv"."""
    if fmt == "json":
        records = [dict(zip(columns, map(_plain, row))) for row in rows]
        return json.dumps(records, indent=2, default=str)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_plain(v) for v in row] for row in rows)
        return buf.getvalue()
    if fmt == "table":
        from rich.console import Console
        from rich.table import Table as RichTable

        table = RichTable(*columns, caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for row in rows:
            table.add_row(*map(_cell, row))
        console = Console(
            file=io.StringIO(),
            width=width or shutil.get_terminal_size((120, 24)).columns,
            color_system=None,
        )
        console.print(table)
        return console.file.getvalue()
    raise ValueError(f"unknown format {fmt!r}; use table, json or csv")
