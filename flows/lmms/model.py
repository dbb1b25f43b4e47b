"""``atr_llava``: lmms-eval's chat model interface over atr's pruned inference.

``--model atr_llava --model_args pretrained=ID_OR_DIR,strategy=selector,retention=0.25,selector=CKPT,...``
serves every model family atr supports (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL: a hub id such as
``Qwen/Qwen2.5-VL-7B-Instruct``, a folder, or a preset such as ``tiny-qwen25``). Each request's
messages come from the task's ``doc_to_messages``; its image goes through the same tower
pass, keep mask and packing as ``atr eval`` (``pipeline.evaluate.predict_features``), and its
text through the processor's chat template (Qwen's ``<|vision_start|>`` placeholders, M-RoPE positions and
DeepStack come from its family's runtime, as in ``atr eval``). The serving is
:class:`flows.lmms.pruned.PrunedServer`, which does not import lmms-eval. Generation is greedy with the task's
``max_new_tokens`` (lmms-eval's default 1024 when a task sets none), and, as in lmms-eval's
own ``llava_hf`` chat model, ``until`` is not applied. Requests are answered ``batch_size`` at
a time (lmms-eval's ``llava_hf`` allows only 1).
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages

from .pruned import MODEL_ARGS, PrunedServer, check_model_args

LMMS_DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf when a task's generation_kwargs set none


class AtrLlava(lmms):
    """lmms-eval model ``atr_llava``: pruned LLaVA-NeXT / LLaVA-OneVision / Qwen2.5-VL / Qwen3-VL (see the
    module docstring); the serving itself is :class:`flows.lmms.pruned.PrunedServer`'s."""

    is_simple = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.server = PrunedServer(**kwargs)

    @property
    def args(self) -> dict[str, Any]:
        return self.server.args

    @property
    def model(self):
        return self.server.model

    @property
    def processor(self):
        return self.server.processor

    @property
    def pruning(self):
        return self.server.pruning

    @property
    def visual_tokens(self) -> list[int]:
        """Per answered request: visual tokens the LLM saw."""
        return self.server.visual_tokens

    @property
    def prefill_ms(self) -> list[float]:
        """Per generate batch group: mean time to first token per sequence."""
        return self.server.prefill_ms

    @property
    def batch_size(self) -> int:
        return self.server.batch_size

    # ------------------------------------------------------------- the one method the ten tasks use
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from pipeline.benchmarks import EvalItem

        items, limits = [], []
        for req in requests:
            _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            gen = dict(gen_kwargs or {})
            if float(gen.get("temperature") or 0) > 0 or gen.get("do_sample"):
                raise NotImplementedError("atr_llava decodes greedily; this task asks for sampling "
                                          f"(temperature={gen.get('temperature')}, do_sample={gen.get('do_sample')})")
            messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
            images, videos, audios = messages.extract_media()
            if videos or audios:
                raise NotImplementedError(f"atr_llava answers about images; {task} doc {doc_id} has "
                                          f"{len(videos)} videos, {len(audios)} audio clips")
            self.server.check_images(len(images), f"{task} doc {doc_id}")
            text = "\n".join(c.text for m in messages.messages if m.role == "user" for c in m.content
                             if c.type == "text")
            rgb = [im.convert("RGB") for im in images]
            items.append(EvalItem(f"{task}/{doc_id}", rgb[0] if rgb else None, text, [], more_images=rgb[1:]))
            limits.append(int(gen.get("max_new_tokens") or LMMS_DEFAULT_MAX_NEW_TOKENS))
        return [GenerationResult(text=t) for t in self.server.answer(items, limits)]

    # ------------------------------------------------------------- what the ten tasks do not use
    def loglikelihood(self, requests):
        raise NotImplementedError("atr_llava implements generate_until only: the ten benchmarks it is built "
                                  "for (docvqa_val, chartqa, textvqa_val, ...) are generation tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("atr_llava implements generate_until only (no multi-round tasks)")


__all__ = ["AtrLlava", "MODEL_ARGS", "check_model_args", "LMMS_DEFAULT_MAX_NEW_TOKENS"]
