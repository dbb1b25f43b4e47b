"""Train ``tiny-trained`` (LLaVA-NeXT), ``tiny-ov-trained`` (LLaVA-OneVision), ``tiny-qwen25-trained``
(Qwen2.5-VL) and ``tiny-qwen3-trained`` (Qwen3-VL): tiny models with the real HF classes that read the
synthetic benchmarks.

All follow one recipe (the Qwen ones with two changes, :class:`TinyQwenWorldConfig`); the family decides the classes, the prompt format (its chat
template) and the token geometry. The OneVision one trains with interpolation off,
the setting pruned runs use (``pipeline.families.llava_onevision``), and ships with its
stock ``vision_aspect_ratio``.

The recipe follows LLaVA's own: a vision tower pre-trained on its own task, then
frozen while the projector and the LM learn to answer questions about images.

1. **Tower pre-training** (the stand-in for CLIP pre-training): every output
   token of ``vision_feature_layer`` learns, through a linear probe, which glyphs
   lie in its own 16-pixel cell. The supervision is per token, so the glyph's
   identity stays in the glyph's token -- the locality that makes *which tokens
   are kept* matter. (The issue's prototype saw an end-to-end trained 2-layer tower spread
   a lone glyph into every token of the crop.)
2. **Instruction tuning**: the tower is frozen and its features are computed once;
   the projector, image-newline and LM train on ``USER: <image>\\n{question}
   ASSISTANT: {answer}</s>`` with loss on the answer tokens, through the model's
   own ``pack_image_features`` (AnyRes packing and unpadding) so training sees
   exactly what ``generate`` sees.
3. **Pruning augmentation**: for ``drop_prob`` of the samples only a random
   ``drop_retentions`` share of each crop's tokens is kept (always with the
   glyph tokens), so the 2-layer LM, like a large one, still reads what is
   left; dropped tokens still carry nothing, so random pruning still loses the
   answer on OCR.

On a family without crops (Qwen: ``has_crops`` False) the unit is the *merged* token, one 16-px cell of
the processor's resized image (8-px patches, 2 x 2 merger): the probe reads the merger's input (the four
patch states of a cell side by side, raster order), the merger is the projector and trains with the LM, and
the training forward is the family's own ``train_forward`` (the ids, M-RoPE positions and
``mm_encoder_outputs`` that ``generate_ids`` builds for ``generate``).

Pure torch + transformers; progress is a callback.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from .config import Config, check
from .extract import crop_layout, projector_inputs, token_boxes
from .builders import IMAGE_TOKEN, build_tiny
from .families import FAMILIES, family_of
from .presets import TinyOvPreset, TinyPreset, TinyQwen3Preset, TinyQwenPreset
from .synthetic import GLYPHS, Sample, generate_samples
from .train import lr_factor

TINYWORLD_VERSION = "2"  # bump when the recipe changes in a way that changes the trained weights

TINY_TRAINED_PRESET = TinyPreset(
    name="tiny-trained", patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, tokenizer="v2",
)

# tiny-ov-trained: tiny-trained's dimensions with a SigLIP tower (64-px crops, 16-px patches: the tiny
# world's one glyph per cell), a Qwen2 LM and OneVision's pinpoints up to 3 x 3.
TINY_OV_TRAINED_PRESET = TinyOvPreset(
    name="tiny-ov-trained", patch_size=16, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, tokenizer="v2",
)

# tiny-qwen25-trained: the same widths as a Qwen2.5-VL: a windowed ViT of 8-px patches whose 2 x 2 merger makes
# one token per 16-px glyph cell, a Qwen2.5 LM with M-RoPE, dynamic resolution (the tiny world's images are
# never shrunk: max_pixels 224 x 224).
TINY_QWEN25_TRAINED_PRESET = TinyQwenPreset(
    name="tiny-qwen25-trained", patch_size=8, crop_size=16, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, tokenizer="v2",
)

# tiny-qwen3-trained: tiny-qwen25-trained's widths as a Qwen3-VL: a full-attention ViT with DeepStack (its mergers
# stay at their seeded init: the LM learns to read the main tokens with DeepStack added), a Qwen3 LM.
TINY_QWEN3_TRAINED_PRESET = TinyQwen3Preset(
    name="tiny-qwen3-trained", patch_size=8, crop_size=16, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, tokenizer="v2",
)

PROMPT = "USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:"  # NeXT's CHAT_TEMPLATE with one image + question

Progress = Callable[[str, int, int, dict], None]  # (phase, step, total, metrics)


@dataclasses.dataclass(frozen=True)
class TinyWorldConfig(Config):
    """Everything that determines the ``tiny-trained`` weights (its hash keys the stage)."""

    kind: ClassVar[str] = "tiny-world"

    preset: TinyPreset = TINY_TRAINED_PRESET
    data_seed: int = 0
    train_ocr: int = 6000
    train_scene: int = 3000
    seed: int = 0
    tower_steps: int = 2500
    tower_batch: int = 128
    tower_lr: float = 3e-3
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    drop_prob: float = 0.5         # pruning augmentation: share of samples with random tokens dropped
    drop_retentions: tuple = (0.1, 0.25, 0.5, 0.75)
    eval_samples: int = 300        # test questions per benchmark in the quality card
    eval_seeds: int = 3            # random-keep seeds in the quality card
    version: str = TINYWORLD_VERSION

    def validate(self) -> None:
        if self.preset.family.has_crops:
            check(self.preset.patch_size * 4 == self.preset.crop_size,
                  "the tiny world draws one glyph per crop_size/4 cell: use patch_size = crop_size / 4")
        else:  # dynamic resolution: one merged token (crop_size = patch x merge pixels) per 16-px glyph cell
            check(self.preset.crop_size == 16, "the tiny world draws one glyph per 16-px cell: use a merged "
                                               "token of 16 px (patch_size 8)")
        for name in ("train_ocr", "train_scene", "tower_steps", "tower_batch", "steps", "batch_size",
                     "eval_samples", "eval_seeds"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        check(0 < self.lr < 1 and 0 < self.tower_lr < 1, "learning rates must be in (0, 1)")
        check(0 <= self.warmup < self.steps, "warmup must be in [0, steps)")
        check(0 <= self.drop_prob <= 1, f"drop_prob must be in [0, 1], got {self.drop_prob!r}")
        check(all(0 < r <= 1 for r in self.drop_retentions) and len(self.drop_retentions) > 0,
              f"drop_retentions must be in (0, 1], got {self.drop_retentions!r}")


@dataclasses.dataclass(frozen=True)
class TinyOvWorldConfig(TinyWorldConfig):
    """Everything that determines the ``tiny-ov-trained`` weights: the same recipe on a OneVision preset."""

    kind: ClassVar[str] = "tiny-ov-world"

    preset: TinyOvPreset = TINY_OV_TRAINED_PRESET


@dataclasses.dataclass(frozen=True)
class TinyQwenWorldConfig(TinyWorldConfig):
    """Everything that determines the ``tiny-qwen25-trained`` weights: the same recipe on a Qwen2.5-VL preset.
    Its unit is the whole image (no crops): ``tower_batch`` counts images."""

    kind: ClassVar[str] = "tiny-qwen25-world"

    preset: TinyQwenPreset = TINY_QWEN25_TRAINED_PRESET
    tower_batch: int = 16
    # 2500 tower steps at tower_lr 3e-3 (the crop families' schedule) were fragile on merged tokens: the probe
    # ended at 0.887 glyph-token accuracy here, where a copy of the same loop on one thread that paused to
    # evaluate ended at 0.995. 1200 steps reached 0.98 in both, in half the time (0.981 for the shipped weights,
    # whose tower trains on OCR images only: :func:`_pretrain_merged_tower`).
    tower_steps: int = 1200


@dataclasses.dataclass(frozen=True)
class TinyQwen3WorldConfig(TinyQwenWorldConfig):
    """Everything that determines the ``tiny-qwen3-trained`` weights: the Qwen recipe on a Qwen3-VL preset."""

    kind: ClassVar[str] = "tiny-qwen3-world"

    preset: TinyQwen3Preset = TINY_QWEN3_TRAINED_PRESET


TRAINED_CONFIGS: dict[str, type[TinyWorldConfig]] = {"tiny-trained": TinyWorldConfig,
                                                     "tiny-ov-trained": TinyOvWorldConfig,
                                                     "tiny-qwen25-trained": TinyQwenWorldConfig,
                                                     "tiny-qwen3-trained": TinyQwen3WorldConfig}


# ---------------------------------------------------------------- data

@dataclasses.dataclass
class Encoded:
    """One training sample, ready for the model: crops (or a dynamic-resolution image's patches and grid),
    prompt pieces, answer, glyph labels."""

    pixels: torch.Tensor  # (crops, 3, S, S); without crops (Qwen): the processor's (patches, C*T*P*P)
    image_size: tuple[int, int]  # (height, width)
    before: torch.Tensor  # prompt token ids before the <image> placeholder
    after: torch.Tensor  # prompt token ids after it
    answer: torch.Tensor  # " {answer}</s>" token ids (the loss targets)
    glyph_targets: torch.Tensor | None  # (crops, L) class per token (-100 unlabelled), OCR only
    grid: tuple[int, int, int] | None = None  # without crops (Qwen): the image's (t, h, w) patch grid


def prompt_for(question: str, processor=None, with_image: bool = True) -> str:
    """The prompt of one question: the processor's chat template (NeXT's vicuna format without one)."""
    if processor is None:
        return PROMPT.format(question=question) if with_image else \
            PROMPT.replace(IMAGE_TOKEN + "\n", "").format(question=question)
    from .evaluate import chat_prompt

    return chat_prompt(processor, question, with_image)


def encode(sample: Sample, processor, config) -> Encoded:
    """One sample for the model whose LLaVA config is ``config`` (geometry and family from it)."""
    from .prune import split_prompt

    family = family_of(config)
    tok = processor.tokenizer
    prompt = prompt_for(sample.question, processor)  # its family's chat template
    before, after = split_prompt(tok, prompt, tok.convert_tokens_to_ids(IMAGE_TOKEN))
    answer_ids = torch.tensor(tok(" " + sample.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    w, h = sample.image.size
    if not family.has_crops:  # dynamic resolution: one image, merged tokens over its resized grid
        enc = processor.image_processor(images=[sample.image], return_tensors="pt")
        grid = tuple(int(v) for v in enc["image_grid_thw"][0].tolist())
        targets = None
        if sample.glyph_boxes:
            targets = merged_glyph_targets((h, w), grid, config.vision_config.patch_size,
                                           config.vision_config.spatial_merge_size, sample.glyph_boxes)
        return Encoded(enc["pixel_values"], (h, w), before, after, answer_ids, targets, grid)
    layout = crop_layout(w, h, config.vision_config.image_size, config.image_grid_pinpoints)
    pixels = processor.image_processor(images=[sample.image], return_tensors="pt")["pixel_values"][0]
    pixels = pixels[: len(layout.boxes)]
    targets = None
    if sample.glyph_boxes:
        targets = glyph_targets(layout.boxes, family.side(config), sample.glyph_boxes, family.covered(config))
    return Encoded(pixels, (h, w), before, after, answer_ids, targets)


def glyph_targets(boxes, side: int, glyph_boxes, span: float = 1.0) -> torch.Tensor:
    """(crops, side*side) class per token: 1 + glyph index for the glyph covering most of the
    cell's share of ink (at least half of that glyph's ink box), else 0 (blank)."""
    out = torch.zeros(len(boxes), side * side, dtype=torch.long)
    for i, box in enumerate(boxes):
        out[i] = _cell_classes(token_boxes(box, side, span), glyph_boxes)
    if len(boxes) > 1:
        # The base crop squashes the whole image into one crop: glyphs there are 2-3x
        # smaller than a cell and not reliably readable, so base tokens get no label.
        out[0] = -100
    return out


def _cell_classes(cells: np.ndarray, glyph_boxes) -> torch.Tensor:
    """(L,) class per cell box (L, 4): 1 + glyph index for the glyph with the largest share of its ink box
    inside the cell when that share is at least half, else 0 (blank)."""
    g = np.asarray([b[:4] for b in glyph_boxes], dtype=np.float64)
    cls = np.asarray([1 + GLYPHS.index(b[4]) for b in glyph_boxes])
    area = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    t = cells[:, None, :]
    w = np.clip(np.minimum(t[..., 2], g[:, 2]) - np.maximum(t[..., 0], g[:, 0]), 0, None)
    h = np.clip(np.minimum(t[..., 3], g[:, 3]) - np.maximum(t[..., 1], g[:, 1]), 0, None)
    share = (w * h) / area  # (L, G): fraction of each glyph's ink box inside the cell
    best = share.argmax(axis=1)
    hit = share[np.arange(len(best)), best] >= 0.5
    return torch.from_numpy(np.where(hit, cls[best], 0))


def merged_glyph_targets(image_size: tuple[int, int], grid: tuple[int, int, int], patch: int, merge: int,
                         glyph_boxes) -> torch.Tensor:
    """(1, L) class per merged token of a dynamic-resolution image (raster order over (h/merge, w/merge)):
    each token's cell of the resized image, mapped back to the original image's pixels, labelled as
    :func:`glyph_targets` labels a crop's cells."""
    height, width = image_size
    _, gh, gw = grid
    rows, cols = gh // merge, gw // merge
    sy, sx = height / (gh * patch), width / (gw * patch)  # original pixels per resized pixel
    cell = patch * merge
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.reshape(-1).astype(np.float64), c.reshape(-1).astype(np.float64)
    cells = np.stack([c * cell * sx, r * cell * sy, (c + 1) * cell * sx, (r + 1) * cell * sy], axis=1)
    return _cell_classes(cells, glyph_boxes)[None]


