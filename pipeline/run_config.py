"""The configuration of one end-to-end ``atr run``: every stage's config in one TOML file.

``load_run_config`` reads ``atr run --config RUN.TOML``; ``run_config_toml`` writes
the commented TOML of ``atr run --print-config``, which reads back to the same config.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from .config import Config, ConfigError, ExtractConfig, check
from .evaluate import EvalConfig
from .train import TINY_SCHEDULE, TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """Every stage's config for one end-to-end run (the TOML file of ``atr run --config``).

    ``model`` is prepare-model's config: one model, or a list of them (``model =
    ["tiny-trained", "tiny-ov-trained"]``: both families in one run, each with its own
    features, selectors, evaluation and report); ``extract`` says which images the selector
    is trained on (the paper: base-resolution crops, one per image); ``data`` maps
    a real benchmark name to its lmms-lab parquet file or directory. ``eval`` evaluates, beside the paper's
    selector (k per crop), its image-level and grid allocations and the threshold budget at 0.3, 0.5, 0.7
    and 0.9 (issue 30: the variants side by side; docs/selector.md)."""

    kind = "run"

    model: str | tuple = "tiny-trained"
    extract: ExtractConfig = ExtractConfig(images="synthetic:docs", limit=2048, crops="base")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig(options={"selector": [{}, {"allocation": "image"}, {"allocation": "grid"}]},
                                  thresholds=(0.3, 0.5, 0.7, 0.9))
    data: Mapping = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """As ``Config.from_dict``, but a partial ``[extract]`` or ``[eval]`` table fills in from this config's
        own defaults (2048 base crops; the selector's allocation variants and the threshold sweep), not from
        ExtractConfig's or EvalConfig's."""
        data = dict(data)
        for name in ("extract", "eval"):
            if isinstance(data.get(name), Mapping):
                base = getattr(cls(), name).to_dict()
                fields = {f.name for f in dataclasses.fields(getattr(cls(), name))}  # to_dict may omit defaults
                unknown = [k for k in data[name] if k not in base and k not in fields]
                if not unknown:
                    data[name] = {**base, **data[name]}
        return super().from_dict(data)

    @property
    def models(self) -> tuple[str, ...]:
        """The models of the run, in order."""
        return (self.model,) if isinstance(self.model, str) else tuple(self.model)

    def validate(self) -> None:
        check(isinstance(self.model, str) or (isinstance(self.model, (list, tuple)) and len(self.model) > 0),
              "model must name a model or be a list of models")
        for m in self.models:
            check(isinstance(m, str) and bool(m.strip()), f"model must name a model, got {m!r}")
        check(len(set(self.models)) == len(self.models), f"model lists a model twice: {list(self.models)}")
        check(isinstance(self.data, Mapping), "[data] must be a table of benchmark = path")
        from .benchmarks import BENCHMARKS

        for name, path in self.data.items():
            check(name in BENCHMARKS, f"[data] names unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
            check(isinstance(path, str) and bool(path), f"[data] {name} must be a path string")
        missing = [b for b in self.eval.benchmarks if not b.startswith("synthetic-") and b not in self.data]
        check(not missing, f"benchmark {', '.join(missing)} needs a path in [data] (an lmms-lab parquet file "
                           "or a directory of them)")


def load_run_config(path: str | Path | None) -> tuple[RunConfig, list[str]]:
    """(config, selector schedule keys the file sets) from a TOML file; the defaults for None.

    The second item decides which of the tiny presets' short training schedule
    (:data:`pipeline.train.TINY_SCHEDULE`) the file overrides."""
    if path is None:
        return RunConfig(), []
    import tomllib

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from None
    try:
        cfg = RunConfig.from_dict(data)
    except TypeError as exc:  # e.g. a table where a value belongs
        raise ConfigError(f"{p}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return cfg, sorted(data.get("train", {}).get("selector", {}))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table: {allocation = "image"}
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    """A bare TOML key where it may be one, else a quoted one."""
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


_COMMENTS = {
    "model": "preset (tiny-trained, tiny-ov-trained, tiny-qwen25-trained, tiny-qwen3-trained, tiny, tiny-ov, tiny-qwen25, "
             "tiny-qwen3), a save_pretrained directory, or a HF id "
             "(llava-hf/llava-v1.6-mistral-7b-hf); a list runs several, e.g. [\"tiny-trained\", \"tiny-ov-trained\"]",
    "extract": "selector training images: synthetic:docs, synthetic:scenes or a folder (COCO train2017)",
    "train": "one selector per retention p; loss = MSE + max(mean(M), p)",
    "train.selector": "architecture and optimizer (3 + 3 layers as in the paper, Sec. 4.1.1 and 4.2; "
                      "the rest are atr's paper-scale defaults)",
    "eval": "pruned evaluation: full/none once, random per seed, the rest once per retention",
    "data": "real benchmarks: NAME = \"lmms-lab parquet file or directory\"",
}


def run_config_toml(cfg: RunConfig) -> str:
    """The config as commented TOML (``atr run --print-config``); ``load_run_config`` reads it back."""
    out = ["# atr run configuration. Every key is optional; a missing key takes the default shown.",
           "# Stage outputs are content-hashed: change a stage's section and only that stage and",
           "# the ones after it recompute.", "",
           f"# {_COMMENTS['model']}", f"model = {_toml_value(cfg.model)}"]

    def section(name: str, values: dict[str, Any], commented: dict[str, str] | None = None) -> None:
        out.extend(["", f"# {_COMMENTS[name]}", f"[{name}]"])
        for k, v in values.items():
            if isinstance(v, dict):
                continue
            if commented and k in commented:
                out.append(f"# {k} = {commented[k]}")
            elif v is None:
                out.append(f"# {k} = (unset)")
            else:
                out.append(f"{k} = {_toml_value(v)}")

    section("extract", cfg.extract.to_dict())
    train = cfg.train.to_dict()
    section("train", train)
    if "retention_range" not in train:  # omitted from to_dict() when unset (the stage keys stay as they were)
        out.append("# retention_range = [0.05, 0.5]  (unset: also train one selector on this range of p)")
    sel = train["selector"]
    tiny = {k: f"{_toml_value(sel[k])}  (paper scale; the tiny presets use {_toml_value(v)} unless this is set)"
            for k, v in TINY_SCHEDULE.items()}
    sel_comments = {**tiny, "d_model": "(the encoder width C)"}
    section("train.selector", {k: v for k, v in sel.items() if k != "retention"},
            commented={k: v for k, v in sel_comments.items() if sel.get(k) is None or k in tiny})
    section("eval", cfg.eval.to_dict())
    out.append("# strategy options (ablation switches), one table per strategy, e.g. [eval.options.visionzip];")
    out.append("# a list of tables evaluates variants side by side: [eval.options] selector = [{}, {allocation = \"image\"}]")
    variants = {n: o for n, o in cfg.eval.options.items() if isinstance(o, (list, tuple))}
    if variants:
        out.append("[eval.options]")
        out.extend(f"{_toml_key(n)} = {_toml_value(list(o))}" for n, o in variants.items())
    for name, opts in cfg.eval.options.items():
        if name not in variants:
            out.extend([f"[eval.options.{_toml_key(name)}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in opts.items())])
    out.extend(["", f"# {_COMMENTS['data']}", "[data]"])
    if cfg.data:
        out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in cfg.data.items())
    else:
        out.append('# docvqa_val = "/data/lmms-lab/DocVQA/DocVQA"')
    return "\n".join(out) + "\n"


__all__ = ["RunConfig", "load_run_config", "run_config_toml"]
