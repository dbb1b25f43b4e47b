"""The family interface: what pruned inference, extraction, FLOPs and the tiny presets need to know
about a model.

Every method or capability a family must answer is abstract here (``abc``): a family module that
leaves one out cannot be instantiated, so it fails at import, not halfway through a run. Defaults
(``load_processor``, ``max_crops``, the interpolation hooks, ``text_config_class``) are the
LLaVA-NeXT behaviour, which a family overrides where it differs.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping, NamedTuple

from ..errors import UserError


class UnknownFamilyError(UserError, ValueError):
    """A ``model_type`` that no family handles. ``str(exc)`` is one line listing the supported ones."""


class InterpolatedGridError(UserError, ValueError):
    """A keep mask asked to go through a grid the model shrinks by interpolation (one line)."""


class VisualTokens(NamedTuple):
    """The visual tokens one image sends the LLM: ``features`` (encoder tokens: base crop plus the packed
    grid) and ``newlines`` (row-newline embeddings); ``total`` is their sum."""

    features: int
    newlines: int

    @property
    def total(self) -> int:
        return self.features + self.newlines


# The capabilities (class attributes) every family declares in its own class body: callers ask these
# instead of comparing family names (tests/test_families.py checks every family answers each).
CAPABILITIES = ("can_interpolate", "multi_image_anyres", "has_crops", "own_runtime")


class Family(abc.ABC):
    """One LLaVA model family. Methods take the LLaVA config (``model.config``) so they work on a
    config alone (a 7B on the meta device, a checkpoint's ``config.json``)."""

    name = ""          # short id used in presets, the SQL store and plots ("llava-next")
    label = ""         # human name ("LLaVA-NeXT")
    model_type = ""    # transformers model_type of the LLaVA config
    tower = ""         # the vision tower (for messages)
    chat_template = ""  # the tiny presets' chat template (the real checkpoints ship their own)

    # ------------------------------------------------------------- capabilities
    @property
    @abc.abstractmethod
    def can_interpolate(self) -> bool:
        """Can ``pack_image_features`` shrink a large grid (then pruning must turn that off)? A class
        attribute in each family; :meth:`interpolation` says whether a given config does."""

    @property
    @abc.abstractmethod
    def multi_image_anyres(self) -> bool:
        """Does each image of a several-image prompt get its own AnyRes grid (base crop + grid)? False:
        the model sends such images as base views only, which the pruning harness does not model."""

    # LLaVA families send AnyRes crops (a base crop plus a grid); HiRED splits its budget over them.
    has_crops = True
    # False: pruned inference is ``pipeline.prune``'s LLaVA code (crops, packing, spliced ``inputs_embeds``).
    # True: the family brings its own (``encode_images``, ``visual_embeddings``, ``project``, ``valid_tokens``,
    # ``packing_layout``, ``base_regions``, ``generate_ids`` with ``pipeline.prune``'s signatures, which
    # dispatch to them; and ``prompt_inputs``, the model inputs of pruned prompts that ``generate_ids`` hands
    # ``generate``, which ``atr speed`` times one prefill forward of): Qwen-VL's dynamic grids, M-RoPE positions
    # and DeepStack.
    own_runtime = False

    # ------------------------------------------------------------- classes
    @abc.abstractmethod
    def model_class(self):
        """The ``*ForConditionalGeneration`` class."""

    @abc.abstractmethod
    def image_processor_class(self):
        """The PIL-backend image processor (no torchvision needed)."""

    @abc.abstractmethod
    def processor(self, image_processor, tokenizer, image_token: str, patch_size: int, aspect: str | None = None):
        """The stock processor built from its parts with :attr:`chat_template` (tiny and sized presets).
        ``aspect``: the ``vision_aspect_ratio`` of a family that interpolates (None: its stock one)."""

    @staticmethod
    def saved_parts(model_dir):
        """(image-processor dir, tokenizer, chat template) of a saved dir, for a family that builds its processor
        from parts (no video processor): the template from ``chat_template.jinja``, else ``chat_template.json``,
        else the tokenizer's."""
        import json
        from pathlib import Path

        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        template = None
        if (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        elif (model_dir / "chat_template.json").is_file():
            template = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
        return model_dir, tokenizer, template or getattr(tokenizer, "chat_template", None)

    def load_processor(self, model_dir):
        """The processor of a saved model dir (PIL backend: no torchvision)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir, backend="pil")

    # The checkpoint key prefixes of the vision tower's tensors: transformers 5.x's save layout, then the
    # llava-hf hub layout (pipeline.loading.load_vision_tower reads only these).
    tower_prefixes = ("model.vision_tower.", "vision_tower.")

    def build_vision_tower(self, cfg):
        """The vision tower module alone, built from ``cfg.vision_config`` as the whole model builds its
        ``model.vision_tower`` (LLaVA-NeXT and OneVision: ``AutoModel.from_config``; CLIP or SigLIP)."""
        from transformers import AutoModel

        return AutoModel.from_config(cfg.vision_config)

    def tower_of(self, model):
        """The vision tower module of a whole model (the one :meth:`build_vision_tower` builds alone)."""
        return model.model.vision_tower

    # ------------------------------------------------------------- tiny and sized presets (pipeline.builders)
    @property
    @abc.abstractmethod
    def tiny_text_model(self) -> str:
        """The tiny presets' LM, a key of :meth:`text_config_class` (a class attribute in each family)."""

    @property
    @abc.abstractmethod
    def corpus_line(self) -> str:
        """One line of the tiny tokenizer's corpus in the family's prompt format, with ``{image}``,
        ``{text}`` and ``{answer}`` fields (a class attribute in each family)."""

    @abc.abstractmethod
    def tokenizer_tokens(self, image_token: str) -> dict[str, Any]:
        """The tiny tokenizer's special tokens: ``special`` (the list BPE training reserves, in id
        order, after ``<unk> <s> </s> <pad>`` and ``image_token``), ``bos``, ``eos`` and ``extra``
        (``extra_special_tokens`` of the HF tokenizer)."""

    @abc.abstractmethod
    def vision_config(self, *, hidden: int, intermediate: int, layers: int, heads: int, image_size: int,
                      patch_size: int, projection_dim: int | None = None, hidden_act: str | None = None,
                      **fields: Any):
        """The vision tower's config with these dimensions. ``fields``: further fields of the tower's config that
        a sized preset records (``SizedPreset.vision_fields``: Qwen2.5-VL's full-attention blocks and window,
        Qwen3-VL's DeepStack blocks); a family without such fields takes none."""

    def text_config_class(self, text_model: str):
        """The config class of an LM (``llama``, ``mistral``, ``qwen2``)."""
        from transformers import LlamaConfig, MistralConfig, Qwen2Config

        return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text_model]

    def text_kwargs(self, hidden: int, heads: int, **given: Any) -> dict[str, Any]:
        """Family-specific LM config fields of a preset with this width and head count (Qwen-VL: M-RoPE).
        ``given``: a sized preset's own values of them (``SizedPreset.text_fields``; Qwen-VL: ``rope_theta``,
        ``mrope_section``), which replace the ones derived from the width."""
        return {}

    def finish_config(self, config, tokenizer) -> None:
        """Set the config's ids of the tokenizer's family-specific tokens (Qwen-VL: vision start/end, video)."""

    @abc.abstractmethod
    def llava_config(self, vision, text, image_token_id: int, pinpoints, feature_layer: int,
                     aspect: str | None = None):
        """The model's config from its tower and LM configs (``aspect`` as in :meth:`processor`)."""

    @abc.abstractmethod
    def build_image_processor(self, crop: int, pinpoints):
        """The PIL image processor for ``crop``-pixel crops and these grid pinpoints (height, width)."""

    def preset_image_processor(self, preset):
        """The image processor of a tiny, sized or shape preset (LLaVA: its crop size and pinpoints)."""
        return self.build_image_processor(preset.crop_size, preset.grid_pinpoints)

    def note_processor(self, model, processor) -> None:
        """Record on the model what token counts need from the processor (nothing for LLaVA)."""

    # ------------------------------------------------------------- token geometry
    @abc.abstractmethod
    def has_cls(self, cfg) -> bool:
        """Does the tower put a CLS token in front of the patch tokens?"""

    def side(self, cfg) -> int:
        """Tokens per crop side: ``image_size // patch_size`` (SigLIP-384/14: 27, covering 378 px)."""
        return cfg.vision_config.image_size // cfg.vision_config.patch_size

    def covered(self, cfg) -> float:
        """Share of each crop side the token grid covers (CLIP-336/14: 1.0; SigLIP-384/14: 378/384):
        the tower's stride-``patch_size`` convolution drops the remainder pixels."""
        v = cfg.vision_config
        return self.side(cfg) * v.patch_size / v.image_size

    def cls_in_features(self, cfg) -> bool:
        """Does the projector input keep a CLS token (a CLIP tower with the ``full`` select strategy)?"""
        return self.has_cls(cfg) and cfg.vision_feature_select_strategy == "full"

    def tokens_per_crop(self, cfg) -> int:
        """L: tokens per crop the projector receives."""
        return self.side(cfg) ** 2 + int(self.cls_in_features(cfg))

    def max_crops(self, cfg) -> int:
        """The largest grid (rows x cols) among the pinpoints."""
        crop = cfg.vision_config.image_size
        return max((h // crop) * (w // crop) for h, w in cfg.image_grid_pinpoints)

    # ------------------------------------------------------------- packing
    @abc.abstractmethod
    def pack(self, inner, features: list, image_sizes, image_newline, cfg, aspect: str | None = None) -> list:
        """The model's own ``pack_image_features`` (base crop, unpadded grid, row newlines). ``aspect``
        overrides OneVision's ``vision_aspect_ratio`` for this call (the config is never mutated)."""

    def interpolation(self, cfg) -> bool:
        """Does the model shrink large grids by interpolation as configured now?"""
        return False

    def off_value(self, cfg) -> str | None:
        """The public config value that turns interpolation off (None: the family never interpolates)."""
        return None

    def set_interpolation(self, model, processor, on: bool) -> None:
        """Turn the family's grid interpolation on (the checkpoint's setting) or off, through public config."""

    def stock_config(self, model, processor) -> dict[str, Any]:
        """The public config values :meth:`set_interpolation` changes, as the checkpoint ships them."""
        return {}

    # ------------------------------------------------------------- token counts from geometry
    def visual_tokens(self, cfg, image_size: tuple[int, int], aspect: str | None = None) -> VisualTokens:
        """What ``pack_image_features`` sends the LLM for one image of ``image_size`` (height, width), from
        geometry alone (no weights: works on a config or a meta-device model): the base crop, then the grid
        of the best pinpoint, unpadded as HF's ``unpad_image`` does, shrunk where :meth:`shrink` says
        (``aspect``: OneVision's ``vision_aspect_ratio`` for this count; None: the config's), one newline
        per grid row. ``tests/test_stock_budget.py`` checks it against the model's own packing."""
        from transformers.image_processing_utils import select_best_resolution

        h, w = int(image_size[0]), int(image_size[1])
        crop, side = cfg.vision_config.image_size, self.side(cfg)
        best_h, best_w = select_best_resolution((h, w), [list(p) for p in cfg.image_grid_pinpoints])
        rows, cols = unpadded_grid((best_h // crop) * side, (best_w // crop) * side, h, w)
        rows, cols = self.shrink(cfg, rows, cols, aspect)
        return VisualTokens(self.tokens_per_crop(cfg) + rows * cols, rows)

    def shrink(self, cfg, rows: int, cols: int, aspect: str | None = None) -> tuple[int, int]:
        """The (rows, cols) of an unpadded token grid after the family's interpolation (NeXT: none)."""
        return rows, cols

    def stock_tokens(self, cfg, image_size: tuple[int, int], stock: Mapping[str, Any] | None = None) -> VisualTokens:
        """:meth:`visual_tokens` under the stock settings: ``stock`` is :meth:`stock_config` (the checkpoint's
        own values, which eval's :meth:`set_interpolation` may have changed on the live config); None: ``cfg``
        as it is. What the stock HF model feeds its LLM for the image."""
        return self.visual_tokens(cfg, image_size, (stock or {}).get("vision_aspect_ratio"))

    # ------------------------------------------------------------- cost model
    def flops_dims(self, cfg):
        from ..flops import LlavaNextDims

        return LlavaNextDims.from_config(cfg, cls_token=self.has_cls(cfg))

    def describe(self, cfg) -> dict[str, Any]:
        """Facts recorded by the prepare-model stage."""
        vis = cfg.vision_config
        out = {"family": self.name, "model_type": cfg.model_type, "vision_model_type": vis.model_type,
               "vision_hidden": vis.hidden_size, "crop_size": vis.image_size, "patch_size": vis.patch_size,
               "tokens_per_crop": self.tokens_per_crop(cfg), "has_cls": self.has_cls(cfg),
               "vision_feature_layer": cfg.vision_feature_layer,
               "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
               "grid_pinpoints": cfg.image_grid_pinpoints, "text_model_type": cfg.text_config.model_type,
               "text_hidden": cfg.text_config.hidden_size, "text_layers": cfg.text_config.num_hidden_layers}
        return out

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def unpadded_grid(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of a ``rows`` x ``cols`` token grid after HF's ``unpad_image`` for an image of
    ``height`` x ``width`` pixels: the rows (or columns) that only cover canvas padding are cut, with
    HF's own arithmetic (``int(round(x, 7))``, padding split in two halves)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - new) // 2), cols
    new = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - new) // 2)
