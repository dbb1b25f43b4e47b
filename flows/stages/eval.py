"""The eval stage: pruned evaluation (LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL), one tower pass per
image per sweep.

The work unit is a **shard** of a benchmark's items (``EvalConfig.shard_size``
rows). A shard unit (:func:`eval_shard`) reads only its rows from the parquet
(streamed by record batch), runs the vision tower once per image, together with
the CLS attention when a missing result needs it, and then computes every
missing (strategy, retention, seed) result of the shard from those features.
Each result is cached on its own, ``stages/eval-shard/<key>/`` (``samples.json``
+ manifest), keyed by the model stage, the data files, the selector checkpoint
(for ``selector``: the one its ``variant`` option picks), the budget (with the
threshold and floor of the adaptive one), the strategy's changed options and the
sha256 of any file they name, the sample limit, the generated split when not
``test``, the shard's rows and the result's coordinates; on a dynamic-resolution family
(Qwen-VL) also the processor's pixel limits (:func:`model_pixels`), which decide every
image's token grid. Adding a strategy or a
retention computes only what is new, with one more tower pass per image for that
addition.

Each (benchmark, strategy, retention, seed) -- a :class:`Chunk` -- is then the
merge of its shards' results, ``stages/eval/<key>/``, with the benchmark's
aggregate over all of them (MMBench's CircularEval groups across shards).
Features are reused in memory within a shard, not cached on disk: at real scale
they would cost about 31 GB for DocVQA val on NeXT.

A row that cannot be used (an undecodable image, a malformed field) is skipped
with one warning line and counted (``skipped`` in the shard manifests and in
``stage_metrics``); it never stops the sweep.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.benchmarks import build_items, spec
from pipeline.config import ConfigError, content_hash
from pipeline.evaluate import AUTO_BATCH_CPU, EvalConfig, Pruning
from pipeline.families import DEFAULT_FAMILY, FAMILIES, family_of
from pipeline.loading import cached_model
from storage.benchmarks import benchmark_files, benchmark_size, files_fingerprint, load_benchmark_rows
from storage.home import Home
from storage.selectors import LoadedSelector, load_selector, resolve_selector
from storage.stages import StageDir, StageResult, code_version, run_stage, stage_key, write_json_atomic

from ..present import progress
from . import Mapper, serial
from .benchmark import synthetic_benchmark
from .prepare_model import model_stage

EVAL_VERSION = "3"  # 3: shards share one tower pass; random keeps are seeded per row; batches grouped by length
SYNTHETIC = ("synthetic-ocr", "synthetic-scene")
SELECTOR_NEEDED = "strategy {strategy!r} needs --selector (a train stage hash or a .safetensors checkpoint)"


# ---------------------------------------------------------------- inputs

def data_files(benchmark: str, data: dict[str, str], home: Home, limit: int, split: str = "test") -> list[Path]:
    """The parquet file(s) of a benchmark: generated for synthetic ones (their ``split``: val or test),
    ``--data`` for real ones (the files decide their split)."""
    if benchmark in SYNTHETIC and benchmark not in data:
        return [synthetic_benchmark(home, benchmark, split, limit)]
    if benchmark not in data:
        raise ConfigError(f"benchmark {benchmark} needs --data PATH (a local lmms-lab parquet file or a directory "
                          f"of them), or --data {benchmark}=PATH when evaluating several benchmarks")
    return benchmark_files(benchmark, data[benchmark])


def shard_items(benchmark: str, files: list[Path], start: int, stop: int):
    """(items, row indices, skipped) of rows ``start`` to ``stop``: skipped rows as (row index, reason)."""
    rows = load_benchmark_rows(benchmark, files, stop, spec(benchmark).required, start=start)
    return build_items(benchmark, rows, offset=start)


def eval_text_encoder(cfg: EvalConfig, model: StageResult, device: str = "cpu"):
    """cdpruner's ``--text-encoder`` (a ``pipeline.relevance.TextRelevance``), checked against the tower's
    width; None without one (the unconditioned DPP)."""
    from pipeline.relevance import load_text_encoder

    if not cfg.text_encoder:
        return None
    return load_text_encoder(cfg.text_encoder, model.manifest.get("describe", {}).get("vision_hidden"), device)


def eval_selector(home: Home, ref: str, retention: float, model: StageResult,
                  variant: str = "nearest") -> LoadedSelector:
    """The ``--selector`` checkpoint for ``retention``, checked against the model's C and L. ``variant``
    picks it from a train stage (``storage.selectors.resolve_selector``): nearest (the trained p nearest
    ``retention``), range (the range-trained one) or p0.25 (exactly that p)."""
    from pipeline.train import selector_from_checkpoint

    d = model.manifest.get("describe", {})
    return load_selector(resolve_selector(home, ref, retention, variant), selector_from_checkpoint,
                         expect_channels=d.get("vision_hidden"), expect_tokens=d.get("tokens_per_crop"),
                         expect_family=d.get("family", DEFAULT_FAMILY))


# ---------------------------------------------------------------- chunks and shards

def result_coords(benchmark: str, pruning: Pruning, limit: int, interpolation: bool,
                  split: str = "test") -> dict[str, Any]:
    """What one result is, as its keys and manifests record it: the benchmark, the Pruning (with the
    strategy's version, the options that differ from its defaults, and under the threshold budget its
    threshold and floor), the sample limit, interpolation, and the generated split when not ``test``.
    Every coordinate at its default is left out, so the keys of the default run stay as they were."""
    spec = pruning.spec
    options = spec.changed_options(pruning.options)
    adaptive = pruning.budget == "threshold"
    return {"benchmark": benchmark, "strategy": pruning.strategy, "retention": pruning.retention,
            "seed": pruning.seed, "budget": pruning.budget, "limit": limit,
            **({"threshold": pruning.threshold, "floor": pruning.floor} if adaptive else {}),
            **({"strategy_version": spec.version} if spec.version else {}),
            **({"options": options} if options else {}), **({"interpolation": True} if interpolation else {}),
            **({"split": split} if split != "test" else {})}


def option_file_hashes(pruning: Pruning) -> dict[str, str]:
    """{option: sha256[:16] of the file it names} for the strategy's file options (``Strategy.files``) set
    to a non-empty path; a missing file is one line naming it."""
    out = {}
    resolved = pruning.spec.resolve_options(pruning.options) if pruning.spec.files else {}
    for name in pruning.spec.files:
        value = resolved.get(name)
        if value in (None, ""):
            continue
        path = Path(str(value)).expanduser()
        if not path.is_file():
            raise ConfigError(f"option {pruning.strategy}.{name}: no such file {path}")
        out[name] = _file_sha(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    return out


@functools.lru_cache(maxsize=64)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ResultKey:
    """Where one result's cache keys come from: its coordinates (benchmark, the Pruning, the sample limit,
    interpolation, the generated split) and its inputs (model stage, data fingerprint, compute, and -- for
    the strategies that use them -- the selector checkpoint's sha256, the text encoder's fingerprint and
    the sha256 of every file an option names)."""

    benchmark: str
    pruning: Pruning
    limit: int
    model: str
    data: str
    compute: str = "cpu-float32"
    selector: str | None = None
    text_encoder: str | None = None
    interpolation: bool = False
    split: str = "test"
    pixels: Any = None  # a dynamic-resolution family's processor pixel limits (Qwen-VL; :func:`model_pixels`)

    def coords(self) -> dict[str, Any]:
        return result_coords(self.benchmark, self.pruning, self.limit, self.interpolation, self.split)

    def inputs(self) -> dict[str, Any]:
        files = option_file_hashes(self.pruning)
        return {"model": self.model, "data": self.data, "compute": self.compute,
                **({"selector": self.selector} if self.selector else {}),
                **({"text_encoder": self.text_encoder} if self.text_encoder else {}),
                **({"option_files": files} if files else {}),
                **({"pixels": dict(self.pixels)} if self.pixels else {})}

    def chunk_key(self, shard_size: int) -> str:
        """The key of the merged result: its coordinates, inputs and how its rows were cut into shards."""
        return stage_key("eval", EVAL_VERSION, {**self.coords(), "shard_size": shard_size}, self.inputs())

    def shard_key(self, start: int, stop: int) -> str:
        """The key of one shard's result: the result's coordinates and inputs plus the shard's rows."""
        return stage_key("eval-shard", EVAL_VERSION, {**self.coords(), "rows": [start, stop]}, self.inputs())


