"""What Qwen2.5-VL and Qwen3-VL share: dynamic resolution, 2 x 2 merged tokens, M-RoPE, no crops.

The two family modules (``qwen2_5_vl``, ``qwen3_vl``) subclass :class:`QwenFamily` and say only what
differs (classes, window attention, DeepStack, patch size). This module is private (a leading
underscore): ``pipeline.families`` discovers family modules only.

How pruning works on these models (facts checked on tiny random-weight models, transformers 5.25):

- **Tokens.** The processor resizes an image to multiples of ``patch x merge`` pixels within
  ``[min_pixels, max_pixels]`` (``smart_resize``) and cuts it into patches; the tower's merger maps
  each 2 x 2 group of patches to one LLM-width token. Those *merged* tokens, in raster order over
  (h/2, w/2), are what the LLM sees: no CLS, no row newline, no crops. Budgets count merged tokens;
  ``per-crop`` means the whole image (one "crop").
- **Features.** ``ImageFeatures.features`` is (1, L, 4C): the tower's last hidden state before the
  merger, each merged token's four patch states side by side (the merger's own grouping), in raster
  order -- the paper's "encoder output before the projector", and the merger is the projector
  (:meth:`QwenFamily.project`). Qwen2.5-VL's tower runs in window order; :meth:`raster` restores
  raster order with ``get_vision_window_index`` (Qwen3-VL does not reorder).
- **Exact positions.** The 3-D M-RoPE positions are computed on the *unpruned* prompt with the
  model's own ``get_rope_index`` (``mm_token_type_ids`` marks image slots), then ids and positions
  are gathered at the kept slots and left-padded. ``position_ids`` is (4, B, L): row 0 is the cumsum of
  the attention mask over the pruned sequence (no gaps: gaps make the model treat the prompt as packed
  sequences), rows 1-3 the gathered M-RoPE positions. ``generate`` extends every row by one per step,
  so ``rope_deltas`` is never needed. The kept visual tokens go in through ``mm_encoder_outputs``
  (never by splicing ``inputs_embeds``: without ``position_ids`` the model silently falls back to
  1-D positions, and on Qwen3-VL splicing drops the DeepStack features).
- **DeepStack** (Qwen3-VL): the tower's intermediate-layer features, merged by their own mergers, are
  added to the first LLM layers at the image slots. The same keep index prunes every one of them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from ..errors import UserError
from .base import Family, VisualTokens

IMAGE_TOKEN = "<image>"  # the tiny presets' image pad (the hub checkpoints' is <|image_pad|>)
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class QwenInputError(UserError, ValueError):
    """Input a Qwen family cannot take (videos, HiRED, a pixel budget below one merged token): one line."""


@dataclasses.dataclass
class KeptImage:
    """What one pruned image sends the LLM of a Qwen model: ``embeds`` (K, D) the kept merged tokens (the
    merger's output), ``kept_indices`` (K,) their raster indices among the image's L merged tokens, ``grid`` its
    (t, h, w) patch grid, ``deepstack`` Qwen3-VL's (K, D) DeepStack features per layer at the same slots,
    ``extra`` (E, D) tokens that are not the image's own (VisionZip's contextual tokens), sent after the
    kept ones at the position of the image's last slot."""

    embeds: torch.Tensor
    kept_indices: torch.Tensor
    grid: tuple[int, int, int]
    deepstack: list[torch.Tensor] | None = None
    extra: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        """(visual tokens the LLM sees, D): kept plus extra, as a LLaVA image's embedding tensor has it."""
        n = self.embeds.shape[0] + (0 if self.extra is None else self.extra.shape[0])
        return torch.Size([n, self.embeds.shape[1]])


