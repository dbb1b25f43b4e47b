"""The benchmark stage: a synthetic benchmark split written once as lmms-lab parquet (``atr benchmark``).

Output ``stages/benchmark/<key>/<name>-<split>.parquet``; the key hashes the
benchmark, split, size, seed and generator version.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from storage.home import Home
from storage.stages import code_version, run_stage, stage_key

BENCHMARK_VERSION = "1"


def synthetic_benchmark(home: Home, name: str, split: str, n: int, seed: int = 0) -> Path:
    """``<name>-<split>.parquet`` (lmms-lab layout) in a content-hashed stage dir; cached."""
    from pipeline.synthetic import BENCHMARKS, SPLITS, generate_samples, generator_fingerprint
    from storage.benchmarks import write_parquet

    if name not in BENCHMARKS:
        raise ConfigError(f"unknown synthetic benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    config = {"benchmark": name, "split": split, "n": n, "seed": seed, "generator": generator_fingerprint()}
    key = stage_key("benchmark", BENCHMARK_VERSION, config, {})
    filename = f"{name}-{split}.parquet"

    def build(work: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        write_parquet((s.row() for s in generate_samples(name, split, n, seed=seed)), work / filename)
        return {"config": config, "file": filename, "rows": n, "code_version": code_version(),
                "seconds": time.perf_counter() - t0}

    # An interrupted write left at most a parquet .tmp file, which write_parquet replaces: resume in place.
    return run_stage(home, "benchmark", key, build, fresh=False).path / filename
