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


def cuda_devices() -> list[str]:
    """The CUDA devices this process may use, named as ``CUDA_VISIBLE_DEVICES`` names them (``["0", "1"]``,
    or ``["2", "3"]`` / ``GPU-<uuid>`` entries when it is set); ``[]`` without CUDA.

    A Dask worker pinned to device ``i`` gets ``CUDA_VISIBLE_DEVICES`` starting with this list's ``i``-th
    entry, so its ``cuda`` is that GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    # CUDA stops at the first invalid entry; device_count() already counts only the ones before it.
    return [v.strip() for v in visible.split(",") if v.strip()][:count]


def thread_count(threads: int | None = None) -> int:
    """The torch thread count to use: ``threads`` when given, else $ATR_TORCH_THREADS, else $OMP_NUM_THREADS
    (its first level when nested, ``4,2``), else one per core. A bad ATR_TORCH_THREADS is one line; a bad
    OMP_NUM_THREADS is ignored, as OpenMP ignores it."""
    if threads:
        return int(threads)
    own = os.environ.get("ATR_TORCH_THREADS", "").strip()
    if own and own != "0":  # 0: unset, as before
        if not own.isdigit():
            raise ConfigError(f"ATR_TORCH_THREADS={own!r}: give a positive number of torch threads")
        return int(own)
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return os.cpu_count() or 1


def set_torch_threads(threads: int | None = None) -> int:
    """Use ``threads`` torch threads (default: :func:`thread_count`: $ATR_TORCH_THREADS, then
    $OMP_NUM_THREADS, then one per core); returns the count.

    With several torch processes on shared cores, callers give each one thread
    (see ``flows.runtime.WORKER_ENV``, which sets both variables)."""
    import torch

    wanted = thread_count(threads)
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def torch_facts() -> dict[str, Any]:
    """The torch version and thread count, recorded with trained models and benchmarks."""
    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


__all__ = ["DEVICES", "DTYPES", "resolve_device", "resolve_dtype", "compute", "default_device",
           "cuda_devices", "thread_count", "set_torch_threads", "torch_facts"]
