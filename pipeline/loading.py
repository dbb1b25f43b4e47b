"""The one loading path for every model: ``from_pretrained`` from a local dir (its family's classes),
hub ids resolved to a local snapshot, sized presets materialized on their device, and the
process-wide model cache that shard and chunk tasks share.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from .builders import SIZED_MARKER, on_meta
from .config import first_line
from .errors import UserError
from .families import DEFAULT_FAMILY, UnknownFamilyError, family_of
from .memory import check_fits, checkpoint_params, element_bytes, format_bytes, read_safetensors_header
from .presets import SizedPreset, sized_preset_from_dict


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded. ``str(exc)`` is one line naming it and why."""


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


def _sized_from_marker(model_dir: Path) -> SizedPreset:
    import json

    data = json.loads((Path(model_dir) / SIZED_MARKER).read_text())
    family = data.pop("family", DEFAULT_FAMILY)  # a marker written before OneVision names none
    return sized_preset_from_dict(data, family)


def materialize(model_dir: Path, device: str, dtype: str, allow_cpu: bool = False):
    """(model, processor) of a sized preset's dir: random weights (seeded) built directly on ``device``
    in ``dtype``. A CPU is refused in one line unless ``allow_cpu``."""
    import torch
    from transformers import AutoConfig

    preset = _sized_from_marker(model_dir)
    n = sum(p.numel() for p in on_meta(preset).parameters())  # meta device: counted, nothing allocated
    nbytes = n * element_bytes(dtype)
    if not device.startswith("cuda") and not allow_cpu:
        raise ModelLoadError(f"{preset.name} has {n / 1e9:.1f} B parameters ({format_bytes(nbytes)} in {dtype}): "
                             f"it is for timing on a CUDA device; on the CPU pass --allow-cpu (atr speed) to run "
                             f"it anyway")
    # ``--dtype auto`` stays float32 on the CPU for a sized preset too (a 7B preset: 28 GiB), by the one rule
    # of pipeline.device: auto depends on the device alone, never on the model or the CPU's instruction set,
    # so a recorded dtype is predictable from the flags. bf16 halves the bytes and, on a CPU with AMX /
    # AVX512-BF16 (this machine), ran a 512x4096x4096 matmul 5.9x faster than fp32 on one thread; on CPUs
    # without them PyTorch emulates bf16 and is slower than fp32. The memory check below names --dtype bf16
    # when fp32 does not fit (docs/performance.md).
    check_fits(preset.name, n, nbytes, dtype, device)
    config = AutoConfig.from_pretrained(model_dir)
    before = torch.get_default_dtype()
    torch.manual_seed(preset.seed)
    try:
        torch.set_default_dtype(getattr(torch, dtype))
        with torch.device(device):
            model = preset.family.model_class()(config)
    finally:
        torch.set_default_dtype(before)
    processor = load_processor(model_dir, preset.family)
    preset.family.note_processor(model, processor)  # Qwen-VL: token counts follow the processor's pixel limits
    return model.eval(), processor


def load_processor(model_dir: str | os.PathLike, family=None):
    """The processor of a model dir, as its family reads it (``Family.load_processor``; PIL backend: no
    torchvision). ``family``: None reads it from the dir's config."""
    family = family or family_of(_read_config(Path(model_dir)))
    return family.load_processor(model_dir)


def _read_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu", allow_cpu: bool = False):
    """``from_pretrained`` the model (its family's class: LLaVA-NeXT, LLaVA-OneVision, Qwen-VL) and its
    processor (PIL backend) from a local dir (a sized preset's dir: :func:`materialize`)."""
    import torch

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    if (model_dir / SIZED_MARKER).is_file():
        return materialize(model_dir, device, dtype, allow_cpu)
    family = _family_of_dir(model_dir)
    counted = checkpoint_params(model_dir, dtype)  # from the safetensors headers: no weights read
    if counted is not None:
        name = f"the model in {model_dir}"
        check_fits(name, *counted, dtype, "cpu")  # from_pretrained reads the weights into RAM first
        if device.startswith("cuda"):
            check_fits(name, *counted, dtype, device)
    try:
        # safetensors only: a folder holding just pytorch_model.bin is refused, never torch.load-ed.
        model = family.model_class().from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        processor = load_processor(model_dir, family)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {first_line(exc)}") from None
    family.note_processor(model, processor)  # Qwen-VL: token counts follow the processor's pixel limits
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


