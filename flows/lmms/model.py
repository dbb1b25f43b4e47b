"""``atr_llava``: lmms-eval's chat model interface over atr's pruned inference.

``--model atr_llava --model_args pretrained=ID_OR_DIR,strategy=selector,retention=0.25,selector=CKPT,...``
serves every model family atr supports (LLaVA-NeXT, LLaVA-OneVision). Each request's
messages come from the task's ``doc_to_messages``; its image goes through the same tower
pass, keep mask and packing as ``atr eval`` (``pipeline.evaluate.predict_features``), and its
text through the processor's chat template. Generation is greedy with the task's
``max_new_tokens`` (lmms-eval's default 1024 when a task sets none), and, as in lmms-eval's
own ``llava_hf`` chat model, ``until`` is not applied. Requests are answered ``batch_size`` at
a time (lmms-eval's ``llava_hf`` allows only 1).
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages

from pipeline.config import ConfigError
from pipeline.families import family_of
from pipeline.strategies import BUDGETS, get

# the model_args atr_llava takes, with their defaults
MODEL_ARGS: dict[str, Any] = {"pretrained": None, "strategy": "full", "retention": 1.0, "selector": None,
                              "budget": "per-crop", "seed": 0, "dtype": "auto", "device": "auto", "batch_size": 1,
                              "interpolation": "off", "text_encoder": None, "home": None}
LMMS_DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf when a task's generation_kwargs set none


class AtrLlava(lmms):
    """lmms-eval model ``atr_llava``: pruned LLaVA-NeXT / LLaVA-OneVision (see the module docstring)."""

    is_simple = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        args = check_model_args(kwargs)
        from pipeline.device import compute
        from pipeline.loading import cached_model
        from storage.home import Home

        from flows.stages.eval import eval_selector, eval_text_encoder
        from flows.stages.prepare_model import prepare_model

        self.args = args
        self.home = Home.resolve(args["home"]).ensure()
        self.device_name, self.dtype_name = compute(args["device"], args["dtype"])
        self.model_stage = prepare_model(self.home, str(args["pretrained"]))
        self.model, self.processor = cached_model(str(self.model_stage.model_dir), self.device_name, self.dtype_name)
        from pipeline.evaluate import EvalConfig

        from flows.stages.eval import check_interpolation

        check_interpolation(self.model_stage, EvalConfig(strategies=(args["strategy"],),
                                                         retentions=(float(args["retention"]),),
                                                         interpolation=args["interpolation"] == "on"))
        family_of(self.model).set_interpolation(self.model, self.processor, args["interpolation"] == "on")
        from pipeline.evaluate import Pruning

        self.pruning = Pruning(args["strategy"], float(args["retention"]), int(args["seed"]), args["budget"])
        spec = self.pruning.spec
        self.selector = None
        if "selector" in spec.needs:
            self.selector = eval_selector(self.home, str(args["selector"]), float(args["retention"]),
                                          self.model_stage).selector.to(self.model.device)
        self.relevance = None
        if spec.wants("relevance") and args["text_encoder"]:
            self.relevance = eval_text_encoder(EvalConfig(text_encoder=args["text_encoder"]), self.model_stage,
                                               self.device_name)
        self._batch_size = int(args["batch_size"])
        self.visual_tokens: list[int] = []  # per answered request: visual tokens the LLM saw
        self.prefill_ms: list[float] = []   # per generate batch group: mean time to first token per sequence

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # ------------------------------------------------------------- the one method the ten tasks use
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from pipeline.benchmarks import EvalItem
        from pipeline.evaluate import Batching, Inputs, encode_shard, predict_features
        from pipeline.strategies import tower_outputs

        a = self.args
        items, limits = [], []
        for i, req in enumerate(requests):
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
            family = family_of(self.model)
            if len(images) > 1 and not family.multi_image_anyres:
                raise NotImplementedError(f"atr_llava: {task} doc {doc_id} has {len(images)} images; {family.label} "
                                          "sends several images without AnyRes, which atr's pruning does not model")
            text = "\n".join(c.text for m in messages.messages if m.role == "user" for c in m.content
                             if c.type == "text")
            rgb = [im.convert("RGB") for im in images]
            items.append(EvalItem(f"{task}/{doc_id}", rgb[0] if rgb else None, text, [], more_images=rgb[1:]))
            limits.append(int(gen.get("max_new_tokens") or LMMS_DEFAULT_MAX_NEW_TOKENS))
        out: list[GenerationResult | None] = [None] * len(items)
        for limit in sorted(set(limits)):
            idx = [i for i, m in enumerate(limits) if m == limit]
            shard = encode_shard(self.model, self.processor, [items[i] for i in idx], idx,
                                 tower_outputs([a["strategy"]], self.relevance is not None),
                                 batch_size=max(1, self._batch_size))
            if shard.skipped:
                raise ValueError(f"atr_llava could not read {len(shard.skipped)} images: {shard.skipped[0][1]}")
            got = predict_features(self.model, self.processor, shard, self.pruning,
                                   Inputs(self.selector, self.relevance),
                                   Batching(self._batch_size, max_new_tokens=limit))
            for i, text in zip(idx, got.texts):
                out[i] = GenerationResult(text=text)
            self.visual_tokens += got.visual_tokens
            self.prefill_ms.append(got.prefill_ms)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------- what the ten tasks do not use
    def loglikelihood(self, requests):
        raise NotImplementedError("atr_llava implements generate_until only: the ten benchmarks it is built "
                                  "for (docvqa_val, chartqa, textvqa_val, ...) are generation tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("atr_llava implements generate_until only (no multi-round tasks)")


def check_model_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``--model_args`` merged over :data:`MODEL_ARGS`; one line for an unknown key or a bad value."""
    unknown = sorted(k for k in kwargs if k not in MODEL_ARGS)
    if unknown:
        raise ConfigError(f"atr_llava does not take model_args {', '.join(unknown)}; valid: {', '.join(MODEL_ARGS)}")
    args = {**MODEL_ARGS, **{k: v for k, v in kwargs.items() if v is not None}}
    if not args["pretrained"]:
        raise ConfigError("atr_llava needs pretrained=ID_OR_DIR (a preset such as tiny-trained, a save_pretrained "
                          "folder, or a Hugging Face id)")
    spec = get(args["strategy"])  # one line listing the registered strategies
    if args["budget"] not in BUDGETS:
        raise ConfigError(f"atr_llava budget {args['budget']!r} is unknown; valid: {', '.join(BUDGETS)}")
    if "selector" in spec.needs and not args["selector"]:  # the plugin's planning
        raise ConfigError(f"atr_llava strategy={args['strategy']} needs selector=CKPT (a .safetensors file or a "
                          "train stage hash)")
    if args["interpolation"] not in ("on", "off"):
        raise ConfigError(f"atr_llava interpolation must be on or off, got {args['interpolation']!r}")
    try:
        retention = float(args["retention"])
        int(args["seed"]), int(args["batch_size"])
    except (TypeError, ValueError):
        raise ConfigError(f"atr_llava retention, seed and batch_size must be numbers, got {args['retention']!r}, "
                          f"{args['seed']!r}, {args['batch_size']!r}") from None
    if not 0 < retention <= 1:
        raise ConfigError(f"atr_llava retention must be in (0, 1], got {retention!r}")
    return args
