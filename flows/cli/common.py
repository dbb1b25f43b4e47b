"""What every ``atr`` command shares: the model help text, the retention parser, Dask options,
preflight checks and the console.

Importing this module loads neither Prefect nor torch: the CLI sets PREFECT_HOME
and thread counts (``flows.runtime``) before either loads.
"""

from __future__ import annotations

import argparse
import collections
import math
import textwrap
from typing import Any, Callable

from pipeline.config import ConfigError

MODEL_HELP = ("model: a preset (tiny-trained / tiny-ov-trained / tiny-qwen25-trained / tiny-qwen3-trained: a "
              "LLaVA-NeXT / LLaVA-OneVision / Qwen2.5-VL / Qwen3-VL trained in-project; tiny / tiny-ov / tiny-qwen25 / tiny-qwen3: random weights, for fast "
              "tests; shape-next-mistral / shape-ov-qwen2: the real towers and processors with a one-layer LM; "
              "bench-*: real dimensions, random weights, for timing on CUDA), a local directory saved with "
              "save_pretrained, or a Hugging Face id such as llava-hf/llava-v1.6-mistral-7b-hf, "
              "llava-hf/llava-onevision-qwen2-7b-ov-hf, Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen3-VL-8B-Instruct "
              "(must be in the local HF cache when offline)")


def add_command(sub, common, name: str, help: str, description: str, epilog: str | None = None,
                aliases: tuple[str, ...] = ()):
    """A subcommand's parser: the shared options, the one-line ``help`` shown by ``atr --help``, the
    description wrapped at 80 columns, and the epilog (examples) printed as written. ``aliases``: old
    names that still parse (each one a key of ``flows.cli.RENAMED``)."""
    return sub.add_parser(name, parents=[common], help=help, description=wrap(description), epilog=epilog,
                          formatter_class=HelpFormatter, aliases=list(aliases))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; an option's help may be a :class:`LazyHelp`, built only when shown."""

    def _get_help_string(self, action) -> str:
        return str(action.help)


class LazyHelp(collections.UserString):
    """Help text computed when ``--help`` prints it (the strategy registry imports torch; parsing must
    not)."""

    def __init__(self, make: Callable[[], str] | str):
        self._make = make  # UserString's methods build new instances from plain strings

    @property
    def data(self) -> str:  # type: ignore[override]
        return self._make if isinstance(self._make, str) else self._make()


def strategies_help(lead: str, pruners_only: bool = False) -> LazyHelp:
    """``--strategies`` help listing the registered strategies, the published pruners named."""

    def make() -> str:
        from pipeline.strategies import get, names, peers, pruners

        listed = pruners() if pruners_only else names()
        peer = [f"{n} ({get(n).label}, {get(n).peer})" for n in peers()]
        return f"{lead}: comma-separated from {', '.join(listed)}. The published pruners: {'; '.join(peer)}."

    return LazyHelp(make)


def wrap(text: str) -> str:
    """A --help description wrapped at 80 columns (for RawDescriptionHelpFormatter parsers)."""
    return textwrap.fill(text, width=80)


def parse_retentions(text: str, single: bool = False) -> tuple[float, ...]:
    """``--retentions`` (comma-separated fractions of tokens kept, each in (0, 1], no repeats).

    ``single``: exactly one value (``atr mask``). Every bad value ends in one ConfigError line."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = float(part)
        except ValueError:
            raise ConfigError(f"--retentions: {part!r} is not a number (give fractions like 0.1,0.25)") from None
        if math.isnan(r) or not 0.0 < r <= 1.0:
            raise ConfigError(f"--retentions: retention must be in (0, 1], got {part}")
        values.append(r)
    if not values:
        raise ConfigError("--retentions: give at least one retention, e.g. 0.25")
    if len(set(values)) != len(values):
        raise ConfigError(f"--retentions: duplicate retention in {text!r}")
    if single and len(values) != 1:
        raise ConfigError(f"--retentions: give one retention here, got {text!r}")
    return tuple(values)


def add_retentions_option(p, default: str | None, help: str, alias: bool = False) -> None:
    """``--retentions`` (and, where it existed before, its alias ``--retention``)."""
    names = ("--retentions", "--retention") if alias else ("--retentions",)
    kwargs: dict[str, Any] = {"dest": "retentions", "metavar": "R[,R...]", "help": help}
    if default is None:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    p.add_argument(*names, **kwargs)


def add_compute_options(p, dtype: bool = True) -> None:
    """``--device`` (and ``--dtype``): where the model runs and in which precision."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs: auto (CUDA when present), cpu or cuda (default: auto)")
    if dtype:
        p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                       help="the model's weights and activations: auto (bf16 on a CUDA device that supports it, "
                            "else fp16; fp32 on the CPU), bf16, fp16 or fp32 (default: auto)")


def add_dask_options(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dask-address", metavar="ADDR", default=None,
                   help="map extraction shards and eval chunks over an existing Dask cluster (tcp://HOST:PORT; "
                        "start its workers with OMP_WAIT_POLICY=PASSIVE and one thread per process)")
    g.add_argument("--dask-workers", metavar="N", type=int, default=None,
                   help="... or over a local Dask cluster of N single-threaded worker processes; with CUDA, "
                        "one per GPU, each pinned to its device (at most the GPU count)")


def on_dask(flow, args):
    """``flow`` on a DaskTaskRunner when --dask-address / --dask-workers was given."""
    from ..orchestration.dask import task_runner

    runner = task_runner(args.dask_address, args.dask_workers, getattr(args, "device", "auto"))
    return flow if runner is None else flow.with_options(task_runner=runner)


def preflight(model: str, images: str | None = None, seed: int = 0, tiny_world: dict | None = None) -> None:
    """Check user inputs before any flow starts, so mistakes end in one line, not a flow failure."""
    from ..stages.prepare_model import model_spec

    kind, identity = model_spec(model, tiny_world)
    if kind in ("local", "hub"):  # a user's folder: its tower config and weights agree (headers only)
        from pipeline.loading import check_tower_weights

        check_tower_weights(identity["dir"])
    if images is not None:
        from pipeline.images import open_source

        open_source(images, seed=seed)


__all__ = ["MODEL_HELP", "add_command", "wrap", "parse_retentions", "add_retentions_option", "add_compute_options",
           "add_dask_options",
           "on_dask", "preflight"]
