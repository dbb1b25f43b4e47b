"""VisionSelector (Zhu et al., arXiv 2510.16598): a learned scorer, trained end to end through the frozen MLLM.

This module is the inference side: the scorer (:class:`Scorer`), its checkpoints (load, match to the
model, the shipped ones) and the strategy. Training (the differentiable top-k, curriculum annealing, the
loop through the frozen model, saving) is :mod:`pipeline.visionselector`, which imports from here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .core import Request, strategy, top_k

FORMAT = "atr-visionselector/1"  # the safetensors header's "format": what load_scorer accepts
CHECKPOINT = "visionselector.safetensors"
# The stored projector must reproduce the image's projected tokens to this relative error (a bf16 model's
# own rounding stays far below it; another model's projector is off by about 1).
MATCH_TOLERANCE = 0.1
# Shipped checkpoints: pipeline/assets/visionselector/<model>.safetensors (+ <model>.json provenance).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "visionselector"


class CheckpointMismatch(ConfigError):
    """A VisionSelector checkpoint that does not fit the features it is asked to score (one line)."""


# ---------------------------------------------------------------- the scorer

class Scorer(nn.Module):
    """The learnable importance scorer (the reference's ``TransformerScorer``): ``(B, N, D)`` LLM-space
    tokens -> ``(B, N)`` scores, score_i = mean over the image's tokens j of q_i . k_j / sqrt(hidden).

    ``valid`` ``(B, N)`` marks the tokens of each row (padding rows of a batch, or tokens the LLM never
    sees, take no part in the mean)."""

    def __init__(self, width: int, hidden: int | None = None, init_scale: float = 1e-4):
        super().__init__()
        self.width = int(width)
        self.hidden = int(hidden or max(1, width // 2))
        self.k_proj = nn.Linear(self.width, self.hidden)
        self.q_proj = nn.Linear(self.width, self.hidden)
        for lin in (self.k_proj, self.q_proj):  # near-zero output at the start (the reference's init)
            nn.init.normal_(lin.weight, std=init_scale)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2:
            return self.forward(x[None], None if valid is None else valid[None])[0]
        x = x.to(self.k_proj.weight.dtype)
        k = self.k_proj(x)
        q = self.q_proj(x)
        if valid is None:
            k_mean = k.mean(dim=1, keepdim=True)
        else:
            w = valid.to(k.dtype)[..., None]
            k_mean = (k * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1.0)
        return (q * k_mean).sum(dim=-1) / math.sqrt(self.hidden)


def facts_of(facts: dict[str, str]) -> dict[str, Any]:
    return {k: int(v) if v.isdigit() else v for k, v in facts.items()}


@dataclasses.dataclass
class Loaded:
    """A loaded checkpoint: the scorer, its facts and the projector it was trained behind."""

    path: Path
    scorer: Scorer
    facts: dict[str, Any]
    projector: dict[str, torch.Tensor]

    def on(self, device) -> Scorer:
        """The scorer on ``device`` (copied there once)."""
        key = str(device)
        cache = self.__dict__.setdefault("_devices", {"cpu": self.scorer})
        if key not in cache:
            cache[key] = Scorer(self.scorer.width, self.scorer.hidden).to(device).eval()
            cache[key].load_state_dict(self.scorer.state_dict())
        return cache[key]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The stored projector on tower features (LLaVA's two-layer MLP)."""
        from transformers.activations import ACT2FN

        p = self.projector
        h = F.linear(features.float(), p["linear_1.weight"], p.get("linear_1.bias"))
        h = ACT2FN[self.facts["projector_act"]](h)
        return F.linear(h, p["linear_2.weight"], p.get("linear_2.bias"))


_CACHE: dict[tuple[str, int], Loaded] = {}


def load_scorer(path: str | Path) -> Loaded:
    """Load a checkpoint once per process (cached by path and mtime), through safetensors (never pickle).
    A file that is not a VisionSelector checkpoint is refused in one line."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"VisionSelector checkpoint {p} does not exist (train one: atr train-visionselector "
                          f"--model MODEL --out DIR)")
    key = (str(p.resolve()), p.stat().st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{p} is not a safetensors file: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p} is not a VisionSelector checkpoint (format {meta.get('format')!r}, "
                          f"expected {FORMAT!r})")
    facts = facts_of(meta)
    scorer = Scorer(int(facts["width"]), int(facts["hidden"]))
    scorer.load_state_dict({k.removeprefix("scorer."): v for k, v in tensors.items() if k.startswith("scorer.")})
    scorer.eval()
    loaded = Loaded(p, scorer, facts,
                    {k.removeprefix("projector."): v for k, v in tensors.items() if k.startswith("projector.")})
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[key] = loaded
    return loaded


@torch.no_grad()
def mismatch(loaded: Loaded, features: torch.Tensor, projected: torch.Tensor,
             valid: torch.Tensor | None = None) -> str | None:
    """Why ``loaded`` does not fit these features (None: it fits): the tokens per crop L, the tower
    channels C, the LLM width D, and the model -- its stored projector must give these projected tokens
    from these features (which tells LLaVA-NeXT's tiny-trained from OneVision's tiny-ov-trained, whose
    shapes are the same)."""
    f = loaded.facts
    crops, tokens, channels = features.shape
    width = projected.shape[-1]
    if (f["tokens_per_crop"], f["channels"], f["width"]) != (tokens, channels, width):
        return (f"it was trained on L={f['tokens_per_crop']} tokens per crop, C={f['channels']} channels, "
                f"D={f['width']} LLM width, these features have L={tokens}, C={channels}, D={width}")
    flat_f, flat_p = features.reshape(-1, channels), projected.reshape(-1, width)
    idx = (valid.reshape(-1).nonzero()[:, 0] if valid is not None else torch.arange(flat_f.shape[0]))[:4]
    want = flat_p[idx].float().cpu()
    got = loaded.project(flat_f[idx].cpu())
    err = float((got - want).norm() / want.norm().clamp(min=1e-12))
    if err > MATCH_TOLERANCE:
        return (f"it was trained through a {f['family']} model whose projector does not give these projected "
                f"tokens (relative error {err:.2g}): another model or family")
    return None


def shipped_checkpoints() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.safetensors")) if SHIPPED_DIR.is_dir() else []


def resolve(checkpoint: str, features: torch.Tensor, projected: torch.Tensor,
            valid: torch.Tensor | None = None) -> Loaded:
    """The checkpoint to score these features with: ``checkpoint`` (a path), refused in one line when it
    does not fit them; "" the shipped checkpoint that fits them, or one line saying how to train one."""
    if checkpoint:
        loaded = load_scorer(checkpoint)
        why = mismatch(loaded, features, projected, valid)
        if why:
            raise CheckpointMismatch(f"VisionSelector checkpoint {loaded.path} does not fit these features: {why}")
        return loaded
    for path in shipped_checkpoints():
        loaded = load_scorer(path)
        if mismatch(loaded, features, projected, valid) is None:
            return loaded
    crops, tokens, channels = features.shape
    raise CheckpointMismatch(
        f"no shipped VisionSelector checkpoint fits these features (L={tokens}, C={channels}, "
        f"D={projected.shape[-1]}; shipped: {', '.join(p.stem for p in shipped_checkpoints()) or 'none'}); "
        f"train one with `atr train-visionselector --model MODEL --out DIR` and pass "
        f"--option visionselector.checkpoint=DIR/{CHECKPOINT}")


@torch.no_grad()
def image_scores(loaded: Loaded, projected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(crops, L) scores of one image's projected tokens: all its valid tokens scored as one sequence."""
    crops, tokens = projected.shape[:2]
    flat = projected.reshape(1, crops * tokens, -1).float()
    scores = loaded.on(projected.device)(flat, valid.reshape(1, -1).to(projected.device))
    return scores.reshape(crops, tokens)


# ---------------------------------------------------------------- the strategy

def _available(model: str, options) -> str | None:
    """atr run's check: a model runs VisionSelector with a given checkpoint, or with a shipped one named after
    it; otherwise one line on how to train one."""
    given = any(o.get("checkpoint") for o in (options if isinstance(options, (list, tuple)) else [options or {}]))
    if given or model in {p.stem for p in shipped_checkpoints()}:
        return None
    return (f"no shipped checkpoint for it (train one with `atr train-visionselector --model {model} --out DIR`, "
            f"then --option visionselector.checkpoint=...)")


# version: bump it when the shipped checkpoints (pipeline/assets/visionselector/) are retrained -- a checkpoint
# given with the option enters the cache keys by its content hash (files), the shipped default does not.
@strategy("visionselector", peer="Zhu et al., arXiv 2510.16598", version="1", params={"checkpoint": ""},
          files=("checkpoint",), available=_available, needs=("projected",), style=("darkcyan", "H"), rank=10, label="VisionSelector",
          help="VisionSelector: top-K of the image by a light scorer trained through the frozen LLM's loss "
               "(option checkpoint: a file from atr train-visionselector; default: the shipped one that fits "
               "the model)")
def visionselector(req: Request) -> torch.Tensor:
    """``visionselector``: VisionSelector as its paper and reference code run it (JulietChoo/VisionSelector:
    ``selector_scorer.py``, ``selector_model.py``/``modeling_selector.py``, ``train_sft_visionselector.py``);
    the scorer, its training and what differs are in :mod:`pipeline.visionselector` (training) and
    this module (the scorer and its checkpoints).

    Faithful: the scorer (their ``TransformerScorer``: query/key projections of half the LLM width, score_i
    = mean_j q_i . k_j / sqrt(hidden)) reads the *projected* (LLM-space) tokens of the whole image as one
    sequence, as theirs reads the merger's output; the image's K tokens with the highest scores are kept
    (their inference: ``topk`` over all of the image's tokens). It was trained at one ratio (0.2, theirs)
    through the frozen model's next-token loss, with their differentiable top-k and curriculum annealing,
    and is used unchanged at every budget.

    What differs: K is atr's equal budget for the image (:meth:`Request.image_budget`; a ``per-crop``
    budget's K is the sum of its crops' k, spread by score over the image, as DivPrune spreads it), not
    their max(1, int(r * N)); candidates and the scorer's mean are the valid tokens only (LLaVA-NeXT's
    unpadding drops the rest before the LLM; their models have no padding); row newlines follow the kept
    rows. In training, every row newline stays unscaled (their models have none). The scorer is trained
    here, in minutes (16.5k parameters, 600 steps of 16), on the tiny world's train splits (both synthetic
    benchmarks), not on their OCR-VQA/ChartQA/TextVQA/COCO mix; see docs/peers.md.

    Option ``checkpoint``: a ``visionselector.safetensors`` from ``atr train-visionselector``; "" picks
    the shipped checkpoint (``pipeline/assets/visionselector/``) whose model gives these projected tokens
    (its family, L, C and projector); a checkpoint that does not fit is refused in one line."""
    projected = req.need("projected")
    loaded = resolve(req.options["checkpoint"], req.features, projected, req.valid)
    scores = image_scores(loaded, projected, req.valid)
    k = torch.tensor([req.image_budget()], device=scores.device)
    return top_k(scores, k, req.valid, per_crop=False)


__all__ = ["Scorer", "Loaded", "CheckpointMismatch", "load_scorer", "mismatch", "resolve", "shipped_checkpoints",
           "image_scores", "facts_of", "FORMAT", "CHECKPOINT", "SHIPPED_DIR", "visionselector"]
