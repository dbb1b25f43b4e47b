"""Model presets and the one loading path for every LLaVA-NeXT model.

``tiny`` is a LLaVA-NeXT built from config with the real HF classes
(``LlavaNextForConditionalGeneration`` = CLIP vision tower + Llama LM), a
locally trained tokenizer and a ``LlavaNextProcessor`` whose AnyRes grid
pinpoints give images of different aspect ratios different crop grids.
It is saved with ``save_pretrained`` and always read back with
``from_pretrained`` -- the same code path as ``llava-hf/llava-v1.6-*`` ids.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, check, first_line
from .errors import UserError
from .families import LLAVA_NEXT, LLAVA_ONEVISION, FAMILIES, UnknownFamilyError, family_of

PRESET_VERSION = "1"  # bump when the tiny builder changes in a way that changes weights/tokenizer

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
# The tiny OneVision's tokenizer adds Qwen's chat tokens; <|im_end|> ends an answer as in Qwen2.
OV_SPECIAL_TOKENS = [*SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>", "<video>"]
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
CHAT_TEMPLATE = LLAVA_NEXT.chat_template  # the tiny NeXT presets' prompt format (vicuna)


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded. ``str(exc)`` is one line naming it and why."""


@dataclasses.dataclass(frozen=True)
class TinyPreset(Config):
    """Dimensions of the in-project tiny LLaVA-NeXT (all fields enter its hash)."""

    kind = "tiny-preset"

    name: str = "tiny"
    seed: int = 0
    crop_size: int = 64            # CLIP image_size: one AnyRes crop is crop_size x crop_size pixels
    patch_size: int = 8            # -> (64/8)^2 = 64 tokens per crop
    grid_pinpoints: tuple = ((64, 128), (128, 64), (128, 128), (64, 192), (192, 64))  # (height, width)
    vision_hidden: int = 64        # C, the feature width the selector sees
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 384
    vision_feature_layer: int = -2
    tokenizer: str = "v1"          # v2: tiny-world corpus, glyphs never merged (one token per glyph)
    version: str = PRESET_VERSION

    def validate(self) -> None:
        check(self.crop_size % self.patch_size == 0, "crop_size must be a multiple of patch_size")
        check(self.tokenizer in ("v1", "v2"), f"tokenizer must be 'v1' or 'v2', got {self.tokenizer!r}")
        check(self.vision_layers >= 2, "vision_layers must be >= 2 so vision_feature_layer=-2 is a real layer")
        for h, w in self.grid_pinpoints:
            check(h % self.crop_size == 0 and w % self.crop_size == 0,
                  f"grid pinpoint {(h, w)} is not a multiple of crop_size {self.crop_size}")

    @property
    def tokens_per_crop(self) -> int:
        return (self.crop_size // self.patch_size) ** 2

    @property
    def family(self):
        return LLAVA_NEXT


@dataclasses.dataclass(frozen=True)
class TinyOvPreset(TinyPreset):
    """Dimensions of an in-project tiny LLaVA-OneVision: a SigLIP tower (no CLS), a Qwen2 LM and
    OneVision's square grid pinpoints up to 3 x 3 crops.

    ``tiny-ov`` mirrors SigLIP-384/14's geometry in miniature: 64-px crops of 9-px patches make a
    7 x 7 grid that covers 63 of the 64 pixels, as 27 x 14 = 378 of 384 does. ``anyres_max_4``
    against a largest grid of 9 crops mirrors ``anyres_max_9`` against OneVision's 36: large
    grids are shrunk by interpolation unless that is turned off."""

    kind = "tiny-ov-preset"

    name: str = "tiny-ov"
    patch_size: int = 9
    grid_pinpoints: tuple = tuple((64 * r, 64 * c) for r in (1, 2, 3) for c in (1, 2, 3))
    vision_feature_layer: int = -1     # OneVision's: the last layer, every token ("full")
    vision_aspect_ratio: str = "anyres_max_4"
    vision_intermediate: int = 0       # 0: 4 x vision_hidden

    def validate(self) -> None:
        # SigLIP's stride-patch convolution drops remainder pixels: crop_size need not divide.
        check(self.crop_size >= self.patch_size, "crop_size must be at least patch_size")
        check(self.tokenizer in ("v1", "v2"), f"tokenizer must be 'v1' or 'v2', got {self.tokenizer!r}")
        check(self.vision_aspect_ratio.startswith("anyres_max_")
              and self.vision_aspect_ratio.removeprefix("anyres_max_").isdigit(),
              f"vision_aspect_ratio must be anyres_max_N, got {self.vision_aspect_ratio!r}")
        for h, w in self.grid_pinpoints:
            check(h % self.crop_size == 0 and w % self.crop_size == 0,
                  f"grid pinpoint {(h, w)} is not a multiple of crop_size {self.crop_size}")

    @property
    def family(self):
        return LLAVA_ONEVISION


# ``bench``: random weights, but the real model's token counts -- 336-px crops of 14-px
# patches (576 tokens per crop), llava-v1.6's grid pinpoints, so up to 5 crops (base +
# 2x2) and 2,928 visual tokens per square image -- with widths small enough that one full
# prefill takes about a second on 2 CPUs. Used by ``atr bench`` (prefill speed, selector
# overhead, extraction throughput); its outputs mean nothing.
BENCH_PRESET = TinyPreset(
    name="bench", crop_size=336, patch_size=14,
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    vision_hidden=256, vision_layers=6, vision_heads=4,
    text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=8,
)
PRESETS: dict[str, TinyPreset] = {"tiny": TinyPreset(), "bench": BENCH_PRESET, "tiny-ov": TinyOvPreset()}


@dataclasses.dataclass(frozen=True)
class SizedPreset(Config):
    """A random-init LLaVA-NeXT with exactly the dimensions of a real checkpoint, for timing on a GPU.

    Its prepare-model stage saves only the config and a processor (no weights: 14 GB of random
    numbers would mean nothing). Loading builds the model straight on the target device in the
    target dtype, seeded (:func:`materialize`); ``on_meta`` builds it on the meta device to check
    shapes and parameter counts without allocating anything. The processor's tokenizer is the tiny
    one (ids fit the real vocabulary): timings do not depend on which ids the prompt holds."""

    kind = "sized-preset"

    name: str = "bench-vicuna-7b"
    mirrors: str = "llava-hf/llava-v1.6-vicuna-7b-hf"
    text_model: str = "llama"                # llama (Vicuna), mistral, or qwen2 (OneVision)
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 32
    text_intermediate: int = 11008
    vocab_size: int = 32064
    max_position: int = 4096
    rope_theta: float = 10000.0
    vision_hidden: int = 1024                # CLIP ViT-L/14-336
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    crop_size: int = 336
    patch_size: int = 14
    grid_pinpoints: tuple = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    vision_feature_layer: int = -2
    seed: int = 0
    version: str = PRESET_VERSION

    def validate(self) -> None:
        check(self.text_model in ("llama", "mistral"), f"text_model must be llama or mistral, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")

    @property
    def tokens_per_crop(self) -> int:
        return (self.crop_size // self.patch_size) ** 2

    @property
    def family(self):
        return LLAVA_NEXT


@dataclasses.dataclass(frozen=True)
class SizedOvPreset(SizedPreset):
    """A random-init LLaVA-OneVision with the dimensions of ``llava-hf/llava-onevision-qwen2-7b-ov-hf``:
    SigLIP-so400m/14-384 (26 layers, no head, no CLS: 27 x 27 = 729 tokens per crop), Qwen2-7B
    (GQA 28/4), its 36 grid pinpoints and ``anyres_max_9``."""

    kind = "sized-ov-preset"

    name: str = "bench-ov-7b"
    mirrors: str = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    text_model: str = "qwen2"
    text_hidden: int = 3584
    text_layers: int = 28
    text_heads: int = 28
    text_kv_heads: int = 4
    text_intermediate: int = 18944
    vocab_size: int = 152128
    max_position: int = 32768
    rope_theta: float = 1000000.0
    vision_hidden: int = 1152
    vision_layers: int = 26
    vision_heads: int = 16
    vision_intermediate: int = 4304
    crop_size: int = 384
    patch_size: int = 14
    grid_pinpoints: tuple = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))
    vision_feature_layer: int = -1
    vision_aspect_ratio: str = "anyres_max_9"
    image_token_index: int = 151646

    def validate(self) -> None:
        check(self.text_model == "qwen2", f"a OneVision sized preset has a qwen2 LM, got {self.text_model!r}")
        check(self.text_heads % self.text_kv_heads == 0, "text_heads must be a multiple of text_kv_heads")

    @property
    def family(self):
        return LLAVA_ONEVISION


