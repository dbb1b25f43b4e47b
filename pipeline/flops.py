"""FLOPs and KV-cache model of LLaVA-NeXT and Qwen-VL prefill, vision tower and token selector.

Pure python (no torch): dimensions come from a transformers ``LlavaNextConfig``
(:meth:`LlavaNextDims.from_config`) or are written out (:data:`VICUNA_7B`).
Counts are matmul FLOPs, 2 per multiply-add; biases, norms, rotary embeddings,
softmax, activations and residual adds are O(n*d) (softmax O(n^2*heads)) and are
not counted. Prefill is one forward over ``n = text + visual`` positions, where
``visual`` is what the LLM really sees (kept tokens plus kept row-newlines).

Conventions for the LLM prefill, side by side (T layers, n tokens, d hidden,
m FFN intermediate, h query heads, g key/value heads, e head dim, V vocab):

``causal`` -- true FLOPs as executed; the convention of every "ideal" speed-up here::

    T * [ 2n*d*(2*h*e)           q and o projections
        + 2n*d*(2*g*e)           k and v projections (GQA-aware)
        + 4*h*e * n(n+1)/2       QK^T and AV over the causal half a causal SDPA kernel computes
        + 2n*d*m * 3 ]           SwiGLU: gate, up and down matrices
    + 2*d*V                      logits for the last position only

``square`` -- the same with the full n^2 attention square (``4*h*e*n^2`` per layer).

``fastv`` -- FastV's T*(4nd^2 + 2n^2d + 2ndm): multiply-adds rather than FLOPs, square
attention, two FFN matrices, no GQA, no logits. Peers quote it. For llava-v1.6-vicuna-7b's
full prompt it is 2.5x smaller than ``square``, and its *ratios* weight attention (the
n^2 term) more than ``causal`` does, so it promises larger speed-ups from pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

CONVENTIONS = ("causal", "square", "fastv")


@dataclass(frozen=True)
class LMDims:
    """Decoder-only LM (Llama/Mistral-style, SwiGLU) dimensions."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # None -> hidden // heads

    @property
    def e(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True)
class ViTDims:
    """ViT tower: one crop is ``image_size``^2 pixels of ``patch_size`` patches, plus CLS for CLIP
    (``cls=0`` for SigLIP, which has none)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3
    cls: int = 1

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Tokens the tower runs on per crop (patches + CLS), e.g. 577 for CLIP ViT-L/14-336, 729 for SigLIP-384/14."""
        return self.patches + self.cls


@dataclass(frozen=True)
class SelectorDims:
    """The paper's selector: ``layers`` pre-LN blocks of width ``d`` (FFN ``ffn_mult*d``) on one crop of
    L tokens with C channels, then a linear head. The reconstructor is not run at inference."""

    tokens: int
    channels: int
    d_model: int | None = None  # None -> channels
    layers: int = 3
    ffn_mult: int = 4
    reconstructor_layers: int = 3  # training only: the reconstructor runs beside the selector

    @property
    def d(self) -> int:
        return self.d_model or self.channels


@dataclass(frozen=True)
class LlavaNextDims:
    lm: LMDims
    vision: ViTDims
    projector_in: int  # feature width entering the projector (C, or C * layers when several are concatenated)

    @classmethod
    def from_config(cls, config, cls_token: bool = True) -> "LlavaNextDims":
        """From a transformers ``LlavaNextConfig`` / ``LlavaOnevisionConfig`` (or anything with the same
        attributes); ``cls_token=False`` for a tower without CLS (SigLIP; ``Family.flops_dims`` decides)."""
        t, v = config.text_config, config.vision_config
        layer = getattr(config, "vision_feature_layer", -2)
        n_layers = len(layer) if isinstance(layer, (list, tuple)) else 1
        lm = LMDims(layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
                    heads=t.num_attention_heads,
                    kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                    vocab=t.vocab_size, head_dim=getattr(t, "head_dim", None))
        vit = ViTDims(layers=v.num_hidden_layers, hidden=v.hidden_size, intermediate=v.intermediate_size,
                      heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
                      channels=getattr(v, "num_channels", 3), cls=int(cls_token))
        return cls(lm=lm, vision=vit, projector_in=v.hidden_size * n_layers)


