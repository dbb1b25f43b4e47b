"""The paper's token selector and reconstructor (arXiv 2503.16660, section 4), in plain torch.

Shapes: B crops per batch, L tokens per crop, C feature channels (d = C by default).

    F      (B, L, C)  vision-encoder features of one crop each (projector inputs)
    S(F)   (B, L)     keep-logits: 3 pre-LN Transformer layers + a linear head
    M      (B, L)     hard binary mask, straight-through Gumbel-Softmax sample of S(F)
    F_pr   (B, L, C)  M*F + (1-M)*E_mask, one shared learnable mask embedding
    F_rec  (B, L, C)  R(F_pr): 3 pre-LN Transformer layers, final norm, learned output projection
    loss              mean((F_rec - F)^2) + max(mean(M), p)      (Eq. 7, no weight)

A range selector (``retention_range = (min, max)``, "one selector for every budget") draws p
per batch from [min, max] and samples M from S(F) + offset(p), offset(p) = logit(p) + a tiny MLP of
logit(p): one scalar per batch, the same for every token, so the ranking S(F) does not depend on p.

Features are standardized per channel with training-set statistics (stored as
buffers), and the loss is taken in that standardized space. Both networks add
learnable absolute positional embeddings: without them every masked slot would
reconstruct identically. At inference the ``selector`` strategy
(``pipeline.strategies.basic``) keeps, per crop, the top-k tokens by ``keep_logits``
(k = round(retention * L)).

Dynamic grids (Qwen-VL, ``tokens=None``): L follows each image's size, so there is no
learned table of L positions; each token gets a fixed 2-D sincos position from its
(row, col) in the image's raster grid (any grid size, no parameters), and a batch of
images padded to its longest carries a key-padding mask: padded tokens are attended by
no one and count in no loss term, so each image gets the logits it gets alone. LLaVA's
fixed-L selectors are unchanged (same parameters, same calls: their checkpoints load as
they did). docs/qwen.md says which features a Qwen selector reads and why.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ConfigError, canonical_json, check, content_hash


@dataclasses.dataclass(frozen=True)
class SelectorConfig(Config):
    """Architecture and training choices. The paper fixes the layer counts (three Transformer
    layers each: Sec. 4.1.1, Feature Selector Architecture, and Sec. 4.2, Feature Reconstructor
    Architecture) and the loss with its target ratio p (Sec. 4.3, Loss Function; Eq. 7 in
    Sec. 4.4, Training), and leaves the rest open. The other defaults are atr's own choices
    (d = C, 16 heads, FFN 4d, pre-LN, tau = 1, AdamW 1e-4, cosine with warm-up, per-channel
    standardization)."""

    kind: ClassVar[str] = "selector"

    retention: float = 0.25          # p, the target keep ratio of the loss
    d_model: int | None = None       # None -> C (the encoder width)
    n_heads: int = 16
    ffn_mult: int = 4
    selector_layers: int = 3
    reconstructor_layers: int = 3
    dropout: float = 0.0
    temperature: float = 1.0         # Gumbel-Softmax tau
    standardize: bool = True
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 100
    steps: int = 2000
    batch_size: int = 64
    grad_clip: float = 1.0
    seed: int = 0
    # (min, max): train one selector for every budget, p drawn per batch uniformly from [min, max]
    # (Matryoshka-style); None: one p, ``retention``. Omitted from to_dict() when None.
    retention_range: tuple | None = None

    def validate(self) -> None:
        check(0.0 < self.retention <= 1.0, f"retention must be in (0, 1], got {self.retention!r}")
        if self.retention_range is not None:
            check_retention_range(self.retention_range)
        check(self.d_model is None or self.d_model > 0, f"d_model must be positive, got {self.d_model!r}")
        check(self.n_heads > 0 and self.ffn_mult > 0, "n_heads and ffn_mult must be positive")
        check(self.selector_layers > 0 and self.reconstructor_layers > 0, "layer counts must be positive")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        check(self.temperature > 0, f"temperature must be positive, got {self.temperature!r}")
        check(self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay >= 0")
        check(self.steps > 0 and self.batch_size > 0 and self.warmup_steps >= 0,
              "steps and batch_size must be positive, warmup_steps >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"bad betas {self.betas!r}")

    def to_dict(self) -> dict:
        """As Config.to_dict, without ``retention_range`` when it is None: a single-p selector's dict
        (checkpoint meta, stage keys) stays what it was before the field existed."""
        return omit_unset_range(super().to_dict())

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    def hash(self) -> str:
        return content_hash({"kind": self.kind, "config": self.to_dict()})


def omit_unset_range(d: dict) -> dict:
    """``d`` without a ``retention_range`` key whose value is None."""
    if d.get("retention_range", 0) is None:
        d.pop("retention_range")
    return d


def check_retention_range(value) -> tuple[float, float]:
    """(min, max) of a retention range: two numbers with 0 < min < max <= 1, else one ConfigError line."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    check(ok, f"retention_range must be two numbers (min, max), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    check(0.0 < lo <= 1.0 and 0.0 < hi <= 1.0,
          f"retention_range ({lo:g}, {hi:g}) must lie in (0, 1]: both min and max are keep ratios")
    check(lo < hi, f"retention_range min {lo:g} must be below max {hi:g}")
    return lo, hi