def training_samples(config: TinyWorldConfig) -> list[Sample]:
    ocr = generate_samples("synthetic-ocr", "train", config.train_ocr, seed=config.data_seed)
    scene = generate_samples("synthetic-scene", "train", config.train_scene, seed=config.data_seed)
    return ocr + scene


# ---------------------------------------------------------------- training

def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """(crops, L, C) projector inputs: ``vision_feature_layer`` hidden state, CLS dropped."""
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    return projector_inputs(out.hidden_states, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)


def pretrain_tower(model, data: Sequence[Encoded], config: TinyWorldConfig, progress: Progress | None = None) -> dict:
    """Per-token glyph probe on the feature layer: keeps each glyph's identity in its own token.

    Half of every batch are crops that hold a glyph token, so the rare glyph cells
    are not drowned by blank ones. Without crops (Qwen) the unit is the image and the
    token the merged one (:func:`_pretrain_merged_tower`)."""
    if not family_of(model.config).has_crops:
        return _pretrain_merged_tower(model, data, config, progress)
    gen = torch.Generator().manual_seed(config.seed)
    pixels = torch.cat([d.pixels for d in data])
    side = family_of(model.config).side(model.config)
    targets = torch.cat([d.glyph_targets if d.glyph_targets is not None
                         else torch.zeros(d.pixels.shape[0], side * side, dtype=torch.long) for d in data])
    with_glyph = (targets > 0).any(-1).nonzero()[:, 0]
    targets = targets.clone()
    tower = model.model.vision_tower
    probe = torch.nn.Linear(model.config.vision_config.hidden_size, 1 + len(GLYPHS))
    params = list(tower.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=config.tower_lr, weight_decay=config.weight_decay)
    tower.train()
    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = probe(tower_features(model, pixels[idx]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[idx].flatten())

    stats = _fit_probe(config, opt, gen, pixels.shape[0], with_glyph, batch_loss, progress)
    tower.eval()
    with torch.no_grad():
        idx = torch.arange(min(pixels.shape[0], 8192))
        pred = probe(tower_features(model, pixels[idx])).argmax(-1)
        t = targets[idx]
        stats["tower_glyph_token_accuracy"] = float((pred == t)[t > 0].float().mean())
        stats["tower_blank_token_accuracy"] = float((pred == t)[t == 0].float().mean())
        # The probe must not fire on base-crop tokens either way: they are unlabelled.
    return stats


def merged_features(model, data: Sequence[Encoded], deepstack: bool = False):
    """(sum of L, 4C) the merger's input of dynamic-resolution images, in raster order: the tower's last
    states, each merged token's four patch states side by side (``ImageFeatures.features`` of
    ``encode_images``), computed in one tower call (differentiable). With ``deepstack``: also Qwen3-VL's
    DeepStack features, one (sum of L, D) tensor per layer at the same tokens (None for a family without)."""
    family = family_of(model.config)
    visual = family.visual_module(model)
    param = next(visual.parameters())
    grid = torch.tensor([list(d.grid) for d in data], dtype=torch.long)
    out = visual(torch.cat([d.pixels for d in data]).to(param.device, param.dtype), grid_thw=grid.to(param.device))
    hidden = family.raster(out.last_hidden_state, grid, model.config)
    flat = hidden.reshape(-1, visual.spatial_merge_size ** 2 * hidden.shape[-1])
    return (flat, family.deepstack(out)) if deepstack else flat


def _merged_targets(d: Encoded) -> torch.Tensor:
    """(L,) glyph class per merged token of one image (0 everywhere without glyphs)."""
    if d.glyph_targets is not None:
        return d.glyph_targets[0]
    t, h, w = d.grid
    return torch.zeros(t * h * w // 4, dtype=torch.long)


def _pretrain_merged_tower(model, data: Sequence[Encoded], config: TinyWorldConfig,
                           progress: Progress | None = None) -> dict:
    """:func:`pretrain_tower` on merged tokens: a linear probe on the merger's input (4C wide) learns the glyph
    in each token's 16-px cell, on batches of ``tower_batch`` images that hold glyphs (the OCR images).

    Scenes stay out of this phase: they carry no glyph, and labelling every one of their tokens blank taught
    the tower to erase colour (a 0.978 glyph probe left scenes full at 0.283). The crop families' towers keep
    their recipe (their shipped weights)."""
    gen = torch.Generator().manual_seed(config.seed)
    targets = [_merged_targets(d) for d in data]
    glyph_images = [i for i, t in enumerate(targets) if bool((t > 0).any())]
    visual = family_of(model.config).visual_module(model)
    tower = [p for name, p in visual.named_parameters() if not name.startswith("merger.")]
    probe = torch.nn.Linear(visual.spatial_merge_size ** 2 * model.config.vision_config.hidden_size, 1 + len(GLYPHS))
    opt = torch.optim.AdamW(tower + list(probe.parameters()), lr=config.tower_lr, weight_decay=config.weight_decay)
    visual.train()
    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        chosen = [glyph_images[i] for i in idx.tolist()]
        logits = probe(merged_features(model, [data[i] for i in chosen]))
        return torch.nn.functional.cross_entropy(logits, torch.cat([targets[i] for i in chosen]))

    every = torch.arange(len(glyph_images))
    stats = _fit_probe(config, opt, gen, len(glyph_images), every, batch_loss, progress)
    visual.eval()
    with torch.no_grad():
        pred, t = [], []
        for start in range(0, min(len(data), 2048), 64):
            chunk = data[start:start + 64]
            pred.append(probe(merged_features(model, chunk)).argmax(-1))
            t += [targets[start + i] for i in range(len(chunk))]
        pred, t = torch.cat(pred), torch.cat(t)
        stats["tower_glyph_token_accuracy"] = float((pred == t)[t > 0].float().mean())
        stats["tower_blank_token_accuracy"] = float((pred == t)[t == 0].float().mean())
    return stats


def _sample_keep_mask(feats: torch.Tensor, enc: Encoded, valid: torch.Tensor, config: TinyWorldConfig,
                      gen: torch.Generator) -> torch.Tensor | None:
    """Pruning augmentation: with ``drop_prob``, keep a random ``drop_retentions`` share of
    each crop's valid tokens -- always including the tokens that hold a glyph."""
    from .strategies import Context, keep_mask

    if torch.rand((), generator=gen) >= config.drop_prob:
        return None
    r = config.drop_retentions[int(torch.randint(0, len(config.drop_retentions), (), generator=gen))]
    mask = keep_mask("random", feats, r, context=Context(generator=gen), valid=valid)
    if enc.glyph_targets is not None:
        mask |= (enc.glyph_targets > 0) & valid
    return mask


def _batch(model, items, keep_masks):
    """Right-padded inputs_embeds / attention mask / labels for [prompt | visual | prompt | answer]."""
    from .prune import ImageFeatures, visual_embeddings

    embed = model.get_input_embeddings()
    rows, labels = [], []
    for (feats, enc), keep_mask in zip(items, keep_masks):
        vis = visual_embeddings(model, ImageFeatures(feats, enc.image_size), keep_mask)
        ids_before, ids_after = embed(enc.before), embed(torch.cat([enc.after, enc.answer]))
        rows.append(torch.cat([ids_before, vis, ids_after]))
        n_prompt = rows[-1].shape[0] - enc.answer.shape[0]
        labels.append(torch.cat([torch.full((n_prompt,), -100, dtype=torch.long), enc.answer]))
    width = max(r.shape[0] for r in rows)
    x = rows[0].new_zeros(len(rows), width, rows[0].shape[1])
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        x[i, : r.shape[0]], y[i, : r.shape[0]], mask[i, : r.shape[0]] = r, lab, 1
    return x, mask, y


def train_lm(model, processor, data: Sequence[Encoded], config: TinyWorldConfig,
             progress: Progress | None = None) -> dict:
    """Instruction-tune projector + image newline + LM on frozen tower features.

    Sequences are built exactly as ``pipeline.prune`` builds them at inference,
    so full and pruned inputs share one code path."""
    if not family_of(model.config).has_crops:
        return _train_merged_lm(model, processor, data, config, progress)
    tower = model.model.vision_tower
    for p in tower.parameters():
        p.requires_grad_(False)
    from .prune import valid_tokens

    with torch.no_grad():
        feats = [tower_features(model, d.pixels) for d in data]
    valid = [valid_tokens(model, f.shape[0], f.shape[1], d.image_size) for f, d in zip(feats, data)]
    items = list(zip(feats, data, valid))

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(items), (config.batch_size,), generator=gen).tolist()
        batch = [items[i] for i in idx]
        keep_masks = [_sample_keep_mask(f, e, v, config, gen) for f, e, v in batch]
        embeds, mask, labels = _batch(model, [(f, e) for f, e, _ in batch], keep_masks)
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss

    stats = _fit(model, config, step_loss, progress)
    for p in tower.parameters():
        p.requires_grad_(True)
    return stats


def _fit_probe(config: TinyWorldConfig, opt, gen: torch.Generator, count: int, with_glyph: torch.Tensor,
               batch_loss: Callable[[torch.Tensor], torch.Tensor], progress: Progress | None = None) -> dict:
    """The tower phase's loop, shared by every family: ``tower_steps`` steps of warmup + cosine lr, each on a
    batch of ``tower_batch`` units (crops, or whole images without crops) drawn from ``count``, half of them
    from ``with_glyph`` (the units holding a glyph), ``batch_loss(indices)`` the probe's cross-entropy."""
    stats: dict[str, float] = {}
    half = config.tower_batch // 2
    for step in range(config.tower_steps):
        for g in opt.param_groups:
            g["lr"] = config.tower_lr * lr_factor(step, config.tower_steps // 10, config.tower_steps)
        idx = torch.cat([torch.randint(0, count, (config.tower_batch - half,), generator=gen),
                         with_glyph[torch.randint(0, len(with_glyph), (half,), generator=gen)]])
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {"tower_loss": float(loss.detach())}
        if progress:
            progress("tower", step + 1, config.tower_steps, stats)
    return stats


def _fit(model, config: TinyWorldConfig, step_loss: Callable[[torch.Generator], torch.Tensor],
         progress: Progress | None = None) -> dict:
    """The LM phase's loop, shared by every family: AdamW over the trainable parameters (no decay on biases
    and norms), warmup + cosine lr, ``step_loss(generator)`` per step (the generator, seeded by ``seed + 1``,
    draws the batch and its pruning), clipping at 1, an EMA of the loss for progress; the model ends in eval."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(config.seed + 1)
    model.train()
    stats: dict[str, float] = {}
    ema = None
    for step in range(config.steps):
        for g in opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config.warmup, config.steps)
        loss = step_loss(gen)
        if not torch.isfinite(loss):
            raise RuntimeError(f"tiny-world training diverged at step {step} (loss {float(loss)}); lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        stats = {"loss": ema}
        if progress:
            progress("lm", step + 1, config.steps, stats)
    model.eval()
    return stats


def _train_merged_lm(model, processor, data: Sequence[Encoded], config: TinyWorldConfig,
                     progress: Progress | None = None) -> dict:
    """:func:`train_lm` without crops (Qwen): the tower below the merger is frozen and its merged-token groups
    computed once; the merger (the projector) and the LM train through the family's ``train_forward``: the
    kept tokens through ``mm_encoder_outputs`` at their M-RoPE positions from ``get_rope_index``, as
    ``generate_ids`` feeds ``generate``."""
    from .prune import ImageFeatures, visual_embeddings

    family = family_of(model.config)
    visual = family.visual_module(model)
    frozen = [p for name, p in visual.named_parameters() if not name.startswith("merger.")]
    for p in frozen:
        p.requires_grad_(False)
    feats, stacks = [], []
    with torch.no_grad():
        for start in range(0, len(data), 64):
            chunk = data[start:start + 64]
            flat, deep = merged_features(model, chunk, deepstack=True)
            counts = [len(_merged_targets(d)) for d in chunk]
            feats += [f[None] for f in torch.split(flat, counts)]
            # Qwen3-VL: each image's DeepStack rows, frozen with the tower (their mergers too)
            per_layer = [torch.split(layer, counts) for layer in deep] if deep is not None else None
            stacks += [None if per_layer is None else [layer[i] for layer in per_layer] for i in range(len(chunk))]
    items = [(f, d, torch.ones(f.shape[:2], dtype=torch.bool)) for f, d in zip(feats, data)]
    pad = processor.tokenizer.pad_token_id or 0

    def step_loss(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(items), (config.batch_size,), generator=gen).tolist()
        kept = []
        for i in idx:
            f, e, v = items[i]
            image = ImageFeatures(f, e.image_size, valid=v, grid=e.grid, deepstack=stacks[i])
            kept.append(visual_embeddings(model, image, _sample_keep_mask(f, e, v, config, gen)))
        batch = [items[i][1] for i in idx]
        return family.train_forward(model, [(e.before, e.after) for e in batch], kept, [e.answer for e in batch],
                                    pad).loss

    stats = _fit(model, config, step_loss, progress)
    for p in frozen:
        p.requires_grad_(True)
    return stats


def train_tiny_world(config: TinyWorldConfig, progress: Progress | None = None):
    """Build ``config.preset`` and train it; returns (model, processor, metrics)."""
    t0 = time.perf_counter()
    model, processor = build_tiny(config.preset)
    family = family_of(model.config)
    family.set_interpolation(model, processor, False)  # trained as pruned runs see it (OneVision)
    torch.manual_seed(config.seed)
    samples = training_samples(config)
    if progress:
        progress("data", 0, len(samples), {})
    data = []
    for i, s in enumerate(samples):
        data.append(encode(s, processor, model.config))
        if progress and ((i + 1) % 256 == 0 or i + 1 == len(samples)):
            progress("data", i + 1, len(samples), {})
    metrics: dict[str, Any] = {"data_seconds": time.perf_counter() - t0}
    t1 = time.perf_counter()
    metrics.update(pretrain_tower(model, data, config, progress))
    metrics["tower_seconds"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    metrics.update(train_lm(model, processor, data, config, progress))
    metrics["lm_seconds"] = time.perf_counter() - t2
    metrics["train_seconds"] = time.perf_counter() - t0
    return model, processor, metrics


def restore_stock(model, processor) -> None:
    """Put back the checkpoint's own interpolation setting (before ``save_pretrained``)."""
    family_of(model.config).set_interpolation(model, processor, True)


# ---------------------------------------------------------------- answering and quality

def ask(model, processor, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy answers through the processor and HF ``generate`` (batched, left padding)."""
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                     for q in questions]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(images=list(images), text=prompts, return_tensors="pt", padding=True).to(model.device)
    enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


@torch.no_grad()
def quality(model, processor, samples: Sequence[Sample], strategy: str, retention: float = 1.0, seed: int = 0,
            batch_size: int = 32, max_new_tokens: int = 6) -> dict[str, float]:
    """Accuracy (exact match) and ANLS of ``strategy`` on ``samples``.

    ``full`` keeps every token, ``none`` sends the question without the image,
    ``random`` keeps round(retention * valid tokens) random valid tokens in every crop
    (seeded; the padding LLaVA-NeXT's unpadding drops is never counted)."""
    from .metrics import anls, exact_match
    from .prune import encode_images, generate_answers, visual_embeddings
    from .strategies import Context, keep_mask

    if strategy not in ("full", "none", "random"):
        raise ValueError(f"unknown strategy {strategy!r}; valid: full, none, random")
    gen = torch.Generator().manual_seed(seed)
    acc, nls, visual = 0.0, 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if strategy == "none":
            prompts = [prompt_for(s.question, processor, with_image=False) for s in chunk]
            vis: list = [None] * len(chunk)
        else:
            prompts = [prompt_for(s.question, processor) for s in chunk]
            vis = []
            for feats in encode_images(model, processor, [s.image for s in chunk]):
                mask = None if strategy == "full" else keep_mask("random", feats.features, retention,
                                                                 context=Context(generator=gen), valid=feats.valid)
                vis.append(visual_embeddings(model, feats, mask))
        with torch.no_grad():
            preds = generate_answers(model, processor, prompts, vis, max_new_tokens=max_new_tokens)
        for s, p, v in zip(chunk, preds, vis):
            acc += exact_match(p, s.answer)
            nls += anls(p, s.answers)
            visual += 0 if v is None else v.shape[0]
    n = max(1, len(samples))
    return {"accuracy": acc / n, "anls": nls / n, "n_samples": len(samples), "mean_visual_tokens": visual / n}


def quality_card(model, processor, n: int = 300, data_seed: int = 0, random_seeds: int = 3,
                 retention: float = 0.25, progress: Progress | None = None) -> list[dict[str, Any]]:
    """The tiny world's figures on the test splits: full, no image, random ``retention`` (seeds)."""
    from .synthetic import chance_accuracy

    rows = []
    jobs = [(b, st, sd) for b in ("synthetic-ocr", "synthetic-scene")
            for st, sd in [("full", 0), ("none", 0), *[("random", s) for s in range(random_seeds)]]]
    tests = {b: generate_samples(b, "test", n, seed=data_seed) for b in ("synthetic-ocr", "synthetic-scene")}
    for i, (bench, strategy, seed) in enumerate(jobs):
        r = 1.0 if strategy == "full" else (0.0 if strategy == "none" else retention)
        q = quality(model, processor, tests[bench], strategy, r, seed)
        rows.append({"benchmark": bench, "strategy": strategy, "retention": r, "seed": seed,
                     "chance": chance_accuracy(bench), **q})
        if progress:
            progress("eval", i + 1, len(jobs), {})
    return rows


def locality(model, processor, image, cell: tuple[int, int], glyph: str = "W", threshold: float = 0.1) -> dict:
    """Draw one glyph into one blank cell; count feature tokens that change by more than
    ``threshold`` of the largest change (per crop, CLS dropped)."""
    from PIL import ImageDraw

    from .fonts import font

    edited = image.copy()
    x, y = cell
    ImageDraw.Draw(edited).text((x + 2, y), glyph, font=font("sans", 14), fill=(0, 0, 0))
    enc = processor.image_processor(images=[image, edited], return_tensors="pt")
    with torch.no_grad():
        a = tower_features(model, enc["pixel_values"][0])
        b = tower_features(model, enc["pixel_values"][1])
    delta = (a - b).norm(dim=-1)  # (crops, L)
    changed = delta > threshold * delta.max()
    return {"tokens_changed": int(changed.sum()), "tokens_total": int(delta.numel()),
            "crops_changed": int(changed.any(-1).sum())}


__all__ = ["TinyWorldConfig", "TinyOvWorldConfig", "TinyQwenWorldConfig", "TRAINED_CONFIGS", "TINY_OV_TRAINED_PRESET",
           "TINY_QWEN25_TRAINED_PRESET", "TINY_QWEN3_TRAINED_PRESET", "TinyQwen3WorldConfig", "merged_features", "merged_glyph_targets", "restore_stock",
           "TINY_TRAINED_PRESET", "train_tiny_world", "ask", "quality", "quality_card", "encode", "prompt_for",
           "locality", "PROMPT"]


def code_hash() -> str:
    """Hash of the source that determines tiny-trained's weights (recorded with a shipped checkpoint)."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    families = sorted(type(f).__module__.removeprefix(f"{__package__}.") for f in FAMILIES.values())
    for name in ("config", "presets", "builders", "families.base", *families, "fonts", "synthetic", "extract", "train",
                 "prune", "strategies", "tinyworld"):
        module = importlib.import_module(f"{__package__}.{name}")
        with open(module.__file__, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]
