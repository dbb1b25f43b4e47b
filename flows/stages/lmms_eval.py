"""``atr eval --harness lmms-eval``: lmms-eval's own tasks and scoring inside the eval stage.

Each (task, strategy, retention, seed) is one cached stage directory ``stages/eval-lmms/<key>/``
holding lmms-eval's per-sample log as ``samples.json`` (the rows ``eval_samples`` gets) and its
aggregate metric in the manifest's ``summary`` (``eval_scores``). The key hashes the task and
its coordinates, the model stage, the selector, the data files and the lmms-eval version, so
an unchanged result is never recomputed. lmms-eval runs in-process through
``lmms_eval.evaluator.simple_evaluate`` with an ``atr_llava`` model instance
(``flows.lmms.model``).

``--data PATH`` points a task at a local parquet file (or a folder of them) in the lmms-lab
layout: a task yaml that includes lmms-eval's own and overrides only ``dataset_path: parquet`` and
``dataset_kwargs.data_files`` is written into the stage's work directory, so the task's prompt,
generation settings and metric stay lmms-eval's and no hub is touched.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, content_hash, first_line
from pipeline.evaluate import EvalConfig
from storage.home import Home
from storage.stages import StageResult, code_version, run_stage, stage_key, write_json_atomic

from .eval import Chunk, check_crops, chunk_selector, model_pixels, require_selector

LMMS_EVAL_VERSION = "1"
INSTALL = "pip install torch==2.13.0 -c constraints.txt -e '.[lmms]'"


def require_lmms_eval() -> str:
    """lmms-eval's version; one line with the install command when the extra is not installed."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError(f"--harness lmms-eval needs the [lmms] extra, which is not installed: {INSTALL} "
                          f"(in the same command as your torch, so pip picks the torchvision made for it)")
    from importlib.metadata import version

    from pipeline.compat import torchvision_guard

    torchvision_guard()
    return version("lmms_eval")


def task_manager(include: Path | None = None):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None)


def check_tasks(tasks: tuple[str, ...]) -> None:
    """Refuse a task lmms-eval does not know, in one line with its nearest task names."""
    from rapidfuzz import process

    known = task_manager().all_tasks
    for task in tasks:
        if task not in known:
            near = [m for m, _, _ in process.extract(task, known, limit=3)]
            raise ConfigError(f"unknown lmms-eval task {task!r}; nearest: {', '.join(near)}")


