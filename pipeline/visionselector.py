"""VisionSelector (Zhu et al., *VisionSelector: End-to-End Learnable Visual Token Compression for Efficient
Multimodal LLMs*, arXiv 2510.16598; reference code JulietChoo/VisionSelector), re-implemented for the tiny
world.

A light **scorer** rates every visual token of an image; the top-K by score go to the LLM. It is trained
end to end through the *frozen* MLLM's next-token loss, with a differentiable top-k and a curriculum,
at one training ratio, and used at every budget.

What the scorer reads: the **projected** (LLM-space) tokens, the projector's output -- the reference
scores the output of the vision merger (``self.merger(hidden_states)``, the tokens the LLM would embed),
not the tower's own features. In atr terms that is the ``Context`` field ``projected`` ``(crops, L, D)``.
All valid tokens of an image (every crop, the base crop included; never LLaVA-NeXT's unpadded padding)
are scored together, as the reference scores one image's merged tokens as one sequence.

The pieces, each following the reference:

* :class:`Scorer` (their ``TransformerScorer``): key and query projections of width ``hidden`` (the
  reference: half the LLM width, 2048 for a 4096-wide LLM; here 64 for the tiny LM's 128), initialized
  near zero (std 1e-4, zero bias), and score_i = mean_j q_i . k_j / sqrt(hidden) over the image's
  tokens j. Computed here as q_i . mean_j(k_j) / sqrt(hidden): the same value in O(N) instead of the
  (N, N) matrix.
* :func:`soft_top_k` (their ``TopK`` autograd function): the mask sigmoid(s_i + t) with t found by
  bisection so that the mask sums to k, and its exact vector-Jacobian product, diag(v) - v v^T / sum(v)
  with v = sigmoid'(s + t). At inference (:func:`hard_top_k`) the k highest scores are kept: exactly k.
* **Training** (:func:`train_visionselector`): the soft mask multiplies the projected tokens, which all
  stay in the sequence (a dropped token becomes a near-zero vector), and the loss is the frozen LM's
  next-token loss on the answer plus w * BCE(soft mask, hard top-k mask). **Curriculum annealing**: w
  grows linearly from 0.1 to 3.0 over training (their ``ScheduledWeightTrainer``), so the soft selection
  is pushed towards the hard one used at inference. One training ratio (0.2, theirs) for every budget.
  AdamW, no weight decay, 3 % linear warm-up then cosine, gradient clipping at 1.0 (their script).

What differs, and why:

* **Scale.** Their scorer has 12.85M parameters on a 3584-wide LLM, trained for one epoch on OCR-VQA,
  ChartQA, TextVQA and COCO conversations at batch 128 and lr 5e-5; here 16.5k parameters, 600 steps on
  the train splits of both synthetic benchmarks, batches of 16 and lr 3e-3 (``VisionSelectorConfig``),
  so it trains in minutes on 2 CPUs.
* **Row newlines** (LLaVA-NeXT/OneVision packing; their Qwen2.5-VL/OV-1.5 models have none). In
  training every newline stays, unscaled; at inference a row's newline is kept iff the row keeps a token
  (atr's rule for every strategy).
* **The budget.** At inference K is atr's equal budget for the image (``Request.image_budget``: every
  strategy sends as many tokens as ``random``), spread over the image by score; the reference keeps
  max(1, int(r * N)) of the image's N tokens.

Pure torch + transformers + safetensors. Progress is a callback, as in ``pipeline.tinyworld``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from .config import Config, check
from .strategies.core import top_k
from .strategies.visionselector import (CHECKPOINT, FORMAT, SHIPPED_DIR, CheckpointMismatch, Loaded, Scorer, facts_of,
                                        image_scores, load_scorer, mismatch, resolve, shipped_checkpoints)

VISIONSELECTOR_VERSION = "1"  # bump when the recipe changes the trained weights
PROVENANCE = "visionselector.json"
TRAINABLE_MODELS = ("tiny-trained", "tiny-ov-trained")  # the tiny world's models (the train splits they read)

Progress = Callable[[str, int, int, dict], None]  # (phase, step, total, metrics)


# ---------------------------------------------------------------- the differentiable top-k

class _SoftTopK(torch.autograd.Function):
    """sigmoid(s + t), t per row such that the row sums to k; backward is the exact VJP."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        s = scores.detach()
        s = s if s.dtype == torch.float64 else s.float()
        t = _threshold(s, k, valid)
        p = torch.sigmoid(s + t) * valid
        n = valid.sum(dim=1, keepdim=True)
        p = torch.where(k[:, None] >= n, valid.to(p.dtype), p)  # every token kept (the reference needs k < n)
        p = torch.where(k[:, None] <= 0, torch.zeros_like(p), p)
        ctx.save_for_backward(p, valid)
        return p.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, valid = ctx.saved_tensors
        v = p * (1.0 - p) * valid  # sigmoid'(s + t) on the row's tokens
        gv = grad.to(v.dtype) * v
        # J = diag(v) - v v^T / sum(v): t moves with the scores so that the row keeps summing to k
        out = gv - gv.sum(dim=1, keepdim=True) * v / v.sum(dim=1, keepdim=True).clamp(min=1e-30)
        return out.to(grad.dtype), None, None


