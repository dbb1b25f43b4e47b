"""Where compute runs: device and dtype, torch threads, and the facts recorded about them.

Every device, dtype and thread choice of the project is made here, so ``flows/``
never imports torch itself.

``--device auto|cpu|cuda``: auto is CUDA when present. ``--dtype auto|bf16|fp16|fp32``
(the model's weights and activations): auto is bf16 on a CUDA device that
supports it (fp16 on one that does not) and fp32 on the CPU. Resolved values are
torch names (``cuda``, ``bfloat16``), recorded in manifests and, where they change
results, in cache keys.
"""

from __future__ import annotations

import os
from typing import Any

from .config import DEVICES, DTYPES, ConfigError, check_compute

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``cuda``; ``--device cuda`` without a CUDA device is one clear line."""
    import torch

    check_compute(device, "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                          "use --device auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """The torch dtype name for ``dtype`` on the resolved ``device``."""
    import torch

    check_compute("auto", dtype)
    if dtype == "auto":
        if device == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--dtype bf16: this CUDA device does not support bfloat16; use --dtype fp16 or auto")
    return TORCH_DTYPES[dtype]


def compute(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """(device, dtype) resolved, e.g. ``("cuda", "bfloat16")`` or ``("cpu", "float32")``."""
    d = resolve_device(device)
    return d, resolve_dtype(dtype, d)


def default_device() -> tuple[str, str]:
    """(device, dtype) of ``--device auto --dtype auto``."""
    return compute("auto", "auto")


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


__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype", "compute", "default_device",
           "set_torch_threads", "torch_facts"]