def check_processor(model_dir: str | os.PathLike, name: str) -> None:
    """Load only the processor of ``model_dir`` (a user's model is checked this far, not its weights)."""
    try:
        load_processor(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the processor of {name}: {first_line(exc)}") from None


class VisionTower:
    """The vision tower of a LLaVA checkpoint, loaded without its LM or projector: what extraction needs.

    ``config`` is the checkpoint's whole LLaVA config (feature layer, select strategy, pinpoints, family);
    ``vision_tower`` is the tower module, the one the whole model holds (``Family.tower_of``: LLaVA's
    ``model.model.vision_tower``, Qwen-VL's ``model.model.visual`` with its merger).
    Code that reads a model's tower and config (``pipeline.extract.FeatureExtractor``) takes either."""

    def __init__(self, config, vision_tower):
        self.config, self.vision_tower = config, vision_tower

    def parameters(self):
        return self.vision_tower.parameters()


def _tower_error(model_dir, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load the vision tower from {model_dir}: {why}")


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# What reading a missing, truncated or garbled safetensors file or index raises.
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, struct.error)


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it, from ``model.safetensors.index.json`` (sharded;
    no shard is opened) or the header of ``model.safetensors``."""
    import json

    index, single = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
    try:
        if index.is_file():
            return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        if single.is_file():
            return {k: single for k in read_safetensors_header(single)[0]}
    except _READ_ERRORS as exc:
        raise _tower_error(model_dir, f"unreadable safetensors index or header: {first_line(exc)}") from None
    raise _tower_error(model_dir, "no model.safetensors or model.safetensors.index.json there")


def _read_tensors(file: Path, pairs, put) -> None:
    """Read the tensors ``pairs`` (checkpoint key, module key) of one safetensors file with plain reads, one
    at a time, and hand each to ``put(module key, tensor)``. No mmap: the file's pages never count in this
    process's RSS, and at most one tensor's bytes are held besides the module's own."""
    import torch

    header, base = read_safetensors_header(file)
    with open(file, "rb") as f:
        for key, name in pairs:
            entry = header[key]
            lo, hi = entry["data_offsets"]
            raw = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(base + lo)
            if f.readinto(raw.numpy()) != hi - lo:
                raise ValueError(f"{key} is cut short (truncated file)")
            put(name, raw.view(getattr(torch, _ST_DTYPES[entry["dtype"]])).reshape(entry["shape"]))


def _tower_key(key: str, prefixes, expected) -> str | None:
    """The tower module's own name for checkpoint key ``key`` (None: not a tower tensor the module has).

    ``prefixes`` are the family's tower prefixes (``model.vision_tower.`` as transformers 5.x saves,
    ``vision_tower.`` in the llava-hf hub layout). Inside the tower, the hub layout and transformers 4.x
    nest CLIP/SigLIP under ``vision_model.``, which 5.x's towers no longer have (its checkpoint conversion
    mapping drops it); both spellings map onto whichever the installed tower uses."""
    for prefix in prefixes:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for name in (rest, rest.removeprefix("vision_model."), "vision_model." + rest):
                if name in expected:
                    return name
            return None
    return None


def _tower_tensors(model_dir: Path, family, tower) -> dict[Path, list[tuple[str, str]]]:
    """Per safetensors file, the (checkpoint key, module key) pairs of every tower tensor, checked against
    the module built from ``config.json``: every tensor present, every shape equal (headers only). Only the
    files that hold tower tensors appear; the LM's shards are never opened."""
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    found: dict[str, tuple[Path, str]] = {}
    for key, file in _weight_map(model_dir).items():
        name = _tower_key(key, family.tower_prefixes, expected)
        if name is not None:
            found.setdefault(name, (file, key))
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _tower_error(model_dir, f"config.json's vision_config needs tensor {missing[0]}{more}, which its "
                                      f"safetensors do not hold (tower config and weights disagree)")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, key) in found.items():
        by_file.setdefault(file, []).append((key, name))
    shapes = {}
    for file, pairs in by_file.items():
        try:
            header = read_safetensors_header(file)[0]
            shapes.update({name: tuple(header[key]["shape"]) for key, name in pairs})
        except _READ_ERRORS as exc:
            raise _tower_error(model_dir, f"cannot read {file.name}: {first_line(exc)}") from None
    for name in expected:  # the first mismatch in the module's order
        if shapes[name] != expected[name]:
            file, key = found[name]
            raise _tower_error(model_dir, f"tensor {key} is {list(shapes[name])} in {file.name} but config.json's "
                                          f"vision_config makes it {list(expected[name])} (tower config and "
                                          f"weights disagree)")
    return by_file


