"""Test-only helpers over the eval stage and pipeline.evaluate (moved out of the library: no caller
outside the tests)."""

from __future__ import annotations

from pathlib import Path

from flows.stages.eval import shard_items
from pipeline.evaluate import AUTO_BATCH_CPU, Batching, Inputs, Pruning, encode_shard, evaluate_features
from pipeline.strategies import tower_outputs


def benchmark_items(benchmark: str, files: list[Path], limit: int, start: int = 0):
    """EvalItems of rows ``start`` to ``limit`` of a benchmark's parquet files (only those rows are read).
    A row that cannot be built raises one line naming it (``shard_items`` skips such rows instead)."""
    from pipeline.benchmarks import BadRow

    items, _, skipped = shard_items(benchmark, files, start, limit)
    if skipped:
        raise BadRow(skipped[0][1])
    return items


def evaluate_chunk(model, processor, benchmark: str, items, strategy: str, retention: float, seed: int = 0,
                   batch_size: int | str = 16, relevance=None):
    """``encode_shard`` then ``evaluate_features``: one result on ``items``."""
    shard = encode_shard(model, processor, items, outputs=tower_outputs([strategy], relevance is not None),
                         batch_size=batch_size if isinstance(batch_size, int) else AUTO_BATCH_CPU)
    return evaluate_features(model, processor, benchmark, shard, Pruning(strategy, retention, seed),
                             Inputs(relevance=relevance), Batching(batch_size))