@torch.no_grad()
def _threshold(s: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """(B, 1) shift t with sum_i sigmoid(s_i + t) = k per row over the valid tokens (bisection, as the
    reference: from where every sigmoid is near 0 to where every one is near 1)."""
    big = torch.finfo(s.dtype).max
    lo = -s.masked_fill(~valid, -big).amax(dim=1, keepdim=True) - 10.0
    hi = -s.masked_fill(~valid, big).amin(dim=1, keepdim=True) + 10.0
    kk = k.to(s.dtype)[:, None]
    for _ in range(iterations):
        mid = (lo + hi) / 2
        low = (torch.sigmoid(s + mid) * valid).sum(dim=1, keepdim=True) < kk
        lo = torch.where(low, mid, lo)
        hi = torch.where(low, hi, mid)
    return (lo + hi) / 2


def soft_top_k(scores: torch.Tensor, k: torch.Tensor | int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The differentiable top-k (training): ``(B, N)`` soft mask in (0, 1) over each row's valid tokens
    (0 elsewhere) that sums to ``k[b]``, ordered as the scores, with gradients to ``scores``."""
    scores, k, valid = _rows(scores, k, valid)
    return _SoftTopK.apply(scores, k, valid)


def hard_top_k(scores: torch.Tensor, k: torch.Tensor | int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The top-k at inference: ``(B, N)`` bool mask of exactly ``k[b]`` valid tokens per row (the highest
    scores; ties to the lower index)."""
    scores, k, valid = _rows(scores, k, valid)
    return top_k(scores.detach(), k, valid, per_crop=True)


def differentiable_top_k(scores: torch.Tensor, k: torch.Tensor | int, valid: torch.Tensor | None = None,
                         training: bool = True) -> torch.Tensor:
    """Soft mask with gradients while ``training``; the exact hard top-k (as float) otherwise."""
    return soft_top_k(scores, k, valid) if training else hard_top_k(scores, k, valid).to(scores.dtype)


def _rows(scores: torch.Tensor, k, valid):
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, tokens), got shape {tuple(scores.shape)}")
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.to(torch.bool)
    n = valid.sum(dim=1)
    k = torch.as_tensor(k, device=scores.device).long().reshape(-1).expand(scores.shape[0]).clone()
    if bool((k < 0).any()) or bool((k > n.to(k.device)).any()):
        raise ValueError(f"k must be in [0, valid tokens] per row, got k={k.tolist()} for {n.tolist()} tokens")
    return scores, k, valid


def reg_weight(step: int, steps: int, start: float = 0.1, end: float = 3.0) -> float:
    """Curriculum annealing: the weight of the BCE(soft, hard) term at ``step`` of ``steps``, linear
    from ``start`` to ``end`` (the reference's ``ScheduledWeightTrainer``)."""
    return start + (end - start) * min(1.0, step / max(1, steps))


def train_k(n: int, ratio: float) -> int:
    """Tokens kept of an image of ``n`` tokens while training at ``ratio``: int(ratio * n) as the
    reference, at least 1."""
    return min(n, max(1, int(n * ratio)))


# ---------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class VisionSelectorConfig(Config):
    """Everything that determines a VisionSelector's weights, given the frozen model it trains through."""

    kind: ClassVar[str] = "visionselector"

    ratio: float = 0.2              # the one training ratio (the reference's --budgets 0.2)
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    reg_start: float = 0.1          # curriculum annealing of the BCE(soft, hard) weight
    reg_end: float = 3.0
    hidden: int = 0                 # scorer width; 0: half the LLM width (the reference's ratio)
    init_scale: float = 1e-4
    train_ocr: int = 2000           # samples of synthetic-ocr's train split
    train_scene: int = 1000         # samples of synthetic-scene's train split
    data_seed: int = 0
    seed: int = 0
    version: str = VISIONSELECTOR_VERSION

    def validate(self) -> None:
        check(0.0 < self.ratio < 1.0, f"ratio must be in (0, 1), got {self.ratio!r}")
        for name in ("steps", "batch_size"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        check(self.train_ocr >= 0 and self.train_scene >= 0 and self.train_ocr + self.train_scene > 0,
              "train_ocr + train_scene must be positive")
        check(0.0 < self.lr < 1.0, f"lr must be in (0, 1), got {self.lr!r}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check(self.hidden >= 0, f"hidden must be >= 0, got {self.hidden!r}")

    def data(self) -> list[dict[str, Any]]:
        """Which samples it trains on: the train splits only (never val or test)."""
        return [{"benchmark": b, "split": "train", "samples": n, "seed": self.data_seed}
                for b, n in (("synthetic-ocr", self.train_ocr), ("synthetic-scene", self.train_scene)) if n]


@dataclasses.dataclass
class Item:
    """One training sample, ready for the scorer and the frozen LM."""

    projected: torch.Tensor  # (crops * L, D) the projector's output, frozen
    valid: torch.Tensor      # (crops * L,) bool: the tokens the LLM can see
    gather: torch.Tensor     # (packed,) index into cat(projected, newline) of each packed position
    before: torch.Tensor     # prompt ids before the image
    after: torch.Tensor      # prompt ids after it, then the answer ids
    answer_len: int


def train_split_samples(config: VisionSelectorConfig, split: str = "train"):
    from .synthetic import generate_samples

    return [s for d in config.data() for s in generate_samples(d["benchmark"], split, d["samples"], seed=d["seed"])]


@torch.no_grad()
def prepare_items(model, processor, samples: Sequence[Any], progress: Progress | None = None) -> list[Item]:
    """Encode samples as the tiny world trains (``pipeline.tinyworld.encode``), run the frozen tower and
    projector once, and lay out each image's packed sequence (``pipeline.prune.packing_layout``: the
    model's own ``pack_image_features``)."""
    from .prune import packing_layout, project, valid_tokens
    from .tinyworld import encode, tower_features

    out = []
    for i, s in enumerate(samples):
        enc = encode(s, processor, model.config)
        feats = tower_features(model, enc.pixels.to(next(model.parameters()).device))
        crops, tokens = feats.shape[:2]
        source, _, _ = packing_layout(model, crops, tokens, enc.image_size, feats.device)
        gather = torch.where(source < 0, torch.full_like(source, crops * tokens), source)
        valid = valid_tokens(model, crops, tokens, enc.image_size, feats.device).flatten()
        device = feats.device
        out.append(Item(project(model, feats).flatten(0, 1).float(), valid, gather, enc.before.to(device),
                        torch.cat([enc.after, enc.answer]).to(device), int(enc.answer.shape[0])))
        if progress and ((i + 1) % 256 == 0 or i + 1 == len(samples)):
            progress("data", i + 1, len(samples), {})
    return out


def _padded(items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) projected tokens and (B, N) valid, padded to the longest image of the batch."""
    n = max(it.projected.shape[0] for it in items)
    x = items[0].projected.new_zeros(len(items), n, items[0].projected.shape[1])
    valid = torch.zeros(len(items), n, dtype=torch.bool, device=x.device)
    for i, it in enumerate(items):
        x[i, : it.projected.shape[0]] = it.projected
        valid[i, : it.valid.shape[0]] = it.valid
    return x, valid


def _sequences(model, items: Sequence[Item], weights: torch.Tensor):
    """Right-padded inputs_embeds / attention mask / labels of [prompt | soft-masked image | prompt |
    answer]: every packed token is its projected vector times its soft-mask weight; newlines stay."""
    embed = model.get_input_embeddings()
    newline = model.model.image_newline
    rows, labels = [], []
    for i, it in enumerate(items):
        n = it.projected.shape[0]
        table = torch.cat([it.projected * weights[i, :n, None], newline.to(it.projected.dtype)[None]])
        vis = table[it.gather].to(embed.weight.dtype)
        rows.append(torch.cat([embed(it.before), vis, embed(it.after)]))
        n_prompt = rows[-1].shape[0] - it.answer_len
        labels.append(torch.cat([torch.full((n_prompt,), -100, dtype=torch.long, device=it.after.device),
                                 it.after[-it.answer_len:]]))
    width = max(r.shape[0] for r in rows)
    device = rows[0].device
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    y = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        x[i, : r.shape[0]], y[i, : r.shape[0]], mask[i, : r.shape[0]] = r, lab.to(device), 1
    return x, mask, y


def step_loss(model, scorer: Scorer, items: Sequence[Item], ratio: float, weight: float) -> dict[str, torch.Tensor]:
    """One training step's losses: the frozen LM's next-token loss on the answers with the soft-masked
    image, the BCE of the soft mask against the hard top-k, and their sum ``lm + weight * bce``."""
    x, valid = _padded(items)
    scores = scorer(x, valid)
    k = torch.tensor([train_k(int(v.sum()), ratio) for v in valid], device=x.device)
    soft = soft_top_k(scores, k, valid)
    hard = hard_top_k(scores, k, valid).float()
    embeds, mask, labels = _sequences(model, items, soft)
    lm = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    bce = F.binary_cross_entropy(soft[valid].clamp(1e-6, 1 - 1e-6), hard[valid])
    return {"loss": lm + weight * bce, "lm": lm, "bce": bce}


def train_visionselector(model, processor, config: VisionSelectorConfig, progress: Progress | None = None,
                         items: Sequence[Item] | None = None) -> tuple[Scorer, dict[str, Any]]:
    """Train a :class:`Scorer` through the frozen ``model`` (its tower, projector and LM never change) on
    ``config``'s train-split samples (or ``items``, already prepared). Returns (scorer, metrics: steps,
    seconds, samples seen, the loss curve's ends)."""
    from .families import family_of
    from .train import lr_factor

    t0 = time.perf_counter()
    family_of(model.config).set_interpolation(model, processor, False)  # the packing pruned runs use
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        if items is None:
            items = prepare_items(model, processor, train_split_samples(config), progress)
        data_seconds = time.perf_counter() - t0
        torch.manual_seed(config.seed)
        width = int(items[0].projected.shape[1])
        scorer = Scorer(width, config.hidden or None, config.init_scale).to(items[0].projected.device)
        opt = torch.optim.AdamW(scorer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(config.seed + 1)
        warmup = int(round(config.warmup_ratio * config.steps))
        curve: list[dict[str, float]] = []
        t1 = time.perf_counter()
        scorer.train()
        for step in range(config.steps):
            for g in opt.param_groups:
                g["lr"] = config.lr * lr_factor(step, warmup, config.steps)
            w = reg_weight(step, config.steps, config.reg_start, config.reg_end)
            idx = torch.randint(0, len(items), (config.batch_size,), generator=gen).tolist()
            losses = step_loss(model, scorer, [items[i] for i in idx], config.ratio, w)
            if not torch.isfinite(losses["loss"]):
                raise RuntimeError(f"VisionSelector training diverged at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(scorer.parameters(), config.grad_clip)
            opt.step()
            row = {k: float(v.detach()) for k, v in losses.items()}
            row["reg_weight"] = w
            curve.append(row)
            if progress:
                progress("scorer", step + 1, config.steps, {"lm": row["lm"], "bce": row["bce"]})
        scorer.eval()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    head = curve[: max(1, len(curve) // 10)]
    tail = curve[-max(1, len(curve) // 10):]
    metrics = {
        "steps": config.steps, "batch_size": config.batch_size, "samples": len(items),
        "samples_seen": config.steps * config.batch_size,
        "data_seconds": data_seconds, "train_seconds": time.perf_counter() - t1,
        "seconds": time.perf_counter() - t0,
        "lm_loss_first": sum(r["lm"] for r in head) / len(head), "lm_loss_last": sum(r["lm"] for r in tail) / len(tail),
        "bce_first": sum(r["bce"] for r in head) / len(head), "bce_last": sum(r["bce"] for r in tail) / len(tail),
        "parameters": sum(p.numel() for p in scorer.parameters()),
    }
    return scorer, metrics


# ---------------------------------------------------------------- checkpoints

def _projector_tensors(model) -> dict[str, torch.Tensor]:
    """The projector the scorer was trained behind: stored so a checkpoint recognises the model whose
    projected tokens it is given (:func:`matches`)."""
    from .prune import _inner

    proj = _inner(model).multi_modal_projector
    return {f"projector.{n}": p.detach().float().cpu().contiguous() for n, p in proj.state_dict().items()}


def save_scorer(out_dir: str | Path, scorer: Scorer, model, provenance: dict[str, Any]) -> Path:
    """Write ``visionselector.safetensors`` (the scorer, the projector fingerprint, the matching facts in
    the header) and ``visionselector.json`` (``provenance`` plus those facts) into ``out_dir``."""
    from safetensors.torch import save_file

    from .families import family_of

    cfg = model.config
    family = family_of(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = {"format": FORMAT, "family": family.name, "tokens_per_crop": str(family.tokens_per_crop(cfg)),
             "channels": str(cfg.vision_config.hidden_size), "width": str(scorer.width),
             "hidden": str(scorer.hidden), "projector_act": str(cfg.projector_hidden_act)}
    tensors = {f"scorer.{n}": p.detach().float().cpu().contiguous() for n, p in scorer.state_dict().items()}
    tensors.update(_projector_tensors(model))
    path = out / CHECKPOINT
    save_file(tensors, str(path), metadata=facts)
    (out / PROVENANCE).write_text(json.dumps({**provenance, **facts_of(facts)}, indent=2, sort_keys=True) + "\n")
    return path


__all__ = ["Scorer", "soft_top_k", "hard_top_k", "differentiable_top_k", "reg_weight", "train_k",
           "VisionSelectorConfig", "Item", "train_split_samples", "prepare_items", "step_loss", "train_visionselector", "save_scorer",
           "load_scorer", "Loaded", "mismatch", "resolve", "shipped_checkpoints", "image_scores",
           "CheckpointMismatch", "CHECKPOINT", "PROVENANCE", "SHIPPED_DIR", "FORMAT", "TRAINABLE_MODELS"]
