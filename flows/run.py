"""``atr run`` and ``atr serve``: the end-to-end flow.

One Prefect flow, ``atr-run``: prepare-model -> extract (selector training
images) -> train -> eval (a list of benchmarks) -> report. Every stage is the
same content-hashed, cached stage the single-stage commands use, so:

* a second identical run does no model work, and every stage is recorded as
  cached in ``stage_runs``;
* changing only ``[eval]`` settings reuses the features and the selector;
* ``--from STAGE`` recomputes that stage and every stage after it (the old
  output stays in place until the new one replaces it);
* deleting a stage directory recomputes just that stage (its output has the same
  content, so later stages stay cache hits).

One ``runs`` row and one MLflow parent run per ``atr run``, with a child run
per stage. The report stage writes ``summary.md`` (tables), ``summary.json`` and
the plots; the run's folder ``$ATR_HOME/reports/run-<run_id>/`` holds a copy
plus the stage list and the DuckDB and MLflow run ids.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from prefect import flow

from pipeline.config import Config, ConfigError, ExtractConfig, check, content_hash
from pipeline.evaluate import EvalConfig
from pipeline.train import TrainConfig
from storage.home import Home
from storage.stages import StageDir, code_version, read_manifest, stage_key, write_json_atomic

STAGES = ("prepare-model", "extract", "train", "eval", "report")
REPORT_VERSION = "1"


# ---------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """Every stage's config for one end-to-end run (the TOML file of ``atr run --config``).

    ``model`` is prepare-model's config; ``extract`` says which images the selector
    is trained on (the paper: base-resolution crops, one per image); ``data`` maps
    a real benchmark name to its lmms-lab parquet file or directory."""

    kind = "run"

    model: str = "tiny-trained"
    extract: ExtractConfig = ExtractConfig(images="synthetic:docs", limit=2048, crops="base")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    data: Mapping = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        """As ``Config.from_dict``, but a partial ``[extract]`` table fills in from this config's
        own extract defaults (2048 base crops), not from ExtractConfig's."""
        data = dict(data)
        if isinstance(data.get("extract"), Mapping):
            base = cls().extract.to_dict()
            unknown = [k for k in data["extract"] if k not in base]
            if not unknown:
                data["extract"] = {**base, **data["extract"]}
        return super().from_dict(data)

    def validate(self) -> None:
        check(isinstance(self.model, str) and bool(self.model.strip()), "model must name a model")
        check(isinstance(self.data, Mapping), "[data] must be a table of benchmark = path")
        from pipeline.benchmarks import BENCHMARKS

        for name, path in self.data.items():
            check(name in BENCHMARKS, f"[data] names unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
            check(isinstance(path, str) and bool(path), f"[data] {name} must be a path string")
        missing = [b for b in self.eval.benchmarks if not b.startswith("synthetic-") and b not in self.data]
        check(not missing, f"benchmark {', '.join(missing)} needs a path in [data] (an lmms-lab parquet file "
                           "or a directory of them)")


def load_config(path: str | Path | None) -> tuple[RunConfig, list[str]]:
    """(config, selector schedule keys the file sets) from a TOML file; the defaults for None.

    The second item decides which of the tiny presets' short training schedule
    (``flows.train.TINY_SCHEDULE``) the file overrides."""
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
    raise TypeError(f"cannot write {v!r} as TOML")


_COMMENTS = {
    "model": "preset (tiny-trained, tiny), a save_pretrained directory, or a HF id "
             "(llava-hf/llava-v1.6-mistral-7b-hf)",
    "extract": "selector training images: synthetic:docs, synthetic:scenes or a folder (COCO train2017)",
    "train": "one selector per retention p; loss = MSE + max(mean(M), p)",
    "train.selector": "architecture and optimizer (paper-scale defaults from DESIGN.md)",
    "eval": "pruned evaluation: full/none once, random per seed, the rest once per retention",
    "data": "real benchmarks: NAME = \"lmms-lab parquet file or directory\"",
}


def config_toml(cfg: RunConfig) -> str:
    """The config as commented TOML (``atr run --print-config``); ``load_config`` reads it back."""
    from .train import TINY_SCHEDULE

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
    sel = train["selector"]
    tiny = {k: f"{_toml_value(sel[k])}  (paper scale; the tiny presets use {_toml_value(v)} unless this is set)"
            for k, v in TINY_SCHEDULE.items()}
    sel_comments = {**tiny, "d_model": "(the encoder width C)"}
    section("train.selector", {k: v for k, v in sel.items() if k != "retention"},
            commented={k: v for k, v in sel_comments.items() if sel.get(k) is None or k in tiny})
    section("eval", cfg.eval.to_dict())
    out.extend(["", f"# {_COMMENTS['data']}", "[data]"])
    if cfg.data:
        out.extend(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in cfg.data.items())
    else:
        out.append('# docvqa_val = "/data/lmms-lab/DocVQA/DocVQA"')
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- report stage

def run_report(h: Home, model: str, feat, train, results: list, force: bool = False):
    """The report stage: summary tables (markdown + JSON) and plots, keyed by its inputs' keys."""
    from .evaluate import eval_summary, eval_table
    from .plots import plot_eval
    from .stages import StageResult

    t0 = time.perf_counter()
    inputs = {"train": train.key, "eval": content_hash(sorted(o.key for _, o in results))}
    key = stage_key("report", REPORT_VERSION, {"model": model}, inputs)
    sd = StageDir(h, "report", key)
    if sd.is_complete() and not force:
        return StageResult("report", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete() and not force:
            return StageResult("report", key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin(fresh=True)
        # "cached" is a property of one run, not of the report.
        chunks = eval_summary(results)
        rows = [{k: v for k, v in r.items() if k != "cached"} for r in eval_table(chunks)]
        summary = [{k: v for k, v in r.items() if k != "cached"} for r in chunks]
        write_json_atomic(work / "summary.json", {"eval": rows, "chunks": summary,
                                                   "selector_metrics": train.manifest["selector_metrics"]})
        plots = [p.name for p in plot_eval(summary, work)]
        if (train.path / "selector_metrics.png").is_file():
            shutil.copy2(train.path / "selector_metrics.png", work / "selector_metrics.png")
            plots.append("selector_metrics.png")
        (work / "summary.md").write_text(_markdown(model, feat, train, rows, plots))
        manifest = {"config": {"model": model}, "inputs": inputs, "plots": plots, "code_version": code_version(),
                    "counts": {"chunks": len(results), "plots": len(plots)}, "seconds": time.perf_counter() - t0}
        path = sd.commit(manifest)
    return StageResult("report", key, path, False, time.perf_counter() - t0, read_manifest(path))


def _markdown(model: str, feat, train, rows: list[dict], plots: list[str]) -> str:
    retentions = sorted({r["retention"] for r in rows if r["strategy"] not in ("full", "none")})
    full = {r["benchmark"]: r["score"] for r in rows if r["strategy"] == "full"}
    none = {r["benchmark"]: r["score"] for r in rows if r["strategy"] == "none"}
    fm, tm = feat.manifest, train.manifest
    lines = ["# atr run report", "",
             f"- model: `{model}`",
             f"- selector: train stage `{train.key}` (p = {', '.join(tm['checkpoints'])}, "
             f"{tm['config']['selector']['steps']} steps, eval mode {tm['eval_mode']})",
             f"- features: extract stage `{feat.key}` ({fm['counts']['samples']} images from "
             f"`{fm['config']['images']}`, {fm['config']['crops']} crops)", "",
             "## Pruned evaluation", "",
             "Score per retention; in brackets the fraction of the full-image score. Random is the mean over "
             "seeds.", "",
             "| benchmark | strategy | " + " | ".join(f"{r:g}" for r in retentions) + " | full | none |",
             "|---|---|" + "---|" * (len(retentions) + 2)]
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["strategy"] not in ("full", "none"):
            cells.setdefault((r["benchmark"], r["strategy"]), {})[r["retention"]] = r
    for (bench, strategy), by_r in cells.items():
        vals = []
        for ret in retentions:
            r = by_r.get(ret)
            vals.append("" if r is None else f"{r['score']:.3f}" + ("" if r["rel"] is None else f" ({r['rel']:.2f}×)"))
        name = strategy + (f" ({next(iter(by_r.values()))['seeds']} seeds)" if strategy == "random" else "")
        f, n = full.get(bench), none.get(bench)
        lines.append(f"| {bench} | {name} | " + " | ".join(vals) +
                     f" | {'' if f is None else f'{f:.3f}'} | {'' if n is None else f'{n:.3f}'} |")
    sel = tm["selector_metrics"]
    if sel:
        strategies = sorted({r["strategy"] for r in sel})
        lines += ["", "## Selector on held-out crops", "",
                  f"Reconstruction MSE (standardized features) from the kept tokens, {tm['held_out_crops']} "
                  "held-out crops.", "",
                  "| retention | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
        for ret in sorted({r["retention"] for r in sel}):
            by_s = {r["strategy"]: r for r in sel if r["retention"] == ret}
            lines.append(f"| {ret:g} | " + " | ".join(f"{by_s[s]['recon_mse']:.4f}" if s in by_s else ""
                                                       for s in strategies) + " |")
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_run_folder(h: Home, recorder, report, stages: list) -> Path:
    """``reports/run-<run_id>/``: the report stage's files plus the stages and the run ids."""
    out = h.reports / f"run-{recorder.run_id}"
    out.mkdir(parents=True, exist_ok=True)
    for f in report.path.iterdir():
        if f.is_file() and f.name != "_manifest.json":
            shutil.copy2(f, out / f.name)
    lines = ["", "## Stages", "", "| stage | key | cached | seconds | output |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | `{r['key']}` | {r['cached']} | {r['seconds']:.1f} | `{r['output']}` |"
              for r in stage_summary(stage_dicts(stages))]
    lines += ["", "## Runs", "",
              f"- DuckDB: run `{recorder.run_id}` in `{h.results_db}`, e.g. "
              f"`atr query \"SELECT * FROM eval_scores WHERE run_id = '{recorder.run_id}'\"`",
              f"- MLflow: run `{recorder.mlflow_run_id}` (experiment `{recorder.tracker.experiment_id}`) at "
              f"`{recorder.tracker.uri}`"]
    with open(out / "summary.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    write_json_atomic(out / "run.json", {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id,
                                         "report_stage": str(report.path), "stages": stage_dicts(stages)})
    return out


def stage_dicts(stages: list) -> list[dict[str, Any]]:
    """StageResults as plain dicts (what ``run_flow`` returns and ``run.json`` holds)."""
    return [{"stage": s.stage, "key": s.key, "cached": s.cached, "seconds": s.seconds, "path": str(s.path)}
            for s in stages]


def stage_summary(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage, in run order: ``key`` (or "N chunks" for eval), ``cached`` ("yes", "no" or
    "k/N"), total ``seconds`` and ``output`` (the stage directory, or the chunks' parent)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in stages:
        groups.setdefault(s["stage"], []).append(s)
    rows = []
    for name, g in groups.items():
        n = sum(s["cached"] for s in g)
        one = len(g) == 1
        rows.append({"stage": name, "key": g[0]["key"] if one else f"{len(g)} chunks",
                     "cached": "yes" if n == len(g) else ("no" if n == 0 else f"{n}/{len(g)}"),
                     "seconds": sum(s["seconds"] for s in g),
                     "output": g[0]["path"] if one else str(Path(g[0]["path"]).parent)})
    return rows


# ---------------------------------------------------------------- the flow

def _pipeline(home: str, config: dict[str, Any], from_stage: str | None, user_set: list[str] | None) -> dict:
    from . import runtime
    from .evaluate import eval_summary, plan_eval, record_eval, run_eval_chunks
    from .extract import extract_metrics, run_extract, run_prepare_model
    from .records import RunRecorder
    from .train import apply_tiny_schedule, train_stage

    h = Home.resolve(home)
    runtime.configure(h)  # a served deployment runs this in a fresh process
    cfg = RunConfig.from_dict(config)
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from {from_stage!r}: valid stages are {', '.join(STAGES)}")
    force = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    recorder = RunRecorder(h, "run", {**cfg.to_dict(), "from": from_stage})
    try:
        model_stage = run_prepare_model(h, cfg.model, force="prepare-model" in force)
        recorder.stage(model_stage)
        feat = run_extract(h, model_stage, cfg.extract, force="extract" in force)
        recorder.stage(feat, metrics=extract_metrics(feat))
        feat.manifest["model"] = cfg.model
        tcfg = apply_tiny_schedule(cfg.train, feat, set(user_set or []))
        train, _ = train_stage(h, recorder, feat, tcfg, force="train" in force)
        strategies = cfg.eval.strategies
        plan = plan_eval(h, model_stage, cfg.eval, train.key if "selector" in strategies else None, dict(cfg.data))
        child = recorder.begin_stage("eval")
        recorder.tracker.log_params(child, {"stage": "eval", "config": cfg.eval.to_dict(), "data": dict(cfg.data)})
        results = run_eval_chunks(h, model_stage, cfg.eval, train.key, plan, force="eval" in force)
        record_eval(recorder, cfg.model, results, child=child)
        recorder.tracker.end_run(child)
        report = run_report(h, cfg.model, feat, train, results, force="report" in force)
        plots = [report.path / p for p in report.manifest["plots"]]
        recorder.stage(report, artifacts=(report.path / "summary.md", report.path / "summary.json", *plots))
        folder = write_run_folder(h, recorder, report, recorder.stages)
        recorder.tracker.log_artifact(recorder.mlflow_run_id, folder / "summary.md")
    except BaseException as exc:
        recorder.finish(exc)
        raise
    recorder.finish()
    return {"run_id": recorder.run_id, "mlflow_run_id": recorder.mlflow_run_id, "report": str(folder),
            "summary": eval_summary(results), "stages": stage_dicts(recorder.stages)}


@flow(name="atr-run-on-dask")
def _pipeline_on_dask(home: str, config: dict[str, Any], from_stage: str | None = None,
                      user_set: list[str] | None = None) -> dict:
    return _pipeline(home, config, from_stage, user_set)


@flow(name="atr-run")
def run_flow(home: str, config: dict[str, Any], from_stage: str | None = None, user_set: list[str] | None = None,
             dask_address: str | None = None, dask_workers: int | None = None) -> dict:
    """prepare-model -> extract -> train -> eval -> report, every stage cached by content hash.

    With ``dask_address``/``dask_workers`` the stages run in a subflow on prefect-dask's
    DaskTaskRunner, which maps extraction shards and eval chunks over the cluster."""
    from .scale import task_runner

    runner = task_runner(dask_address, dask_workers)
    if runner is None:
        return _pipeline(home, config, from_stage, user_set)
    return _pipeline_on_dask.with_options(task_runner=runner)(home, config, from_stage, user_set)


# ---------------------------------------------------------------- serve

def build_deployment(home: Home, cfg: RunConfig, user_set: list[str], cron: str, name: str,
                     dask_address: str | None = None):
    """The end-to-end flow as a Prefect deployment with a cron schedule and the run's parameters."""
    from prefect.schedules import Cron

    try:
        schedule = Cron(cron, timezone="UTC")
    except ValueError:
        raise ConfigError(f"--cron {cron!r} is not a cron expression (e.g. \"0 3 * * *\": daily at 03:00 UTC)") \
            from None
    params = {"home": str(home.root), "config": cfg.to_dict(), "from_stage": None, "user_set": user_set,
              "dask_address": dask_address, "dask_workers": None}
    return run_flow.to_deployment(name=name, schedule=schedule, parameters=params,
                                  description="atr end-to-end run: prepare-model -> extract -> train -> eval -> "
                                              "report", tags=["atr"])
