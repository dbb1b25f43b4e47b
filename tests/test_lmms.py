"""The ``[lmms]`` extra installs a working lmms-eval on the CPU torch wheel (issue: lmms-eval, item 5).

Run by ``.ci/run`` in a second, clean venv (``pip install torch==2.13.0 -c constraints.txt -e '.[dev,lmms]'``,
``pytest -m lmms``). The three snags of lmms-eval 0.7.3 with the CPU wheel, each checked:
the torchvision pip picks must be the one made for this torch, and its CUDA-only extension
must not break ``import transformers``; filelock must stay below 4; decord must be there.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

pytestmark = pytest.mark.lmms


def _release(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in md.version(name).split("+")[0].split(".")[:2])


def test_torchvision_is_the_release_made_for_this_torch_and_imports():
    import torch

    # torchvision 0.N pairs with torch 2.(N - 15): 0.28 <-> 2.13
    assert _release("torchvision")[1] == _release("torch")[1] + 15, (md.version("torch"), md.version("torchvision"))
    import torchvision
    import transformers  # imports torchvision whenever it is installed
    from transformers import LlavaOnevisionForConditionalGeneration  # noqa: F401

    from pipeline import compat

    # on the CPU wheel PyPI's (CUDA) torchvision cannot load its extension: the guard stood in
    assert (compat._LIBRARY is not None) == (torch.version.cuda is None)
    assert torchvision.__version__ and transformers.__version__


def test_filelock_below_4_and_decord_are_installed():
    import decord  # noqa: F401
    import filelock._api  # noqa: F401  (lmms-eval's evaluator imports it; filelock 4 removed it)

    assert _release("filelock")[0] < 4


def test_lmms_eval_evaluator_and_task_registry_load_offline():
    import lmms_eval.evaluator  # noqa: F401
    from lmms_eval.tasks import TaskManager

    tasks = TaskManager().all_tasks
    assert {"docvqa_val", "chartqa", "textvqa_val", "ai2d", "mmstar", "scienceqa_img", "gqa", "mmmu_val",
            "mmbench_en_dev", "infovqa_val"} <= set(tasks)


def _docvqa_parquet(path, n: int = 6):
    """A DocVQA validation parquet in the lmms-lab layout (HF features metadata included, as the real
    files have), holding tiny-world OCR pages."""
    import io

    import datasets

    from pipeline.synthetic import generate_samples

    samples = generate_samples("synthetic-ocr", "test", n, seed=0)

    def png(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": "page.png"}

    string, strings = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    features = datasets.Features({"questionId": string, "question": string, "question_types": strings,
                                  "image": datasets.Image(), "docId": datasets.Value("int64"),
                                  "ucsf_document_id": string, "ucsf_document_page_no": string, "answers": strings,
                                  "data_split": string})
    datasets.Dataset.from_dict({
        "questionId": [str(i) for i in range(n)], "question": [s.question for s in samples],
        "question_types": [["layout"]] * n, "image": [png(s.image) for s in samples], "docId": list(range(n)),
        "ucsf_document_id": ["a"] * n, "ucsf_document_page_no": ["1"] * n, "answers": [[s.answer] for s in samples],
        "data_split": ["val"] * n}, features=features).to_parquet(str(path))
    return path


def test_the_plugin_is_registered_as_a_chat_model():
    from lmms_eval.models import get_model

    from flows.lmms.model import AtrLlava

    cls = get_model("atr_llava")
    assert cls is AtrLlava and cls.is_simple is False


def test_lmms_evals_own_docvqa_task_runs_pruned_from_a_local_parquet(tmp_path, monkeypatch):
    """lmms-eval's real docvqa_val definition (prompt, generation settings, ANLS), pointed at a local
    parquet through dataset_kwargs.data_files, run offline on tiny-trained through atr_llava."""
    import lmms_eval
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from flows.lmms.model import AtrLlava

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = _docvqa_parquet(tmp_path / "docvqa-val.parquet")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    base = Path(lmms_eval.__file__).parent / "tasks" / "docvqa" / "docvqa_val.yaml"
    (tasks / "docvqa_val_local.yaml").write_text(
        f"task: docvqa_val_local\ninclude: {base}\ndataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n")
    manager = TaskManager(include_path=str(tasks))
    anls = {}
    for strategy, retention in (("full", 1.0), ("random", 0.25)):
        model = AtrLlava(pretrained="tiny-trained", strategy=strategy, retention=retention, batch_size=3,
                         home=str(tmp_path / "home"))
        out = simple_evaluate(model=model, tasks=["docvqa_val_local"], task_manager=manager, log_samples=True,
                              batch_size=3)
        anls[strategy] = out["results"]["docvqa_val_local"]["anls,none"]
        samples = out["samples"]["docvqa_val_local"]
        assert len(samples) == 6 and all(isinstance(s["resps"][0][0], str) for s in samples)
    # tiny-trained reads the pages; a random quarter of the tokens loses most glyphs (as in atr eval)
    assert anls["full"] >= 0.6 and anls["random"] < anls["full"], anls
    # the other family through the same plugin: tiny-ov-trained, its selector-free peers at 0.25
    for strategy, retention in (("full", 1.0), ("divprune", 0.25)):
        model = AtrLlava(pretrained="tiny-ov-trained", strategy=strategy, retention=retention, batch_size=3,
                         home=str(tmp_path / "home"))
        assert type(model.model).__name__ == "LlavaOnevisionForConditionalGeneration"
        out = simple_evaluate(model=model, tasks=["docvqa_val_local"], task_manager=manager, log_samples=True,
                              batch_size=3)
        anls[f"ov-{strategy}"] = out["results"]["docvqa_val_local"]["anls,none"]
    assert anls["ov-full"] >= 0.6 and anls["ov-divprune"] >= 0.5, anls


def test_bad_model_args_are_one_line():
    from flows.lmms.model import AtrLlava
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as err:
        AtrLlava(pretrained="tiny", stratgy="random")
    assert "\n" not in str(err.value) and "stratgy" in str(err.value) and "valid: pretrained, strategy" in str(err.value)
    with pytest.raises(ConfigError, match="strategy=selector needs selector=CKPT"):
        AtrLlava(pretrained="tiny", strategy="selector")


def test_atr_eval_harness_lmms_eval_runs_caches_and_records(tmp_path, cli_env):
    """``atr eval --harness lmms-eval`` as a user runs it: lmms-eval's docvqa_val from a local parquet,
    one cached stage per (task, strategy, retention, seed), rows in eval_scores and eval_samples."""
    import subprocess
    import sys

    import duckdb

    from conftest import REPO, assert_one_line_errors

    data = _docvqa_parquet(tmp_path / "docvqa-val.parquet")
    env = {**cli_env, "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "flows.cli", "eval", "--harness", "lmms-eval", "--tasks", "docvqa_val",
            "--data", str(data), "--strategies", "full,random", "--retentions", "0.25", "--seeds", "1",
            "--limit", "6", "--batch-size", "3"]
    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "lmms-eval harness" in first.stdout and "│ docvqa_val │ full" in first.stdout
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = [line for line in again.stdout.splitlines() if "│ docvqa_val │" in line]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes │") for line in rows)  # both results cached
    con = duckdb.connect(str(Path(env["ATR_HOME"]) / "results.duckdb"), read_only=True)
    try:
        scores = dict(con.execute("SELECT strategy, score FROM eval_scores WHERE benchmark = 'docvqa_val' "
                                  "AND metric = 'anls' GROUP BY strategy, score").fetchall())
        samples = con.execute("SELECT count(*), count(DISTINCT run_id) FROM eval_samples").fetchone()
    finally:
        con.close()
    assert scores["full"] > scores["random"] and samples == (2 * 2 * 6, 2)
    assert_one_line_errors([
        (["eval", "--harness", "lmms-eval", "--tasks", "docvqa_vall"],
         "unknown lmms-eval task 'docvqa_vall'; nearest: docvqa_val"),
        (["eval", "--harness", "lmms-eval", "--tasks", "docvqa_val", "--data", str(tmp_path / "nothing.parquet")],
         "no parquet file there"),
    ], env)


def test_a_parquet_without_image_features_metadata_is_refused_in_one_line(tmp_path):
    """lmms-eval decodes images only when the parquet's Hugging Face metadata says so: a plain
    {bytes, path} struct column would crash inside its task code, so --data refuses it up front."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.stages.lmms_eval import _data_fingerprint
    from pipeline.config import ConfigError

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"question": ["q"], "image": [{"bytes": b"\x89PNG", "path": None}]}), plain)
    with pytest.raises(ConfigError, match=r"plain\.parquet: image columns image carry no Hugging Face features"):
        _data_fingerprint(str(plain))
    good = tmp_path / "DocVQA" / "validation-00000-of-00001.parquet"
    good.parent.mkdir()
    _docvqa_parquet(good, 1)
    assert len(_data_fingerprint(str(good))) > 8 and len(_data_fingerprint(str(good.parent))) > 8
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        _data_fingerprint(str(tmp_path / "x.parquet") if (tmp_path / "x.parquet").write_text("no") else "")
