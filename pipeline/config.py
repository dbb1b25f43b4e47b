"""Frozen, validated configs, hashed by their canonical JSON.

Every stage's behaviour is a function of its config and its inputs' hashes, so a
config must be (a) immutable, (b) checked once when built, and (c) reducible to
a canonical JSON string: sorted keys, no whitespace, floats as repr. The stage
cache key is a hash of that string (see ``storage.stages``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar, Mapping

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config value a user can fix. ``str(exc)`` is one line naming the field."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, dataclasses as dicts."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def content_hash(obj: Any, length: int = 16) -> str:
    """Hex sha256 prefix of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # a field marked omit_at_default is left out at its default: adding it kept every earlier key
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_at_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for stage configs: frozen dataclass with ``validate`` and a content hash."""

    kind: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return canonical_json(self)

    def hash(self) -> str:
        return content_hash({"kind": self.kind, "config": self})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        """Build from a plain dict; an unknown key is refused naming the closest valid one.

        A field whose default is itself a Config (a nested config) is built from its
        dict the same way, so unknown keys inside it are refused too."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.kind} config must be a table of keys, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown {cls.kind} config key {key!r}{_closest_hint(str(key), names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(f.default, Config):
                    if isinstance(value, Mapping):
                        value = type(f.default).from_dict(value)
                    elif not isinstance(value, type(f.default)):
                        raise ConfigError(f"{cls.kind} config key {f.name!r} must be a table of "
                                          f"{f.default.kind} keys, got {value!r}")
                else:
                    _check_type(cls.kind, f, value)
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**kwargs)
        except (TypeError, AttributeError) as exc:  # a value of the right type but the wrong shape
            raise ConfigError(f"bad {cls.kind} config: {first_line(exc)}") from None


# Field annotations (strings, under ``from __future__ import annotations``) that
# from_dict checks; other names (nested configs, Mapping) are checked elsewhere.
_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "tuple": (tuple, list),
    "None": (type(None),),
}


def _check_type(kind: str, f: dataclasses.Field, value: Any) -> None:
    """Refuse a value whose type the field's annotation does not allow (bool is not a number)."""
    names = [n.strip() for n in str(f.type).split("|")]
    if not all(n in _SIMPLE_TYPES for n in names):
        return
    ok = any(isinstance(value, t) and not (isinstance(value, bool) and n != "bool")
             for n in names for t in _SIMPLE_TYPES[n])
    if not ok:
        words = {"tuple": "a list", "str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
                 "None": "none"}
        raise ConfigError(f"{kind} config key {f.name!r} must be {' or '.join(words[n] for n in names)}, "
                          f"got {value!r}")


def _closest_hint(key: str, names: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid keys: {', '.join(names)})"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_compute(device: str, dtype: str) -> None:
    """``--device`` and ``--dtype`` are among the known values (resolved later, where torch runs)."""
    check(device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    check(dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check(condition: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


CROPS = ("all", "base")
DEVICES = ("auto", "cpu", "cuda")  # where a model or the selector runs (pipeline.device resolves auto)
DTYPES = ("auto", "bf16", "fp16", "fp32")  # the model's weights and activations
# The retentions a sweep uses unless told otherwise (eval chunks and the held-out selector comparison).
EVAL_RETENTIONS = (0.1, 0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class ExtractConfig(Config):
    """What the extract stage computes from (model, image source).

    crops: "all" keeps every AnyRes crop (base image first, then the grid in raster
    order); "base" keeps only the base crop (the whole image resized to one crop),
    which is what the selector is trained on in the paper.
    """

    kind: ClassVar[str] = "extract"

    images: str = "synthetic:docs"
    limit: int | None = 256
    seed: int = 0
    crops: str = "all"
    batch_size: int = 16
    shard_size: int = 64
    dtype: str = "float16"           # how features are stored in the shards
    device: str = "auto"             # where the vision tower runs
    model_dtype: str = "auto"        # the tower's dtype (--dtype)
    # families without crops (Qwen-VL): "premerger" (the 2 x 2 pre-merger groups, the paper's encoder output
    # before the projector) or "merged" (the merger's output); left out of to_dict() at its default, so
    # every key made before it existed stays (docs/qwen.md)
    qwen_features: str = dataclasses.field(default="premerger", metadata={"omit_at_default": True})

    def validate(self) -> None:
        check(self.qwen_features in ("premerger", "merged"),
              f"--qwen-features must be premerger or merged, got {self.qwen_features!r}")
        check(self.limit is None or (isinstance(self.limit, int) and self.limit > 0),
              f"--limit must be a positive integer, got {self.limit!r}")
        check(self.crops in CROPS, f"--crops must be one of {', '.join(CROPS)}, got {self.crops!r}")
        check(isinstance(self.batch_size, int) and self.batch_size > 0,
              f"--batch-size must be a positive integer, got {self.batch_size!r}")
        check(isinstance(self.shard_size, int) and self.shard_size > 0,
              f"--shard-size must be a positive integer, got {self.shard_size!r}")
        check(self.dtype in ("float16",), f"feature dtype must be float16, got {self.dtype!r}")
        check(bool(self.images), "--images must name a source (synthetic:docs, synthetic:scenes or a folder)")
        check_compute(self.device, self.model_dtype)

    def cache_relevant(self) -> dict[str, Any]:
        """The fields that change the shard bytes. ``batch_size`` is deliberately
        excluded: the vision tower runs per crop, so batching does not change
        results beyond float round-off, and a user re-running with another batch
        size expects a cache hit. ``device`` and ``model_dtype`` enter the key as the
        resolved compute (``cpu-float32``), not as spelled (``auto``)."""
        d = self.to_dict()
        for name in ("batch_size", "device", "model_dtype"):
            d.pop(name)
        return d
