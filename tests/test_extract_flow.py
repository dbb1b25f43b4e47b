"""The extract stage end to end: real Prefect flow, real shards, DuckDB rows and MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig
from storage.home import Home
from storage.shards import iter_features
from storage.stages import read_manifest

from conftest import REPO


def _flow(home: Home, cfg: ExtractConfig, model: str = "tiny"):
    from flows.orchestration.flows import extract_flow

    return extract_flow(str(home.root), model, cfg.to_dict())


@pytest.fixture(scope="module")
def docs_run(prefect_api_url, tmp_path_factory):
    home = Home.resolve(tmp_path_factory.mktemp("docs-home"))
    cfg = ExtractConfig(images="synthetic:docs", limit=40, shard_size=16, batch_size=8)
    first = _flow(home, cfg)
    return home, cfg, first


def test_cold_run_writes_shards_manifest_and_records(docs_run):
    home, cfg, out = docs_run
    prep, ext = out["stages"]
    assert [s["cached"] for s in out["stages"]] == [False, False]
    path = Path(ext["path"])
    m = read_manifest(path)
    assert sorted(p.name for p in path.glob("feats-*.tar")) == ["feats-000000.tar", "feats-000001.tar",
                                                               "feats-000002.tar"]
    assert m["counts"] == {"images": 40, "samples": 40, "skipped": 0, "shards": 3}
    assert m["features"] == {"dtype": "float16", "tokens_per_crop": 64, "feature_dim": 64,
                             "layout": "crops x tokens_per_crop x feature_dim"}
    assert m["inputs"]["model"] == prep["key"] and m["config"] == cfg.to_dict()
    assert m["images_per_second"] > 0 and m["seconds"] > 0
    assert not list(path.rglob("*.tmp")) and not (path.parent / f"{path.name}.tmp").exists()

    samples = list(iter_features(path, m))
    assert len(samples) == 40
    grids = {tuple(s.meta["grid"]) for s in samples}
    assert len(grids) >= 3, grids  # several aspect ratios -> several AnyRes grids
    for s in samples:
        crops = s.features.shape[0]
        assert s.features.dtype == np.float16 and s.features.shape[1:] == (64, 64)
        assert crops == 1 + s.meta["grid"][0] * s.meta["grid"][1] == len(s.meta["boxes"])
        assert s.meta["boxes"][0] == [0.0, 0.0, *map(float, s.meta["size"])]
        mask = np.array(s.meta["glyph_mask"], dtype=bool)
        assert mask.shape == (crops, 64) and mask.any() and not mask.all()


def test_run_is_recorded_in_duckdb_and_mlflow(docs_run):
    home, _, out = docs_run
    with duckdb.connect(str(home.results_db), read_only=True) as con:
        run = con.execute("SELECT flow, status, mlflow_run_id, finished_at IS NOT NULL FROM runs WHERE run_id = ?",
                          [out["run_id"]]).fetchone()
        stages = con.execute("SELECT stage, cache_key, cached, seconds, output_dir FROM stage_runs "
                             "WHERE run_id = ? ORDER BY stage", [out["run_id"]]).fetchall()
    assert run == ("extract", "completed", out["mlflow_run_id"], True)
    assert [(s[0], s[2]) for s in stages] == [("extract", False), ("prepare-model", False)]
    assert stages[0][1] == out["stages"][1]["key"] and stages[0][4] == out["stages"][1]["path"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home.mlflow_db}")
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["extract.images"] == "synthetic:docs"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"prepare-model", "extract"}
    ext = by_name["extract"]
    assert ext.data.metrics["images_per_second"] > 0
    assert ext.data.params["config.limit"] == "40"
    assert [a.path for a in client.list_artifacts(ext.info.run_id)] == ["_manifest.json"]


def test_second_identical_run_is_a_cache_hit_without_model_work(docs_run):
    from pipeline import loading

    home, cfg, first = docs_run
    loading._LOADED.clear()
    before = {p: p.stat().st_mtime_ns for p in Path(first["stages"][1]["path"]).iterdir()}
    again = _flow(home, ExtractConfig(**{**cfg.to_dict(), "batch_size": 4}))  # batch size is not part of the key
    assert [s["cached"] for s in again["stages"]] == [True, True]
    assert again["stages"][1]["key"] == first["stages"][1]["key"]
    assert loading._LOADED == {}  # no model was loaded
    assert {p: p.stat().st_mtime_ns for p in Path(first["stages"][1]["path"]).iterdir()} == before
    with duckdb.connect(str(home.results_db), read_only=True) as con:
        cached = con.execute("SELECT stage, cached FROM stage_runs WHERE run_id = ? ORDER BY stage",
                             [again["run_id"]]).fetchall()
    assert cached == [("extract", True), ("prepare-model", True)]


def test_prefect_cache_keys_are_the_stage_hashes(docs_run):
    """Prefect 3 stores a cached task's result record under its cache key."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    _, _, first = docs_run
    key = first["stages"][1]["key"]
    records = {p.name for p in Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).iterdir()}
    assert {f"{key}-{i:06d}" for i in range(3)} <= records
    assert first["stages"][0]["key"] in records
    record = json.loads((Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()) / f"{key}-000000").read_text())
    assert record["metadata"]["serializer"]["type"] == "json"  # never pickle


