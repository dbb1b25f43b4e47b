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


def random_selector_file(directory: Path) -> Path:
    """A selector checkpoint in the train stage's format for the tiny presets (L = 16, C = 64), random
    weights from seed 0, 1 + 1 layers: for tests of the plumbing, not of the selector."""
    import torch

    from pipeline.selector import SelectorConfig, TokenSelector
    from storage.checkpoints import save_checkpoint

    torch.manual_seed(0)
    cfg = SelectorConfig(selector_layers=1, reconstructor_layers=1, n_heads=4)
    sel = TokenSelector(cfg, tokens=16, channels=64)
    return save_checkpoint(Path(directory) / "selector-p0.25.safetensors", sel.state_dict(),
                           {"config": cfg.to_dict(), "tokens": 16, "channels": 64, "retention": 0.25})
