"""atr inside lmms-eval: the ``atr_llava`` plugin model (entry-point group ``lmms_eval.models``).

``manifest`` is the entry point's payload; lmms-eval calls it when it builds its model registry,
so nothing here imports lmms-eval until lmms-eval itself is running.
"""

from __future__ import annotations

MODEL_ID = "atr_llava"


def manifest():
    """The plugin's ``ModelManifest``: a chat model (``is_simple = False``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path="flows.lmms.model.AtrLlava")


__all__ = ["MODEL_ID", "manifest"]