@dataclass(frozen=True)
class Chunk:
    """One (benchmark, strategy, retention, seed) result: its inputs, its key, and its shards' result keys
    as (first row, end row, key)."""

    benchmark: str
    files: tuple[str, ...]
    pruning: Pruning
    key: str
    device: str = "cpu"              # resolved --device and --dtype the model runs in
    dtype: str = "float32"
    shards: tuple[tuple[int, int, str], ...] = ()
    split: str = "test"              # the generated split of a synthetic benchmark (its key records a non-test one)

    @property
    def strategy(self) -> str:
        return self.pruning.strategy

    @property
    def retention(self) -> float:
        return self.pruning.retention

    @property
    def seed(self) -> int:
        return self.pruning.seed


@dataclass(frozen=True)
class Shard:
    """One work unit: rows ``start`` to ``stop`` of a benchmark and the results wanted on them, as
    (Pruning, result key)."""

    benchmark: str
    files: tuple[str, ...]
    start: int
    stop: int
    device: str
    dtype: str
    results: tuple[tuple[Pruning, str], ...] = field(default=())
    split: str = "test"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def require_selector(strategies: Any, selector: str | None) -> None:
    """The one check that a strategy needing a selector has one (planning; the lmms-eval plugin)."""
    from pipeline.strategies import get

    needing = [s for s in strategies if "selector" in get(s).needs]
    if needing and not selector:
        raise ConfigError(SELECTOR_NEEDED.format(strategy=needing[0]))