SIZED_PRESETS: dict[str, SizedPreset] = {
    "bench-vicuna-7b": SizedPreset(),
    "bench-mistral-7b": SizedPreset(name="bench-mistral-7b", mirrors="llava-hf/llava-v1.6-mistral-7b-hf",
                                    text_model="mistral", text_kv_heads=8, text_intermediate=14336,
                                    max_position=32768, rope_theta=1000000.0),
    "bench-ov-7b": SizedOvPreset(),
}
SIZED_MARKER = "atr_sized_preset.json"  # in a model dir: no weights, materialize SizedPreset on load
# Presets whose weights are trained in-project (pipeline.tinyworld); built by the prepare-model stage.
TRAINED_PRESETS = ("tiny-trained", "tiny-ov-trained")


def _tokenizer_corpus(seed: int, version: str = "v1", n: int = 4000, family=LLAVA_NEXT) -> list[str]:
    """Text the tiny tokenizer is trained on: prompts, glyph codes and colour/shape words.

    v2 is the tiny world's corpus: its two questions and every colour word, with
    glyphs always space-separated so BPE never merges two glyphs -- an answer
    code is then one token per glyph, which a 2-layer LM can copy. Lines follow the
    family's prompt format (vicuna for NeXT, Qwen's ``<|im_start|>`` for OneVision)."""
    rng = random.Random(seed)
    if family is LLAVA_NEXT:
        line = "USER: {image}{text} ASSISTANT: {answer}"
    else:
        line = "<|im_start|>user {image}{text}<|im_end|>\n<|im_start|>assistant\n {answer}<|im_end|>"
    if version == "v2":
        from .synthetic import COLOURS, OCR_QUESTION, SCENE_QUESTION

        lines = []
        for _ in range(n):
            q = rng.choice([OCR_QUESTION, SCENE_QUESTION])
            ans = " ".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 3))) if q == OCR_QUESTION \
                else rng.choice(list(COLOURS))
            lines.append(line.format(image=IMAGE_TOKEN + "\n", text=q, answer=ans))
        return lines
    words = ("what is written in the image ? answer with the text . which colour is the large shape ? "
             "red green blue yellow orange purple cyan magenta black white grey brown pink "
             "square circle triangle rectangle ellipse the a of and question answer user assistant").split()
    lines = []
    for _ in range(n):
        code = "".join(rng.choice(GLYPHS) for _ in range(rng.randint(1, 4)))
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
        lines.append(line.format(image=IMAGE_TOKEN + " ", text=sentence, answer=code))
    return lines


