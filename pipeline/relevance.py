"""CDPruner's instruction relevance: how much each visual token has to do with the question.

As in CDPruner's reference code (Theia-4869/CDPruner, ``clip_encoder.py`` and
``llava_arch.py``): the image side is the feature layer's hidden state (their
``feature_select``: ``hidden_states[mm_vision_select_layer]``, layer -2 on LLaVA-NeXT, patch tokens)
after the tower's ``post_layernorm``, mapped by a CLIP ``visual_projection``; the text side is the
question through the CLIP text tower (``text_embeds``), cut into 77-token
segments, one pooled embedding per segment. Both are L2-normalized;

    relevance = mean over segments of -(image_embeds @ text_embeds.T)
    relevance = (relevance - min + 1e-6) / (max - min)      over the whole image

(their negation and min-max normalization, kept as they ship it). The text
tower comes from ``--text-encoder``: a ``CLIPModel`` checkpoint (a hub id such
as ``openai/clip-vit-large-patch14-336``, LLaVA-NeXT's own tower, or a local
``save_pretrained`` folder), whose ``visual_projection`` must take the model's
tower width.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError

CDPRUNER_SUFFIX = "\nAnswer the question using a single word or phrase."  # their loader strips it from the question
UNCONDITIONED = ("cdpruner: no --text-encoder given, so this is the unconditioned DPP (CDPruner's DPPruner "
                 "ablation: relevance 1 for every token)")


class TextRelevance:
    """A CLIP text tower and visual projection, loaded once: :meth:`relevance` per (image, question)."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))
        self._text: dict[str, torch.Tensor] = {}

    @property
    def vision_width(self) -> int:
        return int(self.model.visual_projection.in_features)

    @torch.no_grad()
    def text_embeds(self, question: str) -> torch.Tensor:
        """(segments, P) L2-normalized text embeddings of ``question`` (their 77-token segments)."""
        question = question.replace(CDPRUNER_SUFFIX, "")
        if question not in self._text:
            ids = self.tokenizer(question, add_special_tokens=True, truncation=False)["input_ids"]
            n = self.max_length
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            segments = [ids[i:i + n] for i in range(0, max(1, len(ids)), n)]
            batch = torch.tensor([s + [pad] * (n - len(s)) for s in segments])
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in segments])
            param = next(self.model.parameters())
            out = self.model.get_text_features(input_ids=batch.to(param.device), attention_mask=mask.to(param.device))
            out = getattr(out, "pooler_output", out)
            self._text[question] = torch.nn.functional.normalize(out.float(), dim=-1)
        return self._text[question]

    @torch.no_grad()
    def relevance(self, last_hidden: torch.Tensor, question: str) -> torch.Tensor:
        """(crops, L) relevance of every token of one image (``last_hidden``: the tower's post-norm feature
        layer (CLS dropped), (crops, L, C')) to ``question``."""
        if last_hidden.shape[-1] != self.vision_width:
            raise ConfigError(f"--text-encoder {self.name}: its visual_projection takes width {self.vision_width}, "
                              f"but the model's vision tower gives {last_hidden.shape[-1]}")
        proj = self.model.visual_projection
        image = torch.nn.functional.normalize(proj(last_hidden.to(proj.weight.device, proj.weight.dtype)).float(),
                                              dim=-1)
        text = self.text_embeds(question).to(image.device)
        rel = (-(image @ text.T)).mean(dim=-1)
        return (rel - rel.min() + 1e-6) / (rel.max() - rel.min())


_LOADED: dict[tuple[str, str], TextRelevance] = {}


def load_text_encoder(spec: str, expect_width: int | None = None, device: str = "cpu") -> TextRelevance:
    """The ``--text-encoder`` CLIP model (local folder or hub id, offline-aware), loaded once per process;
    one line when it does not load or its visual projection does not take ``expect_width``."""
    if (spec, device) not in _LOADED:
        _LOADED.clear()
        _LOADED[(spec, device)] = _load(spec, device)
    rel = _LOADED[(spec, device)]
    if expect_width is not None and rel.vision_width != expect_width:
        raise ConfigError(f"--text-encoder {spec}: its visual_projection takes width {rel.vision_width}, but the "
                          f"model's vision tower gives {expect_width}")
    return rel


def _load(spec: str, device: str) -> TextRelevance:
    from transformers import AutoTokenizer, CLIPModel

    from .config import first_line
    from .loading import is_hub_id, resolve_hub_snapshot

    path = Path(spec).expanduser()
    if not path.is_dir():
        if is_hub_id(spec):
            try:
                path, _ = resolve_hub_snapshot(spec)
            except Exception as exc:  # noqa: BLE001 - one line whatever the hub says
                raise ConfigError(f"--text-encoder {spec}: {first_line(exc)}") from None
        else:
            raise ConfigError(f"--text-encoder {spec}: not a directory with a CLIP checkpoint, nor a hub id")
    try:
        model = CLIPModel.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--text-encoder {spec}: cannot load a CLIP model: {first_line(exc)}") from None
    return TextRelevance(model.to(device), tokenizer, spec)


def text_encoder_fingerprint(spec: str) -> str:
    """What a cached cdpruner result remembers of its text encoder: the folder's files (name, size, mtime)."""
    import hashlib

    from .loading import is_hub_id, resolve_hub_snapshot

    path = Path(spec).expanduser()
    h = hashlib.sha256(spec.encode())
    if not path.is_dir() and is_hub_id(spec):
        path, commit = resolve_hub_snapshot(spec)
        h.update(commit.encode())
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


__all__ = ["TextRelevance", "load_text_encoder", "text_encoder_fingerprint", "UNCONDITIONED", "CDPRUNER_SUFFIX"]