@dataclass(frozen=True)
class QwenViTDims:
    """A Qwen-VL tower: ``patch_size`` patches (``temporal_patch`` frames deep: an image is repeated over them),
    ``layers`` blocks of width ``hidden`` whose MLP has ``mlp_matrices`` matrices (Qwen2.5-VL's gated SiLU: 3;
    Qwen3-VL's GELU MLP: 2), then ``mergers`` patch mergers (each: norm, ``4C -> 4C -> out_hidden`` on every 2 x 2
    group; Qwen3-VL has one per DeepStack layer besides the main one).

    Attention: every block full over the image's patches when ``window`` is 0 (Qwen3-VL); otherwise only the
    ``full_blocks`` are, and the others attend within windows of ``window`` x ``window`` patches (Qwen2.5-VL-7B:
    112-px windows of 14-px patches, 8 x 8), cut from the top left as ``get_window_index`` cuts them (edge windows
    are smaller). There is no fixed crop: the cost follows each image's patch grid (:func:`qwen_tower_flops`)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    patch_size: int
    merge: int = 2
    temporal_patch: int = 2
    channels: int = 3
    mlp_matrices: int = 3
    window: int = 0
    full_blocks: tuple = ()
    mergers: int = 1
    out_hidden: int = 0
    cls: int = 0

    def windowed_blocks(self) -> int:
        return 0 if not self.window else self.layers - len(self.full_blocks)


@dataclass(frozen=True)
class QwenDims:
    """A Qwen-VL model's cost model, with :class:`LlavaNextDims`' interface (``lm``, ``vision``, ``projector_in``):
    ``lm`` is the LLM (its prefill FLOPs per visual token as for LLaVA: every merged token is one position),
    ``vision`` the tower (:class:`QwenViTDims`), ``projector_in`` the merger's input width (4C)."""

    lm: LMDims
    vision: QwenViTDims
    projector_in: int


def qwen_dims(cfg) -> QwenDims:
    """The cost model of a Qwen2.5-VL / Qwen3-VL config (``Family.flops_dims`` of the Qwen families): the LM from
    ``text_config`` (GQA, ``head_dim``), the tower from ``vision_config`` (windowed blocks where it names
    ``fullatt_block_indexes``; DeepStack mergers where it names ``deepstack_visual_indexes``; a gated MLP where
    its activation is SiLU)."""
    t, v = cfg.text_config, cfg.vision_config
    lm = LMDims(layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
                heads=t.num_attention_heads, kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
                vocab=t.vocab_size, head_dim=getattr(t, "head_dim", None))
    full = tuple(getattr(v, "fullatt_block_indexes", None) or ())
    window = (getattr(v, "window_size", 0) or 0) // v.patch_size if full else 0
    deepstack = len(getattr(v, "deepstack_visual_indexes", None) or ())
    vit = QwenViTDims(layers=v.depth, hidden=v.hidden_size, intermediate=v.intermediate_size, heads=v.num_heads,
                      patch_size=v.patch_size, merge=v.spatial_merge_size, temporal_patch=v.temporal_patch_size,
                      channels=getattr(v, "in_channels", 3), mlp_matrices=3 if v.hidden_act == "silu" else 2,
                      window=window, full_blocks=full, mergers=1 + deepstack, out_hidden=v.out_hidden_size)
    return QwenDims(lm=lm, vision=vit, projector_in=v.hidden_size * v.spatial_merge_size ** 2)


def _window_spans(n: int, size: int) -> list[int]:
    """Sizes of consecutive windows of ``size`` over ``n`` (the last one the remainder)."""
    return [min(size, n - i) for i in range(0, n, size)]


def qwen_tower_flops(vit: QwenViTDims, rows: int, cols: int, frames: int = 1) -> dict:
    """FLOPs of a Qwen-VL tower on one image of ``rows`` x ``cols`` patches (its ``image_grid_thw`` (t, h, w) is
    (frames, rows, cols)), by part: ``patch`` embedding (a Conv3d over ``temporal_patch`` frames), ``linear``
    (q, k, v, o and the MLP in every block), ``attention`` (QK^T and AV: the full P x P square in a full block,
    the sum of each window's square in a windowed one), ``merger`` (every merger on every merged token), total."""
    c, f, p = vit.hidden, vit.intermediate, frames * rows * cols
    patch = 2 * p * (vit.channels * vit.temporal_patch * vit.patch_size ** 2) * c
    linear = vit.layers * (2 * p * 4 * c * c + 2 * p * vit.mlp_matrices * c * f)
    full = frames * (rows * cols) ** 2
    if vit.window:
        # get_window_index cuts merged-token windows of window / merge tokens; in patches: window x window
        per = vit.window
        windowed = frames * sum(a * a for a in _window_spans(rows, per)) * sum(b * b for b in _window_spans(cols, per))
        pairs = len(vit.full_blocks) * full + vit.windowed_blocks() * windowed
    else:
        pairs = vit.layers * full
    attention = 4 * c * pairs
    tokens = p // vit.merge ** 2
    unit = c * vit.merge ** 2
    merger = vit.mergers * 2 * tokens * (unit * unit + unit * vit.out_hidden)
    parts = {"patch": patch, "linear": linear, "attention": attention, "merger": merger}
    parts["total"] = sum(parts.values())
    return parts


