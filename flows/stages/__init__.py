"""The pipeline's stages as plain functions: ``stage(home, config, inputs) -> StageResult``.

One module per stage (prepare_model, benchmark, extract, train, eval, report,
speed). No Prefect here: ``flows.orchestration`` wraps these functions as tasks
and flows, and tests call them directly. Each stage is cached by the content
hash of (stage, version, config, input keys) through ``storage.stages.run_stage``.

A stage made of many work units (extraction shards, eval chunks) takes a
``mapper(unit, calls, keys, on_done)``: :func:`serial` runs ``unit(**call)`` one
after another in this process; the orchestration layer passes one that runs
each call as the Prefect task wrapping ``unit``, with that unit's cache key
(over Dask when the flow runs on a DaskTaskRunner). Units receive only paths,
hashes and plain configs, never tensors. A mapper whose units run in other
processes has ``remote = True`` (progress is then counted as units finish).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

STAGES = ("prepare-model", "extract", "train", "eval", "report")  # the stages of atr run, in order

OnDone = Callable[[int, Any], None]
Mapper = Callable[[Callable[..., Any], Sequence[dict[str, Any]], Sequence[str], "OnDone | None"], list[Any]]


def serial(unit: Callable[..., Any], calls: Sequence[dict[str, Any]], keys: Sequence[str] = (),
           on_done: OnDone | None = None) -> list[Any]:
    """Run ``unit(**kwargs)`` for each kwargs dict in this process; results in call order.
    ``on_done(index, result)`` fires after each; ``keys`` (the units' cache keys) are not needed here."""
    out = []
    for i, kwargs in enumerate(calls):
        out.append(unit(**kwargs))
        if on_done:
            on_done(i, out[-1])
    return out


__all__ = ["STAGES", "Mapper", "serial"]