def check_interpolation(model: StageResult, cfg: EvalConfig) -> None:
    """A family that can interpolate (LLaVA-OneVision) only: refuse pruning with interpolation on (one line
    saying how to turn it off). The family is asked by the ``model_type`` the prepare-model stage recorded.
    Whether a pruned context exceeds the stock model's is known per image only: :func:`stock_warnings`
    says so after the sweep, at any retention."""
    facts = (model.manifest or {}).get("describe") or {}
    family = FAMILIES.get(facts.get("model_type"))
    if not (family and family.can_interpolate):
        return
    pruning = [s for s in cfg.strategies if s not in ("full", "none")]
    if cfg.interpolation and pruning and facts.get("interpolates", True):
        raise ConfigError(f"{', '.join(pruning)} cannot prune {family.label} with interpolation on: "
                          f"vision_aspect_ratio={facts.get('vision_aspect_ratio')!r} shrinks large grids and a keep "
                          f"mask cannot be gathered through that; drop --interpolation on (off is the default: "
                          f"vision_aspect_ratio={facts.get('interpolation_off')!r}) or evaluate only full,none")


def check_crops(model: StageResult, cfg: EvalConfig) -> None:
    """One line, at planning (before any tower pass), for a strategy that needs AnyRes crops (HiRED) on a
    family without them (Qwen-VL): the family is asked by the ``model_type`` the prepare-model stage recorded."""
    from pipeline.strategies.core import check_family

    facts = (model.manifest or {}).get("describe") or {}
    family = FAMILIES.get(facts.get("model_type"))
    if family is not None:
        check_family(cfg.strategies, family)


def model_pixels(model: StageResult) -> dict[str, int] | None:
    """The pixel limits of a dynamic-resolution family (Qwen-VL's processor ``min_pixels``/``max_pixels``,
    which decide every image's token grid), for the eval keys; None for a family without them (LLaVA: its
    keys stay as they were). The prepare-model stage's ``describe`` records them (``Family.describe``:
    ``pixels``) where the model was loaded with its processor; otherwise they are read from the processor
    saved with the model (a user's folder or hub snapshot), through the family's ``note_processor``."""
    facts = (model.manifest or {}).get("describe") or {}
    if "pixels" not in facts:
        return None
    if facts["pixels"]:
        return {k: int(v) for k, v in sorted(facts["pixels"].items())}
    from types import SimpleNamespace

    from pipeline.loading import load_model_config, load_processor

    folder = model.model_dir
    cfg = load_model_config(folder)
    family = family_of(cfg)
    family.note_processor(SimpleNamespace(config=cfg), load_processor(folder))
    got = family.describe(cfg).get("pixels") or {}
    return {k: int(v) for k, v in sorted(got.items())} or None


