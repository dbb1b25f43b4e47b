"""What the ``atr_llava`` lmms-eval model does, without lmms-eval: load a model of any family atr supports
(LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL), check the strategy against it, and answer items through
the same tower pass, keep masks and pruned generation as ``atr eval`` (``pipeline.evaluate.predict_features``).

``flows.lmms.model.AtrLlava`` wraps :class:`PrunedServer` in lmms-eval's interface (its requests become
:class:`pipeline.benchmarks.EvalItem` here). Nothing in this module imports lmms-eval, so the serving path
is tested in the main environment too (``tests/test_qwen_eval.py``); nothing here asks a family's name:
interpolation, crops and several-image prompts are the family's capabilities.
"""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.config import ConfigError
from pipeline.families import family_of
from pipeline.strategies import BUDGETS, get

# the model_args atr_llava takes, with their defaults
MODEL_ARGS: dict[str, Any] = {"pretrained": None, "strategy": "full", "retention": 1.0, "selector": None,
                              "budget": "per-crop", "seed": 0, "dtype": "auto", "device": "auto", "batch_size": 1,
                              "interpolation": "off", "text_encoder": None, "home": None}


class PrunedServer:
    """One model, one strategy at one retention, budget and seed: ``answer(items, limits)`` gives greedy answers.

    ``kwargs`` are ``atr_llava``'s model_args (:data:`MODEL_ARGS`). The model is prepared (a preset is built,
    a folder or hub id registered) and loaded once; a strategy the family cannot run (HiRED without crops), a
    selector that does not fit it, or interpolation with pruning is refused in one line before any request."""

    def __init__(self, **kwargs: Any) -> None:
        args = check_model_args(kwargs)
        from pipeline.device import compute
        from pipeline.evaluate import EvalConfig, Pruning
        from pipeline.loading import cached_model
        from pipeline.strategies.core import check_family
        from storage.home import Home

        from flows.stages.eval import check_crops, check_interpolation, eval_selector, eval_text_encoder
        from flows.stages.prepare_model import prepare_model

        self.args = args
        self.home = Home.resolve(args["home"]).ensure()
        self.device_name, self.dtype_name = compute(args["device"], args["dtype"])
        self.model_stage = prepare_model(self.home, str(args["pretrained"]))
        cfg = EvalConfig(strategies=(args["strategy"],), retentions=(float(args["retention"]),),
                         interpolation=args["interpolation"] == "on")
        check_interpolation(self.model_stage, cfg)
        check_crops(self.model_stage, cfg)  # HiRED on a family without crops: one line, before loading weights
        self.model, self.processor = cached_model(str(self.model_stage.model_dir), self.device_name, self.dtype_name)
        family = family_of(self.model)
        check_family([args["strategy"]], family)
        family.set_interpolation(self.model, self.processor, args["interpolation"] == "on")
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
        self.visual_tokens: list[int] = []  # per answered item: visual tokens the LLM saw
        self.prefill_ms: list[float] = []   # per generate batch group: mean time to first token per sequence

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def family(self):
        return family_of(self.model)

    def check_images(self, n_images: int, where: str) -> None:
        """One line for a prompt with several images on a family that sends them without AnyRes (OneVision)."""
        family = self.family
        if n_images > 1 and not family.multi_image_anyres:
            raise NotImplementedError(f"atr_llava: {where} has {n_images} images; {family.label} sends several "
                                      "images without AnyRes, which atr's pruning does not model")

    def answer(self, items: Sequence[Any], limits: Sequence[int]) -> list[str]:
        """Greedy answers to ``items`` (``EvalItem``: image(s) and prompt text), each with its own
        ``max_new_tokens`` (``limits``); items with the same limit are answered together, in batches."""
        from pipeline.evaluate import Batching, Inputs, encode_shard, predict_features
        from pipeline.strategies import tower_outputs

        out: list[str | None] = [None] * len(items)
        for limit in sorted(set(limits)):
            idx = [i for i, m in enumerate(limits) if m == limit]
            shard = encode_shard(self.model, self.processor, [items[i] for i in idx], idx,
                                 tower_outputs([self.args["strategy"]], self.relevance is not None),
                                 batch_size=max(1, self._batch_size))
            if shard.skipped:
                raise ValueError(f"atr_llava could not read {len(shard.skipped)} images: {shard.skipped[0][1]}")
            got = predict_features(self.model, self.processor, shard, self.pruning,
                                   Inputs(self.selector, self.relevance),
                                   Batching(self._batch_size, max_new_tokens=limit))
            for i, text in zip(idx, got.texts):
                out[i] = text
            self.visual_tokens += got.visual_tokens
            self.prefill_ms.append(got.prefill_ms)
        return out  # type: ignore[return-value]


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


__all__ = ["PrunedServer", "MODEL_ARGS", "check_model_args"]
