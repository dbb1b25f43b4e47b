"""The deployment stack, run for real (issue: stack): PostgreSQL from Debian's packages, the Prefect
server and the MLflow server on it with docker-compose.yml's own commands and variables (see
tests/stack.py), and `atr serve` registered with a cron schedule.

Marked ``slow``: 228 s on 2 CPUs (server starts 25 s, two triggered runs 50 s, the faults the rest),
more than the default suite's budget allows. Run it with::

    pip install -e '.[dev,stack]' && python -m pytest -m slow tests/test_stack.py -s

(as root it installs Debian's ``postgresql`` if it is missing).

The tests run in order on one stack and print what each fault left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import duckdb
import pytest

from stack import REPO, compose_services, http, init_databases, pg_bin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SMALL = """model = "tiny-trained"
[extract]
limit = 64
shard_size = 32
[train]
eval_retentions = [0.25]
eval_seeds = 1
checkpoint_every = 10
[train.selector]
steps = 20
[eval]
strategies = ["full", "none", "random", "selector"]
retentions = [0.25]
seeds = 1
limit = 12
batch_size = 12
"""
DEPLOYMENT = "nightly"
OUTAGE_S = 20  # how long Postgres stays down under the Prefect server in the restart fault


def _secrets() -> dict[str, str]:
    """A .env as the README says to make one: docker/make-env.py's fresh random values."""
    out = subprocess.run([sys.executable, str(REPO / "docker" / "make-env.py")], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


class Stack:
    pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if pg_bin() is None and os.geteuid() == 0 and shutil.which("apt-get"):  # Debian's packages, as root
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if pg_bin() is None:
        pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql")
    try:
        import flask_wtf  # noqa: F401
        import psycopg2  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"{exc.name} is missing: pip install -e '.[dev,stack]'")
    tmp = tmp_path_factory.mktemp("stack")
    s = Stack()
    s.tmp, s.secrets = tmp, _secrets()
    s.pg, s.prefect, s.mlflow, s.runner_env = compose_services(tmp, s.secrets)
    s.times = {}
    t0 = time.monotonic()
    s.times["postgres start + init.sql"] = s.pg.start()
    init_databases(s.pg)
    s.times["prefect server start"] = s.prefect.start()
    s.times["mlflow server start"] = s.mlflow.start()
    s.home = tmp / "home"
    s.serve = None
    s.report = []
    yield s
    if s.serve is not None:
        s.serve.terminate()
        try:
            s.serve.wait(30)
        except subprocess.TimeoutExpired:
            s.serve.kill()
    s.mlflow.stop()
    s.prefect.stop()
    s.pg.destroy()
    print(f"\nstack: {time.monotonic() - t0:.0f} s in all; " + "; ".join(f"{k} {v:.1f} s" for k, v in s.times.items()))
    for line in s.report:
        print("stack:", line)


