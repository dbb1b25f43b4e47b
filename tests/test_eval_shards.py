"""Evaluation at scale: one tower pass per image per sweep, results cached per shard, bad rows skipped,
length-grouped batches, and a batch size that adapts to memory."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.evaluate import EvalConfig


def _run(home, trained_stage, cfg, **kw):
    from flows.stages.eval import eval_chunks, plan_eval

    plan = plan_eval(home, trained_stage, cfg, kw.pop("selector", None), kw.pop("data", {}))
    return plan, eval_chunks(home, cfg, trained_stage, plan, **kw)


def test_the_tower_runs_once_per_image_per_sweep_and_an_addition_costs_one_more(session_home, trained_stage):
    home = session_home  # where trained_stage lives; the keys below are this test's own (limit 20, shards of 8)
    cfg = EvalConfig(strategies=("full", "none", "random", "attention"), retentions=(0.25, 0.5), seeds=2,
                     limit=20, shard_size=8, batch_size=8)
    plan, run = _run(home, trained_stage, cfg)
    f = run.figures
    # 2 benchmarks x 20 images, in shards of 8, 8, 4: each image encoded once for all 14 results
    assert len(plan) == 2 * (1 + 1 + 2 * 2 + 2) and f["shards"] == 6
    assert f["images"] == f["tower_passes"] == 40
    assert f["computed"] == f["shard_results"] == 3 * len(plan)
    assert all(not o.cached and o.manifest["counts"]["samples"] == 20 for _, o in run.results)

    more = EvalConfig(**{**cfg.to_dict(), "strategies": cfg.strategies + ("diversity",)})
    plan2, run2 = _run(home, trained_stage, more)
    assert run2.figures["tower_passes"] == 40  # one more pass per image for the addition, not one per result
    assert run2.figures["computed"] == 2 * 3 * 2  # diversity at two retentions, 3 shards per benchmark
    old = {c.key: o for c, o in run.results}
    for c, o in run2.results:
        assert o.cached == (c.key in old)

    _, run3 = _run(home, trained_stage, more)
    assert run3.figures["tower_passes"] == 0 and run3.figures["computed"] == 0
    assert all(o.cached for _, o in run3.results)


def test_results_do_not_depend_on_how_the_rows_are_cut(session_home, trained_stage):
    """Random keeps are seeded per row, so one shard of 20 and shards of 7 give the same predictions."""
    import json

    home = session_home
    base = dict(benchmarks=("synthetic-ocr",), strategies=("full", "random"), retentions=(0.25,), seeds=1,
                limit=20, batch_size=8)
    preds = []
    for size in (20, 7):
        _, run = _run(home, trained_stage, EvalConfig(**base, shard_size=size))
        preds.append({(c.strategy, r["sample_id"]): r["prediction"] for c, o in run.results
                      for r in json.loads((o.path / "samples.json").read_text())})
    assert len(preds[0]) == 40 and preds[0] == preds[1]


def _docvqa_parquet(path, images: list[bytes]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"questionId": str(i), "question": "What is written in the image?", "answers": ["X"],
             "image": {"bytes": b, "path": None}} for i, b in enumerate(images)]
    schema = pa.schema([("questionId", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string())),
                        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)
    return path


def _png(size=(90, 60), colour=(250, 250, 250)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_corrupt_image_or_bad_row_is_skipped_with_one_warning_and_counted(tmp_path, session_home, trained_stage,
                                                                           capsys):
    good = _png()
    data = _docvqa_parquet(tmp_path / "docvqa.parquet",
                           [good, good[:40], good, b"", good, b"not an image at all", good])
    home = session_home
    cfg = EvalConfig(benchmarks=("docvqa_val",), strategies=("full", "random"), retentions=(0.25,), seeds=1,
                     limit=7, shard_size=4, batch_size=4)
    _, run = _run(home, trained_stage, cfg, data={"docvqa_val": str(data)})
    assert run.figures["skipped"] == 3 and run.figures["images"] == 4
    for _, o in run.results:
        assert o.manifest["summary"]["n_samples"] == 4 and o.manifest["counts"]["skipped"] == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(err) == 3, err
    assert any("docvqa_val row 1: undecodable image" in line for line in err)
    assert any("docvqa_val row 3: empty image cell" in line for line in err)


def test_grouping_by_length_cuts_the_left_padding(trained_model):
    """synthetic-ocr mixes 64x64 to 128x128 images (32 to 80 visual tokens): batching by length leaves less
    left padding than batching in row order, with the same answers."""
    from pipeline.evaluate import Batching, Pruning, encode_shard, evaluate_features
    from pipeline.synthetic import generate_samples
    from pipeline.benchmarks import EvalItem

    model, processor = trained_model
    samples = generate_samples("synthetic-ocr", "test", 48)
    items = [EvalItem(s.question_id, s.image, s.question, [s.answer]) for s in samples]
    shard = encode_shard(model, processor, items, batch_size=16)
    plain = evaluate_features(model, processor, "synthetic-ocr", shard, Pruning("full", 1.0),
                              batching=Batching(8, group=False))
    grouped = evaluate_features(model, processor, "synthetic-ocr", shard, Pruning("full", 1.0),
                                batching=Batching(8, group=True))
    share = [r.padding / r.positions for r in (plain, grouped)]
    print(f"\nleft padding share, synthetic-ocr, batch 8: row order {share[0]:.1%}, grouped by length {share[1]:.1%}")
    assert share[1] < 0.5 * share[0]
    assert [r["prediction"] for r in plain.samples] == [r["prediction"] for r in grouped.samples]


def test_auto_batch_size_grows_until_memory_runs_short_and_is_fixed_on_a_cpu():
    from pipeline.evaluate import AUTO_BATCH_CPU, BatchSizer

    assert BatchSizer("auto", "cpu").size == AUTO_BATCH_CPU and BatchSizer(5, "cuda:0").size == 5
    sizer = BatchSizer("auto", "cuda:0")
    calls = []

    def call(start, stop):  # a stand-in for generate on a GPU that holds at most 20 sequences
        calls.append(stop - start)
        if stop - start > 20:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return list(range(start, stop))

    out = sizer.run(200, call)
    assert [i for part in out for i in part] == list(range(200))  # every item once, in order
    assert calls[:4] == [8, 16, 32, 16] and max(c for c in calls[4:]) == 16 and sizer.size == 16
    fixed = BatchSizer(32, "cuda:0")
    with pytest.raises(torch.OutOfMemoryError):
        fixed.run(100, call)  # a fixed size is the user's: no silent retry
