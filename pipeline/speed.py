"""Timing helpers for ``atr speed``: interleaved rounds, medians, peak tensor memory, machine load.

Pure torch. Every timed call is synchronized on CUDA. Timings interleave the
candidates (A B C A B C ...) after warm-up rounds, so a load change on a shared
machine hits all of them alike, and report medians.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .families import family_of
from .config import ConfigError

QUESTION = "What is written in the image? Answer with the text."


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``warmup`` untimed rounds, then ``repeats`` rounds A B C ...

    Returns ``{name: [seconds of round 1, ..., round repeats]}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median of a timing list: how noisy the rounds were (0 = identical)."""
    m = median(values)
    return (max(values) - min(values)) / m if m > 0 else 0.0


class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside the mode until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in self._seen or nbytes == 0 or storage.data_ptr() in inputs:
                continue  # already counted, an empty tensor, or an input (in place) or a view of one
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (and freed or not by its end); weights and
    other tensors that existed before are not counted.

    CUDA: ``max_memory_allocated`` above the level before the call. CPU (no allocator
    statistics): every tensor storage an op creates is counted until it is freed, through a
    dispatch mode -- slow, so call it outside timed runs. Workspace an op allocates and frees
    internally is not seen on the CPU."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    tracker = _StorageTracker()
    with tracker:
        out = fn()
    peak = tracker.peak
    del out
    return int(peak)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def _own_jiffies() -> int | None:
    """utime + stime of this process (all its threads) in jiffies."""
    try:
        with open("/proc/self/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LoadReport:
    """Machine load while a benchmark ran. ``other_cores`` is the mean number of CPU cores that
    *other* processes kept busy (0 = the machine was ours); None where /proc is missing."""

    cpus: int
    seconds: float
    other_cores: float | None
    other_cores_max: float | None
    own_cores: float | None
    loadavg_start: float | None
    loadavg_end: float | None
    samples: int
    threshold: float = 0.2
    warnings: list[str] = field(default_factory=list)

    @property
    def trustworthy(self) -> bool:
        return self.other_cores is None or self.other_cores <= self.threshold

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "seconds": self.seconds, "other_cores_mean": self.other_cores,
                "other_cores_max": self.other_cores_max, "own_cores_mean": self.own_cores,
                "loadavg1_start": self.loadavg_start, "loadavg1_end": self.loadavg_end, "samples": self.samples,
                "threshold_cores": self.threshold, "trustworthy": self.trustworthy}


def _loadavg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