def test_deleting_the_stage_dir_recomputes_it_identically(docs_run, tmp_path):
    import shutil

    home, cfg, first = docs_run
    path = Path(first["stages"][1]["path"])
    digests = {p.name: p.read_bytes() for p in path.glob("feats-*.tar")}
    shutil.move(str(path), str(tmp_path / "moved"))
    again = _flow(home, cfg)
    assert again["stages"][1]["cached"] is False and again["stages"][0]["cached"] is True
    assert {p.name: p.read_bytes() for p in path.glob("feats-*.tar")} == digests


def test_bad_images_are_skipped_with_a_warning_and_counted(prefect_api_url, tmp_path, capsys):
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i, size in enumerate([(120, 80), (80, 120), (100, 100)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"good{i}.jpg", quality=90)
    good = (folder / "good0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    home = Home.resolve(tmp_path / "home")
    out = _flow(home, ExtractConfig(images=str(tmp_path / "imgs"), limit=None, shard_size=4))
    m = out["stages"][1]["manifest"]
    assert m["counts"] == {"images": 5, "samples": 3, "skipped": 2, "shards": 2}
    skipped = {s["image_id"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"nested/truncated.jpg", "nested/empty.jpg"}
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and any("truncated.jpg" in w for w in warnings) and any("empty.jpg" in w for w in warnings)
    samples = list(iter_features(Path(out["stages"][1]["path"]), read_manifest(Path(out["stages"][1]["path"]))))
    assert sorted(s.meta["image_id"] for s in samples) == ["nested/good0.jpg", "nested/good1.jpg", "nested/good2.jpg"]
    assert all(s.meta["glyph_mask"] is None for s in samples)


def _final_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.is_dir() and not p.name.endswith(".tmp")]


def _atr(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


# slow (64 s): tests/test_reliability_crash.py kills an extraction and checks the same bytes in the default run
@pytest.mark.slow
def test_killed_extraction_resumes_to_identical_bytes(cli_env, tmp_path, prefect_api_url):
    """SIGKILL `atr extract` mid-run; the resumed run equals an uninterrupted one byte for byte."""
    args = ["extract", "--model", "tiny", "--images", "synthetic:docs", "--limit", "480", "--shard-size", "16",
            "--batch-size", "8"]
    ref_env = {**cli_env, "ATR_HOME": str(tmp_path / "ref-home")}
    ref = _atr(ref_env, *args)
    assert ref.returncode == 0, ref.stderr
    ref_dir, = _final_dirs(tmp_path / "ref-home" / "stages" / "extract")
    reference = {p.name: p.read_bytes() for p in ref_dir.glob("feats-*.tar")}
    assert len(reference) == 30

    home = Path(cli_env["ATR_HOME"])
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    work = None
    while time.monotonic() < deadline:
        tmps = list((home / "stages" / "extract").glob("*.tmp")) if (home / "stages" / "extract").exists() else []
        if tmps and len(list(tmps[0].glob("feats-*.tar"))) >= 5:
            work = tmps[0]
            break
        assert proc.poll() is None, "extraction finished before it could be killed"
        time.sleep(0.01)
    assert work is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(work.glob("feats-*.tar")))
    assert 5 <= partial < 30
    assert _final_dirs(home / "stages" / "extract") == []  # nothing a cache lookup could take

    resumed = _atr(cli_env, *args)
    assert resumed.returncode == 0, resumed.stderr
    final = work.parent / work.name[: -len(".tmp")]
    m = read_manifest(final)
    assert m["counts"]["samples"] == 480 and m["resumed_shards"] >= partial - 1
    assert {p.name: p.read_bytes() for p in final.glob("feats-*.tar")} == reference
    keys = [s.key for s in iter_features(final, m)]
    assert len(keys) == len(set(keys)) == 480  # 0 lost, 0 duplicated
