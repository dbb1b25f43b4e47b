"""Scale-out: extraction shards and eval shards mapped over a real distributed.LocalCluster equal a serial
run's results."""

from __future__ import annotations

import pytest

from flows.runtime import WORKER_ENV


@pytest.fixture(scope="module")
def cluster():
    import distributed  # a dependency (through prefect-dask): never skipped

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  env=dict(WORKER_ENV)) as c:
        yield c


def _extract(home, address=None):
    from flows.orchestration.flows import extract_flow
    from flows.orchestration.dask import task_runner

    cfg = {"images": "synthetic:docs", "limit": 24, "shard_size": 6, "batch_size": 4}
    flow = extract_flow if address is None else extract_flow.with_options(task_runner=task_runner(address))
    return flow(str(home), "tiny", cfg)


def test_extraction_on_two_dask_workers_equals_serial_byte_for_byte(prefect_api_url, tmp_path, cluster):
    from storage.home import Home

    serial = _extract(Home.resolve(tmp_path / "serial").ensure().root)
    dask = _extract(Home.resolve(tmp_path / "dask").ensure().root, address=cluster.scheduler_address)
    s_ext, d_ext = serial["stages"][-1], dask["stages"][-1]
    assert not s_ext["cached"] and not d_ext["cached"]
    assert s_ext["key"] == d_ext["key"]  # same config, same content hash
    s_shards, d_shards = s_ext["manifest"]["shards"], d_ext["manifest"]["shards"]
    assert len(s_shards) == 4 and [s["count"] for s in s_shards] == [6, 6, 6, 6]
    assert s_shards == d_shards  # names, counts, bytes and sha256 of every shard
    from pathlib import Path

    for s in s_shards:
        assert (Path(s_ext["path"]) / s["name"]).read_bytes() == (Path(d_ext["path"]) / s["name"]).read_bytes()
    # The shards really ran on the workers: each worker process holds a loaded model now.
    loaded = cluster_models(cluster)
    assert sum(loaded.values()) >= 1, loaded


def test_eval_shards_on_two_dask_workers_equal_serial(prefect_api_url, tmp_path, cluster):
    import json
    from pathlib import Path

    from flows.orchestration.dask import task_runner
    from flows.orchestration.flows import eval_flow
    from pipeline.evaluate import EvalConfig
    from storage.home import Home

    cfg = EvalConfig(benchmarks=("synthetic-ocr",), strategies=("full", "random"), retentions=(0.25,), seeds=1,
                     limit=12, shard_size=4, batch_size=4).to_dict()
    outs = []
    for name, flow in (("serial", eval_flow),
                       ("dask", eval_flow.with_options(task_runner=task_runner(cluster.scheduler_address)))):
        home = Home.resolve(tmp_path / name).ensure()
        out = flow(str(home.root), "tiny", cfg)
        samples = {}
        for p in sorted((home.stages / "eval").glob("*/samples.json")):
            c = json.loads((p.parent / "_manifest.json").read_text())["config"]
            for r in json.loads(Path(p).read_text()):  # keys differ by home (the data file's path is an input)
                samples[(c["strategy"], c["retention"], c["seed"], r["sample_id"])] = r["prediction"]
        outs.append((out, samples))
    (serial, s_samples), (dask, d_samples) = outs
    assert serial["figures"]["shards"] == dask["figures"]["shards"] == 3
    assert serial["figures"]["tower_passes"] == dask["figures"]["tower_passes"] == 12
    assert len(s_samples) == 2 * 12 and s_samples == d_samples  # same keys, same predictions


def cluster_models(cluster) -> dict[str, int]:
    from distributed import Client

    def count() -> int:
        from pipeline import loading

        return len(loading._LOADED)

    with Client(cluster.scheduler_address) as client:
        return client.run(count)


def test_dask_options_are_checked_before_any_flow(cli_env):
    from conftest import assert_one_line_errors

    assert_one_line_errors([
        (["run", "--dask-address", "localhost:8786"], "tcp://HOST:PORT"),
        (["run", "--dask-workers", "0"], "at least 1"),
    ], cli_env)


def test_local_cluster_workers_get_passive_single_thread_env():
    from flows.orchestration.dask import task_runner

    runner = task_runner(dask_workers=2)
    kw = runner.cluster_kwargs
    assert kw["n_workers"] == 2 and kw["threads_per_worker"] == 1 and kw["processes"] is True
    assert kw["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and kw["env"]["OMP_NUM_THREADS"] == "1"
    assert task_runner() is None  # no cluster asked for: tasks run in the flow's process
