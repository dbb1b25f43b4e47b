"""Memory before allocation: does a model fit where it is about to be built, and how many tokens fit in
one generate batch.

A model's need is its parameter bytes at the dtype it is loaded in, plus a stated margin: ``+20 %`` and a
fixed ``+1 GiB`` (activations, the allocator, the runtime). Parameters are counted without allocating:
on the meta device for a sized preset (``builders.on_meta``), from the safetensors headers for a
checkpoint folder (each tensor's dtype and shape; floating tensors are counted at the target dtype,
as ``from_pretrained(dtype=...)`` casts them). What is free: RAM on the CPU (``MemAvailable`` of
``/proc/meminfo``, capped by a cgroup's limit less its usage), ``torch.cuda.mem_get_info`` on CUDA.
``ATR_MEMORY_LIMIT`` (e.g. ``8GiB``) replaces the measured free figure: a cap on a shared machine, or a
way to test the refusal.

On CUDA, ``--batch-size auto`` sizes each generate batch by its tokens: a token budget is free memory
(less the same margin) over the bytes one token costs the LLM (its KV cache in every layer plus one
layer's prefill activations), and :func:`token_batches` cuts the length-sorted questions into batches
whose padded size (items x the longest) stays under it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Sequence

from .errors import UserError

GiB = 2 ** 30
MARGIN_FRACTION = 0.20     # on top of the parameter bytes
MARGIN_BYTES = 1 * GiB     # and a fixed reserve: activations, allocator, CUDA context
MARGIN_TEXT = "+ 20 % + 1 GiB"
LIMIT_ENV = "ATR_MEMORY_LIMIT"

ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# safetensors dtype codes -> bytes per element; the floating ones are cast to the load dtype
_ST_FLOAT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_OTHER = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mib": 2 ** 20, "g": GiB, "gib": GiB,
          "t": 2 ** 40, "tib": 2 ** 40, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


class NotEnoughMemory(UserError, MemoryError):
    """A model that would not fit in free memory; ``str(exc)`` is one line with the need, what is free
    and what to change."""


def parse_bytes(text: str, what: str = LIMIT_ENV) -> int:
    """``8GiB``, ``8 G``, ``512MiB``, ``1.5GiB``, ``20GB`` (decimal), or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{what}={text!r}: give a size such as 8GiB, 512MiB or 20GB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``30.5 GiB`` (``512 MiB`` below 1 GiB)."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2 ** 20:.0f} MiB"


def element_bytes(dtype: str) -> int:
    """Bytes per element of a torch dtype name (``bfloat16``: 2)."""
    return ELEMENT_BYTES[str(dtype).replace("torch.", "")]


