"""Rows of an (N, N) token-pair matrix on demand, for greedy selectors that read one row per pick
(DivPrune's distances, CDPruner's DPP kernel) on images too large for the whole matrix."""

from __future__ import annotations

from typing import Callable

import torch

# Matrix elements up to which a selector builds the whole (N, N) matrix at once: 64 MB of float32.
# Every LLaVA-NeXT image (5 x 576 tokens: 8.3 M) and every crop fits; a whole OneVision page
# (22.6k tokens: 511 M, 2 GB) does not, and goes row by row.
DENSE_LIMIT = 1 << 24


class PickedRows:
    """Row j of a matrix whose rows ``block(ids)`` computes, (M,) ids -> (M, N), for the j a greedy loop
    picks. A miss computes the rows of the ``size`` likeliest next picks at once (the top of the
    loop's current scores: greedy picks mostly come from there), one matrix product instead of a
    matrix-vector product per pick, which is bandwidth-bound. Memory: ``size`` rows."""

    def __init__(self, block: Callable[[torch.Tensor], torch.Tensor], n: int, size: int):
        self.block, self.size = block, max(1, min(size, n))
        self.rows: torch.Tensor | None = None
        self.where: dict[int, int] = {}
        self.blocks = 0  # how many blocks were computed

    def get(self, j: int, scores: torch.Tensor) -> torch.Tensor:
        """Row j; on a miss, also the rows of the highest ``scores`` (N,)."""
        if j not in self.where:
            top = scores.topk(self.size).indices
            ids = torch.cat([top.new_tensor([j]), top[top != j]])[:self.size]
            self.rows, self.where = self.block(ids), {int(i): r for r, i in enumerate(ids.tolist())}
            self.blocks += 1
        return self.rows[self.where[j]]


def block_rows(n: int, limit: int = DENSE_LIMIT, cap: int = 256) -> int:
    """Rows per block for an (N, N) matrix within ``limit`` elements: at least 16, at most ``cap``."""
    return max(16, min(cap, limit // max(n, 1)))