def merged_grid(height: int, width: int, patch: int, merge: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens the stock processor gives an image of (height, width): its
    ``smart_resize`` to multiples of ``patch x merge`` within the pixel limits, over ``patch x merge``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    check_shape(height, width)
    factor = patch * merge
    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return h // factor, w // factor


MAX_ASPECT = 200  # smart_resize's limit: a longer side over 200 x the shorter one raises ValueError


def check_shape(height: int, width: int) -> None:
    """One line for an image the stock processor cannot resize: empty, or an aspect ratio above 200."""
    height, width = int(height), int(width)
    if min(height, width) < 1:
        raise QwenInputError(f"empty image ({height} x {width} pixels)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise QwenInputError(f"image of {height} x {width} pixels: the Qwen-VL processor refuses aspect ratios above "
                             f"{MAX_ASPECT}:1; crop or pad it first")


def check_pixels(min_pixels: int, max_pixels: int, patch: int, merge: int, where: str = "") -> None:
    """One line for pixel limits that cannot hold one merged token (or are out of order)."""
    unit = (patch * merge) ** 2
    at = f"{where}: " if where else ""
    if not isinstance(max_pixels, int) or max_pixels < unit:
        raise QwenInputError(f"{at}max_pixels {max_pixels!r} is below one merged token "
                             f"({patch * merge} x {patch * merge} = {unit} pixels)")
    if not isinstance(min_pixels, int) or not 0 < min_pixels <= max_pixels:
        raise QwenInputError(f"{at}min_pixels {min_pixels!r} must be in (0, max_pixels={max_pixels}]")


class QwenFamily(Family, abc.ABC):
    """A Qwen-VL family: one dynamic-resolution image per placeholder, merged tokens, M-RoPE positions."""

    tower = "Qwen-ViT"
    # The capabilities (can_interpolate False, multi_image_anyres True: several images in one prompt each get
    # their own dynamic grid, has_crops False, own_runtime True) are declared in each family's own class body.
    tiny_text_model = "qwen2"
    corpus_line = "<|im_start|>user\n" + VISION_START + "{image}" + VISION_END + "{text}<|im_end|>\n" \
                  "<|im_start|>assistant\n{answer}<|im_end|>"
    tower_prefixes = ("model.visual.", "visual.")
    chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        "{{ '" + VISION_START + IMAGE_TOKEN + VISION_END + "' }}{% endif %}{% endfor %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    default_patch = 14
    # (min_pixels, max_pixels) of the hub checkpoint's preprocessor_config.json: what a processor built without
    # limits gets, and what token counts assume for a config no processor was noted on (a meta-device model).
    stock_pixels: tuple[int, int] = (56 * 56, 28 * 28 * 16384)
    # (image_mean, image_std) of the hub checkpoint's preprocessor_config.json; None: the processor class's own
    # (OpenAI CLIP's, which Qwen2.5-VL uses)
    image_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # ------------------------------------------------------------- per-model differences
    @abc.abstractmethod
    def processor_base(self):
        """The stock processor class (``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``)."""

    @abc.abstractmethod
    def config_classes(self):
        """(top-level config, vision config, text config) classes."""

    def vision_kwargs(self, layers: int) -> dict[str, Any]:
        """Family-specific vision-config fields of a tiny or sized preset with ``layers`` blocks."""
        return {}

    def raster(self, hidden: torch.Tensor, grid: torch.Tensor, cfg) -> torch.Tensor:
        """(patches, C) tower states of the images of ``grid`` in tower order -> processor (raster-group) order."""
        return hidden

    def deepstack(self, out) -> list[torch.Tensor] | None:
        """The tower output's DeepStack features (one (merged tokens, D) tensor per layer), or None."""
        return None

    def encoder_output(self, pooled: list[torch.Tensor], deepstack: list[list[torch.Tensor]] | None):
        """What ``mm_encoder_outputs["image"]`` holds: the kept tokens per image (and DeepStack per layer)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if deepstack is not None:
            raise ValueError(f"{self.label} has no DeepStack features to take")
        return BaseModelOutputWithPooling(pooler_output=pooled)

    def attention_block(self, cfg) -> int:
        """The tower block whose attention VisionZip's CLS-free score reads: the last block."""
        return cfg.vision_config.depth - 1

    # ------------------------------------------------------------- classes and processor
    def image_processor_class(self):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil

    def processor(self, image_processor, tokenizer, image_token: str, patch_size: int, aspect: str | None = None):
        return qwen_processor_class(self)(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=self.chat_template)

    def load_processor(self, model_dir):
        """The processor of a saved dir without a video processor (no torchvision): the PIL image processor,
        the tokenizer and the chat template."""
        model_dir, tokenizer, template = self.saved_parts(model_dir)
        image_processor = self.image_processor_class().from_pretrained(model_dir)
        return qwen_processor_class(self)(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=template)

    # ------------------------------------------------------------- tiny and sized presets
    def tokenizer_tokens(self, image_token: str) -> dict:
        """Qwen's chat and vision tokens; ``<|im_end|>`` ends an answer and there is no BOS."""
        return {"special": ["<|im_start|>", "<|im_end|>", VISION_START, VISION_END, "<|video_pad|>"],
                "bos": None, "eos": "<|im_end|>",
                "extra": {"image_token": image_token, "video_token": "<|video_pad|>",
                          "vision_bos_token": VISION_START, "vision_eos_token": VISION_END}}

    def vision_config(self, *, hidden, intermediate, layers, heads, image_size, patch_size, projection_dim=None,
                      hidden_act=None, **fields):
        """The tower (``out_hidden_size`` is set to the LM's width by :meth:`llava_config`);
        ``image_size`` and ``projection_dim`` are LLaVA's and unused. ``fields`` (a sized preset's own
        special blocks, window, position embeddings) replace :meth:`vision_kwargs`' choices."""
        vision_class = self.config_classes()[1]
        kw = {**self.vision_kwargs(layers), **({"hidden_act": hidden_act} if hidden_act else {}), **fields}
        return vision_class(depth=layers, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads,
                            patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, **kw)

    def text_config_class(self, text_model: str):
        return self.config_classes()[2]

    def text_kwargs(self, hidden: int, heads: int, rope_theta: float = 1000000.0, mrope_section=None,
                    **given) -> dict[str, Any]:
        """M-RoPE: sections of head_dim / 2 over (t, h, w), as the checkpoints' 16/24/24 of 64 (a sized preset
        gives its own ``rope_theta`` and ``mrope_section``; other ``given`` fields pass through)."""
        half = hidden // heads // 2
        t = half // 4
        h = (half - t) // 2
        section = list(mrope_section) if mrope_section is not None else [t, h, half - t - h]
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta), "mrope_section": section},
                **given}

    def finish_config(self, config, tokenizer) -> None:
        ids = {"vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
               "video_token_id": "<|video_pad|>"}
        for key, token in ids.items():
            got = tokenizer.convert_tokens_to_ids(token)
            if got is not None and got != tokenizer.unk_token_id:
                setattr(config, key, got)

    def llava_config(self, vision, text, image_token_id, pinpoints, feature_layer, aspect=None):
        """The model's config: the tower's ``out_hidden_size`` is the LM's width; the special ids are the
        tokenizer's (``image_token_id`` is its image pad; the vision start/end ids follow it in the tiny
        tokenizer, set by :meth:`finish_config`)."""
        top = self.config_classes()[0]
        vision.out_hidden_size = text.hidden_size
        return top(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
                   tie_word_embeddings=False)

    def build_image_processor(self, crop: int, pinpoints, *, patch: int | None = None, min_pixels: int | None = None,
                              max_pixels: int | None = None):
        """The PIL image processor with these pixel limits (``crop`` and ``pinpoints`` are LLaVA's and unused)."""
        patch = patch or self.default_patch
        min_pixels = self.stock_pixels[0] if min_pixels is None else min_pixels
        max_pixels = self.stock_pixels[1] if max_pixels is None else max_pixels
        check_pixels(min_pixels, max_pixels, patch, 2, "image processor")
        norm = {} if self.image_norm is None else {"image_mean": list(self.image_norm[0]),
                                                   "image_std": list(self.image_norm[1])}
        return self.image_processor_class()(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels, **norm)

    def preset_image_processor(self, preset):
        return self.build_image_processor(0, (), patch=preset.patch_size, min_pixels=preset.min_pixels,
                                          max_pixels=preset.max_pixels)

    # ------------------------------------------------------------- token geometry
    def has_cls(self, cfg) -> bool:
        return False

    def side(self, cfg) -> int:
        raise QwenInputError(f"{self.label} has no fixed crop: its token grid follows each image's size")

    def covered(self, cfg) -> float:
        return 1.0

    def tokens_per_crop(self, cfg) -> int:
        raise QwenInputError(f"{self.label} has no fixed crop: its token count follows each image's size")

    def max_crops(self, cfg) -> int:
        return 1

    def pack(self, inner, features, image_sizes, image_newline, cfg, aspect=None):
        raise QwenInputError(f"{self.label} does not pack crops: its merged tokens go in raster order")

    def pixel_limits(self, cfg, stock: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
        """(patch, min_pixels, max_pixels): ``stock`` (:meth:`stock_config`) where given, else the config's
        ``atr_pixels`` (set by :meth:`note_processor`; ``pipeline.loading`` notes the loaded processor), else the
        hub checkpoint's (:attr:`stock_pixels`)."""
        patch = cfg.vision_config.patch_size
        got = dict(stock or {}) or dict(getattr(cfg, "atr_pixels", None) or {})
        if not got:
            got = {"min_pixels": self.stock_pixels[0], "max_pixels": self.stock_pixels[1]}
        return patch, int(got["min_pixels"]), int(got["max_pixels"])

    def visual_tokens(self, cfg, image_size: tuple[int, int], aspect: str | None = None,
                      stock: Mapping[str, Any] | None = None) -> VisualTokens:
        """Merged tokens of one image of (height, width): the processor's ``smart_resize`` grid over 2 x 2."""
        patch, lo, hi = self.pixel_limits(cfg, stock)
        rows, cols = merged_grid(image_size[0], image_size[1], patch, cfg.vision_config.spatial_merge_size, lo, hi)
        return VisualTokens(rows * cols, 0)

    def stock_tokens(self, cfg, image_size, stock=None) -> VisualTokens:
        return self.visual_tokens(cfg, image_size, stock=stock)

    def note_processor(self, model, processor) -> None:
        """Record the processor's pixel limits on the model's config (``atr_pixels``): token counts from
        geometry then match what this processor makes."""
        if processor is None:
            return
        size = dict(processor.image_processor.size)
        model.config.atr_pixels = {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}

    def stock_config(self, model, processor) -> dict[str, Any]:
        self.note_processor(model, processor)
        return dict(getattr(model.config, "atr_pixels", None) or {})

    def flops_dims(self, cfg):
        from ..flops import qwen_dims

        return qwen_dims(cfg)

    def describe(self, cfg) -> dict[str, Any]:
        vis, text = cfg.vision_config, cfg.text_config
        return {"family": self.name, "model_type": cfg.model_type, "vision_model_type": vis.model_type,
                "vision_hidden": vis.hidden_size, "vision_layers": vis.depth, "patch_size": vis.patch_size,
                "spatial_merge_size": vis.spatial_merge_size, "has_cls": False,
                "pixels": dict(getattr(cfg, "atr_pixels", None) or {}),
                "text_model_type": text.model_type, "text_hidden": text.hidden_size,
                "text_layers": text.num_hidden_layers}

    @abc.abstractmethod
    def tower_class(self):
        """The tower's own class (``model.model.visual``)."""

    def build_vision_tower(self, cfg):
        """The tower alone (``model.model.visual``), built from ``cfg.vision_config`` as the model builds it."""
        return self.tower_class()._from_config(cfg.vision_config)

    def tower_of(self, model):
        return model.model.visual

    @staticmethod
    def visual_module(model):
        """The tower of a whole model (``model.model.visual``) or of a tower-only load (``VisionTower``)."""
        inner = getattr(model, "model", None)
        return getattr(inner, "visual", None) or model.vision_tower

    # ------------------------------------------------------------- pruned inference (pipeline.prune dispatches here)

    def _check_images(self, images) -> None:
        """PIL images of any mode (the processor converts them to RGB, CMYK JPEGs included); a list or
        4-D array of frames is a video, refused in one line, as is anything else."""
        from PIL import Image

        for image in images:
            if isinstance(image, Image.Image):
                check_shape(image.height, image.width)
                continue
            if isinstance(image, (list, tuple)) or len(getattr(image, "shape", ())) == 4:
                raise QwenInputError(f"videos are not supported: the {self.label} pruning harness takes still "
                                     f"images only (got frames: {type(image).__name__})")
            raise QwenInputError(f"{self.label} takes PIL images; got {type(image).__name__}")

    def encode_images(self, model, processor, images: Sequence[Any], attention: bool = False, embeds: bool = False,
                      embeds_layer: int | None = None) -> list:
        """Per image, ``ImageFeatures`` with ``features`` (1, L, 4C) pre-merger states in raster order, ``valid``
        all True, ``grid`` (t, h, w), Qwen3-VL's ``deepstack`` and, with ``attention``, VisionZip's CLS-free
        score (the mean attention each merged token's patches receive in :meth:`attention_block`, a full-
        attention block) and keys (mean over heads and the token's four patches)."""
        from ..visual import ImageFeatures

        if embeds:
            raise QwenInputError(f"a text encoder's relevance reads a CLIP tower's post-norm states, which "
                                 f"{self.label} has none of: run without --text-encoder (the unconditioned DPP on "
                                 f"the merged tokens)")
        self._check_images(images)
        self.note_processor(model, processor)
        visual = self.visual_module(model)
        param = next(visual.parameters())
        enc = processor.image_processor(images=list(images), return_tensors="pt")
        grid = enc["image_grid_thw"]
        merge = visual.spatial_merge_size
        captured: dict[str, Any] = {}
        handle = None
        block = visual.blocks[self.attention_block(model.config)] if attention else None
        if block is not None:

            def grab(_module, args, kwargs):
                captured["x"] = args[0] if args else kwargs["hidden_states"]
                captured["pos"] = kwargs.get("position_embeddings")
                captured["cu"] = kwargs.get("cu_seqlens")
            handle = block.attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = visual(enc["pixel_values"].to(param.device, param.dtype), grid_thw=grid.to(param.device))
        finally:
            if handle is not None:
                handle.remove()
        hidden = self.raster(out.last_hidden_state, grid, model.config)
        channels = hidden.shape[-1]
        counts = (grid.prod(-1) // merge ** 2).tolist()
        grouped = torch.split(hidden.reshape(-1, merge ** 2 * channels), counts)
        stacks = self.deepstack(out)
        stacks = None if stacks is None else [torch.split(s, counts) for s in stacks]
        scores = keys = None
        if attention:
            scores, keys = self._received(block.attn, captured, grid, model.config)
            scores, keys = torch.split(scores, counts), torch.split(keys, counts)
        result = []
        for i, (feats, image) in enumerate(zip(grouped, images)):
            w, h = image.size
            result.append(ImageFeatures(
                feats[None], (h, w), cls_attention=None if scores is None else scores[i][None],
                valid=torch.ones(1, feats.shape[0], dtype=torch.bool, device=feats.device),
                keys=None if keys is None else keys[i][None], grid=tuple(int(v) for v in grid[i].tolist()),
                deepstack=None if stacks is None else [s[i] for s in stacks]))
        return result

    def _received(self, attn, captured, grid, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged tokens,) mean attention received and (merged tokens, head_dim) keys, in raster order, from
        the captured input of one full-attention block (per image: ``cu_seqlens`` segments)."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        x = captured["x"]
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["pos"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (heads, n, hd)
        cu = captured["cu"].tolist()
        received = torch.zeros(n, dtype=torch.float32, device=x.device)
        for a, b in zip(cu[:-1], cu[1:]):
            for start in range(a, b, 256):
                w = torch.softmax((q[:, start:min(b, start + 256)] @ k[:, a:b].transpose(-1, -2)) * attn.scaling, -1)
                received[a:b] += w.mean(dim=0).sum(dim=0)
            received[a:b] /= (b - a)
        keys = k.mean(dim=0)  # (n, hd)
        received = self.raster(received[:, None], grid, cfg)[:, 0]
        keys = self.raster(keys, grid, cfg)
        unit = cfg.vision_config.spatial_merge_size ** 2
        return received.view(-1, unit).mean(-1), keys.view(-1, unit, keys.shape[-1]).mean(1)

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        """(1, L, 4C) pre-merger groups -> (1, L, D) merged tokens: the tower's own merger (the projector)."""
        merger = self.visual_module(model).merger
        lead = features.shape[:-1]
        channels = features.shape[-1] // model.config.vision_config.spatial_merge_size ** 2
        out = merger(features.reshape(-1, channels))
        return out.reshape(*lead, out.shape[-1])

    def valid_tokens(self, model, crops: int, tokens: int, image_size, device=None) -> torch.Tensor:
        return torch.ones(crops, tokens, dtype=torch.bool, device=device)

    def packing_layout(self, model, crops: int, tokens: int, image_size, device=None):
        """No packing: the merged tokens go in raster order, no newlines."""
        return (torch.arange(crops * tokens, device=device), torch.zeros(crops * tokens, dtype=torch.long,
                                                                          device=device), 0)

    def base_regions(self, model, crops: int, tokens: int, image_size) -> torch.Tensor:
        raise QwenInputError(f"this strategy needs AnyRes crops (a base crop and a grid to split its budget "
                             f"over); {self.label} has none: use a strategy that does not need crops")

    def visual_embeddings(self, model, image, keep_mask: torch.Tensor | None = None,
                          extra: torch.Tensor | None = None) -> KeptImage:
        """The kept merged tokens of one image with their slots (and DeepStack features), as a :class:`KeptImage`."""
        feats = image.features
        tokens = feats.shape[1]
        if keep_mask is None:
            kept_indices = torch.arange(tokens, device=feats.device)
        else:
            if keep_mask.shape != feats.shape[:2]:
                raise ValueError(f"keep mask shape {tuple(keep_mask.shape)} does not match features "
                                 f"{tuple(feats.shape[:2])}")
            kept_indices = keep_mask.to(feats.device)[0].nonzero()[:, 0]
        embeds = self.project(model, feats[:, kept_indices])[0]
        stacks = getattr(image, "deepstack", None)
        deep = None if stacks is None else [s.to(feats.device)[kept_indices] for s in stacks]
        more = None
        if extra is not None and extra.shape[0]:
            more = self.project(model, extra.to(feats.device, feats.dtype)[None])[0].to(embeds.dtype)
        return KeptImage(embeds, kept_indices, image.grid, deep, more)

    def train_forward(self, model, prompts: Sequence[Sequence[torch.Tensor]], visual: Sequence[KeptImage],
                      answers: Sequence[torch.Tensor], pad_token_id: int = 0):
        """Teacher-forced forward of one-image prompts with their answers, loss on the answer ids: what
        :meth:`generate_ids` feeds ``generate``, made differentiable (the tiny world's instruction tuning).

        ``prompts[i]`` is the (before, after) id segments around the image placeholder; ``visual[i]`` the
        image's kept tokens. As in :meth:`generate_ids`: the placeholder becomes the unpruned image's slots,
        M-RoPE positions come from ``get_rope_index`` on the whole unpruned sequence (prompt and answer),
        only kept slots stay, rows are left-padded, ``position_ids`` (4, B, L) has the mask's cumsum as row 0
        and the kept features go in through ``mm_encoder_outputs``. Returns the model's output (``.loss``)."""
        device = model.get_input_embeddings().weight.device
        rows, positions, targets, embeds, deeps = [], [], [], [], []
        for (before, after), img, answer in zip(prompts, visual, answers, strict=True):
            answer = answer.cpu().long()
            ids, pos = self._pruned_row(model, [before.cpu(), torch.cat([after.cpu(), answer])], [img])
            rows.append(ids)
            positions.append(pos)
            targets.append(torch.cat([torch.full((len(ids) - len(answer),), -100, dtype=torch.long), answer]))
            embeds.append(img.embeds.to(device))
            if img.deepstack is not None:
                deeps.append(img.deepstack)
        kwargs = left_padded(rows, positions, pad_token_id, device)
        label_ids = torch.full(kwargs["input_ids"].shape, -100, dtype=torch.long)
        for i, y in enumerate(targets):
            label_ids[i, label_ids.shape[1] - len(y):] = y
        kwargs["mm_encoder_outputs"] = {"image": self.image_outputs(embeds, deeps, device)}
        return model(**kwargs, labels=label_ids.to(device))

    def image_outputs(self, embeds: Sequence[torch.Tensor], deeps: Sequence[Sequence[torch.Tensor]], device):
        """``mm_encoder_outputs["image"]`` of a batch: every image's kept tokens and, where the family has
        them, its DeepStack features regrouped per layer (every image has them, or none does)."""
        if deeps and len(deeps) != len(embeds):
            raise ValueError("every image of a batch needs its DeepStack features, or none does")
        stacks = [[d[layer].to(device) for d in deeps] for layer in range(len(deeps[0]))] if deeps else None
        return self.encoder_output([e.to(device) for e in embeds], stacks)

    def prompt_inputs(self, model, processor, prompts: Sequence[str], visual,
                      stats: dict[str, int] | None = None) -> dict[str, Any]:
        """The model inputs of pruned prompts (what :meth:`generate_ids` hands ``generate``, and what one prefill
        forward takes): ``input_ids``, ``attention_mask``, ``position_ids`` (4, B, L) and, with images,
        ``mm_encoder_outputs``. Each prompt's image placeholders are expanded to the unpruned image's slots,
        M-RoPE positions come from ``get_rope_index`` on that, then only the kept slots stay, left-padded."""
        from ..visual import prompt_segments

        tok = processor.tokenizer
        cfg = model.config
        image_id = cfg.image_token_id
        device = model.get_input_embeddings().weight.device
        rows, positions, embeds, deeps = [], [], [], []
        for prompt, vis in zip(prompts, visual, strict=True):
            segments = prompt_segments(tok, prompt, image_id)
            images = [] if vis is None else [vis] if isinstance(vis, KeptImage) else list(vis)
            if images and len(images) != len(segments) - 1:
                raise ValueError(f"{len(images)} images for a prompt with {len(segments) - 1} image placeholders: "
                                 f"{prompt!r}")
            if not images:  # no image: the placeholders are dropped, plain 1-D positions
                ids = torch.cat([s for s in segments])
                rows.append(ids)
                positions.append(torch.arange(len(ids)).expand(3, -1))
                continue
            out_ids, out_pos = self._pruned_row(model, segments, images)
            rows.append(out_ids)
            positions.append(out_pos)
            for img in images:
                embeds.append(img.embeds if img.extra is None else torch.cat([img.embeds, img.extra]))
                if img.deepstack is not None:
                    deeps.append([d if img.extra is None else torch.cat([d, torch.zeros_like(img.extra)])
                                  for d in img.deepstack])
        width = max(len(r) for r in rows)
        if stats is not None:
            stats["padding"] = stats.get("padding", 0) + sum(width - len(r) for r in rows)
            stats["positions"] = stats.get("positions", 0) + width * len(rows)
        kwargs = left_padded(rows, positions, stop_ids(model, tok)[0], device)
        if embeds:
            kwargs["mm_encoder_outputs"] = {"image": self.image_outputs(embeds, deeps, device)}
        return kwargs

    def _pruned_row(self, model, segments: Sequence[torch.Tensor], images: Sequence[KeptImage]):
        """(ids, (3, n) M-RoPE positions) of one pruned prompt: text ``segments`` around its images, each
        image's placeholder expanded to its unpruned slots, positions from the model's ``get_rope_index`` on
        that whole sequence, then only the kept slots (each image's extra tokens after them, at its last
        slot's position). Refuses kept indices that are not increasing slots of the image."""
        cfg = model.config
        image_id = cfg.image_token_id
        device = model.get_input_embeddings().weight.device
        full, types, slot_kept = [segments[0]], [torch.zeros(len(segments[0]), dtype=torch.long)], \
            [torch.ones(len(segments[0]), dtype=torch.bool)]
        for img, seg in zip(images, segments[1:], strict=True):
            t, h, w = img.grid
            slots = t * h * w // cfg.vision_config.spatial_merge_size ** 2
            kept = torch.zeros(slots, dtype=torch.bool)
            order = img.kept_indices.cpu()
            if len(order) != len(img.embeds) or bool((order[1:] <= order[:-1]).any()) or \
                    (len(order) and not 0 <= int(order[0]) <= int(order[-1]) < slots):
                raise ValueError(f"KeptImage.kept_indices must be {len(img.embeds)} increasing slot indices in "
                                 f"[0, {slots}) (the embeds' raster order), got {order.tolist()[:8]}...")
            kept[order] = True
            full += [torch.full((slots,), image_id, dtype=torch.long), seg]
            types += [torch.ones(slots, dtype=torch.long), torch.zeros(len(seg), dtype=torch.long)]
            slot_kept += [kept, torch.ones(len(seg), dtype=torch.bool)]
        ids, kinds, kept_slots = torch.cat(full), torch.cat(types), torch.cat(slot_kept)
        grid = torch.tensor([list(img.grid) for img in images], dtype=torch.long)
        pos, _ = model.model.get_rope_index(ids[None].to(device), kinds[None].to(device),
                                            image_grid_thw=grid.to(device))
        pos = pos[:, 0].cpu()
        if any(img.extra is not None for img in images):  # contextual tokens after each image's kept slots
            return _insert_extra(ids, pos, kinds, kept_slots, images, image_id)
        return ids[kept_slots], pos[:, kept_slots]

    def generate_ids(self, model, processor, prompts: Sequence[str], visual, max_new_tokens: int = 16,
                     streamer=None, stats: dict[str, int] | None = None) -> torch.Tensor:
        """(batch, new tokens) greedy ids: ``generate`` on :meth:`prompt_inputs` (the kept features through
        ``mm_encoder_outputs``, exact M-RoPE positions)."""
        kwargs = self.prompt_inputs(model, processor, prompts, visual, stats)
        pad, eos = stop_ids(model, processor.tokenizer)
        result = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad, eos_token_id=eos, streamer=streamer)
        return result[:, kwargs["input_ids"].shape[1]:]


def left_padded(rows: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], pad: int, device) -> dict[str, Any]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` (4, B, L) of pruned rows (ids and their (3, n)
    M-RoPE positions), left-padded: row 0 of the positions is the cumsum of the mask over the pruned sequence
    (no gaps: gaps read as packed sequences), rows 1-3 the gathered M-RoPE positions."""
    width, batch = max(len(r) for r in rows), len(rows)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    rope = torch.zeros(3, batch, width, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, positions)):
        input_ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
        rope[:, i, width - len(r):] = p
    text = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
            "position_ids": torch.cat([text[None], rope]).to(device)}


def stop_ids(model, tokenizer) -> tuple[int, list[int] | None]:
    """(pad id, eos ids) for ``generate``: the model's ``generation_config`` eos ids (the hub checkpoints stop on
    ``<|im_end|>`` *and* ``<|endoftext|>``; stock ``generate`` uses both, the tokenizer names only one) plus the
    tokenizer's; pad is the tokenizer's, else the generation config's, else the first eos, else 0 (a hub
    tokenizer may have no pad token: padding is masked, so any id serves)."""
    gen = getattr(model, "generation_config", None)
    eos: list[int] = []
    for got in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        for i in ([got] if isinstance(got, int) else list(got or [])):
            if i not in eos:
                eos.append(int(i))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad), (eos or None)


def _insert_extra(ids, pos, kinds, kept_slots, images, image_id):
    """Ids and positions of a pruned prompt whose images carry extra (contextual) tokens: after each image's
    kept slots, ``extra`` more image slots at that image's last slot's 3-D position."""
    out_ids, out_pos = [], []
    n = len(ids)
    i, k = 0, 0
    while i < n:
        if kinds[i] == 1:
            j = i
            while j < n and kinds[j] == 1:
                j += 1
            span = torch.arange(i, j)
            sel = span[kept_slots[i:j]]
            out_ids.append(ids[sel])
            out_pos.append(pos[:, sel])
            extra = images[k].extra
            if extra is not None and extra.shape[0]:
                out_ids.append(torch.full((extra.shape[0],), image_id, dtype=torch.long))
                out_pos.append(pos[:, j - 1:j].expand(-1, extra.shape[0]))
            k += 1
            i = j
        else:
            out_ids.append(ids[i:i + 1])
            out_pos.append(pos[:, i:i + 1])
            i += 1
    return torch.cat(out_ids), torch.cat(out_pos, dim=1)


_PROCESSORS: dict[str, Any] = {}


def qwen_processor_class(family: QwenFamily):
    """The family's stock processor for images and text only: without the video processor (which needs
    torchvision and, missing, breaks construction). ``videos=`` is refused in one line instead of being
    silently ignored. It saves the stock layout, so a saved dir loads with ``AutoProcessor`` wherever
    torchvision is installed."""
    if family.name not in _PROCESSORS:
        from transformers.processing_utils import ProcessorMixin

        base = family.processor_base()
        label = family.label

        class ImageTextProcessor(base):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
                self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                self.vision_start_token = getattr(tokenizer, "vision_bos_token", None) or VISION_START
                self.vision_end_token = getattr(tokenizer, "vision_eos_token", None) or VISION_END
                self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
                self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

            def __call__(self, images=None, text=None, videos=None, **kwargs):
                if videos is not None:
                    raise QwenInputError(f"videos are not supported: the {label} pruning harness takes still "
                                         f"images only (got videos=)")
                return super().__call__(images=images, text=text, **kwargs)

            def to_dict(self):
                out = super().to_dict()
                out["processor_class"] = base.__name__
                return out

        ImageTextProcessor.__name__ = f"{base.__name__}ImageText"
        _PROCESSORS[family.name] = ImageTextProcessor
    return _PROCESSORS[family.name]


__all__ = ["QwenFamily", "KeptImage", "QwenInputError", "merged_grid", "check_pixels", "check_shape",
           "qwen_processor_class", "IMAGE_TOKEN", "stop_ids"]