def atr_env(s: Stack, **override: str) -> dict[str, str]:
    """The runner service's environment (compose's), with local addresses, a local home and 2 threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(s.runner_env)
    env.update(ATR_HOME=str(s.home), HOME=str(s.tmp / "user-home"), HF_HOME=str(s.tmp / "hf"),
               PREFECT_HOME=str(s.tmp / "prefect-client-home"), HF_HUB_OFFLINE="1",
               ATR_TORCH_THREADS="2", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    env.update(override)
    return env


def atr(s: Stack, *argv: str, timeout: float = 600, **override: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=atr_env(s, **override),
                          capture_output=True, text=True, timeout=timeout)


def api(s: Stack, path: str, body: dict | None = None):
    status, data = http(s.prefect.api + path, s.secrets["PREFECT_API_AUTH_STRING"], body)
    assert status in (200, 201), (path, status, data[:300])
    return json.loads(data)


def trigger(s: Stack) -> str:
    dep = api(s, f"/deployments/name/atr-run/{DEPLOYMENT}")
    return api(s, f"/deployments/{dep['id']}/create_flow_run", {})["id"]


def wait_run(s: Stack, run_id: str, timeout: float = 900) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status, data = http(f"{s.prefect.api}/flow_runs/{run_id}", s.secrets["PREFECT_API_AUTH_STRING"])
        if status == 200:
            run = json.loads(data)
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                run["waited_s"] = time.monotonic() - t0
                return run
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def runs(s: Stack) -> list[dict]:
    with duckdb.connect(str(s.home / "results.duckdb"), read_only=True) as c:
        cur = c.execute("SELECT run_id, flow, status, mlflow_run_id, error FROM runs ORDER BY started_at")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def stage_rows(s: Stack, run_id: str) -> list[tuple[str, bool]]:
    with duckdb.connect(str(s.home / "results.duckdb"), read_only=True) as c:
        return c.execute("SELECT stage, cached FROM stage_runs WHERE run_id = ? ORDER BY started_at",
                         [run_id]).fetchall()


def mlflow_client(s: Stack):
    os.environ["MLFLOW_TRACKING_USERNAME"] = s.secrets["MLFLOW_TRACKING_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = s.secrets["MLFLOW_TRACKING_PASSWORD"]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=s.mlflow.uri)


# ---------------------------------------------------------------- 1. nobody in without credentials

def test_servers_refuse_requests_without_the_credentials_and_accept_them_with(stack):
    s = stack
    pf, good = s.prefect.api, s.secrets["PREFECT_API_AUTH_STRING"]
    assert http(f"{pf}/health")[0] == 200  # the probe compose's healthcheck uses stays open
    assert http(f"{pf}/flows/filter", None, {"limit": 1})[0] == 401
    assert http(f"{pf}/flows/filter", "atr:wrong", {"limit": 1})[0] == 401
    assert http(f"{pf}/flows/filter", good, {"limit": 1})[0] == 200
    ml = s.mlflow.uri + "/api/2.0/mlflow/experiments/search?max_results=1"
    user, pw = s.secrets["MLFLOW_TRACKING_USERNAME"], s.secrets["MLFLOW_TRACKING_PASSWORD"]
    assert http(f"{s.mlflow.uri}/health")[0] == 200
    assert http(ml)[0] == 401
    assert http(ml, f"{user}:wrong")[0] == 401
    assert http(ml, f"{user}:{pw}")[0] == 200
    s.report.append("auth: Prefect and MLflow answer 401 without or with wrong credentials, 200 with them; "
                    "/health stays open on both")


def test_wrong_credentials_are_one_line_naming_the_server(stack):
    s = stack
    bad_prefect = atr(s, "prepare-model", PREFECT_API_AUTH_STRING="atr:wrong")
    assert bad_prefect.returncode == 2, bad_prefect.stderr
    last = bad_prefect.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused the credentials" in last and s.prefect.api in last, last
    bad_mlflow = atr(s, "prepare-model", MLFLOW_TRACKING_PASSWORD="wrong")
    assert bad_mlflow.returncode == 2, bad_mlflow.stderr
    last = bad_mlflow.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refused the credentials" in last and s.mlflow.uri in last, last
    assert "Traceback" not in bad_prefect.stderr + bad_mlflow.stderr
    s.report.append("wrong credentials: one line each, naming the Prefect and the MLflow server")


# ---------------------------------------------------------------- 2. a scheduled deployment, triggered

def test_serve_registers_the_cron_deployment_and_triggered_runs_complete_then_hit_the_cache(stack):
    s = stack
    config = s.tmp / "run.toml"
    config.write_text(SMALL)
    log = open(s.tmp / "serve.log", "w")
    # the runner service's command, with its --config path local
    s.serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--cron", "0 3 * * *", "--config",
                                str(config), "--name", DEPLOYMENT], cwd=REPO, env=atr_env(s, PREFECT_LOGGING_LEVEL="INFO"),
                               stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    health = [sys.executable, str(REPO / "docker" / "runner-healthcheck.py")]
    while True:  # compose's runner healthcheck, as docker would run it
        got = subprocess.run(health, env=atr_env(s, ATR_DEPLOYMENT_NAME=DEPLOYMENT), capture_output=True, text=True)
        if got.returncode == 0:
            break
        assert s.serve.poll() is None, (s.tmp / "serve.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 180, got.stdout
        time.sleep(2)
    s.times["atr serve registered"] = time.monotonic() - t0
    dep = api(s, f"/deployments/name/atr-run/{DEPLOYMENT}")
    assert [x["schedule"]["cron"] for x in dep["schedules"]] == ["0 3 * * *"]

    first = wait_run(s, trigger(s))
    assert first["state"]["type"] == "COMPLETED", (first["state"], (s.tmp / "serve.log").read_text()[-4000:])
    s.times["first triggered run"] = first["waited_s"]
    (row,) = runs(s)
    assert row["status"] == "completed" and row["flow"] == "run"
    stages = stage_rows(s, row["run_id"])
    assert {st for st, _ in stages} >= {"prepare-model", "extract", "train", "report"}
    client = mlflow_client(s)
    exp = client.get_experiment_by_name("atr").experiment_id
    parent = client.get_run(row["mlflow_run_id"])
    assert parent.data.tags["atr.run_id"] == row["run_id"] and parent.info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.info.run_name for c in children} >= {"prepare-model", "extract", "train", "eval"}

    second = wait_run(s, trigger(s))
    assert second["state"]["type"] == "COMPLETED", second["state"]
    s.times["second triggered run (cache)"] = second["waited_s"]
    row2 = runs(s)[-1]
    cached = stage_rows(s, row2["run_id"])
    assert cached and all(c for _, c in cached), cached
    s.report.append(f"serve: deployment atr-run/{DEPLOYMENT} on cron 0 3 * * *; run 1 computed {len(stages)} "
                    f"stage rows in {first['waited_s']:.0f} s, run 2 was a full cache hit ({len(cached)} rows, "
                    f"{second['waited_s']:.0f} s)")


# ---------------------------------------------------------------- 3. nothing lost when a service is down

def test_mlflow_down_a_triggered_run_completes_on_duckdb_and_atr_sync_replays_it_once(stack):
    s = stack
    s.mlflow.stop()
    down = wait_run(s, trigger(s))
    assert down["state"]["type"] == "COMPLETED", down["state"]
    row = runs(s)[-1]
    assert row["status"] == "completed" and row["mlflow_run_id"].startswith("offline-"), row
    warned = [ln for ln in (s.tmp / "serve.log").read_text().splitlines() if "MLflow at" in ln and "unreachable" in ln]
    assert warned, "no warning line"
    spooled = sorted((s.home / "mlflow-spool").glob("*.jsonl"))
    assert spooled
    s.times["mlflow server restart"] = s.mlflow.start()
    first = atr(s, "sync")
    assert first.returncode == 0 and "runs created" in first.stdout, first.stdout + first.stderr
    real = runs(s)[-1]["mlflow_run_id"]
    assert not real.startswith("offline-")
    client = mlflow_client(s)
    parent = client.get_run(real)
    assert parent.data.tags["atr.run_id"] == row["run_id"] and parent.info.status == "FINISHED"
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{real}'")
    assert {k.info.run_name for k in kids} >= {"prepare-model", "extract", "train", "eval"}
    again = atr(s, "sync")
    assert again.returncode == 0 and "nothing to sync" in again.stdout, again.stdout
    s.report.append(f"MLflow down: the triggered run completed on DuckDB (stand-in id), warned '{warned[0][:90]}...'; "
                    f"{len(spooled)} spool files; `atr sync`: {first.stdout.strip()[:120]}; the second sync: nothing "
                    "to sync")


def test_postgres_restarted_under_the_prefect_server_during_a_run_then_the_rerun_resumes(stack):
    s = stack
    # a new extract seed, for this flow run only (a run's parameters, as the UI's "custom run" sets
    # them): every stage after prepare-model recomputes, so the run lasts a while
    dep = api(s, f"/deployments/name/atr-run/{DEPLOYMENT}")
    params = dict(dep["parameters"])
    cfg = dict(params["config"])
    cfg["extract"] = {**cfg["extract"], "seed": 1}
    params["config"] = cfg
    run_id = api(s, f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
    before = len(runs(s))
    t0 = time.monotonic()
    while len(runs(s)) == before or not stage_rows(s, runs(s)[-1]["run_id"]):
        assert time.monotonic() - t0 < 300, "the run never started a stage"
        time.sleep(1)
    done_before = stage_rows(s, runs(s)[-1]["run_id"])
    # down long enough that the flow run's calls to the Prefect API fail, not just a blip
    t1 = time.monotonic()
    s.pg.stop()
    time.sleep(OUTAGE_S)
    s.pg.start()
    s.times[f"postgres down ({OUTAGE_S} s) and up"] = time.monotonic() - t1
    hit = wait_run(s, run_id)
    hit_row = runs(s)[-1]
    outcome = f"{hit['state']['type']} ({(hit['state'].get('message') or '')[:100]})"
    # the rerun: same parameters, resumes from the stage cache
    rerun = wait_run(s, api(s, f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"])
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    rerun_rows = dict(stage_rows(s, runs(s)[-1]["run_id"]))
    finished = [st for st, _ in done_before]
    assert all(rerun_rows.get(st) for st in finished), (finished, rerun_rows)
    retries = [ln for ln in (s.tmp / "serve.log").read_text().splitlines() if "500" in ln or "etry" in ln]
    s.report.append(f"serve log lines on 500s/retries during the outage: {len(retries)}"
                    + (f"; last: {retries[-1][:160]}" if retries else ""))
    s.report.append(f"Postgres stopped for {OUTAGE_S} s during a run after {len(done_before)} stage rows "
                    f"({', '.join(finished)}): that run ended {outcome}, DuckDB status {hit_row['status']}; the "
                    f"rerun completed with those stages cached: {rerun_rows}")
