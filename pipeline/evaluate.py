"""Pruned LLaVA-NeXT evaluation of one (benchmark, strategy, retention, seed) chunk.

Pure compute: items in, per-sample predictions and scores out. The flow
(``flows.evaluate``) caches chunks, records rows and draws plots.

Per batch: the tower runs once on every crop of every image
(``prune.encode_images``), the strategy picks each image's kept tokens
(``strategies.keep_masks``), the kept tokens are packed in raster order
(``prune.visual_embeddings``) and replace the ``<image>`` placeholder of the
processor's chat-template prompt; ``generate`` decodes greedily with left
padding. ``prefill_ms`` is the time to the first generated token of a batch
divided by its size (the prefill dominates it); ``visual_tokens`` counts what the
LLM saw (kept tokens plus kept row-newlines).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Sequence

import torch

from .benchmarks import EvalItem, aggregate, spec
from .config import EVAL_RETENTIONS, Config, check, check_compute
from .prune import encode_images, visual_embeddings
from .strategies import BUDGETS, STRATEGIES, Context, keep_masks


@dataclasses.dataclass(frozen=True)
class EvalConfig(Config):
    """What ``atr eval`` evaluates (the model, selector and data are stage inputs, not config)."""

    kind: ClassVar[str] = "eval"

    benchmarks: tuple = ("synthetic-ocr", "synthetic-scene")
    strategies: tuple = ("full", "none", "random", "selector", "attention", "diversity")
    retentions: tuple = EVAL_RETENTIONS
    budget: str = "per-crop"
    seeds: int = 3
    limit: int = 300
    batch_size: int = 16
    device: str = "auto"             # where the model runs
    model_dtype: str = "auto"        # the model's dtype (--dtype)

    def validate(self) -> None:
        from .benchmarks import BENCHMARKS

        for b in self.benchmarks:
            check(b in BENCHMARKS, f"unknown benchmark {b!r}; valid: {', '.join(BENCHMARKS)}")
        for s in self.strategies:
            check(s in STRATEGIES, f"unknown strategy {s!r}; valid: {', '.join(STRATEGIES)}")
        check(len(self.strategies) > 0 and len(self.benchmarks) > 0, "give at least one benchmark and strategy")
        for r in self.retentions:
            check(isinstance(r, (int, float)) and 0.0 < r <= 1.0, f"retention must be in (0, 1], got {r!r}")
        check(self.budget in BUDGETS, f"unknown budget {self.budget!r}; valid: {', '.join(BUDGETS)}")
        check(self.seeds > 0 and self.limit > 0 and self.batch_size > 0,
              "seeds, limit and batch_size must be positive")
        check_compute(self.device, self.model_dtype)

    def chunks(self) -> list[tuple[str, float, int]]:
        """(strategy, retention, seed) to run: full/none once, random per seed, the rest once per retention."""
        out = []
        for s in self.strategies:
            if s == "full":
                out.append((s, 1.0, 0))
            elif s == "none":
                out.append((s, 0.0, 0))
            else:
                for r in self.retentions:
                    out.extend((s, float(r), seed) for seed in (range(self.seeds) if s == "random" else [0]))
        return out


@dataclasses.dataclass
class ChunkResult:
    samples: list[dict[str, Any]]  # sample_id, prediction, answer, score, visual_tokens
    score: float
    metric: str
    n_samples: int
    mean_visual_tokens: float
    prefill_ms: float


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


def chat_prompt(processor, text: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def generate_timed(model, processor, prompts: Sequence[str], visual: Sequence[torch.Tensor | None],
                   max_new_tokens: int) -> tuple[list[str], float]:
    """``prune.generate_answers`` plus the batch's time to first token in ms."""
    from .prune import generate_answers

    timer = _FirstTokenTimer()
    t0 = time.perf_counter()
    out = generate_answers(model, processor, prompts, visual, max_new_tokens=max_new_tokens, streamer=timer)
    ttft = ((timer.first or time.perf_counter()) - t0) * 1000.0
    return out, ttft


@torch.no_grad()
def evaluate_chunk(model, processor, benchmark: str, items: Sequence[EvalItem], strategy: str, retention: float,
                   seed: int = 0, budget: str = "per-crop", selector=None, batch_size: int = 16,
                   on_batch: Callable[[int], None] | None = None) -> ChunkResult:
    bench = spec(benchmark)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    scores: list[float] = []
    prefill: list[float] = []
    visual_total = 0
    for start in range(0, len(items), batch_size):
        batch = list(items[start:start + batch_size])
        with_image = [strategy != "none" and it.image is not None for it in batch]
        encoded = encode_images(model, processor, [it.image for it, w in zip(batch, with_image) if w],
                                attention=strategy == "attention") if any(with_image) else []
        # One selector forward over every crop of the batch (the selector attends within a crop).
        masks = iter(keep_masks(strategy, [f.features for f in encoded], retention, budget,
                                Context(generator=gen, selector=selector),
                                cls_attention=[f.cls_attention for f in encoded],
                                valid=[f.valid for f in encoded]))
        feats = iter(encoded)
        visual: list[torch.Tensor | None] = []
        for w in with_image:
            visual.append(visual_embeddings(model, next(feats), next(masks)) if w else None)
        prompts = [chat_prompt(processor, it.prompt, v is not None) for it, v in zip(batch, visual)]
        preds, ttft = generate_timed(model, processor, prompts, visual, bench.max_new_tokens)
        prefill.append(ttft / len(batch))
        for it, pred, v in zip(batch, preds, visual):
            pred = pred.split("\n\n")[0].strip()  # lmms-eval's default `until`
            s = float(bench.score(pred, it))
            n_vis = 0 if v is None else int(v.shape[0])
            visual_total += n_vis
            scores.append(s)
            rows.append({"sample_id": it.sample_id, "prediction": pred, "answer": " | ".join(it.answers),
                         "score": s, "visual_tokens": n_vis})
        if on_batch:
            on_batch(len(batch))
    n = len(rows)
    return ChunkResult(rows, aggregate(benchmark, scores, list(items)), bench.metric, n,
                       visual_total / max(1, n), sum(prefill) / max(1, len(prefill)))


def eval_table(summary: list[dict]) -> list[dict]:
    """Chunk rows -> one row per (benchmark, strategy, retention): the score averaged over seeds,
    ``rel`` = score / the benchmark's full-image score, mean visual tokens and prefill ms, and
    ``cached`` when every seed's chunk was."""
    groups: dict[tuple, list[dict]] = {}
    for r in summary:
        groups.setdefault((r["benchmark"], r["strategy"], r["retention"]), []).append(r)
    full = {b: g[0]["score"] for (b, s, _), g in groups.items() if s == "full"}
    rows = []
    for (bench, strategy, retention), g in groups.items():
        score = sum(r["score"] for r in g) / len(g)
        rows.append({"benchmark": bench, "strategy": strategy, "retention": retention, "metric": g[0]["metric"],
                     "score": score, "seeds": len(g), "rel": score / full[bench] if full.get(bench) else None,
                     "visual_tokens": sum(r["mean_visual_tokens"] for r in g) / len(g),
                     "prefill_ms": sum(r["prefill_ms"] for r in g) / len(g),
                     "cached": all(r.get("cached", False) for r in g)})
    return rows


__all__ = ["EvalConfig", "ChunkResult", "evaluate_chunk", "chat_prompt", "generate_timed", "eval_table"]
