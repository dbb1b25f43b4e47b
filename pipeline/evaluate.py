"""Pruned evaluation of one (benchmark, strategy, retention, seed) chunk, on any family
(LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL).

Pure compute: items in, per-sample predictions and scores out. The flow
(``flows.evaluate``) caches chunks, records rows and draws plots.

Per batch: the tower runs once on every crop of every image
(``prune.encode_images``), the strategy picks each image's kept tokens
(``strategies.selections``), the kept tokens are packed in raster order
(``prune.visual_embeddings``) and replace the ``<image>`` placeholder of the
processor's chat-template prompt; ``generate`` decodes greedily with left
padding. ``prefill_ms`` is the time to the first generated token of a batch
divided by its size (the prefill dominates it); ``visual_tokens`` counts what the
LLM saw (kept tokens plus kept row-newlines).

On Qwen-VL (``Family.own_runtime``: ``pipeline.families._qwen``) the same path holds
with one "crop" per image: features (1, L, 4C) with L the image's merged tokens (it
varies per image), ``valid`` all True, so ``per-crop`` is the whole image and every
budget counts merged tokens; ``visual_embeddings`` gives a ``KeptImage`` (its
``.shape[0]``: the tokens the LLM sees) and generation places them with their M-RoPE
positions. A strategy that needs crops (``Strategy.crops``: HiRED) is refused in one
line (``strategies.core.check_family``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .benchmarks import EvalItem, aggregate, score_response, spec
from .config import EVAL_RETENTIONS, Config, check, check_compute
from .families import family_of
from .prune import base_regions, encode_images, project, visual_embeddings
from .strategies import FIXED_BUDGETS, Batch, Context, Threshold, TowerOutputs, get, names, seeded_generator, selections
from .strategies.core import TOWER_FIELDS, check_family, unavailable


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    """What ``atr eval`` evaluates (the model, selector and data are stage inputs, not config)."""

    kind: ClassVar[str] = "eval"

    benchmarks: tuple = ("synthetic-ocr", "synthetic-scene")
    strategies: tuple = names()      # every registered strategy (pipeline.strategies)
    retentions: tuple = EVAL_RETENTIONS
    budget: str | tuple = "per-crop"  # a fixed budget mode (strategies.FIXED_BUDGETS), or several: "per-crop,global" or a list
    seeds: int = 3
    limit: int = 300
    batch_size: int | str = "auto"   # sequences per generate call, or "auto": cut by tokens on CUDA, 16 on a CPU
    shard_size: int = 100            # items per work unit: the tower runs once per image of a shard
    device: str = "auto"             # where the model runs
    model_dtype: str = "auto"        # the model's dtype (--dtype)
    text_encoder: str | None = None  # cdpruner's CLIP text tower (--text-encoder); None: the unconditioned DPP
    interpolation: bool = False      # LLaVA-OneVision's grid interpolation (--interpolation); off to prune
    harness: str = "builtin"         # builtin, or lmms-eval (its own tasks and scoring; --tasks)
    tasks: tuple = ()                # lmms-eval task names (--harness lmms-eval)
    # strategy -> {option: value}: the declared ablation switches (e.g. {"visionzip": {"cls": False}});
    # the options that differ from a strategy's defaults are part of its results' cache keys. A LIST of
    # tables evaluates several variants of one strategy side by side ({"selector": [{}, {"allocation": "image"}]})
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # the threshold budget (adaptive strategies: the selector): each threshold is one more result per variant,
    # keeping the tokens whose keep probability reaches it, at least floor x and at most cap x the valid tokens
    thresholds: tuple = ()
    threshold_floor: float = 0.02
    threshold_cap: float = 0.75
    split: str = "test"              # the split of the generated synthetic benchmarks (val or test); real ones: --data

    def validate(self) -> None:
        from .benchmarks import BENCHMARKS

        for b in self.benchmarks:
            check(b in BENCHMARKS, f"unknown benchmark {b!r}; valid: {', '.join(BENCHMARKS)}")
        check(self.harness in ("builtin", "lmms-eval"), f"--harness must be builtin or lmms-eval, got {self.harness!r}")
        check(self.harness == "builtin" or len(self.tasks) > 0, "--harness lmms-eval needs --tasks T1,T2")
        for s in self.strategies:
            get(s)
        check(isinstance(self.options, Mapping),
              f"eval options must be a table of strategy tables, got {self.options!r}")
        for s, opts in self.options.items():
            check(isinstance(opts, Mapping) or (isinstance(opts, (list, tuple)) and len(opts) > 0),
                  f"eval options for {s!r} must be a table or a list of tables (variants), got {opts!r}")
            seen: dict[str, int] = {}
            for i, one in enumerate(self.variants(s)):
                check(isinstance(one, Mapping), f"eval options for {s!r}: variant {i + 1} must be a table, got {one!r}")
                text = get(s).variant(one)
                check(text not in seen, f"eval options for {s!r} list the variant "
                                        f"{text or '(defaults)'!r} twice (entries {seen.get(text, 0) + 1} and {i + 1})")
                seen[text] = i
        check(self.harness == "builtin" or not any(isinstance(o, (list, tuple)) for o in self.options.values()),
              "--harness lmms-eval takes one variant per strategy (no --variant, no option lists)")
        check(len(self.strategies) > 0 and len(self.benchmarks) > 0, "give at least one benchmark and strategy")
        for r in self.retentions:
            check(isinstance(r, (int, float)) and 0.0 < r <= 1.0, f"retention must be in (0, 1], got {r!r}")
        for b in self.budgets:
            check(b != "threshold", "--budget takes fixed budgets (per-crop, global, stock); the threshold budget "
                                    "comes from --thresholds T1,T2 (adaptive strategies: the selector)")
            check(b in FIXED_BUDGETS, f"unknown budget {b!r}; valid: {', '.join(FIXED_BUDGETS)}")
        check(len(self.budgets) > 0 and len(set(self.budgets)) == len(self.budgets),
              f"--budget needs one or more distinct budgets of {', '.join(FIXED_BUDGETS)}, got {self.budget!r}")
        check(self.harness == "builtin" or len(self.budgets) == 1,
              f"--harness lmms-eval takes one budget per run, got {self.budget!r}")
        self._validate_thresholds()
        check(self.split in ("val", "test"),
              "--split train is refused: the learned methods train on the synthetic train split; use val or test"
              if self.split == "train" else f"--split must be val or test, got {self.split!r}")
        check(self.seeds > 0 and self.limit > 0 and self.shard_size > 0, "seeds, limit and shard_size must be positive")
        check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size > 0),
              f"--batch-size must be a positive integer or 'auto', got {self.batch_size!r}")
        check_compute(self.device, self.model_dtype)

    def _validate_thresholds(self) -> None:
        num = (int, float)
        for t in self.thresholds:
            check(isinstance(t, num) and not isinstance(t, bool) and 0.0 < t < 1.0,
                  f"threshold must be in (0, 1), got {t!r}")
        check(len(set(self.thresholds)) == len(self.thresholds), f"--thresholds lists a threshold twice: "
                                                                  f"{list(self.thresholds)}")
        cap, floor = self.threshold_cap, self.threshold_floor
        check(isinstance(cap, num) and not isinstance(cap, bool) and 0.0 < cap <= 1.0,
              f"--threshold-cap must be in (0, 1], got {cap!r}")
        check(isinstance(floor, num) and not isinstance(floor, bool) and 0.0 <= floor <= cap,
              f"--threshold-floor must be in [0, cap={cap:g}], got {floor!r}")
        if self.thresholds:
            adaptive = [n for n in names() if get(n).adaptive]
            check(any(get(s).adaptive for s in self.strategies),
                  f"--thresholds applies to adaptive strategies ({', '.join(adaptive) or 'none registered'}), and "
                  f"none is evaluated (--strategies {','.join(self.strategies)})")
            check(self.harness == "builtin", "--harness lmms-eval takes no --thresholds (fixed budgets only)")

    def variants(self, strategy: str) -> list[Mapping[str, Any]]:
        """The option tables of ``strategy``'s variants, in order: ``options[strategy]`` (one table or a
        list of them), [{}] (its defaults) when none is given."""
        opts = self.options.get(strategy, {})
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    @property
    def budgets(self) -> tuple[str, ...]:
        """The budget modes evaluated (``budget`` split at commas)."""
        raw = self.budget.split(",") if isinstance(self.budget, str) else self.budget
        return tuple(str(b).strip() for b in raw if str(b).strip())

    def chunks(self) -> list[Pruning]:
        """The results to compute: a strategy with a fixed retention (full, none) once (under the first
        budget: no budget changes what it sends), a seeded one (random) per seed, retention and budget, the
        rest once per retention and budget; all of that per variant (``options[strategy]`` a list), and for
        an adaptive strategy (the selector) one more per variant and threshold: the threshold budget with
        the cap as its retention."""
        out = []
        for s in self.strategies:
            spec = get(s)
            retentions = [spec.retention] if spec.retention is not None else self.retentions
            seeds = range(self.seeds) if spec.seeded and spec.retention is None else [0]
            budgets = self.budgets if spec.retention is None else self.budgets[:1]
            for opts in self.variants(s):
                out.extend(Pruning(s, float(r), seed, b, opts) for b in budgets for r in retentions for seed in seeds)
                if spec.adaptive:
                    out.extend(Pruning(s, float(self.threshold_cap), 0, "threshold", opts, threshold=float(t),
                                       floor=float(self.threshold_floor)) for t in self.thresholds)
        return out


def default_strategies(selector: bool = True, family=None) -> tuple[str, ...]:
    """Every strategy; those that need a selector only when there is one to evaluate; those that read a trained
    file (``Strategy.files``: visionselector's checkpoint, trained per model) only when named; those that need
    AnyRes crops (``Strategy.crops``: HiRED) only where ``family`` (when known) has them."""
    return tuple(s for s in names() if (selector or "selector" not in get(s).needs) and not get(s).files
                 and unavailable(s, family) is None)


@dataclasses.dataclass(frozen=True)
class Pruning:
    """What one result prunes: the strategy at a retention (full: 1, none: 0), the seed (random), the
    budget mode and the strategy's options (ablation switches; {}: its defaults). Under the ``threshold``
    budget the retention is the cap, ``threshold`` the keep probability a token needs and ``floor`` the
    least fraction kept (both 0 under a fixed budget)."""

    strategy: str
    retention: float
    seed: int = 0
    budget: str = "per-crop"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    threshold: float = 0.0
    floor: float = 0.0

    def __hash__(self) -> int:
        from .config import canonical_json

        return hash((self.strategy, self.retention, self.seed, self.budget, canonical_json(self.options),
                     self.threshold, self.floor))

    @property
    def select_budget(self) -> "str | Threshold":
        """The budget as ``strategies.selections`` takes it: the name, or the :class:`Threshold` of the
        threshold budget."""
        return Threshold(self.threshold, self.floor) if self.budget == "threshold" else self.budget

    @property
    def spec(self):
        """The strategy's declaration (``pipeline.strategies.Strategy``)."""
        return get(self.strategy)

    @property
    def variant(self) -> str:
        """The options that differ from the strategy's defaults, ``k=v,k=v`` ('' for the defaults)."""
        return self.spec.variant(self.options)


@dataclasses.dataclass
class Inputs:
    """What a strategy may need beyond a shard's features: the loaded selector (``selector``) and a
    ``pipeline.relevance.TextRelevance`` (``cdpruner`` conditioned on the question; None: unconditioned)."""

    selector: Any = None
    relevance: Any = None


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a shard's prompts are decoded: ``batch_size`` sequences per ``generate`` (or "auto"), grouped by
    length (``group``), ``max_new_tokens``, and ``on_batch(n)`` after every batch (progress)."""

    batch_size: int | str = 16
    group: bool = True
    max_new_tokens: int = 16
    on_batch: Callable[[int], None] | None = None


@dataclasses.dataclass
class ChunkResult:
    samples: list[dict[str, Any]]  # sample_id, prediction, answer, score, visual_tokens, index (, meta)
    score: float
    metric: str
    n_samples: int
    mean_visual_tokens: float
    prefill_ms: float
    padding: int = 0               # left-padding positions in the generate batches
    positions: int = 0             # all positions of those batches (padding share = padding / positions)
    stock_visual_tokens: float | None = None  # what the stock model would see of the same images (None: no image)


class _FirstTokenTimer:
    """A ``generate`` streamer that notes when the first new token arrives (after the prefill)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt, call 2 the first token
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def chat_prompt(processor, text: str, with_image: bool | int) -> str:
    """The processor's chat-template prompt for ``text`` with ``with_image`` image placeholders
    (True is one) ahead of it."""
    content = [{"type": "image"}] * int(with_image) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def generate_timed(model, processor, prompts: Sequence[str], visual: Sequence[torch.Tensor | None],
                   max_new_tokens: int, stats: dict[str, int] | None = None) -> tuple[list[str], float]:
    """``prune.generate_answers`` plus the batch's time to first token in ms."""
    from .prune import generate_answers

    timer = _FirstTokenTimer()
    t0 = time.perf_counter()
    out = generate_answers(model, processor, prompts, visual, max_new_tokens=max_new_tokens, streamer=timer,
                           stats=stats)
    ttft = ((timer.first or time.perf_counter()) - t0) * 1000.0
    return out, ttft


AUTO_BATCH_CPU = 16   # --batch-size auto on a CPU: a fixed size
AUTO_BATCH_START, AUTO_BATCH_MAX = 8, 256  # on CUDA without token counts: start here, double after every fit


def default_batch_size(device: str = "auto") -> int | str:
    """``atr eval``'s ``--batch-size`` when none is given: ``auto`` on CUDA (batches cut by tokens against
    free memory), ``AUTO_BATCH_CPU`` on the CPU (the fixed size the CPU's results were made with; the
    batch size is in no cache key)."""
    from .device import resolve_device

    return "auto" if resolve_device(device) == "cuda" else AUTO_BATCH_CPU


class BatchSizer:
    """How many sequences go into the next ``generate`` call.

    A fixed size stays fixed. ``auto`` on CUDA with a token ``budget``
    (``pipeline.memory.token_budget``: free memory over the LLM's bytes per token)
    cuts the items, longest first, into batches whose padded tokens (items x the
    longest) fit the budget (``pipeline.memory.token_batches``); a batch that still
    runs out of memory sets the budget to half its padded tokens and the rest is
    cut again. ``auto`` on CUDA without a budget starts at ``AUTO_BATCH_START`` and
    doubles after every batch that fits (up to ``AUTO_BATCH_MAX``), halving after
    an out-of-memory batch and staying there. On a CPU ``auto`` is
    ``AUTO_BATCH_CPU``. Batching never changes an answer, only the speed."""

    def __init__(self, batch_size: int | str, device: str, budget: int | None = None):
        self.auto = batch_size == "auto" and device.startswith("cuda")
        fixed = AUTO_BATCH_CPU if batch_size == "auto" else int(batch_size)
        self.size = AUTO_BATCH_START if self.auto else fixed
        self.ceiling = AUTO_BATCH_MAX
        self.budget = budget if self.auto else None
        self.batches: list[int] = []  # items per batch run, in order

    def run(self, n: int, call: Callable[[int, int], Any], lengths: Sequence[int] | None = None) -> list[Any]:
        """``call(start, stop)`` over ``range(n)`` in batches; results in order. ``lengths``: each item's
        tokens (in run order), which a token budget cuts by."""
        if self.budget is not None and lengths is not None:
            return self._run_by_tokens(n, call, lengths)
        out, start = [], 0
        while start < n:
            stop = min(n, start + self.size)
            try:
                out.append(call(start, stop))
            except torch.OutOfMemoryError:
                if not self.auto or stop - start == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.size = self.ceiling = max(1, (stop - start) // 2)
                continue
            self.batches.append(stop - start)
            start = stop
            if self.auto:
                self.size = min(self.ceiling, self.size * 2)
        return out

    def _run_by_tokens(self, n: int, call: Callable[[int, int], Any], lengths: Sequence[int]) -> list[Any]:
        from .memory import token_batches

        out, start = [], 0
        while start < n:
            stop = start + token_batches(lengths[start:n], self.budget, self.ceiling)[0][1]
            try:
                out.append(call(start, stop))
            except torch.OutOfMemoryError:
                if stop - start == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.budget = max(1, (stop - start) * max(lengths[start:stop]) // 2)
                continue
            self.batches.append(stop - start)
            start = stop
        return out


@dataclasses.dataclass
class ShardFeatures:
    """A shard's items with their tower output, computed once and shared by every (strategy, retention,
    seed) evaluated on the shard. ``features[i]`` is None for an item without an image; ``more[i]``
    holds the features of an item's further images (MMMU), [] for most. Items whose image does not
    decode are in ``skipped`` (sample id, reason), not in ``items``."""

    items: list[EvalItem]
    indices: list[int]               # each item's row index in the benchmark (seeds random keeps)
    features: list[Any]              # ImageFeatures or None, per item
    skipped: list[tuple[str, str]]
    images: int                      # images the tower encoded (one tower pass each)
    attention: bool                  # whether CLS attention (and keys, layer-0 attention) was computed
    embeds: bool = False             # whether the tower's post-norm last layer was kept (CDPruner's relevance)
    more: list[list[Any]] | None = None  # per item, the ImageFeatures of its images after the first

    def __post_init__(self):
        if self.more is None:
            self.more = [[] for _ in self.items]

    def image_features(self, i: int) -> list[Any]:
        """Every image's features of item ``i``, in prompt order ([] without an image)."""
        f = self.features[i]
        return [] if f is None else [f, *self.more[i]]


@torch.no_grad()
def encode_shard(model, processor, items: Sequence[EvalItem], indices: Sequence[int] | None = None,
                 outputs: TowerOutputs = TowerOutputs(), batch_size: int = 16,
                 on_batch: Callable[[int], None] | None = None) -> ShardFeatures:
    """One tower pass per image of ``items``, ``batch_size`` items per forward; images are decoded per
    batch and dropped after it. ``outputs`` (``pipeline.strategies.tower_outputs`` of the strategies to
    run) says what the tower computes besides the features; ``outputs.images=False`` (only ``none``)
    encodes nothing.

    An item with several images (MMMU) has each encoded as LLaVA-NeXT's processor does (AnyRes,
    one grid per image). LLaVA-OneVision gives the images of a several-image prompt no AnyRes
    grid at all (only the base view, ``batch_num_images`` in transformers), which this harness's
    packing does not model: such items are skipped with a reason."""
    from .benchmarks import BadRow

    indices = list(range(len(items))) if indices is None else list(indices)
    family = family_of(model)
    one_view = not family.multi_image_anyres
    images, attention, embeds = outputs.images, outputs.attention, outputs.embeds
    kept, kept_idx, feats, more, skipped, encoded = [], [], [], [], [], 0
    for start in range(0, len(items), batch_size):
        batch = list(zip(items[start:start + batch_size], indices[start:start + batch_size]))
        pixels, owners = [], []
        for it, i in batch:
            if not (images and it.has_image):
                kept.append(it), kept_idx.append(i), feats.append(None), more.append([])
                continue
            if one_view and it.n_images > 1:
                skipped.append((it.sample_id, f"{it.sample_id}: {it.n_images} images in one prompt; {family.label} "
                                              "sends those without AnyRes, which the pruning harness does not model"))
                continue
            try:
                imgs = it.images
            except BadRow as exc:
                skipped.append((it.sample_id, str(exc)))
                continue
            kept.append(it), kept_idx.append(i), feats.append(None), more.append([None] * (len(imgs) - 1))
            pixels.extend(imgs)
            owners.extend((len(feats) - 1, slot) for slot in range(len(imgs)))
        if pixels:
            for (pos, slot), f in zip(owners, encode_images(model, processor, pixels, attention=attention,
                                                            embeds=embeds)):
                if slot == 0:
                    feats[pos] = f
                else:
                    more[pos][slot - 1] = f
            encoded += len(pixels)
        if on_batch:
            on_batch(len(batch))
    return ShardFeatures(kept, kept_idx, feats, skipped, encoded, attention, embeds, more)


@dataclasses.dataclass
class Predictions:
    """What :func:`predict_features` generated for a shard's items, in the items' order."""

    texts: list[str]            # the decoded greedy answers (special tokens skipped, stripped)
    visual_tokens: list[int]    # visual tokens the LLM saw per item (0 without an image)
    prefill_ms: float           # mean time to first token per sequence
    padding: int                # left-padding positions in the generate batches
    positions: int              # all positions of those batches


@torch.no_grad()
def predict_features(model, processor, shard: ShardFeatures, pruning: Pruning, inputs: Inputs | None = None,
                     batching: Batching | None = None) -> Predictions:
    """Pruned greedy answers to a shard's items for one ``pruning`` (strategy, retention, seed, ...): the part
    of :func:`evaluate_features` that does not depend on a benchmark (the lmms-eval plugin uses it too).

    Random keeps draw from a generator seeded by (seed, row index) (``strategies.seeded_generator``), so a
    result does not depend on how the benchmark is cut into shards or batches. With ``batching.group`` the
    items are batched by sequence length (visual plus prompt tokens), longest first, so a batch's left
    padding is small; outputs keep the items' order."""
    inputs, batching = inputs or Inputs(), batching or Batching()
    n = len(shard.items)
    sends = pruning.spec.sends_image
    use_image = [sends and f is not None for f in shard.features]
    # one unit per image: (item, slot); an item's images are pruned each on its own, at the same retention
    units = [(i, slot) for i in range(n) if use_image[i] for slot in range(len(shard.image_features(i)))]
    masks = _select_units(model, shard, units, pruning, inputs)
    slots = [len(shard.image_features(i)) if use_image[i] else 0 for i in range(n)]
    prompts = [chat_prompt(processor, it.prompt, slots[i]) for i, it in enumerate(shard.items)]
    tok = processor.tokenizer
    lengths = [len(tok(p)["input_ids"]) + sum(masks[i, k].tokens for k in range(slots[i]))
               for i, p in enumerate(prompts)]
    order = sorted(range(n), key=lambda i: -lengths[i]) if batching.group else list(range(n))
    preds: list[str] = [""] * n
    n_visual = [0] * n
    prefill: list[float] = []
    pad = {"padding": 0, "positions": 0}

    def run(start: int, stop: int) -> None:
        part = order[start:stop]
        visual = [[visual_embeddings(model, shard.image_features(i)[k], masks[i, k].mask, masks[i, k].extra)
                   for k in range(slots[i])] or None for i in part]
        out, ttft = generate_timed(model, processor, [prompts[i] for i in part], visual, batching.max_new_tokens,
                                   stats=pad)
        prefill.append(ttft / len(part))
        for i, p, v in zip(part, out, visual):
            preds[i] = p
            n_visual[i] = 0 if v is None else sum(int(t.shape[0]) for t in v)
        if batching.on_batch:
            batching.on_batch(len(part))

    device = str(getattr(model, "device", "cpu"))
    sizer = BatchSizer(batching.batch_size, device, generate_budget(model, device, batching.batch_size))
    sizer.run(n, run, [lengths[i] + batching.max_new_tokens for i in order])
    return Predictions(preds, n_visual, sum(prefill) / max(1, len(prefill)), pad["padding"], pad["positions"])


def generate_budget(model, device: str, batch_size: int | str) -> int | None:
    """Tokens per generate batch for ``--batch-size auto`` on CUDA: free memory now (model and shard
    features already there) over the LLM's bytes per token (``pipeline.memory``); None otherwise."""
    if batch_size != "auto" or not device.startswith("cuda"):
        return None
    from .memory import element_bytes, free_memory, token_budget, token_bytes

    return token_budget(free_memory(device)[0], token_bytes(model.config.text_config, element_bytes(model.dtype)))


SELECT_CHUNK = 64  # images per selections() call (one selector forward per chunk)


def _select_units(model, shard: ShardFeatures, units: list[tuple[int, int]], pruning: Pruning,
                  inputs: Inputs) -> dict[tuple[int, int], Any]:
    """Each image's Selection, through the one selection path (``strategies.selections``)."""
    masks: dict[tuple[int, int], Any] = {}
    spec = pruning.spec
    check_family([pruning.strategy], family_of(model))
    stock = family_of(model).stock_config(model, None) if pruning.budget == "stock" else None
    if spec.tower_attention and not shard.attention:
        raise ValueError(f"strategy {pruning.strategy!r} needs features encoded with attention")
    for start in range(0, len(units), SELECT_CHUNK):
        part = units[start:start + SELECT_CHUNK]
        feats = [shard.image_features(i)[slot] for i, slot in part]
        per_image = [strategy_inputs(model, pruning.strategy, f, shard.items[i].prompt, inputs.relevance)
                     for f, (i, _) in zip(feats, part)]
        if getattr(inputs.selector, "feature_kind", None) == "merged":  # a Qwen selector of the merger's output
            for extra, f in zip(per_image, feats):
                extra.setdefault("projected", project(model, f.features))
        if spec.seeded:
            for extra, (i, slot) in zip(per_image, part):
                extra["generator"] = seeded_generator(pruning.seed, shard.indices[i], slot)
        stock_features = None if stock is None else \
            [family_of(model).stock_tokens(model.config, f.image_size, stock).features for f in feats]
        got = selections(pruning.strategy, [f.features for f in feats], pruning.retention, pruning.select_budget,
                         Context(selector=inputs.selector),
                         Batch([f.valid for f in feats], per_image, stock_features),
                         pruning.options)
        masks.update(zip(part, got))
    return masks


@torch.no_grad()
def evaluate_features(model, processor, benchmark: str, shard: ShardFeatures, pruning: Pruning,
                      inputs: Inputs | None = None, batching: Batching | None = None) -> ChunkResult:
    """One ``pruning`` on a shard's cached tower features: :func:`predict_features` with the benchmark's
    generation settings (its ``max_new_tokens``), then its answer handling and metric."""
    bench = spec(benchmark)
    batching = dataclasses.replace(batching or Batching(), max_new_tokens=bench.max_new_tokens)
    got = predict_features(model, processor, shard, pruning, inputs, batching)
    preds, n_visual, n = got.texts, got.visual_tokens, len(shard.items)
    n_stock = stock_counts(model, processor, shard) if pruning.spec.sends_image else None
    rows, scores = [], []
    for i, it in enumerate(shard.items):
        pred, sc = score_response(benchmark, preds[i], it)
        scores.append(sc)
        rows.append({"sample_id": it.sample_id, "prediction": pred, "answer": " | ".join(it.answers), "score": sc,
                     "visual_tokens": n_visual[i], "index": shard.indices[i],
                     **({"stock_visual_tokens": n_stock[i]} if n_stock else {}),
                     **({"meta": _json_meta(it.meta)} if it.meta else {})})
    return ChunkResult(rows, aggregate(benchmark, scores, list(shard.items)), bench.metric, n,
                       sum(n_visual) / max(1, n), got.prefill_ms, got.padding, got.positions,
                       sum(n_stock) / max(1, n) if n_stock else None)


def stock_counts(model, processor, shard: ShardFeatures) -> list[int]:
    """Per item, the visual tokens the *stock* model sends for its images (0 without one), newlines included:
    ``Family.stock_tokens`` from each image's geometry under the checkpoint's own settings
    (``Family.stock_config``: OneVision's interpolation on, whatever eval set)."""
    family = family_of(model)
    stock = family.stock_config(model, processor)
    return [sum(family.stock_tokens(model.config, f.image_size, stock).total for f in shard.image_features(i))
            for i in range(len(shard.items))]


def strategy_inputs(model, strategy: str, f, question: str = "", relevance=None) -> dict[str, Any]:
    """The Context fields ``strategy`` needs or uses, for one image (``f``: its ImageFeatures): the tower's
    outputs as encoded, the regions and projected tokens from the model, the question's relevance."""
    spec_ = get(strategy)
    out: dict[str, Any] = {}
    for name in TOWER_FIELDS:
        if spec_.wants(name):
            out[name] = getattr(f, name)
    if spec_.wants("regions"):
        out["regions"] = base_regions(model, f.crops, f.tokens_per_crop, f.image_size)
    if spec_.wants("projected"):
        out["projected"] = project(model, f.features)
    if spec_.wants("grid") and getattr(f, "grid", None) is not None:  # Qwen-VL: (t, h, w) patches -> merged (rows, cols)
        _, h, w = f.grid
        merge = math.isqrt(h * w // f.features.shape[1])
        out["grid"] = (h // merge, w // merge)
    if spec_.wants("relevance") and relevance is not None:
        if f.last_hidden is None:
            raise ValueError(f"strategy {strategy!r} with a text encoder needs features encoded with embeds")
        out["relevance"] = relevance.relevance(f.last_hidden, question)
    return out


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The item metadata an aggregate needs, as JSON values."""
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v)) for k, v in meta.items()}


def merge_results(benchmark: str, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (strategy, retention, seed) result from its shards' ``{"samples", "summary"}``: the samples in
    row order and the benchmark's aggregate over all of them (CircularEval and MMStar group across shards)."""
    samples = sorted((r for p in parts for r in p["samples"]), key=lambda r: r.get("index", 0))
    stand_in = [EvalItem(r["sample_id"], None, "", r["answer"].split(" | "), r.get("meta", {})) for r in samples]
    scores = [r["score"] for r in samples]
    n = len(samples)
    weights = [p["summary"]["n_samples"] for p in parts]
    prefill = sum(p["summary"]["prefill_ms"] * w for p, w in zip(parts, weights)) / max(1, sum(weights))
    return {"samples": samples,
            "summary": {"metric": spec(benchmark).metric, "score": aggregate(benchmark, scores, stand_in),
                        "n_samples": n, "mean_visual_tokens": sum(r["visual_tokens"] for r in samples) / max(1, n),
                        "prefill_ms": prefill, **stock_summary(samples)}}


def stock_summary(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The context against the stock model over a result's samples (those that carry a stock count):
    ``stock_visual_tokens`` (mean), ``tokens_vs_stock`` (mean visual tokens / mean stock tokens) and
    ``above_stock`` (samples whose visual tokens exceed their stock count); {} without stock counts."""
    rows = [r for r in samples if r.get("stock_visual_tokens") is not None]
    if not rows:
        return {}
    n = len(samples)
    stock = sum(r["stock_visual_tokens"] for r in rows) / n
    sent = sum(r["visual_tokens"] for r in rows) / n
    return {"stock_visual_tokens": stock, "tokens_vs_stock": sent / stock if stock else None,
            "above_stock": sum(r["visual_tokens"] > r["stock_visual_tokens"] for r in rows)}


def eval_table(summary: list[dict]) -> list[dict]:
    """Chunk rows -> one row per (benchmark, strategy, variant, retention, budget, threshold): the score
    averaged over seeds, ``rel`` = score / the benchmark's full-image score, mean visual tokens, the stock
    model's (``stock_tokens``) and their ratio (``vs_stock``; None where unknown), prefill ms, and ``cached``
    when every seed's chunk was. ``variant`` ('' for the defaults) and ``threshold`` (0: a fixed budget)
    tell a strategy's variants and threshold sweeps apart."""
    groups: dict[tuple, list[dict]] = {}
    for r in summary:
        groups.setdefault((r["benchmark"], r["strategy"], r["retention"], r.get("budget", "per-crop"),
                           r.get("variant", ""), r.get("threshold", 0.0)), []).append(r)
    full = {b: g[0]["score"] for (b, s, *_), g in groups.items() if s == "full"}
    rows = []
    for (bench, strategy, retention, budget, variant, threshold), g in groups.items():
        score = sum(r["score"] for r in g) / len(g)
        tokens = sum(r["mean_visual_tokens"] for r in g) / len(g)
        stock = [r["stock_visual_tokens"] for r in g if r.get("stock_visual_tokens")]
        stock_tokens = sum(stock) / len(stock) if len(stock) == len(g) else None
        rows.append({"benchmark": bench, "strategy": strategy, "variant": variant, "retention": retention,
                     "budget": budget, "threshold": threshold, "metric": g[0]["metric"], "score": score, "seeds": len(g),
                     "rel": score / full[bench] if full.get(bench) else None, "visual_tokens": tokens,
                     "stock_tokens": stock_tokens, "vs_stock": tokens / stock_tokens if stock_tokens else None,
                     "prefill_ms": sum(r["prefill_ms"] for r in g) / len(g),
                     "cached": all(r.get("cached", False) for r in g),
                     **({"floor": g[0].get("floor", 0.0)} if budget == "threshold" else {})})
    return rows


__all__ = ["Predictions", "predict_features", "EvalConfig", "Pruning", "Inputs", "Batching", "default_strategies",
           "strategy_inputs", "ChunkResult", "ShardFeatures", "BatchSizer", "default_batch_size", "generate_budget",
           "encode_shard", "evaluate_features",
           "merge_results", "stock_counts", "stock_summary", "chat_prompt", "generate_timed", "eval_table"]