def build_tokenizer(preset: TinyPreset):
    """Train a small BPE tokenizer locally (no download) and wrap it as a fast HF tokenizer.

    A OneVision preset's tokenizer also knows Qwen's chat tokens and ends answers with
    ``<|im_end|>``, as Qwen2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ov = preset.family is LLAVA_ONEVISION
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=OV_SPECIAL_TOKENS if ov else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(preset.seed, preset.tokenizer, family=preset.family), trainer=trainer)
    extra = {"image_token": IMAGE_TOKEN, "video_token": "<video>"} if ov else {"image_token": IMAGE_TOKEN}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>", bos_token=None if ov else "<s>", eos_token="<|im_end|>" if ov else "</s>",
        pad_token="<pad>",
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=4096,
    )


def _vision_config(family, *, hidden: int, intermediate: int, layers: int, heads: int, image_size: int,
                   patch_size: int, projection_dim: int | None = None, hidden_act: str | None = None):
    """The tower config of a family: CLIP (with CLS) for NeXT, SigLIP without head for OneVision."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if family is LLAVA_ONEVISION:
        return SiglipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                                  vision_use_head=False)
    kw = {"hidden_act": hidden_act} if hidden_act else {}
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            projection_dim=projection_dim or hidden, **kw)


def _llava_config(family, vision, text, image_token_id: int, pinpoints, feature_layer: int,
                  aspect: str | None = None):
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    common = dict(vision_config=vision, text_config=text, image_token_index=image_token_id,
                  image_grid_pinpoints=[list(p) for p in pinpoints], vision_feature_layer=feature_layer,
                  projector_hidden_act="gelu")
    if family is LLAVA_ONEVISION:
        return LlavaOnevisionConfig(**common, vision_feature_select_strategy="full",
                                    vision_aspect_ratio=aspect or "anyres_max_9")
    return LlavaNextConfig(**common, vision_feature_select_strategy="default")