def _build_tower(config, family, dtype: str, device: str, seed: int | None = None):
    """The family's tower module from ``config.vision_config`` on ``device`` in ``dtype``: seeded random
    weights (``seed``: a sized preset, the very numbers its whole model gets, since the model builds its
    tower first) or uninitialized ones that loading overwrites (``seed=None``)."""
    import contextlib

    import torch

    no_init = contextlib.nullcontext
    if seed is None:
        try:  # skips the random init of weights that are loaded next; absent elsewhere, init is just slower
            from transformers.initialization import no_init_weights as no_init
        except ImportError:
            pass
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(getattr(torch, dtype))
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device(device), no_init():
            tower = family.build_vision_tower(config)
    finally:
        torch.set_default_dtype(before)
    return tower.eval()


def load_vision_tower(model_dir: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> VisionTower:
    """The vision tower of a model dir alone (:class:`VisionTower`): its module built from the checkpoint's
    ``config.json`` (``vision_config``, the family's classes) and only the tower's tensors read from the
    safetensors files -- for a sharded checkpoint only the shards that hold them. No LM or projector
    weight is read. A sized preset's dir (no weights) builds its tower with the seeded weights
    :func:`materialize` gives the whole model. Tower config and weights that disagree (a tensor missing,
    a shape different) end in one ``ModelLoadError`` line naming the folder and the first such tensor."""
    import torch

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"cannot load model from {model_dir}: no config.json there")
    family = _family_of_dir(model_dir)
    config = _read_config(model_dir)
    with torch.device("meta"):
        shapes = family.build_vision_tower(config)
    n = sum(p.numel() for p in shapes.parameters())  # meta device: counted, nothing allocated
    check_fits(f"the vision tower of {model_dir}", n, n * element_bytes(dtype), dtype, device)
    if (model_dir / SIZED_MARKER).is_file():
        preset = _sized_from_marker(model_dir)
        return VisionTower(config, _build_tower(config, family, dtype, device, seed=preset.seed))
    by_file = _tower_tensors(model_dir, family, shapes)
    tower = _build_tower(config, family, dtype, device)
    params = tower.state_dict(keep_vars=True)
    with torch.no_grad():
        for file, pairs in by_file.items():
            try:  # copy_ casts to the dtype and moves to the device
                _read_tensors(file, pairs, lambda name, tensor: params[name].copy_(tensor))
            except _READ_ERRORS as exc:
                raise _tower_error(model_dir, f"cannot read {file.name}: {first_line(exc)}") from None
    return VisionTower(config, tower)


def check_tower_weights(model_dir: str | os.PathLike) -> None:
    """Check that a checkpoint's safetensors hold every vision-tower tensor its ``config.json`` asks for, at
    the right shape, from the headers alone (no weight read): one ``ModelLoadError`` line otherwise. The
    CLI runs it before any flow starts, so a bad folder never fails inside a task."""
    import torch

    model_dir = Path(model_dir)
    if (model_dir / SIZED_MARKER).is_file():
        return
    family = _family_of_dir(model_dir)
    with torch.device("meta"):
        shapes = family.build_vision_tower(_read_config(model_dir))
    _tower_tensors(model_dir, family, shapes)


def cached_tower(model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None):
    """(:class:`VisionTower`, processor) of ``model_dir``, loaded once per process like :func:`cached_model`
    (the extract stage's shards share it). A whole model already cached for the same (dir, device, dtype)
    lends its tower instead; loading another model or tower drops what was cached."""
    from .device import default_device

    if device is None or dtype is None:
        device, dtype = default_device()
    key = (str(model_dir), device, dtype)
    if key in _LOADED:
        model, processor = _LOADED[key]
        return VisionTower(model.config, family_of(model.config).tower_of(model)), processor
    tower_key = (*key, "tower")
    if tower_key not in _LOADED:
        _LOADED.clear()
        tower = load_vision_tower(key[0], dtype=dtype, device=device)
        try:
            processor = load_processor(key[0], family_of(tower.config))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load model from {key[0]}: {first_line(exc)}") from None
        family_of(tower.config).note_processor(tower, processor)
        _LOADED[tower_key] = (tower, processor)
    return _LOADED[tower_key]


_LOADED: dict[tuple, tuple[Any, Any]] = {}


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


__all__ = ["ModelLoadError", "is_hub_id", "resolve_hub_snapshot", "materialize", "load_processor", "load_model",
           "load_model_config", "describe", "check_processor", "cached_model", "VisionTower", "load_vision_tower",
           "cached_tower", "check_tower_weights"]
