"""`atr serve`: the end-to-end flow as a Prefect deployment with a cron schedule and the run's parameters."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def deployment(tmp_path):
    from flows.orchestration.flows import build_deployment
    from pipeline.run_config import RunConfig
    from storage.home import Home

    home = Home.resolve(tmp_path / "home").ensure()
    cfg = RunConfig.from_dict({"extract": {"limit": 64}, "eval": {"retentions": [0.25]}})
    return home, cfg, build_deployment(home, cfg, ["steps"], "0 3 * * *", "nightly-test")


def test_deployment_has_the_cron_schedule_and_the_run_parameters(deployment):
    home, cfg, d = deployment
    assert d.name == "nightly-test" and d.flow_name == "atr-run"
    assert len(d.schedules) == 1
    schedule = d.schedules[0].schedule
    assert schedule.cron == "0 3 * * *" and schedule.timezone == "UTC"
    assert d.parameters["home"] == str(home.root)
    assert d.parameters["config"] == cfg.to_dict()
    assert d.parameters["config"]["extract"]["limit"] == 64 and d.parameters["user_set"] == ["steps"]
    assert d.parameters["from_stage"] is None
    # a module path: a triggered run imports the package (a file path loads flows.py as a loose script,
    # whose relative imports fail; tests/test_stack.py triggers runs for real)
    assert d.entrypoint == "flows.orchestration.flows.run_flow"


def test_deployment_registers_on_a_prefect_server_and_reads_back(prefect_api_url, deployment):
    from prefect.client.orchestration import get_client

    home, cfg, d = deployment
    deployment_id = d.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    got = asyncio.run(read())
    assert got.name == "nightly-test"
    assert [s.schedule.cron for s in got.schedules] == ["0 3 * * *"]
    assert got.parameters["config"]["eval"]["retentions"] == [0.25]
    assert got.parameters["home"] == str(home.root)
    # The flow's signature is the deployment's parameter schema, so the UI can start runs with overrides.
    assert {"home", "config", "from_stage", "dask_address"} <= set(got.parameter_openapi_schema["properties"])


def test_bad_cron_and_missing_server_fail_in_one_line(cli_env, tmp_path):
    from conftest import assert_one_line_errors

    no_server = {k: v for k, v in cli_env.items() if k != "PREFECT_API_URL"}
    # A process of its own: Prefect reads its settings (a profile's PREFECT_API_URL too) when it starts,
    # and this test process's are the session server's.
    assert_one_line_errors([(["serve"], "needs a Prefect server: set PREFECT_API_URL")], no_server,
                           in_process=False)
    assert_one_line_errors([(["serve", "--cron", "every day"], "is not a cron expression")], cli_env)


def test_an_unreachable_prefect_server_is_one_line_with_its_url(cli_env):
    """`atr serve` (and every flow command) with PREFECT_API_URL pointing where nothing listens."""
    import socket

    from conftest import assert_one_line_errors

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = {**cli_env, "PREFECT_API_URL": url}
    assert_one_line_errors([(["serve"], f"no Prefect server answers at {url} "),
                            (["prepare-model"], f"no Prefect server answers at {url} ")], env)