def plan_eval(home: Home, model: StageResult, cfg: EvalConfig, selector: str | None,
              data: dict[str, str]) -> list[Chunk]:
    """Every result of an evaluation with its content-hashed key and its shards' keys (fails fast, one
    line, on bad inputs)."""
    from pipeline.device import compute

    device, dtype = compute(cfg.device, cfg.model_dtype)
    require_selector(cfg.strategies, selector)
    check_interpolation(model, cfg)
    check_crops(model, cfg)
    pixels = model_pixels(model)
    text_fp = _text_encoder_fingerprint(cfg, model)
    sel_sha = {}
    for p in cfg.chunks():
        if "selector" in p.spec.needs and selector_slot(p) not in sel_sha:
            sel_sha[selector_slot(p)] = chunk_selector(home, selector, p, model).sha256
    plan = []
    for bench in cfg.benchmarks:
        generated = bench in SYNTHETIC and bench not in data
        files = data_files(bench, data, home, cfg.limit, cfg.split)
        shard_items(bench, files, 0, 1)  # fail fast with one line on a malformed file
        fp = files_fingerprint(files)
        n = min(cfg.limit, benchmark_size(bench, files))
        cuts = [(a, min(n, a + cfg.shard_size)) for a in range(0, n, cfg.shard_size)]
        for p in cfg.chunks():
            key = ResultKey(bench, p, cfg.limit, model.key, fp, f"{device}-{dtype}",
                            sel_sha.get(selector_slot(p)) if "selector" in p.spec.needs else None,
                            text_fp if p.spec.wants("relevance") else None, cfg.interpolation,
                            cfg.split if generated else "test", pixels)
            plan.append(Chunk(bench, tuple(str(f) for f in files), p, key.chunk_key(cfg.shard_size), device, dtype,
                              tuple((a, b, key.shard_key(a, b)) for a, b in cuts), key.split))
    return plan


def selector_slot(pruning: Pruning) -> tuple[float, str]:
    """Which selector checkpoint a result uses: (retention, the ``variant`` option). Under the threshold
    budget the retention is the cap."""
    return pruning.retention, str(pruning.options.get("variant", "nearest"))


def chunk_selector(home: Home, ref: str | None, pruning: Pruning, model: StageResult) -> LoadedSelector:
    """:func:`eval_selector` for one result: its retention (the cap under the threshold budget) and its
    ``variant`` option (nearest trained p, the range-trained one, or p<value>)."""
    retention, variant = selector_slot(pruning)
    return eval_selector(home, ref, retention, model, variant=variant)


def _text_encoder_fingerprint(cfg: EvalConfig, model: StageResult) -> str | None:
    """The text encoder's fingerprint when a strategy that uses relevance runs with one (checked now: it
    must load and fit the tower); without one those strategies run unconditioned, said in one line."""
    from pipeline.strategies import get

    if not any(get(s).wants("relevance") for s in cfg.strategies):
        return None
    if not cfg.text_encoder:
        from pipeline.relevance import UNCONDITIONED

        print(UNCONDITIONED, file=sys.stderr)
        return None
    from pipeline.relevance import text_encoder_fingerprint

    eval_text_encoder(cfg, model)  # fails fast, one line, when it does not load or fit the tower
    return text_encoder_fingerprint(cfg.text_encoder)