def keep_count(retention: float, tokens: int) -> int:
    """k = round(retention * L), at least 1."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")
    return max(1, min(tokens, int(round(retention * tokens))))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention within one crop. (B, L, d) -> (B, L, d)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, L) bool: the key-padding mask of a padded batch (padded keys get no attention);
        None: every token attends to every token (fixed-grid selectors: the call they always made)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if valid is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x)). (B, L, d) -> (B, L, d)."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), valid)
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    """in-proj + positions + n blocks + final LN. (B, L, C) -> (B, L, d).

    ``tokens`` L: a learned absolute table of L positions (a fixed crop grid, LLaVA). ``tokens`` None: a
    dynamic grid (Qwen-VL: L follows each image's size); the caller passes each token's 2-D sincos position
    (:func:`grid_layout`) and the batch's key-padding mask."""

    def __init__(self, c: int, d: int, tokens: int | None, layers: int, cfg: SelectorConfig):
        super().__init__()
        self.inp = nn.Identity() if c == d else nn.Linear(c, d)
        if tokens is not None:
            self.pos = nn.Parameter(torch.zeros(1, tokens, d))
            nn.init.normal_(self.pos, std=0.02)
        else:
            self.pos = None
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.ffn_mult, cfg.dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inp(x) + (self.pos if self.pos is not None else pos.to(x.dtype))
        for block in self.blocks:
            x = block(x, valid)
        return self.ln(x)


def sincos_1d(index: torch.Tensor, dim: int) -> torch.Tensor:
    """(...,) integer positions -> (..., dim) sin/cos features at geometric frequencies (MAE's 1-D table)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=index.device) / (dim // 2))
    angle = index.to(torch.float64)[..., None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def grid_layout(grid: torch.Tensor, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and key-padding mask of a padded batch of raster-order token grids.

    ``grid`` (B, 2) the (rows, cols) of each item, ``length`` the padded L (>= rows * cols of every item).
    Returns (B, L, dim) 2-D sincos positions (half the channels the row, half the column: any grid size,
    no parameters) and (B, L) bool, True at each item's own rows * cols tokens."""
    grid = torch.as_tensor(grid, dtype=torch.long).reshape(-1, 2)
    index = torch.arange(length, device=grid.device)
    cols = grid[:, 1:2].clamp_min(1)
    rows, columns = index[None] // cols, index[None] % cols            # (B, L)
    valid = index[None] < (grid[:, 0:1] * grid[:, 1:2])
    pos = torch.cat([sincos_1d(rows, dim // 2), sincos_1d(columns, dim // 2)], dim=-1)
    return pos * valid[..., None], valid


class RetentionOffset(nn.Module):
    """offset(p) = logit(p) + a tiny MLP of logit(p): one keep-logit offset, added to every token's logit
    of a batch trained at target ratio p (the logit(p) term starts the keep ratio near p while the head's
    logits are still near 0; the MLP learns the rest). A shift shared by all tokens moves how many the
    Gumbel head keeps but never their order, so the ranking (``keep_logits``) is the same at every p."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, p: float, like: torch.Tensor) -> torch.Tensor:
        """A 0-d tensor on ``like``'s device and dtype."""
        z = torch.full((1, 1), math.log(p / (1.0 - p)) if p < 1.0 else 10.0, device=like.device, dtype=like.dtype)
        return (z + self.net(z)).reshape(())


class TokenSelector(nn.Module):
    """Selector S + reconstructor R + mask embedding, trained end to end as an autoencoder.

    ``tokens`` = L and ``channels`` = C are fixed at construction and checked on
    every call, so a checkpoint is never applied to another encoder's features.

    ``tokens`` None makes a *dynamic-grid* selector (Qwen-VL, whose L follows each image's size): no
    learned position table; every call takes ``grid`` (B, 2), each item's (rows, cols) of raster-order
    tokens, which gives the 2-D sincos positions and, for a batch padded to its longest item, the
    key-padding mask (:func:`grid_layout`). A padded token is attended by no one, counts in no loss term,
    and gets keep-logit -inf; an item's logits are those it gets alone.
    """

    def __init__(self, cfg: SelectorConfig, tokens: int | None, channels: int):
        super().__init__()
        d = cfg.d_model or channels
        check(d % cfg.n_heads == 0, f"d_model {d} is not divisible by n_heads {cfg.n_heads}")
        check(tokens is not None or d % 4 == 0,
              f"a dynamic-grid selector needs d_model divisible by 4 (2-D sincos positions), got {d}")
        self.cfg, self.tokens, self.channels, self.d = cfg, tokens, channels, d
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.selector = Encoder(channels, d, tokens, cfg.selector_layers, cfg)
        self.head = nn.Linear(d, 1)
        # range selectors only (single-p checkpoints have no such weights): the keep-logit offset of p
        self.offset = RetentionOffset() if cfg.retention_range is not None else None
        self.mask_embedding = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.reconstructor = Encoder(channels, d, tokens, cfg.reconstructor_layers, cfg)
        # A learned projection after the reconstructor's final norm (as nanoGPT ends in ln_f, then lm_head):
        # a norm alone gives every token the same scale, so even keeping every token could not reconstruct.
        self.out = nn.Linear(d, channels)
        self.apply(self._init)

    @property
    def dynamic(self) -> bool:
        """Does it take any (rows, cols) grid (``tokens`` None), rather than a fixed L?"""
        return self.tokens is None

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel training-set mean and std (C,), used to standardize every input."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def _check(self, features: torch.Tensor, grid: torch.Tensor | None = None) -> None:
        if self.dynamic:
            if features.ndim != 3 or features.shape[-1] != self.channels:
                raise ValueError(f"features of shape {tuple(features.shape)} do not match this selector, which was "
                                 f"trained on (images, L, C={self.channels}) token grids")
            if grid is None:
                raise ValueError("this selector reads dynamic token grids: pass grid, each image's (rows, cols)")
            g = torch.as_tensor(grid).reshape(-1, 2)
            if g.shape[0] != features.shape[0] or bool((g.prod(-1) > features.shape[1]).any()) \
                    or bool((g < 1).any()):
                raise ValueError(f"grid {g.tolist()} does not fit features of shape {tuple(features.shape)}")
            return
        if features.ndim != 3 or features.shape[1:] != (self.tokens, self.channels):
            raise ValueError(f"features of shape {tuple(features.shape)} do not match this selector, which was "
                             f"trained on (crops, L={self.tokens}, C={self.channels})")

    def layout(self, features: torch.Tensor, grid: torch.Tensor | None) -> tuple[torch.Tensor | None,
                                                                               torch.Tensor | None]:
        """(positions (B, L, d), valid (B, L)) of a dynamic-grid batch; (None, None) for a fixed grid."""
        if not self.dynamic:
            return None, None
        pos, valid = grid_layout(torch.as_tensor(grid, device=features.device), features.shape[1], self.d)
        return pos, valid

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """(B, L, C) raw -> (B, L, C) standardized (identity when cfg.standardize is off)."""
        x = features.to(self.feature_mean.dtype)
        return (x - self.feature_mean) / self.feature_std if self.cfg.standardize else x

    def _logits(self, x: torch.Tensor, pos, valid) -> torch.Tensor:
        logits = self.head(self.selector(x, pos, valid)).squeeze(-1)
        return logits if valid is None else logits.masked_fill(~valid, float("-inf"))

    def keep_logits(self, features: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) raw features -> (B, L) keep-logits: the ranking (the head alone, no offset).
        Dynamic-grid selectors take ``grid`` (B, 2); padded tokens get -inf."""
        self._check(features, grid)
        pos, valid = self.layout(features, grid)
        return self._logits(self.standardize(features), pos, valid)

    @property
    def is_range(self) -> bool:
        return self.offset is not None

    def _offset(self, p: float | None, like: torch.Tensor) -> torch.Tensor | float:
        """The keep-logit offset at target ratio ``p`` (0 for a single-p selector)."""
        if self.offset is None:
            return 0.0
        if p is None:
            lo, hi = self.cfg.retention_range
            raise ConfigError(f"this selector was trained on the retention range [{lo:g}, {hi:g}]: "
                              f"give the target keep ratio p")
        check(0.0 < float(p) <= 1.0, f"retention must be in (0, 1], got {p!r}")
        return self.offset(float(p), like)

    def keep_probability(self, features: torch.Tensor, p: float | None = None,
                         grid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) raw features -> (B, L) the keep probability the Gumbel head samples from:
        sigmoid(keep_logits) for a single-p selector (``p`` is not used), sigmoid(keep_logits + offset(p))
        for a range selector (``p`` required)."""
        logits = self.keep_logits(features, grid).float()
        return torch.sigmoid(logits + self._offset(p, logits))

    def sample_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, L) logits -> (B, L) hard {0,1} mask with straight-through Gumbel-Softmax gradients."""
        two_class = torch.stack([logits, torch.zeros_like(logits)], dim=-1)  # [keep, drop]
        return F.gumbel_softmax(two_class, tau=self.cfg.temperature, hard=True)[..., 0]

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) standardized features, (B, L) mask -> (B, L, C) reconstruction."""
        m = mask.unsqueeze(-1).to(x.dtype)
        f_pr = m * x + (1 - m) * self.mask_embedding
        return self.out(self.reconstructor(f_pr, pos, valid))

    def forward(self, features: torch.Tensor, p: float | None = None,
                grid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training step on (B, L, C) raw features: loss = MSE + max(mean(M), p). ``p`` is the batch's
        target ratio for a range selector (required there); a single-p selector uses ``cfg.retention``.
        A dynamic-grid selector takes ``grid`` (B, 2); MSE and mean(M) are then over real tokens only."""
        self._check(features, grid)
        target = self.cfg.retention if self.offset is None else float(p) if p is not None else None
        if self.dynamic:
            return self._forward_grid(features, target, grid)
        x = self.standardize(features)
        # float32 logits: under bf16 autocast the Gumbel noise, the hard mask and its keep ratio stay exact
        logits = self.head(self.selector(x)).squeeze(-1).float()
        logits = logits + self._offset(target, logits)
        mask = self.sample_mask(logits)
        recon = self.reconstruct(x, mask)
        mse = F.mse_loss(recon, x)
        keep_ratio = mask.mean()
        rate = torch.clamp(keep_ratio, min=target)
        # "keep" (the kept fraction) is the name this figure has in curves and MLflow.
        return {"loss": mse + rate, "mse": mse.detach(), "keep": keep_ratio.detach(), "logits": logits}

    def _forward_grid(self, features: torch.Tensor, target, grid) -> dict[str, torch.Tensor]:
        pos, valid = self.layout(features, grid)
        v = valid.unsqueeze(-1).to(self.feature_mean.dtype)
        x = self.standardize(features) * v  # padded slots: 0, never NaN, whatever the padding held
        logits = self.head(self.selector(x, pos, valid)).squeeze(-1).float()
        logits = logits + self._offset(target, logits)
        mask = self.sample_mask(logits) * valid
        recon = self.reconstruct(x, mask, pos, valid)
        real = valid.sum()
        mse = ((recon - x).pow(2) * v).sum() / (real * x.shape[-1])
        keep_ratio = mask.sum() / real
        rate = torch.clamp(keep_ratio, min=target)
        return {"loss": mse + rate, "mse": mse.detach(), "keep": keep_ratio.detach(),
                "logits": logits.masked_fill(~valid, float("-inf"))}

    @torch.no_grad()
    def reconstruction_error(self, features: torch.Tensor, kept_indices: torch.Tensor | None = None,
                             grid: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, C) raw features, (B, k) kept indices (or ``kept`` a (B, L) bool mask) -> (B,) MSE of
        rebuilding all L tokens from the kept ones (standardized space, mean over tokens and channels;
        a dynamic-grid selector takes ``grid`` and averages over each item's own tokens)."""
        x = self.standardize(features)
        if kept is not None:
            mask = kept.to(x.dtype)
        else:
            mask = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device).scatter_(1, kept_indices, 1.0)
        if not self.dynamic:
            return (self.reconstruct(x, mask) - x).pow(2).mean(dim=(1, 2))
        self._check(features, grid)
        pos, valid = self.layout(features, grid)
        v = valid.unsqueeze(-1).to(x.dtype)
        x = x * v
        err = (self.reconstruct(x, mask * valid, pos, valid) - x).pow(2) * v
        return err.sum(dim=(1, 2)) / (valid.sum(-1) * x.shape[-1])


def pad_grids(items, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of (L_i, C) feature tensors -> ((B, max L, C) zero-padded, (B,) lengths)."""
    items = [torch.as_tensor(f) for f in items]
    length = max(f.shape[0] for f in items)
    out = items[0].new_zeros((len(items), length, items[0].shape[-1]), dtype=dtype)
    for i, f in enumerate(items):
        out[i, :f.shape[0]] = f.to(dtype)
    return out, torch.tensor([f.shape[0] for f in items])


def grid_indices_rect(rows: int, cols: int, retention: float) -> torch.Tensor:
    """(k,) a uniform-grid subsample of a rows x cols raster grid (ordered dither), sorted."""
    k = keep_count(retention, rows * cols)
    order = grid_order(max(rows, cols)).view(max(rows, cols), max(rows, cols))[:rows, :cols].reshape(-1)
    return order.argsort()[:k].sort().values


def grid_order(side: int) -> torch.Tensor:
    """(side*side,) token ranks of an ordered-dither (Bayer) matrix: the first k ranks
    are spread evenly over the 2-D grid for every k."""
    n = 1 << max(0, math.ceil(math.log2(max(side, 1))))
    bayer = torch.zeros(1, 1, dtype=torch.long)
    while bayer.shape[0] < n:
        b = bayer * 4
        bayer = torch.cat([torch.cat([b, b + 2], 1), torch.cat([b + 3, b + 1], 1)], 0)
    return bayer[:side, :side].reshape(-1).argsort().argsort()


def grid_indices(batch: int, tokens: int, retention: float) -> torch.Tensor:
    """(B, k) a uniform-grid subsample (the same for every crop), raster order."""
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise ValueError(f"uniform-grid subsampling needs a square token grid, got L={tokens}")
    k = keep_count(retention, tokens)
    chosen = grid_order(side).argsort()[:k].sort().values
    return chosen.unsqueeze(0).expand(batch, k)
