"""Scale-out: extraction shards and eval shards mapped over a real distributed.LocalCluster equal a serial
run's results; with CUDA, one worker per GPU, each pinned to its device (here with a stand-in device list)."""

from __future__ import annotations

import os

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

    runner = task_runner(dask_workers=2, gpus=[])  # no CUDA device (a stand-in, so a GPU box agrees)
    kw = runner.cluster_kwargs
    assert kw["n_workers"] == 2 and kw["threads_per_worker"] == 1 and kw["processes"] is True
    assert kw["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and kw["env"]["OMP_NUM_THREADS"] == "1"
    assert task_runner() is None  # no cluster asked for: tasks run in the flow's process


# ---------------------------------------------------------------- one worker per GPU (a stand-in device list)

def test_gpu_workers_start_one_per_device_each_pinned_to_it():
    """The cluster prefect-dask's runner starts for --dask-workers 2 with two CUDA devices: two worker processes,
    each seeing its own device first in CUDA_VISIBLE_DEVICES (so its ``cuda`` is that GPU), with the passive
    worker environment and the cores shared out. The devices are a stand-in: this machine has no GPU."""
    from flows.orchestration.dask import gpu_cluster, task_runner

    runner = task_runner(dask_workers=2, device="auto", gpus=["0", "1"])
    assert runner.cluster_class is gpu_cluster and runner.cluster_kwargs["devices"] == ["0", "1"]

    def facts(dask_worker) -> dict:  # client.run passes the worker in
        return {"name": dask_worker.name, "pid": os.getpid(), "nthreads": dask_worker.state.nthreads,
                **{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                  "ATR_TORCH_THREADS")}}

    with runner:  # what a flow on this runner does: prefect-dask builds the cluster from cluster_class/kwargs
        seen = sorted(runner.client.run(facts).values(), key=lambda f: f["name"])
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert [(f["name"], f["CUDA_VISIBLE_DEVICES"]) for f in seen] == [("cuda-0", "0,1"), ("cuda-1", "1,0")]
    assert len({f["pid"] for f in seen}) == 2 and os.getpid() not in {f["pid"] for f in seen}
    for f in seen:
        assert f["nthreads"] == 1  # one task at a time per GPU: one model, one batch in its memory
        assert (f["OMP_WAIT_POLICY"], f["OMP_NUM_THREADS"], f["ATR_TORCH_THREADS"]) == ("PASSIVE", threads, threads)


def test_gpu_worker_count_follows_the_devices():
    from flows.orchestration.dask import pinned_visible_devices, task_runner, worker_devices
    from pipeline.config import ConfigError

    gpus = ["2", "5", "7"]  # CUDA_VISIBLE_DEVICES=2,5,7 as cuda_devices() names them
    assert worker_devices(2, "auto", gpus) == ["2", "5"] and worker_devices(3, "cuda", gpus) == gpus
    assert pinned_visible_devices(gpus) == ["2,5,7", "5,7,2", "7,2,5"]
    assert worker_devices(4, "cpu", gpus) == []  # --device cpu: CPU workers, as many as asked
    assert worker_devices(4, "auto", []) == []  # no CUDA: CPU workers, as today
    assert task_runner(dask_workers=4, device="cpu", gpus=gpus).cluster_kwargs["n_workers"] == 4
    for workers, device, devices, needle in ((4, "auto", gpus, "--dask-workers 4 is more than the 3 CUDA devices"),
                                             (2, "cuda", ["0"], "--dask-workers 2 is more than the 1 CUDA device "),
                                             (1, "cuda", [], "--device cuda --dask-workers 1: no CUDA device")):
        with pytest.raises(ConfigError, match=needle) as err:
            task_runner(dask_workers=workers, device=device, gpus=devices)
        assert "\n" not in str(err.value)


def test_without_cuda_there_are_no_gpu_workers(monkeypatch):
    """pipeline.device.cuda_devices() is what the CLI asks: [] without CUDA, so --dask-workers stays on CPU."""
    import torch

    from flows.orchestration.dask import worker_devices
    from pipeline.device import cuda_devices

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: test_each_gpu_worker_drives_its_own_gpu checks it")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert cuda_devices() == []  # the CPU torch wheel: CUDA_VISIBLE_DEVICES names devices torch cannot see
    assert worker_devices(2, "auto") == []


@pytest.mark.gpu
def test_each_gpu_worker_drives_its_own_gpu():
    """On a CUDA machine: --dask-workers <GPU count> starts one worker per GPU, and each worker's ``cuda`` is a
    different physical device; one worker more is one line naming both numbers."""
    from flows.orchestration.dask import task_runner
    from pipeline.config import ConfigError
    from pipeline.device import cuda_devices

    gpus = cuda_devices()
    assert gpus, "no CUDA device"

    def device(dask_worker) -> dict:
        import torch

        props = torch.cuda.get_device_properties(0)
        return {"name": dask_worker.name, "visible": torch.cuda.device_count(), "uuid": str(getattr(props, "uuid", "")),
                "first": os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]}

    runner = task_runner(dask_workers=len(gpus))
    with runner:
        seen = list(runner.client.run(device).values())
    assert sorted(f["first"] for f in seen) == sorted(gpus)
    assert len({f["uuid"] for f in seen}) == len(gpus)
    with pytest.raises(ConfigError, match=f"--dask-workers {len(gpus) + 1} is more than the {len(gpus)} CUDA"):
        task_runner(dask_workers=len(gpus) + 1)