def _data_fingerprint(path: str | None) -> str:
    if not path:
        return "hub"
    p = Path(path).expanduser()
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"--data {path}: no parquet file there")
    _check_image_features(files[0])
    return content_hash([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def _check_image_features(file: Path) -> None:
    """lmms-eval's tasks call ``doc["image"].convert``: their parquet must say, in its Hugging Face
    features metadata, that the ``{bytes, path}`` columns are images (lmms-lab's files do). A file
    without it would crash inside lmms-eval; one line here instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"--data {file}: not a readable parquet file ({first_line(exc)})") from None
    if b"huggingface" in (schema.metadata or {}):
        return
    plain = [f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}]
    if plain:
        raise ConfigError(f"--data {file}: image columns {', '.join(plain)} carry no Hugging Face features metadata, "
                          "so lmms-eval cannot decode them; use the lmms-lab file as downloaded, or write it with "
                          "datasets (Dataset.to_parquet with datasets.Image() features). --harness builtin reads "
                          "either.")


def plan_lmms(model: StageResult, cfg: EvalConfig, tasks: tuple[str, ...], selector: str | None,
              data: dict[str, str], home: Home) -> list[Chunk]:
    """One chunk per (task, strategy, retention, seed), each with its stage key."""
    from pipeline.device import compute

    for p in cfg.chunks():  # the atr_llava model runs a strategy with its defaults and a fixed budget
        if p.variant or p.budget == "threshold":
            raise ConfigError(f"--harness lmms-eval runs {p.strategy} with its default options under a fixed budget; "
                              f"drop {'--thresholds' if p.budget == 'threshold' else f'its options ({p.variant})'} "
                              "or use --harness builtin")
    version = require_lmms_eval()
    check_tasks(tasks)
    require_selector(cfg.strategies, selector)
    check_crops(model, cfg)  # HiRED on a family without crops (Qwen-VL): one line, before any task runs
    pixels = model_pixels(model)  # Qwen-VL's processor pixel limits decide every image's grid
    device, dtype = compute(cfg.device, cfg.model_dtype)
    plan = []
    for task in tasks:
        fp = _data_fingerprint(data.get(task))
        for p in cfg.chunks():
            sha = chunk_selector(home, selector, p, model).sha256 if "selector" in p.spec.needs else None
            coords = {"task": task, "strategy": p.strategy, "retention": p.retention, "seed": p.seed, "limit": cfg.limit,
                      "budget": p.budget, **({"interpolation": True} if cfg.interpolation else {})}
            inputs = {"model": model.key, "data": fp, "compute": f"{device}-{dtype}", "lmms_eval": version,
                      **({"selector": sha} if sha else {}), **({"pixels": pixels} if pixels else {})}
            key = stage_key("eval-lmms", LMMS_EVAL_VERSION, coords, inputs)
            files = (str(data[task]),) if data.get(task) else ()
            plan.append(Chunk(task, files, p, key, device, dtype))
    return plan


def _local_task(task: str, data: str, work: Path) -> tuple[str, Path]:
    """(task name, include dir) of lmms-eval's ``task`` read from the local parquet ``data``."""
    from lmms_eval.utils import load_yaml_config

    yaml_path = Path(task_manager().task_index[task]["yaml_path"])
    split = load_yaml_config(str(yaml_path), mode="simple").get("test_split") or "test"
    p = Path(data).expanduser().resolve()
    files = str(p / "*.parquet") if p.is_dir() else str(p)
    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{task}__atr_local"
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ninclude: {yaml_path}\ndataset_path: parquet\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {files}\n")
    return name, folder


def run_lmms_chunk(home: Home, chunk: Chunk, model: StageResult, cfg: EvalConfig, selector: str | None,
                   force: bool = False) -> StageResult:
    """lmms-eval on one chunk (cached): ``samples.json`` and the aggregate metric."""

    def build(work: Path) -> dict[str, Any]:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.models import get_model

        # flows.lmms.model.AtrLlava, found the way lmms-eval finds it (the atr_llava entry point):
        # the plugin imports this package's stages, so importing it back here would be a cycle
        AtrLlava = get_model("atr_llava")

        t0 = time.perf_counter()
        task, include = chunk.benchmark, None
        if chunk.files:
            task, include = _local_task(chunk.benchmark, chunk.files[0], work)
        lm = AtrLlava(pretrained=str(model.model_dir), strategy=chunk.strategy, retention=chunk.retention,
                      selector=selector, budget=chunk.pruning.budget, seed=chunk.seed, device=cfg.device,
                      dtype=cfg.model_dtype, batch_size=cfg.batch_size if isinstance(cfg.batch_size, int) else 16,
                      interpolation="on" if cfg.interpolation else "off", text_encoder=cfg.text_encoder,
                      home=str(home.root))
        out = simple_evaluate(model=lm, tasks=[task], task_manager=task_manager(include), limit=cfg.limit,
                              log_samples=True, batch_size=lm.batch_size)
        results = out["results"][task]
        metrics = out["configs"][task].get("metric_list") or [{"metric": "score"}]
        metric = metrics[0]["metric"]
        rows = []
        for s in sorted(out["samples"][task], key=lambda r: r["doc_id"]):
            value = s.get(metric)
            target = s.get("target")
            rows.append({"sample_id": str(s["doc_id"]), "prediction": str(s["filtered_resps"][0]),
                         "answer": " | ".join(map(str, target)) if isinstance(target, list) else str(target),
                         "score": float(value) if isinstance(value, (int, float)) else None,
                         "index": int(s["doc_id"])})
        write_json_atomic(work / "samples.json", rows)
        score = results.get(f"{metric},none")
        return {"config": {"task": chunk.benchmark, "strategy": chunk.strategy, "retention": chunk.retention,
                           "seed": chunk.seed, "limit": cfg.limit, "budget": chunk.pruning.budget,
                           "variant": chunk.pruning.variant, "threshold": chunk.pruning.threshold,
                           "interpolation": cfg.interpolation},
                "inputs": {"model": model.key, "files": list(chunk.files), "selector": selector},
                "compute": {"device": chunk.device, "dtype": chunk.dtype},
                "summary": {"metric": metric, "score": float(score) if isinstance(score, (int, float)) else float("nan"),
                            "n_samples": len(rows),
                            "mean_visual_tokens": sum(lm.visual_tokens) / max(1, len(lm.visual_tokens)),
                            "prefill_ms": sum(lm.prefill_ms) / max(1, len(lm.prefill_ms))},
                "lmms_eval": {"version": out.get("lmms_eval_version"), "results": results},
                "code_version": code_version(), "seconds": time.perf_counter() - t0}

    return run_stage(home, "eval-lmms", chunk.key, build, force=force, fresh=True)


__all__ = ["LMMS_EVAL_VERSION", "require_lmms_eval", "check_tasks", "plan_lmms", "run_lmms_chunk"]