def plan_shards(plan: list[Chunk]) -> list[Shard]:
    """The work units of a plan: one per (benchmark, files, rows), with every result wanted on them."""
    units: dict[tuple, list[tuple[Pruning, str]]] = {}
    meta: dict[tuple, tuple[str, str]] = {}
    split: dict[tuple, str] = {}
    for c in plan:
        for a, b, key in c.shards:
            unit = (c.benchmark, c.files, a, b)
            units.setdefault(unit, []).append((c.pruning, key))
            meta[unit] = (c.device, c.dtype)
            split[unit] = c.split
    return [Shard(bench, files, a, b, *meta[(bench, files, a, b)], tuple(results), split[(bench, files, a, b)])
            for (bench, files, a, b), results in units.items()]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def eval_shard(home: str | Home, shard: Shard, model_key: str, config: dict[str, Any], selector: str | None,
               force: bool = False) -> dict[str, Any]:
    """Every missing result of one shard from one tower pass per image (each result cached on its own).

    Returns the results' StageResults as dicts (in ``shard.results`` order) and the unit's figures:
    ``images`` (distinct images encoded), ``tower_passes``, ``skipped``, ``computed`` (results
    computed here), ``padding`` and ``positions`` (left padding of the generate batches)."""
    home = Home.resolve(home)
    cfg = EvalConfig.from_dict(config)
    dirs = [StageDir(home, "eval-shard", key) for _, key in shard.results]
    missing = [i for i, d in enumerate(dirs) if force or not d.is_complete()]
    figures = {"images": 0, "tower_passes": 0, "skipped": 0, "computed": 0, "padding": 0, "positions": 0}
    outs: list[StageResult | None] = [None] * len(shard.results)
    if missing:
        work = _ShardWork.encode(home, shard, model_key, cfg, [shard.results[i][0] for i in missing])
        figures.update(images=work.features.images, tower_passes=work.features.images, skipped=len(work.skipped))
        for i in missing:
            pruning, key = shard.results[i]
            outs[i] = run_stage(home, "eval-shard", key,
                                lambda path, p=pruning: work.result(path, p, selector, figures), force=force)
            figures["computed"] += not outs[i].cached
    for i, d in enumerate(dirs):
        if outs[i] is None:
            outs[i] = StageResult("eval-shard", d.key, d.path, True, 0.0, d.manifest())
    return {"results": [o.to_dict() for o in outs], **figures}


@dataclass
class _ShardWork:
    """One shard's loaded model, items and tower features, from which each missing result is computed."""

    home: Home
    shard: Shard
    model_key: str
    cfg: EvalConfig
    model_result: StageResult
    model: Any
    processor: Any
    features: Any                    # pipeline.evaluate.ShardFeatures
    skipped: list[dict[str, Any]]
    relevance: Any
    tower_seconds: float
    selectors: dict[tuple[float, str], Any] = field(default_factory=dict)

    @classmethod
    def encode(cls, home: Home, shard: Shard, model_key: str, cfg: EvalConfig,
               wanted: list[Pruning]) -> "_ShardWork":
        """Load the model, read the shard's rows and run the tower once per image, computing what the
        ``wanted`` strategies need (attention, embeds for a text encoder's relevance)."""
        from pipeline.evaluate import encode_shard
        from pipeline.strategies import tower_outputs

        t0 = time.perf_counter()
        model_result = model_stage(home, model_key)
        model, processor = cached_model(str(model_result.model_dir), shard.device, shard.dtype)
        family_of(model).set_interpolation(model, processor, cfg.interpolation)
        items, rows, bad_rows = shard_items(shard.benchmark, [Path(f) for f in shard.files], shard.start, shard.stop)
        names = [p.strategy for p in wanted]
        uses_relevance = any(p.spec.wants("relevance") for p in wanted)
        relevance = eval_text_encoder(cfg, model_result, shard.device) if uses_relevance else None
        outputs = tower_outputs(names, relevance=relevance is not None)
        tower_batch = cfg.batch_size if isinstance(cfg.batch_size, int) else AUTO_BATCH_CPU
        feats = encode_shard(model, processor, items, rows, outputs, batch_size=tower_batch)
        skipped = [{"row": i, "reason": r} for i, r in bad_rows] + \
                  [{"sample_id": sid, "reason": r} for sid, r in feats.skipped]
        for entry in skipped:
            _warn(f"skipped {entry['reason']}")
        return cls(home, shard, model_key, cfg, model_result, model, processor, feats, skipped, relevance,
                   time.perf_counter() - t0)

    def selector_for(self, pruning: Pruning, ref: str | None) -> Any:
        """The loaded selector of a strategy that needs one (:func:`chunk_selector`), once per
        (retention, variant)."""
        if "selector" not in pruning.spec.needs:
            return None
        slot = selector_slot(pruning)
        if slot not in self.selectors:
            loaded = chunk_selector(self.home, ref, pruning, self.model_result)
            self.selectors[slot] = loaded.selector.to(self.model.device)
        return self.selectors[slot]

    def result(self, work: Path, pruning: Pruning, selector: str | None, figures: dict[str, Any]) -> dict[str, Any]:
        """Compute one result into ``work`` (``samples.json``); its manifest."""
        from pipeline.evaluate import Batching, Inputs, evaluate_features

        t1 = time.perf_counter()
        s, cfg = self.shard, self.cfg
        inputs = Inputs(self.selector_for(pruning, selector),
                        self.relevance if pruning.spec.wants("relevance") else None)
        res = evaluate_features(self.model, self.processor, s.benchmark, self.features, pruning, inputs,
                                Batching(cfg.batch_size, on_batch=progress.advance))
        write_json_atomic(work / "samples.json", res.samples)
        figures["padding"] += res.padding
        figures["positions"] += res.positions
        return {"config": {**result_coords(s.benchmark, pruning, cfg.limit, cfg.interpolation, s.split),
                           "rows": [s.start, s.stop]},
                "inputs": {"model": self.model_key, "files": list(s.files), "selector": selector,
                           **({"text_encoder": cfg.text_encoder} if pruning.spec.wants("relevance") else {})},
                "compute": {"device": s.device, "dtype": s.dtype},
                "summary": {"metric": res.metric, "score": res.score, "n_samples": res.n_samples,
                            "mean_visual_tokens": res.mean_visual_tokens, "prefill_ms": res.prefill_ms,
                            **({"stock_visual_tokens": res.stock_visual_tokens}
                               if res.stock_visual_tokens is not None else {})},
                "counts": {"samples": res.n_samples, "skipped": len(self.skipped), "padding": res.padding,
                           "positions": res.positions},
                "skipped": self.skipped, "tower_seconds": self.tower_seconds, "code_version": code_version(),
                "seconds": time.perf_counter() - t1}