# llava-hf/llava-v1.6-vicuna-7b-hf: Llama-2-7B (vocab 32064 with the image/pad tokens) + CLIP ViT-L/14-336.
VICUNA_7B = LlavaNextDims(
    lm=LMDims(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32064),
    vision=ViTDims(layers=24, hidden=1024, intermediate=4096, heads=16, image_size=336, patch_size=14),
    projector_in=1024,
)
# The paper's selector on CLIP ViT-L/14-336 features: L = 576 tokens per crop, C = d = 1024.
CLIP_L_SELECTOR = SelectorDims(tokens=576, channels=1024)
# The same on SigLIP-so400m/14-384 features (LLaVA-OneVision): L = 729 tokens per crop (no CLS), C = d = 1152.
SIGLIP_SO400M_SELECTOR = SelectorDims(tokens=729, channels=1152)
# Real-shape selector dims by the name ``atr speed --selector-training`` takes.
SELECTOR_SHAPES = {"next": CLIP_L_SELECTOR, "ov": SIGLIP_SO400M_SELECTOR}
# What selector-training projections assume for a GPU: an H100 SXM's dense bf16 peak, at 40 % of it
# (model FLOPs utilization; large dense transformer training reaches 35-50 %).
H100_BF16_PEAK_FLOPS = 989e12
ASSUMED_UTILIZATION = 0.40
# The data of the paper's training (DESIGN.md): features of 100K COCO images at base resolution, one crop each.
PAPER_TRAINING_CROPS = 100_000


def lm_prefill_flops(lm: LMDims, tokens: int, convention: str = "causal", logits_positions: int = 1) -> dict:
    """FLOPs of one prefill over ``tokens`` positions, by part: projections, attention, mlp, logits, total."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    n, d, m, T = tokens, lm.hidden, lm.intermediate, lm.layers
    if convention == "fastv":
        parts = {"projections": T * 4 * n * d * d, "attention": T * 2 * n * n * d, "mlp": T * 2 * n * d * m,
                 "logits": 0}
    else:
        qo = 2 * n * d * (2 * lm.heads * lm.e)
        kv = 2 * n * d * (2 * lm.kv_heads * lm.e)
        pairs = n * (n + 1) // 2 if convention == "causal" else n * n
        parts = {"projections": T * (qo + kv), "attention": T * 4 * lm.heads * lm.e * pairs,
                 "mlp": T * 3 * 2 * n * d * m, "logits": 2 * d * lm.vocab * min(logits_positions, n)}
    parts["total"] = sum(parts.values())
    return parts


def prefill_flops(lm: LMDims, text_tokens: int, visual_tokens: int, convention: str = "causal") -> int:
    """Total prefill FLOPs of a prompt with ``text_tokens`` + ``visual_tokens`` positions."""
    return lm_prefill_flops(lm, text_tokens + visual_tokens, convention)["total"]


def ideal_speedup(lm: LMDims, text_tokens: int, full_visual: int, pruned_visual: int,
                  convention: str = "causal") -> float:
    """Prefill FLOPs of the full prompt / FLOPs of the pruned one (same text)."""
    return prefill_flops(lm, text_tokens, full_visual, convention) / prefill_flops(lm, text_tokens, pruned_visual,
                                                                                 convention)


def vision_tower_flops(vit: ViTDims, crops: int, layers_run: int | None = None) -> int:
    """FLOPs of the tower over ``crops`` crops: patch embedding plus ``layers_run`` (default: all) layers of
    bidirectional attention over ``vit.tokens`` positions (HF runs every layer, even above the feature layer)."""
    t, c, f = vit.tokens, vit.hidden, vit.intermediate
    layers = vit.layers if layers_run is None else layers_run
    patch = 2 * vit.patches * (vit.channels * vit.patch_size ** 2) * c
    layer = 2 * t * 4 * c * c + 4 * t * t * c + 2 * 2 * t * c * f
    return crops * (patch + layers * layer)


def selector_flops(sel: SelectorDims, crops: int) -> int:
    """FLOPs of the selector on ``crops`` crops (attention within each crop of L tokens, not across crops):
    optional input projection, ``layers`` blocks (q,k,v,o; full L^2 attention; FFN), linear keep-logit head."""
    L, c, d = sel.tokens, sel.channels, sel.d
    inp = 0 if c == d else 2 * L * c * d
    layer = 2 * L * 4 * d * d + 4 * L * L * d + 2 * 2 * L * d * (sel.ffn_mult * d)
    return crops * (inp + sel.layers * layer + 2 * L * d)


def _selector_layer_flops(sel: SelectorDims) -> int:
    """One pre-LN block on one crop: q,k,v,o projections, the full L^2 attention (QK^T and AV), the FFN."""
    L, d = sel.tokens, sel.d
    return 2 * L * 4 * d * d + 4 * L * L * d + 2 * 2 * L * d * (sel.ffn_mult * d)


def selector_training_flops(sel: SelectorDims, crops: int) -> int:
    """FLOPs of one training step on ``crops`` crops: the forward of the selector (``layers`` blocks and
    the keep-logit head) and of the reconstructor (``reconstructor_layers`` blocks and the output
    projection back to C), attention included, times 3 for forward + backward (the backward pass
    computes two matmuls per forward one: the gradients of the input and of the weight). The optimizer
    step, norms, Gumbel sampling and the loss are O(params) or O(L*C) and not counted."""
    L, c, d = sel.tokens, sel.channels, sel.d
    inp = 0 if c == d else 2 * L * c * d
    forward = (2 * inp + (sel.layers + sel.reconstructor_layers) * _selector_layer_flops(sel)
               + 2 * L * d + 2 * L * d * c)
    return 3 * crops * forward


def selector_parameters(sel: SelectorDims) -> int:
    """Trainable parameters of the selector + reconstructor (``pipeline.selector.TokenSelector``):
    per encoder an input projection (when C != d), L x d positions, the blocks (LN, qkv, o, LN,
    FFN; with biases) and a final LN; the keep-logit head, the mask embedding, the output projection."""
    L, c, d, m = sel.tokens, sel.channels, sel.d, sel.ffn_mult * sel.d
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    def encoder(layers: int) -> int:
        return (0 if c == d else c * d + d) + L * d + layers * block + 2 * d
    return encoder(sel.layers) + (d + 1) + c + encoder(sel.reconstructor_layers) + (d * c + c)


def training_seconds(sel: SelectorDims, crops: int, flops_per_second: float) -> float:
    """Seconds to train on ``crops`` crops at a sustained ``flops_per_second``."""
    if not flops_per_second > 0:
        raise ValueError(f"flops_per_second must be positive, got {flops_per_second!r}")
    return selector_training_flops(sel, crops) / flops_per_second


def projector_flops(in_dim: int, out_dim: int, tokens: int) -> int:
    """LLaVA's 2-layer MLP projector (in -> out -> out) on ``tokens`` encoder tokens."""
    return 2 * tokens * (in_dim * out_dim + out_dim * out_dim)