class LoadSampler:
    """Samples, every ``interval`` seconds in a background thread, how many cores other processes use.

    Busy jiffies of the whole machine minus this process's own, over wall time. A mean above
    ``threshold`` cores (default 0.2: a tenth of a 2-CPU machine) marks the run untrustworthy:
    the full and pruned runs then competed with others for the cores, unevenly."""

    def __init__(self, interval: float = 0.5, threshold: float = 0.2, label: str = "the benchmark"):
        self.interval, self.threshold, self.label = interval, threshold, label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[tuple[float, float]] = []  # (other cores, own cores) per interval
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _read(self):
        return time.perf_counter(), _cpu_jiffies(), _own_jiffies()

    def _run(self) -> None:
        last = self._read()
        while not self._stop.wait(self.interval):
            now = self._read()
            self._add(last, now)
            last = now
        self._add(last, self._read())

    def _add(self, a, b) -> None:
        (t0, m0, o0), (t1, m1, o1) = a, b
        if m0 is None or m1 is None or o0 is None or o1 is None or t1 - t0 < 0.05 or m1[1] == m0[1]:
            return
        cpus = os.cpu_count() or 1
        busy_frac = (m1[0] - m0[0]) / (m1[1] - m0[1])  # fraction of all CPU time that was busy
        own = (o1 - o0) / self._tick / (t1 - t0)        # cores this process used
        self._samples.append((max(0.0, busy_frac * cpus - own), own))

    def __enter__(self) -> "LoadSampler":
        self._t0, self._load0 = time.perf_counter(), _loadavg()
        self._thread = threading.Thread(target=self._run, name="atr-load-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.report = self._report()

    def _report(self) -> LoadReport:
        other = [s[0] for s in self._samples]
        own = [s[1] for s in self._samples]
        rep = LoadReport(cpus=os.cpu_count() or 1, seconds=time.perf_counter() - self._t0,
                         other_cores=statistics.fmean(other) if other else None,
                         other_cores_max=max(other) if other else None,
                         own_cores=statistics.fmean(own) if own else None,
                         loadavg_start=self._load0, loadavg_end=_loadavg(), samples=len(other),
                         threshold=self.threshold)
        if not rep.trustworthy:
            rep.warnings.append(f"other processes kept {rep.other_cores:.2f} of {rep.cpus} CPU cores busy on "
                                f"average (max {rep.other_cores_max:.2f}) during {self.label}; its timings and their "
                                f"ratios are untrustworthy (threshold {self.threshold:.2f} cores): rerun on a quiet "
                                f"machine")
        return rep


# ---------------------------------------------------------------- what atr speed times

def use_sdpa(model) -> str:
    """Make sure the model runs PyTorch SDPA attention; return the implementation in use."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # a model without SDPA support keeps what it has
            pass
        impl = getattr(model.config, "_attn_implementation", impl)
    return str(impl)

# A family without crops (Qwen-VL: dynamic resolution) gets a 1344 x 1680 (height x width) image: 48 x 60 = 2,880
# merged tokens of 28 px on Qwen2.5-VL (the NeXT bench's 2,880 visual tokens), 42 x 52 = 2,184 of 32 px on
# Qwen3-VL; a tiny preset's max_pixels shrinks it to its own budget.
DYNAMIC_SPEED_IMAGE = (1344, 1680)


def speed_image(model):
    """A deterministic RGB image. A family with crops: the size of the grid pinpoint with the most crops (5 for
    llava-v1.6: 672x672 -> base + 2x2), so no crop is padding and the prompt has the model's largest visual token
    count. A family without crops (``Family.has_crops`` False): :data:`DYNAMIC_SPEED_IMAGE`."""
    import numpy as np
    from PIL import Image

    if family_of(model.config).has_crops:
        pins = [tuple(p) for p in model.config.image_grid_pinpoints]
        crop = model.config.vision_config.image_size
        h, w = max(pins, key=lambda p: ((p[0] // crop) * (p[1] // crop), -p[0] * p[1]))
    else:
        h, w = DYNAMIC_SPEED_IMAGE
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")

def speed_selector(tokens: int, channels: int, device, model=None):
    """A random-init paper selector (3 layers, d = C, FFN 4d, 16 heads where d allows) for (crops, L, C) features.
    A ``model`` without crops (Qwen-VL, whose features are 4 x its tower's width) gets d = the tower width, as
    ``atr train`` gives it (``pipeline.train.tiny_schedule``): the 7B's 5120 would be a 1.9 B-parameter selector."""
    from .selector import SelectorConfig, TokenSelector

    d = None
    if model is not None and not family_of(model.config).has_crops:
        d = int(model.config.vision_config.hidden_size)
    width = d or channels
    heads = max(h for h in range(1, 17) if width % h == 0)
    return TokenSelector(SelectorConfig(d_model=d, n_heads=heads), tokens, channels).to(device).eval()

def _prefill_call(model, x):
    """One prefill forward (logits of the last position) of a prompt as :func:`prompt_inputs` gives it."""
    if isinstance(x, dict):
        return lambda: model(**x, use_cache=True, logits_to_keep=1, return_dict=True)
    return lambda: model(inputs_embeds=x, use_cache=True, logits_to_keep=1, return_dict=True)


def prompt_inputs(model, processor, prompt: str, head: torch.Tensor, tail: torch.Tensor, kept=None):
    """One prompt's prefill input with the kept visual tokens ``kept`` (``prune.visual_embeddings``; None: the
    text alone). LLaVA: the (1, n, D) ``inputs_embeds`` of the text around the image (``head``, ``tail``) and the
    packed kept tokens. A family with its own runtime (``Family.own_runtime``: Qwen-VL) builds it itself
    (``prompt_inputs``: ids, exact M-RoPE ``position_ids``, the kept tokens and DeepStack features through
    ``mm_encoder_outputs``): spliced ``inputs_embeds`` would fall back to 1-D positions and drop DeepStack."""
    family = family_of(model.config)
    if family.own_runtime:
        return family.prompt_inputs(model, processor, [prompt], [kept])
    return torch.cat([head, tail] if kept is None else [head, kept, tail])[None]


def input_length(x) -> int:
    """Positions of a prompt from :func:`prompt_inputs`."""
    return int(x["input_ids"].shape[1] if isinstance(x, dict) else x.shape[1])

def cache_bytes(cache) -> int | None:
    """Bytes held by the K/V tensors of a transformers cache (None if its layout is unknown)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    if not total:
        for name in ("key_cache", "value_cache"):
            for t in getattr(cache, name, None) or []:
                total += t.numel() * t.element_size()
    return total or None

@dataclass
class _PrefillSetup:
    """What :func:`prefill_timings` times: the speed image, its tower features, the random-init selector's
    context, the chat prompt's text embeddings around the image, and the input embeddings of the full
    prompt (retention 1) and of the selector-pruned one at each retention below 1 (with their keep masks)."""

    image: Any
    feats: Any
    ctx: Any
    head: torch.Tensor
    tail: torch.Tensor
    keep_masks: dict[float, torch.Tensor]
    prompts: dict[float, Any]    # retention -> prompt_inputs (inputs_embeds, or a family's own input dict)
    prompt: str = ""
    text: Any = None             # the prompt without its image (prompt_inputs with no kept tokens)

    @property
    def text_tokens(self) -> int:
        return input_length(self.text)

    def visual_tokens(self, r: float) -> int:
        return input_length(self.prompts[r]) - self.text_tokens


def _prefill_setup(model, processor, config: dict[str, Any]) -> _PrefillSetup:
    """Encode the speed image once and build the full and pruned prompts (``config["retentions"]``)."""
    from .evaluate import chat_prompt
    from .prune import encode_images, split_prompt, visual_embeddings
    from .strategies import Context, keep_mask

    image = speed_image(model)
    prompt = chat_prompt(processor, QUESTION, True)
    with torch.inference_mode():
        feats = encode_images(model, processor, [image])[0]
        crops, tokens, channels = feats.features.shape
        selector = speed_selector(tokens, channels, feats.features.device, model)
        embed = model.get_input_embeddings()
        before, after = split_prompt(processor.tokenizer, prompt, model.config.image_token_id)
        if after is None:
            raise ConfigError(f"the chat prompt of {config['model']!r} has no image placeholder")
        head, tail = embed(before.to(embed.weight.device)), embed(after.to(embed.weight.device))
        ctx = Context(selector=selector)
        pruned = [r for r in config["retentions"] if r < 1.0]  # 1 keeps everything: the full prompt
        keep_masks = {r: keep_mask("selector", feats.features, r, "per-crop", ctx, feats.valid) for r in pruned}
        prompts = {1.0: prompt_inputs(model, processor, prompt, head, tail, visual_embeddings(model, feats))}
        for r, mask in keep_masks.items():
            prompts[r] = prompt_inputs(model, processor, prompt, head, tail, visual_embeddings(model, feats, mask))
        text = prompt_inputs(model, processor, prompt, head, tail)
    return _PrefillSetup(image, feats, ctx, head, tail, keep_masks, prompts, prompt, text)


def _prefill_candidates(model, processor, setup: _PrefillSetup, ttft: bool) -> dict[str, Callable[[], object]]:
    """The timed calls, in the order each round runs them: the prefill of every prompt, of the text alone,
    the selector + top-k at each pruned retention and, with ``ttft``, image-to-first-token per prompt."""
    from .strategies import keep_mask

    candidates = {f"prefill@{r:g}": _prefill_call(model, x) for r, x in setup.prompts.items()}
    # The prompt without its image: the fixed cost of one forward (Python, kernel launches) plus the text.
    candidates["prefill@text"] = _prefill_call(model, setup.text)
    for r in setup.keep_masks:
        candidates[f"selector@{r:g}"] = functools.partial(keep_mask, "selector", setup.feats.features, r, "per-crop",
                                                          setup.ctx, setup.feats.valid)
    if ttft:
        for r in setup.prompts:
            candidates[f"ttft@{r:g}"] = functools.partial(_first_token, model, processor, setup, r)
    return candidates


def _first_token(model, processor, setup: _PrefillSetup, r: float):
    """One image-to-first-token round: processor, tower, the selector's keep mask (below 1), packing,
    prefill and the greedy first token."""
    from .prune import encode_images, visual_embeddings
    from .strategies import keep_mask

    f = encode_images(model, processor, [setup.image])[0]
    mask = None if r == 1.0 else keep_mask("selector", f.features, r, "per-crop", setup.ctx, f.valid)
    x = prompt_inputs(model, processor, setup.prompt, setup.head, setup.tail, visual_embeddings(model, f, mask))
    return _prefill_call(model, x)().logits[:, -1].argmax(-1)


def _prefill_row(setup: _PrefillSetup, r: float, times: dict[str, list[float]], lm, bytes_per: int,
                 peak_bytes: int | None, kv_bytes: int | None, ttft: bool) -> dict[str, Any]:
    """The figures of the prompt at retention ``r``: medians, speed-up, memory and the FLOPs model's limits."""
    from . import flops as F

    full_s = median(times["prefill@1"])
    t = median(times[f"prefill@{r:g}"])
    text_tokens, n_vis, full_vis = setup.text_tokens, setup.visual_tokens(r), setup.visual_tokens(1.0)
    row: dict[str, Any] = {
        "visual_tokens": n_vis, "seconds": t, "spread": spread(times[f"prefill@{r:g}"]),
        "times": times[f"prefill@{r:g}"], "measured_speedup": full_s / t,
        "peak_bytes": peak_bytes, "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_model": F.kv_cache_bytes(lm, text_tokens + n_vis, bytes_per),
    }
    for conv in F.CONVENTIONS:
        row[f"flops_{conv}"] = F.prefill_flops(lm, text_tokens, n_vis, conv)
        row[f"ideal_{conv}"] = F.ideal_speedup(lm, text_tokens, full_vis, n_vis, conv)
    row["flops_per_second"] = row["flops_causal"] / t
    if r != 1.0:
        crops, tokens, channels = setup.feats.features.shape
        selector = setup.ctx.selector
        sel_s = median(times[f"selector@{r:g}"])
        sel_dims = F.SelectorDims(tokens=tokens, channels=channels, d_model=selector.cfg.d_model,
                                  layers=selector.cfg.selector_layers, ffn_mult=selector.cfg.ffn_mult)
        predicted = F.selector_share(sel_dims, crops, lm, text_tokens, full_vis)
        row.update(selector_seconds=sel_s, selector_share=sel_s / full_s, selector_share_predicted=predicted,
                   selector_flops=F.selector_flops(sel_dims, crops),
                   encoder_tokens_kept=int(setup.keep_masks[r].sum()))
    if ttft:
        row["ttft_seconds"] = median(times[f"ttft@{r:g}"])
    return row


def prefill_timings(model, processor, config: dict[str, Any], device: str, ttft: bool) -> dict[str, Any]:
    """Median prefill seconds of the full prompt and of the selector-pruned one at each of
    ``config["retentions"]`` (interleaved rounds), the selector + top-k time, peak memory, KV-cache
    bytes and the FLOPs of every convention; with ``ttft`` also image-to-first-token."""
    from . import flops as F

    dims = family_of(model.config).flops_dims(model.config)
    setup = _prefill_setup(model, processor, config)
    candidates = _prefill_candidates(model, processor, setup, ttft)
    with torch.inference_mode():
        times = interleaved(candidates, config["repeats"], config["warmup"], device)
        memory, kv = {}, {}
        for r, x in setup.prompts.items():
            memory[r] = peak_memory(_prefill_call(model, x), device)
            kv[r] = cache_bytes(_prefill_call(model, x)().past_key_values)

    bytes_per = next(model.parameters()).element_size()
    per_r = {r: _prefill_row(setup, r, times, dims.lm, bytes_per, memory[r], kv[r], ttft) for r in setup.prompts}
    text_tokens = setup.text_tokens
    crops, tokens, channels = setup.feats.features.shape
    text_only = {"seconds": median(times["prefill@text"]), "flops_causal": F.prefill_flops(dims.lm, text_tokens, 0)}
    vicuna_visual = F.llava_next_visual_tokens(24, 2, 2)
    projected = F.selector_share(F.CLIP_L_SELECTOR, 5, F.VICUNA_7B.lm, 60, vicuna_visual)
    return {"text_tokens": text_tokens, "crops": crops, "tokens_per_crop": tokens, "channels": channels,
            "encoder_tokens": crops * tokens, "selector_heads": setup.ctx.selector.cfg.n_heads,
            "image_size": list(setup.image.size), "by_retention": per_r, "text_only": text_only,
            "projection": {"model": "llava-v1.6-vicuna-7b", "selector": "CLIP-L width 1024, 5 x 576 tokens",
                           "text_tokens": 60, "visual_tokens": vicuna_visual, "selector_share": projected,
                           "selector_flops": F.selector_flops(F.CLIP_L_SELECTOR, 5),
                           "prefill_flops": F.prefill_flops(F.VICUNA_7B.lm, 60, vicuna_visual)},
            "lm": vars(dims.lm)}


def _choose(model, ctx, strategy: str, r: float, f):
    """``strategy``'s choice at ``r`` on the features ``f`` (seeded generator, its own inputs)."""
    from dataclasses import replace

    from .evaluate import strategy_inputs
    from .strategies import select

    c = replace(ctx, generator=torch.Generator().manual_seed(0), **strategy_inputs(model, strategy, f))
    return select(strategy, f.features, r, "per-crop", c, f.valid)


def _strategy_first_token(model, processor, image, prompt: str, head: torch.Tensor, tail: torch.Tensor, ctx,
                          strategy: str, r: float):
    """One image-to-first-token round with ``strategy`` at ``r`` (the tower's CLS attention and keys where
    the strategy scores with them)."""
    from .prune import encode_images, visual_embeddings
    from .strategies import get

    f = encode_images(model, processor, [image], attention=get(strategy).tower_attention)[0]
    sel = _choose(model, ctx, strategy, r, f)
    x = prompt_inputs(model, processor, prompt, head, tail, visual_embeddings(model, f, sel.mask, sel.extra))
    return _prefill_call(model, x)().logits[:, -1].argmax(-1)


def strategy_timings(model, processor, strategies, retentions, repeats: int, warmup: int,
                     device: str) -> dict[str, Any]:
    """Every strategy side by side on the speed image, at equal budgets (interleaved rounds).

    Per (strategy, retention): ``select_seconds``, the strategy's own work per image once the tower has
    run (its inputs that are not tower outputs -- projection, crop regions -- and the choice itself),
    ``ttft_seconds``, image -> processor -> tower (with the CLS attention and keys where the strategy
    scores with them) -> choice -> packing -> prefill -> first token, and the tokens sent. ``cdpruner``
    runs unconditioned (no text encoder here). The selector is random-init, as in the prefill timings."""
    from .evaluate import chat_prompt
    from .prune import encode_images, split_prompt, visual_embeddings
    from .strategies import Context, check_strategy

    for s in strategies:
        check_strategy(s)
    image = speed_image(model)
    prompt = chat_prompt(processor, QUESTION, True)
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        feats = encode_images(model, processor, [image], attention=True)[0]
        crops, tokens, channels = feats.features.shape
        ctx = Context(selector=speed_selector(tokens, channels, feats.features.device, model))
        before, after = split_prompt(processor.tokenizer, prompt, model.config.image_token_id)
        head, tail = embed(before.to(embed.weight.device)), embed(after.to(embed.weight.device))
    first_token = functools.partial(_strategy_first_token, model, processor, image, prompt, head, tail, ctx)

    pruned = [r for r in retentions if r < 1.0]
    candidates, sent = {}, {}
    with torch.inference_mode():
        for s in strategies:
            for r in pruned:
                sel = _choose(model, ctx, s, r, feats)
                sent[(s, r)] = (sel.tokens, int(visual_embeddings(model, feats, sel.mask, sel.extra).shape[0]))
                candidates[f"select/{s}@{r:g}"] = functools.partial(_choose, model, ctx, s, r, feats)
                candidates[f"ttft/{s}@{r:g}"] = functools.partial(first_token, s, r)
        candidates["ttft/full"] = functools.partial(first_token, "full", 1.0)
        times = interleaved(candidates, repeats, warmup, device)
    rows = {}
    for s in strategies:
        for r in pruned:
            rows.setdefault(s, {})[r] = {"select_seconds": median(times[f"select/{s}@{r:g}"]),
                                         "ttft_seconds": median(times[f"ttft/{s}@{r:g}"]),
                                         "tokens": sent[(s, r)][0], "visual_tokens": sent[(s, r)][1]}
    return {"strategies": rows, "ttft_full_seconds": median(times["ttft/full"]), "crops": crops,
            "tokens_per_crop": tokens, "image_size": list(image.size)}


def _crop_batches(model, processor, cfg, items):
    """(bare tower, preprocessing, crops, tower FLOPs) of a family with fixed crops (LLaVA): the stage's own
    tower pass on the pixel crops of each batch, up to the feature layer."""
    from .extract import FeatureExtractor
    from .flops import vision_tower_flops

    fx = FeatureExtractor(model, processor, crops=cfg.crops)
    images = [it.load().image for it in items]
    batches = [torch.cat(fx.pixel_crops(images[i:i + cfg.batch_size]))
               for i in range(0, len(images), cfg.batch_size)]
    param = next(fx.tower.parameters())
    batches = [b.to(param.device, param.dtype) for b in batches]

    def bare_tower():
        with torch.inference_mode():
            for b in batches:
                fx.features(b)  # the stage's own tower pass: up to the feature layer, keeping it alone

    def preprocess():  # what the stage does before the tower: render/decode, image processor
        imgs = [it.load().image for it in items]
        for i in range(0, len(imgs), cfg.batch_size):
            fx.pixel_crops(imgs[i:i + cfg.batch_size])

    crops = sum(int(b.shape[0]) for b in batches)
    return bare_tower, preprocess, crops, vision_tower_flops(family_of(model.config).flops_dims(model.config).vision,
                                                             crops)


def _grid_batches(model, processor, cfg, items):
    """The same for a family without crops (Qwen-VL): the tower (``model.model.visual``) on each batch's patches
    and their ``image_grid_thw``, one "crop" per image; FLOPs from each image's own patch grid."""
    from .flops import qwen_tower_flops

    visual = family_of(model.config).tower_of(model)
    param = next(visual.parameters())
    images = [it.load().image for it in items]
    batches = []
    for i in range(0, len(images), cfg.batch_size):
        enc = processor.image_processor(images=images[i:i + cfg.batch_size], return_tensors="pt")
        batches.append((enc["pixel_values"].to(param.device, param.dtype), enc["image_grid_thw"].to(param.device)))

    def bare_tower():
        with torch.inference_mode():
            for pixels, grid in batches:
                visual(pixels, grid_thw=grid)

    def preprocess():
        imgs = [it.load().image for it in items]
        for i in range(0, len(imgs), cfg.batch_size):
            processor.image_processor(images=imgs[i:i + cfg.batch_size], return_tensors="pt")

    vit = family_of(model.config).flops_dims(model.config).vision
    flops = sum(qwen_tower_flops(vit, int(h), int(w), int(t))["total"]
                for _, grid in batches for t, h, w in grid.tolist())
    return bare_tower, preprocess, len(images), flops


def extraction_timings(model, processor, cfg, rounds: int, device: str, stage_again: Callable[[], object],
                       before_round: Callable[[], object]) -> dict[str, Any]:
    """Interleaved rounds of the whole extract stage (``stage_again``), the bare vision-tower forward
    on the same pixel batches, and the preprocessing alone (render/decode + image processor).

    ``before_round`` runs outside the clock before each round (it removes the last stage output).
    Returns the three timing lists, the image and crop counts (a family without crops: one per image) and the
    tower's FLOPs."""
    from .images import open_source

    items = open_source(cfg.images, seed=cfg.seed).items(cfg.limit)
    batches = _crop_batches if family_of(model.config).has_crops else _grid_batches
    bare_tower, preprocess, crops, tower_flops = batches(model, processor, cfg, items)

    # The stage's cold run warmed the tower on these very batch shapes: no extra warm-up round.
    times: dict[str, list[float]] = {"stage": [], "bare_tower": [], "preprocess": []}
    for _ in range(rounds):
        before_round()
        for name, seconds in interleaved({"stage": stage_again, "bare_tower": bare_tower,
                                          "preprocess": preprocess}, 1, 0, device).items():
            times[name] += seconds
    return {"times": times, "images": len(items), "crops": crops, "tower_flops": tower_flops}


def selector_training_timings(dims, batch_size: int, steps: int, device: str, autocast: str = "none",
                              warmup: int = 1) -> dict[str, Any]:
    """Selector training throughput at ``dims`` (a ``flops.SelectorDims``): ``warmup`` untimed, then
    ``steps`` timed optimizer steps of the training loop itself (``pipeline.train.Trainer.fit``: the
    forward of selector and reconstructor under ``autocast`` where it applies, the loss, backward,
    gradient clipping, AdamW) on random fp16 ``(batch_size, L, C)`` batches held on the CPU, as the
    shard loader delivers them (each step moves its batch to the device and widens it there). The
    paper's defaults otherwise (``SelectorConfig``: 16 heads where d allows, FFN 4d, 3 + 3 layers).

    Returns seconds per step (median and each), crops/s, the FLOPs model's FLOPs per step, achieved
    FLOP/s, parameters, torch threads, whether bf16 autocast ran, and on CUDA the peak bytes the
    training allocated during the timed steps (its weights, gradients and AdamW moments included;
    whatever was on the device before, such as the loaded model, not)."""
    from .flops import selector_parameters, selector_training_flops
    from .selector import SelectorConfig
    from .train import Callback, Trainer

    if batch_size < 1 or steps < 1 or warmup < 1:
        raise ValueError(f"batch_size, steps and warmup must be >= 1, got {batch_size}, {steps}, {warmup}")
    d = dims.d
    heads = max(h for h in range(1, 17) if d % h == 0)
    cfg = SelectorConfig(d_model=dims.d_model, n_heads=heads, ffn_mult=dims.ffn_mult, selector_layers=dims.layers,
                         reconstructor_layers=dims.reconstructor_layers, steps=warmup + steps, batch_size=batch_size,
                         warmup_steps=0)
    cuda = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0  # what else is on the device (a loaded model)
    trainer = Trainer(cfg, dims.tokens, dims.channels, device=device, autocast=autocast)
    batch = torch.randn(batch_size, dims.tokens, dims.channels, generator=torch.Generator().manual_seed(0)).half()
    stamps: list[float] = []
    peak = None

    class _Clock(Callback):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            synchronize(device)
            stamps.append(time.perf_counter())
            if step == warmup and cuda:
                torch.cuda.reset_peak_memory_stats(device)

    def forever():
        while True:
            yield batch

    trainer.fit(forever(), [_Clock()], checkpoint_every=10 ** 9, log_every=1)
    if cuda:
        peak = int(torch.cuda.max_memory_allocated(device)) - before
    times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    per_step = median(times)
    step_flops = selector_training_flops(dims, batch_size)
    out = {"tokens": dims.tokens, "channels": dims.channels, "d_model": d, "heads": heads,
           "layers": dims.layers, "reconstructor_layers": dims.reconstructor_layers, "ffn_mult": dims.ffn_mult,
           "parameters": sum(p.numel() for p in trainer.model.parameters()),
           "parameters_model": selector_parameters(dims), "batch_size": batch_size, "steps": steps,
           "warmup": warmup, "device": device, "autocast": bool(trainer.autocast), "threads": torch.get_num_threads(),
           "step_times": times, "seconds_per_step": per_step, "spread": spread(times),
           "crops_per_second": batch_size / per_step, "flops_per_step": step_flops,
           "flops_per_crop": selector_training_flops(dims, 1), "flops_per_second": step_flops / per_step,
           "peak_bytes": peak}
    del trainer, batch
    if cuda:
        torch.cuda.empty_cache()
    return out


def selector_training_projection(dims, flops_per_second: float, steps: int, batch_size: int) -> dict[str, Any]:
    """Time to train a selector at ``dims`` on the paper's data (100K COCO crops) for ``steps`` steps of
    ``batch_size`` crops, from the FLOPs model: at the measured ``flops_per_second``, and on an H100 at
    an assumed 40 % of its dense bf16 peak."""
    from . import flops as F

    crops = steps * batch_size
    work = F.selector_training_flops(dims, crops)
    gpu = F.H100_BF16_PEAK_FLOPS * F.ASSUMED_UTILIZATION
    return {"dataset_crops": F.PAPER_TRAINING_CROPS, "steps": steps, "batch_size": batch_size, "crops": crops,
            "passes": crops / F.PAPER_TRAINING_CROPS, "flops": work,
            "seconds_measured": work / flops_per_second if flops_per_second > 0 else None,
            "gpu": "H100", "gpu_peak_flops": F.H100_BF16_PEAK_FLOPS, "gpu_utilization": F.ASSUMED_UTILIZATION,
            "seconds_gpu": work / gpu}


__all__ = ["interleaved", "median", "spread", "peak_memory", "LoadSampler", "LoadReport", "synchronize", "DYNAMIC_SPEED_IMAGE",
           "prompt_inputs", "input_length",
           "use_sdpa", "speed_image", "speed_selector", "cache_bytes", "prefill_timings", "extraction_timings",
           "strategy_timings", "selector_training_timings", "selector_training_projection"]