def merge_chunk(home: Home, chunk: Chunk, shard_results: list[StageResult], force: bool = False) -> StageResult:
    """The ``eval`` result of one chunk: its shards' samples in row order and the aggregate over them."""
    from pipeline.evaluate import merge_results

    def build(work: Path) -> dict[str, Any]:
        parts = [{"samples": json.loads((r.path / "samples.json").read_text()), "summary": r.manifest["summary"]}
                 for r in shard_results]
        merged = merge_results(chunk.benchmark, parts)
        write_json_atomic(work / "samples.json", merged["samples"])
        skipped = sum(r.manifest.get("counts", {}).get("skipped", 0) for r in shard_results)
        p = chunk.pruning
        return {"config": {"benchmark": chunk.benchmark, "strategy": chunk.strategy, "retention": chunk.retention,
                           "seed": chunk.seed, "budget": p.budget,
                           **({"variant": p.variant} if p.variant else {}),
                           **({"threshold": p.threshold, "floor": p.floor} if p.budget == "threshold" else {})},
                "inputs": {"shards": [r.key for r in shard_results], "files": list(chunk.files)},
                "compute": {"device": chunk.device, "dtype": chunk.dtype}, "summary": merged["summary"],
                "counts": {"samples": merged["summary"]["n_samples"], "shards": len(shard_results),
                           "skipped": skipped},
                "code_version": code_version(), "seconds": sum(r.manifest.get("seconds", 0.0) for r in shard_results)}

    return run_stage(home, "eval", chunk.key, build, force=force, fresh=True)


# ---------------------------------------------------------------- the stage

@dataclass
class EvalRun:
    """What :func:`eval_chunks` did: one (Chunk, merged StageResult) per result, and the stage's figures
    (``stage_metrics``): images, tower_passes, shards, shard_results, computed, skipped, padding_share."""

    results: list[tuple[Chunk, StageResult]]
    figures: dict[str, float]