def kv_cache_bytes(lm: LMDims, tokens: int, bytes_per_element: int = 2) -> int:
    """Bytes of the K and V caches after a prefill of ``tokens`` positions (2 for fp16/bf16, 4 for fp32)."""
    return 2 * lm.layers * tokens * lm.kv_heads * lm.e * bytes_per_element


def llava_next_visual_tokens(side: int, rows: int, cols: int) -> int:
    """Visual positions the LLM sees for an unpadded ``rows`` x ``cols`` grid of ``side`` x ``side``-token crops:
    the base crop, then the grid with one newline per token row. 2x2 of 24x24 -> 576 + 48*49 = 2928."""
    base = side * side
    if rows * cols == 0:
        return base
    return base + rows * side * (cols * side + 1)


def selector_share(sel: SelectorDims, crops: int, lm: LMDims, text_tokens: int, visual_tokens: int) -> float:
    """Selector FLOPs on ``crops`` crops / full-prompt prefill FLOPs (causal convention)."""
    return selector_flops(sel, crops) / prefill_flops(lm, text_tokens, visual_tokens, "causal")


__all__ = ["CONVENTIONS", "LMDims", "ViTDims", "SelectorDims", "LlavaNextDims", "VICUNA_7B", "CLIP_L_SELECTOR",
           "SIGLIP_SO400M_SELECTOR", "SELECTOR_SHAPES", "QwenViTDims", "QwenDims", "qwen_dims",
           "qwen_tower_flops", "H100_BF16_PEAK_FLOPS", "ASSUMED_UTILIZATION",
           "PAPER_TRAINING_CROPS", "lm_prefill_flops", "prefill_flops", "ideal_speedup", "vision_tower_flops",
           "selector_flops", "selector_training_flops", "selector_parameters", "training_seconds", "projector_flops",
           "kv_cache_bytes", "llava_next_visual_tokens", "selector_share"]
