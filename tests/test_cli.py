"""The `atr` command line as a user runs it: help texts, one-line errors, read-only queries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb
import pytest

from flows.cli import build_parser, main
from storage.results import ResultsStore

from conftest import REPO, assert_one_line_errors

SUBCOMMANDS = ["prepare-model", "ask", "benchmark", "extract", "train", "mask", "query", "clean"]


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in top
    assert "ATR_HOME" in top and "examples:" in top
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "--home" in text
        for action in build_parser()._subparsers._group_actions[0].choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_console_script_is_installed(tmp_path):
    """The processes a user starts: `python -m flows.cli` and the `atr` console script, with their exit codes
    (the other tests call flows.cli.main in the test process: tests/conftest.py atr_in_process)."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--crops {all,base}" in proc.stdout
    atr = os.path.join(os.path.dirname(sys.executable), "atr")
    proc = subprocess.run([atr, "extract", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--crops {all,base}" in proc.stdout
    proc = subprocess.run([atr, "query", "--home", str(tmp_path / "nowhere"), "SELECT 1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no results store" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run([atr, "query"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage: atr query" in proc.stderr  # argparse's own exit code


def test_home_option_before_or_after_the_subcommand(tmp_path, capsys):
    for argv in (["--home", str(tmp_path / "a"), "clean", "--tmp"], ["clean", "--tmp", "--home", str(tmp_path / "b")]):
        assert main(argv) == 0
    assert "removed 0" in capsys.readouterr().out


@pytest.fixture
def store_home(tmp_path):
    store = ResultsStore(tmp_path / "results.duckdb")
    store.start_run("r1", "extract", "abc", "{}")
    store.record_stage_run("r1", "extract", "k1", False, 1.5, "/x")
    return tmp_path


def test_query_prints_table_json_and_csv(store_home, capsys):
    assert main(["query", "--home", str(store_home), "SELECT stage, cached, seconds FROM stage_runs"]) == 0
    assert "extract" in capsys.readouterr().out
    assert main(["query", "--home", str(store_home), "--json", "SELECT stage, seconds FROM stage_runs"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"stage": "extract", "seconds": 1.5}]
    assert main(["query", "--home", str(store_home), "--csv", "SELECT stage, seconds FROM stage_runs"]) == 0
    assert capsys.readouterr().out.splitlines() == ["stage,seconds", "extract,1.5"]


@pytest.mark.parametrize("sql", ["DELETE FROM runs", "INSERT INTO runs (run_id) VALUES ('x')",
                                 "DROP TABLE runs", "CREATE TABLE t (a INT)", "UPDATE runs SET status = 'x'"])
def test_query_refuses_writes(store_home, capsys, sql):
    db = store_home / "results.duckdb"
    before = db.read_bytes()
    assert main(["query", "--home", str(store_home), sql]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "read-only" in err and "\n" not in err
    assert db.read_bytes() == before
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_query_errors_are_one_line(tmp_path, store_home, capsys):
    assert main(["query", "--home", str(tmp_path / "nowhere"), "SELECT 1"]) == 2
    assert "no results store" in capsys.readouterr().err
    assert main(["query", "--home", str(store_home), "SELEC 1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_extract_user_errors_are_one_line(tmp_path):
    env = {**os.environ, "ATR_HOME": str(tmp_path / "home")}
    cases = [
        (["extract", "--images", "synthetic:nope", "--limit", "2"], "synthetic:nope"),
        (["extract", "--images", str(tmp_path / "missing"), "--limit", "2"], "missing"),
        (["extract", "--limit", "-3"], "--limit"),
        (["extract", "--model", "nonsense-model", "--limit", "2"], "unknown model 'nonsense-model'"),
    ]
    assert_one_line_errors(cases, env)
    assert not list((tmp_path / "home").rglob("*.tmp"))


def test_clean_removes_the_home(tmp_path, capsys):
    home = tmp_path / "h"
    (home / "stages" / "extract" / "abc.tmp").mkdir(parents=True)
    assert main(["clean", "--tmp", "--home", str(home)]) == 0
    assert not (home / "stages" / "extract" / "abc.tmp").exists()
    assert main(["clean", "--yes", "--home", str(home)]) == 0
    assert not home.exists()


def test_ask_prints_the_answer(run_cli, tmp_path):
    from pipeline.synthetic import generate_samples

    samples = generate_samples("synthetic-ocr", "test", 3)
    image = tmp_path / "card.png"
    sample = next(s for s in samples if len(s.answer) == 1)
    sample.image.save(image)
    rc, stdout, stderr = run_cli("ask", "--image", str(image), "--question", sample.question)
    assert rc == 0, stderr
    assert stdout.strip() == sample.answer


def test_ask_and_prepare_user_errors_are_one_line(cli_env, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (["ask", "--image", str(tmp_path / "missing.png"), "--question", "q?"], "missing.png"),
        (["ask", "--image", str(tmp_path / "notes.png"), "--question", "q?"], "notes.png"),
        (["prepare-model", "--model", "tiny", "--seed", "3"], "tiny-trained"),
        (["prepare-model", "--model", "tiny", "--retrain"], "--retrain"),
        (["prepare-model", "--steps", "0"], "steps must be positive"),
        (["benchmark", "synthetic-docs"], "synthetic-ocr, synthetic-scene"),
    ]
    assert_one_line_errors(cases, cli_env)


def test_benchmark_command_writes_parquet(tmp_path, run_cli):
    import pyarrow.parquet as pq

    out = tmp_path / "ocr.parquet"
    rc, stdout, _ = run_cli("benchmark", "synthetic-ocr", "--split", "val", "-n", "7", "--out", str(out),
                            "--home", str(tmp_path / "home"))
    assert rc == 0
    assert "7 questions" in stdout
    table = pq.read_table(out)
    assert table.num_rows == 7 and table.column_names[:3] == ["question_id", "question", "answers"]


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, tmp_path, capsys):
    """Only UserError becomes the one-line `error:`; a ValueError from deep inside is a bug."""
    import flows.cli as cli

    def broken(home, args):
        raise ValueError("keep mask shape (3, 4) does not match features (3, 5)")

    monkeypatch.setitem(cli.COMMANDS, "query", (cli.COMMANDS["query"][0], broken))
    rc = cli.main(["query", "SELECT 1", "--home", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "ValueError: keep mask shape (3, 4)" in err
    assert err.strip().splitlines()[-1] == cli.BUG_HINT and "error:" not in err


def test_every_user_error_type_is_one_line_with_exit_code_2(monkeypatch, tmp_path, capsys):
    import flows.cli as cli
    from pipeline.config import ConfigError
    from pipeline.errors import MissingFile, UserError
    from pipeline.images import BadImage
    from pipeline.loading import ModelLoadError
    from pipeline.memory import NotEnoughMemory
    from pipeline.train import TrainingDiverged
    from storage.benchmarks import BenchmarkFileError
    from storage.checkpoints import CheckpointError
    from storage.results import QueryError
    from storage.shards import ShardError
    from storage.stages import StageError

    for kind in (UserError, ConfigError, MissingFile, BadImage, ModelLoadError, TrainingDiverged, BenchmarkFileError,
                 CheckpointError, QueryError, ShardError, StageError, NotEnoughMemory):
        def broken(home, args, kind=kind):
            raise kind(f"{kind.__name__}: the thing named here is wrong")

        monkeypatch.setitem(cli.COMMANDS, "query", (cli.COMMANDS["query"][0], broken))
        assert cli.main(["query", "SELECT 1", "--home", str(tmp_path)]) == 2, kind
        err = capsys.readouterr().err
        assert err == f"error: {kind.__name__}: the thing named here is wrong\n", (kind, err)


def test_lmms_eval_harness_without_the_extra_says_how_to_install_it(cli_env):
    """The default venv has no lmms-eval: ``--harness lmms-eval`` ends in one line with the install command
    (in the [lmms] venv tests/test_lmms.py runs the harness itself)."""
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed in this venv")  # the [lmms] venv runs only -m lmms anyway
    assert_one_line_errors([
        (["eval", "--harness", "lmms-eval", "--tasks", "docvqa_val"],
         "--harness lmms-eval needs the [lmms] extra, which is not installed: "
         "pip install torch==2.13.0 -c constraints.txt -e '.[lmms]'"),
        (["eval", "--tasks", "docvqa_val"], "--tasks names lmms-eval tasks: add --harness lmms-eval"),
        (["eval", "--harness", "lmms-eval"], "--harness lmms-eval needs --tasks T1,T2"),
    ], cli_env)


def test_eval_batch_size_defaults_by_device_and_a_bad_thread_count_is_one_line(cli_env, capsys):
    """--batch-size unset: auto on CUDA (batches by tokens), 16 on the CPU (what the CPU's results were made
    with); ATR_TORCH_THREADS that is not a number ends in one line before anything runs."""
    from pipeline.evaluate import default_batch_size

    args = build_parser().parse_args(["eval"])
    assert args.batch_size is None and default_batch_size("cpu") == 16
    assert build_parser().parse_args(["eval", "--batch-size", "auto"]).batch_size == "auto"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: auto on CUDA, 16 on the CPU)" in " ".join(capsys.readouterr().out.split())
    assert_one_line_errors([
        (["speed", "--model", "tiny"], "ATR_TORCH_THREADS='two': give a positive number of torch threads"),
    ], {**cli_env, "ATR_TORCH_THREADS": "two"})
