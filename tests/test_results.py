"""Tests for the DuckDB results store (real DuckDB files, real processes)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
from datetime import datetime

import duckdb
import pytest

from storage.results import TABLES, QueryError, ResultsStore, format_rows, query


@pytest.fixture
def store(tmp_path):
    return ResultsStore(tmp_path / "db" / "results.duckdb")


def _rows(store, sql):
    return query(store.path, sql)[1]


def test_schema_has_all_tables_with_comments(store):
    with duckdb.connect(str(store.path), read_only=True) as conn:
        tables = dict(
            conn.execute("SELECT table_name, comment FROM duckdb_tables()").fetchall()
        )
        columns = conn.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns()"
            " WHERE NOT internal AND schema_name = 'main'"
        ).fetchall()
    expected = {"runs", "stage_runs", "selector_metrics", "eval_scores", "eval_samples", "bench_results", "stage_metrics"}
    assert expected <= set(tables) and set(TABLES) == expected
    assert all(tables[t] for t in expected)
    documented = {(t, c) for t, c, comment in columns if comment}
    for table in TABLES.values():
        for col in table.columns:
            assert (table.name, col.name) in documented
    ResultsStore(store.path)  # reopening an existing store is fine


def test_start_and_finish_run(store):
    started = datetime(2025, 1, 2, 3, 4, 5)
    store.start_run("r1", "eval", "abc", '{"k": 1}', started_at=started)
    assert _rows(store, "SELECT status, started_at, finished_at FROM runs") == [("running", started, None)]
    store.finish_run("r1", "completed", mlflow_run_id="m1")
    store.start_run("r2", "train", "def", "{}")
    store.finish_run("r2", "failed", error="boom")
    rows = _rows(store, "SELECT run_id, status, mlflow_run_id, error, finished_at IS NOT NULL FROM runs ORDER BY 1")
    assert rows == [("r1", "completed", "m1", None, True), ("r2", "failed", None, "boom", True)]
    with pytest.raises(ValueError, match="unknown run"):
        store.finish_run("nope", "completed")
    with pytest.raises(ValueError, match="completed"):
        store.finish_run("r1", "done")


def test_rerecording_is_idempotent(store):
    store.start_run("r1", "eval", "abc", "{}")
    store.start_run("r1", "eval", "abc", "{}")
    for _ in range(2):
        store.record_stage_run("r1", "extract", "key1", False, 2.5, "/out/x", {"images": 3})
    store.record_stage_run("r1", "extract", "key1", True, 0.0, "/out/x", {"images": 3})
    score = dict(run_id="r1", model="m", benchmark="textvqa", strategy="atr", retention=0.25,
                 seed=0, metric="acc", score=0.5, n_samples=10)
    assert store.insert_rows("eval_scores", [score, score]) == 1
    store.insert_rows("eval_scores", [{**score, "score": 0.75}])
    bench = dict(run_id="r1", name="prefill", retention=None, value=1.0, unit="ms")
    store.insert_rows("bench_results", [bench, {**bench, "retention": 0.5}])
    store.insert_rows("bench_results", [{**bench, "value": 2.0}])

    assert _rows(store, "SELECT count(*) FROM runs") == [(1,)]
    assert _rows(store, "SELECT cached, seconds, counts_json FROM stage_runs") == [(True, 0.0, '{"images": 3}')]
    assert _rows(store, "SELECT score, n_samples FROM eval_scores") == [(0.75, 10)]
    assert _rows(store, "SELECT retention, value FROM bench_results ORDER BY retention NULLS FIRST") == [
        (None, 2.0),
        (0.5, 1.0),
    ]


def test_insert_rows_validates_table_and_columns(store):
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        store.insert_rows("nope", [{"run_id": "r"}])
    with pytest.raises(ValueError, match="unknown column 'bogus' for table 'eval_scores'"):
        store.insert_rows("eval_scores", [{"run_id": "r", "bogus": 1}])
    with pytest.raises(ValueError, match="lack key column"):
        store.insert_rows("bench_results", [{"run_id": "r", "value": 1.0}])
    with pytest.raises(ValueError, match="eval_samples.seed"):
        store.insert_rows("eval_samples", [dict(run_id="r", model="m", benchmark="b", sample_id="1", strategy="s",
                                                retention=0.5, seed="zero")])
    assert store.insert_rows("eval_samples", []) == 0


def _write_stage_rows(path, worker):
    store = ResultsStore(path)
    for i in range(50):
        store.record_stage_run(f"run{worker}", f"stage{i}", "key", False, 0.1, "/out")


def test_two_processes_write_concurrently(store):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_stage_rows, args=(str(store.path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _rows(store, "SELECT run_id, count(*) FROM stage_runs GROUP BY ALL ORDER BY 1") == [
        ("run0", 50),
        ("run1", 50),
    ]


def test_query_returns_columns_and_rows(store):
    store.start_run("r1", "eval", "abc", "{}")
    columns, rows = query(store.path, "SELECT run_id, flow FROM runs")
    assert columns == ["run_id", "flow"] and rows == [("r1", "eval")]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("INSERT INTO runs (run_id, status) VALUES ('x', 'running')", "INSERT"),
        ("DELETE FROM runs", "DELETE"),
        ("CREATE TABLE t (a INTEGER)", "CREATE"),
        ("DROP TABLE runs", "DROP"),
        ("COPY runs TO '{dir}/leak.csv'", "COPY"),
        ("ATTACH '{dir}/other.duckdb' AS other", "ATTACH"),
    ],
)
def test_query_refuses_writes(store, sql, kind):
    store.start_run("r1", "eval", "abc", "{}")
    folder = store.path.parent
    before = (_digest(store.path), sorted(p.name for p in folder.iterdir()))
    with pytest.raises(QueryError, match=f"read-only: {kind} statements are not allowed"):
        query(store.path, sql.format(dir=folder))
    assert (_digest(store.path), sorted(p.name for p in folder.iterdir())) == before
    assert _rows(store, "SELECT count(*) FROM runs") == [(1,)]


def test_query_cannot_read_files(store, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(QueryError, match="disabled by configuration"):
        query(store.path, f"SELECT * FROM read_csv('{secret}')")


def test_query_errors_are_one_line(store, tmp_path):
    with pytest.raises(QueryError) as syntax:
        query(store.path, "SELEC * FROM runs")
    assert "\n" not in str(syntax.value) and "syntax error" in str(syntax.value)
    with pytest.raises(QueryError) as catalog:
        query(store.path, "SELECT * FROM no_such_table")
    assert "\n" not in str(catalog.value) and "no_such_table" in str(catalog.value)
    missing = tmp_path / "missing.duckdb"
    with pytest.raises(QueryError, match="no results store at .*missing.duckdb: run a stage first"):
        query(missing, "SELECT 1")
    assert not missing.exists()


def _hold_write_lock(path, locked, release):
    with duckdb.connect(path):
        locked.set()
        release.wait(30)


def test_query_reports_busy_store(store):
    ctx = mp.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_write_lock, args=(str(store.path), locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        with pytest.raises(QueryError, match=r"results store busy \(.*\): retry"):
            query(store.path, "SELECT 1", busy_timeout=0.5)
    finally:
        release.set()
        holder.join(30)
    assert query(store.path, "SELECT 1")[1] == [(1,)]


COLUMNS = ["run_id", "score", "at", "note"]
ROWS = [("r1", 0.5, datetime(2025, 1, 2, 3, 4, 5), None), ("r2", 1.25, datetime(2025, 1, 3), "a,b")]


def test_format_json():
    records = json.loads(format_rows(COLUMNS, ROWS, "json"))
    assert records[0] == {"run_id": "r1", "score": 0.5, "at": "2025-01-02T03:04:05", "note": None}
    assert records[1]["note"] == "a,b"


def test_format_csv():
    parsed = list(csv.reader(io.StringIO(format_rows(COLUMNS, ROWS, "csv"))))
    assert parsed == [COLUMNS, ["r1", "0.5", "2025-01-02T03:04:05", ""], ["r2", "1.25", "2025-01-03T00:00:00", "a,b"]]


def test_format_table():
    text = format_rows(COLUMNS, ROWS, "table", width=120)
    for token in ["run_id", "score", "r1", "r2", "0.5", "1.25", "2025-01-02 03:04:05", "NULL", "a,b", "2 rows"]:
        assert token in text
    assert "\x1b[" not in text
    with pytest.raises(ValueError, match="unknown format"):
        format_rows(COLUMNS, ROWS, "xml")


# eval_scores as atr wrote it before the budget and stock columns (issue 29: budgets against the stock model)
OLD_EVAL_SCORES = ('CREATE TABLE eval_scores ("run_id" VARCHAR, "model" VARCHAR, "benchmark" VARCHAR, '
                   '"strategy" VARCHAR, "retention" DOUBLE, "seed" INTEGER, "metric" VARCHAR, "score" DOUBLE, '
                   '"n_samples" INTEGER, "mean_visual_tokens" DOUBLE, "prefill_ms" DOUBLE, PRIMARY KEY (run_id, '
                   'model, benchmark, strategy, retention, seed, metric))')


def test_a_store_from_before_eval_samples_had_a_model_column_is_migrated(tmp_path):
    """An older atr wrote eval_samples without ``model`` (key without it): opening the store rebuilds the
    table in the current schema, keeps every row and fills ``model`` from the run's eval_scores."""
    path = tmp_path / "results.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(OLD_EVAL_SCORES)
        conn.execute('CREATE TABLE eval_samples ("run_id" VARCHAR, "benchmark" VARCHAR, "sample_id" VARCHAR, '
                     '"strategy" VARCHAR, "retention" DOUBLE, "seed" INTEGER, "prediction" VARCHAR, '
                     '"answer" VARCHAR, "score" DOUBLE, PRIMARY KEY (run_id, benchmark, sample_id, strategy, '
                     'retention, seed))')
        conn.execute("INSERT INTO eval_samples VALUES ('r1', 'synthetic-ocr', 'q1', 'full', 1.0, 0, 'K7', 'K7', 1.0), "
                     "('r2', 'synthetic-ocr', 'q1', 'full', 1.0, 0, 'X', 'K7', 0.0)")
        conn.execute("INSERT INTO eval_scores VALUES ('r1', 'tiny-trained', 'synthetic-ocr', 'full', 1.0, 0, "
                     "'accuracy', 1.0, 1, 20.0, 5.0)")
    store = ResultsStore(path)
    assert _rows(store, "SELECT run_id, model, prediction FROM eval_samples ORDER BY run_id") == \
        [("r1", "tiny-trained", "K7"), ("r2", "unknown", "X")]
    # the new key: the same sample of another model in the same run is a second row
    store.insert_rows("eval_samples", [dict(run_id="r1", model="tiny-ov-trained", benchmark="synthetic-ocr",
                                            sample_id="q1", strategy="full", retention=1.0, seed=0, prediction="K7",
                                            answer="K7", score=1.0)])
    assert _rows(store, "SELECT count(*) FROM eval_samples WHERE run_id = 'r1'") == [(2,)]
    with duckdb.connect(str(path), read_only=True) as conn:
        comment = conn.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'eval_samples' "
                               "AND column_name = 'model'").fetchone()[0]
    assert "model" in comment.lower()
    ResultsStore(path)  # a second open changes nothing
    assert _rows(store, "SELECT count(*) FROM eval_samples") == [(3,)]