def _image_processor(family, crop: int, pinpoints):
    pins = [list(p) for p in pinpoints]
    if family is LLAVA_ONEVISION:
        return family.image_processor_class()(size={"height": crop, "width": crop}, image_grid_pinpoints=pins)
    return family.image_processor_class()(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                          image_grid_pinpoints=pins)


def _processor(family, image_processor, tokenizer, patch_size: int, aspect: str | None = None):
    if family is LLAVA_ONEVISION:
        return family.processor(image_processor, tokenizer, IMAGE_TOKEN, patch_size, family.chat_template,
                                vision_aspect_ratio=aspect or "anyres_max_9")
    return family.processor(image_processor, tokenizer, IMAGE_TOKEN, patch_size, family.chat_template)


def build_tiny(preset: TinyPreset):
    """Build (model, processor) for ``preset`` with seeded random weights (its family's HF classes)."""
    import torch
    from transformers import LlamaConfig, Qwen2Config

    family = preset.family
    ov = family is LLAVA_ONEVISION
    tokenizer = build_tokenizer(preset)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = _vision_config(family, hidden=preset.vision_hidden,
                            intermediate=(getattr(preset, "vision_intermediate", 0) or 4 * preset.vision_hidden),
                            layers=preset.vision_layers, heads=preset.vision_heads, image_size=preset.crop_size,
                            patch_size=preset.patch_size)
    text_cls = Qwen2Config if ov else LlamaConfig
    text = text_cls(
        vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=4 * preset.text_hidden,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    aspect = getattr(preset, "vision_aspect_ratio", None)
    config = _llava_config(family, vision, text, image_token_id, preset.grid_pinpoints, preset.vision_feature_layer,
                           aspect)
    torch.manual_seed(preset.seed)
    model = family.model_class()(config).eval()
    processor = _processor(family, _image_processor(family, preset.crop_size, preset.grid_pinpoints), tokenizer,
                           preset.patch_size, aspect)
    return model, processor


def sized_config(preset: SizedPreset, image_token_id: int):
    """The LLaVA config of a sized preset (the real checkpoint's dimensions, its family's classes)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    family = preset.family
    vision = _vision_config(family, hidden=preset.vision_hidden, intermediate=preset.vision_intermediate,
                            layers=preset.vision_layers, heads=preset.vision_heads, image_size=preset.crop_size,
                            patch_size=preset.patch_size, projection_dim=768, hidden_act="quick_gelu")
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[preset.text_model]
    text = text_cls(vocab_size=preset.vocab_size, hidden_size=preset.text_hidden,
                    intermediate_size=preset.text_intermediate, num_hidden_layers=preset.text_layers,
                    num_attention_heads=preset.text_heads, num_key_value_heads=preset.text_kv_heads,
                    max_position_embeddings=preset.max_position, rope_theta=preset.rope_theta,
                    tie_word_embeddings=False)
    return _llava_config(family, vision, text, image_token_id, preset.grid_pinpoints, preset.vision_feature_layer,
                         getattr(preset, "vision_aspect_ratio", None))


def on_meta(preset: SizedPreset):
    """The sized model built on the meta device: shapes and parameter counts, no memory."""
    import torch

    token = getattr(preset, "image_token_index", 32000)
    with torch.device("meta"):
        return preset.family.model_class()(sized_config(preset, image_token_id=token)).eval()


def save_sized(preset: SizedPreset, out_dir: Path) -> None:
    """config.json, the processor and the marker: everything but weights."""
    import json

    family = preset.family
    tiny = TinyOvPreset() if family is LLAVA_ONEVISION else TinyPreset()
    tokenizer = build_tokenizer(tiny)
    config = sized_config(preset, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    config.text_config.bos_token_id, config.text_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    config.save_pretrained(out_dir)
    _processor(family, _image_processor(family, preset.crop_size, preset.grid_pinpoints), tokenizer,
               preset.patch_size, getattr(preset, "vision_aspect_ratio", None)).save_pretrained(out_dir)
    (out_dir / SIZED_MARKER).write_text(json.dumps({"family": family.name, **preset.to_dict()}, indent=2,
                                                   sort_keys=True) + "\n")


def _sized_from_marker(model_dir: Path) -> SizedPreset:
    import json

    data = json.loads((Path(model_dir) / SIZED_MARKER).read_text())
    family = data.pop("family", LLAVA_NEXT.name)
    return (SizedOvPreset if family == LLAVA_ONEVISION.name else SizedPreset).from_dict(data)


def materialize(model_dir: Path, device: str, dtype: str, allow_cpu: bool = False):
    """(model, processor) of a sized preset's dir: random weights (seeded) built directly on ``device``
    in ``dtype``. A CPU is refused in one line unless ``allow_cpu``."""
    import torch
    from transformers import AutoConfig

    preset = _sized_from_marker(model_dir)
    if not device.startswith("cuda") and not allow_cpu:
        n = sum(p.numel() for p in on_meta(preset).parameters())
        raise ModelLoadError(f"{preset.name} has {n / 1e9:.1f} B parameters ({n * 2 / 2**30:.0f} GiB in bf16): it is "
                             f"for timing on a CUDA device; on the CPU pass --allow-cpu (atr bench) to run it anyway")
    config = AutoConfig.from_pretrained(model_dir)
    before = torch.get_default_dtype()
    torch.manual_seed(preset.seed)
    try:
        torch.set_default_dtype(getattr(torch, dtype))
        with torch.device(device):
            model = preset.family.model_class()(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval(), load_processor(model_dir, preset.family)


def save_tiny(preset: TinyPreset, out_dir: Path) -> None:
    """Build the preset and ``save_pretrained`` model + processor into ``out_dir``."""
    model, processor = build_tiny(preset)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def resolve_hub_snapshot(repo_id: str) -> tuple[Path, str]:
    """Local snapshot dir and commit of a hub model, from the HF cache or a download.

    Honors ``HF_HUB_OFFLINE``; with no network and no cached copy this raises one
    clear ``ModelLoadError`` line instead of a chain of HTTP tracebacks.
    """
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(snapshot_download(repo_id, local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - hub errors are many; all end in one line
        why = "offline (HF_HUB_OFFLINE=1) and not in the local Hugging Face cache" if offline else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'download failed'}"
        raise ModelLoadError(f"cannot load model {repo_id!r}: {why}") from None
    return path, path.name


def load_processor(model_dir: str | os.PathLike, family=None):
    """The processor of a model dir (PIL backend: no torchvision). A OneVision dir is read without its
    video processor (``LlavaOnevisionProcessor`` cannot be built without one, and that needs torchvision)."""
    from transformers import AutoProcessor

    if family is None:
        family = family_of(_read_config(Path(model_dir)))
    if family is LLAVA_ONEVISION:
        return family.load_processor(model_dir)
    return AutoProcessor.from_pretrained(model_dir, backend="pil")


def _read_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu", allow_cpu: bool = False):
    """``from_pretrained`` the model (its family's class: LLaVA-NeXT or LLaVA-OneVision) and its
    processor (PIL backend) from a local dir (a sized preset's dir: :func:`materialize`)."""
    import torch

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    if (model_dir / SIZED_MARKER).is_file():
        return materialize(model_dir, device, dtype, allow_cpu)
    family = _family_of_dir(model_dir)
    try:
        # safetensors only: a folder holding just pytorch_model.bin is refused, never torch.load-ed.
        model = family.model_class().from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        processor = load_processor(model_dir, family)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None
    return model.to(device).eval(), processor


def _family_of_dir(model_dir: Path):
    cfg = _read_config(model_dir)
    try:
        return family_of(cfg)
    except UnknownFamilyError as exc:
        raise ModelLoadError(f"cannot use model from {model_dir}: {exc}") from None


def load_model_config(model_dir: str | os.PathLike):
    """``from_pretrained`` only the config of a LLaVA-NeXT / LLaVA-OneVision model dir (cheap: no weights)."""
    model_dir = Path(model_dir)
    _family_of_dir(model_dir)
    return _read_config(model_dir)


def describe(model_or_config) -> dict[str, Any]:
    """Facts about a model (or its config) that downstream stages record (``Family.describe``)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return family_of(cfg).describe(cfg)


def unknown_model_message(spec: str) -> str:
    return (f"unknown model {spec!r}: use a preset ({', '.join([*TRAINED_PRESETS, *PRESETS, *SIZED_PRESETS])}), "
            f"a local directory "
            f"with config.json, or a Hugging Face id such as llava-hf/llava-v1.6-mistral-7b-hf")


_LOADED: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def cached_model(model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                 allow_cpu: bool = False):
    """(model, processor) of ``model_dir`` on ``device`` in ``dtype`` (resolved names; None: the
    defaults of ``pipeline.device``), loaded once per process (``allow_cpu``: a sized preset may
    materialize on the CPU).

    Shard and chunk tasks of one process share it; loading another model drops the previous one."""
    from .device import default_device

    if device is None or dtype is None:
        device, dtype = default_device()
    key = (str(model_dir), device, dtype)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_model(key[0], dtype=dtype, device=device, allow_cpu=allow_cpu)
    return _LOADED[key]


def check_processor(model_dir: str | os.PathLike, name: str) -> None:
    """Load only the processor of ``model_dir`` (a user's model is checked this far, not its weights)."""
    try:
        load_processor(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the processor of {name}: {first_line(exc)}") from None


__all__ = ["TinyPreset", "TinyOvPreset", "SizedOvPreset", "load_processor", "FAMILIES", "PRESETS", "SizedPreset", "SIZED_PRESETS", "SIZED_MARKER", "sized_config", "on_meta",
           "save_sized", "materialize", "ModelLoadError", "ConfigError", "build_tiny", "save_tiny", "load_model",
           "resolve_hub_snapshot", "is_hub_id", "describe", "load_model_config", "cached_model", "check_processor"]
