"""The ``[lmms]`` extra installs a working lmms-eval on the CPU torch wheel (issue: lmms-eval, item 5).

Run by ``.ci/run`` in a second, clean venv (``pip install torch==2.13.0 -e '.[dev,lmms]'``,
``pytest -m lmms``). The three snags of lmms-eval 0.7.3 with the CPU wheel, each checked:
the torchvision pip picks must be the one made for this torch, and its CUDA-only extension
must not break ``import transformers``; filelock must stay below 4; decord must be there.
"""

from __future__ import annotations

import importlib.metadata as md

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