def test_a_store_from_before_the_budget_column_is_migrated_with_each_runs_budget(tmp_path):
    """eval_scores and eval_samples keyed without ``budget``: opening the store rebuilds both, every row
    kept, ``budget`` taken from the run's recorded eval config (``per-crop`` where it has none), the new
    columns NULL; then a per-crop and a global row of the same strategy and retention live side by side."""
    path = tmp_path / "results.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(TABLES["runs"].ddl())
        conn.execute(OLD_EVAL_SCORES)
        conn.execute('CREATE TABLE eval_samples ("run_id" VARCHAR, "model" VARCHAR, "benchmark" VARCHAR, '
                     '"sample_id" VARCHAR, "strategy" VARCHAR, "retention" DOUBLE, "seed" INTEGER, '
                     '"prediction" VARCHAR, "answer" VARCHAR, "score" DOUBLE, PRIMARY KEY (run_id, model, '
                     'benchmark, sample_id, strategy, retention, seed))')
        for run, cfg in (("r1", {"eval": {"budget": "global"}}), ("r2", {"model": "tiny-trained"})):
            conn.execute("INSERT INTO runs (run_id, flow, status, config_json) VALUES (?, 'eval', 'completed', ?)",
                         [run, json.dumps(cfg)])
        for run, score in (("r1", 0.85), ("r2", 0.687), ("r3", 0.5)):  # r3: no runs row at all
            conn.execute("INSERT INTO eval_scores VALUES (?, 'tiny-trained', 'synthetic-ocr', 'selector', 0.1, 0, "
                         "'exact_match', ?, 300, 7.5, 3.0)", [run, score])
            conn.execute("INSERT INTO eval_samples VALUES (?, 'tiny-trained', 'synthetic-ocr', 'q1', 'selector', "
                         "0.1, 0, 'K7', 'K7', 1.0)", [run])
    store = ResultsStore(path)
    assert _rows(store, "SELECT run_id, budget, score, stock_visual_tokens, tokens_vs_stock FROM eval_scores "
                        "ORDER BY run_id") == [("r1", "global", 0.85, None, None), ("r2", "per-crop", 0.687, None, None),
                                               ("r3", "per-crop", 0.5, None, None)]
    assert _rows(store, "SELECT run_id, budget, visual_tokens FROM eval_samples ORDER BY run_id") == \
        [("r1", "global", None), ("r2", "per-crop", None), ("r3", "per-crop", None)]
    # the new key: the other budget of the same (strategy, retention, seed) in the same run is a second row
    row = dict(run_id="r1", model="tiny-trained", benchmark="synthetic-ocr", strategy="selector", retention=0.1,
               seed=0, metric="exact_match", score=0.687, n_samples=300, mean_visual_tokens=7.5, budget="per-crop",
               stock_visual_tokens=7.5, tokens_vs_stock=1.0)
    store.insert_rows("eval_scores", [row])
    assert _rows(store, "SELECT budget, score FROM eval_scores WHERE run_id = 'r1' ORDER BY budget") == \
        [("global", 0.85), ("per-crop", 0.687)]
    ResultsStore(path)  # a second open changes nothing
    assert _rows(store, "SELECT count(*) FROM eval_scores") == [(4,)]


def test_a_row_without_a_budget_is_the_papers_per_crop(store):
    """Writers that predate the budget column (and the DDL's DEFAULT) record per-crop rows."""
    score = dict(run_id="r1", model="m", benchmark="b", strategy="random", retention=0.25, seed=0, metric="acc",
                 score=0.5, n_samples=10)
    store.insert_rows("eval_scores", [score, {**score, "budget": "stock", "score": 0.75}])
    assert _rows(store, "SELECT budget, score FROM eval_scores ORDER BY budget") == [("per-crop", 0.5), ("stock", 0.75)]
