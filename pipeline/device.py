"""Where compute runs: device and dtype, torch threads, and the facts recorded about them.

Every device, dtype and thread choice of the project is made here, so ``flows/``
never imports torch itself.
"""

from __future__ import annotations

import os
from typing import Any


def default_device() -> tuple[str, str]:
    """(device, dtype): CUDA in float16 when available, else CPU in float32."""
    import torch

    return ("cuda", "float16") if torch.cuda.is_available() else ("cpu", "float32")


def set_torch_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch threads (default: $ATR_TORCH_THREADS, else one per core); returns the count.

    With several torch processes on shared cores, callers give each one thread
    (see ``flows.runtime.WORKER_ENV``)."""
    import torch

    wanted = threads or int(os.environ.get("ATR_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def torch_facts() -> dict[str, Any]:
    """The torch version and thread count, recorded with trained models and benchmarks."""
    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


__all__ = ["default_device", "set_torch_threads", "torch_facts"]
