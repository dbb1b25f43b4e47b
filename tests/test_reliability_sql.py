"""Reliability of the results store: read-only SQL enforced by DuckDB itself, query
timeouts, and several processes writing and reading one real DuckDB file at once."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import random
import time

import duckdb
import pytest

from flows.cli import main
from storage.results import QueryError, ResultsStore, open_read_only, query

# (statement, what DuckDB itself raises on the read-only connection, the start of its message)
REFUSED = {
    "insert": ("INSERT INTO runs (run_id, flow, status) VALUES ('x', 'f', 'running')", duckdb.InvalidInputException,
               "Invalid Input Error: Cannot execute statement of type \"INSERT\""),
    "update": ("UPDATE runs SET status = 'failed'", duckdb.InvalidInputException,
               "Invalid Input Error: Cannot execute statement of type \"UPDATE\""),
    "delete": ("DELETE FROM runs", duckdb.InvalidInputException,
               "Invalid Input Error: Cannot execute statement of type \"DELETE\""),
    "create": ("CREATE TABLE t (a INTEGER)", duckdb.InvalidInputException,
               "Invalid Input Error: Cannot execute statement of type \"CREATE\""),
    "drop": ("DROP TABLE runs", duckdb.InvalidInputException,
             "Invalid Input Error: Cannot execute statement of type \"DROP\""),
    "attach": ("ATTACH '{dir}/other.duckdb' AS other", duckdb.PermissionException, "Permission Error"),
    "copy_to": ("COPY runs TO '{dir}/leak.csv'", duckdb.PermissionException, "Permission Error"),
    "export": ("EXPORT DATABASE '{dir}/dump'", duckdb.PermissionException, "Permission Error"),
    "install": ("INSTALL httpfs", duckdb.PermissionException, "Permission Error"),
    "load": ("LOAD httpfs", duckdb.PermissionException, "Permission Error"),
    "read_text": ("SELECT * FROM read_text('{secret}')", duckdb.PermissionException, "Permission Error"),
    "read_csv": ("SELECT * FROM read_csv('{secret}')", duckdb.PermissionException, "Permission Error"),
    "file_scan": ("SELECT * FROM '{secret}'", duckdb.PermissionException, "Permission Error"),
    "glob": ("SELECT * FROM glob('{dir}/*')", duckdb.PermissionException, "Permission Error"),
    "set_access": ("SET enable_external_access = true", duckdb.InvalidInputException,
                   "Invalid Input Error: Cannot change configuration option \"enable_external_access\""),
    "set_threads": ("SET threads = 1", duckdb.InvalidInputException,
                    "Invalid Input Error: Cannot change configuration option \"threads\""),
    "reset": ("RESET enable_external_access", duckdb.InvalidInputException,
              "Invalid Input Error: Cannot change configuration option"),
    "pragma": ("PRAGMA enable_external_access = true", duckdb.InvalidInputException,
               "Invalid Input Error: Cannot change configuration option"),
}
SELECT_SHAPED = {"read_text", "read_csv", "file_scan", "glob"}  # only DuckDB's configuration stops these
SECRET = "top-secret-line"


@pytest.fixture
def store(tmp_path):
    s = ResultsStore(tmp_path / "db" / "results.duckdb")
    s.start_run("r1", "eval", "abc", "{}")
    return s


def _snapshot(store):
    folder = store.path.parent
    return hashlib.sha256(store.path.read_bytes()).hexdigest(), sorted(p.name for p in folder.iterdir())


def _sql(store, tmp_path, name):
    secret = tmp_path / "secret.csv"
    secret.write_text(f"a\n{SECRET}\n")
    return REFUSED[name][0].format(dir=store.path.parent, secret=secret)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_duckdb_itself_refuses_on_the_read_only_connection(store, tmp_path, name):
    """The statement filter of `query` is bypassed: the connection alone refuses."""
    sql = _sql(store, tmp_path, name)
    _, error, message = REFUSED[name]
    before = _snapshot(store)
    with open_read_only(store.path) as conn:
        with pytest.raises(error) as info:
            conn.execute(sql).fetchall()
    assert str(info.value).startswith(message), str(info.value)
    assert SECRET not in str(info.value)
    assert _snapshot(store) == before
    assert query(store.path, "SELECT run_id, status FROM runs")[1] == [("r1", "running")]


def test_read_only_connection_settings_are_locked(store):
    with open_read_only(store.path) as conn:
        settings = dict(conn.execute(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', "
            "'lock_configuration', 'autoload_known_extensions', 'autoinstall_known_extensions', "
            "'access_mode')").fetchall())
    assert settings == {"enable_external_access": "false", "lock_configuration": "true",
                        "autoload_known_extensions": "false", "autoinstall_known_extensions": "false",
                        "access_mode": "read_only"}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_atr_query_refuses_with_one_clear_line(store, tmp_path, name, capsys):
    sql = _sql(store, tmp_path, name)
    before = _snapshot(store)
    with pytest.raises(QueryError) as info:
        query(store.path, sql)
    text = str(info.value)
    assert "\n" not in text and SECRET not in text
    if name in SELECT_SHAPED:
        assert text.startswith("atr query cannot reach outside the results store: Permission Error"), text
    else:
        assert text.startswith("atr query is read-only: ") and text.endswith(" statements are not allowed"), text
    assert main(["query", "--home", str(store.path.parent), sql]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {text}"
    assert _snapshot(store) == before


SLOW_SQL = "SELECT sum(hash(i)) FROM range(100000000000::BIGINT) t(i)"  # hours of work


def test_query_times_out_with_one_line_and_frees_the_store(store, capsys):
    with pytest.raises(QueryError, match=r"^query interrupted after the 0.3 s timeout \(raise it with --timeout\)$"):
        query(store.path, SLOW_SQL, timeout=0.3)
    assert main(["query", "--home", str(store.path.parent), "--timeout", "0.3", SLOW_SQL]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: query interrupted after the 0.3 s timeout (raise it with --timeout)"
    store.finish_run("r1", "completed")  # the interrupted reader released the file
    assert query(store.path, "SELECT status FROM runs", timeout=0.3)[1] == [("completed",)]
    for bad in ("0", "-1", "nan"):
        assert main(["query", "--home", str(store.path.parent), "--timeout", bad, "SELECT 1"]) == 2
        assert "--timeout must be a positive number of seconds" in capsys.readouterr().err
    assert main(["query", "--home", str(store.path.parent), "--timeout", "inf", "--csv", "SELECT 7 AS n"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "7"]


def test_query_timeout_does_not_leak_into_later_statements(store):
    # A timer that outlived its query would interrupt the next one on a reused connection.
    for _ in range(5):
        assert query(store.path, "SELECT count(*) FROM range(1000)", timeout=0.05)[1] == [(1000,)]
    time.sleep(0.1)
    assert query(store.path, "SELECT 1", timeout=5)[1] == [(1,)]


# ------------------------------------------------------------------ concurrency

BATCH = 25


def _writer(path: str, run_id: str, batches: int, seed: int) -> None:
    """What a run records: its runs row, stage rows, per-sample rows in batches, its end."""
    rng = random.Random(seed)
    store = ResultsStore(path)
    store.start_run(run_id, "eval", "hash", "{}")
    for b in range(batches):
        store.record_stage_run(run_id, "eval", f"chunk{b}", False, 0.1, f"/out/{b}")
        store.insert_rows("eval_samples", [
            {"run_id": run_id, "model": "tiny-trained", "benchmark": "synthetic-ocr", "sample_id": f"{b}-{i}", "strategy": "random",
             "retention": 0.25, "seed": 0, "prediction": "A", "answer": "A", "score": 1.0} for i in range(BATCH)])
        time.sleep(rng.uniform(0, 0.01))
    store.finish_run(run_id, "completed")


def _reader(path: str, stop, out) -> None:
    """`atr query` in a loop while the writers run: every answer must be whole batches."""
    seen, busy, bad = 0, 0, []
    while not stop.is_set():
        try:
            rows = query(path, "SELECT run_id, count(*) FROM eval_samples GROUP BY run_id", busy_timeout=0.2)
        except QueryError as err:
            if "results store busy" not in str(err) or "retry" not in str(err):
                bad.append(str(err))
            busy += 1
            continue
        seen += 1
        bad += [f"{run}: {n} rows" for run, n in rows[1] if n % BATCH]
    out.put((seen, busy, bad))


def _concurrent_trial(path, trial: int, batches: int) -> dict:
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    runs = [f"t{trial}-w{w}" for w in range(2)]
    writers = [ctx.Process(target=_writer, args=(str(path), run, batches, trial * 10 + w)) for w, run in enumerate(runs)]
    reader = ctx.Process(target=_reader, args=(str(path), stop, out))
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(300)
    stop.set()
    seen, busy, bad = out.get(timeout=120)
    reader.join(60)
    found = dict(query(path, "SELECT run_id, count(*) FROM eval_samples WHERE run_id LIKE ? GROUP BY run_id"
                       .replace("?", f"'t{trial}-%'"))[1])
    stages = dict(query(path, f"SELECT run_id, count(*) FROM stage_runs WHERE run_id LIKE 't{trial}-%' "
                              "GROUP BY run_id")[1])
    status = dict(query(path, f"SELECT run_id, status FROM runs WHERE run_id LIKE 't{trial}-%'")[1])
    return {"exitcodes": [w.exitcode for w in writers] + [reader.exitcode], "runs": runs, "found": found,
            "stages": stages, "status": status, "reads": seen, "busy": busy, "bad": bad}


def _check_trial(r: dict, batches: int) -> None:
    assert r["exitcodes"] == [0, 0, 0], r
    assert r["found"] == {run: batches * BATCH for run in r["runs"]}, r  # rows expected vs found
    assert r["stages"] == {run: batches for run in r["runs"]}, r
    assert r["status"] == {run: "completed" for run in r["runs"]}, r
    assert r["bad"] == [], r["bad"][:5]  # no read saw half a transaction, every refusal said "busy, retry"
    assert r["reads"] + r["busy"] > 0


def test_two_writers_and_a_reader_lose_nothing(tmp_path):
    path = tmp_path / "results.duckdb"
    ResultsStore(path)
    r = _concurrent_trial(path, 0, batches=12)
    print(f"rows expected {2 * 12 * BATCH}, found {sum(r['found'].values())}; reads {r['reads']}, busy {r['busy']}")
    _check_trial(r, 12)


@pytest.mark.slow
def test_concurrent_writer_trials(tmp_path):
    """10 trials of two writers (40 batches each) and a reader on one store."""
    path = tmp_path / "results.duckdb"
    ResultsStore(path)
    passed, expected, found = 0, 0, 0
    for trial in range(10):
        r = _concurrent_trial(path, trial, batches=40)
        expected += 2 * 40 * BATCH
        found += sum(r["found"].values())
        _check_trial(r, 40)
        passed += 1
        print(f"trial {trial}: rows {sum(r['found'].values())}/{2 * 40 * BATCH}, reads {r['reads']}, busy {r['busy']}")
    print(f"concurrent-writer trials passed {passed}/10, rows expected {expected}, found {found}")


@pytest.mark.slow
def test_two_atr_evals_record_into_one_store_at_once(cli_env, tmp_path):
    """Two real `atr eval` processes on one home at the same time, `atr query` reading meanwhile:
    every row of both runs arrives (3 trials)."""
    import subprocess
    import sys

    from conftest import REPO
    from flows.runtime import WORKER_ENV

    env = {**cli_env, **WORKER_ENV}
    db = tmp_path / "home" / "results.duckdb"
    expected_total = found_total = 0
    for trial in range(3):
        procs, limits = [], (16 + trial, 12 + trial)
        for limit in limits:
            argv = [sys.executable, "-m", "flows.cli", "eval", "--benchmark", "synthetic-scene", "--strategies",
                    "none,random", "--retentions", "0.25,0.5", "--seeds", "2", "--limit", str(limit),
                    "--batch-size", "8"]
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        reads = busy = 0
        while any(p.poll() is None for p in procs):
            if db.exists():
                try:
                    query(db, "SELECT run_id, count(*) FROM eval_samples GROUP BY run_id")
                    reads += 1
                except QueryError as err:
                    assert "results store busy" in str(err) and "retry" in str(err), str(err)
                    busy += 1
            time.sleep(0.05)
        outs = [p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        runs = [o[0].split("run     ")[1].split()[0] for o in outs]
        for run, limit in zip(runs, limits):
            samples = query(db, f"SELECT count(*) FROM eval_samples WHERE run_id = '{run}'")[1][0][0]
            scores = query(db, f"SELECT count(*) FROM eval_scores WHERE run_id = '{run}'")[1][0][0]
            stages = query(db, f"SELECT count(*) FROM stage_runs WHERE run_id = '{run}'")[1][0][0]
            status = query(db, f"SELECT status FROM runs WHERE run_id = '{run}'")[1]
            expected = 5 * limit + 5 + 6  # 5 chunks of `limit` samples, 5 scores, 6 stage rows
            expected_total += expected + 1
            found_total += samples + scores + stages + len(status)
            assert (samples, scores, stages, status) == (5 * limit, 5, 6, [("completed",)]), run
        print(f"trial {trial}: runs {runs}, reads {reads}, busy {busy}")
    print(f"atr concurrent-writer trials passed 3/3, rows expected {expected_total}, found {found_total}")
    assert expected_total == found_total
