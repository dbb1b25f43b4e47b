"""Environment fixes that keep ``import transformers`` working where a dependency cannot load.

**torchvision on the CPU torch wheel.** lmms-eval (the ``[lmms]`` extra) requires torchvision,
and on Linux the torchvision wheels on PyPI are CUDA builds: their C extension links
``libtorch_cuda.so``, which the CPU torch wheel (``torch==2.13.0+cpu``) does not ship. Their
``torchvision/_meta_registrations.py`` then registers fake kernels for ops that were never
defined and fails with ``operator torchvision::nms does not exist``. transformers imports
torchvision whenever it is installed (``transformers/image_utils.py``), so every
``import transformers`` fails with it. That includes all of atr, whichever command runs.

:func:`torchvision_guard` runs before transformers is imported. If the installed
torchvision's extension cannot load, it defines the schemas of torchvision's operators, so
the registrations succeed; the operators themselves stay unimplemented. Nothing in atr
calls torchvision ops: images go through the PIL image processors. Neither do the ten
benchmarks' lmms-eval tasks. With a torchvision whose extension loads (any CUDA torch, or a
matching CPU pair from the PyTorch index) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# torchvision's operators as its C++ registers them (csrc/ops/*.cpp), for the ops whose fake or
# autograd kernels torchvision's Python side registers at import.
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
    "-> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_LIBRARY = None  # the torch.library fragment that holds the schemas (kept alive for the process)


def torchvision_guard() -> bool:
    """Make an installed torchvision whose C extension cannot load importable (see the module docstring).

    Returns True when it defined the operator schemas. Cheap when torchvision is absent or already
    imported: it checks that first and does not import torch then."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    extensions = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    try:
        for path in extensions:
            torch.ops.load_library(str(path))  # a working extension defines the real operators
        if extensions:
            return False
    except OSError:
        pass  # e.g. "libc10_cuda.so: cannot open shared object file": a CUDA build on CPU torch
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in TORCHVISION_SCHEMAS:
        library.define(schema)
    _LIBRARY = library
    return True


__all__ = ["torchvision_guard", "TORCHVISION_SCHEMAS"]