def memory_need(param_bytes: int) -> int:
    """What a model of ``param_bytes`` needs: the bytes plus the stated margin (+20 %, +1 GiB)."""
    return math.ceil(param_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def _cgroup_headroom() -> int | None:
    """A cgroup's memory limit less its usage (v2 ``memory.max``/``memory.current``, or v1), None when
    unlimited or unreadable."""
    root = Path("/sys/fs/cgroup")
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append((root / path.lstrip("/"), "memory.max", "memory.current"))
            elif "memory" in controllers.split(","):
                candidates.append((root / "memory" / path.lstrip("/"), "memory.limit_in_bytes",
                                   "memory.usage_in_bytes"))
    except (OSError, ValueError):
        pass
    candidates += [(root, "memory.max", "memory.current"),
                   (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_file, usage_file in candidates:
        try:
            limit = (folder / limit_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or int(limit) >= 2 ** 60:
            return None
        try:
            usage = int((folder / usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(0, int(limit) - usage)
    return None


def ram_available() -> int:
    """Bytes of RAM a new allocation can have: MemAvailable, capped by the cgroup's headroom."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if free is None:  # not Linux: psutil when installed, else the free pages
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cap = _cgroup_headroom()
    return free if cap is None else min(free, cap)


def free_memory(device: str) -> tuple[int, str]:
    """(bytes free on ``device``, what they are: ``RAM``, ``memory on cuda:0``), or what
    ``ATR_MEMORY_LIMIT`` says is free."""
    where = "RAM" if not str(device).startswith("cuda") else f"memory on {device}"
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return parse_bytes(limit), f"{where} ({LIMIT_ENV}={limit})"
    if where == "RAM":
        return ram_available(), where
    import torch

    dev = torch.device(device)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # torch's own free blocks
    return int(torch.cuda.mem_get_info(dev)[0]) + int(cached), where


def _advice(dtype: str, device: str) -> str:
    ways = ["--dtype bf16"] if element_bytes(dtype) > 2 else []
    ways.append("a CUDA device" if not str(device).startswith("cuda") else "a GPU with more free memory")
    ways.append("a smaller model")
    return ", ".join(ways[:-1]) + ", or " + ways[-1]


def check_fits(name: str, params: int, param_bytes: int, dtype: str, device: str, free: int | None = None) -> int:
    """Refuse in one line (:class:`NotEnoughMemory`) when ``params`` parameters taking ``param_bytes`` in
    ``dtype``, plus the margin, exceed what is free on ``device`` (``free``: a stand-in figure, else
    :func:`free_memory`). Returns the need in bytes."""
    need = memory_need(param_bytes)
    have, where = (free, "RAM" if not str(device).startswith("cuda") else f"memory on {device}") \
        if free is not None else free_memory(device)
    if need > have:
        raise NotEnoughMemory(f"{name} needs {format_bytes(need)} ({params / 1e9:.2f} B params in "
                              f"{str(dtype).replace('torch.', '')} {MARGIN_TEXT}) but {format_bytes(have)} of "
                              f"{where} is free: use {_advice(dtype, device)}")
    return need


def read_safetensors_header(file: str | os.PathLike) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of a safetensors file, from its header alone: an 8-byte
    little-endian length, then that many bytes of JSON (dtype, shape, data_offsets per tensor). Raises
    OSError, ValueError or struct.error on a file that is not one."""
    with open(file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100 * 2 ** 20:
            raise ValueError(f"header of {size} bytes: not a safetensors file")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object: not a safetensors file")
    header.pop("__metadata__", None)
    return header, 8 + size


def checkpoint_params(model_dir: str | os.PathLike, dtype: str) -> tuple[int, int] | None:
    """(parameters, bytes once loaded in ``dtype``) of a folder's ``*.safetensors``, from their headers
    only (8 bytes of length, then JSON); None without safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    size = element_bytes(dtype)
    params = nbytes = 0
    for f in files:
        try:
            header = read_safetensors_header(f)[0]
        except (OSError, ValueError, struct.error):
            return None  # unreadable: from_pretrained names the file in its own one-line error
        for t in header.values():
            n = math.prod(t["shape"])
            params += n
            nbytes += n * (size if t["dtype"] in _ST_FLOAT else _ST_OTHER.get(t["dtype"], size))
    return params, nbytes


# ---------------------------------------------------------------- eval's generate batches by tokens

def token_bytes(text_config, element_size: int) -> int:
    """Bytes one token costs the LLM during generate: its KV cache in every layer (2 x layers x KV heads x
    head dim) plus one layer's prefill activations (about 6 hidden-wide and 3 FFN-wide tensors: residual,
    norm, q/k/v and output; gate, up and their product), at ``element_size`` bytes each."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    kv = 2 * text_config.num_hidden_layers * kv_heads * head_dim
    act = 6 * hidden + 3 * text_config.intermediate_size
    return (kv + act) * element_size


def token_budget(free_bytes: int, per_token_bytes: int) -> int:
    """Tokens one generate batch may hold: free memory less the margin (1 GiB, then 20 %) over the bytes
    per token; at least 1."""
    usable = (free_bytes - MARGIN_BYTES) / (1 + MARGIN_FRACTION)
    return max(1, int(usable // max(1, per_token_bytes)))


def token_batches(lengths: Sequence[int], budget: int, max_items: int = 256) -> list[tuple[int, int]]:
    """Consecutive (start, stop) batches over ``lengths`` (tokens per item, longest first as eval sorts
    them) whose padded size, items x the batch's longest, stays within ``budget``; at most ``max_items``
    per batch, and at least one item (an item longer than the budget goes alone)."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        stop, longest = start + 1, lengths[start]
        while stop < n and stop - start < max_items:
            longest_next = max(longest, lengths[stop])
            if (stop - start + 1) * longest_next > budget:
                break
            stop, longest = stop + 1, longest_next
        out.append((start, stop))
        start = stop
    return out


__all__ = ["GiB", "read_safetensors_header", "MARGIN_FRACTION", "MARGIN_BYTES", "MARGIN_TEXT", "LIMIT_ENV", "NotEnoughMemory", "parse_bytes",
           "format_bytes", "element_bytes", "memory_need", "ram_available", "free_memory", "check_fits",
           "checkpoint_params", "token_bytes", "token_budget", "token_batches"]