def eval_chunks(home: Home, config: EvalConfig, model: StageResult, plan: list[Chunk], selector: str | None = None, *,
                force: bool = False, mapper: Mapper = serial) -> EvalRun:
    """Run (or reuse) every shard of ``plan`` (from :func:`plan_eval`) and merge each result; ``force``
    recomputes them all (``atr run --from eval``). A cache hit reports its share of the lookup time."""
    shards = plan_shards(plan)
    complete = [all(StageDir(home, "eval-shard", k).is_complete() for _, k in u.results) and not force
                for u in shards]
    remote = getattr(mapper, "remote", False)
    total = sum(u.rows * len(u.results) for u in shards)
    t0 = time.perf_counter()
    with progress.bar("eval", total=total, unit="questions") as bar:
        def done(i: int, out: dict[str, Any]) -> None:
            if remote:
                bar.advance(shards[i].rows * len(shards[i].results))
            else:  # computed results advanced the bar per batch; cached ones advance here
                bar.advance(shards[i].rows * (len(shards[i].results) - out["computed"]))

        calls = [{"home": str(home.root), "shard": u, "model_key": model.key, "config": config.to_dict(),
                  "selector": selector, "force": force} for u in shards]
        outs = mapper(eval_shard, calls, [content_key(u) for u in shards], done)
    by_key: dict[str, StageResult] = {}
    for out in outs:
        for r in out["results"]:
            by_key[r["key"]] = StageResult.from_dict(r)
    results = []
    for c in plan:
        parts = [by_key[k] for *_, k in c.shards]
        r = merge_chunk(home, c, parts, force=force or not all(p.cached for p in parts))
        r.cached = all(p.cached for p in parts) and not force
        results.append((c, r))
    # Shards share their tower pass, so a result's own time is not separable: each result carries an
    # equal share of the stage's wall time (a cache hit: of the lookup time), and they sum to the stage's.
    for _, r in results:
        r.seconds = (time.perf_counter() - t0) / max(1, len(plan))
    padding, positions = sum(o["padding"] for o in outs), sum(o["positions"] for o in outs)
    figures = {"images": sum(o["images"] for o in outs), "tower_passes": sum(o["tower_passes"] for o in outs),
               "shards": len(shards), "shard_results": sum(len(u.results) for u in shards),
               "computed": sum(o["computed"] for o in outs), "skipped": sum(o["skipped"] for o in outs),
               "cached_shards": sum(complete), "padding_share": padding / positions if positions else 0.0,
               "seconds": time.perf_counter() - t0}
    for line in stock_warnings(eval_summary(results)):
        _warn(line)
    return EvalRun(results, figures)


def stock_warnings(summary: list[dict[str, Any]]) -> list[str]:
    """One line per (benchmark, budget, retention) at which a pruning strategy sent some image more visual
    tokens than the stock model would (``above_stock`` samples; a result cached before that count existed:
    its mean against the stock mean). LLaVA-OneVision with interpolation off does, at any retention where
    r x full exceeds the shrunk stock grid; ``--budget stock`` sizes the budget against the stock model."""
    from pipeline.strategies import prunes

    groups: dict[tuple, list[tuple[str, int, int, float]]] = {}
    for r in summary:
        stock = r.get("stock_visual_tokens")
        if not (prunes(r["strategy"]) and stock):
            continue
        above = r.get("above_stock")
        if above is None:
            above = r["n_samples"] if r["mean_visual_tokens"] > stock else 0
        if above:
            groups.setdefault((r["benchmark"], r.get("budget", "per-crop"), r["retention"]), []).append(
                (r["strategy"], above, r["n_samples"], r["mean_visual_tokens"] / stock))
    lines = []
    for (bench, budget, retention), rows in groups.items():
        names = ", ".join(dict.fromkeys(name for name, *_ in rows))
        worst = max(rows, key=lambda x: x[1])
        lines.append(f"{bench} at retention {retention:g} ({budget} budget): {names} sent more visual tokens than "
                     f"the stock model would on {worst[1]} of {worst[2]} images (mean context up to "
                     f"{max(x[3] for x in rows):.2f}x stock); compare at equal cost with --budget stock")
    return lines


def content_key(shard: Shard) -> str:
    """A work unit's task cache key: the keys of every result it owns."""
    return content_hash([k for _, k in shard.results])


def eval_summary(results: list[tuple[Chunk, StageResult]]) -> list[dict[str, Any]]:
    """One row per chunk: its coordinates, whether it was cached, and its summary figures."""
    return [{"benchmark": c.benchmark, "strategy": c.strategy, "variant": c.pruning.variant, "retention": c.retention,
             "seed": c.seed, "budget": c.pruning.budget, "threshold": c.pruning.threshold,
             **({"floor": c.pruning.floor} if c.pruning.budget == "threshold" else {}),
             "cached": o.cached, **o.manifest["summary"]} for c, o in results]


__all__ = ["Chunk", "Shard", "ResultKey", "EvalRun", "plan_eval", "plan_shards", "eval_shard", "merge_chunk",
           "eval_chunks", "eval_summary", "data_files", "shard_items", "eval_selector", "eval_text_encoder",
           "require_selector", "result_coords", "content_key", "stock_warnings", "SELECTOR_NEEDED"]
